//! Configuration history: every configuration state each function and
//! version has had, with who changed it and when (`kiln config-history`),
//! kept in the metadata store beside the function.
//!
//! A state is recorded by the API gate after a change succeeds, from the
//! `FunctionConfiguration` the change answered with, so the history holds
//! exactly what the caller was told. Deleting a function records a state
//! without configuration; the history outlives the function.

use serde::{Deserialize, Serialize};

use super::{ControlError, ControlPlane};
use crate::store::meta::{Kind, version_key};

/// One change and the state it left.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Change {
    /// When (RFC 3339, UTC).
    pub time: String,
    /// Who (principal ARN).
    pub principal: String,
    /// What (`UpdateFunctionConfiguration`, ...).
    pub action: String,
    /// The qualifier named, if any.
    pub qualifier: Option<String>,
    /// The configuration afterwards; `None` once deleted.
    pub configuration: Option<serde_json::Value>,
}

impl ControlPlane {
    /// Appends a change to `function`'s history.
    pub async fn record_change(&self, function: &str, change: Change) -> Result<(), ControlError> {
        let function = function.to_owned();
        self.write(move |d| {
            let next = d
                .list::<Change>(Kind::History, &function, None, usize::MAX)?
                .last()
                .and_then(|(k, _)| k.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            d.insert(Kind::History, &function, &version_key(next), &change)?;
            Ok(())
        })
        .await
    }

    /// Every recorded state of `function`, oldest first.
    pub async fn history(&self, function: &str) -> Result<Vec<Change>, ControlError> {
        let function = function.to_owned();
        let changes = self
            .read(move |d| Ok(d.list::<Change>(Kind::History, &function, None, usize::MAX)?))
            .await?;
        Ok(changes.into_iter().map(|(_, c)| c).collect())
    }
}
