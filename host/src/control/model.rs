//! What the control plane stores about a function, and how it looks on the
//! wire (botocore's `FunctionConfiguration`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The version every function has: its mutable head.
pub const LATEST: &str = "$LATEST";

/// One function as stored: the configuration of its `$LATEST`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// The function's name.
    pub name: String,
    /// The runtime identifier (`wasip2`, ...).
    pub runtime: String,
    /// The execution role ARN.
    pub role: String,
    /// For `wasip2`: the component's path inside the archive.
    pub handler: String,
    /// Free text, at most 256 characters.
    pub description: String,
    /// Seconds an invocation may run.
    pub timeout: u32,
    /// MiB of memory.
    pub memory_size: u32,
    /// MiB of `/tmp`.
    pub ephemeral_storage: u32,
    /// The function's own environment variables.
    pub environment: BTreeMap<String, String>,
    /// Instruction set.
    pub architectures: Vec<String>,
    /// Hex SHA-256 of the code archive (its name in the artifact store).
    pub code_sha256_hex: String,
    /// Base64 SHA-256 of the code archive (`CodeSha256`).
    pub code_sha256: String,
    /// Archive size in bytes.
    pub code_size: u64,
    /// Changes on every update; callers may make updates conditional on it.
    pub revision_id: String,
    /// Time of the last change, in Lambda's format.
    pub last_modified: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
}

impl FunctionRecord {
    /// The key under which this record's compiled code is cached: one per
    /// archive and component path.
    pub fn code_key(&self) -> String {
        let digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            format!("{}\0{}", self.code_sha256_hex, self.handler).as_bytes(),
        );
        crate::store::artifacts::hex(digest.as_ref())
    }
}

/// Region and account that ARNs are built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArnContext {
    /// e.g. `us-east-1`.
    pub region: String,
    /// Twelve digits.
    pub account_id: String,
}

impl ArnContext {
    /// `arn:aws:lambda:<region>:<account>:function:<name>`.
    pub fn function_arn(&self, name: &str) -> String {
        format!(
            "arn:aws:lambda:{}:{}:function:{name}",
            self.region, self.account_id
        )
    }

    /// The function ARN with a qualifier.
    pub fn qualified_arn(&self, name: &str, qualifier: &str) -> String {
        format!("{}:{qualifier}", self.function_arn(name))
    }
}

/// botocore's `FunctionConfiguration`, as every function operation returns it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionConfiguration {
    pub function_name: String,
    pub function_arn: String,
    pub runtime: String,
    pub role: String,
    pub handler: String,
    pub code_size: u64,
    pub description: String,
    pub timeout: u32,
    pub memory_size: u32,
    pub last_modified: String,
    pub code_sha256: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<EnvironmentResponse>,
    pub tracing_config: TracingConfig,
    pub revision_id: String,
    pub state: &'static str,
    pub last_update_status: &'static str,
    pub package_type: &'static str,
    pub architectures: Vec<String>,
    pub ephemeral_storage: EphemeralStorage,
    pub logging_config: LoggingConfig,
}

/// `Environment` in a configuration response.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct EnvironmentResponse {
    pub variables: BTreeMap<String, String>,
}

/// `TracingConfig`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TracingConfig {
    pub mode: &'static str,
}

/// `EphemeralStorage`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EphemeralStorage {
    pub size: u32,
}

/// `LoggingConfig`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct LoggingConfig {
    pub log_format: &'static str,
    pub log_group: String,
}

impl FunctionConfiguration {
    /// The wire form of a stored record.
    pub fn from_record(r: &FunctionRecord, arn: &ArnContext) -> Self {
        Self {
            function_name: r.name.clone(),
            function_arn: arn.function_arn(&r.name),
            runtime: r.runtime.clone(),
            role: r.role.clone(),
            handler: r.handler.clone(),
            code_size: r.code_size,
            description: r.description.clone(),
            timeout: r.timeout,
            memory_size: r.memory_size,
            last_modified: r.last_modified.clone(),
            code_sha256: r.code_sha256.clone(),
            version: LATEST.to_owned(),
            environment: (!r.environment.is_empty()).then(|| EnvironmentResponse {
                variables: r.environment.clone(),
            }),
            tracing_config: TracingConfig {
                mode: "PassThrough",
            },
            revision_id: r.revision_id.clone(),
            state: "Active",
            last_update_status: "Successful",
            package_type: "Zip",
            architectures: r.architectures.clone(),
            ephemeral_storage: EphemeralStorage {
                size: r.ephemeral_storage,
            },
            logging_config: LoggingConfig {
                log_format: "Text",
                log_group: format!("/aws/lambda/{}", r.name),
            },
        }
    }
}

/// Lambda's `LastModified` format: `2024-05-01T12:00:00.123+0000`.
pub fn now_last_modified() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]+0000"
    );
    now.format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000+0000".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_modified_has_lambdas_shape() {
        let s = now_last_modified();
        assert_eq!(s.len(), 28, "{s}");
        assert!(s.ends_with("+0000"));
        assert_eq!(&s[10..11], "T");
    }

    #[test]
    fn arns() {
        let a = ArnContext {
            region: "us-east-1".into(),
            account_id: "000000000000".into(),
        };
        assert_eq!(
            a.qualified_arn("f", "$LATEST"),
            "arn:aws:lambda:us-east-1:000000000000:function:f:$LATEST"
        );
    }
}
