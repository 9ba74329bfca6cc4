//! The API's gate: every Lambda and kiln operation is authenticated
//! (SigV4), authorized (policies) and, when it is a control-plane call,
//! recorded in the audit trail, before and after its handler runs.
//!
//! The body is read here once (within the largest operation limit) because
//! the signature covers it; handlers get it back unchanged.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState, MAX_CONTROL_BODY, read_body};
use crate::auth::AuthError;
use crate::auth::keys::Identity;
use crate::auth::operations::{self, Operation};
use crate::auth::sigv4::Incoming;
use crate::control::names::FunctionRef;

/// Authenticates, authorizes and audits one request.
pub(crate) async fn guard(
    State(state): State<AppState>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let matched = parts.extensions.get::<MatchedPath>().cloned();
    let source = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.to_string());
    let bytes = match read_body(body, MAX_CONTROL_BODY, || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLargeException",
            format!("Request must be smaller than {MAX_CONTROL_BODY} bytes"),
        )
    })
    .await
    {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let identity = {
        let headers: Vec<(&str, &[u8])> = parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        let incoming = Incoming {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &headers,
            body: &bytes,
        };
        state
            .auth
            .authenticate(&incoming, time::OffsetDateTime::now_utc())
    };
    let caller = match identity {
        Ok(i) => i,
        Err(e) => return refusal(e).into_response(),
    };
    let identity = &caller.identity;

    let route = matched.as_ref().map_or("", |m| m.as_str());
    let params: Vec<(&str, &str)> = params
        .as_ref()
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    let _ = &source;
    let qualifier = parts.uri.query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "Qualifier")
            .map(|(_, v)| v.into_owned())
    });
    let body_function = (parts.method == "POST" && route == "/2015-03-31/functions")
        .then(|| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .flatten()
        .and_then(|v| v.get("FunctionName")?.as_str().map(str::to_owned));
    let op = operations::operation(
        parts.method.as_str(),
        route,
        &params,
        qualifier.as_deref(),
        body_function.as_deref(),
        state.control.arn(),
    );
    let Some(op) = op else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            format!("kiln does not serve {} {}", parts.method, parts.uri.path()),
        )
        .into_response();
    };
    if let Err(e) = authorize(&state, identity, &op).await {
        return refusal(e).into_response();
    }
    parts.extensions.insert(caller);
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

async fn authorize(state: &AppState, identity: &Identity, op: &Operation) -> Result<(), AuthError> {
    if identity.caller == crate::auth::keys::Caller::Root {
        return Ok(());
    }
    let policy = match &op.function {
        Some(name) => {
            let r = FunctionRef {
                name: name.clone(),
                qualifier: op.qualifier.clone(),
            };
            state
                .control
                .get_policy(&r)
                .await
                .ok()
                .and_then(|p| serde_json::from_str(&p.document()).ok())
        }
        None => None,
    };
    state.auth.authorize(identity, op, policy.as_ref())
}

/// Lambda's answer to a refused request: 403 with the failure's type.
fn refusal(e: AuthError) -> ApiError {
    match e {
        AuthError::Signature(e) => {
            ApiError::new(StatusCode::FORBIDDEN, e.error_type(), e.to_string())
        }
        AuthError::Denied(message) => {
            ApiError::new(StatusCode::FORBIDDEN, "AccessDeniedException", message)
        }
        AuthError::Keys(e) => {
            tracing::error!(error = %e, "credential store");
            ApiError::internal("The credential store failed; see the server log")
        }
    }
}
