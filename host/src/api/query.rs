//! AWS's query protocol on kiln's endpoint: STS (`GetCallerIdentity`,
//! `AssumeRole`) and the part of IAM that Lambda tools use to make an
//! execution role (`CreateRole`, `GetRole`, `AttachRolePolicy`,
//! `UpdateAssumeRolePolicy`), so that `cargo lambda deploy` and the AWS
//! CLI's `sts get-caller-identity` work with only `--endpoint-url` set.
//!
//! Steps of one request, in order: read the form (`POST /`, at most
//! [`MAX_FORM`] bytes) or the query (`GET /?Action=...`); authenticate it
//! with SigV4 scoped to the service its `Action` belongs to; authorize it
//! (`iam:*`, `sts:AssumeRole`) with the caller's policies; act; answer in
//! XML, errors as `<ErrorResponse>`. Changes are recorded in the audit
//! trail like the Lambda API's.
//!
//! Roles made here are kiln roles: allowed nothing until a known AWS
//! managed policy is attached ([`crate::auth::keys::managed_policy`]), and
//! assumable as their trust policy says.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::auth::keys::{Caller, KeyError, Role};
use crate::auth::policy::{Decision, PolicyDocument, PolicyKind, RequestContext, evaluate};
use crate::auth::sigv4::{Incoming, SigV4Error};
use crate::auth::{AuthError, Authenticated, RequestConditions};

/// Largest form a query-protocol request may carry.
const MAX_FORM: usize = 64 * 1024;
/// Largest trust policy, as IAM's limit.
const MAX_TRUST_POLICY: usize = 2048;
const STS_NS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";
const IAM_NS: &str = "https://iam.amazonaws.com/doc/2010-05-08/";

/// An error in the query protocol's shape.
#[derive(Debug)]
struct QueryError {
    status: StatusCode,
    code: &'static str,
    message: String,
    namespace: &'static str,
}

impl QueryError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            namespace: STS_NS,
        }
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ValidationError", message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "ServiceFailure", message)
    }
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() {
            "Receiver"
        } else {
            "Sender"
        };
        let body = format!(
            "<ErrorResponse xmlns=\"{}\"><Error><Type>{kind}</Type><Code>{}</Code><Message>{}</Message></Error><RequestId>{}</RequestId></ErrorResponse>",
            self.namespace,
            self.code,
            xml(&self.message),
            uuid::Uuid::new_v4()
        );
        let mut response = (self.status, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
        if let Ok(v) = HeaderValue::from_str(self.code) {
            response.headers_mut().insert("x-amzn-errortype", v);
        }
        response
    }
}

/// Text for an XML element.
fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The service an action belongs to, as its credential scope names it.
fn service_of(action: &str) -> Option<&'static str> {
    match action {
        "GetCallerIdentity" | "AssumeRole" => Some("sts"),
        "CreateRole" | "GetRole" | "AttachRolePolicy" | "UpdateAssumeRolePolicy" => Some("iam"),
        _ => None,
    }
}

