//! The control plane: functions and their configuration.
//!
//! Every change goes the same way: validate the request against Lambda's
//! constraints, store the code (validated and unpacked), let the data plane
//! prepare it for its runtime (a component that does not compile is refused
//! here, not at the first invoke), commit the record to the metadata store,
//! and only then install it in the data plane. Changes are serialized; reads
//! are not.

pub mod model;
pub mod names;
pub mod requests;
pub mod validate;

use std::sync::Arc;

use base64::Engine as _;

use crate::invoke::DataPlane;
use crate::sandbox::{PreparedCode, SandboxError};
use crate::store::artifacts::{ArtifactError, ArtifactStore, StoredArchive};
use crate::store::meta::{MetaError, MetaStore};
use model::{ArnContext, FunctionConfiguration, FunctionRecord, LATEST, now_last_modified};
use names::FunctionRef;
use requests::{
    CodeInput, CreateFunctionRequest, UpdateFunctionCodeRequest, UpdateFunctionConfigurationRequest,
};

/// Control-plane failures, each one of Lambda's error types.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A field does not meet the model's constraints (`ValidationException`).
    #[error("{0}")]
    Validation(String),
    /// A value is not acceptable (`InvalidParameterValueException`).
    #[error("{0}")]
    InvalidParameter(String),
    /// No such resource (`ResourceNotFoundException`).
    #[error("{0}")]
    NotFound(String),
    /// The resource exists or is in the way (`ResourceConflictException`).
    #[error("{0}")]
    Conflict(String),
    /// A stale `RevisionId` (`PreconditionFailedException`).
    #[error("{0}")]
    PreconditionFailed(String),
    /// The upload is too large (`RequestEntityTooLargeException`).
    #[error("{0}")]
    TooLarge(String),
    /// A server-side failure (`ServiceException`).
    #[error("{0}")]
    Internal(String),
}

impl From<MetaError> for ControlError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Exists(name) => {
                ControlError::Conflict(format!("Function already exist: {name}"))
            }
            other => ControlError::Internal(other.to_string()),
        }
    }
}

impl From<ArtifactError> for ControlError {
    fn from(e: ArtifactError) -> Self {
        match e {
            ArtifactError::ZippedTooLarge { .. } => ControlError::TooLarge(e.to_string()),
            e if e.is_client_error() => ControlError::InvalidParameter(e.to_string()),
            e => ControlError::Internal(e.to_string()),
        }
    }
}

impl From<SandboxError> for ControlError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::InvalidCode(m) => ControlError::InvalidParameter(m),
            other => ControlError::Internal(other.to_string()),
        }
    }
}

/// The control plane of one host.
pub struct ControlPlane {
    meta: Arc<MetaStore>,
    artifacts: ArtifactStore,
    data: Arc<DataPlane>,
    arn: ArnContext,
    writes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("arn", &self.arn)
            .finish_non_exhaustive()
    }
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControlError> + Send + 'static,
) -> Result<T, ControlError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ControlError::Internal(format!("store task failed: {e}")))?
}

