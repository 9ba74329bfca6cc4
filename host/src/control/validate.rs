//! Field checks against the constraints of botocore's Lambda model, with
//! Lambda's own wording so that error messages read as users know them.

use std::collections::BTreeMap;

use super::ControlError;
use super::names::pattern_error;

/// Environment variable names a function may not set: the platform sets them.
pub const RESERVED_ENV: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_DEFAULT_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_REGION",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "LAMBDA_RUNTIME_DIR",
    "LAMBDA_TASK_ROOT",
];

fn range_error(field: &str, value: i64, min: i64, max: i64) -> Option<ControlError> {
    let constraint = if value < min {
        format!("Member must have value greater than or equal to {min}")
    } else if value > max {
        format!("Member must have value less than or equal to {max}")
    } else {
        return None;
    };
    Some(ControlError::Validation(format!(
        "1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: {constraint}"
    )))
}

/// MemorySize: 128 to 10240 MB.
pub fn memory_size(v: i64) -> Result<u32, ControlError> {
    range_error("memorySize", v, 128, 10240).map_or(Ok(v as u32), Err)
}

/// Timeout: 1 to 900 seconds.
pub fn timeout(v: i64) -> Result<u32, ControlError> {
    range_error("timeout", v, 1, 900).map_or(Ok(v as u32), Err)
}

/// EphemeralStorage.Size: 512 to 10240 MB.
pub fn ephemeral_storage(v: i64) -> Result<u32, ControlError> {
    range_error("ephemeralStorage.size", v, 512, 10240).map_or(Ok(v as u32), Err)
}

/// Description: at most 256 characters.
pub fn description(v: &str) -> Result<(), ControlError> {
    if v.chars().count() > 256 {
        return Err(ControlError::Validation(
            "1 validation error detected: Value at 'description' failed to satisfy constraint: \
             Member must have length less than or equal to 256"
                .to_owned(),
        ));
    }
    Ok(())
}

/// `LoggingConfig`, applied over `current`: the format, the levels (JSON
/// only, as in Lambda) and the log group's name.
pub fn logging(
    input: &super::requests::LoggingConfigInput,
    current: &super::model::LogSettings,
) -> Result<super::model::LogSettings, ControlError> {
    use super::model::LogLevel;
    let enum_error = |field: &str, value: &str, allowed: &str| {
        ControlError::Validation(format!(
            "1 validation error detected: Value '{value}' at 'loggingConfig.{field}' failed to \
             satisfy constraint: Member must satisfy enum value set: [{allowed}]"
        ))
    };
    let mut out = current.clone();
    if let Some(format) = &input.log_format {
        out.json = match format.as_str() {
            "JSON" => true,
            "Text" => false,
            other => return Err(enum_error("logFormat", other, "JSON, Text")),
        };
    }
    let application = match input.application_log_level.as_deref() {
        Some("TRACE") => Some(LogLevel::Trace),
        Some("DEBUG") => Some(LogLevel::Debug),
        Some("INFO") => Some(LogLevel::Info),
        Some("WARN") => Some(LogLevel::Warn),
        Some("ERROR") => Some(LogLevel::Error),
        Some("FATAL") => Some(LogLevel::Fatal),
        Some(v) => {
            return Err(enum_error(
                "applicationLogLevel",
                v,
                "TRACE, DEBUG, INFO, WARN, ERROR, FATAL",
            ));
        }
        None => None,
    };
    let system = match input.system_log_level.as_deref() {
        Some("DEBUG") => Some(LogLevel::Debug),
        Some("INFO") => Some(LogLevel::Info),
        Some("WARN") => Some(LogLevel::Warn),
        Some(v) => return Err(enum_error("systemLogLevel", v, "DEBUG, INFO, WARN")),
        None => None,
    };
    if !out.json && (application.is_some() || system.is_some()) {
        return Err(ControlError::InvalidParameter(
            "ApplicationLogLevel and SystemLogLevel need LogFormat JSON: set \
             LoggingConfig.LogFormat to JSON, or leave the levels out"
                .to_owned(),
        ));
    }
    if out.json {
        out.application_level = application.or(out.application_level);
        out.system_level = system.or(out.system_level);
    } else {
        out.application_level = None;
        out.system_level = None;
    }
    if let Some(group) = &input.log_group {
        let ok = (1..=512).contains(&group.len())
            && group
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/#".contains(c));
        if !ok {
            return Err(pattern_error(
                "loggingConfig.logGroup",
                group,
                "[\\.\\-_/#A-Za-z0-9]+ (1 to 512 characters)",
            ));
        }
        out.log_group = Some(group.clone());
    }
    Ok(out)
}

