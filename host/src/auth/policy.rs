//! IAM-style policy documents: parsing, and evaluating a request against
//! them the way IAM does for a same-account request.
//!
//! A document is either identity-based (attached to a caller; its
//! statements have no `Principal`) or resource-based (attached to a
//! function, as `AddPermission` writes it; every statement names a
//! `Principal`). [`evaluate`] decides in these steps:
//! 1. a statement applies when its action, resource, principal (resource
//!    policies only) and every condition match the request;
//! 2. an applicable `Deny` in any document is an explicit deny;
//! 3. otherwise an applicable `Allow` in any document allows;
//! 4. otherwise the request is implicitly denied.
//!
//! Threat model: documents come from users. Parsing fails closed: an
//! unknown element, condition operator or principal type is an error rather
//! than something skipped, so a `Deny` can never quietly stop applying.
//! Matching never recurses: the wildcard matcher is an iterative two-pointer
//! scan, O(pattern × text) at worst. JSON nesting is bounded by
//! `serde_json`'s recursion limit and the walk over a parsed document has a
//! fixed depth. Nothing here panics on any input. Limiting a document's size
//! is the caller's job.

use serde_json::{Map, Value};

/// Why a document was refused; each message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The text is not JSON (or nests too deeply).
    #[error("Policy document is not valid JSON: {0}")]
    Json(String),
    /// The top level is not an object.
    #[error("Policy document must be a JSON object with a Statement")]
    NotAnObject,
    /// A top-level element kiln does not know.
    #[error("Policy document has an unknown element {0:?}; use Version, Id and Statement")]
    UnknownElement(String),
    /// `Version` is neither of IAM's two.
    #[error("Version must be \"2012-10-17\" or \"2008-10-17\", not {0}")]
    Version(String),
    /// `Id` is not a string.
    #[error("Id must be a string")]
    Id,
    /// No `Statement`.
    #[error("Policy document has no Statement")]
    NoStatement,
    /// `Statement` is neither an object nor an array.
    #[error("Statement must be an object or an array of objects")]
    StatementShape,
    /// One statement is wrong; `index` counts from 1.
    #[error("Statement {index}: {problem}")]
    Statement {
        /// Which statement, counting from 1.
        index: usize,
        /// What is wrong with it.
        problem: StatementError,
    },
}

/// What is wrong with one statement (reported inside
/// [`PolicyError::Statement`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatementError {
    /// The statement is not an object.
    #[error("must be a JSON object")]
    NotAnObject,
    /// An element kiln does not know.
    #[error(
        "unknown element {0:?}; use Sid, Effect, Principal, Action or NotAction, Resource or \
         NotResource, and Condition"
    )]
    UnknownElement(String),
    /// `Sid` is not a string.
    #[error("Sid must be a string")]
    Sid,
    /// No `Effect`.
    #[error("Effect is missing; give \"Allow\" or \"Deny\"")]
    MissingEffect,
    /// `Effect` is something else (shown as JSON).
    #[error("Effect must be \"Allow\" or \"Deny\", not {0}")]
    Effect(String),
    /// Both or neither of a pair such as `Action` / `NotAction`.
    #[error("give exactly one of {0} or {1}")]
    OneOf(&'static str, &'static str),
    /// A list element that is not a non-empty string or array of them.
    #[error("{0} must be a non-empty string or a non-empty array of non-empty strings")]
    Strings(&'static str),
    /// A `Principal` in an identity-based policy.
    #[error(
        "Principal is not allowed in an identity-based policy (the principal is whoever the \
         policy is attached to)"
    )]
    PrincipalInIdentityPolicy,
    /// No `Principal` in a resource-based policy.
    #[error("a resource-based policy statement needs a Principal")]
    MissingPrincipal,
    /// `NotPrincipal`, which kiln does not evaluate.
    #[error("NotPrincipal is not supported; name the principals in Principal instead")]
    NotPrincipal,
    /// `Principal` is neither `"*"` nor an object.
    #[error(
        "Principal must be \"*\" or an object such as {{\"AWS\": ...}} or {{\"Service\": ...}}"
    )]
    PrincipalShape,
    /// A principal type other than `AWS` and `Service`.
    #[error("Principal type {0:?} is not supported; use \"AWS\" or \"Service\"")]
    PrincipalType(String),
    /// An `AWS` principal that is not `*`, an account id or an ARN.
    #[error("Principal AWS value {0:?} must be \"*\", a 12-digit account id or an ARN")]
    AwsPrincipal(String),
    /// A `Service` principal that is not a service name.
    #[error("Principal Service value {0:?} must be a service name such as \"s3.amazonaws.com\"")]
    ServicePrincipal(String),
    /// `Condition` is not an object of operator objects.
    #[error(
        "Condition must be an object such as {{\"StringEquals\": {{\"aws:SourceAccount\": \"...\"}}}}"
    )]
    ConditionShape,
    /// A condition operator kiln does not know.
    #[error(
        "unknown condition operator {0:?}; use one of IAM's: String(Not)Equals(IgnoreCase), \
         String(Not)Like, Numeric(Not)Equals, NumericLessThan(Equals), \
         NumericGreaterThan(Equals), Date(Not)Equals, DateLessThan(Equals), \
         DateGreaterThan(Equals), Bool, BinaryEquals, (Not)IpAddress, Arn(Not)Equals, \
         Arn(Not)Like or Null, each optionally with IfExists (not Null) and a ForAllValues: \
         or ForAnyValue: prefix"
    )]
    UnknownOperator(String),
    /// A value the operator cannot compare (a number for `Numeric...`, a
    /// date for `Date...`, ...).
    #[error("Condition {operator} {key}: {value:?} is not {expected}")]
    ConditionValue {
        /// The operator, as written.
        operator: String,
        /// The condition key, as written.
        key: String,
        /// The value.
        value: String,
        /// What the operator takes.
        expected: &'static str,
    },
    /// A known operator spelled in the wrong case.
    #[error("condition operator {given:?} must be spelled {expected:?}")]
    OperatorCase {
        /// As written.
        given: String,
        /// As IAM spells it.
        expected: String,
    },
    /// An operator whose body is not an object of condition keys.
    #[error("Condition {0} must be an object of condition keys and values")]
    OperatorShape(String),
    /// Condition values that are not strings (or numbers or booleans).
    #[error("Condition {operator} {key}: values must be a string or a non-empty array of strings")]
    ConditionValues {
        /// The operator, as written.
        operator: String,
        /// The condition key, as written.
        key: String,
    },
}

/// Which side of a request a document sits on; only resource-based
/// statements name principals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Attached to a caller (a user or a role).
    Identity,
    /// Attached to a resource (a function's permissions).
    Resource,
    /// A role's trust policy: like a resource policy, with the role as its
    /// implicit resource (its statements need no `Resource`).
    Trust,
}

/// IAM's policy language versions; both are accepted and evaluated alike
/// (kiln has no policy variables, the only difference between them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyVersion {
    /// `2012-10-17`, the current one.
    V2012_10_17,
    /// `2008-10-17`, still written by older tools.
    V2008_10_17,
}

/// A parsed policy document. Built only by parsing, so its statements
/// always fit its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDocument {
    kind: PolicyKind,
    version: Option<PolicyVersion>,
    id: Option<String>,
    statements: Vec<Statement>,
}

/// Whether an applicable statement grants or refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Grants, unless something denies.
    Allow,
    /// Refuses, whatever else allows.
    Deny,
}

/// The patterns of `Action` / `Resource` or, negated, of `NotAction` /
/// `NotResource`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patterns {
    /// True for `NotAction` / `NotResource`: matches what no pattern
    /// matches.
    pub negated: bool,
    /// Wildcard patterns (`*` any run, `?` one character).
    pub patterns: Vec<String>,
}

/// Who a resource-based statement is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// `"*"`: everyone, services included.
    Anyone,
    /// `{"AWS": ..., "Service": ...}`: any of the listed.
    Listed {
        /// IAM identities.
        aws: Vec<AwsPrincipal>,
        /// Service names such as `s3.amazonaws.com`.
        services: Vec<String>,
    },
}

/// One `AWS` principal value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AwsPrincipal {
    /// `"*"`: everyone.
    Anyone,
    /// An account id, or `arn:aws:iam::<id>:root`: every identity of it.
    Account(String),
    /// One identity; a role's ARN also covers its sessions.
    Arn(String),
}

/// The condition operators kiln evaluates (IAM's); others are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionOperator {
    /// Exact, case-sensitive.
    StringEquals,
    /// Negation of `StringEquals`.
    StringNotEquals,
    /// Exact, ignoring case.
    StringEqualsIgnoreCase,
    /// Negation of `StringEqualsIgnoreCase`.
    StringNotEqualsIgnoreCase,
    /// Case-sensitive with `*` and `?`.
    StringLike,
    /// Negation of `StringLike`.
    StringNotLike,
    /// Numbers, equal.
    NumericEquals,
    /// Negation of `NumericEquals`.
    NumericNotEquals,
    /// The request's number is less than the policy's.
    NumericLessThan,
    /// ... less than or equal.
    NumericLessThanEquals,
    /// ... greater than.
    NumericGreaterThan,
    /// ... greater than or equal.
    NumericGreaterThanEquals,
    /// Instants (ISO 8601 or epoch seconds), equal.
    DateEquals,
    /// Negation of `DateEquals`.
    DateNotEquals,
    /// The request's instant is before the policy's.
    DateLessThan,
    /// ... at or before.
    DateLessThanEquals,
    /// ... after.
    DateGreaterThan,
    /// ... at or after.
    DateGreaterThanEquals,
    /// `true` / `false`, ignoring case.
    Bool,
    /// Base64 of bytes, equal.
    BinaryEquals,
    /// The request's address is in one of the policy's CIDR ranges.
    IpAddress,
    /// Negation of `IpAddress`.
    NotIpAddress,
    /// ARN match, component by component, wildcards allowed.
    ArnEquals,
    /// Same as `ArnEquals` (IAM treats them alike).
    ArnLike,
    /// Negation of `ArnEquals`.
    ArnNotEquals,
    /// Negation of `ArnLike`.
    ArnNotLike,
    /// `true`: the key is absent; `false`: it is present.
    Null,
}

/// How a condition treats a key with several values in the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetOperator {
    /// `ForAllValues:`: every value of the request's key matches (true when
    /// the key is absent).
    ForAllValues,
    /// `ForAnyValue:`: at least one value matches (false when absent).
    ForAnyValue,
}

/// One key of one condition operator: `{"<operator>": {"<key>": values}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// How values are compared.
    pub operator: ConditionOperator,
    /// `ForAllValues:` / `ForAnyValue:`, if given.
    pub set: Option<SetOperator>,
    /// `...IfExists`: a missing key counts as a match.
    pub if_exists: bool,
    /// The context key, compared case-insensitively.
    pub key: String,
    /// Any of these may match (OR).
    pub values: Vec<String>,
}

/// One statement of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The statement's id, for explanations.
    pub sid: Option<String>,
    /// Allow or deny.
    pub effect: Effect,
    /// `Action` or `NotAction` (matched case-insensitively).
    pub actions: Patterns,
    /// `Resource` or `NotResource` (matched case-sensitively).
    pub resources: Patterns,
    /// Present exactly in resource-based documents.
    pub principal: Option<Principal>,
    /// All must hold (AND).
    pub conditions: Vec<Condition>,
}

/// What is asked, by whom.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    /// The caller: a user, role session or root ARN.
    pub principal_arn: &'a str,
    /// The caller's account (the same as the resource's: kiln evaluates
    /// same-account requests).
    pub account: &'a str,
    /// Set when a service calls on its own behalf (`s3.amazonaws.com`);
    /// then only `Service` principals and `*` match it.
    pub service: Option<&'a str>,
    /// `lambda:InvokeFunction`, ...
    pub action: &'a str,
    /// The resource's ARN.
    pub resource: &'a str,
    /// Context keys and values (`("aws:SourceArn", "arn:...")`); a key given
    /// more than once has several values.
    pub conditions: &'a [(&'a str, &'a str)],
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// An applicable statement allows and none denies.
    Allow,
    /// An applicable statement denies.
    ExplicitDeny,
    /// Nothing applicable allows.
    ImplicitDeny,
}