impl ControlPlane {
    /// A control plane over the stores, feeding `data`.
    pub fn new(
        meta: Arc<MetaStore>,
        artifacts: ArtifactStore,
        data: Arc<DataPlane>,
        arn: ArnContext,
    ) -> Self {
        Self {
            meta,
            artifacts,
            data,
            arn,
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// The region and account of ARNs.
    pub fn arn(&self) -> &ArnContext {
        &self.arn
    }

    /// Installs every stored function in the data plane (at start).
    pub async fn load_all(&self) -> Result<usize, ControlError> {
        let meta = self.meta.clone();
        let records: Vec<FunctionRecord> =
            blocking(move || Ok(meta.list_functions(None, usize::MAX >> 1)?)).await?;
        let n = records.len();
        for record in records {
            let dir = self.artifacts.dir(&record.code_sha256_hex);
            self.data.install(record, dir, None);
        }
        Ok(n)
    }

    /// Parses a `FunctionName` path parameter plus an optional `Qualifier`.
    pub fn function_ref(
        &self,
        name: &str,
        qualifier: Option<&str>,
    ) -> Result<FunctionRef, ControlError> {
        let mut r = names::parse_function_ref(name, &self.arn)?;
        if let Some(q) = qualifier {
            if !names::is_valid_qualifier(q) {
                return Err(names::pattern_error("qualifier", q, "(|[a-zA-Z0-9$_-]+)"));
            }
            if r.qualifier.as_deref().is_some_and(|inner| inner != q) {
                return Err(ControlError::InvalidParameter(format!(
                    "The derived qualifier from the function name does not match the specified \
                     qualifier: {} vs {q}",
                    r.qualifier.as_deref().unwrap_or_default()
                )));
            }
            r.qualifier = Some(q.to_owned());
        }
        Ok(r)
    }

    async fn record(&self, r: &FunctionRef) -> Result<FunctionRecord, ControlError> {
        if r.qualifier.as_deref().is_some_and(|q| q != LATEST) {
            return Err(ControlError::NotFound(format!(
                "Function not found: {}",
                self.arn
                    .qualified_arn(&r.name, r.qualifier.as_deref().unwrap_or_default())
            )));
        }
        let meta = self.meta.clone();
        let name = r.name.clone();
        let found = blocking(move || Ok(meta.get_function::<FunctionRecord>(&name)?)).await?;
        found.ok_or_else(|| {
            ControlError::NotFound(format!(
                "Function not found: {}",
                self.arn.function_arn(&r.name)
            ))
        })
    }

    /// `GetFunctionConfiguration` / `GetFunction`.
    pub async fn get_function(&self, r: &FunctionRef) -> Result<FunctionRecord, ControlError> {
        self.record(r).await
    }

    /// The wire form of a record.
    pub fn configuration(&self, record: &FunctionRecord) -> FunctionConfiguration {
        FunctionConfiguration::from_record(record, &self.arn)
    }

    /// The stored code archive of a function.
    pub async fn code_archive(&self, r: &FunctionRef) -> Result<Vec<u8>, ControlError> {
        let record = self.record(r).await?;
        let artifacts = self.artifacts.clone();
        blocking(move || {
            artifacts
                .read_zip(&record.code_sha256_hex)
                .map_err(|e| ControlError::Internal(format!("reading the code archive: {e}")))
        })
        .await
    }

    /// `ListFunctions`: a page of functions in name order.
    pub async fn list_functions(
        &self,
        marker: Option<String>,
        max_items: Option<i64>,
    ) -> Result<(Vec<FunctionConfiguration>, Option<String>), ControlError> {
        let limit = match max_items {
            None => 50,
            Some(n) if (1..=10_000).contains(&n) => n as usize,
            Some(n) => {
                return Err(ControlError::Validation(format!(
                    "1 validation error detected: Value '{n}' at 'maxItems' failed to satisfy \
                     constraint: Member must have value between 1 and 10000"
                )));
            }
        };
        let after = match marker {
            None => None,
            Some(m) => Some(decode_marker(&m)?),
        };
        let meta = self.meta.clone();
        let mut page: Vec<FunctionRecord> =
            blocking(move || Ok(meta.list_functions(after.as_deref(), limit + 1)?)).await?;
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|r| encode_marker(&r.name))
        } else {
            None
        };
        Ok((page.iter().map(|r| self.configuration(r)).collect(), next))
    }

    /// `CreateFunction`.
    pub async fn create_function(
        &self,
        req: CreateFunctionRequest,
    ) -> Result<FunctionConfiguration, ControlError> {
        let name_ref = names::parse_function_ref(&req.function_name, &self.arn)?;
        if name_ref.qualifier.is_some() {
            return Err(names::pattern_error(
                "functionName",
                &req.function_name,
                "a function name without a qualifier",
            ));
        }
        let name = name_ref.name;
        let runtime = req.runtime.ok_or_else(|| {
            ControlError::InvalidParameter(
                "Runtime is required for a .zip deployment package: use wasip2".to_owned(),
            )
        })?;
        validate::runtime(&runtime)?;
        validate::role(&req.role)?;
        let handler = req.handler.unwrap_or_else(|| "function.wasm".to_owned());
        validate::handler(&handler)?;
        let description = req.description.unwrap_or_default();
        validate::description(&description)?;
        let timeout = validate::timeout(req.timeout.unwrap_or(3))?;
        let memory_size = validate::memory_size(req.memory_size.unwrap_or(128))?;
        let ephemeral_storage =
            validate::ephemeral_storage(req.ephemeral_storage.map_or(512, |e| e.size))?;
        let environment = req
            .environment
            .and_then(|e| e.variables)
            .unwrap_or_default();
        validate::environment(&environment)?;
        let tags = req.tags.unwrap_or_default();
        validate::tags(&tags)?;
        let architectures = req
            .architectures
            .unwrap_or_else(|| vec!["x86_64".to_owned()]);
        validate::architectures(&architectures)?;
        if req.package_type.as_deref().is_some_and(|p| p != "Zip") {
            return Err(ControlError::InvalidParameter(
                "PackageType must be Zip: kiln does not run container images".to_owned(),
            ));
        }
        unsupported_features(req.publish, req.layers.as_deref())?;
        let zip = zip_bytes(req.code)?;

        let _guard = self.writes.lock().await;
        let exists = {
            let meta = self.meta.clone();
            let name = name.clone();
            blocking(move || Ok(meta.get_function::<FunctionRecord>(&name)?.is_some())).await?
        };
        if exists {
            return Err(ControlError::Conflict(format!(
                "Function already exist: {name}"
            )));
        }
        let archive = self.store_archive(zip).await?;
        let record = FunctionRecord {
            name: name.clone(),
            runtime,
            role: req.role,
            handler,
            description,
            timeout,
            memory_size,
            ephemeral_storage,
            environment,
            architectures,
            code_sha256_hex: archive.sha256_hex.clone(),
            code_sha256: archive.sha256_base64.clone(),
            code_size: archive.size,
            revision_id: uuid::Uuid::new_v4().to_string(),
            last_modified: now_last_modified(),
            tags,
        };
        let code = match self.prepare(&record).await {
            Ok(code) => code,
            Err(e) => {
                self.collect_archive(&archive.sha256_hex).await;
                return Err(e);
            }
        };
        {
            let meta = self.meta.clone();
            let record = record.clone();
            blocking(move || Ok(meta.insert_function(&record.name, &record)?)).await?;
        }
        let config = self.configuration(&record);
        self.data
            .install(record, self.artifacts.dir(&archive.sha256_hex), Some(code));
        tracing::info!(function = %name, code_sha256 = %archive.sha256_base64, "function created");
        Ok(config)
    }