/// Handler: 1 to 128 non-whitespace characters.
pub fn handler(v: &str) -> Result<(), ControlError> {
    if v.is_empty() || v.len() > 128 || v.chars().any(char::is_whitespace) {
        return Err(pattern_error(
            "handler",
            v,
            "[^\\s]+ (at most 128 characters)",
        ));
    }
    Ok(())
}

/// Role: an IAM role ARN.
pub fn role(v: &str) -> Result<(), ControlError> {
    const PATTERN: &str = "arn:(aws[a-zA-Z-]*)?:iam::\\d{12}:role/?[a-zA-Z_0-9+=,.@\\-_/]+";
    let ok = (|| {
        let rest = v.strip_prefix("arn:")?;
        let (partition, rest) = rest.split_once(':')?;
        if !partition.is_empty() && !partition.starts_with("aws") {
            return None;
        }
        let rest = rest.strip_prefix("iam::")?;
        let (account, path) = rest.split_once(':')?;
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let path = path.strip_prefix("role")?;
        let path = path.strip_prefix('/').unwrap_or(path);
        (!path.is_empty()
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@-_/".contains(&b)))
        .then_some(())
    })()
    .is_some();
    if !ok || v.len() > 2048 {
        return Err(pattern_error("role", v, PATTERN));
    }
    Ok(())
}

/// Architectures: kiln runs x86_64.
pub fn architectures(v: &[String]) -> Result<(), ControlError> {
    if v.len() != 1 || v[0] != "x86_64" {
        return Err(ControlError::InvalidParameter(format!(
            "Architectures must be [\"x86_64\"]: kiln runs functions on x86_64 only (got {v:?})"
        )));
    }
    Ok(())
}

/// Environment variables: names `[a-zA-Z]([a-zA-Z0-9_])+`, not reserved,
/// 4 KB in all.
pub fn environment(vars: &BTreeMap<String, String>) -> Result<(), ControlError> {
    for key in vars.keys() {
        let mut bytes = key.bytes();
        let ok = key.len() >= 2
            && bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(pattern_error(
                "environment.variables",
                key,
                "[a-zA-Z]([a-zA-Z0-9_])+",
            ));
        }
    }
    let reserved: Vec<&str> = vars
        .keys()
        .filter(|k| RESERVED_ENV.contains(&k.as_str()))
        .map(String::as_str)
        .collect();
    if !reserved.is_empty() {
        return Err(ControlError::InvalidParameter(format!(
            "Lambda was unable to configure your environment variables because the environment \
             variables you have provided contains reserved keys that are currently not supported \
             for modification. Reserved keys used in this request: {}",
            reserved.join(", ")
        )));
    }
    let measured = serde_json::to_string(vars).unwrap_or_default();
    if measured.len() > 4096 {
        return Err(ControlError::InvalidParameter(format!(
            "Lambda was unable to configure your environment variables because the environment \
             variables you have provided exceeded the 4KB limit. String measured: {} bytes",
            measured.len()
        )));
    }
    Ok(())
}

