//! The API's gate: every Lambda and kiln operation is authenticated
//! (SigV4), authorized (policies) and, when it is a control-plane call,
//! recorded in the audit trail, before and after its handler runs.
//!
//! The body is read here once (within the largest operation limit) because
//! the signature covers it; handlers get it back unchanged. It is read only
//! after the request's head names a known key with a well-formed, current
//! signature, so an anonymous client cannot make kiln buffer bodies.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument as _;

use super::{ApiError, AppState, MAX_CONTROL_BODY, read_body};
use crate::audit::AuditEntry;
use crate::auth::keys::Identity;
use crate::auth::operations::{self, Operation};
use crate::auth::sigv4::Incoming;
use crate::auth::{AuthError, RequestConditions};
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
    let now = time::OffsetDateTime::now_utc();
    // A console session, when the request carries its cookie and no
    // signature of its own: reads only, checked once the operation is known.
    let signed = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes().starts_with(b"AWS4-"))
        || parts
            .uri
            .query()
            .is_some_and(|q| q.contains("X-Amz-Signature="));
    let console_token = super::console::session_cookie(&parts.headers)
        .filter(|_| !signed)
        .map(str::to_owned);
    let console = match console_token.as_deref() {
        Some(token) => match console_caller(&state, token) {
            Ok(caller) => Some(caller),
            Err(refused) => return refused.into_response(),
        },
        None => None,
    };
    let (caller, bytes) = match console {
        Some(caller) => (caller, axum::body::Bytes::new()),
        None => match signed_caller(&state, &parts, body, now).await {
            Ok(c) => c,
            Err(refused) => return refused,
        },
    };
    let identity = &caller.identity;

    let route = matched.as_ref().map_or("", |m| m.as_str());
    let params: Vec<(&str, &str)> = params
        .as_ref()
        .map(|p| p.iter().collect())
        .unwrap_or_default();

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
    if console_token.is_some() && (op.mutating || !matches!(parts.method.as_str(), "GET" | "HEAD"))
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            format!(
                "A console session may only read; {} needs a request signed with SigV4",
                op.name
            ),
        )
        .into_response();
    }
    // Invocations are the data plane; everything else is recorded, a
    // console's reads once per resource and window (its page polls them).
    let audited = op.name != "InvokeFunction"
        && console_token
            .as_deref()
            .is_none_or(|t| state.console.audit_read(t, op.name, &op.resource));
    let params = if audited {
        audit_params(parts.uri.query(), &bytes)
    } else {
        serde_json::Value::Null
    };
    let principal = identity.arn.clone();
    // Root is allowed everything: its requests need no condition keys.
    let conditions = if identity.caller == crate::auth::keys::Caller::Root {
        RequestConditions::default()
    } else {
        condition_keys(&state, &caller, &parts, &op, &bytes, now)
    };
    if let Err(e) = authorize(&state, identity, &op, &conditions).await {
        let refused = refusal(e);
        if audited {
            let entry = entry(
                &principal,
                &source,
                &op,
                params,
                &refused.clone().into_response(),
            );
            if let Err(failed) = record(&state, entry).await {
                return failed;
            }
        }
        return refused.into_response();
    }
    // An authorized caller's connection is kept when the server sheds
    // connections for new ones.
    if let Some(connection) = parts.extensions.get::<super::connections::ConnectionAuth>() {
        connection.authenticated();
    }
    parts.extensions.insert(caller);
    parts.extensions.insert(conditions);
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        "operation",
        otel.name = op.name,
        enduser.id = %principal,
    );
    let request = Request::from_parts(parts, Body::from(bytes));
    if !audited {
        return next.run(request).instrument(span).await;
    }
    // A change and its audit record run to the end even if the client
    // goes away in between: what was changed is always in the trail.
    let finish = async move {
        let mut response = next.run(request).instrument(span).await;
        if response.status().is_success() && CONFIGURATION_CHANGES.contains(&op.name) {
            response = history(&state, &principal, &op, response).await;
        }
        let entry = entry(&principal, &source, &op, params, &response);
        if let Err(failed) = record(&state, entry).await {
            return failed;
        }
        response
    };
    match tokio::spawn(finish).await {
        Ok(response) => response,
        Err(e) => ApiError::internal(format!("the operation's task failed: {e}")).into_response(),
    }
}

