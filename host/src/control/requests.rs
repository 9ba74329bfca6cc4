//! Request bodies of the function operations, as botocore sends them.
//! Unknown members are ignored, as Lambda ignores them.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `FunctionCode`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CodeInput {
    /// Base64 of the zip.
    pub zip_file: Option<String>,
    #[serde(rename = "S3Bucket")]
    pub s3_bucket: Option<String>,
    #[serde(rename = "S3Key")]
    pub s3_key: Option<String>,
    #[serde(rename = "S3ObjectVersion")]
    pub s3_object_version: Option<String>,
    pub image_uri: Option<String>,
}

/// `Environment` in a request.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EnvironmentInput {
    pub variables: Option<BTreeMap<String, String>>,
}

/// `EphemeralStorage` in a request (the size may be out of range).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EphemeralStorageInput {
    pub size: i64,
}

/// `CreateFunctionRequest`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateFunctionRequest {
    pub function_name: String,
    pub runtime: Option<String>,
    pub role: String,
    pub handler: Option<String>,
    pub code: CodeInput,
    pub description: Option<String>,
    pub timeout: Option<i64>,
    pub memory_size: Option<i64>,
    pub publish: Option<bool>,
    pub package_type: Option<String>,
    pub environment: Option<EnvironmentInput>,
    pub tags: Option<BTreeMap<String, String>>,
    pub layers: Option<Vec<String>>,
    pub architectures: Option<Vec<String>>,
    pub ephemeral_storage: Option<EphemeralStorageInput>,
}

/// `UpdateFunctionCodeRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateFunctionCodeRequest {
    /// The code members, as in `FunctionCode`.
    #[serde(flatten)]
    pub code: CodeInput,
    pub publish: Option<bool>,
    pub dry_run: Option<bool>,
    pub revision_id: Option<String>,
    pub architectures: Option<Vec<String>>,
}

/// `UpdateFunctionConfigurationRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateFunctionConfigurationRequest {
    pub role: Option<String>,
    pub handler: Option<String>,
    pub description: Option<String>,
    pub timeout: Option<i64>,
    pub memory_size: Option<i64>,
    pub environment: Option<EnvironmentInput>,
    pub runtime: Option<String>,
    pub revision_id: Option<String>,
    pub layers: Option<Vec<String>>,
    pub ephemeral_storage: Option<EphemeralStorageInput>,
}
