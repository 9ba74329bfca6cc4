//! What the control plane stores about a function, and how it looks on the
//! wire (botocore's `FunctionConfiguration`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The version every function has: its mutable head.
pub const LATEST: &str = "$LATEST";

fn latest() -> String {
    LATEST.to_owned()
}

/// One version of a function as stored: `$LATEST` (mutable, one per
/// function) or a published version (an immutable copy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// The function's name.
    pub name: String,
    /// `$LATEST` or the version number.
    #[serde(default = "latest")]
    pub version: String,
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
    /// Unpacked size of the archive.
    #[serde(default)]
    pub code_unzipped_size: u64,
    /// Layers, in the order they are merged into `/opt`.
    #[serde(default)]
    pub layers: Vec<LayerRef>,
    /// Changes on every update; callers may make updates conditional on it.
    pub revision_id: String,
    /// Time of the last change, in Lambda's format.
    pub last_modified: String,
    /// Tags (kept on `$LATEST`; they belong to the function).
    pub tags: BTreeMap<String, String>,
    /// The highest version number ever published (kept on `$LATEST`;
    /// numbers are never reused).
    #[serde(default)]
    pub last_version: u64,
    /// Reserved concurrency (kept on `$LATEST`; it belongs to the function).
    #[serde(default)]
    pub reserved_concurrency: Option<u32>,
    /// On a published version: the [`FunctionRecord::fingerprint`] of the
    /// `$LATEST` it was published from.
    #[serde(default)]
    pub published_from: Option<String>,
    /// `LoggingConfig`: how the function's log lines are written.
    #[serde(default)]
    pub logging: LogSettings,
}

/// A function's `LoggingConfig` as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSettings {
    /// `LogFormat: JSON`; Text otherwise.
    #[serde(default)]
    pub json: bool,
    /// Function lines below this level are dropped (JSON only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_level: Option<LogLevel>,
    /// Platform records below this level are dropped (JSON only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_level: Option<LogLevel>,
    /// `LogGroup`, when the caller named one other than the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_group: Option<String>,
}

impl LogSettings {
    /// The application level in force: INFO unless set (JSON only).
    pub fn application_level(&self) -> LogLevel {
        self.application_level.unwrap_or(LogLevel::Info)
    }

    /// The system level in force: INFO unless set (JSON only).
    pub fn system_level(&self) -> LogLevel {
        self.system_level.unwrap_or(LogLevel::Info)
    }
}

/// Lambda's log levels, least severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Fatal,
}

impl LogLevel {
    /// The wire name (`INFO`).
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "TRACE",
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warn => "WARN",
            LogLevel::Error => "ERROR",
            LogLevel::Fatal => "FATAL",
        }
    }

    /// A level as functions and callers spell it (any case; `WARNING` is
    /// `WARN`, `CRITICAL` is `FATAL`, as Python's logging names them).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "TRACE" => LogLevel::Trace,
            "DEBUG" => LogLevel::Debug,
            "INFO" => LogLevel::Info,
            "WARN" | "WARNING" => LogLevel::Warn,
            "ERROR" => LogLevel::Error,
            "FATAL" | "CRITICAL" => LogLevel::Fatal,
            _ => return None,
        })
    }
}

/// A layer version a function uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// `arn:aws:lambda:<region>:<account>:layer:<name>:<version>`.
    pub arn: String,
    /// Archive size.
    pub code_size: u64,
    /// Unpacked size.
    pub unzipped_size: u64,
    /// Hex SHA-256 of the archive.
    pub sha256_hex: String,
}

impl FunctionRecord {
    /// Whether this is the mutable `$LATEST`.
    pub fn is_latest(&self) -> bool {
        self.version == LATEST
    }

    /// What makes `$LATEST` unchanged for `PublishVersion`: code and
    /// configuration.
    pub fn fingerprint(&self) -> String {
        serde_json::json!([
            self.code_sha256_hex,
            self.description,
            self.runtime,
            self.role,
            self.handler,
            self.timeout,
            self.memory_size,
            self.ephemeral_storage,
            self.environment,
            self.architectures,
            self.layers.iter().map(|l| &l.arn).collect::<Vec<_>>(),
            // Only when set, so records stored before it keep their
            // fingerprint.
            (self.logging != LogSettings::default()).then_some(&self.logging),
        ])
        .to_string()
    }

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

    /// The ARN that names kiln's built-in destination queue in a
    /// `DestinationConfig`.
    pub fn builtin_queue_arn(&self) -> String {
        format!("arn:aws:sqs:{}:{}:kiln-dlq", self.region, self.account_id)
    }

    /// `arn:aws:lambda:<region>:<account>:layer:<name>`.
    pub fn layer_arn(&self, name: &str) -> String {
        format!(
            "arn:aws:lambda:{}:{}:layer:{name}",
            self.region, self.account_id
        )
    }