/// Which document a deciding statement came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySource {
    /// The identity-based document at this index of `identity`.
    Identity(usize),
    /// The resource-based document.
    Resource,
}

/// The statement that decided, so an error can point at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecidingStatement<'p> {
    /// Which document.
    pub source: PolicySource,
    /// The statement's index in that document, from 0.
    pub index: usize,
    /// The statement's `Sid`, if it has one.
    pub sid: Option<&'p str>,
}

/// A decision and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Explanation<'p> {
    /// The outcome.
    pub decision: Decision,
    /// The first applicable deny, else the first applicable allow; `None`
    /// for an implicit deny.
    pub statement: Option<DecidingStatement<'p>>,
}

const STATEMENT_ELEMENTS: [&str; 9] = [
    "Sid",
    "Effect",
    "Principal",
    "NotPrincipal",
    "Action",
    "NotAction",
    "Resource",
    "NotResource",
    "Condition",
];

impl PolicyDocument {
    /// Parses a document attached to a caller.
    pub fn parse_identity(json: &str) -> Result<Self, PolicyError> {
        Self::parse(json, PolicyKind::Identity)
    }

    /// Parses a document attached to a resource (what `GetPolicy` returns).
    pub fn parse_resource(json: &str) -> Result<Self, PolicyError> {
        Self::parse(json, PolicyKind::Resource)
    }

    /// Parses JSON text as a document of the given kind.
    pub fn parse(json: &str, kind: PolicyKind) -> Result<Self, PolicyError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| PolicyError::Json(e.to_string()))?;
        Self::from_value(&value, kind)
    }

    /// Reads an already-parsed JSON value (stored statements, for one).
    pub fn from_value(value: &Value, kind: PolicyKind) -> Result<Self, PolicyError> {
        let Value::Object(top) = value else {
            return Err(PolicyError::NotAnObject);
        };
        if let Some(k) = top
            .keys()
            .find(|k| !matches!(k.as_str(), "Version" | "Id" | "Statement"))
        {
            return Err(PolicyError::UnknownElement(k.clone()));
        }
        let version = match top.get("Version") {
            None => None,
            Some(Value::String(v)) if v == "2012-10-17" => Some(PolicyVersion::V2012_10_17),
            Some(Value::String(v)) if v == "2008-10-17" => Some(PolicyVersion::V2008_10_17),
            Some(other) => return Err(PolicyError::Version(describe(other))),
        };
        let id = match top.get("Id") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(PolicyError::Id),
        };
        let raw: &[Value] = match top.get("Statement") {
            None => return Err(PolicyError::NoStatement),
            Some(Value::Array(list)) => list,
            Some(one @ Value::Object(_)) => std::slice::from_ref(one),
            Some(_) => return Err(PolicyError::StatementShape),
        };
        let statements = raw
            .iter()
            .enumerate()
            .map(|(i, s)| {
                parse_statement(s, kind).map_err(|problem| PolicyError::Statement {
                    index: i + 1,
                    problem,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            kind,
            version,
            id,
            statements,
        })
    }

    /// Identity- or resource-based.
    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    /// The `Version`, if given.
    pub fn version(&self) -> Option<PolicyVersion> {
        self.version
    }

    /// The `Id`, if given.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The statements, in document order.
    pub fn statements(&self) -> &[Statement] {
        &self.statements
    }
}

fn parse_statement(value: &Value, kind: PolicyKind) -> Result<Statement, StatementError> {
    let Value::Object(m) = value else {
        return Err(StatementError::NotAnObject);
    };
    if let Some(k) = m.keys().find(|k| !STATEMENT_ELEMENTS.contains(&k.as_str())) {
        return Err(StatementError::UnknownElement(k.clone()));
    }
    let sid = match m.get("Sid") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(StatementError::Sid),
    };
    let effect = match m.get("Effect") {
        None => return Err(StatementError::MissingEffect),
        Some(Value::String(e)) if e == "Allow" => Effect::Allow,
        Some(Value::String(e)) if e == "Deny" => Effect::Deny,
        Some(other) => return Err(StatementError::Effect(describe(other))),
    };
    let actions = patterns(m, "Action", "NotAction")?;
    let resources = match kind {
        PolicyKind::Trust if !m.contains_key("Resource") && !m.contains_key("NotResource") => {
            Patterns {
                negated: false,
                patterns: vec!["*".to_owned()],
            }
        }
        _ => patterns(m, "Resource", "NotResource")?,
    };
    if m.contains_key("NotPrincipal") {
        return Err(StatementError::NotPrincipal);
    }
    let principal = match (kind, m.get("Principal")) {
        (PolicyKind::Identity, None) => None,
        (PolicyKind::Identity, Some(_)) => return Err(StatementError::PrincipalInIdentityPolicy),
        (PolicyKind::Resource | PolicyKind::Trust, None) => {
            return Err(StatementError::MissingPrincipal);
        }
        (PolicyKind::Resource | PolicyKind::Trust, Some(p)) => Some(parse_principal(p)?),
    };
    let conditions = match m.get("Condition") {
        None => Vec::new(),
        Some(c) => parse_conditions(c)?,
    };
    Ok(Statement {
        sid,
        effect,
        actions,
        resources,
        principal,
        conditions,
    })
}

/// A wrong value, short enough for a message: JSON for scalars (a long
/// string cut), the kind for arrays and objects.
fn describe(value: &Value) -> String {
    const MAX: usize = 64;
    match value {
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
        Value::String(s) if s.chars().count() > MAX => {
            let cut: String = s.chars().take(MAX).collect();
            format!("{}...", Value::String(cut))
        }
        other => other.to_string(),
    }
}

/// Exactly one of `positive` / `negative`, as patterns.
fn patterns(
    m: &Map<String, Value>,
    positive: &'static str,
    negative: &'static str,
) -> Result<Patterns, StatementError> {
    match (m.get(positive), m.get(negative)) {
        (Some(v), None) => Ok(Patterns {
            negated: false,
            patterns: strings(v, positive)?,
        }),
        (None, Some(v)) => Ok(Patterns {
            negated: true,
            patterns: strings(v, negative)?,
        }),
        _ => Err(StatementError::OneOf(positive, negative)),
    }
}

/// A non-empty string or a non-empty array of them.
fn strings(value: &Value, element: &'static str) -> Result<Vec<String>, StatementError> {
    let list = match value {
        Value::String(s) => vec![s],
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s),
                _ => Err(StatementError::Strings(element)),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(StatementError::Strings(element)),
    };
    if list.iter().any(|s| s.is_empty()) {
        return Err(StatementError::Strings(element));
    }
    Ok(list.into_iter().cloned().collect())
}

fn parse_principal(value: &Value) -> Result<Principal, StatementError> {
    let map = match value {
        Value::String(s) if s == "*" => return Ok(Principal::Anyone),
        Value::Object(map) if !map.is_empty() => map,
        _ => return Err(StatementError::PrincipalShape),
    };
    let mut aws = Vec::new();
    let mut services = Vec::new();
    for (kind, v) in map {
        match kind.as_str() {
            "AWS" => {
                for p in strings(v, "Principal AWS")? {
                    aws.push(aws_principal(p)?);
                }
            }
            "Service" => {
                for s in strings(v, "Principal Service")? {
                    if s.chars().any(|c| c.is_whitespace() || c == '*') {
                        return Err(StatementError::ServicePrincipal(s));
                    }
                    services.push(s);
                }
            }
            other => return Err(StatementError::PrincipalType(other.to_owned())),
        }
    }
    Ok(Principal::Listed { aws, services })
}

fn aws_principal(p: String) -> Result<AwsPrincipal, StatementError> {
    if p == "*" {
        return Ok(AwsPrincipal::Anyone);
    }
    if is_account_id(&p) {
        return Ok(AwsPrincipal::Account(p));
    }
    match Arn::parse(&p) {
        Some(arn)
            if arn.service == "iam" && arn.resource == "root" && is_account_id(arn.account) =>
        {
            Ok(AwsPrincipal::Account(arn.account.to_owned()))
        }
        Some(arn) if !arn.resource.is_empty() && !p.contains('*') => Ok(AwsPrincipal::Arn(p)),
        _ => Err(StatementError::AwsPrincipal(p)),
    }
}

fn is_account_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_conditions(value: &Value) -> Result<Vec<Condition>, StatementError> {
    let Value::Object(ops) = value else {
        return Err(StatementError::ConditionShape);
    };
    let mut out = Vec::new();
    for (name, body) in ops {
        let (set, rest) = if let Some(rest) = name.strip_prefix("ForAllValues:") {
            (Some(SetOperator::ForAllValues), rest)
        } else if let Some(rest) = name.strip_prefix("ForAnyValue:") {
            (Some(SetOperator::ForAnyValue), rest)
        } else {
            (None, name.as_str())
        };
        let (base, if_exists) = match rest.strip_suffix("IfExists") {
            Some(base) => (base, true),
            None => (rest, false),
        };
        let operator = match ConditionOperator::from_name(base) {
            // `NullIfExists` means nothing: Null is about existence.
            Some(ConditionOperator::Null) if if_exists => {
                return Err(StatementError::UnknownOperator(name.clone()));
            }
            Some(o) => o,
            None => return Err(operator_error(name)),
        };
        let Value::Object(keys) = body else {
            return Err(StatementError::OperatorShape(name.clone()));
        };
        for (key, values) in keys {
            let values =
                condition_values(values).ok_or_else(|| StatementError::ConditionValues {
                    operator: name.clone(),
                    key: key.clone(),
                })?;
            for v in &values {
                if let Err(expected) = operator.check_value(v) {
                    return Err(StatementError::ConditionValue {
                        operator: name.clone(),
                        key: key.clone(),
                        value: v.chars().take(64).collect(),
                        expected,
                    });
                }
            }
            out.push(Condition {
                operator,
                set,
                if_exists,
                key: key.clone(),
                values,
            });
        }
    }
    Ok(out)
}

/// An unknown operator, or a known one in the wrong case (say which).
fn operator_error(full: &str) -> StatementError {
    let (prefix, name) = match full.split_once(':') {
        Some((p @ ("ForAllValues" | "ForAnyValue"), rest)) => (format!("{p}:"), rest),
        _ => (String::new(), full),
    };
    let lower = name.to_ascii_lowercase();
    // Lowercasing ASCII keeps byte offsets, so `stem` ends where `lower`'s does.
    let (stem, suffix) = match lower.strip_suffix("ifexists") {
        Some(s) if !s.is_empty() => (name.get(..s.len()).unwrap_or(name), "IfExists"),
        _ => (name, ""),
    };
    match ConditionOperator::ALL
        .iter()
        .find(|o| o.name().eq_ignore_ascii_case(stem))
    {
        Some(o) => StatementError::OperatorCase {
            given: full.to_owned(),
            expected: format!("{prefix}{}{suffix}", o.name()),
        },
        None => StatementError::UnknownOperator(full.to_owned()),
    }
}

