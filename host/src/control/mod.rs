//! The control plane: functions, versions, aliases, layers, resource
//! policies, concurrency and asynchronous-invocation settings, tags.
//!
//! Every change goes the same way: validate the request against Lambda's
//! constraints, store any code (validated and unpacked), let the data plane
//! prepare it for its runtime (a component that does not compile is refused
//! here, not at the first invoke), commit the records to the metadata store
//! in one transaction, and only then install the result in the data plane.
//! Changes are serialized by one lock; reads are not.

mod async_config;
mod concurrency;
mod functions;
pub mod history;
mod layers;
pub mod model;
pub mod names;
mod policies;
pub mod requests;
pub mod runtimes;
mod tags;
pub mod validate;
mod versions;

use std::collections::HashSet;
use std::sync::Arc;

use base64::Engine as _;

use crate::invoke::{AliasRoute, DataPlane};
use crate::sandbox::SandboxError;
use crate::store::artifacts::{ArtifactError, ArtifactStore};
use crate::store::meta::{Docs, Kind, MetaError, MetaStore, version_key};
use model::{
    AliasRecord, ArnContext, FunctionConfiguration, FunctionRecord, LATEST, LayerVersionRecord,
    ProvisionedRecord,
};
use names::FunctionRef;

pub use async_config::EventInvokeView;
pub use concurrency::{AccountSettings, ProvisionedView};

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
    /// No provisioned concurrency config
    /// (`ProvisionedConcurrencyConfigNotFoundException`).
    #[error("{0}")]
    ProvisionedNotFound(String),
    /// The resource exists or is in the way (`ResourceConflictException`).
    #[error("{0}")]
    Conflict(String),
    /// A stale `RevisionId` (`PreconditionFailedException`).
    #[error("{0}")]
    PreconditionFailed(String),
    /// A policy over its size limit (`PolicyLengthExceededException`).
    #[error("{0}")]
    PolicyTooLong(String),
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
            MetaError::Exists(what) => ControlError::Conflict(format!("{what} already exists")),
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

/// Settings of the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// ARNs' region and account.
    pub arn: ArnContext,
    /// The account's concurrency limit.
    pub account_concurrency: u32,
}

/// The control plane of one host.
pub struct ControlPlane {
    meta: Arc<MetaStore>,
    artifacts: ArtifactStore,
    data: Arc<DataPlane>,
    arn: ArnContext,
    account_concurrency: u32,
    writes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("arn", &self.arn)
            .finish_non_exhaustive()
    }
}

/// Runs blocking work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControlError> + Send + 'static,
) -> Result<T, ControlError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ControlError::Internal(format!("store task failed: {e}")))?
}

/// A function version looked up through a qualifier.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The version's record.
    pub record: FunctionRecord,
    /// The qualifier the caller used, if any.
    pub qualifier: Option<String>,
    /// The alias, when the qualifier is one.
    pub alias: Option<AliasRecord>,
}

impl Resolved {
    /// A record seen without a qualifier.
    pub fn unqualified(record: FunctionRecord) -> Self {
        Self {
            record,
            qualifier: None,
            alias: None,
        }
    }
}

