//! Authentication and authorization of API requests.
//!
//! Every request but the health checks and `/metrics` goes through
//! [`Authenticator`]: SigV4 verification ([`sigv4`]) against the credential
//! store ([`keys`]), then IAM-style evaluation ([`policy`]) of the caller's
//! identity policies and the resource's policy for the operation
//! ([`operations`]). The root key is allowed everything.

pub mod keys;
pub mod operations;
pub mod policy;
pub mod sigv4;

use std::sync::Arc;

use time::OffsetDateTime;

use self::keys::{Caller, Credentials, Identity, KeyError};
use self::operations::Operation;
use self::policy::{Decision, PolicyDocument, PolicyKind, RequestContext};
use self::sigv4::{Incoming, SigV4Error, VerifyConfig};

/// Why a request is refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Authentication failed.
    #[error(transparent)]
    Signature(#[from] SigV4Error),
    /// The caller may not do this.
    #[error("{0}")]
    Denied(String),
    /// The credential store failed.
    #[error(transparent)]
    Keys(#[from] KeyError),
}

/// A request's verified caller, and the key it signed with (to presign
/// links on its behalf).
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// Who.
    pub identity: Identity,
    secret: keys::Secret,
    session_token: Option<String>,
}

/// A request whose signature names a known key, before the signature
/// itself is checked.
#[derive(Debug)]
pub struct Pending {
    claim: sigv4::Claim,
    secret: keys::Secret,
    identity: Identity,
}

/// How long presigned links (`Code.Location`, layer `Content.Location`)
/// stay valid: Lambda's 10 minutes.
pub const PRESIGN_EXPIRY: u64 = 600;

/// Verifies signatures and evaluates policies.
#[derive(Debug)]
pub struct Authenticator {
    credentials: Arc<Credentials>,
    config: VerifyConfig,
}

impl Authenticator {
    /// An authenticator over `credentials`, checking signatures per `config`.
    pub fn new(credentials: Arc<Credentials>, config: VerifyConfig) -> Self {
        Self {
            credentials,
            config,
        }
    }

    /// What signatures are checked against.
    pub fn config(&self) -> &VerifyConfig {
        &self.config
    }

    /// The credential store.
    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    /// Who signed `req`, if the signature holds.
    pub fn authenticate(
        &self,
        req: &Incoming<'_>,
        now: OffsetDateTime,
    ) -> Result<Authenticated, AuthError> {
        let pending = self.identify(req, now)?;
        self.verify(req, pending)
    }

    /// The first half of [`Self::authenticate`], from the method, path,
    /// query and headers alone (the body is not looked at): the signature's
    /// form, scope and date, and a known key. The API runs it before
    /// reading a body, so only holders of a key can make it buffer one.
    pub fn identify(&self, head: &Incoming<'_>, now: OffsetDateTime) -> Result<Pending, AuthError> {
        self.identify_with(head, now, &self.config)
    }

    /// Who signed `req` for another service of this endpoint (`sts`,
    /// `iam`: their credential scopes name them), if the signature holds.
    pub fn authenticate_for(
        &self,
        req: &Incoming<'_>,
        now: OffsetDateTime,
        service: &str,
    ) -> Result<Authenticated, AuthError> {
        let config = VerifyConfig {
            service: service.to_owned(),
            ..self.config.clone()
        };
        let Pending {
            claim,
            secret,
            identity,
        } = self.identify_with(req, now, &config)?;
        sigv4::verify(req, &claim, secret.expose(), &config)?;
        Ok(Authenticated {
            identity,
            secret,
            session_token: claim.session_token,
        })
    }

    fn identify_with(
        &self,
        head: &Incoming<'_>,
        now: OffsetDateTime,
        config: &VerifyConfig,
    ) -> Result<Pending, AuthError> {
        let claim = sigv4::claim(head, config, now)?;
        let (secret, identity) = match &claim.session_token {
            None => self
                .credentials
                .lookup(&claim.access_key_id)?
                .ok_or(SigV4Error::UnknownKey)?,
            Some(token) => self
                .credentials
                .lookup_session(&claim.access_key_id, token, now)?
                .ok_or(SigV4Error::UnknownKey)?,
        };
        Ok(Pending {
            claim,
            secret,
            identity,
        })
    }