/// Strings, numbers and booleans (IAM's grammar allows all three and
/// compares their text), alone or in a non-empty array.
fn condition_values(value: &Value) -> Option<Vec<String>> {
    fn scalar(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
    match value {
        Value::Array(items) if !items.is_empty() => items.iter().map(scalar).collect(),
        Value::Array(_) => None,
        v => scalar(v).map(|s| vec![s]),
    }
}

impl ConditionOperator {
    /// Every operator, for lookups and messages.
    pub const ALL: [ConditionOperator; 27] = [
        Self::StringEquals,
        Self::StringNotEquals,
        Self::StringEqualsIgnoreCase,
        Self::StringNotEqualsIgnoreCase,
        Self::StringLike,
        Self::StringNotLike,
        Self::NumericEquals,
        Self::NumericNotEquals,
        Self::NumericLessThan,
        Self::NumericLessThanEquals,
        Self::NumericGreaterThan,
        Self::NumericGreaterThanEquals,
        Self::DateEquals,
        Self::DateNotEquals,
        Self::DateLessThan,
        Self::DateLessThanEquals,
        Self::DateGreaterThan,
        Self::DateGreaterThanEquals,
        Self::Bool,
        Self::BinaryEquals,
        Self::IpAddress,
        Self::NotIpAddress,
        Self::ArnEquals,
        Self::ArnLike,
        Self::ArnNotEquals,
        Self::ArnNotLike,
        Self::Null,
    ];

    /// IAM's spelling (without prefixes and `IfExists`).
    pub fn name(self) -> &'static str {
        match self {
            Self::StringEquals => "StringEquals",
            Self::StringNotEquals => "StringNotEquals",
            Self::StringEqualsIgnoreCase => "StringEqualsIgnoreCase",
            Self::StringNotEqualsIgnoreCase => "StringNotEqualsIgnoreCase",
            Self::StringLike => "StringLike",
            Self::StringNotLike => "StringNotLike",
            Self::NumericEquals => "NumericEquals",
            Self::NumericNotEquals => "NumericNotEquals",
            Self::NumericLessThan => "NumericLessThan",
            Self::NumericLessThanEquals => "NumericLessThanEquals",
            Self::NumericGreaterThan => "NumericGreaterThan",
            Self::NumericGreaterThanEquals => "NumericGreaterThanEquals",
            Self::DateEquals => "DateEquals",
            Self::DateNotEquals => "DateNotEquals",
            Self::DateLessThan => "DateLessThan",
            Self::DateLessThanEquals => "DateLessThanEquals",
            Self::DateGreaterThan => "DateGreaterThan",
            Self::DateGreaterThanEquals => "DateGreaterThanEquals",
            Self::Bool => "Bool",
            Self::BinaryEquals => "BinaryEquals",
            Self::IpAddress => "IpAddress",
            Self::NotIpAddress => "NotIpAddress",
            Self::ArnEquals => "ArnEquals",
            Self::ArnLike => "ArnLike",
            Self::ArnNotEquals => "ArnNotEquals",
            Self::ArnNotLike => "ArnNotLike",
            Self::Null => "Null",
        }
    }

    /// The operator IAM spells `name` (exactly; prefix and IfExists
    /// stripped).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.name() == name)
    }

    /// Negated operators hold when nothing matches, a missing key included.
    pub fn is_negated(self) -> bool {
        matches!(
            self,
            Self::StringNotEquals
                | Self::StringNotEqualsIgnoreCase
                | Self::StringNotLike
                | Self::NumericNotEquals
                | Self::DateNotEquals
                | Self::NotIpAddress
                | Self::ArnNotEquals
                | Self::ArnNotLike
        )
    }

    /// Whether a policy value is one this operator can compare; else what
    /// it takes. Checked when a document is parsed, so that a condition
    /// never silently stops matching.
    fn check_value(self, value: &str) -> Result<(), &'static str> {
        match self {
            Self::NumericEquals
            | Self::NumericNotEquals
            | Self::NumericLessThan
            | Self::NumericLessThanEquals
            | Self::NumericGreaterThan
            | Self::NumericGreaterThanEquals => {
                number(value).map(drop).ok_or("a number such as 10 or 2.5")
            }
            Self::DateEquals
            | Self::DateNotEquals
            | Self::DateLessThan
            | Self::DateLessThanEquals
            | Self::DateGreaterThan
            | Self::DateGreaterThanEquals => instant(value)
                .map(drop)
                .ok_or("a date such as 2026-01-31T00:00:00Z or epoch seconds"),
            Self::Bool | Self::Null => boolean(value).map(drop).ok_or("true or false"),
            Self::IpAddress | Self::NotIpAddress => Cidr::parse(value)
                .map(drop)
                .ok_or("an IP address or CIDR range such as 203.0.113.0/24"),
            _ => Ok(()),
        }
    }

    /// Whether one request value matches one policy value, before
    /// negation.
    fn matches(self, pattern: &str, value: &str) -> bool {
        use std::cmp::Ordering::{Equal, Greater, Less};
        let ordered = |p: Option<f64>, v: Option<f64>, want: &[std::cmp::Ordering]| matches!((v, p), (Some(v), Some(p)) if v.partial_cmp(&p).is_some_and(|o| want.contains(&o)));
        let num = |want: &[std::cmp::Ordering]| ordered(number(pattern), number(value), want);
        let date = |want: &[std::cmp::Ordering]| matches!((instant(value), instant(pattern)), (Some(v), Some(p)) if want.contains(&v.cmp(&p)));
        match self {
            Self::StringEquals | Self::StringNotEquals => pattern == value,
            Self::StringEqualsIgnoreCase | Self::StringNotEqualsIgnoreCase => {
                pattern.to_lowercase() == value.to_lowercase()
            }
            Self::StringLike | Self::StringNotLike => wildcard_match(pattern, value, false),
            Self::NumericEquals | Self::NumericNotEquals => num(&[Equal]),
            Self::NumericLessThan => num(&[Less]),
            Self::NumericLessThanEquals => num(&[Less, Equal]),
            Self::NumericGreaterThan => num(&[Greater]),
            Self::NumericGreaterThanEquals => num(&[Greater, Equal]),
            Self::DateEquals | Self::DateNotEquals => date(&[Equal]),
            Self::DateLessThan => date(&[Less]),
            Self::DateLessThanEquals => date(&[Less, Equal]),
            Self::DateGreaterThan => date(&[Greater]),
            Self::DateGreaterThanEquals => date(&[Greater, Equal]),
            Self::Bool => {
                matches!((boolean(pattern), boolean(value)), (Some(p), Some(v)) if p == v)
            }
            Self::BinaryEquals => pattern == value,
            Self::IpAddress | Self::NotIpAddress => {
                match (Cidr::parse(pattern), value.parse::<std::net::IpAddr>()) {
                    (Some(range), Ok(ip)) => range.contains(ip),
                    _ => false,
                }
            }
            Self::ArnEquals | Self::ArnLike | Self::ArnNotEquals | Self::ArnNotLike => {
                arn_match(pattern, value)
            }
            // Decided on presence alone, in `Condition::holds`.
            Self::Null => false,
        }
    }
}

/// A number as IAM's numeric operators read it.
fn number(text: &str) -> Option<f64> {
    let text = text.trim();
    let ok = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
    ok.then(|| text.parse::<f64>().ok())
        .flatten()
        .filter(|n| n.is_finite())
}

/// An instant as IAM's date operators read it: ISO 8601 (a date, or a date
/// and time with a zone) or seconds since the epoch; as milliseconds.
fn instant(text: &str) -> Option<i128> {
    use time::format_description::well_known::{Iso8601, Rfc3339};
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<i128>().ok().and_then(|s| s.checked_mul(1000));
    }
    let at = time::OffsetDateTime::parse(text, &Rfc3339)
        .or_else(|_| time::OffsetDateTime::parse(text, &Iso8601::DEFAULT))
        .ok()
        .or_else(|| {
            let date = time::Date::parse(text, &Iso8601::DEFAULT).ok()?;
            Some(date.midnight().assume_utc())
        })?;
    Some(at.unix_timestamp_nanos() / 1_000_000)
}

fn boolean(text: &str) -> Option<bool> {
    if text.eq_ignore_ascii_case("true") {
        Some(true)
    } else if text.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// An address range: `203.0.113.0/24`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy)]
struct Cidr {
    network: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().ok()?)),
            None => (text.trim(), None),
        };
        let network: std::net::IpAddr = addr.parse().ok()?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Self { network, prefix })
    }

    fn contains(self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        // An IPv4 client seen through an IPv6 socket is still that client.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (net, addr, bits) = match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                (u128::from(u32::from(n)), u128::from(u32::from(a)), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || net >> shift == addr >> shift
    }
}

impl Condition {
    /// IAM's rules. Policy values are OR. A missing key fails a positive
    /// operator and passes a negated one or any `...IfExists`; `Null` tests
    /// presence. With `ForAnyValue:` some request value must match (none
    /// when the key is missing), with `ForAllValues:` every one (vacuously
    /// true when it is missing). A negated operator's value matches when it
    /// equals none of the policy's values.
    pub fn holds(&self, context: &[(&str, &str)]) -> bool {
        let found: Vec<&str> = context
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(&self.key))
            .map(|(_, v)| *v)
            .collect();
        if self.operator == ConditionOperator::Null {
            let absent = found.is_empty();
            return self.values.iter().any(|v| boolean(v) == Some(absent));
        }
        let negated = self.operator.is_negated();
        let positive = |v: &str| self.values.iter().any(|p| self.operator.matches(p, v));
        let value_holds = |v: &str| positive(v) != negated;
        match self.set {
            Some(SetOperator::ForAllValues) => found.iter().all(|v| value_holds(v)),
            Some(SetOperator::ForAnyValue) if found.is_empty() => self.if_exists,
            Some(SetOperator::ForAnyValue) => found.iter().any(|v| value_holds(v)),
            None if found.is_empty() => self.if_exists || negated,
            None => found.iter().any(|v| positive(v)) != negated,
        }
    }
}

impl Patterns {
    /// Whether `text` is covered (any pattern matches, or for `Not...`,
    /// none does).
    pub fn matches(&self, text: &str, ignore_case: bool) -> bool {
        let any = self
            .patterns
            .iter()
            .any(|p| wildcard_match(p, text, ignore_case));
        any != self.negated
    }
}

impl Principal {
    /// Whether the caller is one of the statement's principals (service
    /// names compared ignoring ASCII case).
    pub fn matches(&self, ctx: &RequestContext<'_>) -> bool {
        match self {
            Self::Anyone => true,
            Self::Listed { aws, services } => {
                aws.iter().any(|a| a.matches(ctx))
                    || services
                        .iter()
                        .any(|s| ctx.service.is_some_and(|c| c.eq_ignore_ascii_case(s)))
            }
        }
    }
}

impl AwsPrincipal {
    /// `*` matches everyone; an account or ARN matches only IAM callers
    /// (not a service acting on its own behalf).
    pub fn matches(&self, ctx: &RequestContext<'_>) -> bool {
        match self {
            Self::Anyone => true,
            _ if ctx.service.is_some() => false,
            Self::Account(a) => a == ctx.account,
            Self::Arn(arn) => arn == ctx.principal_arn || is_session_of(ctx.principal_arn, arn),
        }
    }
}

/// Whether `caller` (`arn:P:sts::A:assumed-role/NAME/SESSION`) is a session
/// of `role` (`arn:P:iam::A:role/[PATH/]NAME`; session ARNs drop the path).
fn is_session_of(caller: &str, role: &str) -> bool {
    let (Some(c), Some(r)) = (Arn::parse(caller), Arn::parse(role)) else {
        return false;
    };
    let session_role = c
        .resource
        .strip_prefix("assumed-role/")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(name, session)| !name.is_empty() && !session.is_empty())
        .map(|(name, _)| name);
    let role_name = r
        .resource
        .strip_prefix("role/")
        .and_then(|rest| rest.rsplit('/').next())
        .filter(|name| !name.is_empty());
    c.service == "sts"
        && r.service == "iam"
        && c.partition == r.partition
        && c.account == r.account
        && session_role.is_some()
        && session_role == role_name
}

/// An ARN's six colon-separated parts (the resource keeps its colons).
struct Arn<'a> {
    partition: &'a str,
    service: &'a str,
    account: &'a str,
    resource: &'a str,
}

impl<'a> Arn<'a> {
    fn parse(s: &'a str) -> Option<Self> {
        let mut parts = s.splitn(6, ':');
        if parts.next()? != "arn" {
            return None;
        }
        let (partition, service, _region, account, resource) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        Some(Self {
            partition,
            service,
            account,
            resource,
        })
    }
}