/// Tags: at most 50, keys 1-128 and values 0-256 characters.
pub fn tags(tags: &BTreeMap<String, String>) -> Result<(), ControlError> {
    if tags.len() > 50 {
        return Err(ControlError::InvalidParameter(format!(
            "A function may have at most 50 tags; {} were given",
            tags.len()
        )));
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 || v.chars().count() > 256 {
            return Err(ControlError::InvalidParameter(format!(
                "Tag {k:?}: keys must have 1 to 128 characters and values at most 256"
            )));
        }
        for (what, text) in [("key", k), ("value", v)] {
            if let Some(c) = text.chars().find(|&c| !tag_char(c)) {
                return Err(ControlError::InvalidParameter(format!(
                    "Tag {k:?}: the {what} has the character {c:?}; tags may hold letters, \
                     digits, spaces and _ . : / = + - @ only"
                )));
            }
        }
        if k.starts_with("aws:") {
            return Err(ControlError::InvalidParameter(format!(
                "Tag {k:?}: the prefix aws: is reserved"
            )));
        }
    }
    Ok(())
}

/// AWS's tag alphabet: `[\p{L}\p{Z}\p{N}_.:/=+\-@]`.
fn tag_char(c: char) -> bool {
    c.is_alphanumeric() || c == ' ' || c == '\u{a0}' || "_.:/=+-@".contains(c) || {
        // \p{Z}: the Unicode space separators beyond the two above.
        matches!(
            c,
            '\u{1680}' | '\u{2000}'
                ..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(memory_size(128).unwrap(), 128);
        assert_eq!(memory_size(10240).unwrap(), 10240);
        let e = memory_size(127).unwrap_err().to_string();
        assert!(e.contains("greater than or equal to 128"), "{e}");
        assert!(memory_size(10241).is_err());
        assert!(timeout(0).is_err());
        assert!(timeout(901).is_err());
        assert_eq!(timeout(900).unwrap(), 900);
        assert!(ephemeral_storage(511).is_err());
    }

    #[test]
    fn roles() {
        role("arn:aws:iam::000000000000:role/kiln-function").unwrap();
        role("arn:aws:iam::123456789012:role/service-role/x_y+z=,.@-").unwrap();
        for bad in [
            "",
            "role",
            "arn:aws:iam::123:role/x",
            "arn:aws:iam::000000000000:user/x",
        ] {
            assert!(role(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn environment_rules() {
        let vars = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect()
        };
        environment(&vars(&[("GREETING", "hi"), ("A1_B", "")])).unwrap();
        assert!(matches!(
            environment(&vars(&[("1X", "v")])),
            Err(ControlError::Validation(_))
        ));
        assert!(matches!(
            environment(&vars(&[("X", "v")])),
            Err(ControlError::Validation(_))
        ));
        let e = environment(&vars(&[("AWS_REGION", "x")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Reserved keys used in this request: AWS_REGION"),
            "{e}"
        );
        let big = "v".repeat(4100);
        assert!(
            environment(&vars(&[("BIG", &big)]))
                .unwrap_err()
                .to_string()
                .contains("4KB")
        );
    }

    #[test]
    fn tags_hold_awss_alphabet_only() {
        let one = |k: &str, v: &str| -> BTreeMap<String, String> {
            [(k.to_owned(), v.to_owned())].into_iter().collect()
        };
        tags(&one("team", "a b_c.d:e/f=g+h-i@j")).unwrap();
        tags(&one("équipe", "日本 ٣")).unwrap();
        for (k, v) in [
            ("a\"b", "v"),
            ("k", "x;y"),
            ("k", "nul\0"),
            ("k\n", "v"),
            ("k", "<b>"),
        ] {
            let e = tags(&one(k, v)).unwrap_err().to_string();
            assert!(e.contains("letters, digits, spaces"), "{k:?}={v:?}: {e}");
        }
        assert!(tags(&one("aws:x", "v")).is_err());
    }

    #[test]
    fn handlers() {
        handler("function.wasm").unwrap();
        assert!(handler("has space").is_err());
        assert!(handler("").is_err());
    }
}
