//! `Invoke`: `POST /2015-03-31/functions/{name}/invocations`.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;

use super::functions::QualifierQuery;
use super::{ApiError, AppState, read_body};
use crate::invoke::{InvokeInput, MAX_ASYNC_PAYLOAD, MAX_SYNC_PAYLOAD};

pub(super) async fn invoke(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    let header_str = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let invocation_type = header_str("x-amz-invocation-type").unwrap_or("RequestResponse");
    let log_tail = match header_str("x-amz-log-type") {
        None | Some("None") => false,
        Some("Tail") => true,
        Some(other) => {
            return Err(ApiError::invalid_parameter(format!(
                "LogType must be None or Tail, not {other:?}"
            )));
        }
    };
    let limit = match invocation_type {
        "RequestResponse" => MAX_SYNC_PAYLOAD,
        "Event" => MAX_ASYNC_PAYLOAD,
        "DryRun" => {
            s.data.exists(&r.name, r.qualifier.as_deref())?;
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        other => {
            return Err(ApiError::invalid_parameter(format!(
                "InvocationType must be RequestResponse, Event or DryRun, not {other:?}"
            )));
        }
    };
    let payload = read_body(body, limit, || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            format!("Request must be smaller than {limit} bytes for the InvokeFunction operation"),
        )
    })
    .await?;
    // Lambda hands an empty payload to the function as an empty object.
    let payload = if payload.is_empty() {
        axum::body::Bytes::from_static(b"{}")
    } else {
        payload
    };
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&payload) {
        return Err(ApiError::invalid_content(format!(
            "Could not parse request body into json: Could not parse payload into json: {e}"
        )));
    }
    // Lambda hands the client context to synchronous invocations only.
    let client_context = match header_str("x-amz-client-context") {
        Some(encoded) if invocation_type == "RequestResponse" => Some(client_context(encoded)?),
        _ => None,
    };
    let input = InvokeInput {
        name: r.name,
        qualifier: r.qualifier,
        payload,
        log_tail,
        trace_id: header_str("x-amzn-trace-id").map(str::to_owned),
        request_id: None,
        client_context,
    };
    if invocation_type == "Event" {
        // 202 only once the event is on disk.
        let request_id = s.data.enqueue(input).await?;
        let mut response = StatusCode::ACCEPTED.into_response();
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert("x-amzn-requestid", v);
        }
        return Ok(response);
    }
    let output = s.data.invoke(input).await?;

    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        output.payload,
    )
        .into_response();
    let h = response.headers_mut();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    set("x-amzn-requestid", &output.request_id);
    set("x-amz-executed-version", &output.executed_version);
    if let Some(e) = output.function_error {
        set("x-amz-function-error", e);
    }
    if let Some(tail) = &output.log_result {
        set("x-amz-log-result", tail);
    }
    Ok(response)
}

/// Lambda's limit on `ClientContext`, as the base64 text the caller sends.
const MAX_CLIENT_CONTEXT: usize = 3583;

/// `X-Amz-Client-Context`: base64 of a JSON object, as the AWS SDKs send
/// it; the function receives the JSON text.
fn client_context(encoded: &str) -> Result<String, ApiError> {
    use base64::Engine as _;
    let invalid = || {
        ApiError::invalid_content(format!(
            "Client context must be a valid Base64-encoded JSON object of at most \
             {MAX_CLIENT_CONTEXT} characters"
        ))
    };
    if encoded.len() > MAX_CLIENT_CONTEXT {
        return Err(invalid());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(_)) => Ok(text),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_context_is_base64_json_within_lambdas_limit() {
        let ok = "eyJjdXN0b20iOnsiYSI6MX19"; // {"custom":{"a":1}}
        assert_eq!(client_context(ok).unwrap(), r#"{"custom":{"a":1}}"#);
        for bad in [
            "not base64!",
            "WzFd",         /* [1] */
            "bm90IGpzb24=", /* not json */
        ] {
            assert_eq!(client_context(bad).unwrap_err().status, 400, "{bad}");
        }
        assert!(client_context(&"A".repeat(MAX_CLIENT_CONTEXT + 1)).is_err());
    }
}
