//! Layer operations.

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, Paging, host, json_body, listing};
use crate::auth::Authenticated;
use crate::control::model::LayerVersionRecord;
use crate::control::requests::{AddLayerVersionPermissionRequest, PublishLayerVersionRequest};

#[derive(Debug, Deserialize)]
pub(super) struct LayersQuery {
    #[serde(rename = "CompatibleRuntime")]
    runtime: Option<String>,
    #[serde(rename = "CompatibleArchitecture")]
    architecture: Option<String>,
    #[serde(flatten)]
    paging: Paging,
    /// `find=LayerVersion` with `Arn=` is GetLayerVersionByArn.
    find: Option<String>,
    #[serde(rename = "Arn")]
    arn: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RevisionQuery {
    #[serde(rename = "RevisionId")]
    revision_id: Option<String>,
}

/// `LayerVersionsListItem`.
fn item(s: &AppState, l: &LayerVersionRecord) -> Value {
    let mut v = json!({
        "LayerVersionArn": s.control.arn().layer_version_arn(&l.name, l.version),
        "Version": l.version,
        "Description": l.description,
        "CreatedDate": l.created_date,
        "CompatibleRuntimes": l.compatible_runtimes,
        "CompatibleArchitectures": l.compatible_architectures,
    });
    if let Some(license) = &l.license_info {
        v["LicenseInfo"] = license.clone().into();
    }
    v
}

/// `GetLayerVersionResponse` / `PublishLayerVersionResponse`.
fn full(
    s: &AppState,
    caller: &Authenticated,
    headers: &HeaderMap,
    l: &LayerVersionRecord,
) -> Value {
    let mut v = item(s, l);
    let path = format!("/kiln/layers/{}/{}/content.zip", l.name, l.version);
    v["LayerArn"] = s.control.arn().layer_arn(&l.name).into();
    v["Content"] = json!({
        "Location": s.auth.presigned_url(caller, &host(headers), &path, &[]),
        "CodeSha256": l.sha256_base64,
        "CodeSize": l.code_size,
    });
    v
}

fn version_number(v: &str) -> Result<u64, ApiError> {
    v.parse().map_err(|_| {
        ApiError::invalid_parameter(format!("VersionNumber must be a number, not {v:?}"))
    })
}

pub(super) async fn publish(
    State(s): State<AppState>,
    Path(layer): Path<String>,
    Extension(caller): Extension<Authenticated>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let req: PublishLayerVersionRequest = json_body(body, "PublishLayerVersion").await?;
    let l = s.control.publish_layer_version(&layer, req).await?;
    Ok((StatusCode::CREATED, Json(full(&s, &caller, &headers, &l))))
}

pub(super) async fn get_version(
    State(s): State<AppState>,
    Path((layer, version)): Path<(String, String)>,
    Extension(caller): Extension<Authenticated>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let l = s
        .control
        .get_layer_version(&layer, version_number(&version)?)
        .await?;
    Ok(Json(full(&s, &caller, &headers, &l)))
}

pub(super) async fn delete_version(
    State(s): State<AppState>,
    Path((layer, version)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    s.control
        .delete_layer_version(&layer, version_number(&version)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn list_versions(
    State(s): State<AppState>,
    Path(layer): Path<String>,
    Query(q): Query<LayersQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let (versions, next) = s
        .control
        .list_layer_versions(
            &layer,
            q.runtime,
            q.architecture,
            q.paging.marker.clone(),
            q.paging.max_items()?,
        )
        .await?;
    let items: Vec<Value> = versions.iter().map(|l| item(&s, l)).collect();
    Ok(listing("LayerVersions", items, next))
}

/// `GET /2018-10-31/layers`: ListLayers, or GetLayerVersionByArn with
/// `find=LayerVersion`.
pub(super) async fn list_or_find(
    State(s): State<AppState>,
    Query(q): Query<LayersQuery>,
    Extension(caller): Extension<Authenticated>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    if q.find.as_deref() == Some("LayerVersion") {
        let arn = q
            .arn
            .ok_or_else(|| ApiError::invalid_parameter("Arn is required with find=LayerVersion"))?;
        let l = s.control.get_layer_version_by_arn(&arn).await?;
        return Ok(Json(full(&s, &caller, &headers, &l)).into_response());
    }
    let (layers, next) = s
        .control
        .list_layers(
            q.runtime,
            q.architecture,
            q.paging.marker.clone(),
            q.paging.max_items()?,
        )
        .await?;
    let items: Vec<Value> = layers
        .iter()
        .map(|l| {
            json!({
                "LayerName": l.name,
                "LayerArn": s.control.arn().layer_arn(&l.name),
                "LatestMatchingVersion": item(&s, l),
            })
        })
        .collect();
    Ok(listing("Layers", items, next).into_response())
}

pub(super) async fn add_permission(
    State(s): State<AppState>,
    Path((layer, version)): Path<(String, String)>,
    Query(q): Query<RevisionQuery>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let req: AddLayerVersionPermissionRequest =
        json_body(body, "AddLayerVersionPermission").await?;
    let (statement, revision) = s
        .control
        .add_layer_version_permission(&layer, version_number(&version)?, q.revision_id, req)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "Statement": statement.to_string(), "RevisionId": revision })),
    ))
}

pub(super) async fn get_policy(
    State(s): State<AppState>,
    Path((layer, version)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let p = s
        .control
        .get_layer_version_policy(&layer, version_number(&version)?)
        .await?;
    Ok(Json(
        json!({ "Policy": p.document(), "RevisionId": p.revision_id }),
    ))
}

pub(super) async fn remove_permission(
    State(s): State<AppState>,
    Path((layer, version, sid)): Path<(String, String, String)>,
    Query(q): Query<RevisionQuery>,
) -> Result<impl IntoResponse, ApiError> {
    s.control
        .remove_layer_version_permission(&layer, version_number(&version)?, &sid, q.revision_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn download(
    State(s): State<AppState>,
    Path((layer, version)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let zip = s
        .control
        .layer_archive(&layer, version_number(&version)?)
        .await?;
    Ok(([(header::CONTENT_TYPE, "application/zip")], zip).into_response())
}