    /// The second half: the signature over the whole request, body included.
    pub fn verify(&self, req: &Incoming<'_>, pending: Pending) -> Result<Authenticated, AuthError> {
        let Pending {
            claim,
            secret,
            identity,
        } = pending;
        sigv4::verify(req, &claim, secret.expose(), &self.config)?;
        Ok(Authenticated {
            identity,
            secret,
            session_token: claim.session_token,
        })
    }

    /// `http://host/path?query&X-Amz-...`: a `GET` link presigned with the
    /// caller's own key, valid for [`PRESIGN_EXPIRY`].
    pub fn presigned_url(
        &self,
        caller: &Authenticated,
        host: &str,
        path: &str,
        query: &[(&str, &str)],
    ) -> String {
        let key = sigv4::PresignKey {
            access_key_id: &caller.identity.access_key_id,
            secret: caller.secret.expose(),
            session_token: caller.session_token.as_deref(),
        };
        let target = sigv4::PresignTarget {
            method: "GET",
            host,
            path,
            query,
            body: &[],
        };
        match sigv4::presign(
            target,
            key,
            &self.config,
            OffsetDateTime::now_utc(),
            PRESIGN_EXPIRY,
        ) {
            Ok(q) => format!("http://{host}{path}?{q}"),
            // Only a path kiln built itself reaches here; without a
            // signature the link still names the object.
            Err(_) => format!("http://{host}{path}"),
        }
    }

    /// The caller of a console session: the long-term key it was opened
    /// with, as the key is now (a deleted key ends the session).
    pub fn by_key(&self, access_key_id: &str) -> Result<Authenticated, AuthError> {
        let (secret, identity) = self
            .credentials
            .lookup(access_key_id)?
            .ok_or(SigV4Error::UnknownKey)?;
        Ok(Authenticated {
            identity,
            secret,
            session_token: None,
        })
    }

    /// Whether `secret` is the secret of the long-term key `access_key_id`
    /// (compared in constant time).
    pub fn check_secret(&self, access_key_id: &str, secret: &str) -> Result<bool, AuthError> {
        let known = self.credentials.lookup(access_key_id)?;
        Ok(secret_matches(
            known.as_ref().map(|(s, _)| s.expose()),
            secret,
        ))
    }

    /// Whether `identity` may perform `op`, given the resource's policy and
    /// the request's condition keys.
    pub fn authorize(
        &self,
        identity: &Identity,
        op: &Operation,
        resource_policy: Option<&serde_json::Value>,
        conditions: &RequestConditions,
    ) -> Result<(), AuthError> {
        self.authorize_action(
            identity,
            &op.action,
            &op.resource,
            resource_policy,
            conditions,
        )
    }

    /// Whether `identity` may perform `action` on `resource` (an action
    /// that is not an API operation of its own, such as `iam:PassRole`).
    pub fn authorize_action(
        &self,
        identity: &Identity,
        action: &str,
        resource: &str,
        resource_policy: Option<&serde_json::Value>,
        conditions: &RequestConditions,
    ) -> Result<(), AuthError> {
        if identity.caller == Caller::Root {
            return Ok(());
        }
        // Stored documents were validated when they were attached; one
        // that no longer parses grants nothing.
        let identity_policies: Vec<PolicyDocument> = identity
            .policies
            .iter()
            .filter_map(|p| PolicyDocument::from_value(p, PolicyKind::Identity).ok())
            .collect();
        let resource_doc =
            resource_policy.and_then(|p| PolicyDocument::from_value(p, PolicyKind::Resource).ok());
        let pairs = conditions.pairs();
        let ctx = RequestContext {
            principal_arn: &identity.arn,
            account: self.credentials.account(),
            service: None,
            action,
            resource,
            conditions: &pairs,
        };
        let explained = policy::evaluate_explained(&identity_policies, resource_doc.as_ref(), &ctx);
        match explained.decision {
            Decision::Allow => Ok(()),
            _ => Err(AuthError::Denied(explained.message(&ctx))),
        }
    }
}

/// The condition keys of one request, as IAM names them: who asks, from
/// where, when, and what the operation carries (tags, layers, principals).
/// A key may appear more than once (a multivalued key such as
/// `aws:TagKeys`).
#[derive(Debug, Clone, Default)]
pub struct RequestConditions(Vec<(String, String)>);