    /// `UpdateFunctionCode`.
    pub async fn update_function_code(
        &self,
        r: &FunctionRef,
        req: UpdateFunctionCodeRequest,
    ) -> Result<FunctionConfiguration, ControlError> {
        unsupported_features(req.publish, None)?;
        if let Some(a) = &req.architectures {
            validate::architectures(a)?;
        }
        let zip = zip_bytes(req.code)?;
        let _guard = self.writes.lock().await;
        let current = self.record(r).await?;
        check_revision(&current, req.revision_id.as_deref())?;
        let archive = self.store_archive(zip).await?;
        let mut record = current.clone();
        record.code_sha256_hex = archive.sha256_hex.clone();
        record.code_sha256 = archive.sha256_base64.clone();
        record.code_size = archive.size;
        let code = match self.prepare(&record).await {
            Ok(code) => code,
            Err(e) => {
                if archive.sha256_hex != current.code_sha256_hex {
                    self.collect_archive(&archive.sha256_hex).await;
                }
                return Err(e);
            }
        };
        if req.dry_run.unwrap_or(false) {
            if archive.sha256_hex != current.code_sha256_hex {
                self.collect_archive(&archive.sha256_hex).await;
            }
            return Ok(self.configuration(&record));
        }
        record.revision_id = uuid::Uuid::new_v4().to_string();
        record.last_modified = now_last_modified();
        self.commit(&record).await?;
        self.data.install(
            record.clone(),
            self.artifacts.dir(&archive.sha256_hex),
            Some(code),
        );
        if current.code_sha256_hex != record.code_sha256_hex {
            self.collect_archive(&current.code_sha256_hex).await;
        }
        Ok(self.configuration(&record))
    }

    /// `UpdateFunctionConfiguration`.
    pub async fn update_function_configuration(
        &self,
        r: &FunctionRef,
        req: UpdateFunctionConfigurationRequest,
    ) -> Result<FunctionConfiguration, ControlError> {
        let _guard = self.writes.lock().await;
        let current = self.record(r).await?;
        check_revision(&current, req.revision_id.as_deref())?;
        let mut record = current.clone();
        if let Some(role) = req.role {
            validate::role(&role)?;
            record.role = role;
        }
        if let Some(handler) = req.handler {
            validate::handler(&handler)?;
            record.handler = handler;
        }
        if let Some(description) = req.description {
            validate::description(&description)?;
            record.description = description;
        }
        if let Some(t) = req.timeout {
            record.timeout = validate::timeout(t)?;
        }
        if let Some(m) = req.memory_size {
            record.memory_size = validate::memory_size(m)?;
        }
        if let Some(e) = req.ephemeral_storage {
            record.ephemeral_storage = validate::ephemeral_storage(e.size)?;
        }
        if let Some(env) = req.environment {
            let vars = env.variables.unwrap_or_default();
            validate::environment(&vars)?;
            record.environment = vars;
        }
        if let Some(runtime) = req.runtime {
            validate::runtime(&runtime)?;
            record.runtime = runtime;
        }
        unsupported_features(None, req.layers.as_deref())?;
        let code = if record.code_key() != current.code_key() || record.runtime != current.runtime {
            Some(self.prepare(&record).await?)
        } else {
            None
        };
        record.revision_id = uuid::Uuid::new_v4().to_string();
        record.last_modified = now_last_modified();
        self.commit(&record).await?;
        self.data.install(
            record.clone(),
            self.artifacts.dir(&record.code_sha256_hex),
            code,
        );
        Ok(self.configuration(&record))
    }