    /// A layer version's ARN.
    pub fn layer_version_arn(&self, name: &str, version: u64) -> String {
        format!("{}:{version}", self.layer_arn(name))
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerResponse>,
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

/// A layer in a configuration response.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct LayerResponse {
    pub arn: String,
    pub code_size: u64,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application_log_level: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_log_level: Option<&'static str>,
    pub log_group: String,
}

impl FunctionConfiguration {
    /// The wire form of a stored record. A published version's ARN always
    /// carries its number; `$LATEST`'s only when the caller named it.
    pub fn from_record(r: &FunctionRecord, arn: &ArnContext, qualified: bool) -> Self {
        Self {
            function_name: r.name.clone(),
            function_arn: if qualified || !r.is_latest() {
                arn.qualified_arn(&r.name, &r.version)
            } else {
                arn.function_arn(&r.name)
            },
            runtime: r.runtime.clone(),
            role: r.role.clone(),
            handler: r.handler.clone(),
            code_size: r.code_size,
            description: r.description.clone(),
            timeout: r.timeout,
            memory_size: r.memory_size,
            last_modified: r.last_modified.clone(),
            code_sha256: r.code_sha256.clone(),
            version: r.version.clone(),
            environment: (!r.environment.is_empty()).then(|| EnvironmentResponse {
                variables: r.environment.clone(),
            }),
            layers: r
                .layers
                .iter()
                .map(|l| LayerResponse {
                    arn: l.arn.clone(),
                    code_size: l.code_size,
                })
                .collect(),
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
                log_format: if r.logging.json { "JSON" } else { "Text" },
                application_log_level: r
                    .logging
                    .json
                    .then(|| r.logging.application_level().as_str()),
                system_log_level: r.logging.json.then(|| r.logging.system_level().as_str()),
                log_group: r
                    .logging
                    .log_group
                    .clone()
                    .unwrap_or_else(|| format!("/aws/lambda/{}", r.name)),
            },
        }
    }
}

/// An alias: a name for one version, or for two with weighted routing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliasRecord {
    /// The alias's name.
    pub name: String,
    /// The version it points to.
    pub function_version: String,
    /// Free text.
    pub description: String,
    /// Other versions and the share of invocations they get (0.0-1.0).
    pub additional_weights: BTreeMap<String, f64>,
    /// Changes on every update.
    pub revision_id: String,
}

/// botocore's `AliasConfiguration`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AliasConfiguration {
    pub alias_arn: String,
    pub name: String,
    pub function_version: String,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing_config: Option<RoutingConfig>,
    pub revision_id: String,
}

/// `AliasRoutingConfiguration`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct RoutingConfig {
    #[serde(default)]
    pub additional_version_weights: BTreeMap<String, f64>,
}

impl AliasConfiguration {
    /// The wire form of an alias of function `function`.
    pub fn from_record(function: &str, a: &AliasRecord, arn: &ArnContext) -> Self {
        Self {
            alias_arn: arn.qualified_arn(function, &a.name),
            name: a.name.clone(),
            function_version: a.function_version.clone(),
            description: a.description.clone(),
            routing_config: (!a.additional_weights.is_empty()).then(|| RoutingConfig {
                additional_version_weights: a.additional_weights.clone(),
            }),
            revision_id: a.revision_id.clone(),
        }
    }
}

/// A published layer version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerVersionRecord {
    /// The layer's name.
    pub name: String,
    /// Its version number.
    pub version: u64,
    /// Free text.
    pub description: String,
    /// Lambda's `CreatedDate`.
    pub created_date: String,
    /// Runtimes the publisher declared.
    pub compatible_runtimes: Vec<String>,
    /// Architectures the publisher declared.
    pub compatible_architectures: Vec<String>,
    /// License text or SPDX id.
    pub license_info: Option<String>,
    /// Hex SHA-256 of the archive.
    pub sha256_hex: String,
    /// Base64 SHA-256.
    pub sha256_base64: String,
    /// Archive size.
    pub code_size: u64,
    /// Unpacked size.
    pub unzipped_size: u64,
}

/// A resource policy: Lambda's policy document, built from statements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PolicyRecord {
    /// The statements, as Lambda renders them (`Sid`, `Effect`,
    /// `Principal`, `Action`, `Resource`, `Condition`).
    pub statements: Vec<serde_json::Value>,
    /// Changes on every change.
    pub revision_id: String,
}

impl PolicyRecord {
    /// The policy document as `GetPolicy` returns it (a JSON string).
    pub fn document(&self) -> String {
        serde_json::json!({
            "Version": "2012-10-17",
            "Id": "default",
            "Statement": self.statements,
        })
        .to_string()
    }
}

/// A provisioned concurrency configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionedRecord {
    /// The qualifier it applies to (a version or an alias).
    pub qualifier: String,
    /// Environments asked for.
    pub requested: u32,
    /// When it was set, Lambda's format.
    pub last_modified: String,
}

/// A function's (or qualifier's) asynchronous invocation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EventInvokeRecord {
    /// The qualifier (`$LATEST`, a version or an alias).
    pub qualifier: String,
    /// Retries after a function error (0-2; default 2).
    pub maximum_retry_attempts: Option<u32>,
    /// Oldest an event may get before it is dropped, in seconds.
    pub maximum_event_age_in_seconds: Option<u32>,
    /// Where records of successes go.
    pub on_success: Option<String>,
    /// Where records of failures go.
    pub on_failure: Option<String>,
    /// Seconds since the epoch.
    pub last_modified: f64,
}

/// RFC 3339 in UTC with milliseconds, `2024-05-01T12:00:00.123Z`: the
/// times of kiln's own records (keys, roles, audit trail, configuration
/// history).
pub const RFC3339_MILLIS: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
);

/// The current time in [`RFC3339_MILLIS`].
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(RFC3339_MILLIS)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
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
