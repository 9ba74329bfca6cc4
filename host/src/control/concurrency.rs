//! Concurrency settings: reserved concurrency per function, provisioned
//! concurrency per version or alias, and the account's limits.

use serde::Serialize;

use super::model::{
    FunctionRecord, LATEST, LayerVersionRecord, ProvisionedRecord, now_last_modified,
};
use super::names::FunctionRef;
use super::{ControlError, ControlPlane, page_size, paginate};
use crate::invoke::ProvisionedStatus;
use crate::store::meta::Kind;

/// Lambda keeps this much of the account's concurrency unreserved.
pub const MIN_UNRESERVED: u32 = 100;

/// `GetAccountSettings`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AccountSettings {
    pub account_limit: AccountLimit,
    pub account_usage: AccountUsage,
}

/// `AccountLimit`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AccountLimit {
    pub total_code_size: u64,
    pub code_size_unzipped: u64,
    pub code_size_zipped: u64,
    pub concurrent_executions: u32,
    pub unreserved_concurrent_executions: u32,
}

/// `AccountUsage`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AccountUsage {
    pub total_code_size: u64,
    pub function_count: u64,
}

/// A provisioned concurrency config as the API returns it.
#[derive(Debug, Clone)]
pub struct ProvisionedView {
    /// What is stored.
    pub record: ProvisionedRecord,
    /// What the data plane reports.
    pub status: ProvisionedStatus,
}

impl ControlPlane {
    /// `PutFunctionConcurrency`.
    pub async fn put_function_concurrency(
        &self,
        r: &FunctionRef,
        reserved: i64,
    ) -> Result<u32, ControlError> {
        unqualified(r, "PutFunctionConcurrency")?;
        if reserved < 0 || reserved > i64::from(self.account_concurrency) {
            return Err(ControlError::InvalidParameter(format!(
                "ReservedConcurrentExecutions must be between 0 and the account's limit of {}",
                self.account_concurrency
            )));
        }
        let reserved = reserved as u32;
        let _guard = self.writes.lock().await;
        let limit = self.account_concurrency;
        let name = r.name.clone();
        self.write(move |d| {
            let mut record: FunctionRecord = d
                .get(Kind::Function, "", &name)?
                .ok_or_else(|| ControlError::NotFound(format!("Function not found: {name}")))?;
            let others: u32 = d
                .all::<FunctionRecord>(Kind::Function)?
                .into_iter()
                .filter(|(_, n, _)| *n != name)
                .filter_map(|(_, _, f)| f.reserved_concurrency)
                .sum();
            if limit.saturating_sub(others).saturating_sub(reserved) < MIN_UNRESERVED
                || others + reserved > limit
            {
                return Err(ControlError::InvalidParameter(format!(
                    "Specified ReservedConcurrentExecutions for function decreases account's \
                     UnreservedConcurrentExecution below its minimum value of [{MIN_UNRESERVED}]."
                )));
            }
            let provisioned: u32 = d
                .list::<ProvisionedRecord>(Kind::Provisioned, &name, None, usize::MAX >> 1)?
                .into_iter()
                .map(|(_, p)| p.requested)
                .sum();
            if provisioned > reserved {
                return Err(ControlError::InvalidParameter(format!(
                    "ReservedConcurrentExecutions ({reserved}) is less than the function's \
                     provisioned concurrency ({provisioned})"
                )));
            }
            record.reserved_concurrency = Some(reserved);
            d.put(Kind::Function, "", &name, &record)?;
            Ok(())
        })
        .await
        .map_err(|e| self.function_not_found(e, r))?;
        self.data.set_reserved(&r.name, Some(reserved));
        Ok(reserved)
    }

    fn function_not_found(&self, e: ControlError, r: &FunctionRef) -> ControlError {
        match e {
            ControlError::NotFound(m) if m.starts_with("Function not found") => self.not_found(r),
            other => other,
        }
    }

    /// `GetFunctionConcurrency`.
    pub async fn get_function_concurrency(
        &self,
        r: &FunctionRef,
    ) -> Result<Option<u32>, ControlError> {
        unqualified(r, "GetFunctionConcurrency")?;
        Ok(self.latest(&r.name).await?.reserved_concurrency)
    }