/// `ArnEquals` / `ArnLike`: a pattern with all six parts is matched part by
/// part, so a wildcard stays within its part (as IAM does); a shorter
/// pattern such as `*` is matched against the whole value.
fn arn_match(pattern: &str, value: &str) -> bool {
    if pattern.split(':').count() < 6 {
        return wildcard_match(pattern, value, false);
    }
    let mut p = pattern.splitn(6, ':');
    let mut v = value.splitn(6, ':');
    for _ in 0..6 {
        match (p.next(), v.next()) {
            (Some(pp), Some(vv)) if wildcard_match(pp, vv, false) => {}
            _ => return false,
        }
    }
    true
}

/// IAM wildcards: `*` any run of characters (empty included), `?` exactly
/// one. Iterative: on a mismatch, go back to the last `*` and let it take
/// one more character, so the cost is O(pattern × text), never exponential.
pub fn wildcard_match(pattern: &str, text: &str, ignore_case: bool) -> bool {
    let same = |a: char, b: char| {
        if ignore_case {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (mut p, mut t) = (0, 0);
    // After the last `*` seen: where the pattern resumes, and where in the
    // text the star's run ends so far.
    let mut star: Option<(usize, usize)> = None;
    loop {
        let pc = pattern[p..].chars().next();
        let tc = text[t..].chars().next();
        match (pc, tc) {
            (Some('*'), _) => {
                p += 1;
                star = Some((p, t));
                continue;
            }
            (Some(pc), Some(tc)) if pc == '?' || same(pc, tc) => {
                p += pc.len_utf8();
                t += tc.len_utf8();
                continue;
            }
            (None, None) => return true,
            _ => {}
        }
        // Mismatch: the last star takes one more character.
        let Some((sp, st)) = star else {
            return false;
        };
        let Some(c) = text[st..].chars().next() else {
            return false;
        };
        let st = st + c.len_utf8();
        star = Some((sp, st));
        p = sp;
        t = st;
    }
}

impl Statement {
    /// Whether the statement is about this request.
    pub fn applies(&self, ctx: &RequestContext<'_>) -> bool {
        self.actions.matches(ctx.action, true)
            && self.resources.matches(ctx.resource, false)
            && self.principal.as_ref().is_none_or(|p| p.matches(ctx))
            && self.conditions.iter().all(|c| c.holds(ctx.conditions))
    }
}

/// Decides a request against the caller's identity-based documents and the
/// resource's document.
pub fn evaluate(
    identity: &[PolicyDocument],
    resource: Option<&PolicyDocument>,
    ctx: &RequestContext<'_>,
) -> Decision {
    evaluate_explained(identity, resource, ctx).decision
}

/// [`evaluate`], also naming the statement that decided: the first
/// applicable deny (identity documents first), else the first applicable
/// allow.
pub fn evaluate_explained<'p>(
    identity: &'p [PolicyDocument],
    resource: Option<&'p PolicyDocument>,
    ctx: &RequestContext<'_>,
) -> Explanation<'p> {
    let documents = identity
        .iter()
        .enumerate()
        .map(|(i, d)| (PolicySource::Identity(i), d))
        .chain(resource.map(|d| (PolicySource::Resource, d)));
    let mut allow = None;
    for (source, document) in documents {
        for (index, statement) in document.statements.iter().enumerate() {
            if !statement.applies(ctx) {
                continue;
            }
            let deciding = DecidingStatement {
                source,
                index,
                sid: statement.sid.as_deref(),
            };
            match statement.effect {
                Effect::Deny => {
                    return Explanation {
                        decision: Decision::ExplicitDeny,
                        statement: Some(deciding),
                    };
                }
                Effect::Allow => {
                    allow.get_or_insert(deciding);
                }
            }
        }
    }
    match allow {
        Some(s) => Explanation {
            decision: Decision::Allow,
            statement: Some(s),
        },
        None => Explanation {
            decision: Decision::ImplicitDeny,
            statement: None,
        },
    }
}

impl Decision {
    /// Whether the request may go ahead.
    pub fn is_allowed(self) -> bool {
        self == Self::Allow
    }

    /// AWS's wording for an `AccessDenied` message. An explicit deny does
    /// not say which side denied; [`Explanation::message`] does.
    pub fn message(self, ctx: &RequestContext<'_>) -> String {
        self.message_in(ctx, None)
    }

    fn message_in(self, ctx: &RequestContext<'_>, source: Option<PolicySource>) -> String {
        let head = format!(
            "User: {} is {}authorized to perform: {} on resource: {}",
            ctx.principal_arn,
            if self == Self::Allow { "" } else { "not " },
            ctx.action,
            ctx.resource
        );
        match (self, source) {
            (Self::Allow, _) => head,
            (Self::ImplicitDeny, _) => format!(
                "{head} because no identity-based policy allows the {} action",
                ctx.action
            ),
            (Self::ExplicitDeny, None) => format!("{head} with an explicit deny"),
            (Self::ExplicitDeny, Some(PolicySource::Identity(_))) => {
                format!("{head} with an explicit deny in an identity-based policy")
            }
            (Self::ExplicitDeny, Some(PolicySource::Resource)) => {
                format!("{head} with an explicit deny in a resource-based policy")
            }
        }
    }
}