    /// `DeleteFunction`.
    pub async fn delete_function(&self, r: &FunctionRef) -> Result<(), ControlError> {
        if let Some(q) = &r.qualifier {
            return Err(ControlError::InvalidParameter(if q == LATEST {
                "$LATEST version cannot be deleted without deleting the function.".to_owned()
            } else {
                format!("Function not found: {}", self.arn.qualified_arn(&r.name, q))
            }));
        }
        let _guard = self.writes.lock().await;
        let record = self.record(r).await?;
        let meta = self.meta.clone();
        let name = record.name.clone();
        blocking(move || Ok(meta.delete_function(&name)?)).await?;
        self.data.remove(&record.name);
        self.collect_archive(&record.code_sha256_hex).await;
        tracing::info!(function = %record.name, "function deleted");
        Ok(())
    }

    async fn store_archive(&self, zip: Vec<u8>) -> Result<StoredArchive, ControlError> {
        let artifacts = self.artifacts.clone();
        blocking(move || Ok(artifacts.put(&zip)?)).await
    }

    async fn prepare(&self, record: &FunctionRecord) -> Result<PreparedCode, ControlError> {
        Ok(self
            .data
            .prepare(record, self.artifacts.dir(&record.code_sha256_hex))
            .await?)
    }

    async fn commit(&self, record: &FunctionRecord) -> Result<(), ControlError> {
        let meta = self.meta.clone();
        let record = record.clone();
        let updated = blocking(move || Ok(meta.update_function(&record.name, &record)?)).await?;
        if !updated {
            return Err(ControlError::Conflict(
                "The function was deleted while it was being updated".to_owned(),
            ));
        }
        Ok(())
    }

    /// Removes an archive no function uses any more.
    async fn collect_archive(&self, sha256_hex: &str) {
        let meta = self.meta.clone();
        let artifacts = self.artifacts.clone();
        let sha = sha256_hex.to_owned();
        let result = blocking(move || {
            let all: Vec<FunctionRecord> = meta.list_functions(None, usize::MAX >> 1)?;
            if all.iter().any(|r| r.code_sha256_hex == sha) {
                return Ok(false);
            }
            artifacts
                .remove(&sha)
                .map_err(|e| ControlError::Internal(e.to_string()))?;
            Ok(true)
        })
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "removing an unused code archive");
        }
    }
}

fn check_revision(record: &FunctionRecord, expected: Option<&str>) -> Result<(), ControlError> {
    match expected {
        Some(rev) if rev != record.revision_id => Err(ControlError::PreconditionFailed(
            "The Revision Id provided does not match the latest Revision Id. Call the \
             GetFunction/GetAlias API to retrieve the latest Revision Id"
                .to_owned(),
        )),
        _ => Ok(()),
    }
}

/// Features of the API that later kiln releases bring; refused clearly
/// rather than ignored.
fn unsupported_features(
    publish: Option<bool>,
    layers: Option<&[String]>,
) -> Result<(), ControlError> {
    if publish == Some(true) {
        return Err(ControlError::InvalidParameter(
            "Publish is not supported by this kiln release: deploy without Publish".to_owned(),
        ));
    }
    if layers.is_some_and(|l| !l.is_empty()) {
        return Err(ControlError::InvalidParameter(
            "Layers are not supported by this kiln release".to_owned(),
        ));
    }
    Ok(())
}

fn zip_bytes(code: CodeInput) -> Result<Vec<u8>, ControlError> {
    if code.s3_bucket.is_some() || code.s3_key.is_some() || code.s3_object_version.is_some() {
        return Err(ControlError::InvalidParameter(
            "kiln does not fetch code from S3: upload the zip file itself in Code.ZipFile \
             (aws lambda ... --zip-file fileb://function.zip)"
                .to_owned(),
        ));
    }
    if code.image_uri.is_some() {
        return Err(ControlError::InvalidParameter(
            "kiln does not run container images: upload a zip file in Code.ZipFile".to_owned(),
        ));
    }
    let encoded = code.zip_file.ok_or_else(|| {
        ControlError::InvalidParameter(
            "Code.ZipFile is required: the base64 of the deployment package".to_owned(),
        )
    })?;
    base64::engine::general_purpose::STANDARD
        .decode(encoded.as_bytes())
        .map_err(|e| {
            ControlError::InvalidParameter(format!("Code.ZipFile is not valid base64: {e}"))
        })
}

fn encode_marker(name: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name)
}

fn decode_marker(marker: &str) -> Result<String, ControlError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(marker)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            ControlError::InvalidParameter(format!(
                "Marker {marker:?} is not valid: pass the NextMarker of a previous page"
            ))
        })
}
