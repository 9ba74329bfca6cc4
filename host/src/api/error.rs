//! Lambda's error responses: the type in `X-Amzn-ErrorType`, a JSON body
//! `{"Type": "User" | "Service", "message": ...}`, and Lambda's status code.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::control::ControlError;
use crate::invoke::InvokeError;

/// An error as the API returns it.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Lambda's error type (`ResourceNotFoundException`, ...).
    pub error_type: &'static str,
    /// What went wrong and what to do about it.
    pub message: String,
    /// Lambda's `Reason` member, for throttles.
    pub reason: Option<&'static str>,
}

impl ApiError {
    /// An error of `error_type` with `status`.
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error_type,
            message: message.into(),
            reason: None,
        }
    }

    /// 400 `InvalidParameterValueException`.
    pub fn invalid_parameter(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            message,
        )
    }

    /// 400 `InvalidRequestContentException`: a body that is not the JSON expected.
    pub fn invalid_content(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            message,
        )
    }

    /// 500 `ServiceException`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServiceException",
            message,
        )
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let (status, error_type) = match &e {
            ControlError::Validation(_) => (StatusCode::BAD_REQUEST, "ValidationException"),
            ControlError::InvalidParameter(_) => {
                (StatusCode::BAD_REQUEST, "InvalidParameterValueException")
            }
            ControlError::NotFound(_) => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
            ControlError::ProvisionedNotFound(_) => (
                StatusCode::NOT_FOUND,
                "ProvisionedConcurrencyConfigNotFoundException",
            ),
            ControlError::PolicyTooLong(_) => {
                (StatusCode::BAD_REQUEST, "PolicyLengthExceededException")
            }
            ControlError::Conflict(_) => (StatusCode::CONFLICT, "ResourceConflictException"),
            ControlError::PreconditionFailed(_) => (
                StatusCode::PRECONDITION_FAILED,
                "PreconditionFailedException",
            ),
            ControlError::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLargeException",
            ),
            ControlError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "ServiceException"),
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "control plane failure");
        }
        Self::new(status, error_type, e.to_string())
    }
}

impl From<InvokeError> for ApiError {
    fn from(e: InvokeError) -> Self {
        match e {
            InvokeError::NotFound(_) => Self::new(
                StatusCode::NOT_FOUND,
                "ResourceNotFoundException",
                e.to_string(),
            ),
            InvokeError::Throttled { reason } => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                error_type: "TooManyRequestsException",
                message: e.to_string(),
                reason: Some(reason),
            },
            InvokeError::MemoryBudget { .. } => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                error_type: "TooManyRequestsException",
                message: e.to_string(),
                reason: Some("ConcurrentInvocationLimitExceeded"),
            },
            InvokeError::InvalidCode(_) => Self::new(
                StatusCode::BAD_GATEWAY,
                "InvalidRuntimeException",
                e.to_string(),
            ),
            InvokeError::Internal(_) => {
                tracing::error!(error = %e, "data plane failure");
                Self::internal(e.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() {
            "Service"
        } else {
            "User"
        };
        let mut body = serde_json::json!({ "Type": kind, "message": self.message });
        if let Some(reason) = self.reason {
            body["Reason"] = reason.into();
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        response.headers_mut().insert(
            "x-amzn-errortype",
            HeaderValue::from_static(self.error_type),
        );
        response
    }
}
