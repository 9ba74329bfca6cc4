//! Function names as callers write them: a name, `name:qualifier`, a partial
//! ARN (`123456789012:function:name`) or a full ARN, with or without a
//! qualifier, after botocore's `FunctionName` pattern.

use super::ControlError;
use super::model::ArnContext;

/// A resolved reference to a function, and the version or alias the caller
/// named, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionRef {
    /// The function's name.
    pub name: String,
    /// `$LATEST`, a version number or an alias name.
    pub qualifier: Option<String>,
}

const NAME_PATTERN: &str = "(arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}(-gov)?-[a-z]+-\\d{1}:)?(\\d{12}:)?(function:)?([a-zA-Z0-9-_]+)(:(\\$LATEST|[a-zA-Z0-9-_]+))?";

/// Whether `s` is a bare function name: 1-64 of `[a-zA-Z0-9-_]`.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `s` is a valid qualifier: `$LATEST` or 1-128 of `[a-zA-Z0-9-_]`.
pub fn is_valid_qualifier(s: &str) -> bool {
    s == "$LATEST"
        || (!s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

/// Lambda's message for a value that does not match a pattern.
pub fn pattern_error(field: &str, value: &str, pattern: &str) -> ControlError {
    ControlError::Validation(format!(
        "1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: \
         Member must satisfy regular expression pattern: {pattern}"
    ))
}

/// Parses a `FunctionName` as given to any function operation. An ARN must
/// name this server's region and account.
pub fn parse_function_ref(input: &str, arn: &ArnContext) -> Result<FunctionRef, ControlError> {
    let invalid = || pattern_error("functionName", input, NAME_PATTERN);
    if input.is_empty() || input.len() > 170 {
        return Err(ControlError::Validation(format!(
            "1 validation error detected: Value '{input}' at 'functionName' failed to satisfy \
             constraint: Member must have length between 1 and 170"
        )));
    }
    let mut parts: Vec<&str> = input.split(':').collect();
    let mut region = None;
    let mut account = None;

    if parts[0] == "arn" {
        // arn:<partition>:lambda:<region>:<account>:function:<name>[:<qualifier>]
        if parts.len() < 7 || !parts[1].starts_with("aws") || parts[2] != "lambda" {
            return Err(invalid());
        }
        region = Some(parts[3]);
        account = Some(parts[4]);
        parts.drain(..5);
    } else {
        if parts.len() >= 2 && is_region(parts[0]) {
            region = Some(parts[0]);
            parts.remove(0);
        }
        if parts.len() >= 2 && is_account(parts[0]) {
            account = Some(parts[0]);
            parts.remove(0);
        }
    }
    if parts.len() >= 2 && parts[0] == "function" {
        parts.remove(0);
    } else if account.is_some() || region.is_some() {
        return Err(invalid());
    }
    let (name, qualifier) = match parts.as_slice() {
        [name] => (*name, None),
        [name, qualifier] => (*name, Some(*qualifier)),
        _ => return Err(invalid()),
    };
    if !is_valid_name(name) || qualifier.is_some_and(|q| !is_valid_qualifier(q)) {
        return Err(invalid());
    }
    if region.is_some_and(|r| r != arn.region) || account.is_some_and(|a| a != arn.account_id) {
        return Err(ControlError::NotFound(format!(
            "Function not found: {input} (this server serves region {} and account {})",
            arn.region, arn.account_id
        )));
    }
    Ok(FunctionRef {
        name: name.to_owned(),
        qualifier: qualifier.map(str::to_owned),
    })
}

fn is_region(s: &str) -> bool {
    // [a-z]{2}(-gov)?-[a-z]+-\d
    let mut it = s.split('-');
    let Some(cc) = it.next() else { return false };
    let rest: Vec<&str> = it.collect();
    let (mid, num) = match rest.as_slice() {
        [mid, num] => (*mid, *num),
        ["gov", mid, num] => (*mid, *num),
        _ => return false,
    };
    cc.len() == 2
        && cc.bytes().all(|b| b.is_ascii_lowercase())
        && !mid.is_empty()
        && mid.bytes().all(|b| b.is_ascii_lowercase())
        && num.len() == 1
        && num.bytes().all(|b| b.is_ascii_digit())
}

fn is_account(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ArnContext {
        ArnContext {
            region: "us-east-1".into(),
            account_id: "000000000000".into(),
        }
    }

    fn parse(s: &str) -> Result<FunctionRef, ControlError> {
        parse_function_ref(s, &ctx())
    }

    fn r(name: &str, q: Option<&str>) -> FunctionRef {
        FunctionRef {
            name: name.into(),
            qualifier: q.map(Into::into),
        }
    }

    #[test]
    fn every_form_lambda_accepts() {
        assert_eq!(parse("hello").unwrap(), r("hello", None));
        assert_eq!(parse("hello:$LATEST").unwrap(), r("hello", Some("$LATEST")));
        assert_eq!(parse("hello:prod").unwrap(), r("hello", Some("prod")));
        assert_eq!(
            parse("000000000000:function:hello").unwrap(),
            r("hello", None)
        );
        assert_eq!(
            parse("000000000000:function:hello:7").unwrap(),
            r("hello", Some("7"))
        );
        assert_eq!(parse("function:hello").unwrap(), r("hello", None));
        assert_eq!(
            parse("us-east-1:000000000000:function:hello").unwrap(),
            r("hello", None)
        );
        assert_eq!(
            parse("arn:aws:lambda:us-east-1:000000000000:function:hello").unwrap(),
            r("hello", None)
        );
        assert_eq!(
            parse("arn:aws:lambda:us-east-1:000000000000:function:hello:$LATEST").unwrap(),
            r("hello", Some("$LATEST"))
        );
    }

    #[test]
    fn malformed_names_are_validation_errors() {
        for bad in [
            "",
            "has space",
            "x!",
            "a:b:c",
            "arn:aws:s3:us-east-1:000000000000:function:x",
            "000000000000:hello",
            &"a".repeat(65),
            "hello:bad qualifier",
            "arn:aws:lambda:us-east-1:000000000000:layer:x",
        ] {
            assert!(
                matches!(parse(bad), Err(ControlError::Validation(_))),
                "{bad:?} -> {:?}",
                parse(bad)
            );
        }
    }

    #[test]
    fn other_accounts_and_regions_are_not_found() {
        assert!(matches!(
            parse("arn:aws:lambda:eu-west-1:000000000000:function:hello"),
            Err(ControlError::NotFound(_))
        ));
        assert!(matches!(
            parse("111111111111:function:hello"),
            Err(ControlError::NotFound(_))
        ));
    }

    #[test]
    fn regions() {
        assert!(is_region("us-east-1"));
        assert!(is_region("us-gov-west-1"));
        assert!(!is_region("hello"));
        assert!(!is_region("us-east-12"));
    }
}