/// `POST /` and `GET /?Action=...`.
pub(super) async fn handle(State(s): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let source = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let bytes = match super::read_body(body, MAX_FORM, || {
        super::ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("A query request must be smaller than {MAX_FORM} bytes"),
        )
    })
    .await
    {
        Ok(b) => b,
        Err(e) => {
            return QueryError::new(e.status, "RequestEntityTooLarge", e.message).into_response();
        }
    };
    let form: BTreeMap<String, String> = if parts.method == axum::http::Method::POST {
        form_urlencoded::parse(&bytes).into_owned().collect()
    } else {
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect()
    };
    let action = form.get("Action").cloned().unwrap_or_default();
    let Some(service) = service_of(&action) else {
        return QueryError::new(
            StatusCode::BAD_REQUEST,
            "InvalidAction",
            format!(
                "kiln serves the query actions GetCallerIdentity and AssumeRole (STS) and \
                 CreateRole, GetRole, AttachRolePolicy and UpdateAssumeRolePolicy (IAM), not \
                 {action:?}"
            ),
        )
        .into_response();
    };
    let namespace = if service == "iam" { IAM_NS } else { STS_NS };
    let headers = super::header_pairs(&parts.headers);
    let incoming = Incoming {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &headers,
        body: &bytes,
    };
    let now = time::OffsetDateTime::now_utc();
    let caller = match s.auth.authenticate_for(&incoming, now, service) {
        Ok(c) => c,
        Err(e) => {
            let mut error = refusal(e);
            error.namespace = namespace;
            return error.into_response();
        }
    };
    // The change and its audit record run to the end even if the client
    // goes away (or the connection is shed) in between.
    let connection = parts
        .extensions
        .get::<super::connections::ConnectionAuth>()
        .cloned();
    let task = tokio::spawn(async move {
        let result = act(&s, &caller, &action, &form, source, now).await;
        if let (Ok(_), Some(connection)) = (&result, &connection) {
            connection.authenticated();
        }
        let response = match result {
            Ok(body) => {
                let mut r = (
                    StatusCode::OK,
                    format!(
                        "<{action}Response xmlns=\"{namespace}\"><{action}Result>{body}</{action}Result><ResponseMetadata><RequestId>{}</RequestId></ResponseMetadata></{action}Response>",
                        uuid::Uuid::new_v4()
                    ),
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
                r
            }
            Err(mut e) => {
                e.namespace = namespace;
                e.into_response()
            }
        };
        if action != "GetCallerIdentity" && action != "GetRole" {
            let entry = crate::audit::AuditEntry {
                principal: caller.identity.arn.clone(),
                source: source.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
                action: action.clone(),
                resource: role_arn(&s, &form).unwrap_or_else(|| "*".to_owned()),
                function: None,
                params: audit_params(&form),
                status: response.status().as_u16(),
                error: response
                    .headers()
                    .get("x-amzn-errortype")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            };
            if let Err(failed) = super::guard::record(&s, entry).await {
                return failed;
            }
        }
        response
    });
    task.await
        .unwrap_or_else(|e| QueryError::internal(e.to_string()).into_response())
}

/// The form without what must not be kept (nothing here is secret but the
/// signature, which is not in the form).
fn audit_params(form: &BTreeMap<String, String>) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = form
        .iter()
        .filter(|(k, _)| !k.starts_with("X-Amz-"))
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({ "form": map })
}

fn role_arn(s: &AppState, form: &BTreeMap<String, String>) -> Option<String> {
    form.get("RoleArn").cloned().or_else(|| {
        form.get("RoleName")
            .map(|n| format!("arn:aws:iam::{}:role/{n}", s.control.arn().account_id))
    })
}

fn refusal(e: AuthError) -> QueryError {
    match e {
        AuthError::Signature(SigV4Error::Missing) => QueryError::new(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationToken",
            SigV4Error::Missing.to_string(),
        ),
        AuthError::Signature(SigV4Error::UnknownKey) => QueryError::new(
            StatusCode::FORBIDDEN,
            "InvalidClientTokenId",
            SigV4Error::UnknownKey.to_string(),
        ),
        AuthError::Signature(e) => QueryError::new(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            e.to_string(),
        ),
        AuthError::Denied(m) => QueryError::new(StatusCode::FORBIDDEN, "AccessDenied", m),
        AuthError::Keys(e) => {
            tracing::error!(error = %e, "credential store");
            QueryError::internal("The credential store failed; see the server log")
        }
    }
}

fn key_error(e: KeyError) -> QueryError {
    match e {
        KeyError::NotFound(m) => QueryError::new(StatusCode::NOT_FOUND, "NoSuchEntity", m),
        KeyError::Invalid(m) if m.contains("already exists") => {
            QueryError::new(StatusCode::CONFLICT, "EntityAlreadyExists", m)
        }
        KeyError::Invalid(m) => QueryError::validation(m),
        other => {
            tracing::error!(error = %other, "credential store");
            QueryError::internal("The credential store failed; see the server log")
        }
    }
}

async fn with_credentials<T: Send + 'static>(
    s: &AppState,
    f: impl FnOnce(&crate::auth::keys::Credentials) -> Result<T, KeyError> + Send + 'static,
) -> Result<T, QueryError> {
    let credentials = s.auth.credentials().clone();
    tokio::task::spawn_blocking(move || f(&credentials))
        .await
        .map_err(|e| QueryError::internal(e.to_string()))?
        .map_err(key_error)
}