/// The caller of a console session.
fn console_caller(state: &AppState, token: &str) -> Result<crate::auth::Authenticated, ApiError> {
    super::console::caller(state, token).ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "UnrecognizedClientException",
            "The console session is not valid or has expired: sign in again at /console",
        )
    })
}

/// The caller of a SigV4-signed request, and its body. The key first,
/// from the request's head: an unknown or malformed signature is refused
/// before any body is read.
async fn signed_caller(
    state: &AppState,
    parts: &axum::http::request::Parts,
    body: Body,
    now: time::OffsetDateTime,
) -> Result<(crate::auth::Authenticated, axum::body::Bytes), Response> {
    let headers = super::header_pairs(&parts.headers);
    let head = Incoming {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &headers,
        body: &[],
    };
    let pending = match state.auth.identify(&head, now) {
        Ok(p) => p,
        Err(e) => return Err(refusal(e).into_response()),
    };
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
        Err(e) => return Err(e.into_response()),
    };
    let identity = state.auth.verify(
        &Incoming {
            body: &bytes,
            ..head
        },
        pending,
    );
    match identity {
        Ok(caller) => Ok((caller, bytes)),
        Err(e) => Err(refusal(e).into_response()),
    }
}

/// Operations whose success leaves a new configuration state, which their
/// response carries (a `FunctionConfiguration`), or removes the function.
const CONFIGURATION_CHANGES: &[&str] = &[
    "CreateFunction",
    "UpdateFunctionConfiguration",
    "UpdateFunctionCode",
    "PublishVersion",
    "DeleteFunction",
];

/// Records the configuration state a change left in the function's
/// history (`kiln config-history`), and gives the response back.
async fn history(
    state: &AppState,
    principal: &str,
    op: &Operation,
    response: Response,
) -> Response {
    let (parts, body) = response.into_parts();
    // Configurations are a few KiB; anything larger is not one.
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return ApiError::internal("reading the response failed").into_response();
    };
    let configuration = if op.name == "DeleteFunction" {
        None
    } else {
        serde_json::from_slice::<serde_json::Value>(&bytes).ok()
    };
    let function = configuration
        .as_ref()
        .and_then(|c| c.get("FunctionName")?.as_str().map(str::to_owned))
        .or_else(|| op.function.clone());
    if let Some(function) = function {
        let change = crate::control::history::Change {
            time: crate::control::model::now_rfc3339(),
            principal: principal.to_owned(),
            action: op.name.to_owned(),
            qualifier: op.qualifier.clone(),
            configuration,
        };
        if let Err(e) = state.control.record_change(&function, change).await {
            tracing::error!(function = %function, error = %e, "recording configuration history");
        }
    }
    Response::from_parts(parts, Body::from(bytes))
}