impl Explanation<'_> {
    /// AWS's wording for an `AccessDenied` message, saying which kind of
    /// policy denied explicitly.
    pub fn message(&self, ctx: &RequestContext<'_>) -> String {
        self.decision
            .message_in(ctx, self.statement.map(|s| s.source))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use proptest::prelude::*;
    use proptest::sample::{Index, select};
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use serde_json::json;

    use super::*;
    use crate::control::model::PolicyRecord;

    const ACCT: &str = "000000000000";
    const F: &str = "arn:aws:lambda:us-east-1:000000000000:function:f";
    const ALICE: &str = "arn:aws:iam::000000000000:user/alice";

    fn ctx<'a>(action: &'a str, resource: &'a str) -> RequestContext<'a> {
        RequestContext {
            principal_arn: ALICE,
            account: ACCT,
            service: None,
            action,
            resource,
            conditions: &[],
        }
    }

    fn identity(v: Value) -> PolicyDocument {
        PolicyDocument::from_value(&v, PolicyKind::Identity).unwrap()
    }

    fn resource(v: Value) -> PolicyDocument {
        PolicyDocument::from_value(&v, PolicyKind::Resource).unwrap()
    }

    fn statement(effect: &str, action: Value, resource: Value) -> Value {
        json!({"Effect": effect, "Action": action, "Resource": resource})
    }

    /// The problem with the first bad statement of a document that must
    /// fail.
    fn problem(statement: Value, kind: PolicyKind) -> StatementError {
        match PolicyDocument::from_value(&json!({"Statement": [statement]}), kind) {
            Err(PolicyError::Statement { index: 1, problem }) => problem,
            other => panic!("expected a statement error, got {other:?}"),
        }
    }

    // ---- parsing ----

    #[test]
    fn accepts_the_documents_add_permission_stores() {
        let record = PolicyRecord {
            statements: vec![
                json!({
                    "Sid": "s3-invoke",
                    "Effect": "Allow",
                    "Principal": {"Service": "s3.amazonaws.com"},
                    "Action": "lambda:InvokeFunction",
                    "Resource": F,
                    "Condition": {
                        "StringEquals": {"AWS:SourceAccount": ACCT},
                        "ArnLike": {"AWS:SourceArn": "arn:aws:s3:::bucket"},
                    },
                }),
                json!({
                    "Sid": "partner",
                    "Effect": "Allow",
                    "Principal": {"AWS": "arn:aws:iam::111111111111:root"},
                    "Action": "lambda:*",
                    "Resource": format!("{F}:prod"),
                }),
            ],
            revision_id: "r".to_owned(),
        };
        let doc = PolicyDocument::parse_resource(&record.document()).unwrap();
        assert_eq!(doc.kind(), PolicyKind::Resource);
        assert_eq!(doc.version(), Some(PolicyVersion::V2012_10_17));
        assert_eq!(doc.id(), Some("default"));
        assert_eq!(doc.statements().len(), 2);
        assert_eq!(
            doc.statements()[1].principal,
            Some(Principal::Listed {
                aws: vec![AwsPrincipal::Account("111111111111".to_owned())],
                services: vec![],
            })
        );

        let good = [
            ("aws:SourceArn", "arn:aws:s3:::bucket"),
            ("aws:SourceAccount", ACCT),
        ];
        let s3 = |conditions| RequestContext {
            principal_arn: "s3.amazonaws.com",
            service: Some("s3.amazonaws.com"),
            action: "lambda:InvokeFunction",
            conditions,
            ..ctx("", F)
        };
        assert_eq!(evaluate(&[], Some(&doc), &s3(&good)), Decision::Allow);
        let other_bucket = [
            ("aws:SourceArn", "arn:aws:s3:::other"),
            ("aws:SourceAccount", ACCT),
        ];
        assert_eq!(
            evaluate(&[], Some(&doc), &s3(&other_bucket)),
            Decision::ImplicitDeny
        );
        assert_eq!(
            evaluate(&[], Some(&doc), &s3(&good[..1])),
            Decision::ImplicitDeny
        );
        // Alice is not S3.
        let alice = RequestContext {
            conditions: &good,
            ..ctx("lambda:InvokeFunction", F)
        };
        assert_eq!(evaluate(&[], Some(&doc), &alice), Decision::ImplicitDeny);

        let carol = |resource| RequestContext {
            principal_arn: "arn:aws:iam::111111111111:user/carol",
            account: "111111111111",
            ..ctx("lambda:GetFunction", resource)
        };
        let prod = format!("{F}:prod");
        assert_eq!(evaluate(&[], Some(&doc), &carol(&prod)), Decision::Allow);
        assert_eq!(evaluate(&[], Some(&doc), &carol(F)), Decision::ImplicitDeny);
    }

    #[test]
    fn accepts_every_shape_iam_allows() {
        let one = identity(json!({
            "Version": "2008-10-17",
            "Statement": statement("Allow", json!("lambda:*"), json!("*")),
        }));
        assert_eq!(one.version(), Some(PolicyVersion::V2008_10_17));
        assert_eq!(one.statements().len(), 1);
        let many = identity(json!({"Statement": [
            {"Sid": "a", "Effect": "Deny", "NotAction": ["lambda:Get*", "lambda:List*"],
             "NotResource": [F, format!("{F}:*")]},
            {"Effect": "Allow", "Action": "*", "Resource": "*",
             "Condition": {"StringEqualsIfExists": {"k": [true, 12, "x"]}}},
        ]}));
        assert_eq!(many.version(), None);
        let s = &many.statements()[0];
        assert_eq!(s.sid.as_deref(), Some("a"));
        assert_eq!(s.effect, Effect::Deny);
        assert!(s.actions.negated && s.resources.negated);
        assert_eq!(s.resources.patterns.len(), 2);
        let c = &many.statements()[1].conditions[0];
        assert_eq!(c.operator, ConditionOperator::StringEquals);
        assert!(c.if_exists);
        assert_eq!(c.values, ["true", "12", "x"]);
        // An empty statement list is valid and allows nothing.
        let none = identity(json!({"Statement": []}));
        assert_eq!(
            evaluate(&[none], None, &ctx("lambda:GetFunction", F)),
            Decision::ImplicitDeny
        );

        let both = resource(json!({"Statement": {
            "Effect": "Allow", "Action": "*", "Resource": "*",
            "Principal": {"AWS": ["*", ACCT, ALICE], "Service": ["s3.amazonaws.com"]},
        }}));
        assert_eq!(
            both.statements()[0].principal,
            Some(Principal::Listed {
                aws: vec![
                    AwsPrincipal::Anyone,
                    AwsPrincipal::Account(ACCT.to_owned()),
                    AwsPrincipal::Arn(ALICE.to_owned()),
                ],
                services: vec!["s3.amazonaws.com".to_owned()],
            })
        );
    }

    #[test]
    fn parse_errors_say_what_to_fix() {
        let doc = json!({"Statement": [
            statement("Allow", json!("*"), json!("*")),
            statement("allow", json!("*"), json!("*")),
        ]});
        assert_eq!(
            PolicyDocument::from_value(&doc, PolicyKind::Identity)
                .unwrap_err()
                .to_string(),
            "Statement 2: Effect must be \"Allow\" or \"Deny\", not \"allow\""
        );
        let top = |text: &str| PolicyDocument::parse_identity(text).unwrap_err();
        assert!(matches!(top("{"), PolicyError::Json(_)));
        assert!(matches!(top(&"[".repeat(100_000)), PolicyError::Json(_)));
        assert!(matches!(top("[]"), PolicyError::NotAnObject));
        assert!(matches!(top("{}"), PolicyError::NoStatement));
        assert!(matches!(
            top(r#"{"Statement": "x"}"#),
            PolicyError::StatementShape
        ));
        assert!(matches!(
            top(r#"{"Id": 1, "Statement": []}"#),
            PolicyError::Id
        ));
        assert_eq!(
            top(r#"{"Statements": []}"#),
            PolicyError::UnknownElement("Statements".to_owned())
        );
        assert_eq!(
            top(r#"{"Version": "2020-01-01", "Statement": []}"#).to_string(),
            "Version must be \"2012-10-17\" or \"2008-10-17\", not \"2020-01-01\""
        );

        use PolicyKind::{Identity as I, Resource as R};
        use StatementError as E;
        let ok = || json!({"Effect": "Allow", "Action": "*", "Resource": "*", "Principal": "*"});
        let with = |key: &str, value: Value| {
            let mut s = ok();
            s[key] = value;
            s
        };
        let without = |key: &str| {
            let mut s = ok();
            s.as_object_mut().unwrap().remove(key);
            s
        };
        assert_eq!(problem(json!(1), I), E::NotAnObject);
        assert_eq!(
            problem(with("Ressource", json!("*")), R),
            E::UnknownElement("Ressource".to_owned())
        );
        assert_eq!(problem(with("Sid", json!(5)), R), E::Sid);
        assert_eq!(problem(without("Effect"), R), E::MissingEffect);
        assert_eq!(
            problem(with("Effect", json!(true)), R),
            E::Effect("true".to_owned())
        );
        assert_eq!(
            problem(with("Effect", json!(["Allow"])), R),
            E::Effect("an array".to_owned())
        );
        assert_eq!(
            problem(with("Effect", json!("x".repeat(1000))), R),
            E::Effect(format!("\"{}\"...", "x".repeat(64)))
        );
        assert_eq!(
            problem(with("NotAction", json!("*")), R),
            E::OneOf("Action", "NotAction")
        );
        assert_eq!(
            problem(without("Resource"), R),
            E::OneOf("Resource", "NotResource")
        );
        assert_eq!(problem(with("Action", json!([])), R), E::Strings("Action"));
        assert_eq!(
            problem(with("Action", json!([""])), R),
            E::Strings("Action")
        );
        assert_eq!(
            problem(with("Resource", json!(["*", 1])), R),
            E::Strings("Resource")
        );
        assert_eq!(problem(ok(), I), E::PrincipalInIdentityPolicy);
        assert_eq!(problem(without("Principal"), R), E::MissingPrincipal);
        assert_eq!(
            problem(with("NotPrincipal", json!("*")), R),
            E::NotPrincipal
        );
        assert_eq!(
            problem(with("Principal", json!("bob")), R),
            E::PrincipalShape
        );
        assert_eq!(problem(with("Principal", json!({})), R), E::PrincipalShape);
        assert_eq!(
            problem(with("Principal", json!({"Federated": "x"})), R),
            E::PrincipalType("Federated".to_owned())
        );
        for bad in [
            "bob",
            "12345",
            "arn:aws:iam::000000000000:user/*",
            "arn:aws:iam",
        ] {
            assert_eq!(
                problem(with("Principal", json!({"AWS": bad})), R),
                E::AwsPrincipal(bad.to_owned())
            );
        }
        assert_eq!(
            problem(with("Principal", json!({"Service": "s3 amazonaws"})), R),
            E::ServicePrincipal("s3 amazonaws".to_owned())
        );
        assert_eq!(problem(with("Condition", json!("x")), R), E::ConditionShape);
        let cond = |c: Value| problem(with("Condition", c), R);
        for unknown in [
            "StringContains",
            "ForEachValue:StringEquals",
            "IfExists",
            "NullIfExists",
        ] {
            assert_eq!(
                cond(json!({unknown: {"k": "v"}})),
                E::UnknownOperator(unknown.to_owned())
            );
        }
        assert_eq!(
            cond(json!({"stringequals": {"k": "v"}})).to_string(),
            "condition operator \"stringequals\" must be spelled \"StringEquals\""
        );
        assert_eq!(
            cond(json!({"ARNLIKEifexists": {"k": "v"}})),
            E::OperatorCase {
                given: "ARNLIKEifexists".to_owned(),
                expected: "ArnLikeIfExists".to_owned()
            }
        );
        assert_eq!(
            cond(json!({"StringLike": "k"})),
            E::OperatorShape("StringLike".to_owned())
        );
        for bad in [json!({}), json!([]), json!(null), json!([["x"]])] {
            assert_eq!(
                cond(json!({"StringLike": {"k": bad}})),
                E::ConditionValues {
                    operator: "StringLike".to_owned(),
                    key: "k".to_owned()
                }
            );
        }
        // A message names the statement and the fix.
        let text = PolicyDocument::from_value(
            &json!({"Statement": [ok(), with("Condition", json!({"StringContains": {}}))]}),
            R,
        )
        .unwrap_err()
        .to_string();
        assert!(
            text.starts_with(
                "Statement 2: unknown condition operator \"StringContains\"; use one of IAM's"
            ),
            "{text}"
        );
    }

    // ---- matching ----

    #[test]
    fn wildcards() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("", "", true),
            ("", "a", false),
            ("?", "", false),
            ("?", "é", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("a*c", "ac", true),
            ("a*c", "abbbc", true),
            ("a*c", "abbbcd", false),
            ("*c", "abcabc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxcyyb", false),
            ("**?", "x", true),
            ("lambda:Invoke*", "lambda:InvokeFunction", true),
            ("lambda:Invoke*", "lambda:GetFunction", false),
            (F, F, true),
            (F, "arn:aws:lambda:us-east-1:000000000000:function:F", false),
            (
                "arn:aws:lambda:us-east-1:000000000000:function:f:*",
                F,
                false,
            ),
            (
                "arn:aws:lambda:us-east-1:000000000000:function:f:*",
                &format!("{F}:1"),
                true,
            ),
            (
                "arn:aws:lambda:*:000000000000:function:*",
                &format!("{F}:prod"),
                true,
            ),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(
                wildcard_match(pattern, text, false),
                want,
                "{pattern} vs {text}"
            );
        }
        assert!(wildcard_match(
            "LAMBDA:invoke*",
            "lambda:InvokeFunction",
            true
        ));
        assert!(!wildcard_match(
            "LAMBDA:invoke*",
            "lambda:InvokeFunction",
            false
        ));
    }

    #[test]
    fn pathological_patterns_finish_fast() {
        let start = Instant::now();
        let text = "a".repeat(100_000);
        assert!(!wildcard_match("a*a*a*a*a*b", &text, false));
        assert!(!wildcard_match(
            &format!("{}b", "*a".repeat(1_000)),
            &"a".repeat(10_000),
            true
        ));
        assert!(!wildcard_match(
            &format!("{}b", "*?".repeat(1_000)),
            &"a".repeat(10_000),
            false
        ));
        assert!(wildcard_match(
            &format!("{}*", "a*".repeat(1_000)),
            &text,
            false
        ));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn actions_ignore_case_resources_do_not() {
        let doc =
            identity(json!({"Statement": statement("Allow", json!("LAMBDA:invoke*"), json!(F))}));
        let docs = [doc];
        assert_eq!(
            evaluate(&docs, None, &ctx("lambda:InvokeFunction", F)),
            Decision::Allow
        );
        assert_eq!(
            evaluate(&docs, None, &ctx("Lambda:INVOKEASYNC", F)),
            Decision::Allow
        );
        assert_eq!(
            evaluate(
                &docs,
                None,
                &ctx("lambda:InvokeFunction", &F.to_uppercase())
            ),
            Decision::ImplicitDeny
        );
    }

    #[test]
    fn not_action_and_not_resource() {
        let docs = [identity(json!({"Statement": [
            {"Effect": "Allow", "NotAction": "lambda:Delete*", "Resource": "*"},
            {"Effect": "Deny", "Action": "lambda:InvokeFunction", "NotResource": format!("{F}:*")},
        ]}))];
        let d = |action, resource| evaluate(&docs, None, &ctx(action, resource));
        let qualified = format!("{F}:prod");
        assert_eq!(d("lambda:GetFunction", F), Decision::Allow);
        assert_eq!(d("lambda:DeleteFunction", F), Decision::ImplicitDeny);
        assert_eq!(d("lambda:deletefunction", F), Decision::ImplicitDeny);
        // Unqualified invokes are denied; qualified ones allowed.
        assert_eq!(d("lambda:InvokeFunction", F), Decision::ExplicitDeny);
        assert_eq!(d("lambda:InvokeFunction", &qualified), Decision::Allow);
    }

    #[test]
    fn conditions() {
        let holds = |operator: &str, values: Value, context: &[(&str, &str)]| {
            let doc = identity(json!({"Statement": {
                "Effect": "Allow", "Action": "*", "Resource": "*",
                "Condition": {operator: {"aws:SourceArn": values}},
            }}));
            let c = RequestContext {
                conditions: context,
                ..ctx("lambda:InvokeFunction", F)
            };
            evaluate(&[doc], None, &c) == Decision::Allow
        };
        let bucket = [("AWS:SOURCEARN", "arn:aws:s3:::bucket")];
        let none: [(&str, &str); 0] = [];
        // Missing key: positive false, negated true, IfExists true.
        for (op, missing) in [
            ("StringEquals", false),
            ("StringLike", false),
            ("ArnEquals", false),
            ("ArnLike", false),
            ("StringNotEquals", true),
            ("StringNotLike", true),
            ("ArnNotEquals", true),
            ("ArnNotLike", true),
            ("StringEqualsIfExists", true),
            ("ArnLikeIfExists", true),
            ("ArnNotLikeIfExists", true),
        ] {
            assert_eq!(holds(op, json!("x"), &none), missing, "{op}");
        }
        // Values are OR; keys match case-insensitively, values exactly.
        assert!(holds(
            "StringEquals",
            json!(["x", "arn:aws:s3:::bucket"]),
            &bucket
        ));
        assert!(!holds(
            "StringEquals",
            json!("arn:aws:s3:::BUCKET"),
            &bucket
        ));
        assert!(!holds(
            "StringNotEquals",
            json!(["x", "arn:aws:s3:::bucket"]),
            &bucket
        ));
        assert!(holds("StringNotEquals", json!(["x", "y"]), &bucket));
        assert!(holds("StringLike", json!("arn:aws:s3:::b?ck*"), &bucket));
        assert!(holds("StringLikeIfExists", json!("*:bucket"), &bucket));
        assert!(!holds("StringNotLike", json!("*"), &bucket));
        // ARN operators: part by part; a wildcard stays within its part.
        assert!(holds("ArnLike", json!("arn:aws:s3:::*"), &bucket));
        assert!(holds("ArnEquals", json!("arn:*:s3:*:*:b*"), &bucket));
        // A pattern of fewer than six parts is matched whole.
        assert!(holds("ArnLike", json!("arn:*"), &bucket));
        // The `*` cannot take `aws:cn` (as a whole-string match would).
        let odd = [("aws:SourceArn", "arn:aws:cn:s3:::bucket")];
        assert!(!holds("ArnLike", json!("arn:*:s3:::bucket"), &odd));
        assert!(holds("StringLike", json!("arn:*:s3:::bucket"), &odd));
        assert!(!holds(
            "ArnLike",
            json!("arn:aws:s3:*::bucket"),
            &[("aws:SourceArn", "arn:aws:s3:us-east-1:x::bucket")]
        ));
        assert!(holds("ArnLike", json!("*"), &bucket));
        assert!(!holds(
            "ArnLike",
            json!("arn:aws:s3:::*"),
            &[("aws:SourceArn", "bucket")]
        ));
        assert!(holds("ArnNotLike", json!("arn:aws:sns:*:*:*"), &bucket));
        // A key given twice has two values.
        let two = [
            ("aws:sourcearn", "a"),
            ("aws:SourceArn", "arn:aws:s3:::bucket"),
        ];
        assert!(holds("StringEquals", json!("a"), &two));
        assert!(!holds("StringNotEquals", json!("a"), &two));

        // Keys and operators are AND.
        let doc = identity(json!({"Statement": {
            "Effect": "Allow", "Action": "*", "Resource": "*",
            "Condition": {
                "StringEquals": {"aws:SourceAccount": ACCT, "aws:SourceArn": "s"},
                "StringNotEquals": {"aws:PrincipalTag/team": "ops"},
            },
        }}));
        let docs = [doc];
        let d = |context: &[(&str, &str)]| {
            let c = RequestContext {
                conditions: context,
                ..ctx("lambda:InvokeFunction", F)
            };
            evaluate(&docs, None, &c)
        };
        assert_eq!(
            d(&[("aws:SourceAccount", ACCT), ("aws:SourceArn", "s")]),
            Decision::Allow
        );
        assert_eq!(d(&[("aws:SourceAccount", ACCT)]), Decision::ImplicitDeny);
        assert_eq!(
            d(&[
                ("aws:SourceAccount", ACCT),
                ("aws:SourceArn", "s"),
                ("aws:principaltag/TEAM", "ops")
            ]),
            Decision::ImplicitDeny
        );
    }

    #[test]
    fn every_operator_family() {
        let holds = |operator: &str, key: &str, values: Value, context: &[(&str, &str)]| {
            let doc = identity(json!({"Statement": {
                "Effect": "Allow", "Action": "*", "Resource": "*",
                "Condition": {operator: {key: values}},
            }}));
            let c = RequestContext {
                conditions: context,
                ..ctx("lambda:InvokeFunction", F)
            };
            evaluate(&[doc], None, &c) == Decision::Allow
        };
        let k = "kiln:n";
        // Numbers compare as numbers, not text.
        assert!(holds("NumericLessThan", k, json!(10), &[(k, "9.5")]));
        assert!(!holds("NumericLessThan", k, json!("10"), &[(k, "10")]));
        assert!(holds(
            "NumericLessThanEquals",
            k,
            json!("10"),
            &[(k, "10.0")]
        ));
        assert!(holds("NumericGreaterThan", k, json!(2), &[(k, "10")]));
        assert!(holds(
            "NumericGreaterThanEquals",
            k,
            json!(10),
            &[(k, "10")]
        ));
        assert!(holds("NumericEquals", k, json!([1, 2]), &[(k, "2")]));
        assert!(holds("NumericNotEquals", k, json!([1, 2]), &[(k, "3")]));
        assert!(!holds("NumericEquals", k, json!(1), &[(k, "one")]));
        assert!(holds("NumericNotEquals", k, json!(1), &[]));
        // Dates: ISO 8601 and epoch seconds are the same instants.
        let t = "aws:CurrentTime";
        let now = [(t, "2026-12-04T10:00:00Z")];
        assert!(holds(
            "DateLessThan",
            t,
            json!("2027-01-01T00:00:00Z"),
            &now
        ));
        assert!(!holds("DateGreaterThan", t, json!("2027-01-01"), &now));
        assert!(holds(
            "DateGreaterThanEquals",
            t,
            json!("2026-12-04T10:00:00+00:00"),
            &now
        ));
        assert!(holds("DateEquals", t, json!("1796378400"), &now));
        assert!(holds(
            "DateLessThanEquals",
            "aws:EpochTime",
            json!("2026-12-04T10:00:00Z"),
            &[("aws:EpochTime", "1796378400")]
        ));
        assert!(holds("DateNotEquals", t, json!("2026-12-04"), &now));
        // Digits beyond any instant: not a date, no overflow.
        let huge = "9".repeat(40);
        assert!(!holds(
            "DateGreaterThan",
            t,
            json!("2026-12-04"),
            &[(t, huge.as_str())]
        ));
        // Bool, Binary.
        assert!(holds(
            "Bool",
            "aws:SecureTransport",
            json!(false),
            &[("aws:SecureTransport", "false")]
        ));
        assert!(!holds(
            "Bool",
            "aws:SecureTransport",
            json!("true"),
            &[("aws:SecureTransport", "false")]
        ));
        assert!(holds(
            "BinaryEquals",
            k,
            json!("QmluYXJ5"),
            &[(k, "QmluYXJ5")]
        ));
        // Addresses and ranges, v4, v6 and v4 seen through v6.
        let ip = "aws:SourceIp";
        assert!(holds(
            "IpAddress",
            ip,
            json!("127.0.0.0/8"),
            &[(ip, "127.0.0.1")]
        ));
        assert!(holds(
            "IpAddress",
            ip,
            json!(["10.0.0.0/8", "127.0.0.1"]),
            &[(ip, "127.0.0.1")]
        ));
        assert!(!holds(
            "IpAddress",
            ip,
            json!("10.0.0.0/8"),
            &[(ip, "127.0.0.1")]
        ));
        assert!(holds(
            "IpAddress",
            ip,
            json!("0.0.0.0/0"),
            &[(ip, "8.8.8.8")]
        ));
        assert!(holds(
            "IpAddress",
            ip,
            json!("2001:db8::/32"),
            &[(ip, "2001:db8::1")]
        ));
        assert!(holds(
            "IpAddress",
            ip,
            json!("127.0.0.0/8"),
            &[(ip, "::ffff:127.0.0.1")]
        ));
        assert!(holds(
            "NotIpAddress",
            ip,
            json!("10.0.0.0/8"),
            &[(ip, "127.0.0.1")]
        ));
        assert!(!holds("IpAddress", ip, json!("::1"), &[(ip, "127.0.0.1")]));
        // Case-insensitive strings.
        assert!(holds(
            "StringEqualsIgnoreCase",
            k,
            json!("ABC"),
            &[(k, "abc")]
        ));
        assert!(!holds(
            "StringNotEqualsIgnoreCase",
            k,
            json!("ABC"),
            &[(k, "abc")]
        ));
        // Null tests presence.
        assert!(holds("Null", k, json!("true"), &[]));
        assert!(!holds("Null", k, json!("true"), &[(k, "x")]));
        assert!(holds("Null", k, json!(false), &[(k, "x")]));
        // IfExists on the new families.
        assert!(holds("NumericLessThanIfExists", k, json!(1), &[]));
        assert!(!holds("NumericLessThanIfExists", k, json!(1), &[(k, "5")]));
        // Sets.
        let tags = [("aws:TagKeys", "team"), ("aws:TagKeys", "cost")];
        assert!(holds(
            "ForAllValues:StringEquals",
            "aws:TagKeys",
            json!(["team", "cost", "env"]),
            &tags
        ));
        assert!(!holds(
            "ForAllValues:StringEquals",
            "aws:TagKeys",
            json!(["team"]),
            &tags
        ));
        assert!(holds(
            "ForAllValues:StringEquals",
            "aws:TagKeys",
            json!(["team"]),
            &[]
        ));
        assert!(holds(
            "ForAnyValue:StringEquals",
            "aws:TagKeys",
            json!(["cost"]),
            &tags
        ));
        assert!(!holds(
            "ForAnyValue:StringEquals",
            "aws:TagKeys",
            json!(["x"]),
            &tags
        ));
        assert!(!holds(
            "ForAnyValue:StringEquals",
            "aws:TagKeys",
            json!(["x"]),
            &[]
        ));
        assert!(holds(
            "ForAnyValue:StringEqualsIfExists",
            "aws:TagKeys",
            json!(["x"]),
            &[]
        ));
        assert!(holds(
            "ForAnyValue:StringNotEquals",
            "aws:TagKeys",
            json!(["team"]),
            &tags
        ));
        assert!(!holds(
            "ForAllValues:StringNotEquals",
            "aws:TagKeys",
            json!(["team"]),
            &tags
        ));
        assert!(holds(
            "ForAnyValue:StringLike",
            "aws:TagKeys",
            json!("c*"),
            &tags
        ));
    }

    #[test]
    fn condition_values_are_checked_when_parsed() {
        let bad = |operator: &str, value: Value| {
            PolicyDocument::from_value(
                &json!({"Statement": {"Effect": "Deny", "Action": "*", "Resource": "*",
                    "Condition": {operator: {"k": value}}}}),
                PolicyKind::Identity,
            )
            .unwrap_err()
            .to_string()
        };
        assert!(bad("NumericEquals", json!("ten")).contains("is not a number"));
        assert!(bad("DateLessThan", json!("yesterday")).contains("is not a date"));
        assert!(bad("Bool", json!("yes")).contains("true or false"));
        assert!(bad("IpAddress", json!("300.1.1.1/8")).contains("CIDR"));
        assert!(bad("IpAddress", json!("10.0.0.0/33")).contains("CIDR"));
        assert!(bad("Null", json!("maybe")).contains("true or false"));
        assert!(bad("NullIfExists", json!("true")).contains("unknown condition operator"));
        assert_eq!(
            bad("ForAnyValue:stringequals", json!("x")),
            "Statement 1: condition operator \"ForAnyValue:stringequals\" must be spelled \"ForAnyValue:StringEquals\""
        );
    }

    #[test]
    fn principals() {
        let role_session = "arn:aws:sts::000000000000:assumed-role/deployer/ci-run";
        let callers: [(&str, &str, Option<&str>); 5] = [
            (ALICE, ACCT, None),
            (role_session, ACCT, None),
            ("arn:aws:iam::111111111111:user/carol", "111111111111", None),
            ("arn:aws:iam::000000000000:root", ACCT, None),
            ("s3.amazonaws.com", ACCT, Some("s3.amazonaws.com")),
        ];
        let matches = |principal: Value| -> Vec<bool> {
            let doc = resource(json!({"Statement": {
                "Effect": "Allow", "Action": "*", "Resource": "*", "Principal": principal,
            }}));
            callers
                .iter()
                .map(|&(principal_arn, account, service)| {
                    let c = RequestContext {
                        principal_arn,
                        account,
                        service,
                        ..ctx("lambda:InvokeFunction", F)
                    };
                    evaluate(&[], Some(&doc), &c) == Decision::Allow
                })
                .collect()
        };
        let t = true;
        let f = false;
        assert_eq!(matches(json!("*")), [t, t, t, t, t]);
        assert_eq!(matches(json!({"AWS": "*"})), [t, t, t, t, t]);
        assert_eq!(matches(json!({"AWS": ACCT})), [t, t, f, t, f]);
        assert_eq!(
            matches(json!({"AWS": "arn:aws:iam::000000000000:root"})),
            [t, t, f, t, f]
        );
        assert_eq!(matches(json!({"AWS": ["111111111111"]})), [f, f, t, f, f]);
        assert_eq!(matches(json!({"AWS": ALICE})), [t, f, f, f, f]);
        assert_eq!(
            matches(json!({"AWS": "arn:aws:iam::000000000000:user/Alice"})),
            [f, f, f, f, f]
        );
        assert_eq!(
            matches(json!({"AWS": "arn:aws:iam::000000000000:role/deployer"})),
            [f, t, f, f, f]
        );
        assert_eq!(
            matches(json!({"AWS": "arn:aws:iam::000000000000:role/ci/deployer"})),
            [f, t, f, f, f]
        );
        assert_eq!(
            matches(json!({"AWS": "arn:aws:iam::000000000000:role/deploy"})),
            [f, f, f, f, f]
        );
        assert_eq!(
            matches(json!({"AWS": "arn:aws:iam::111111111111:role/deployer"})),
            [f, f, f, f, f]
        );
        assert_eq!(matches(json!({"AWS": role_session})), [f, t, f, f, f]);
        assert_eq!(
            matches(json!({"Service": "s3.amazonaws.com"})),
            [f, f, f, f, t]
        );
        assert_eq!(
            matches(json!({"Service": ["sns.amazonaws.com"]})),
            [f, f, f, f, f]
        );
        assert_eq!(
            matches(json!({"AWS": ALICE, "Service": "s3.amazonaws.com"})),
            [t, f, f, f, t]
        );
    }

    #[test]
    fn deny_wins_and_is_explained() {
        let allow_all = identity(
            json!({"Statement": {"Sid": "all", "Effect": "Allow", "Action": "*", "Resource": "*"}}),
        );
        let deny_delete = identity(json!({"Statement": [
            statement("Allow", json!("lambda:Get*"), json!("*")),
            {"Sid": "no-delete", "Effect": "Deny", "Action": "lambda:Delete*", "Resource": "*"},
        ]}));
        let res = resource(json!({"Statement": [
            {"Sid": "everyone", "Effect": "Allow", "Principal": "*", "Action": "lambda:InvokeFunction", "Resource": F},
            {"Sid": "not-alice", "Effect": "Deny", "Principal": {"AWS": ALICE}, "Action": "lambda:Update*", "Resource": F},
        ]}));
        let ids = [allow_all, deny_delete];

        let delete = ctx("lambda:DeleteFunction", F);
        let e = evaluate_explained(&ids, Some(&res), &delete);
        assert_eq!(e.decision, Decision::ExplicitDeny);
        assert_eq!(
            e.statement,
            Some(DecidingStatement {
                source: PolicySource::Identity(1),
                index: 1,
                sid: Some("no-delete")
            })
        );
        assert_eq!(
            e.message(&delete),
            format!(
                "User: {ALICE} is not authorized to perform: lambda:DeleteFunction on resource: {F} with an explicit deny in an identity-based policy"
            )
        );

        let update = ctx("lambda:UpdateFunctionCode", F);
        let e = evaluate_explained(&ids, Some(&res), &update);
        assert_eq!(e.decision, Decision::ExplicitDeny);
        assert_eq!(
            e.statement.map(|s| (s.source, s.sid)),
            Some((PolicySource::Resource, Some("not-alice")))
        );
        assert!(
            e.message(&update)
                .ends_with("with an explicit deny in a resource-based policy")
        );
        assert_eq!(
            Decision::ExplicitDeny.message(&update),
            format!(
                "User: {ALICE} is not authorized to perform: lambda:UpdateFunctionCode on resource: {F} with an explicit deny"
            )
        );

        // The resource policy alone allows; the first allow is named.
        let invoke = ctx("lambda:InvokeFunction", F);
        let e = evaluate_explained(&[], Some(&res), &invoke);
        assert_eq!(e.decision, Decision::Allow);
        assert!(e.decision.is_allowed());
        assert_eq!(
            e.statement.map(|s| (s.source, s.index)),
            Some((PolicySource::Resource, 0))
        );
        let e = evaluate_explained(&ids, Some(&res), &invoke);
        assert_eq!(
            e.statement.map(|s| (s.source, s.sid)),
            Some((PolicySource::Identity(0), Some("all")))
        );

        let e = evaluate_explained(&ids[1..], None, &invoke);
        assert_eq!(e.decision, Decision::ImplicitDeny);
        assert_eq!(e.statement, None);
        assert_eq!(
            e.message(&invoke),
            format!(
                "User: {ALICE} is not authorized to perform: lambda:InvokeFunction on resource: {F} because no identity-based policy allows the lambda:InvokeFunction action"
            )
        );
        assert_eq!(e.message(&invoke), Decision::ImplicitDeny.message(&invoke));
        assert_eq!(
            Decision::Allow.message(&invoke),
            format!(
                "User: {ALICE} is authorized to perform: lambda:InvokeFunction on resource: {F}"
            )
        );
    }

    // ---- the reference model, written apart from the code above ----

    /// Dynamic programming over characters: `m[i][j]` says whether the
    /// first `i` pattern characters match the first `j` text characters.
    fn ref_glob(pattern: &str, text: &str, ignore_case: bool) -> bool {
        let norm = |s: &str| -> Vec<char> {
            s.chars()
                .map(|c| {
                    if ignore_case {
                        c.to_ascii_lowercase()
                    } else {
                        c
                    }
                })
                .collect()
        };
        let (p, t) = (norm(pattern), norm(text));
        let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
        m[0][0] = true;
        for i in 1..=p.len() {
            for j in 0..=t.len() {
                m[i][j] = match p[i - 1] {
                    '*' => m[i - 1][j] || (j > 0 && m[i][j - 1]),
                    '?' => j > 0 && m[i - 1][j - 1],
                    c => j > 0 && m[i - 1][j - 1] && t[j - 1] == c,
                };
            }
        }
        m[p.len()][t.len()]
    }

    fn ref_arn(pattern: &str, value: &str) -> bool {
        if pattern.split(':').count() < 6 {
            return ref_glob(pattern, value, false);
        }
        let p: Vec<&str> = pattern.splitn(6, ':').collect();
        let v: Vec<&str> = value.splitn(6, ':').collect();
        v.len() == 6 && p.iter().zip(&v).all(|(a, b)| ref_glob(a, b, false))
    }

    const OPS: [&str; 8] = [
        "StringEquals",
        "StringNotEquals",
        "StringLike",
        "StringNotLike",
        "ArnEquals",
        "ArnLike",
        "ArnNotEquals",
        "ArnNotLike",
    ];
    const ACTIONS: [&str; 5] = [
        "lambda:Invoke",
        "lambda:InvokeAsync",
        "lambda:GetFunction",
        "lambda:CreateFunction",
        "lambda:DeleteFunction",
    ];
    const REQUEST_ACTIONS: [&str; 7] = [
        "lambda:Invoke",
        "lambda:InvokeAsync",
        "lambda:GetFunction",
        "lambda:CreateFunction",
        "lambda:DeleteFunction",
        "lambda:ListFunctions",
        "s3:GetObject",
    ];
    const RESOURCES: [&str; 5] = [
        "arn:aws:lambda:us-east-1:000000000000:function:f",
        "arn:aws:lambda:us-east-1:000000000000:function:f:1",
        "arn:aws:lambda:us-east-1:000000000000:function:f:prod",
        "arn:aws:lambda:us-east-1:000000000000:function:fn",
        "arn:aws:lambda:us-east-1:000000000000:function:g:$LATEST",
    ];
    const AWS_PRINCIPALS: [&str; 11] = [
        "*",
        "000000000000",
        "111111111111",
        "arn:aws:iam::000000000000:root",
        "arn:aws:iam::111111111111:root",
        "arn:aws:iam::000000000000:user/alice",
        "arn:aws:iam::000000000000:user/bob",
        "arn:aws:iam::000000000000:role/deployer",
        "arn:aws:iam::000000000000:role/team/deployer",
        "arn:aws:iam::111111111111:role/deployer",
        "arn:aws:sts::000000000000:assumed-role/deployer/s1",
    ];
    const SERVICES: [&str; 2] = ["s3.amazonaws.com", "sns.amazonaws.com"];
    const CONDITION_KEYS: [&str; 3] = ["aws:SourceArn", "AWS:SourceArn", "aws:SourceAccount"];
    const CONDITION_VALUES: [&str; 11] = [
        "000000000000",
        "111111111111",
        "0*",
        "arn:aws:s3:::bucket",
        "arn:aws:s3:::*",
        "arn:aws:s3:::b?cket",
        "arn:*:s3:*:*:*",
        "arn:aws:sns:us-east-1:000000000000:topic",
        "arn:aws:sns:*:000000000000:*",
        "arn:aws:*",
        "*",
    ];
    const CONTEXT_KEYS: [&str; 4] = [
        "aws:SourceArn",
        "AWS:SOURCEARN",
        "aws:SourceAccount",
        "aws:sourceaccount",
    ];
    const CONTEXT_VALUES: [&str; 5] = [
        "000000000000",
        "111111111111",
        "arn:aws:s3:::bucket",
        "arn:aws:s3:::bocket",
        "arn:aws:sns:us-east-1:000000000000:topic",
    ];

    /// A caller, described plainly for the reference.
    #[derive(Debug, Clone, Copy)]
    struct Caller {
        arn: &'static str,
        account: &'static str,
        service: Option<&'static str>,
        /// For a role session: the role's name.
        role: Option<&'static str>,
    }

    const CALLERS: [Caller; 5] = [
        Caller {
            arn: "arn:aws:iam::000000000000:user/alice",
            account: "000000000000",
            service: None,
            role: None,
        },
        Caller {
            arn: "arn:aws:iam::000000000000:user/bob",
            account: "000000000000",
            service: None,
            role: None,
        },
        Caller {
            arn: "arn:aws:sts::000000000000:assumed-role/deployer/s1",
            account: "000000000000",
            service: None,
            role: Some("deployer"),
        },
        Caller {
            arn: "arn:aws:iam::111111111111:user/carol",
            account: "111111111111",
            service: None,
            role: None,
        },
        Caller {
            arn: "s3.amazonaws.com",
            account: "000000000000",
            service: Some("s3.amazonaws.com"),
            role: None,
        },
    ];

    #[derive(Debug, Clone)]
    enum GPrincipal {
        Star,
        Listed {
            aws: Vec<&'static str>,
            services: Vec<&'static str>,
        },
    }

    /// (operator index, IfExists, key) → values; a map, like JSON's.
    type GConditions = BTreeMap<(usize, bool, &'static str), Vec<&'static str>>;

    #[derive(Debug, Clone)]
    struct GStatement {
        deny: bool,
        not_action: bool,
        actions: Vec<String>,
        not_resource: bool,
        resources: Vec<String>,
        principal: Option<GPrincipal>,
        conditions: GConditions,
    }

    #[derive(Debug, Clone)]
    struct GDocument {
        version: bool,
        single: bool,
        statements: Vec<GStatement>,
    }

    #[derive(Debug, Clone)]
    struct GRequest {
        caller: Caller,
        action: String,
        resource: &'static str,
        context: Vec<(&'static str, &'static str)>,
    }

    fn one_or_many<T: Into<Value> + Clone>(items: &[T]) -> Value {
        match items {
            [one] => one.clone().into(),
            many => many.to_vec().into(),
        }
    }

    impl GStatement {
        fn to_json(&self, index: usize) -> Value {
            let mut s = Map::new();
            s.insert("Sid".into(), format!("S{index}").into());
            s.insert(
                "Effect".into(),
                if self.deny { "Deny" } else { "Allow" }.into(),
            );
            let a = if self.not_action {
                "NotAction"
            } else {
                "Action"
            };
            s.insert(a.into(), one_or_many(&self.actions));
            let r = if self.not_resource {
                "NotResource"
            } else {
                "Resource"
            };
            s.insert(r.into(), one_or_many(&self.resources));
            match &self.principal {
                None => {}
                Some(GPrincipal::Star) => {
                    s.insert("Principal".into(), "*".into());
                }
                Some(GPrincipal::Listed { aws, services }) => {
                    let mut p = Map::new();
                    if !aws.is_empty() {
                        p.insert("AWS".into(), one_or_many(aws));
                    }
                    if !services.is_empty() {
                        p.insert("Service".into(), one_or_many(services));
                    }
                    s.insert("Principal".into(), p.into());
                }
            }
            if !self.conditions.is_empty() {
                let mut c = Map::new();
                for ((op, if_exists, key), values) in &self.conditions {
                    let name = format!("{}{}", OPS[*op], if *if_exists { "IfExists" } else { "" });
                    let entry = c.entry(name).or_insert_with(|| json!({}));
                    entry[*key] = one_or_many(values);
                }
                s.insert("Condition".into(), c.into());
            }
            s.into()
        }
    }

    impl GDocument {
        fn to_json(&self) -> String {
            let statements: Vec<Value> = self
                .statements
                .iter()
                .enumerate()
                .map(|(i, s)| s.to_json(i))
                .collect();
            let mut d = Map::new();
            if self.version {
                d.insert("Version".into(), "2012-10-17".into());
            }
            let body = match statements.as_slice() {
                [one] if self.single => one.clone(),
                _ => statements.into(),
            };
            d.insert("Statement".into(), body);
            Value::Object(d).to_string()
        }
    }

    fn ref_principal(p: &GPrincipal, c: &Caller) -> bool {
        let (aws, services) = match p {
            GPrincipal::Star => return true,
            GPrincipal::Listed { aws, services } => (aws, services),
        };
        let aws_ok = |a: &str| -> bool {
            if a == "*" {
                return true;
            }
            if c.service.is_some() {
                return false;
            }
            if a.len() == 12 && a.chars().all(|ch| ch.is_ascii_digit()) {
                return a == c.account;
            }
            if let Some(acct) = a
                .strip_prefix("arn:aws:iam::")
                .and_then(|r| r.strip_suffix(":root"))
            {
                return acct == c.account;
            }
            if a == c.arn {
                return true;
            }
            match c.role {
                Some(role) => {
                    a.starts_with(&format!("arn:aws:iam::{}:role/", c.account))
                        && a.rsplit('/').next() == Some(role)
                }
                None => false,
            }
        };
        aws.iter().any(|a| aws_ok(a)) || services.iter().any(|s| c.service == Some(*s))
    }

    fn ref_condition(
        op: usize,
        if_exists: bool,
        key: &str,
        values: &[&str],
        context: &[(&str, &str)],
    ) -> bool {
        let name = OPS[op];
        let negated = name.contains("Not");
        let found: Vec<&str> = context
            .iter()
            .filter(|(k, _)| k.to_lowercase() == key.to_lowercase())
            .map(|(_, v)| *v)
            .collect();
        if found.is_empty() {
            return if_exists || negated;
        }
        let one = |p: &str, v: &str| {
            if name.starts_with("Arn") {
                ref_arn(p, v)
            } else if name.contains("Like") {
                ref_glob(p, v, false)
            } else {
                p == v
            }
        };
        let any = found.iter().any(|v| values.iter().any(|p| one(p, v)));
        if negated { !any } else { any }
    }

    fn ref_applies(s: &GStatement, r: &GRequest) -> bool {
        let action_hit = s.actions.iter().any(|p| ref_glob(p, &r.action, true));
        let resource_hit = s.resources.iter().any(|p| ref_glob(p, r.resource, false));
        let principal_ok = match &s.principal {
            None => true,
            Some(p) => ref_principal(p, &r.caller),
        };
        let conditions_ok = s
            .conditions
            .iter()
            .all(|((op, ie, key), values)| ref_condition(*op, *ie, key, values, &r.context));
        (action_hit != s.not_action)
            && (resource_hit != s.not_resource)
            && principal_ok
            && conditions_ok
    }

    fn ref_decide(identity: &[GDocument], resource: Option<&GDocument>, r: &GRequest) -> Decision {
        let applicable: Vec<&GStatement> = identity
            .iter()
            .chain(resource)
            .flat_map(|d| &d.statements)
            .filter(|s| ref_applies(s, r))
            .collect();
        if applicable.iter().any(|s| s.deny) {
            Decision::ExplicitDeny
        } else if applicable.iter().any(|s| !s.deny) {
            Decision::Allow
        } else {
            Decision::ImplicitDeny
        }
    }

    // ---- generators ----

    /// A base string with random spans replaced by `*`, by as many `?`,
    /// or upper-cased.
    fn pattern(bases: &'static [&'static str]) -> impl Strategy<Value = String> {
        let edited = (
            select(bases),
            prop::collection::vec((any::<Index>(), 0usize..6, 0u8..4), 0..3),
        )
            .prop_map(|(base, edits)| {
                let mut s = base.to_owned();
                for (at, len, kind) in edits {
                    let start = at.index(s.len() + 1);
                    let end = (start + len).min(s.len());
                    let with = match kind {
                        0 | 1 => "*".to_owned(),
                        2 => "?".repeat(end - start),
                        _ => s[start..end].to_ascii_uppercase(),
                    };
                    s.replace_range(start..end, &with);
                }
                s
            });
        prop_oneof![1 => Just("*".to_owned()), 4 => edited]
    }

    fn principal() -> impl Strategy<Value = GPrincipal> {
        let listed = (
            prop::collection::vec(select(&AWS_PRINCIPALS[..]), 0..3),
            prop::collection::vec(select(&SERVICES[..]), 0..2),
        )
            .prop_map(|(mut aws, services)| {
                if aws.is_empty() && services.is_empty() {
                    aws.push("*");
                }
                GPrincipal::Listed { aws, services }
            });
        prop_oneof![1 => Just(GPrincipal::Star), 8 => listed]
    }

    fn gstatement(resource_side: bool) -> impl Strategy<Value = GStatement> {
        let principal = if resource_side {
            principal().prop_map(Some).boxed()
        } else {
            Just(None).boxed()
        };
        let conditions = prop::collection::btree_map(
            (0usize..8, any::<bool>(), select(&CONDITION_KEYS[..])),
            prop::collection::vec(select(&CONDITION_VALUES[..]), 1..3),
            0..3,
        );
        (
            prop::bool::weighted(0.35),
            prop::bool::weighted(0.2),
            prop::collection::vec(pattern(&ACTIONS), 1..3),
            prop::bool::weighted(0.2),
            prop::collection::vec(pattern(&RESOURCES), 1..3),
            principal,
            prop_oneof![3 => Just(GConditions::new()), 1 => conditions],
        )
            .prop_map(
                |(deny, not_action, actions, not_resource, resources, principal, conditions)| {
                    GStatement {
                        deny,
                        not_action,
                        actions,
                        not_resource,
                        resources,
                        principal,
                        conditions,
                    }
                },
            )
    }

    fn gdocument(resource_side: bool) -> impl Strategy<Value = GDocument> {
        (
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(gstatement(resource_side), 0..5),
        )
            .prop_map(|(version, single, statements)| GDocument {
                version,
                single,
                statements,
            })
    }

    fn grequest() -> impl Strategy<Value = GRequest> {
        (
            select(&CALLERS[..]),
            select(&REQUEST_ACTIONS[..]),
            0u8..3,
            select(&RESOURCES[..]),
            prop::collection::vec(
                (select(&CONTEXT_KEYS[..]), select(&CONTEXT_VALUES[..])),
                0..3,
            ),
        )
            .prop_map(|(caller, action, case, resource, context)| GRequest {
                caller,
                action: match case {
                    0 => action.to_owned(),
                    1 => action.to_ascii_lowercase(),
                    _ => action.to_ascii_uppercase(),
                },
                resource,
                context,
            })
    }

    type Case = (Vec<GDocument>, Option<GDocument>, GRequest);

    fn case() -> impl Strategy<Value = Case> {
        (
            prop::collection::vec(gdocument(false), 0..3),
            prop::option::of(gdocument(true)),
            grequest(),
        )
    }

    /// Parses the generated documents and evaluates the request with the
    /// code under test.
    fn run_case(
        (identity, resource, r): &Case,
    ) -> (Decision, Option<(PolicySource, usize, Option<String>)>) {
        let ids: Vec<PolicyDocument> = identity
            .iter()
            .map(|d| PolicyDocument::parse_identity(&d.to_json()))
            .collect::<Result<_, _>>()
            .expect("generated identity documents parse");
        let res = resource
            .as_ref()
            .map(|d| PolicyDocument::parse_resource(&d.to_json()))
            .transpose()
            .expect("generated resource documents parse");
        let ctx = RequestContext {
            principal_arn: r.caller.arn,
            account: r.caller.account,
            service: r.caller.service,
            action: &r.action,
            resource: r.resource,
            conditions: &r.context,
        };
        let e = evaluate_explained(&ids, res.as_ref(), &ctx);
        assert_eq!(e.decision, evaluate(&ids, res.as_ref(), &ctx));
        (
            e.decision,
            e.statement
                .map(|s| (s.source, s.index, s.sid.map(str::to_owned))),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn evaluate_agrees_with_the_reference(case in case()) {
            let (decision, deciding) = run_case(&case);
            let (identity, resource, r) = &case;
            prop_assert_eq!(decision, ref_decide(identity, resource.as_ref(), r));
            match deciding {
                None => prop_assert_eq!(decision, Decision::ImplicitDeny),
                Some((source, index, sid)) => {
                    let doc = match source {
                        PolicySource::Identity(i) => &identity[i],
                        PolicySource::Resource => resource.as_ref().expect("resource document"),
                    };
                    let s = &doc.statements[index];
                    prop_assert!(ref_applies(s, r));
                    prop_assert_eq!(s.deny, decision == Decision::ExplicitDeny);
                    prop_assert_eq!(sid, Some(format!("S{index}")));
                }
            }
        }

        #[test]
        fn wildcard_agrees_with_the_reference(
            pattern in "[abé*?]{0,8}",
            text in "[abAé]{0,10}",
            ignore_case: bool,
        ) {
            prop_assert_eq!(
                wildcard_match(&pattern, &text, ignore_case),
                ref_glob(&pattern, &text, ignore_case)
            );
        }

        #[test]
        fn arn_conditions_agree_with_the_reference(
            pattern in "[a:*?]{0,12}",
            value in "[a:]{0,12}",
        ) {
            prop_assert_eq!(arn_match(&pattern, &value), ref_arn(&pattern, &value));
        }

        #[test]
        fn no_input_panics(doc in json_value(), text in any::<String>()) {
            let statement = json!({
                "Effect": "Allow", "Action": "*", "Resource": "*", "Principal": "*",
                "Condition": doc.clone(),
            });
            let wrapped = [
                doc.clone(),
                json!({"Statement": doc.clone()}),
                json!({"Statement": [doc.clone()]}),
                json!({"Statement": [statement]}),
            ];
            let conditions = [("aws:SourceArn", text.as_str()), (text.as_str(), "x")];
            let ctx = RequestContext {
                principal_arn: &text,
                account: &text,
                service: Some(&text),
                action: &text,
                resource: &text,
                conditions: &conditions,
            };
            for kind in [PolicyKind::Identity, PolicyKind::Resource] {
                let _ = PolicyDocument::parse(&text, kind);
                for v in &wrapped {
                    if let Ok(d) = PolicyDocument::from_value(v, kind) {
                        let _ = evaluate_explained(std::slice::from_ref(&d), Some(&d), &ctx).message(&ctx);
                    }
                }
            }
        }
    }

    /// JSON built from the policy language's own words, so that parsing
    /// gets deep before it refuses.
    fn json_value() -> impl Strategy<Value = Value> {
        const WORDS: [&str; 12] = [
            "Allow",
            "Deny",
            "*",
            "lambda:*",
            "arn:aws:lambda:us-east-1:000000000000:function:f",
            "2012-10-17",
            "s3.amazonaws.com",
            "000000000000",
            "arn:aws:iam::000000000000:root",
            "arn:aws:sts::0:assumed-role/r/s",
            "arn:::::",
            "é*?",
        ];
        const KEYS: [&str; 17] = [
            "Version",
            "Statement",
            "Sid",
            "Effect",
            "Principal",
            "Action",
            "NotAction",
            "Resource",
            "NotResource",
            "Condition",
            "AWS",
            "Service",
            "StringLike",
            "ArnNotLikeIfExists",
            "stringequalsifexists",
            "aws:SourceArn",
            "x",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            select(&WORDS[..]).prop_map(Value::from),
            ".{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(select(&KEYS[..]), inner, 0..6).prop_map(|m| {
                    Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
            ]
        })
    }

    /// The generator must keep all three outcomes common, or the property
    /// above proves little.
    #[test]
    fn generated_cases_reach_every_outcome() {
        let mut runner = TestRunner::deterministic();
        let strategy = case();
        let mut counts = [0usize; 3];
        for _ in 0..2000 {
            let c = strategy.new_tree(&mut runner).unwrap().current();
            let i = match run_case(&c).0 {
                Decision::Allow => 0,
                Decision::ExplicitDeny => 1,
                Decision::ImplicitDeny => 2,
            };
            counts[i] += 1;
        }
        eprintln!("allow, explicit deny, implicit deny: {counts:?}");
        assert!(counts.iter().all(|&n| n >= 200), "{counts:?}");
    }
}