    /// `DeleteFunctionConcurrency`.
    pub async fn delete_function_concurrency(&self, r: &FunctionRef) -> Result<(), ControlError> {
        unqualified(r, "DeleteFunctionConcurrency")?;
        let _guard = self.writes.lock().await;
        let mut record = self.latest(&r.name).await?;
        record.reserved_concurrency = None;
        self.commit_latest(&record).await?;
        self.data.set_reserved(&r.name, None);
        Ok(())
    }

    /// `GetAccountSettings`.
    pub async fn account_settings(&self) -> Result<AccountSettings, ControlError> {
        let (functions, versions, layers) = self
            .read(|d| {
                Ok((
                    d.all::<FunctionRecord>(Kind::Function)?,
                    d.all::<FunctionRecord>(Kind::Version)?,
                    d.all::<LayerVersionRecord>(Kind::Layer)?,
                ))
            })
            .await?;
        let reserved: u32 = functions
            .iter()
            .filter_map(|(_, _, f)| f.reserved_concurrency)
            .sum();
        let code: u64 = functions
            .iter()
            .chain(&versions)
            .map(|(_, _, f)| f.code_size)
            .sum::<u64>()
            + layers.iter().map(|(_, _, l)| l.code_size).sum::<u64>();
        Ok(AccountSettings {
            account_limit: AccountLimit {
                total_code_size: 80 * 1024 * 1024 * 1024 - 5 * 1024 * 1024 * 1024,
                code_size_unzipped: 262_144_000,
                code_size_zipped: 52_428_800,
                concurrent_executions: self.account_concurrency,
                unreserved_concurrent_executions: self.account_concurrency.saturating_sub(reserved),
            },
            account_usage: AccountUsage {
                total_code_size: code,
                function_count: functions.len() as u64,
            },
        })
    }

    /// `PutProvisionedConcurrencyConfig`.
    pub async fn put_provisioned(
        &self,
        r: &FunctionRef,
        requested: i64,
    ) -> Result<ProvisionedView, ControlError> {
        let qualifier = r.qualifier.clone().ok_or_else(|| {
            ControlError::InvalidParameter(
                "Qualifier is required: a version number or an alias".to_owned(),
            )
        })?;
        if qualifier == LATEST {
            return Err(ControlError::InvalidParameter(
                "Provisioned Concurrency Configs cannot be applied to unpublished function versions."
                    .to_owned(),
            ));
        }
        if requested < 1 || requested > i64::from(self.account_concurrency) {
            return Err(ControlError::InvalidParameter(format!(
                "ProvisionedConcurrentExecutions must be between 1 and {}",
                self.account_concurrency
            )));
        }
        let requested = requested as u32;
        let _guard = self.writes.lock().await;
        let resolved = self.resolve(r).await?;
        if resolved
            .alias
            .as_ref()
            .is_some_and(|a| !a.additional_weights.is_empty())
        {
            return Err(ControlError::InvalidParameter(
                "Alias with weights can not be used with Provisioned Concurrency".to_owned(),
            ));
        }
        let version = resolved.record.version.clone();
        let limit = self.account_concurrency;
        let record = ProvisionedRecord {
            qualifier: qualifier.clone(),
            requested,
            last_modified: now_last_modified(),
        };
        let (name, stored) = (r.name.clone(), record.clone());
        self.write(move |d| {
            let function: FunctionRecord = d
                .get(Kind::Function, "", &name)?
                .ok_or_else(|| ControlError::NotFound(format!("Function not found: {name}")))?;
            // Another qualifier of the same version may not be provisioned too.
            let mine: u32 = d
                .list::<ProvisionedRecord>(Kind::Provisioned, &name, None, usize::MAX >> 1)?
                .into_iter()
                .filter(|(q, _)| *q != stored.qualifier)
                .map(|(_, p)| p.requested)
                .sum::<u32>()
                + stored.requested;
            match function.reserved_concurrency {
                Some(reserved) if mine > reserved => {
                    return Err(ControlError::InvalidParameter(format!(
                        "Requested Provisioned Concurrency ({mine}) exceeds the function's \
                         reserved concurrency ({reserved})"
                    )));
                }
                Some(_) => {}
                None => {
                    let reserved: u32 = d
                        .all::<FunctionRecord>(Kind::Function)?
                        .into_iter()
                        .filter_map(|(_, _, f)| f.reserved_concurrency)
                        .sum();
                    if limit.saturating_sub(reserved).saturating_sub(mine) < MIN_UNRESERVED {
                        return Err(ControlError::InvalidParameter(format!(
                            "Requested Provisioned Concurrency should not be greater than the \
                             account's UnreservedConcurrentExecution minus {MIN_UNRESERVED}"
                        )));
                    }
                }
            }
            d.put(Kind::Provisioned, &name, &stored.qualifier, &stored)?;
            Ok(())
        })
        .await?;
        self.data
            .set_provisioned(&r.name, &qualifier, &version, requested);
        let status =
            self.data
                .provisioned_status(&r.name, &qualifier)
                .unwrap_or(ProvisionedStatus {
                    requested,
                    allocated: 0,
                    available: 0,
                    status: "IN_PROGRESS",
                    reason: None,
                });
        Ok(ProvisionedView { record, status })
    }