impl RequestConditions {
    /// The keys every request has: `aws:SourceIp`, `aws:CurrentTime`,
    /// `aws:EpochTime`, `aws:SecureTransport` (kiln serves plain HTTP),
    /// `aws:PrincipalArn` (a role session's role), `aws:PrincipalAccount`,
    /// `aws:PrincipalType`, `aws:userid`, `aws:username` (users) and
    /// `lambda:SourceFunctionArn` (credentials issued to a function).
    pub fn base(
        identity: &Identity,
        account: &str,
        source: Option<std::net::IpAddr>,
        now: OffsetDateTime,
    ) -> Self {
        let mut c = Self::default();
        if let Some(ip) = source {
            c.add("aws:SourceIp", ip.to_string());
        }
        let seconds = now.unix_timestamp();
        let current = OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(now);
        c.add(
            "aws:CurrentTime",
            current
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        );
        c.add("aws:EpochTime", seconds.to_string());
        c.add("aws:SecureTransport", "false");
        c.add("aws:PrincipalAccount", account);
        let (principal, kind) = match &identity.caller {
            Caller::Root => (identity.arn.clone(), "Account"),
            Caller::User { name } => {
                c.add("aws:username", name.clone());
                (identity.arn.clone(), "User")
            }
            Caller::Role { name, .. } => {
                (format!("arn:aws:iam::{account}:role/{name}"), "AssumedRole")
            }
        };
        c.add("aws:PrincipalArn", principal);
        c.add("aws:PrincipalType", kind);
        c.add("aws:userid", identity.user_id.clone());
        if let Some(f) = &identity.source_function {
            c.add("lambda:SourceFunctionArn", f.clone());
        }
        c
    }

    /// Adds one value of `key`.
    pub fn add(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.push((key.into(), value.into()));
    }

    /// The values of `key` (compared ignoring case, as IAM compares keys).
    pub fn get<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// The keys and values, as policy evaluation takes them.
    pub fn pairs(&self) -> Vec<(&str, &str)> {
        self.0
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// Whether `given` is the secret `known`, compared in constant time; an
/// unknown key is compared against a stand-in of a real secret's length, so
/// that the answer takes as long for an unknown key id as for a wrong
/// secret (a sign-in form must not tell which key ids exist).
fn secret_matches(known: Option<&str>, given: &str) -> bool {
    const STAND_IN: &str = "0000000000000000000000000000000000000000";
    let (expected, exists) = match known {
        Some(k) => (k, true),
        None => (STAND_IN, false),
    };
    let same =
        aws_lc_rs::constant_time::verify_slices_are_equal(expected.as_bytes(), given.as_bytes())
            .is_ok();
    same && exists
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_match_only_for_a_known_key() {
        let secret = "0123456789012345678901234567890123456789";
        assert!(secret_matches(Some(secret), secret));
        assert!(!secret_matches(Some(secret), "x"));
        // The stand-in compared for an unknown key never matches.
        assert!(!secret_matches(
            None,
            "0000000000000000000000000000000000000000"
        ));
        assert!(!secret_matches(None, secret));
    }

    /// An unknown key id takes as long to refuse as a wrong secret: both
    /// compare 40 bytes (medians of batches, so that a busy machine
    /// shifts both alike).
    #[test]
    fn an_unknown_key_is_not_refused_faster() {
        let known = "0123456789012345678901234567890123456789";
        let given = "0123456789012345678901234567890123456780";
        let median = |f: &dyn Fn() -> bool| {
            let mut batches: Vec<std::time::Duration> = (0..31)
                .map(|_| {
                    let start = std::time::Instant::now();
                    for _ in 0..2000 {
                        std::hint::black_box(f());
                    }
                    start.elapsed()
                })
                .collect();
            batches.sort();
            batches[15]
        };
        let wrong = median(&|| secret_matches(std::hint::black_box(Some(known)), given));
        let unknown = median(&|| secret_matches(std::hint::black_box(None), given));
        let ratio = unknown.as_secs_f64() / wrong.as_secs_f64();
        assert!(ratio > 0.5, "unknown {unknown:?}, wrong secret {wrong:?}");
    }
}
