//! Versions (immutable copies of `$LATEST`) and aliases (names for one
//! version, or two with weighted routing).

use std::collections::BTreeMap;

use super::model::{
    AliasConfiguration, AliasRecord, FunctionConfiguration, FunctionRecord, LATEST,
    now_last_modified,
};
use super::names::FunctionRef;
use super::requests::{CreateAliasRequest, PublishVersionRequest, UpdateAliasRequest};
use super::{
    ControlError, ControlPlane, Resolved, check_revision, page_size, paginate, route_of, validate,
    version_record,
};
use crate::store::meta::{Kind, version_key};

/// Most aliases per function.
const MAX_ALIASES: usize = 1000;

impl ControlPlane {
    /// `PublishVersion`.
    pub async fn publish_version(
        &self,
        r: &FunctionRef,
        req: PublishVersionRequest,
    ) -> Result<FunctionConfiguration, ControlError> {
        if let Some(d) = &req.description {
            validate::description(d)?;
        }
        let _guard = self.writes.lock().await;
        let record = self
            .publish_locked(&r.name, req.code_sha256, req.description, req.revision_id)
            .await?;
        Ok(self.configuration(&Resolved::unqualified(record)))
    }

    /// Publishes `$LATEST` as a new version unless the newest version is
    /// already the same; the caller holds the write lock.
    pub(super) async fn publish_locked(
        &self,
        name: &str,
        code_sha256: Option<String>,
        description: Option<String>,
        revision_id: Option<String>,
    ) -> Result<FunctionRecord, ControlError> {
        let latest = self.latest(name).await?;
        check_revision(&latest.revision_id, revision_id.as_deref())?;
        if let Some(sha) = &code_sha256
            && *sha != latest.code_sha256
        {
            return Err(ControlError::InvalidParameter(format!(
                "CodeSHA256 ({sha}) is different from current CodeSHA256 in $LATEST ({}). \
                 Please try again with the CodeSHA256 in $LATEST.",
                latest.code_sha256
            )));
        }
        let key = name.to_owned();
        let newest_n = latest.last_version;
        let newest = self
            .read(move |d| {
                if newest_n == 0 {
                    return Ok(None);
                }
                Ok(d.get::<FunctionRecord>(Kind::Version, &key, &version_key(newest_n))?)
            })
            .await?;
        // Lambda publishes nothing when code and configuration are unchanged
        // since the newest version, and returns that version.
        if let Some(newest) = newest
            && newest.published_from.as_deref() == Some(latest.fingerprint().as_str())
        {
            return Ok(newest);
        }
        let n = latest.last_version + 1;
        let mut version = latest.clone();
        version.version = n.to_string();
        version.description = description.unwrap_or_else(|| latest.description.clone());
        version.revision_id = uuid::Uuid::new_v4().to_string();
        version.last_modified = now_last_modified();
        version.tags.clear();
        version.reserved_concurrency = None;
        version.published_from = Some(latest.fingerprint());
        let mut head = latest;
        head.last_version = n;
        let (stored, head_stored) = (version.clone(), head);
        self.write(move |d| {
            d.insert(Kind::Version, &stored.name, &version_key(n), &stored)?;
            d.put(Kind::Function, "", &head_stored.name, &head_stored)?;
            Ok(())
        })
        .await?;
        self.install(version.clone()).await?;
        tracing::info!(function = %name, version = n, "version published");
        Ok(version)
    }

    /// `ListVersionsByFunction`: `$LATEST`, then published versions in order.
    pub async fn list_versions(
        &self,
        r: &FunctionRef,
        marker: Option<String>,
        max_items: Option<i64>,
    ) -> Result<(Vec<FunctionConfiguration>, Option<String>), ControlError> {
        let limit = page_size(max_items, 50, 10_000)?;
        let latest = self.latest(&r.name).await?;
        let name = r.name.clone();
        let versions = self
            .read(move |d| {
                Ok(d.list::<FunctionRecord>(Kind::Version, &name, None, usize::MAX >> 1)?)
            })
            .await?;
        let mut items = vec![(LATEST.to_owned(), latest)];
        items.extend(versions);
        let (page, next) = paginate(items, marker, limit)?;
        Ok((
            page.into_iter()
                .map(|record| {
                    // Lambda lists $LATEST with its qualified ARN here.
                    let qualifier = record.is_latest().then(|| LATEST.to_owned());
                    self.configuration(&Resolved {
                        record,
                        qualifier,
                        alias: None,
                    })
                })
                .collect(),
            next,
        ))
    }