/// A `RoleName` as IAM's pattern `[\w+=,.@-]{1,64}` allows.
fn role_name(form: &BTreeMap<String, String>) -> Result<String, QueryError> {
    let name = required(form, "RoleName")?;
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b));
    if !ok {
        return Err(QueryError::validation(format!(
            "1 validation error detected: Value '{}' at 'roleName' failed to satisfy constraint: \
             Member must satisfy regular expression pattern: [\\w+=,.@-]+ (1 to 64 characters)",
            name.chars().take(80).collect::<String>()
        )));
    }
    Ok(name.to_owned())
}

fn required<'a>(form: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, QueryError> {
    form.get(name).map(String::as_str).ok_or_else(|| {
        QueryError::validation(format!(
            "1 validation error detected: Value null at '{}' failed to satisfy constraint: \
             Member must not be null",
            lower_first(name)
        ))
    })
}

fn lower_first(name: &str) -> String {
    let mut c = name.chars();
    c.next()
        .map(|f| f.to_ascii_lowercase().to_string() + c.as_str())
        .unwrap_or_default()
}

/// Authorizes an IAM action on the role `name` of this account.
fn authorize_role(
    s: &AppState,
    caller: &Authenticated,
    action: &str,
    name: &str,
    source: Option<SocketAddr>,
    now: time::OffsetDateTime,
) -> Result<(), QueryError> {
    let arn = format!("arn:aws:iam::{}:role/{name}", s.control.arn().account_id);
    authorize(s, caller, action, &arn, source, now)
}

/// Authorizes an IAM or STS action on a role for a caller that is not root.
fn authorize(
    s: &AppState,
    caller: &Authenticated,
    action: &str,
    resource: &str,
    source: Option<SocketAddr>,
    now: time::OffsetDateTime,
) -> Result<(), QueryError> {
    let conditions = RequestConditions::base(
        &caller.identity,
        &s.control.arn().account_id,
        source.map(|a| a.ip()),
        now,
    );
    s.auth
        .authorize_action(&caller.identity, action, resource, None, &conditions)
        .map_err(refusal)
}

async fn act(
    s: &AppState,
    caller: &Authenticated,
    action: &str,
    form: &BTreeMap<String, String>,
    source: Option<SocketAddr>,
    now: time::OffsetDateTime,
) -> Result<String, QueryError> {
    let account = s.control.arn().account_id.clone();
    let identity = &caller.identity;
    match action {
        // Needs no permission, as in AWS.
        "GetCallerIdentity" => Ok(format!(
            "<Arn>{}</Arn><UserId>{}</UserId><Account>{account}</Account>",
            xml(&identity.arn),
            xml(&identity.user_id)
        )),
        "CreateRole" => {
            let name = role_name(form)?;
            let trust = trust_policy(required(form, "AssumeRolePolicyDocument")?)?;
            authorize_role(s, caller, "iam:CreateRole", &name, source, now)?;
            let role = with_credentials(s, move |c| c.create_role_with_trust(&name, trust)).await?;
            Ok(format!("<Role>{}</Role>", role_xml(&role)))
        }
        "GetRole" => {
            let name = role_name(form)?;
            authorize_role(s, caller, "iam:GetRole", &name, source, now)?;
            let role = with_credentials(s, move |c| {
                c.role(&name)?.ok_or_else(|| {
                    KeyError::NotFound(format!("The role with name {name} cannot be found."))
                })
            })
            .await?;
            Ok(format!("<Role>{}</Role>", role_xml(&role)))
        }
        "AttachRolePolicy" => {
            let name = role_name(form)?;
            let policy = required(form, "PolicyArn")?.to_owned();
            authorize_role(s, caller, "iam:AttachRolePolicy", &name, source, now)?;
            if crate::auth::keys::managed_policy(&policy).is_none() {
                return Err(QueryError::new(
                    StatusCode::NOT_FOUND,
                    "NoSuchEntity",
                    format!(
                        "Policy {policy} does not exist or is not attachable: kiln knows the \
                         managed policies AWSLambdaBasicExecutionRole and AWSLambdaRole; give a \
                         role other permissions with `kiln roles create NAME --policy FILE`"
                    ),
                ));
            }
            with_credentials(s, move |c| {
                c.update_role(&name, |role| {
                    if !role.attached_policies.contains(&policy) {
                        role.attached_policies.push(policy);
                    }
                })
            })
            .await?;
            Ok(String::new())
        }
        "UpdateAssumeRolePolicy" => {
            let name = role_name(form)?;
            let trust = trust_policy(required(form, "PolicyDocument")?)?;
            authorize_role(s, caller, "iam:UpdateAssumeRolePolicy", &name, source, now)?;
            with_credentials(s, move |c| {
                c.update_role(&name, |role| role.assume_role_policy = Some(trust))
            })
            .await?;
            Ok(String::new())
        }
        "AssumeRole" => assume_role(s, caller, form, source, now).await,
        _ => Err(QueryError::new(
            StatusCode::BAD_REQUEST,
            "InvalidAction",
            format!("unknown action {action}"),
        )),
    }
}

