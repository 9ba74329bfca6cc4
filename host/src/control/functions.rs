//! Functions: create, read, list, update code and configuration, delete.

use std::collections::BTreeMap;

use super::model::{
    AliasRecord, FunctionConfiguration, FunctionRecord, LATEST, LayerRef, LayerVersionRecord,
    now_last_modified,
};
use super::names::{self, FunctionRef};
use super::requests::{
    CreateFunctionRequest, UpdateFunctionCodeRequest, UpdateFunctionConfigurationRequest,
};
use super::{
    ControlError, ControlPlane, Resolved, blocking, check_revision, page_size, paginate, runtimes,
    validate, zip_bytes,
};
use crate::sandbox::PreparedCode;
use crate::store::artifacts::StoredArchive;
use crate::store::meta::{Kind, version_key};

/// Lambda's limit on code plus layers, unpacked.
const MAX_UNZIPPED_WITH_LAYERS: u64 = 262_144_000;
/// Lambda's limit on layers per function.
const MAX_LAYERS: usize = 5;

impl ControlPlane {
    /// `GetFunction` / `GetFunctionConfiguration`: the version a reference
    /// names.
    pub async fn get_function(&self, r: &FunctionRef) -> Result<Resolved, ControlError> {
        self.resolve(r).await
    }

    /// The stored code archive of a version.
    pub async fn code_archive(&self, r: &FunctionRef) -> Result<Vec<u8>, ControlError> {
        let resolved = self.resolve(r).await?;
        let artifacts = self.artifacts.clone();
        blocking(move || {
            artifacts
                .read_zip(&resolved.record.code_sha256_hex)
                .map_err(|e| ControlError::Internal(format!("reading the code archive: {e}")))
        })
        .await
    }

    /// `ListFunctions`: a page of functions in name order; with
    /// `all_versions`, every published version after each `$LATEST`.
    pub async fn list_functions(
        &self,
        marker: Option<String>,
        max_items: Option<i64>,
        all_versions: bool,
    ) -> Result<(Vec<FunctionConfiguration>, Option<String>), ControlError> {
        let limit = page_size(max_items, 50, 10_000)?;
        let (functions, versions) = self
            .read(move |d| {
                Ok((
                    d.all::<FunctionRecord>(Kind::Function)?,
                    if all_versions {
                        d.all::<FunctionRecord>(Kind::Version)?
                    } else {
                        Vec::new()
                    },
                ))
            })
            .await?;
        let mut items: Vec<(String, FunctionRecord)> = Vec::new();
        let mut versions = versions.into_iter().peekable();
        for (_, name, latest) in functions {
            items.push((format!("{name}:{LATEST}"), latest));
            while let Some((scope, key, _)) = versions.peek() {
                if *scope != name {
                    break;
                }
                let key = format!("{name}:{key}");
                let (_, _, v) = versions.next().expect("peeked");
                items.push((key, v));
            }
        }
        let (page, next) = paginate(items, marker, limit)?;
        let configs = page
            .into_iter()
            .map(|record| self.configuration(&Resolved::unqualified(record)))
            .collect();
        Ok((configs, next))
    }