    /// `CreateAlias`.
    pub async fn create_alias(
        &self,
        r: &FunctionRef,
        req: CreateAliasRequest,
    ) -> Result<AliasConfiguration, ControlError> {
        validate_alias_name(&req.name)?;
        let description = req.description.unwrap_or_default();
        validate::description(&description)?;
        let weights = req
            .routing_config
            .map(|c| c.additional_version_weights)
            .unwrap_or_default();
        let _guard = self.writes.lock().await;
        self.latest(&r.name).await?;
        self.check_alias_target(&r.name, &req.function_version, &weights)
            .await?;
        let alias = AliasRecord {
            name: req.name.clone(),
            function_version: req.function_version,
            description,
            additional_weights: weights,
            revision_id: uuid::Uuid::new_v4().to_string(),
        };
        let (function, stored) = (r.name.clone(), alias.clone());
        let conflict = self.arn.qualified_arn(&r.name, &alias.name);
        self.write(move |d| {
            if d.list::<AliasRecord>(Kind::Alias, &function, None, MAX_ALIASES)?
                .len()
                >= MAX_ALIASES
            {
                return Err(ControlError::InvalidParameter(format!(
                    "A function may have at most {MAX_ALIASES} aliases"
                )));
            }
            if d.get::<AliasRecord>(Kind::Alias, &function, &stored.name)?
                .is_some()
            {
                return Err(ControlError::Conflict(format!(
                    "Alias already exists: {conflict}"
                )));
            }
            d.insert(Kind::Alias, &function, &stored.name, &stored)?;
            Ok(())
        })
        .await?;
        self.data
            .set_alias(&r.name, &alias.name, Some(route_of(&alias)));
        Ok(AliasConfiguration::from_record(&r.name, &alias, &self.arn))
    }

    async fn alias(&self, function: &str, name: &str) -> Result<AliasRecord, ControlError> {
        let (f, n) = (function.to_owned(), name.to_owned());
        self.read(move |d| Ok(d.get::<AliasRecord>(Kind::Alias, &f, &n)?))
            .await?
            .ok_or_else(|| {
                ControlError::NotFound(format!(
                    "Alias not found: {}",
                    self.arn.qualified_arn(function, name)
                ))
            })
    }

    /// `GetAlias`.
    pub async fn get_alias(
        &self,
        r: &FunctionRef,
        name: &str,
    ) -> Result<AliasConfiguration, ControlError> {
        self.latest(&r.name).await?;
        let alias = self.alias(&r.name, name).await?;
        Ok(AliasConfiguration::from_record(&r.name, &alias, &self.arn))
    }

    /// `UpdateAlias`.
    pub async fn update_alias(
        &self,
        r: &FunctionRef,
        name: &str,
        req: UpdateAliasRequest,
    ) -> Result<AliasConfiguration, ControlError> {
        let _guard = self.writes.lock().await;
        self.latest(&r.name).await?;
        let mut alias = self.alias(&r.name, name).await?;
        check_revision(&alias.revision_id, req.revision_id.as_deref())?;
        if let Some(v) = req.function_version {
            alias.function_version = v;
        }
        if let Some(d) = req.description {
            validate::description(&d)?;
            alias.description = d;
        }
        if let Some(c) = req.routing_config {
            alias.additional_weights = c.additional_version_weights;
        }
        self.check_alias_target(&r.name, &alias.function_version, &alias.additional_weights)
            .await?;
        let (function, q) = (r.name.clone(), name.to_owned());
        let provisioned = self
            .read(move |d| {
                Ok(d.get::<super::model::ProvisionedRecord>(Kind::Provisioned, &function, &q)?)
            })
            .await?;
        if provisioned.is_some() && !alias.additional_weights.is_empty() {
            return Err(ControlError::InvalidParameter(
                "Alias with weights can not be used with Provisioned Concurrency".to_owned(),
            ));
        }
        alias.revision_id = uuid::Uuid::new_v4().to_string();
        let (function, stored) = (r.name.clone(), alias.clone());
        self.write(move |d| Ok(d.put(Kind::Alias, &function, &stored.name, &stored)?))
            .await?;
        self.data.set_alias(&r.name, name, Some(route_of(&alias)));
        // Provisioned concurrency follows the alias to its new version.
        if let Some(p) = provisioned {
            self.data
                .set_provisioned(&r.name, name, &alias.function_version, p.requested);
        }
        Ok(AliasConfiguration::from_record(&r.name, &alias, &self.arn))
    }