/// `sts:AssumeRole`: the caller's identity policies and the role's trust
/// policy decide together (an explicit deny in either refuses), and the
/// trust policy must allow the caller. kiln's root key may assume any role,
/// as it may do anything else (AWS's root user may not; kiln's root key is
/// its everyday administrator key).
async fn assume_role(
    s: &AppState,
    caller: &Authenticated,
    form: &BTreeMap<String, String>,
    source: Option<SocketAddr>,
    now: time::OffsetDateTime,
) -> Result<String, QueryError> {
    let role_arn = required(form, "RoleArn")?.to_owned();
    let session = required(form, "RoleSessionName")?.to_owned();
    let session_ok = (2..=64).contains(&session.len())
        && session
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
    if !session_ok {
        return Err(QueryError::validation(format!(
            "1 validation error detected: Value '{session}' at 'roleSessionName' failed to \
             satisfy constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]* \
             (2 to 64 characters)"
        )));
    }
    let seconds = match form.get("DurationSeconds") {
        None => 3600,
        Some(d) => d
            .parse::<u64>()
            .ok()
            .filter(|d| (900..=43_200).contains(d))
            .ok_or_else(|| {
                QueryError::validation(format!(
                    "DurationSeconds must be a number from 900 to 43200, not {d:?}"
                ))
            })?,
    };
    let lookup = role_arn.clone();
    let role = with_credentials(s, move |c| {
        c.role(&lookup)?
            .ok_or_else(|| KeyError::NotFound(format!("Role {lookup} does not exist")))
    })
    .await
    .map_err(|e| {
        if e.code == "NoSuchEntity" {
            QueryError::new(StatusCode::FORBIDDEN, "AccessDenied", e.message)
        } else {
            e
        }
    })?;
    if matches!(caller.identity.caller, Caller::Role { .. }) && seconds > 3600 {
        return Err(QueryError::validation(
            "The requested DurationSeconds exceeds the 1 hour session limit for roles assumed \
             by role chaining.",
        ));
    }
    if caller.identity.caller != Caller::Root {
        let identity_policies: Vec<PolicyDocument> = caller
            .identity
            .policies
            .iter()
            .filter_map(|p| PolicyDocument::from_value(p, PolicyKind::Identity).ok())
            .collect();
        let trust = role
            .assume_role_policy
            .as_ref()
            .and_then(|p| PolicyDocument::from_value(p, PolicyKind::Trust).ok());
        let conditions = RequestConditions::base(
            &caller.identity,
            &s.control.arn().account_id,
            source.map(|a| a.ip()),
            now,
        );
        let pairs = conditions.pairs();
        let ctx = RequestContext {
            principal_arn: &caller.identity.arn,
            account: &s.control.arn().account_id,
            service: None,
            action: "sts:AssumeRole",
            resource: &role.arn,
            conditions: &pairs,
        };
        // IAM's rule for a role in the caller's account: its trust policy
        // must allow the caller, nothing may deny, and where the trust
        // names the account (not the caller), the caller's own policies
        // must allow sts:AssumeRole too.
        let trusted = trust
            .as_ref()
            .is_some_and(|t| evaluate(&[], Some(t), &ctx) == Decision::Allow);
        let decision = evaluate(&identity_policies, trust.as_ref(), &ctx);
        let named = trust.as_ref().is_some_and(|t| names_caller(t, &ctx));
        let identity_allows = evaluate(&identity_policies, None, &ctx) == Decision::Allow;
        if !trusted || decision != Decision::Allow || !(named || identity_allows) {
            return Err(QueryError::new(
                StatusCode::FORBIDDEN,
                "AccessDenied",
                format!(
                    "User: {} is not authorized to perform: sts:AssumeRole on resource: {}",
                    caller.identity.arn, role.arn
                ),
            ));
        }
    }
    let issued = with_credentials(s, {
        let (role, session) = (role.clone(), session.clone());
        move |credentials| {
            Ok(credentials.issue_session(
                &role,
                &session,
                std::time::Duration::from_secs(seconds),
                None,
            ))
        }
    })
    .await?;
    let expiration = time::OffsetDateTime::from_unix_timestamp(issued.expires)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    Ok(format!(
        "<Credentials><AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey><SessionToken>{}</SessionToken><Expiration>{expiration}</Expiration></Credentials><AssumedRoleUser><AssumedRoleId>{}:{}</AssumedRoleId><Arn>arn:aws:sts::{}:assumed-role/{}/{}</Arn></AssumedRoleUser>",
        issued.access_key_id,
        xml(issued.secret_access_key.expose()),
        xml(&issued.session_token),
        role.role_id,
        xml(&session),
        s.control.arn().account_id,
        role.role_name,
        xml(&session),
    ))
}

