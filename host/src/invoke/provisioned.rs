//! Provisioned concurrency: for a function version (named by a version or
//! an alias), a maintainer task creates the configured number of
//! environments ahead of any invocation, initialized with
//! `AWS_LAMBDA_INITIALIZATION_TYPE=provisioned-concurrency`, and tops the
//! count up whenever one goes away (it failed, or its version's slot was
//! replaced). Invocations take provisioned environments before on-demand
//! ones and give them back to the provisioned pool.

use std::sync::Arc;
use std::time::Duration;

use super::environments::{ProvisionedCount, ProvisionedLease};
use super::{DataPlane, InitType};

/// What `GetProvisionedConcurrencyConfig` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionedStatus {
    /// Environments asked for.
    pub requested: u32,
    /// Environments that exist.
    pub allocated: u32,
    /// Environments ready for invocations.
    pub available: u32,
    /// `IN_PROGRESS`, `READY` or `FAILED`.
    pub status: &'static str,
    /// Why it failed, when it did.
    pub reason: Option<String>,
}

/// One provisioned concurrency config's maintainer.
pub(super) struct Maintainer {
    version: String,
    requested: u32,
    count: Arc<ProvisionedCount>,
    failure: Arc<std::sync::Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Maintainer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Consecutive init failures after which a config is reported FAILED (it
/// keeps retrying, more slowly).
const FAILURES_BEFORE_FAILED: u32 = 3;

impl DataPlane {
    pub(super) fn provisioned_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), Maintainer>> {
        self.provisioned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the provisioned concurrency of `function`'s `qualifier` (which
    /// runs `version`) to `requested` environments; 0 removes it.
    pub fn set_provisioned(&self, function: &str, qualifier: &str, version: &str, requested: u32) {
        let key = (function.to_owned(), qualifier.to_owned());
        let previous = self.provisioned_lock().remove(&key);
        if let Some(previous) = previous {
            // Environments of the old setting go; the new maintainer builds
            // its own.
            let old_version = previous.version.clone();
            drop(previous);
            if let Some(slot) = self.slot(function, &old_version) {
                slot.provisioned.clear();
            }
        }
        if requested == 0 {
            return;
        }
        let count = Arc::new(ProvisionedCount::default());
        let failure = Arc::new(std::sync::Mutex::new(None));
        let task = tokio::spawn(maintain(
            self.me.clone(),
            function.to_owned(),
            version.to_owned(),
            requested,
            count.clone(),
            failure.clone(),
        ));
        self.provisioned_lock().insert(
            key,
            Maintainer {
                version: version.to_owned(),
                requested,
                count,
                failure,
                task,
            },
        );
    }

    /// Whether some qualifier of `function` keeps provisioned environments
    /// of `version`.
    pub(super) fn has_provisioned(&self, function: &str, version: &str) -> bool {
        self.provisioned_lock()
            .iter()
            .any(|((f, _), m)| f == function && m.version == version)
    }

    /// The state of a provisioned concurrency config, if it exists.
    pub fn provisioned_status(&self, function: &str, qualifier: &str) -> Option<ProvisionedStatus> {
        let map = self.provisioned_lock();
        let m = map.get(&(function.to_owned(), qualifier.to_owned()))?;
        let allocated = (m.count.ready() as u32).min(m.requested);
        let reason = m.failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let status = if allocated >= m.requested {
            "READY"
        } else if reason.is_some() {
            "FAILED"
        } else {
            "IN_PROGRESS"
        };
        Some(ProvisionedStatus {
            requested: m.requested,
            allocated,
            available: allocated,
            status,
            reason,
        })
    }

    /// The version a provisioned config currently keeps warm.
    pub fn provisioned_version(&self, function: &str, qualifier: &str) -> Option<String> {
        self.provisioned_lock()
            .get(&(function.to_owned(), qualifier.to_owned()))
            .map(|m| m.version.clone())
    }

    /// Wakes the maintainers of a function (its slots changed).
    pub(super) fn wake_provisioned(&self, function: &str) {
        for ((f, _), m) in self.provisioned_lock().iter() {
            if f == function {
                m.count.changed.notify_one();
            }
        }
    }
}

async fn maintain(
    plane: std::sync::Weak<DataPlane>,
    function: String,
    version: String,
    requested: u32,
    count: Arc<ProvisionedCount>,
    failure: Arc<std::sync::Mutex<Option<String>>>,
) {
    let mut failures = 0u32;
    loop {
        let Some(plane) = plane.upgrade() else { return };
        let Some(slot) = plane.slot(&function, &version) else {
            // The version is gone; the control plane removes the config.
            drop(plane);
            count.changed.notified().await;
            continue;
        };
        if count.live() >= requested as usize {
            drop(plane);
            count.changed.notified().await;
            continue;
        }
        let lease = ProvisionedLease::new(count.clone());
        let created = plane
            .create_environment(&slot, InitType::Provisioned, Some(lease))
            .await;
        let problem = match created {
            Ok((Some(mut env), _, _)) => {
                if slot.is_retired() {
                    // Replaced while initializing: the next round builds on
                    // the new slot.
                    drop(env);
                } else {
                    // Counted as available only now that an invocation
                    // finds it in the pool.
                    env.set_provisioned_ready();
                    slot.provisioned.push(env);
                }
                failures = 0;
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
                None
            }
            Ok((None, init, _)) => Some(format!(
                "an environment failed to initialize: {:?}",
                init.error
            )),
            Err(e) => Some(e.to_string()),
        };
        drop(plane);
        if let Some(problem) = problem {
            failures += 1;
            tracing::warn!(%function, %version, %problem, "provisioned concurrency");
            if failures >= FAILURES_BEFORE_FAILED {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(problem);
            }
            let backoff = Duration::from_millis(100 * 2u64.pow(failures.min(8)));
            tokio::time::sleep(backoff).await;
        }
    }
}
