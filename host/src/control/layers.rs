//! Layers: versioned archives that functions merge, in order, into `/opt`.
//! Version numbers are never reused, also after a version is deleted;
//! functions keep working with a deleted version they already reference.

use serde_json::Value;

use super::model::{LayerVersionRecord, PolicyRecord, now_last_modified};
use super::requests::{AddLayerVersionPermissionRequest, PublishLayerVersionRequest};
use super::{
    ControlError, ControlPlane, check_revision, decode_marker, encode_marker, page_size, runtimes,
    validate, zip_bytes,
};
use crate::store::meta::{Kind, version_key};

/// Lambda's limit on a resource policy document.
pub(super) const MAX_POLICY: usize = 20_480;

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Counter {
    last: u64,
}

impl ControlPlane {
    /// A `LayerName` (a name or a layer ARN) to the name.
    pub fn layer_name(&self, name_or_arn: &str) -> Result<String, ControlError> {
        let invalid = || {
            super::names::pattern_error(
                "layerName",
                name_or_arn,
                "(arn:[a-zA-Z0-9-]+:lambda:[a-zA-Z0-9-]+:\\d{12}:layer:[a-zA-Z0-9-_]+)|[a-zA-Z0-9-_]+",
            )
        };
        let name = if let Some(rest) = name_or_arn.strip_prefix("arn:") {
            let parts: Vec<&str> = rest.split(':').collect();
            match parts.as_slice() {
                [_partition, "lambda", region, account, "layer", name] => {
                    if *region != self.arn.region || *account != self.arn.account_id {
                        return Err(ControlError::NotFound(format!(
                            "Layer not found: {name_or_arn} (this server serves region {} and account {})",
                            self.arn.region, self.arn.account_id
                        )));
                    }
                    (*name).to_owned()
                }
                _ => return Err(invalid()),
            }
        } else {
            name_or_arn.to_owned()
        };
        let ok = !name.is_empty()
            && name.len() <= 140
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(invalid());
        }
        Ok(name)
    }

    /// A layer version ARN to (name, version).
    pub fn parse_layer_version_arn(&self, arn: &str) -> Result<(String, u64), ControlError> {
        let (layer, version) = arn
            .rsplit_once(':')
            .filter(|(l, _)| l.starts_with("arn:"))
            .ok_or_else(|| {
                super::names::pattern_error(
                    "layerVersionArn",
                    arn,
                    "arn:aws:lambda:<region>:<account>:layer:<name>:<version>",
                )
            })?;
        let version: u64 = version.parse().map_err(|_| {
            ControlError::InvalidParameter(format!("Layer version ARN {arn} has no version number"))
        })?;
        Ok((self.layer_name(layer)?, version))
    }

    /// `PublishLayerVersion`.
    pub async fn publish_layer_version(
        &self,
        layer: &str,
        req: PublishLayerVersionRequest,
    ) -> Result<LayerVersionRecord, ControlError> {
        let name = self.layer_name(layer)?;
        let description = req.description.unwrap_or_default();
        validate::description(&description)?;
        let compatible_runtimes = req.compatible_runtimes.unwrap_or_default();
        if compatible_runtimes.len() > 15 {
            return Err(ControlError::InvalidParameter(
                "CompatibleRuntimes may list at most 15 runtimes".to_owned(),
            ));
        }
        for r in &compatible_runtimes {
            runtimes::lookup(r).ok_or_else(|| {
                ControlError::InvalidParameter(format!(
                    "CompatibleRuntimes: {r} is not a runtime kiln knows (see `kiln runtimes`)"
                ))
            })?;
        }
        let compatible_architectures = req.compatible_architectures.unwrap_or_default();
        if compatible_architectures
            .iter()
            .any(|a| a != "x86_64" && a != "arm64")
            || compatible_architectures.len() > 2
        {
            return Err(ControlError::InvalidParameter(
                "CompatibleArchitectures may hold x86_64 and arm64".to_owned(),
            ));
        }
        if req.license_info.as_ref().is_some_and(|l| l.len() > 512) {
            return Err(ControlError::InvalidParameter(
                "LicenseInfo may have at most 512 characters".to_owned(),
            ));
        }
        let zip = zip_bytes(req.content)?;
        let _guard = self.writes.lock().await;
        let archive = self.store_archive(zip).await?;
        let record_name = name.clone();
        let record = self
            .write(move |d| {
                let mut counter: Counter = d
                    .get(Kind::LayerCounter, &record_name, "")?
                    .unwrap_or_default();
                counter.last += 1;
                let record = LayerVersionRecord {
                    name: record_name.clone(),
                    version: counter.last,
                    description,
                    created_date: now_last_modified(),
                    compatible_runtimes,
                    compatible_architectures,
                    license_info: req.license_info,
                    sha256_hex: archive.sha256_hex,
                    sha256_base64: archive.sha256_base64,
                    code_size: archive.size,
                    unzipped_size: archive.unzipped_size,
                };
                d.put(Kind::LayerCounter, &record_name, "", &counter)?;
                d.insert(
                    Kind::Layer,
                    &record_name,
                    &version_key(counter.last),
                    &record,
                )?;
                Ok(record)
            })
            .await?;
        tracing::info!(layer = %name, version = record.version, "layer version published");
        Ok(record)
    }

    /// `GetLayerVersion`.
    pub async fn get_layer_version(
        &self,
        layer: &str,
        version: u64,
    ) -> Result<LayerVersionRecord, ControlError> {
        let name = self.layer_name(layer)?;
        let key = name.clone();
        self.read(move |d| {
            Ok(d.get::<LayerVersionRecord>(Kind::Layer, &key, &version_key(version))?)
        })
        .await?
        .ok_or_else(|| {
            ControlError::NotFound(format!(
                "The resource you requested does not exist. ({})",
                self.arn.layer_version_arn(&name, version)
            ))
        })
    }

    /// The stored archive of a layer version.
    pub async fn layer_archive(&self, layer: &str, version: u64) -> Result<Vec<u8>, ControlError> {
        let l = self.get_layer_version(layer, version).await?;
        let artifacts = self.artifacts.clone();
        super::blocking(move || {
            artifacts
                .read_zip(&l.sha256_hex)
                .map_err(|e| ControlError::Internal(format!("reading the layer archive: {e}")))
        })
        .await
    }

    /// `GetLayerVersionByArn`.
    pub async fn get_layer_version_by_arn(
        &self,
        arn: &str,
    ) -> Result<LayerVersionRecord, ControlError> {
        let (name, version) = self.parse_layer_version_arn(arn)?;
        self.get_layer_version(&name, version).await
    }

    /// `DeleteLayerVersion`: idempotent, as Lambda's.
    pub async fn delete_layer_version(
        &self,
        layer: &str,
        version: u64,
    ) -> Result<(), ControlError> {
        let name = self.layer_name(layer)?;
        let _guard = self.writes.lock().await;
        self.write(move |d| {
            d.delete(Kind::Layer, &name, &version_key(version))?;
            d.delete(Kind::LayerPolicy, &name, &version_key(version))?;
            Ok(())
        })
        .await?;
        self.collect_garbage().await;
        Ok(())
    }

    /// `ListLayerVersions`: newest first, filtered by runtime and architecture.
    pub async fn list_layer_versions(
        &self,
        layer: &str,
        runtime: Option<String>,
        architecture: Option<String>,
        marker: Option<String>,
        max_items: Option<i64>,
    ) -> Result<(Vec<LayerVersionRecord>, Option<String>), ControlError> {
        let name = self.layer_name(layer)?;
        let limit = page_size(max_items, 50, 50)?;
        let after: Option<u64> = marker
            .map(|m| {
                decode_marker(&m).and_then(|s| {
                    s.parse().map_err(|_| {
                        ControlError::InvalidParameter("Marker is not valid".to_owned())
                    })
                })
            })
            .transpose()?;
        let all = self
            .read(move |d| {
                Ok(d.list::<LayerVersionRecord>(Kind::Layer, &name, None, usize::MAX >> 1)?)
            })
            .await?;
        let mut matching: Vec<LayerVersionRecord> = all
            .into_iter()
            .map(|(_, l)| l)
            .filter(|l| matches(l, runtime.as_deref(), architecture.as_deref()))
            .filter(|l| after.is_none_or(|a| l.version < a))
            .collect();
        matching.reverse();
        let next = if matching.len() > limit {
            matching.truncate(limit);
            matching
                .last()
                .map(|l| encode_marker(&l.version.to_string()))
        } else {
            None
        };
        Ok((matching, next))
    }

    /// `ListLayers`: each layer with its newest matching version.
    pub async fn list_layers(
        &self,
        runtime: Option<String>,
        architecture: Option<String>,
        marker: Option<String>,
        max_items: Option<i64>,
    ) -> Result<(Vec<LayerVersionRecord>, Option<String>), ControlError> {
        let limit = page_size(max_items, 50, 50)?;
        let after = marker.map(|m| decode_marker(&m)).transpose()?;
        let all = self
            .read(|d| Ok(d.all::<LayerVersionRecord>(Kind::Layer)?))
            .await?;
        let mut newest: Vec<LayerVersionRecord> = Vec::new();
        for (_, _, l) in all {
            if !matches(&l, runtime.as_deref(), architecture.as_deref())
                || after.as_deref().is_some_and(|a| l.name.as_str() <= a)
            {
                continue;
            }
            match newest.last_mut() {
                Some(last) if last.name == l.name => *last = l,
                _ => newest.push(l),
            }
        }
        let next = if newest.len() > limit {
            newest.truncate(limit);
            newest.last().map(|l| encode_marker(&l.name))
        } else {
            None
        };
        Ok((newest, next))
    }

    /// `AddLayerVersionPermission`: returns the statement and the policy's
    /// revision.
    pub async fn add_layer_version_permission(
        &self,
        layer: &str,
        version: u64,
        revision_id: Option<String>,
        req: AddLayerVersionPermissionRequest,
    ) -> Result<(Value, String), ControlError> {
        let name = self.layer_name(layer)?;
        super::policies::check_statement_id(&req.statement_id)?;
        if req.action != "lambda:GetLayerVersion" {
            return Err(ControlError::Validation(format!(
                "1 validation error detected: Value '{}' at 'action' failed to satisfy constraint: \
                 Member must satisfy regular expression pattern: lambda:GetLayerVersion",
                req.action
            )));
        }
        let principal = layer_principal(&req.principal)?;
        let _guard = self.writes.lock().await;
        self.get_layer_version(&name, version).await?;
        let resource = self.arn.layer_version_arn(&name, version);
        let mut statement = serde_json::json!({
            "Sid": req.statement_id,
            "Effect": "Allow",
            "Principal": principal,
            "Action": "lambda:GetLayerVersion",
            "Resource": resource,
        });
        if let Some(org) = &req.organization_id {
            statement["Condition"] =
                serde_json::json!({"StringEquals": {"aws:PrincipalOrgID": org}});
        }
        let sid = req.statement_id.clone();
        let added = statement.clone();
        let revision = self
            .write(move |d| {
                let key = version_key(version);
                let mut policy: PolicyRecord = d.get(Kind::LayerPolicy, &name, &key)?.unwrap_or_default();
                check_revision(&policy.revision_id, revision_id.as_deref())
                    .map_err(|_| ControlError::PreconditionFailed("The RevisionId provided does not match the latest RevisionId of the layer version policy.".to_owned()))?;
                super::policies::add_statement(&mut policy, added, &sid)?;
                d.put(Kind::LayerPolicy, &name, &key, &policy)?;
                Ok(policy.revision_id)
            })
            .await?;
        Ok((statement, revision))
    }

    /// `GetLayerVersionPolicy`.
    pub async fn get_layer_version_policy(
        &self,
        layer: &str,
        version: u64,
    ) -> Result<PolicyRecord, ControlError> {
        let name = self.layer_name(layer)?;
        self.get_layer_version(&name, version).await?;
        self.read(move |d| {
            Ok(d.get::<PolicyRecord>(Kind::LayerPolicy, &name, &version_key(version))?)
        })
        .await?
        .filter(|p| !p.statements.is_empty())
        .ok_or_else(|| {
            ControlError::NotFound("No policy is associated with the given resource.".to_owned())
        })
    }

    /// `RemoveLayerVersionPermission`.
    pub async fn remove_layer_version_permission(
        &self,
        layer: &str,
        version: u64,
        statement_id: &str,
        revision_id: Option<String>,
    ) -> Result<(), ControlError> {
        let name = self.layer_name(layer)?;
        let _guard = self.writes.lock().await;
        self.get_layer_version(&name, version).await?;
        let sid = statement_id.to_owned();
        self.write(move |d| {
            let key = version_key(version);
            let mut policy: PolicyRecord =
                d.get(Kind::LayerPolicy, &name, &key)?.ok_or_else(|| {
                    ControlError::NotFound(
                        "No policy is associated with the given resource.".to_owned(),
                    )
                })?;
            check_revision(&policy.revision_id, revision_id.as_deref())?;
            super::policies::remove_statement(&mut policy, &sid)?;
            if policy.statements.is_empty() {
                d.delete(Kind::LayerPolicy, &name, &key)?;
            } else {
                d.put(Kind::LayerPolicy, &name, &key, &policy)?;
            }
            Ok(())
        })
        .await
    }
}

fn matches(l: &LayerVersionRecord, runtime: Option<&str>, architecture: Option<&str>) -> bool {
    runtime.is_none_or(|r| l.compatible_runtimes.iter().any(|c| c == r))
        && architecture.is_none_or(|a| l.compatible_architectures.iter().any(|c| c == a))
}

/// Layer principals: an account id, `*`, or an account's root ARN.
fn layer_principal(p: &str) -> Result<Value, ControlError> {
    let is_account = |s: &str| s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit());
    if p == "*" {
        return Ok(Value::String("*".to_owned()));
    }
    if is_account(p) {
        return Ok(serde_json::json!({"AWS": format!("arn:aws:iam::{p}:root")}));
    }
    if let Some(account) = p
        .strip_prefix("arn:aws:iam::")
        .and_then(|r| r.strip_suffix(":root"))
        .filter(|a| is_account(a))
    {
        return Ok(serde_json::json!({"AWS": format!("arn:aws:iam::{account}:root")}));
    }
    Err(super::names::pattern_error(
        "principal",
        p,
        "\\d{12}|\\*|arn:(aws[a-zA-Z-]*):iam::\\d{12}:root",
    ))
}