/// Whether an applicable Allow of the trust policy names the caller itself
/// (its ARN, its role for a session, or `*`) rather than its account.
fn names_caller(trust: &PolicyDocument, ctx: &RequestContext<'_>) -> bool {
    use crate::auth::policy::{AwsPrincipal, Effect, Principal};
    trust.statements().iter().any(|s| {
        s.effect == Effect::Allow
            && s.applies(ctx)
            && match &s.principal {
                Some(Principal::Anyone) => true,
                Some(Principal::Listed { aws, .. }) => aws.iter().any(|a| {
                    matches!(a, AwsPrincipal::Anyone)
                        || (matches!(a, AwsPrincipal::Arn(_)) && a.matches(ctx))
                }),
                None => false,
            }
    })
}

/// A trust policy as IAM takes it: its statements name principals and no
/// resource (the role is the resource); at most 2,048 characters.
fn trust_policy(text: &str) -> Result<serde_json::Value, QueryError> {
    let malformed =
        |m: String| QueryError::new(StatusCode::BAD_REQUEST, "MalformedPolicyDocument", m);
    if text.len() > MAX_TRUST_POLICY {
        return Err(malformed(format!(
            "The trust policy has {} characters; at most {MAX_TRUST_POLICY} are allowed",
            text.len()
        )));
    }
    PolicyDocument::parse(text, PolicyKind::Trust).map_err(|e| malformed(e.to_string()))?;
    serde_json::from_str(text).map_err(|e| malformed(e.to_string()))
}

fn role_xml(role: &Role) -> String {
    let trust = role
        .assume_role_policy
        .as_ref()
        .map(|p| {
            let text = p.to_string();
            let encoded: String = form_urlencoded::byte_serialize(text.as_bytes()).collect();
            format!(
                "<AssumeRolePolicyDocument>{}</AssumeRolePolicyDocument>",
                xml(&encoded)
            )
        })
        .unwrap_or_default();
    format!(
        "<Path>/</Path><RoleName>{}</RoleName><RoleId>{}</RoleId><Arn>{}</Arn><CreateDate>{}</CreateDate>{trust}<MaxSessionDuration>3600</MaxSessionDuration>",
        xml(&role.role_name),
        xml(&role.role_id),
        xml(&role.arn),
        xml(&role.create_date),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_text_is_escaped() {
        assert_eq!(xml("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&apos;");
    }

    #[test]
    fn actions_name_their_service() {
        assert_eq!(service_of("GetCallerIdentity"), Some("sts"));
        assert_eq!(service_of("CreateRole"), Some("iam"));
        assert_eq!(service_of("DeleteRole"), None);
    }

    #[test]
    fn trust_policies_are_checked() {
        let ok = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["sts:AssumeRole"],"Principal":{"Service":"lambda.amazonaws.com"}}]}"#;
        trust_policy(ok).unwrap();
        assert_eq!(
            trust_policy("{}").unwrap_err().code,
            "MalformedPolicyDocument"
        );
        let no_principal = r#"{"Statement":[{"Effect":"Allow","Action":"sts:AssumeRole"}]}"#;
        assert!(trust_policy(no_principal).is_err());
    }

    #[test]
    fn errors_are_query_protocol_xml() {
        let r = QueryError::new(StatusCode::NOT_FOUND, "NoSuchEntity", "no <role>").into_response();
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["content-type"], "text/xml");
    }
}
