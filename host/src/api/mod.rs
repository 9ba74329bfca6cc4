//! The HTTP API: Lambda's REST API as botocore's service model defines it
//! (paths, JSON shapes, status codes, error shapes), plus kiln's own
//! endpoints under `/kiln` and the health checks.
//!
//! Bodies are read here, within per-operation size limits, so that an
//! oversized request gets Lambda's error type rather than a bare 413.

mod error;
mod functions;
mod invoke;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;

pub use error::ApiError;

use crate::control::ControlPlane;
use crate::invoke::DataPlane;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Functions and configuration.
    pub control: Arc<ControlPlane>,
    /// Invocations.
    pub data: Arc<DataPlane>,
}

/// Largest control-plane request body: Lambda's limit for a direct upload
/// (a 50 MB zip, base64-encoded, plus the JSON around it).
pub const MAX_CONTROL_BODY: usize = 70_167_211;

/// The API's router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/2015-03-31/functions",
            post(functions::create).get(functions::list),
        )
        .route("/2015-03-31/functions/", get(functions::list))
        .route(
            "/2015-03-31/functions/{name}",
            get(functions::get).delete(functions::delete),
        )
        .route(
            "/2015-03-31/functions/{name}/configuration",
            get(functions::get_configuration).put(functions::update_configuration),
        )
        .route(
            "/2015-03-31/functions/{name}/code",
            axum::routing::put(functions::update_code),
        )
        .route(
            "/2015-03-31/functions/{name}/invocations",
            post(invoke::invoke),
        )
        .route(
            "/kiln/functions/{name}/code.zip",
            get(functions::download_code),
        )
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(|| async { "ready" }))
        .fallback(unknown_operation)
        .method_not_allowed_fallback(unknown_operation)
        // Limits are enforced per operation in `read_body`.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

async fn unknown_operation(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "UnknownOperationException",
        format!(
            "kiln does not serve {} {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// Every response carries `x-amzn-RequestId`, as Lambda's do.
async fn request_id(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if !response.headers().contains_key("x-amzn-requestid") {
        let id = uuid::Uuid::new_v4().to_string();
        if let Ok(v) = HeaderValue::from_str(&id) {
            response.headers_mut().insert("x-amzn-requestid", v);
        }
    }
    response
}

/// Reads a body of at most `limit` bytes; a larger one is answered with
/// `too_large`.
pub(crate) async fn read_body(
    body: Body,
    limit: usize,
    too_large: impl FnOnce() -> ApiError,
) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let length_limit = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if length_limit {
            too_large()
        } else {
            ApiError::invalid_content(format!("could not read the request body: {e}"))
        }
    })
}

/// Parses a JSON request body of a control-plane operation.
pub(crate) async fn json_body<T: DeserializeOwned>(
    body: Body,
    operation: &str,
) -> Result<T, ApiError> {
    let bytes = read_body(body, MAX_CONTROL_BODY, || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLargeException",
            format!("Request must be smaller than {MAX_CONTROL_BODY} bytes for the {operation} operation"),
        )
    })
    .await?;
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid_content(format!("Could not parse request body into json: {e}"))
    })
}

/// Turns a handler's result into a response.
pub(crate) fn respond<T: IntoResponse>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}