    fn provisioned_view(&self, function: &str, record: ProvisionedRecord) -> ProvisionedView {
        let status = self
            .data
            .provisioned_status(function, &record.qualifier)
            .unwrap_or(ProvisionedStatus {
                requested: record.requested,
                allocated: 0,
                available: 0,
                status: "IN_PROGRESS",
                reason: None,
            });
        ProvisionedView { record, status }
    }

    /// `GetProvisionedConcurrencyConfig`.
    pub async fn get_provisioned(&self, r: &FunctionRef) -> Result<ProvisionedView, ControlError> {
        let qualifier = r.qualifier.clone().ok_or_else(|| {
            ControlError::InvalidParameter(
                "Qualifier is required: a version number or an alias".to_owned(),
            )
        })?;
        self.latest(&r.name).await?;
        let name = r.name.clone();
        let record = self
            .read(move |d| Ok(d.get::<ProvisionedRecord>(Kind::Provisioned, &name, &qualifier)?))
            .await?
            .ok_or_else(|| {
                ControlError::ProvisionedNotFound(
                    "No Provisioned Concurrency Config found for this function".to_owned(),
                )
            })?;
        Ok(self.provisioned_view(&r.name, record))
    }

    /// `ListProvisionedConcurrencyConfigs`.
    pub async fn list_provisioned(
        &self,
        r: &FunctionRef,
        marker: Option<String>,
        max_items: Option<i64>,
    ) -> Result<(Vec<ProvisionedView>, Option<String>), ControlError> {
        let limit = page_size(max_items, 50, 50)?;
        self.latest(&r.name).await?;
        let name = r.name.clone();
        let all = self
            .read(move |d| {
                Ok(d.list::<ProvisionedRecord>(Kind::Provisioned, &name, None, usize::MAX >> 1)?)
            })
            .await?;
        let (page, next) = paginate(all, marker, limit)?;
        Ok((
            page.into_iter()
                .map(|p| self.provisioned_view(&r.name, p))
                .collect(),
            next,
        ))
    }

    /// `DeleteProvisionedConcurrencyConfig`.
    pub async fn delete_provisioned(&self, r: &FunctionRef) -> Result<(), ControlError> {
        let qualifier = r.qualifier.clone().ok_or_else(|| {
            ControlError::InvalidParameter(
                "Qualifier is required: a version number or an alias".to_owned(),
            )
        })?;
        let _guard = self.writes.lock().await;
        self.latest(&r.name).await?;
        let (name, q) = (r.name.clone(), qualifier.clone());
        let existed = self
            .write(move |d| Ok(d.delete(Kind::Provisioned, &name, &q)?))
            .await?;
        if !existed {
            return Err(ControlError::ProvisionedNotFound(
                "No Provisioned Concurrency Config found for this function".to_owned(),
            ));
        }
        self.data
            .set_provisioned(&r.name, &qualifier, &qualifier, 0);
        Ok(())
    }
}

fn unqualified(r: &FunctionRef, operation: &str) -> Result<(), ControlError> {
    if r.qualifier.is_some() {
        return Err(ControlError::InvalidParameter(format!(
            "{operation} applies to a function, not to a version or alias: give the function's \
             name without a qualifier"
        )));
    }
    Ok(())
}