    /// Resolves `Layers` to stored layer versions, in order.
    pub(super) async fn layer_refs(&self, arns: &[String]) -> Result<Vec<LayerRef>, ControlError> {
        if arns.len() > MAX_LAYERS {
            return Err(ControlError::InvalidParameter(format!(
                "Cannot reference more than {MAX_LAYERS} layers; {} were given",
                arns.len()
            )));
        }
        let mut seen = BTreeMap::new();
        let mut wanted = Vec::new();
        for arn in arns {
            let (name, version) = self.parse_layer_version_arn(arn)?;
            if let Some(other) = seen.insert(name.clone(), arn.clone()) {
                return Err(ControlError::InvalidParameter(format!(
                    "Two different versions of the same layer are not allowed to be referenced \
                     in the same function: {other} and {arn}"
                )));
            }
            wanted.push((arn.clone(), name, version));
        }
        let found = self
            .read(move |d| {
                wanted
                    .into_iter()
                    .map(|(arn, name, version)| {
                        let l =
                            d.get::<LayerVersionRecord>(Kind::Layer, &name, &version_key(version))?;
                        Ok((arn, l))
                    })
                    .collect::<Result<Vec<_>, ControlError>>()
            })
            .await?;
        found
            .into_iter()
            .map(|(arn, layer)| {
                let l = layer.ok_or_else(|| {
                    ControlError::InvalidParameter(format!("Layer version {arn} does not exist."))
                })?;
                Ok(LayerRef {
                    arn,
                    code_size: l.code_size,
                    unzipped_size: l.unzipped_size,
                    sha256_hex: l.sha256_hex,
                })
            })
            .collect()
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
        if req.package_type.as_deref().is_some_and(|p| p != "Zip") {
            return Err(ControlError::InvalidParameter(
                "PackageType must be Zip: kiln does not run container images".to_owned(),
            ));
        }
        let runtime = req.runtime.ok_or_else(|| {
            ControlError::InvalidParameter(
                "Runtime is required for a .zip deployment package: see `kiln runtimes`".to_owned(),
            )
        })?;
        runtimes::check_create(&runtime)?;
        validate::role(&req.role)?;
        let handler = req
            .handler
            .unwrap_or_else(|| runtimes::default_handler(&runtime).to_owned());
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
        let logging = match &req.logging_config {
            Some(l) => validate::logging(l, &Default::default())?,
            None => Default::default(),
        };
        let layers = self.layer_refs(&req.layers.unwrap_or_default()).await?;
        let zip = zip_bytes(req.code)?;

        let _guard = self.writes.lock().await;
        let key = name.clone();
        let exists = self
            .read(move |d| Ok(d.get::<FunctionRecord>(Kind::Function, "", &key)?.is_some()))
            .await?;
        if exists {
            return Err(ControlError::Conflict(format!(
                "Function already exist: {name}"
            )));
        }
        let archive = self.store_archive(zip).await?;
        let record = FunctionRecord {
            name: name.clone(),
            version: LATEST.to_owned(),
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
            code_unzipped_size: archive.unzipped_size,
            layers,
            revision_id: uuid::Uuid::new_v4().to_string(),
            last_modified: now_last_modified(),
            tags,
            last_version: 0,
            reserved_concurrency: None,
            published_from: None,
            logging,
        };
        let prepared = self.prepare_checked(&record).await;
        let code = match prepared {
            Ok(code) => code,
            Err(e) => {
                self.collect_garbage().await;
                return Err(e);
            }
        };
        let stored = record.clone();
        self.write(move |d| Ok(d.insert(Kind::Function, "", &stored.name, &stored)?))
            .await?;
        let (task_dir, opt_dir) = self.dirs(&record).await?;
        self.data
            .install(record.clone(), task_dir, opt_dir, Some(code));
        tracing::info!(function = %name, code_sha256 = %archive.sha256_base64, "function created");
        if req.publish == Some(true) {
            let version = self.publish_locked(&name, None, None, None).await?;
            return Ok(self.configuration(&Resolved::unqualified(version)));
        }
        Ok(self.configuration(&Resolved::unqualified(record)))
    }

