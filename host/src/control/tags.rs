//! Tags on functions: `TagResource`, `UntagResource`, `ListTags`, by ARN.

use std::collections::BTreeMap;

use super::model::FunctionRecord;
use super::{ControlError, ControlPlane, validate};
use crate::store::meta::Kind;

impl ControlPlane {
    /// The function an (unqualified) function ARN names.
    fn tagged_function(&self, arn: &str) -> Result<String, ControlError> {
        if !arn.starts_with("arn:") {
            return Err(super::names::pattern_error(
                "resource",
                arn,
                "arn:aws:lambda:<region>:<account>:function:<name>",
            ));
        }
        let r = super::names::parse_function_ref(arn, &self.arn)?;
        if r.qualifier.is_some() {
            return Err(ControlError::InvalidParameter(format!(
                "Tags are kept on functions, not on versions or aliases: use the unqualified \
                 function ARN instead of {arn}"
            )));
        }
        Ok(r.name)
    }

    /// `ListTags`.
    pub async fn list_tags(&self, arn: &str) -> Result<BTreeMap<String, String>, ControlError> {
        let name = self.tagged_function(arn)?;
        Ok(self.latest(&name).await?.tags)
    }

    /// `TagResource`: adds or replaces tags.
    pub async fn tag_resource(
        &self,
        arn: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<(), ControlError> {
        let name = self.tagged_function(arn)?;
        let _guard = self.writes.lock().await;
        let n = name.clone();
        self.write(move |d| {
            let mut record: FunctionRecord = d
                .get(Kind::Function, "", &n)?
                .ok_or_else(|| ControlError::NotFound(format!("Function not found: {n}")))?;
            record.tags.extend(tags);
            validate::tags(&record.tags)?;
            d.put(Kind::Function, "", &n, &record)?;
            Ok(())
        })
        .await
        .map_err(|e| match e {
            ControlError::NotFound(_) => ControlError::NotFound(format!(
                "Function not found: {}",
                self.arn.function_arn(&name)
            )),
            other => other,
        })
    }

    /// `UntagResource`.
    pub async fn untag_resource(&self, arn: &str, keys: Vec<String>) -> Result<(), ControlError> {
        let name = self.tagged_function(arn)?;
        let _guard = self.writes.lock().await;
        let mut record = self.latest(&name).await?;
        for k in &keys {
            record.tags.remove(k);
        }
        self.commit_latest(&record).await
    }
}
