//! kiln's credential administration: access keys and execution roles
//! (`kiln keys ...`, `kiln roles ...`). Root, or a key whose policy allows
//! the `kiln:` action, may call these.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, blocking, json_body};
use crate::auth::keys::{Credentials, KeyError};
use crate::auth::policy::PolicyDocument;

/// Largest identity policy, as IAM's managed-policy limit.
const MAX_POLICY: usize = 6144;

#[derive(Debug, Deserialize)]
pub(super) struct CreateKey {
    #[serde(rename = "UserName")]
    user_name: String,
    #[serde(rename = "PolicyDocument")]
    policy_document: Value,
}

#[derive(Debug, Deserialize)]
pub(super) struct CreateRole {
    #[serde(rename = "RoleName")]
    role_name: String,
    #[serde(rename = "PolicyDocument")]
    policy_document: Value,
}

/// A policy given as a JSON string (as IAM takes it) or as an object,
/// validated as an identity policy.
fn identity_policy(doc: Value) -> Result<Value, ApiError> {
    let doc = match doc {
        Value::String(text) => serde_json::from_str(&text).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "MalformedPolicyDocumentException",
                format!("PolicyDocument is not JSON: {e}"),
            )
        })?,
        other => other,
    };
    let text = doc.to_string();
    if text.len() > MAX_POLICY {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "MalformedPolicyDocumentException",
            format!(
                "PolicyDocument is {} bytes; at most {MAX_POLICY} are allowed",
                text.len()
            ),
        ));
    }
    PolicyDocument::parse_identity(&text).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "MalformedPolicyDocumentException",
            e.to_string(),
        )
    })?;
    Ok(doc)
}

pub(super) fn key_error(e: KeyError) -> ApiError {
    match e {
        KeyError::Invalid(m) => ApiError::invalid_parameter(m),
        KeyError::NotFound(m) => {
            ApiError::new(StatusCode::NOT_FOUND, "ResourceNotFoundException", m)
        }
        other => {
            tracing::error!(error = %other, "credential store");
            ApiError::internal("The credential store failed; see the server log")
        }
    }
}

/// Runs `f` on the credential store off the async workers.
async fn with_credentials<T: Send + 'static>(
    s: &AppState,
    f: impl FnOnce(&Credentials) -> Result<T, KeyError> + Send + 'static,
) -> Result<T, ApiError> {
    let credentials = s.auth.credentials().clone();
    blocking(key_error, move || f(&credentials)).await
}

pub(super) async fn create_key(
    State(s): State<AppState>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let req: CreateKey = json_body(body, "CreateAccessKey").await?;
    let policy = identity_policy(req.policy_document)?;
    let key = with_credentials(&s, move |creds| creds.create_key(&req.user_name, policy)).await?;
    Ok((StatusCode::CREATED, Json(json!({ "AccessKey": key }))))
}

pub(super) async fn list_keys(State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let keys = with_credentials(&s, move |creds| creds.list_keys()).await?;
    Ok(Json(json!({ "AccessKeys": keys })))
}

pub(super) async fn delete_key(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    with_credentials(&s, move |creds| creds.delete_key(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn create_role(
    State(s): State<AppState>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let req: CreateRole = json_body(body, "CreateRole").await?;
    let policy = identity_policy(req.policy_document)?;
    let role = with_credentials(&s, move |creds| creds.create_role(&req.role_name, policy)).await?;
    Ok((StatusCode::CREATED, Json(json!({ "Role": role }))))
}

pub(super) async fn list_roles(State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let roles = with_credentials(&s, move |creds| creds.list_roles()).await?;
    Ok(Json(json!({ "Roles": roles })))
}

pub(super) async fn delete_role(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    with_credentials(&s, move |creds| creds.delete_role(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn revoke_sessions(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    with_credentials(&s, move |creds| creds.revoke_sessions(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `kiln keys rotate-master`: a new master key re-wraps every data key.
pub(super) async fn rotate_master(
    State(s): State<AppState>,
) -> Result<impl IntoResponse, ApiError> {
    let control = s.control.clone();
    let refused = |e| match e {
        crate::store::artifacts::ArtifactError::Sealed(
            crate::store::sealed::SealError::MasterKey(m),
        ) => ApiError::new(StatusCode::CONFLICT, "ResourceConflictException", m),
        other => {
            tracing::error!(error = %other, "master key rotation");
            ApiError::internal(format!("Rotating the master key failed: {other}"))
        }
    };
    let report = blocking(refused, move || control.artifacts().rotate_master()).await?;
    Ok(Json(json!({
        "BlobsRewrapped": report.blobs_rewrapped,
        "OldKeyId": report.old_key_id,
        "NewKeyId": report.new_key_id,
    })))
}