    /// `UpdateFunctionCode` (of `$LATEST`).
    pub async fn update_function_code(
        &self,
        r: &FunctionRef,
        req: UpdateFunctionCodeRequest,
    ) -> Result<FunctionConfiguration, ControlError> {
        reject_qualifier(r, "UpdateFunctionCode")?;
        if let Some(a) = &req.architectures {
            validate::architectures(a)?;
        }
        let zip = zip_bytes(req.code)?;
        let _guard = self.writes.lock().await;
        let current = self.latest(&r.name).await?;
        check_revision(&current.revision_id, req.revision_id.as_deref())?;
        runtimes::check_update(&current.runtime)?;
        let archive = self.store_archive(zip).await?;
        let mut record = current.clone();
        record.code_sha256_hex = archive.sha256_hex.clone();
        record.code_sha256 = archive.sha256_base64.clone();
        record.code_size = archive.size;
        record.code_unzipped_size = archive.unzipped_size;
        let prepared = self.prepare_checked(&record).await;
        let code = match prepared {
            Ok(code) if req.dry_run != Some(true) => code,
            other => {
                self.collect_garbage().await;
                other?;
                return Ok(self.configuration(&Resolved::unqualified(record)));
            }
        };
        record.revision_id = uuid::Uuid::new_v4().to_string();
        record.last_modified = now_last_modified();
        self.commit_latest(&record).await?;
        let (task_dir, opt_dir) = self.dirs(&record).await?;
        self.data
            .install(record.clone(), task_dir, opt_dir, Some(code));
        self.collect_garbage().await;
        if req.publish == Some(true) {
            let version = self.publish_locked(&r.name, None, None, None).await?;
            return Ok(self.configuration(&Resolved::unqualified(version)));
        }
        Ok(self.configuration(&Resolved::unqualified(record)))
    }

    /// `UpdateFunctionConfiguration` (of `$LATEST`).
    pub async fn update_function_configuration(
        &self,
        r: &FunctionRef,
        req: UpdateFunctionConfigurationRequest,
    ) -> Result<FunctionConfiguration, ControlError> {
        reject_qualifier(r, "UpdateFunctionConfiguration")?;
        let layers = match &req.layers {
            Some(arns) => Some(self.layer_refs(arns).await?),
            None => None,
        };
        let _guard = self.writes.lock().await;
        let current = self.latest(&r.name).await?;
        check_revision(&current.revision_id, req.revision_id.as_deref())?;
        let mut record = current.clone();
        if let Some(runtime) = req.runtime {
            runtimes::check_update(&runtime)?;
            record.runtime = runtime;
        } else {
            runtimes::check_update(&record.runtime)?;
        }
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
        if let Some(l) = &req.logging_config {
            record.logging = validate::logging(l, &record.logging)?;
        }
        if let Some(env) = req.environment {
            let vars = env.variables.unwrap_or_default();
            validate::environment(&vars)?;
            record.environment = vars;
        }
        if let Some(layers) = layers {
            record.layers = layers;
        }
        check_total_size(&record)?;
        let code = if record.code_key() != current.code_key() || record.runtime != current.runtime {
            Some(self.prepare_checked(&record).await?)
        } else {
            None
        };
        record.revision_id = uuid::Uuid::new_v4().to_string();
        record.last_modified = now_last_modified();
        self.commit_latest(&record).await?;
        let (task_dir, opt_dir) = self.dirs(&record).await?;
        self.data.install(record.clone(), task_dir, opt_dir, code);
        self.collect_garbage().await;
        Ok(self.configuration(&Resolved::unqualified(record)))
    }

    /// `DeleteFunction`: the whole function, or one published version.
    pub async fn delete_function(&self, r: &FunctionRef) -> Result<(), ControlError> {
        let _guard = self.writes.lock().await;
        match r.qualifier.as_deref() {
            None => {}
            Some(LATEST) => {
                return Err(ControlError::InvalidParameter(
                    "$LATEST version cannot be deleted without deleting the function.".to_owned(),
                ));
            }
            Some(q) if q.bytes().all(|b| b.is_ascii_digit()) => {
                return self.delete_version(r, q).await;
            }
            Some(_) => {
                return Err(ControlError::InvalidParameter(
                    "Deletion of aliases is not supported by DeleteFunction: use DeleteAlias"
                        .to_owned(),
                ));
            }
        }
        let name = r.name.clone();
        let found = self
            .write(move |d| {
                if !d.delete(Kind::Function, "", &name)? {
                    return Ok(false);
                }
                for kind in [
                    Kind::Version,
                    Kind::Alias,
                    Kind::Policy,
                    Kind::Provisioned,
                    Kind::EventInvoke,
                ] {
                    d.delete_scope(kind, &name)?;
                }
                Ok(true)
            })
            .await?;
        if !found {
            return Err(self.not_found(r));
        }
        self.data.remove(&r.name);
        self.collect_garbage().await;
        tracing::info!(function = %r.name, "function deleted");
        Ok(())
    }

