//! Per-function settings: resource policies, concurrency (reserved and
//! provisioned), asynchronous invocation, tags; and the account's settings.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::functions::QualifierQuery;
use super::{ApiError, AppState, Paging, json_body, listing};
use crate::control::requests::{
    AddPermissionRequest, EventInvokeConfigRequest, PutFunctionConcurrencyRequest,
    PutProvisionedConcurrencyRequest, TagResourceRequest,
};

#[derive(Debug, Deserialize)]
pub(super) struct RemovePermissionQuery {
    #[serde(rename = "Qualifier")]
    qualifier: Option<String>,
    #[serde(rename = "RevisionId")]
    revision_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ProvisionedQuery {
    #[serde(rename = "Qualifier")]
    qualifier: Option<String>,
    #[serde(rename = "List")]
    list: Option<String>,
    #[serde(flatten)]
    paging: Paging,
}

pub(super) async fn add_permission(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    let req: AddPermissionRequest = json_body(body, "AddPermission").await?;
    let statement = s.control.add_permission(&r, req).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "Statement": statement.to_string() })),
    ))
}

pub(super) async fn get_policy(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    let policy = s.control.get_policy(&r).await?;
    Ok(Json(json!({
        "Policy": policy.document(),
        "RevisionId": policy.revision_id,
    })))
}

pub(super) async fn remove_permission(
    State(s): State<AppState>,
    Path((name, sid)): Path<(String, String)>,
    Query(q): Query<RemovePermissionQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    s.control.remove_permission(&r, &sid, q.revision_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn put_concurrency(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let req: PutFunctionConcurrencyRequest = json_body(body, "PutFunctionConcurrency").await?;
    let n = s
        .control
        .put_function_concurrency(&r, req.reserved_concurrent_executions)
        .await?;
    Ok(Json(json!({ "ReservedConcurrentExecutions": n })))
}

pub(super) async fn get_concurrency(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    Ok(Json(match s.control.get_function_concurrency(&r).await? {
        Some(n) => json!({ "ReservedConcurrentExecutions": n }),
        None => json!({}),
    }))
}

pub(super) async fn delete_concurrency(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    s.control.delete_function_concurrency(&r).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn provisioned_json(view: &crate::control::ProvisionedView, arn: Option<String>) -> Value {
    let mut v = json!({
        "RequestedProvisionedConcurrentExecutions": view.status.requested,
        "AvailableProvisionedConcurrentExecutions": view.status.available,
        "AllocatedProvisionedConcurrentExecutions": view.status.allocated,
        "Status": view.status.status,
        "LastModified": view.record.last_modified,
    });
    if let Some(reason) = &view.status.reason {
        v["StatusReason"] = reason.clone().into();
    }
    if let Some(arn) = arn {
        v["FunctionArn"] = arn.into();
    }
    v
}

pub(super) async fn put_provisioned(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ProvisionedQuery>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    let req: PutProvisionedConcurrencyRequest =
        json_body(body, "PutProvisionedConcurrencyConfig").await?;
    let view = s
        .control
        .put_provisioned(&r, req.provisioned_concurrent_executions)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(provisioned_json(&view, None))))
}

pub(super) async fn get_provisioned(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ProvisionedQuery>,
) -> Result<impl IntoResponse, ApiError> {
    if q.list.as_deref() == Some("ALL") {
        let r = s.control.function_ref(&name, None)?;
        let (views, next) = s
            .control
            .list_provisioned(&r, q.paging.marker.clone(), q.paging.max_items()?)
            .await?;
        let arn = s.control.arn().clone();
        let items: Vec<Value> = views
            .iter()
            .map(|v| provisioned_json(v, Some(arn.qualified_arn(&r.name, &v.record.qualifier))))
            .collect();
        return Ok(listing("ProvisionedConcurrencyConfigs", items, next).into_response());
    }
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    let view = s.control.get_provisioned(&r).await?;
    Ok(Json(provisioned_json(&view, None)).into_response())
}

pub(super) async fn delete_provisioned(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ProvisionedQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    s.control.delete_provisioned(&r).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn account_settings(
    State(s): State<AppState>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.control.account_settings().await?))
}

fn event_invoke_json(s: &AppState, v: &crate::control::EventInvokeView) -> Value {
    let dest = |d: &Option<String>| match d {
        Some(d) => json!({ "Destination": d }),
        None => json!({}),
    };
    let mut out = json!({
        "LastModified": v.record.last_modified,
        "FunctionArn": s.control.arn().qualified_arn(&v.function, &v.record.qualifier),
        "DestinationConfig": {
            "OnSuccess": dest(&v.record.on_success),
            "OnFailure": dest(&v.record.on_failure),
        },
    });
    if let Some(n) = v.record.maximum_retry_attempts {
        out["MaximumRetryAttempts"] = n.into();
    }
    if let Some(n) = v.record.maximum_event_age_in_seconds {
        out["MaximumEventAgeInSeconds"] = n.into();
    }
    out
}

async fn write_event_invoke(
    s: AppState,
    name: String,
    q: QualifierQuery,
    body: Body,
    replace: bool,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    let operation = if replace {
        "PutFunctionEventInvokeConfig"
    } else {
        "UpdateFunctionEventInvokeConfig"
    };
    let req: EventInvokeConfigRequest = json_body(body, operation).await?;
    let view = s.control.put_event_invoke_config(&r, req, replace).await?;
    Ok(Json(event_invoke_json(&s, &view)))
}

pub(super) async fn put_event_invoke(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    write_event_invoke(s, name, q, body, true).await
}

pub(super) async fn update_event_invoke(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    write_event_invoke(s, name, q, body, false).await
}

pub(super) async fn get_event_invoke(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    let view = s.control.get_event_invoke_config(&r).await?;
    Ok(Json(event_invoke_json(&s, &view)))
}

pub(super) async fn delete_event_invoke(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    s.control.delete_event_invoke_config(&r).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn list_event_invoke(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<Paging>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let (views, next) = s
        .control
        .list_event_invoke_configs(&r, p.marker.clone(), p.max_items()?)
        .await?;
    let items: Vec<Value> = views.iter().map(|v| event_invoke_json(&s, v)).collect();
    Ok(listing("FunctionEventInvokeConfigs", items, next))
}

pub(super) async fn tag_resource(
    State(s): State<AppState>,
    Path(arn): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let req: TagResourceRequest = json_body(body, "TagResource").await?;
    s.control.tag_resource(&arn, req.tags).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn untag_resource(
    State(s): State<AppState>,
    Path(arn): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let keys: Vec<String> = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(k, _)| k == "tagKeys")
        .map(|(_, v)| v.into_owned())
        .collect();
    if keys.is_empty() {
        return Err(ApiError::invalid_parameter(
            "TagKeys is required: name at least one tag key to remove",
        ));
    }
    s.control.untag_resource(&arn, keys).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn list_tags(
    State(s): State<AppState>,
    Path(arn): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(json!({ "Tags": s.control.list_tags(&arn).await? })))
}