    /// `DeleteAlias` (and what was configured on it).
    pub async fn delete_alias(&self, r: &FunctionRef, name: &str) -> Result<(), ControlError> {
        let _guard = self.writes.lock().await;
        self.latest(&r.name).await?;
        let (function, n) = (r.name.clone(), name.to_owned());
        self.write(move |d| {
            d.delete(Kind::Alias, &function, &n)?;
            for kind in [Kind::Policy, Kind::Provisioned, Kind::EventInvoke] {
                d.delete(kind, &function, &n)?;
            }
            Ok(())
        })
        .await?;
        self.data.set_provisioned(&r.name, name, name, 0);
        self.data.set_event_config(&r.name, name, None);
        self.data.set_alias(&r.name, name, None);
        Ok(())
    }

    /// `ListAliases`, optionally only those pointing at `function_version`.
    pub async fn list_aliases(
        &self,
        r: &FunctionRef,
        function_version: Option<String>,
        marker: Option<String>,
        max_items: Option<i64>,
    ) -> Result<(Vec<AliasConfiguration>, Option<String>), ControlError> {
        let limit = page_size(max_items, 50, 10_000)?;
        self.latest(&r.name).await?;
        let function = r.name.clone();
        let all = self
            .read(move |d| Ok(d.list::<AliasRecord>(Kind::Alias, &function, None, MAX_ALIASES)?))
            .await?;
        let matching: Vec<(String, AliasRecord)> = all
            .into_iter()
            .filter(|(_, a)| {
                function_version
                    .as_deref()
                    .is_none_or(|v| a.function_version == v || a.additional_weights.contains_key(v))
            })
            .collect();
        let (page, next) = paginate(matching, marker, limit)?;
        Ok((
            page.iter()
                .map(|a| AliasConfiguration::from_record(&r.name, a, &self.arn))
                .collect(),
            next,
        ))
    }

    /// An alias must point at versions that exist; with weights, at two
    /// different published versions.
    async fn check_alias_target(
        &self,
        function: &str,
        version: &str,
        weights: &BTreeMap<String, f64>,
    ) -> Result<(), ControlError> {
        validate_version(version)?;
        if weights.len() > 1 {
            return Err(ControlError::InvalidParameter(
                "RoutingConfig.AdditionalVersionWeights may name at most one version".to_owned(),
            ));
        }
        for (v, w) in weights {
            validate_version(v)?;
            if !(0.0..=1.0).contains(w) || w.is_nan() {
                return Err(ControlError::Validation(format!(
                    "1 validation error detected: Value '{w}' at 'routingConfig.additionalVersionWeights' \
                     failed to satisfy constraint: Map value must satisfy constraint: [Member must \
                     have value less than or equal to 1.0, Member must have value greater than or equal to 0.0]"
                )));
            }
            if v == version {
                return Err(ControlError::InvalidParameter(format!(
                    "Invalid function version {v}: the additional version must differ from the alias's FunctionVersion"
                )));
            }
            if v == LATEST || version == LATEST {
                return Err(ControlError::InvalidParameter(
                    "$LATEST is not supported for an alias pointing to more than 1 version"
                        .to_owned(),
                ));
            }
        }
        let mut wanted: Vec<String> = weights.keys().cloned().collect();
        wanted.push(version.to_owned());
        let f = function.to_owned();
        let missing = self
            .read(move |d| {
                for v in wanted {
                    if version_record(d, &f, &v)?.is_none() {
                        return Ok(Some(v));
                    }
                }
                Ok(None)
            })
            .await?;
        if let Some(v) = missing {
            return Err(ControlError::NotFound(format!(
                "Function not found: {}",
                self.arn.qualified_arn(function, &v)
            )));
        }
        Ok(())
    }
}

fn validate_alias_name(name: &str) -> Result<(), ControlError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.bytes().all(|b| b.is_ascii_digit());
    if !ok {
        return Err(super::names::pattern_error(
            "name",
            name,
            "(?!^[0-9]+$)([a-zA-Z0-9-_]+)",
        ));
    }
    Ok(())
}

fn validate_version(v: &str) -> Result<(), ControlError> {
    let ok =
        v == LATEST || (!v.is_empty() && v.len() <= 1024 && v.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        return Err(super::names::pattern_error(
            "functionVersion",
            v,
            "(\\$LATEST|[0-9]+)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_names() {
        validate_alias_name("prod").unwrap();
        validate_alias_name("v2-blue_green").unwrap();
        assert!(validate_alias_name("123").is_err());
        assert!(validate_alias_name("").is_err());
        assert!(validate_alias_name("a b").is_err());
        assert!(validate_alias_name(&"a".repeat(129)).is_err());
    }

    #[test]
    fn versions() {
        validate_version("$LATEST").unwrap();
        validate_version("12").unwrap();
        assert!(validate_version("latest").is_err());
        assert!(validate_version("").is_err());
    }
}