    async fn delete_version(&self, r: &FunctionRef, version: &str) -> Result<(), ControlError> {
        let name = r.name.clone();
        let v = version.to_owned();
        let n: u64 = version.parse().map_err(|_| self.not_found(r))?;
        let outcome = self
            .write(move |d| {
                if d.get::<FunctionRecord>(Kind::Version, &name, &version_key(n))?
                    .is_none()
                {
                    return Ok(Err(()));
                }
                let users: Vec<String> = d
                    .list::<AliasRecord>(Kind::Alias, &name, None, usize::MAX >> 1)?
                    .into_iter()
                    .filter(|(_, a)| {
                        a.function_version == v || a.additional_weights.contains_key(&v)
                    })
                    .map(|(_, a)| a.name)
                    .collect();
                if !users.is_empty() {
                    return Ok(Ok(users));
                }
                d.delete(Kind::Version, &name, &version_key(n))?;
                for kind in [Kind::Policy, Kind::Provisioned, Kind::EventInvoke] {
                    d.delete(kind, &name, &v)?;
                }
                Ok(Ok(Vec::new()))
            })
            .await?;
        match outcome {
            Err(()) => Err(self.not_found(r)),
            Ok(users) if !users.is_empty() => Err(ControlError::Conflict(format!(
                "Unable to delete version because the following aliases reference it: {users:?}"
            ))),
            Ok(_) => {
                self.data.set_event_config(&r.name, version, None);
                self.data.set_provisioned(&r.name, version, version, 0);
                self.data.remove_version(&r.name, version);
                self.collect_garbage().await;
                Ok(())
            }
        }
    }

    pub(super) async fn store_archive(&self, zip: Vec<u8>) -> Result<StoredArchive, ControlError> {
        let artifacts = self.artifacts.clone();
        blocking(move || Ok(artifacts.put(&zip)?)).await
    }

    /// Checks sizes and prepares the code for its runtime.
    async fn prepare_checked(&self, record: &FunctionRecord) -> Result<PreparedCode, ControlError> {
        check_total_size(record)?;
        let task_dir = self.task_dir(&record.code_sha256_hex).await?;
        Ok(self.data.prepare(record, task_dir).await?)
    }

    pub(super) async fn commit_latest(&self, record: &FunctionRecord) -> Result<(), ControlError> {
        let record = record.clone();
        let updated = self
            .write(move |d| {
                if d.get::<FunctionRecord>(Kind::Function, "", &record.name)?
                    .is_none()
                {
                    return Ok(false);
                }
                d.put(Kind::Function, "", &record.name, &record)?;
                Ok(true)
            })
            .await?;
        if !updated {
            return Err(ControlError::Conflict(
                "The function was deleted while it was being updated".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Operations that change `$LATEST` take no qualifier.
fn reject_qualifier(r: &FunctionRef, operation: &str) -> Result<(), ControlError> {
    match r.qualifier.as_deref() {
        None | Some(LATEST) => Ok(()),
        Some(q) => Err(ControlError::InvalidParameter(format!(
            "{operation} changes $LATEST only; published versions and aliases ({q}) cannot be changed"
        ))),
    }
}

fn check_total_size(record: &FunctionRecord) -> Result<(), ControlError> {
    let total =
        record.code_unzipped_size + record.layers.iter().map(|l| l.unzipped_size).sum::<u64>();
    if total > MAX_UNZIPPED_WITH_LAYERS {
        return Err(ControlError::InvalidParameter(format!(
            "Function code combined with layers exceeds the maximum allowed size of \
             {MAX_UNZIPPED_WITH_LAYERS} bytes. The actual size is {total} bytes."
        )));
    }
    Ok(())
}
