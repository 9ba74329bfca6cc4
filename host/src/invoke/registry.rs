//! The data plane's table of functions: for each, its versions (`$LATEST`
//! and published ones), each a [`FunctionSlot`] with its warm environments,
//! and its aliases with their routing. The control plane keeps it current;
//! invocations only read it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::OnceCell;

use super::environments::IdleEnvironments;
use crate::control::model::{FunctionRecord, LATEST};
use crate::sandbox::{CodeSpec, PreparedCode};

/// One function version's runtime state: configuration snapshot, prepared
/// code and environments. Replaced as a whole when the version changes
/// (only `$LATEST` does); the old one is retired and its environments
/// dropped.
pub struct FunctionSlot {
    pub(super) record: Arc<FunctionRecord>,
    pub(super) task_dir: PathBuf,
    pub(super) opt_dir: Option<PathBuf>,
    pub(super) code: OnceCell<PreparedCode>,
    /// Warm on-demand environments.
    pub(super) idle: IdleEnvironments,
    /// Warm provisioned environments, used first.
    pub(super) provisioned: IdleEnvironments,
    pub(super) retired: AtomicBool,
}

impl FunctionSlot {
    pub(super) fn new(
        record: FunctionRecord,
        task_dir: PathBuf,
        opt_dir: Option<PathBuf>,
        code: Option<PreparedCode>,
    ) -> Self {
        Self {
            record: Arc::new(record),
            task_dir,
            opt_dir,
            code: OnceCell::new_with(code),
            idle: IdleEnvironments::default(),
            provisioned: IdleEnvironments::default(),
            retired: AtomicBool::new(false),
        }
    }

    pub(super) fn code_spec(&self) -> CodeSpec {
        CodeSpec {
            key: self.record.code_key(),
            runtime: self.record.runtime.clone(),
            task_dir: self.task_dir.clone(),
            handler: self.record.handler.clone(),
        }
    }

    /// The version this slot runs.
    pub fn version(&self) -> &str {
        &self.record.version
    }

    pub(super) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Stops the slot taking environments back and drops the warm ones.
    pub(super) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.idle.clear();
        self.provisioned.clear();
    }
}

/// Where an alias sends invocations.
#[derive(Debug, Clone, PartialEq)]
pub struct AliasRoute {
    /// The version most invocations go to.
    pub primary: String,
    /// Another version and the share (0.0-1.0) of invocations it gets.
    pub additional: Option<(String, f64)>,
}

impl AliasRoute {
    /// The version for one invocation; `roll` is uniform in [0, 1).
    pub fn pick(&self, roll: f64) -> &str {
        match &self.additional {
            Some((version, weight)) if roll < *weight => version,
            _ => &self.primary,
        }
    }
}

/// A function as the data plane knows it.
#[derive(Default)]
pub(super) struct FunctionEntry {
    pub(super) versions: HashMap<String, Arc<FunctionSlot>>,
    pub(super) aliases: HashMap<String, AliasRoute>,
}

impl FunctionEntry {
    /// The slot for a qualifier: `None` is `$LATEST`; an alias routes with
    /// `roll`.
    pub(super) fn resolve(&self, qualifier: Option<&str>, roll: f64) -> Option<Arc<FunctionSlot>> {
        let q = qualifier.unwrap_or(LATEST);
        if let Some(slot) = self.versions.get(q) {
            return Some(slot.clone());
        }
        let route = self.aliases.get(q)?;
        self.versions.get(route.pick(roll)).cloned()
    }

    /// The version a qualifier names now (an alias's primary version).
    pub(super) fn version_of(&self, qualifier: &str) -> Option<String> {
        if self.versions.contains_key(qualifier) {
            return Some(qualifier.to_owned());
        }
        self.aliases.get(qualifier).map(|r| r.primary.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_routing_follows_the_roll() {
        let r = AliasRoute {
            primary: "1".into(),
            additional: Some(("2".into(), 0.25)),
        };
        assert_eq!(r.pick(0.0), "2");
        assert_eq!(r.pick(0.2499), "2");
        assert_eq!(r.pick(0.25), "1");
        assert_eq!(r.pick(0.99), "1");
        let plain = AliasRoute {
            primary: "3".into(),
            additional: None,
        };
        assert_eq!(plain.pick(0.0), "3");
    }
}
