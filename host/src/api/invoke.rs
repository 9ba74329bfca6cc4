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
    let input = InvokeInput {
        name: r.name,
        qualifier: r.qualifier,
        payload,
        log_tail,
        trace_id: header_str("x-amzn-trace-id").map(str::to_owned),
        request_id: None,
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