impl ControlPlane {
    /// A control plane over the stores, feeding `data`.
    pub fn new(
        meta: Arc<MetaStore>,
        artifacts: ArtifactStore,
        data: Arc<DataPlane>,
        config: ControlConfig,
    ) -> Self {
        Self {
            meta,
            artifacts,
            data,
            arn: config.arn,
            account_concurrency: config.account_concurrency,
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// The code archives (and the sealed keys beside them).
    pub fn artifacts(&self) -> &ArtifactStore {
        &self.artifacts
    }

    /// The region and account of ARNs.
    pub fn arn(&self) -> &ArnContext {
        &self.arn
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Docs<'_>) -> Result<T, ControlError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let meta = self.meta.clone();
        blocking(move || meta.read(f)).await
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Docs<'_>) -> Result<T, ControlError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let meta = self.meta.clone();
        blocking(move || meta.write(f)).await
    }

    /// Installs every stored function, version, alias and provisioned
    /// config in the data plane (at start).
    pub async fn load_all(&self) -> Result<usize, ControlError> {
        let (functions, versions, aliases, provisioned, event_configs) = self
            .read(|d| {
                Ok((
                    d.all::<FunctionRecord>(Kind::Function)?,
                    d.all::<FunctionRecord>(Kind::Version)?,
                    d.all::<AliasRecord>(Kind::Alias)?,
                    d.all::<ProvisionedRecord>(Kind::Provisioned)?,
                    d.all::<model::EventInvokeRecord>(Kind::EventInvoke)?,
                ))
            })
            .await?;
        let n = functions.len();
        for (_, _, record) in functions.into_iter().chain(versions) {
            // One archive that fails to authenticate (altered on disk)
            // takes that function out, not the server.
            let (name, version) = (record.name.clone(), record.version.clone());
            if let Err(e) = self.install(record).await {
                tracing::error!(
                    function = %name,
                    version = %version,
                    error = %e,
                    "the function's code could not be loaded; it cannot be invoked until its \
                     code is updated"
                );
            }
        }
        for (function, _, alias) in aliases {
            self.data
                .set_alias(&function, &alias.name, Some(route_of(&alias)));
        }
        for (function, qualifier, config) in event_configs {
            self.data
                .set_event_config(&function, &qualifier, Some(config));
        }
        for (function, qualifier, p) in provisioned {
            if let Some(version) = self.data.version_of(&function, &qualifier) {
                self.data
                    .set_provisioned(&function, &qualifier, &version, p.requested);
            }
        }
        Ok(n)
    }

    /// Puts a record into the data plane, merging its layers for `/opt`.
    async fn install(&self, record: FunctionRecord) -> Result<(), ControlError> {
        let (task_dir, opt_dir) = self.dirs(&record).await?;
        self.data.install(record, task_dir, opt_dir, None);
        Ok(())
    }

    /// The `/var/task` and `/opt` directories of a record.
    async fn dirs(
        &self,
        record: &FunctionRecord,
    ) -> Result<(std::path::PathBuf, Option<std::path::PathBuf>), ControlError> {
        let layers: Vec<String> = record.layers.iter().map(|l| l.sha256_hex.clone()).collect();
        let artifacts = self.artifacts.clone();
        let opt = blocking(move || {
            artifacts
                .merged_layers(&layers)
                .map_err(|e| ControlError::Internal(format!("merging layers: {e}")))
        })
        .await?;
        Ok((self.task_dir(&record.code_sha256_hex).await?, opt))
    }

    /// The `/var/task` directory of an archive, unpacked from the sealed
    /// store if the cache lacks it.
    async fn task_dir(&self, sha256_hex: &str) -> Result<std::path::PathBuf, ControlError> {
        let artifacts = self.artifacts.clone();
        let sha256_hex = sha256_hex.to_owned();
        blocking(move || {
            artifacts
                .ensure_dir(&sha256_hex)
                .map_err(|e| ControlError::Internal(format!("unpacking the code archive: {e}")))
        })
        .await
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

    fn not_found(&self, r: &FunctionRef) -> ControlError {
        ControlError::NotFound(format!(
            "Function not found: {}",
            match &r.qualifier {
                Some(q) => self.arn.qualified_arn(&r.name, q),
                None => self.arn.function_arn(&r.name),
            }
        ))
    }

    /// The function's `$LATEST`, whatever the qualifier says.
    async fn latest(&self, name: &str) -> Result<FunctionRecord, ControlError> {
        let key = name.to_owned();
        self.read(move |d| Ok(d.get::<FunctionRecord>(Kind::Function, "", &key)?))
            .await?
            .ok_or_else(|| {
                ControlError::NotFound(format!(
                    "Function not found: {}",
                    self.arn.function_arn(name)
                ))
            })
    }

    /// The version a reference names: `$LATEST`, a number, or an alias's
    /// primary version.
    pub async fn resolve(&self, r: &FunctionRef) -> Result<Resolved, ControlError> {
        let name = r.name.clone();
        let qualifier = r.qualifier.clone();
        let found = self
            .read(move |d| resolve_in(d, &name, qualifier.as_deref()))
            .await?;
        found.ok_or_else(|| self.not_found(r))
    }

    /// The wire form of a record as seen through `qualifier`.
    pub fn configuration(&self, resolved: &Resolved) -> FunctionConfiguration {
        let mut config = FunctionConfiguration::from_record(
            &resolved.record,
            &self.arn,
            resolved.qualifier.is_some(),
        );
        if let Some(q) = &resolved.qualifier {
            config.function_arn = self.arn.qualified_arn(&resolved.record.name, q);
        }
        config
    }

    /// Removes archives and merged layer directories nothing refers to.
    async fn collect_garbage(&self) {
        let artifacts = self.artifacts.clone();
        let result = {
            let meta = self.meta.clone();
            blocking(move || {
                let (functions, versions, layers) = meta.read(|d| {
                    Ok::<_, ControlError>((
                        d.all::<FunctionRecord>(Kind::Function)?,
                        d.all::<FunctionRecord>(Kind::Version)?,
                        d.all::<LayerVersionRecord>(Kind::Layer)?,
                    ))
                })?;
                let mut keep = HashSet::new();
                let mut merged = Vec::new();
                for (_, _, r) in functions.iter().chain(&versions) {
                    keep.insert(r.code_sha256_hex.clone());
                    keep.extend(r.layers.iter().map(|l| l.sha256_hex.clone()));
                    if !r.layers.is_empty() {
                        merged.push(r.layers.iter().map(|l| l.sha256_hex.clone()).collect());
                    }
                }
                keep.extend(layers.into_iter().map(|(_, _, l)| l.sha256_hex));
                artifacts
                    .sweep(&keep, &merged)
                    .map_err(|e| ControlError::Internal(e.to_string()))
            })
            .await
        };
        match result {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "removed unused code archives"),
            Err(e) => tracing::warn!(error = %e, "removing unused code archives"),
        }
    }
}

/// Looks a qualifier up within a read transaction.
fn resolve_in(
    d: &Docs<'_>,
    name: &str,
    qualifier: Option<&str>,
) -> Result<Option<Resolved>, ControlError> {
    let found = match qualifier {
        None | Some(LATEST) => d
            .get::<FunctionRecord>(Kind::Function, "", name)?
            .map(|record| (record, None)),
        Some(q) if q.bytes().all(|b| b.is_ascii_digit()) => match q.parse::<u64>() {
            Ok(n) => d
                .get::<FunctionRecord>(Kind::Version, name, &version_key(n))?
                .map(|record| (record, None)),
            Err(_) => None,
        },
        Some(alias) => match d.get::<AliasRecord>(Kind::Alias, name, alias)? {
            None => None,
            Some(a) => version_record(d, name, &a.function_version)?.map(|r| (r, Some(a))),
        },
    };
    Ok(found.map(|(record, alias)| Resolved {
        record,
        qualifier: qualifier.map(str::to_owned),
        alias,
    }))
}

/// `$LATEST` or a published version's record.
fn version_record(
    d: &Docs<'_>,
    name: &str,
    version: &str,
) -> Result<Option<FunctionRecord>, ControlError> {
    if version == LATEST {
        return Ok(d.get(Kind::Function, "", name)?);
    }
    match version.parse::<u64>() {
        Ok(n) => Ok(d.get(Kind::Version, name, &version_key(n))?),
        Err(_) => Ok(None),
    }
}

/// The data plane's route for an alias.
fn route_of(a: &AliasRecord) -> AliasRoute {
    AliasRoute {
        primary: a.function_version.clone(),
        additional: a
            .additional_weights
            .iter()
            .next()
            .map(|(v, w)| (v.clone(), *w)),
    }
}

fn check_revision(current: &str, expected: Option<&str>) -> Result<(), ControlError> {
    match expected {
        Some(rev) if rev != current => Err(ControlError::PreconditionFailed(
            "The Revision Id provided does not match the latest Revision Id. Call the \
             GetFunction/GetAlias API to retrieve the latest Revision Id"
                .to_owned(),
        )),
        _ => Ok(()),
    }
}

/// Opaque paging markers: the last key of the previous page.
fn encode_marker(key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
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

/// `MaxItems` within `1..=max`, `default` when absent.
fn page_size(max_items: Option<i64>, default: usize, max: usize) -> Result<usize, ControlError> {
    match max_items {
        None => Ok(default),
        Some(n) if n >= 1 && (n as u64) <= max as u64 => Ok(n as usize),
        Some(n) => Err(ControlError::Validation(format!(
            "1 validation error detected: Value '{n}' at 'maxItems' failed to satisfy \
             constraint: Member must have value between 1 and {max}"
        ))),
    }
}

/// Pages an in-memory, ordered list by key.
fn paginate<T>(
    items: Vec<(String, T)>,
    marker: Option<String>,
    limit: usize,
) -> Result<(Vec<T>, Option<String>), ControlError> {
    let after = marker.map(|m| decode_marker(&m)).transpose()?;
    let mut rest: Vec<(String, T)> = match &after {
        Some(a) => {
            let start = items
                .iter()
                .position(|(k, _)| k == a)
                .map_or(items.len(), |i| i + 1);
            items.into_iter().skip(start).collect()
        }
        None => items,
    };
    let next = if rest.len() > limit {
        rest.truncate(limit);
        rest.last().map(|(k, _)| encode_marker(k))
    } else {
        None
    };
    Ok((rest.into_iter().map(|(_, v)| v).collect(), next))
}

fn zip_bytes(code: requests::CodeInput) -> Result<Vec<u8>, ControlError> {
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
        .map_err(|e| ControlError::InvalidParameter(format!("ZipFile is not valid base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_markers() {
        let items: Vec<(String, u32)> = (0..5).map(|i| (format!("k{i}"), i)).collect();
        let (page, next) = paginate(items.clone(), None, 2).unwrap();
        assert_eq!(page, vec![0, 1]);
        let (page, next) = paginate(items.clone(), next, 2).unwrap();
        assert_eq!(page, vec![2, 3]);
        let (page, next) = paginate(items.clone(), next, 2).unwrap();
        assert_eq!(page, vec![4]);
        assert!(next.is_none());
        assert!(paginate(items, Some("%%%".into()), 2).is_err());
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(None, 50, 10_000).unwrap(), 50);
        assert_eq!(page_size(Some(10_000), 50, 10_000).unwrap(), 10_000);
        assert!(page_size(Some(0), 50, 10_000).is_err());
        assert!(page_size(Some(51), 50, 50).is_err());
    }
}
