//! Function operations: Create, Get, GetConfiguration, List, UpdateCode,
//! UpdateConfiguration, Delete; versions and aliases.

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState, Paging, blocking, host, json_body, listing};
use crate::auth::{Authenticated, RequestConditions};
use crate::control::requests::{
    CreateAliasRequest, CreateFunctionRequest, PublishVersionRequest, UpdateAliasRequest,
    UpdateFunctionCodeRequest, UpdateFunctionConfigurationRequest,
};

#[derive(Debug, Deserialize)]
pub(super) struct QualifierQuery {
    #[serde(rename = "Qualifier")]
    pub(super) qualifier: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ListFunctionsQuery {
    #[serde(flatten)]
    paging: Paging,
    #[serde(rename = "FunctionVersion")]
    function_version: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ListAliasesQuery {
    #[serde(flatten)]
    paging: Paging,
    #[serde(rename = "FunctionVersion")]
    function_version: Option<String>,
}

/// What IAM and Lambda ask of an execution role before a function may use
/// it: the caller may pass it (`iam:PassRole` on its ARN), it is this
/// account's, and it exists. Without the first, anyone who can create a
/// function could take any role's credentials from inside it.
async fn check_role(
    s: &AppState,
    caller: &Authenticated,
    conditions: &RequestConditions,
    role: &str,
) -> Result<(), ApiError> {
    crate::control::validate::role(role)?;
    let account = &s.control.arn().account_id;
    let role_account = role.split(':').nth(4).unwrap_or_default();
    if role_account != account {
        return Err(ApiError::invalid_parameter(format!(
            "The role defined for the function cannot be assumed by Lambda: {role} belongs to \
             account {role_account}, and this kiln's account is {account}; use one of its roles \
             (`kiln roles list`)"
        )));
    }
    let mut conditions = conditions.clone();
    conditions.add("iam:PassedToService", "lambda.amazonaws.com");
    s.auth
        .authorize_action(&caller.identity, "iam:PassRole", role, None, &conditions)
        .map_err(super::guard::refusal)?;
    let credentials = s.auth.credentials().clone();
    let name = role.to_owned();
    let found = blocking(super::keys::key_error, move || credentials.role(&name)).await?;
    if found.is_none() {
        return Err(ApiError::invalid_parameter(format!(
            "The role defined for the function cannot be assumed by Lambda: kiln has no role \
             {role}. Create it with `kiln roles create NAME --policy FILE`, or use \
             arn:aws:iam::{account}:role/{}, the default role, which is allowed nothing",
            crate::auth::keys::DEFAULT_ROLE
        )));
    }
    Ok(())
}

/// A MemorySize this host can never give one environment is refused when
/// it is set, not at every invocation.
fn check_memory(s: &AppState, memory_size: Option<i64>) -> Result<(), ApiError> {
    let (budget, _) = s.data.memory_budget();
    match memory_size {
        Some(m) if m > 0 && m as u64 > budget => Err(ApiError::invalid_parameter(format!(
            "MemorySize {m} MB is more than this host's memory budget for all execution \
             environments ({budget} MiB, `kiln serve --memory-budget`)"
        ))),
        _ => Ok(()),
    }
}

pub(super) async fn create(
    State(s): State<AppState>,
    Extension(caller): Extension<Authenticated>,
    Extension(conditions): Extension<RequestConditions>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let req: CreateFunctionRequest = json_body(body, "CreateFunction").await?;
    check_memory(&s, req.memory_size)?;
    check_role(&s, &caller, &conditions, &req.role).await?;
    let config = s.control.create_function(req).await?;
    Ok((StatusCode::CREATED, Json(config)))
}

pub(super) async fn list(
    State(s): State<AppState>,
    Query(q): Query<ListFunctionsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let all = match q.function_version.as_deref() {
        None => false,
        Some("ALL") => true,
        Some(other) => {
            return Err(super::ApiError::invalid_parameter(format!(
                "FunctionVersion must be ALL, not {other:?}"
            )));
        }
    };
    let (functions, next) = s
        .control
        .list_functions(q.paging.marker.clone(), q.paging.max_items()?, all)
        .await?;
    Ok(listing("Functions", functions, next))
}

pub(super) async fn get(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    Extension(caller): Extension<Authenticated>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    let resolved = s.control.get_function(&r).await?;
    let unqualified = crate::control::names::FunctionRef {
        name: r.name.clone(),
        qualifier: None,
    };
    let latest = s.control.get_function(&unqualified).await?;
    let path = format!("/kiln/functions/{}/code.zip", resolved.record.name);
    let query: Vec<(&str, &str)> = r
        .qualifier
        .as_deref()
        .map(|q| ("Qualifier", q))
        .into_iter()
        .collect();
    let location = s
        .auth
        .presigned_url(&caller, &host(&headers), &path, &query);
    let mut body = json!({
        "Configuration": s.control.configuration(&resolved),
        "Code": { "RepositoryType": "S3", "Location": location },
        "Tags": latest.record.tags,
    });
    if let Some(n) = latest.record.reserved_concurrency {
        body["Concurrency"] = json!({ "ReservedConcurrentExecutions": n });
    }
    Ok(Json(body))
}

pub(super) async fn get_configuration(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    let resolved = s.control.get_function(&r).await?;
    Ok(Json(s.control.configuration(&resolved)))
}

pub(super) async fn update_code(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let req: UpdateFunctionCodeRequest = json_body(body, "UpdateFunctionCode").await?;
    Ok(Json(s.control.update_function_code(&r, req).await?))
}

pub(super) async fn update_configuration(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Extension(caller): Extension<Authenticated>,
    Extension(conditions): Extension<RequestConditions>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let req: UpdateFunctionConfigurationRequest =
        json_body(body, "UpdateFunctionConfiguration").await?;
    check_memory(&s, req.memory_size)?;
    if let Some(role) = &req.role {
        check_role(&s, &caller, &conditions, role).await?;
    }
    Ok(Json(
        s.control.update_function_configuration(&r, req).await?,
    ))
}

pub(super) async fn delete(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    s.control.delete_function(&r).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn download_code(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
    let zip = s.control.code_archive(&r).await?;
    Ok(([(header::CONTENT_TYPE, "application/zip")], zip).into_response())
}

pub(super) async fn publish_version(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let req: PublishVersionRequest = json_body(body, "PublishVersion").await?;
    let config = s.control.publish_version(&r, req).await?;
    Ok((StatusCode::CREATED, Json(config)))
}

pub(super) async fn list_versions(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<Paging>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let (versions, next) = s
        .control
        .list_versions(&r, p.marker.clone(), p.max_items()?)
        .await?;
    Ok(listing("Versions", versions, next))
}

pub(super) async fn create_alias(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let req: CreateAliasRequest = json_body(body, "CreateAlias").await?;
    Ok((
        StatusCode::CREATED,
        Json(s.control.create_alias(&r, req).await?),
    ))
}

pub(super) async fn list_aliases(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ListAliasesQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let (aliases, next) = s
        .control
        .list_aliases(
            &r,
            q.function_version,
            q.paging.marker.clone(),
            q.paging.max_items()?,
        )
        .await?;
    Ok(listing("Aliases", aliases, next))
}

pub(super) async fn get_alias(
    State(s): State<AppState>,
    Path((name, alias)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    Ok(Json(s.control.get_alias(&r, &alias).await?))
}

pub(super) async fn update_alias(
    State(s): State<AppState>,
    Path((name, alias)): Path<(String, String)>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let req: UpdateAliasRequest = json_body(body, "UpdateAlias").await?;
    Ok(Json(s.control.update_alias(&r, &alias, req).await?))
}

pub(super) async fn delete_alias(
    State(s): State<AppState>,
    Path((name, alias)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    s.control.delete_alias(&r, &alias).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /kiln/functions/{name}/logs?since=MS&filter=TEXT&limit=N&requestId=ID&stream=S`:
/// the function's log events, oldest first (the latest `limit`, 1,000
/// unless asked), or one invocation's; of one stream when `stream` is set.
pub(super) async fn function_logs(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<std::collections::HashMap<String, String>>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let since_ms = match params.get("since") {
        Some(v) => Some(v.parse::<i64>().map_err(|_| {
            ApiError::invalid_parameter(format!(
                "since must be milliseconds since the Unix epoch, not {v:?}"
            ))
        })?),
        None => None,
    };
    let limit = match params.get("limit") {
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_parameter(format!("limit must be 1 to 10000, not {v:?}"))
            })?,
        None => 1000,
    };
    let request_id = params.get("requestId").filter(|r| !r.is_empty()).cloned();
    if let Some(id) = &request_id
        && (id.len() > 128 || id.contains(['"', '\\', '\n']))
    {
        return Err(ApiError::invalid_parameter(
            "requestId must be a request id as an invocation returned it",
        ));
    }
    let query = crate::invoke::logstore::LogQuery {
        since_ms,
        filter: params.get("filter").filter(|f| !f.is_empty()).cloned(),
        limit,
        request_id,
        stream: params.get("stream").filter(|s| !s.is_empty()).cloned(),
    };
    let Some(store) = s.data.logs().cloned() else {
        return Err(ApiError::internal(
            "function logs are not kept by this server",
        ));
    };
    let events = store
        .read(&r.name, query)
        .await
        .map_err(|e| ApiError::internal(format!("reading logs: {e}")))?;
    // A deleted function's logs stay readable; a name never seen is an error.
    if events.is_empty() {
        s.control.get_function(&r).await?;
    }
    Ok(Json(json!({ "FunctionName": r.name, "Events": events })))
}

/// `GET /kiln/functions/{name}/activity`: the console's charts and recent
/// invocations of the function, and its events waiting in the queue.
pub(super) async fn function_activity(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    s.control.get_function(&r).await?;
    let report = s.data.activity().report(&r.name);
    let queue = s.data.queue().clone();
    let function = r.name.clone();
    let pending = blocking(
        |e: crate::store::queue::QueueError| ApiError::internal(e.to_string()),
        move || queue.depth_of(&function),
    )
    .await?;
    Ok(Json(json!({
        "FunctionName": r.name,
        "PeriodSeconds": report.period_seconds,
        "Buckets": report.buckets,
        "Recent": report.recent,
        "Queue": { "Pending": pending },
    })))
}

/// `GET /kiln/functions/{name}/config-history`: every configuration state
/// of the function and its versions, oldest first.
pub(super) async fn config_history(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let r = s.control.function_ref(&name, None)?;
    let changes = s.control.history(&r.name).await?;
    if changes.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!("No configuration history for function {}", r.name),
        ));
    }
    Ok(Json(json!({ "FunctionName": r.name, "Changes": changes })))
}
