//! kiln's own endpoints for the built-in destination queue (`kiln dlq`):
//! records of finished asynchronous invocations, per function.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState, Paging, blocking, json_body, listing};
use crate::store::queue::QueueError;

#[derive(Debug, Deserialize)]
pub(super) struct RecordsQuery {
    #[serde(flatten)]
    paging: Paging,
    #[serde(rename = "Condition")]
    condition: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RedriveRequest {
    ids: Option<Vec<i64>>,
}

fn queue_error(e: QueueError) -> ApiError {
    match e {
        QueueError::NoRecord(id) => ApiError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!("No record {id} in the built-in queue of this function"),
        ),
        other => ApiError::internal(other.to_string()),
    }
}

pub(super) async fn list(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<RecordsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let limit = match q.paging.max_items()? {
        None => 100,
        Some(n) if (1..=1000).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid_parameter(format!(
                "MaxItems must be between 1 and 1000, not {n}"
            )));
        }
    };
    let after: i64 = match &q.paging.marker {
        None => 0,
        Some(m) => m.parse().map_err(|_| {
            ApiError::invalid_parameter("Marker is not valid: pass a previous NextMarker")
        })?,
    };
    let queue = s.data.queue().clone();
    let function = r.name.clone();
    let condition = q.condition.clone();
    // Read one more than asked to know whether another page follows.
    let (records, next) = blocking(queue_error, move || {
        let mut out = Vec::new();
        let mut cursor = after;
        loop {
            let batch = queue.records(&function, cursor, 1000)?;
            let done = batch.len() < 1000;
            for rec in batch {
                cursor = rec.id;
                if condition.as_ref().is_none_or(|c| *c == rec.condition) {
                    out.push(rec);
                    if out.len() > limit {
                        let next = out[limit - 1].id;
                        out.truncate(limit);
                        return Ok((out, Some(next.to_string())));
                    }
                }
            }
            if done {
                return Ok((out, None));
            }
        }
    })
    .await?;
    Ok(listing("Records", records, next))
}

pub(super) async fn show(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, i64)>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let queue = s.data.queue().clone();
    let record = blocking(queue_error, move || queue.record(&r.name, id)).await?;
    Ok(Json(record))
}

pub(super) async fn redrive(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let req: RedriveRequest = json_body(body, "Redrive").await?;
    let n = s
        .data
        .queue()
        .redrive(&r.name, req.ids)
        .await
        .map_err(queue_error)?;
    Ok(Json(json!({ "Redriven": n })))
}