pub(super) fn entry(
    principal: &str,
    source: &str,
    op: &Operation,
    params: serde_json::Value,
    response: &Response,
) -> AuditEntry {
    AuditEntry {
        principal: principal.to_owned(),
        source: source.to_owned(),
        action: op.name.to_owned(),
        resource: op.resource.clone(),
        function: op.function.clone(),
        params,
        status: response.status().as_u16(),
        error: response
            .headers()
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

/// Appends durably before the caller hears back: a change the caller saw
/// succeed is in the trail. If the trail cannot be written, the caller
/// gets an error instead (the change itself has been made).
pub(super) async fn record(state: &AppState, entry: AuditEntry) -> Result<(), Response> {
    let audit = state.audit.clone();
    let written = tokio::task::spawn_blocking(move || audit.append(entry)).await;
    match written {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the audit trail could not be written");
            Err(
                ApiError::internal("The audit trail could not be written; see the server log")
                    .into_response(),
            )
        }
        Err(e) => Err(ApiError::internal(e.to_string()).into_response()),
    }
}

/// Request parameters for the audit trail: the query and the JSON body,
/// without code (`ZipFile`: large, and kept sealed elsewhere) and without
/// secrets (environment variable values).
fn audit_params(query: Option<&str>, body: &[u8]) -> serde_json::Value {
    use serde_json::{Map, Value};
    let mut out = Map::new();
    if let Some(q) = query {
        let pairs: Map<String, Value> = form_urlencoded::parse(q.as_bytes())
            .filter(|(k, _)| !k.starts_with("X-Amz-"))
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        if !pairs.is_empty() {
            out.insert("query".to_owned(), Value::Object(pairs));
        }
    }
    if let Ok(mut body) = serde_json::from_slice::<Value>(body) {
        redact(&mut body);
        out.insert("body".to_owned(), body);
    } else if !body.is_empty() {
        out.insert("bodyBytes".to_owned(), Value::from(body.len()));
    }
    Value::Object(out)
}

fn redact(v: &mut serde_json::Value) {
    use serde_json::Value;
    if let Value::Object(map) = v {
        for (k, child) in map.iter_mut() {
            match k.as_str() {
                "ZipFile" => {
                    let len = child.as_str().map_or(0, str::len);
                    *child = Value::String(format!("<{len} base64 characters>"));
                }
                "Variables" => {
                    if let Value::Object(vars) = child {
                        for value in vars.values_mut() {
                            *value = Value::String("<redacted>".to_owned());
                        }
                    }
                }
                _ => redact(child),
            }
        }
    }
}

/// The condition keys of a request: the caller's (see
/// [`RequestConditions::base`]) and the operation's: `aws:RequestTag/*` and
/// `aws:TagKeys` from the tags it sets or removes, `aws:ResourceTag/*` from
/// the function it names, `lambda:FunctionArn`, `lambda:Principal`
/// (AddPermission) and `lambda:Layer` (the layers it attaches).
fn condition_keys(
    state: &AppState,
    caller: &crate::auth::Authenticated,
    parts: &axum::http::request::Parts,
    op: &Operation,
    body: &[u8],
    now: time::OffsetDateTime,
) -> RequestConditions {
    let source = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let account = &state.control.arn().account_id;
    let mut c = RequestConditions::base(&caller.identity, account, source, now);
    if let Some(function) = &op.function {
        c.add(
            "lambda:FunctionArn",
            state.control.arn().function_arn(function),
        );
        for (k, v) in state.data.function_tags(function) {
            c.add(format!("aws:ResourceTag/{k}"), v);
        }
    }
    let fields = matches!(
        op.name,
        "CreateFunction" | "UpdateFunctionConfiguration" | "TagResource" | "AddPermission"
    )
    .then(|| serde_json::from_slice::<serde_json::Value>(body).ok())
    .flatten();
    if let Some(fields) = fields {
        if let Some(tags) = fields.get("Tags").and_then(|t| t.as_object()) {
            for (k, v) in tags {
                c.add(
                    format!("aws:RequestTag/{k}"),
                    v.as_str().unwrap_or_default(),
                );
                c.add("aws:TagKeys", k.clone());
            }
        }
        if let Some(layers) = fields.get("Layers").and_then(|l| l.as_array()) {
            for layer in layers.iter().filter_map(|l| l.as_str()) {
                c.add("lambda:Layer", layer);
            }
        }
        if let Some(principal) = fields.get("Principal").and_then(|p| p.as_str()) {
            c.add("lambda:Principal", principal);
        }
    }
    if op.name == "UntagResource"
        && let Some(q) = parts.uri.query()
    {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            if k == "tagKeys" {
                c.add("aws:TagKeys", v.into_owned());
            }
        }
    }
    c
}

async fn authorize(
    state: &AppState,
    identity: &Identity,
    op: &Operation,
    conditions: &RequestConditions,
) -> Result<(), AuthError> {
    if identity.caller == crate::auth::keys::Caller::Root {
        return Ok(());
    }
    let policy =
        match &op.function {
            Some(name) => {
                let r = FunctionRef {
                    name: name.clone(),
                    qualifier: op.qualifier.clone(),
                };
                state.control.get_policy(&r).await.ok().map(
                    |p| serde_json::json!({ "Version": "2012-10-17", "Statement": p.statements }),
                )
            }
            None => None,
        };
    state
        .auth
        .authorize(identity, op, policy.as_ref(), conditions)
}

/// Lambda's answer to a refused request: 403 with the failure's type.
pub(super) fn refusal(e: AuthError) -> ApiError {
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
