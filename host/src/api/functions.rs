//! Function operations: Create, Get, GetConfiguration, List, UpdateCode,
//! UpdateConfiguration, Delete.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState, json_body, respond};
use crate::control::requests::{
    CreateFunctionRequest, UpdateFunctionCodeRequest, UpdateFunctionConfigurationRequest,
};

#[derive(Debug, Deserialize)]
pub(super) struct QualifierQuery {
    #[serde(rename = "Qualifier")]
    pub(super) qualifier: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    #[serde(rename = "Marker")]
    marker: Option<String>,
    #[serde(rename = "MaxItems")]
    max_items: Option<String>,
}

pub(super) async fn create(State(s): State<AppState>, body: Body) -> Response {
    respond(
        async {
            let req: CreateFunctionRequest = json_body(body, "CreateFunction").await?;
            let config = s.control.create_function(req).await?;
            Ok((StatusCode::CREATED, Json(config)))
        }
        .await,
    )
}

pub(super) async fn list(State(s): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    respond(
        async {
            let max_items = q
                .max_items
                .map(|m| {
                    m.parse::<i64>().map_err(|_| {
                        ApiError::invalid_parameter(format!("MaxItems must be a number, not {m:?}"))
                    })
                })
                .transpose()?;
            let (functions, next) = s.control.list_functions(q.marker, max_items).await?;
            let mut body = json!({ "Functions": functions });
            if let Some(next) = next {
                body["NextMarker"] = next.into();
            }
            Ok(Json(body))
        }
        .await,
    )
}

pub(super) async fn get(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    headers: HeaderMap,
) -> Response {
    respond(
        async {
            let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
            let record = s.control.get_function(&r).await?;
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1:9000");
            Ok(Json(json!({
                "Configuration": s.control.configuration(&record),
                "Code": {
                    "RepositoryType": "S3",
                    "Location": format!("http://{host}/kiln/functions/{}/code.zip", record.name),
                },
                "Tags": record.tags,
            })))
        }
        .await,
    )
}

pub(super) async fn get_configuration(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Response {
    respond(
        async {
            let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
            let record = s.control.get_function(&r).await?;
            Ok(Json(s.control.configuration(&record)))
        }
        .await,
    )
}

pub(super) async fn update_code(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Response {
    respond(
        async {
            let r = s.control.function_ref(&name, None)?;
            let req: UpdateFunctionCodeRequest = json_body(body, "UpdateFunctionCode").await?;
            Ok(Json(s.control.update_function_code(&r, req).await?))
        }
        .await,
    )
}

pub(super) async fn update_configuration(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Response {
    respond(
        async {
            let r = s.control.function_ref(&name, None)?;
            let req: UpdateFunctionConfigurationRequest =
                json_body(body, "UpdateFunctionConfiguration").await?;
            Ok(Json(
                s.control.update_function_configuration(&r, req).await?,
            ))
        }
        .await,
    )
}

pub(super) async fn delete(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Response {
    respond(
        async {
            let r = s.control.function_ref(&name, q.qualifier.as_deref())?;
            s.control.delete_function(&r).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        .await,
    )
}

pub(super) async fn download_code(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    respond(
        async {
            let r = s.control.function_ref(&name, None)?;
            let zip = s.control.code_archive(&r).await?;
            Ok(([(header::CONTENT_TYPE, "application/zip")], zip).into_response())
        }
        .await,
    )
}
