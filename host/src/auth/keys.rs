//! Credentials: the root key, access keys with their identity policies, and
//! the lookups SigV4 verification needs.
//!
//! - The root key comes from `KILN_ROOT_ACCESS_KEY_ID` /
//!   `KILN_ROOT_SECRET_ACCESS_KEY`, or is generated at first start into
//!   `<data>/keys/root-credentials` (mode 0600, in the AWS shared-credentials
//!   format so that `AWS_SHARED_CREDENTIALS_FILE` can point at it). Its
//!   holder may do anything, as an AWS account's root user may.
//! - Access keys (`kiln keys create`) belong to a user name and carry one
//!   identity policy. Their secrets are stored encrypted (AES-256-GCM under
//!   the credentials key, which the master key wraps), with the key id as
//!   associated data so a secret cannot be moved to another key.
//!
//! Secrets are never logged; `Debug` of every type here redacts them.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::control::model::now_rfc3339;
use crate::store::meta::{Kind, MetaError, MetaStore};

/// Why a credentials operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The root credentials are misconfigured.
    #[error("{0}")]
    Config(String),
    /// A name or document is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// No such key or role.
    #[error("{0}")]
    NotFound(String),
    /// A stored secret failed to decrypt: the store was altered.
    #[error(
        "the stored secret of access key {0} does not authenticate (the key store was altered)"
    )]
    Tampered(String),
    /// The metadata store failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// A secret access key; never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret's text, for signing and verification only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Who signed a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The account's root key: allowed everything.
    Root,
    /// An access key's user.
    User {
        /// The user name.
        name: String,
    },
    /// A role's temporary credentials.
    Role {
        /// The role's name.
        name: String,
        /// The session (the environment that holds the credentials).
        session: String,
    },
}

/// An authenticated principal.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The principal's ARN (`arn:aws:iam::ACCOUNT:root`, `...:user/NAME`,
    /// `arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION`).
    pub arn: String,
    /// The access key that signed.
    pub access_key_id: String,
    /// What kind of principal.
    pub caller: Caller,
    /// Its identity policies (JSON documents).
    pub policies: Vec<serde_json::Value>,
    /// IAM's `aws:userid`: the account id for root, the user name for a
    /// user (kiln users have no separate unique id), `ROLE-ID:SESSION` for
    /// a role session.
    pub user_id: String,
    /// The function whose environment holds these role credentials
    /// (`lambda:SourceFunctionArn`), if they were issued to one.
    pub source_function: Option<String>,
}

/// A key as listed (no secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct KeySummary {
    /// The access key id.
    pub access_key_id: String,
    /// Its user.
    pub user_name: String,
    /// When it was created (RFC 3339).
    pub create_date: String,
    /// Its identity policy.
    pub policy: serde_json::Value,
}

/// A newly created key: the only time its secret is shown.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct NewKey {
    /// The access key id.
    pub access_key_id: String,
    /// The secret; shown once.
    pub secret_access_key: String,
    /// Its user.
    pub user_name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyRecord {
    #[serde(flatten)]
    summary: KeySummary,
    /// base64(nonce || AES-256-GCM(secret)), AAD = the key id.
    sealed_secret: String,
}

/// Encrypts stored secrets under one key.
pub struct SecretCipher {
    key: LessSafeKey,
}

impl std::fmt::Debug for SecretCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretCipher(<redacted>)")
    }
}

impl SecretCipher {
    /// A cipher under `key` (32 bytes).
    pub fn new(key: &[u8; 32]) -> Self {
        let unbound = UnboundKey::new(&AES_256_GCM, key)
            .unwrap_or_else(|_| unreachable!("a 32-byte key is always valid for AES-256-GCM"));
        Self {
            key: LessSafeKey::new(unbound),
        }
    }

    /// base64(nonce || ciphertext || tag), bound to `aad`.
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        let mut buf = plaintext.to_vec();
        // Sealing only fails for inputs over AES-GCM's 64 GiB limit.
        let _ = self.key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_bytes()),
            &mut buf,
        );
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// The plaintext, or `None` when the text does not authenticate.
    pub fn open(&self, aad: &str, sealed: &str) -> Option<Vec<u8>> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

fn fill_random(buf: &mut [u8]) {
    // The system RNG failing leaves no safe way to go on.
    if SystemRandom::new().fill(buf).is_err() {
        panic!("the system random number generator failed");
    }
}

/// A new access key id: `AKIA` and 16 characters of base32, as AWS's look.
pub fn new_access_key_id(prefix: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut raw = [0u8; 16];
    fill_random(&mut raw);
    let mut id = prefix.to_owned();
    id.extend(
        raw.iter()
            .map(|b| char::from(ALPHABET[usize::from(b & 31)])),
    );
    id
}

/// A new 40-character secret access key.
pub fn new_secret() -> String {
    let mut raw = [0u8; 30];
    fill_random(&mut raw);
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The root key, and where it came from.
#[derive(Debug, Clone)]
pub struct RootKey {
    /// The access key id.
    pub access_key_id: String,
    secret: Secret,
    /// Set when this start generated the key (to print it once).
    pub generated: Option<PathBuf>,
}

impl RootKey {
    /// The root key from the environment's values, else from (or created
    /// in) `<keys_dir>/root-credentials`.
    pub fn load(keys_dir: &Path, from_env: Option<(String, String)>) -> Result<Self, KeyError> {
        if let Some((id, secret)) = from_env {
            check_key_id(&id)
                .map_err(|m| KeyError::Config(format!("KILN_ROOT_ACCESS_KEY_ID: {m}")))?;
            if secret.len() < 16 {
                return Err(KeyError::Config(
                    "KILN_ROOT_SECRET_ACCESS_KEY must be at least 16 characters".to_owned(),
                ));
            }
            return Ok(Self {
                access_key_id: id,
                secret: Secret(secret),
                generated: None,
            });
        }
        let path = keys_dir.join("root-credentials");
        let io_err = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        match fs::read_to_string(&path) {
            Ok(text) => {
                let mode = fs::metadata(&path).map_err(io_err)?.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(KeyError::Config(format!(
                        "{} is readable by group or others (mode {:o}); run chmod 600 on it",
                        path.display(),
                        mode & 0o777
                    )));
                }
                let (id, secret) = parse_credentials_file(&text).ok_or_else(|| {
                    KeyError::Config(format!(
                        "{} has no aws_access_key_id and aws_secret_access_key",
                        path.display()
                    ))
                })?;
                Ok(Self {
                    access_key_id: id,
                    secret: Secret(secret),
                    generated: None,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let id = new_access_key_id("AKIA");
                let secret = new_secret();
                let text = format!(
                    "# kiln's root credentials, generated at first start.\n[kiln]\n\
                     aws_access_key_id = {id}\naws_secret_access_key = {secret}\n"
                );
                write_private(&path, text.as_bytes()).map_err(io_err)?;
                Ok(Self {
                    access_key_id: id,
                    secret: Secret(secret),
                    generated: Some(path),
                })
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// The secret, for printing once at creation and for signing.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }
}

/// `aws_access_key_id` and `aws_secret_access_key` of the first profile
/// that has both.
pub fn parse_credentials_file(text: &str) -> Option<(String, String)> {
    let mut id = None;
    let mut secret = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            if let (Some(i), Some(s)) = (&id, &secret) {
                return Some((String::clone(i), String::clone(s)));
            }
            id = None;
            secret = None;
        }
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "aws_access_key_id" => id = Some(v.trim().to_owned()),
                "aws_secret_access_key" => secret = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    id.zip(secret)
}

/// Writes a file only its owner can read, durably.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn check_key_id(id: &str) -> Result<(), String> {
    if (16..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(format!(
            "an access key id is 16-128 letters and digits, not {id:?}"
        ))
    }
}

fn check_user_name(name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(KeyError::Invalid(format!(
            "a user name is 1-64 of letters, digits and +=,.@_-, not {name:?}"
        )))
    }
}

/// The role every kiln account has: the CLI's default execution role. It is
/// allowed nothing, so that a function that needs no access to kiln gets
/// none; made at start when it is missing.
pub const DEFAULT_ROLE: &str = "kiln-function";

/// An execution role: a name and the policy its sessions act under.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Role {
    /// The role's name.
    pub role_name: String,
    /// `arn:aws:iam::ACCOUNT:role/NAME`.
    pub arn: String,
    /// This incarnation of the role (`AROA...`): sessions name it, so a
    /// role deleted and created again under its name does not revive them.
    #[serde(default)]
    pub role_id: String,
    /// Its identity policy.
    pub policy: serde_json::Value,
    /// When it was created (RFC 3339).
    pub create_date: String,
    /// Sessions issued before this instant (Unix milliseconds) are refused:
    /// `kiln roles revoke-sessions`.
    #[serde(default)]
    pub revoked_before: i64,
    /// Who may assume it with `sts:AssumeRole` (IAM's trust policy), when
    /// it was made through IAM's `CreateRole`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assume_role_policy: Option<serde_json::Value>,
    /// AWS managed policies attached with `AttachRolePolicy`; their
    /// statements join the role's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attached_policies: Vec<String>,
}

impl Role {
    /// Every identity policy its sessions act under: its own and those of
    /// the managed policies attached to it.
    pub fn policies(&self) -> Vec<serde_json::Value> {
        std::iter::once(self.policy.clone())
            .chain(
                self.attached_policies
                    .iter()
                    .filter_map(|a| managed_policy(a)),
            )
            .collect()
    }
}

/// The AWS managed policies kiln knows, by ARN: those that Lambda tools
/// attach to the execution roles they create. `AWSLambdaBasicExecutionRole`
/// allows writing CloudWatch Logs, which kiln's own logs do not need.
pub fn managed_policy(arn: &str) -> Option<serde_json::Value> {
    let statement = match arn {
        "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole" => serde_json::json!({
            "Effect": "Allow",
            "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": "*",
        }),
        "arn:aws:iam::aws:policy/service-role/AWSLambdaRole" => serde_json::json!({
            "Effect": "Allow",
            "Action": ["lambda:InvokeFunction"],
            "Resource": ["*"],
        }),
        _ => return None,
    };
    Some(serde_json::json!({"Version": "2012-10-17", "Statement": [statement]}))
}

/// Temporary credentials of a role session, as an environment receives them.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionCredentials {
    /// `AWS_ACCESS_KEY_ID` (`ASIA...`).
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Secret,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: String,
    /// When they stop working (Unix seconds).
    pub expires: i64,
}

impl std::fmt::Debug for SessionCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// What a session token carries, under the server's MAC.
#[derive(Debug, Serialize, Deserialize)]
struct SessionClaims {
    /// Role name.
    r: String,
    /// Role id (its incarnation).
    d: String,
    /// Session name.
    s: String,
    /// Access key id.
    k: String,
    /// Issued at (Unix milliseconds).
    i: i64,
    /// Expires at (Unix seconds).
    e: i64,
    /// The function the session was issued to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    f: Option<String>,
}

/// The credential store: the root key, access keys (cached in memory after
/// the first lookup), roles and their sessions.
///
/// Session credentials are stateless: the token is the session's claims
/// under an HMAC with the sessions key, and the secret is derived from the
/// token, so nothing per session is stored and a server restart keeps them
/// valid until they expire or their role's sessions are revoked.
pub struct Credentials {
    account: String,
    root: RootKey,
    meta: Arc<MetaStore>,
    cipher: SecretCipher,
    sessions: aws_lc_rs::hmac::Key,
    cache: RwLock<HashMap<String, (Secret, Identity)>>,
    /// Bumped (under the cache's lock) by every key deletion, so that a
    /// lookup racing a deletion does not cache the deleted key.
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("account", &self.account)
            .field("root", &self.root.access_key_id)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The store over `meta`. `key` (32 bytes, kept wrapped by the master
    /// key) derives the key that encrypts stored secrets and the key that
    /// authenticates session tokens.
    pub fn new(account: &str, root: RootKey, meta: Arc<MetaStore>, key: &[u8; 32]) -> Self {
        use aws_lc_rs::hmac;
        let derive = |label: &[u8]| {
            let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), label);
            let mut out = [0u8; 32];
            out.copy_from_slice(tag.as_ref());
            out
        };
        Self {
            account: account.to_owned(),
            root,
            meta,
            cipher: SecretCipher::new(&derive(b"kiln-secrets-v1")),
            sessions: hmac::Key::new(hmac::HMAC_SHA256, &derive(b"kiln-sessions-v1")),
            cache: RwLock::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Creates a role with identity policy `policy` (already validated).
    pub fn create_role(&self, name: &str, policy: serde_json::Value) -> Result<Role, KeyError> {
        check_user_name(name)?;
        let role = Role {
            role_name: name.to_owned(),
            arn: format!("arn:aws:iam::{}:role/{name}", self.account),
            policy,
            create_date: now_rfc3339(),
            role_id: new_access_key_id("AROA"),
            revoked_before: 0,
            assume_role_policy: None,
            attached_policies: Vec::new(),
        };
        let exists: Option<Role> = self.meta.read(|d| d.get(Kind::Role, "", name))?;
        if exists.is_some() {
            return Err(KeyError::Invalid(format!("The role {name} already exists")));
        }
        self.meta.write(|d| d.insert(Kind::Role, "", name, &role))?;
        Ok(role)
    }

    /// Creates a role as IAM's `CreateRole` does: allowed nothing until
    /// policies are attached, assumable as `trust` says.
    pub fn create_role_with_trust(
        &self,
        name: &str,
        trust: serde_json::Value,
    ) -> Result<Role, KeyError> {
        let nothing = serde_json::json!({"Version": "2012-10-17", "Statement": []});
        self.create_role(name, nothing)?;
        self.update_role(name, |role| role.assume_role_policy = Some(trust))
    }

    /// Changes a stored role.
    pub fn update_role(
        &self,
        name: &str,
        change: impl FnOnce(&mut Role),
    ) -> Result<Role, KeyError> {
        let mut role: Role = self
            .meta
            .read(|d| d.get(Kind::Role, "", name))?
            .ok_or_else(|| KeyError::NotFound(format!("The role {name} does not exist")))?;
        change(&mut role);
        self.meta.write(|d| d.put(Kind::Role, "", name, &role))?;
        Ok(role)
    }

    /// Creates [`DEFAULT_ROLE`] (allowed nothing) unless it exists.
    pub fn ensure_default_role(&self) -> Result<(), KeyError> {
        if self.role(DEFAULT_ROLE)?.is_none() {
            let nothing = serde_json::json!({"Version": "2012-10-17", "Statement": []});
            self.create_role(DEFAULT_ROLE, nothing)?;
        }
        Ok(())
    }

    /// A role by name or ARN.
    pub fn role(&self, name_or_arn: &str) -> Result<Option<Role>, KeyError> {
        let name = name_or_arn.rsplit('/').next().unwrap_or(name_or_arn);
        let role: Option<Role> = self.meta.read(|d| d.get(Kind::Role, "", name))?;
        // An ARN must be this account's.
        Ok(role.filter(|r| !name_or_arn.starts_with("arn:") || r.arn == name_or_arn))
    }

    /// Every role.
    pub fn list_roles(&self) -> Result<Vec<Role>, KeyError> {
        let all: Vec<(String, String, Role)> = self.meta.read(|d| d.all(Kind::Role))?;
        Ok(all.into_iter().map(|(_, _, r)| r).collect())
    }

    /// Deletes a role; its sessions stop working.
    pub fn delete_role(&self, name: &str) -> Result<(), KeyError> {
        if self.meta.write(|d| d.delete(Kind::Role, "", name))? {
            Ok(())
        } else {
            Err(KeyError::NotFound(format!(
                "The role {name} does not exist"
            )))
        }
    }

    /// Refuses every session of `name` issued until now.
    pub fn revoke_sessions(&self, name: &str) -> Result<(), KeyError> {
        let mut role = self
            .role(name)?
            .ok_or_else(|| KeyError::NotFound(format!("The role {name} does not exist")))?;
        // Sessions issued in this very millisecond are revoked too.
        role.revoked_before = now_millis() + 1;
        self.meta.write(|d| d.put(Kind::Role, "", name, &role))?;
        Ok(())
    }

    /// Issues temporary credentials for a session of `role`, valid for
    /// `lifetime`; `source_function` is the ARN of the function whose
    /// environment receives them.
    pub fn issue_session(
        &self,
        role: &Role,
        session: &str,
        lifetime: std::time::Duration,
        source_function: Option<&str>,
    ) -> SessionCredentials {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = SessionClaims {
            r: role.role_name.clone(),
            d: role.role_id.clone(),
            s: session.to_owned(),
            k: new_access_key_id("ASIA"),
            i: now_millis(),
            e: now.saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
            f: source_function.map(str::to_owned),
        };
        let payload = serde_json::to_vec(&claims).unwrap_or_default();
        let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = b64.encode(payload);
        let tag = aws_lc_rs::hmac::sign(&self.sessions, payload.as_bytes());
        let token = format!("{payload}.{}", b64.encode(tag.as_ref()));
        SessionCredentials {
            secret_access_key: self.session_secret(&token),
            access_key_id: claims.k,
            session_token: token,
            expires: claims.e,
        }
    }

    fn session_secret(&self, token: &str) -> Secret {
        let mut input = b"secret:".to_vec();
        input.extend_from_slice(token.as_bytes());
        let tag = aws_lc_rs::hmac::sign(&self.sessions, &input);
        Secret(base64::engine::general_purpose::STANDARD.encode(&tag.as_ref()[..30]))
    }

    /// The secret and identity of a role session, if its token is genuine,
    /// names `access_key_id`, has not expired and its role still exists
    /// with the session not revoked.
    pub fn lookup_session(
        &self,
        access_key_id: &str,
        token: &str,
        now: time::OffsetDateTime,
    ) -> Result<Option<(Secret, Identity)>, KeyError> {
        let Some((payload, tag)) = token.split_once('.') else {
            return Ok(None);
        };
        let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let Ok(tag) = b64.decode(tag) else {
            return Ok(None);
        };
        if aws_lc_rs::hmac::verify(&self.sessions, payload.as_bytes(), &tag).is_err() {
            return Ok(None);
        }
        let Some(claims) = b64
            .decode(payload)
            .ok()
            .and_then(|p| serde_json::from_slice::<SessionClaims>(&p).ok())
        else {
            return Ok(None);
        };
        if claims.k != access_key_id || claims.e < now.unix_timestamp() {
            return Ok(None);
        }
        let Some(role) = self.role(&claims.r)? else {
            return Ok(None);
        };
        if claims.i < role.revoked_before || claims.d != role.role_id {
            return Ok(None);
        }
        Ok(Some((
            self.session_secret(token),
            Identity {
                arn: format!(
                    "arn:aws:sts::{}:assumed-role/{}/{}",
                    self.account, role.role_name, claims.s
                ),
                access_key_id: access_key_id.to_owned(),
                user_id: format!("{}:{}", role.role_id, claims.s),
                caller: Caller::Role {
                    name: role.role_name.clone(),
                    session: claims.s,
                },
                policies: role.policies(),
                source_function: claims.f,
            },
        )))
    }

    /// The account's id.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The root key.
    pub fn root(&self) -> &RootKey {
        &self.root
    }

    /// The secret and identity of a long-term access key.
    pub fn lookup(&self, access_key_id: &str) -> Result<Option<(Secret, Identity)>, KeyError> {
        if access_key_id == self.root.access_key_id {
            return Ok(Some((
                self.root.secret.clone(),
                Identity {
                    arn: format!("arn:aws:iam::{}:root", self.account),
                    access_key_id: access_key_id.to_owned(),
                    caller: Caller::Root,
                    policies: Vec::new(),
                    user_id: self.account.clone(),
                    source_function: None,
                },
            )));
        }
        if let Ok(cache) = self.cache.read()
            && let Some(found) = cache.get(access_key_id)
        {
            return Ok(Some(found.clone()));
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let record: Option<KeyRecord> = self
            .meta
            .read(|d| d.get(Kind::AccessKey, "", access_key_id))?;
        let Some(record) = record else {
            return Ok(None);
        };
        let secret = self
            .cipher
            .open(access_key_id, &record.sealed_secret)
            .and_then(|s| String::from_utf8(s).ok())
            .ok_or_else(|| KeyError::Tampered(access_key_id.to_owned()))?;
        let found = (
            Secret(secret),
            Identity {
                arn: format!(
                    "arn:aws:iam::{}:user/{}",
                    self.account, record.summary.user_name
                ),
                access_key_id: access_key_id.to_owned(),
                caller: Caller::User {
                    name: record.summary.user_name.clone(),
                },
                policies: vec![record.summary.policy.clone()],
                user_id: record.summary.user_name.clone(),
                source_function: None,
            },
        );
        if let Ok(mut cache) = self.cache.write()
            && self.generation.load(std::sync::atomic::Ordering::SeqCst) == generation
        {
            cache.insert(access_key_id.to_owned(), found.clone());
        }
        Ok(Some(found))
    }

    /// Creates a key for `user` with identity policy `policy` (already
    /// validated by the caller).
    pub fn create_key(&self, user: &str, policy: serde_json::Value) -> Result<NewKey, KeyError> {
        check_user_name(user)?;
        let id = new_access_key_id("AKIA");
        let secret = new_secret();
        let record = KeyRecord {
            summary: KeySummary {
                access_key_id: id.clone(),
                user_name: user.to_owned(),
                create_date: now_rfc3339(),
                policy,
            },
            sealed_secret: self.cipher.seal(&id, secret.as_bytes()),
        };
        self.meta
            .write(|d| d.insert(Kind::AccessKey, "", &id, &record))?;
        Ok(NewKey {
            access_key_id: id,
            secret_access_key: secret,
            user_name: user.to_owned(),
        })
    }

    /// Every access key, without secrets.
    pub fn list_keys(&self) -> Result<Vec<KeySummary>, KeyError> {
        let all: Vec<(String, String, KeyRecord)> = self.meta.read(|d| d.all(Kind::AccessKey))?;
        Ok(all.into_iter().map(|(_, _, r)| r.summary).collect())
    }

    /// Deletes a key; requests signed with it are refused from now on.
    pub fn delete_key(&self, access_key_id: &str) -> Result<(), KeyError> {
        let removed = self
            .meta
            .write(|d| d.delete(Kind::AccessKey, "", access_key_id))?;
        if let Ok(mut cache) = self.cache.write() {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            cache.remove(access_key_id);
        }
        if removed {
            Ok(())
        } else {
            Err(KeyError::NotFound(format!(
                "The access key {access_key_id} does not exist"
            )))
        }
    }
}

/// The current time in Unix milliseconds.
fn now_millis() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Credentials) {
        let dir = tempfile::tempdir().unwrap();
        let root = RootKey::load(&dir.path().join("keys"), None).unwrap();
        let meta = Arc::new(MetaStore::in_memory().unwrap());
        let creds = Credentials::new("000000000000", root, meta, &[7; 32]);
        (dir, creds)
    }

    #[test]
    fn root_credentials_are_generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let first = RootKey::load(&keys, None).unwrap();
        assert!(first.generated.is_some());
        let path = keys.join("root-credentials");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = RootKey::load(&keys, None).unwrap();
        assert!(again.generated.is_none());
        assert_eq!(again.access_key_id, first.access_key_id);
        assert_eq!(again.secret(), first.secret());
        assert_eq!(first.secret().expose().len(), 40);
        assert!(!format!("{first:?}").contains(first.secret().expose()));

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = RootKey::load(&keys, None).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn keys_are_created_looked_up_and_deleted() {
        let (_d, creds) = store();
        let policy = serde_json::json!({"Version": "2012-10-17", "Statement": []});
        let key = creds.create_key("alice", policy.clone()).unwrap();
        let (secret, identity) = creds.lookup(&key.access_key_id).unwrap().unwrap();
        assert_eq!(secret.expose(), key.secret_access_key);
        assert_eq!(identity.arn, "arn:aws:iam::000000000000:user/alice");
        assert_eq!(identity.policies, vec![policy]);
        let listed = creds.list_keys().unwrap();
        assert_eq!(listed.len(), 1);
        assert!(
            !serde_json::to_string(&listed)
                .unwrap()
                .contains(&key.secret_access_key)
        );
        creds.delete_key(&key.access_key_id).unwrap();
        assert!(creds.lookup(&key.access_key_id).unwrap().is_none());
        assert!(matches!(
            creds.delete_key(&key.access_key_id),
            Err(KeyError::NotFound(_))
        ));
        assert!(creds.create_key("bad name", serde_json::json!({})).is_err());
    }

    #[test]
    fn a_secret_moved_to_another_key_does_not_decrypt() {
        let cipher = SecretCipher::new(&[1; 32]);
        let sealed = cipher.seal("AKIAONE", b"secret");
        assert_eq!(cipher.open("AKIAONE", &sealed).unwrap(), b"secret");
        assert!(cipher.open("AKIATWO", &sealed).is_none());
        assert!(
            SecretCipher::new(&[2; 32])
                .open("AKIAONE", &sealed)
                .is_none()
        );
    }

    #[test]
    fn role_sessions_expire_and_can_be_revoked() {
        let (_d, creds) = store();
        let role = creds
            .create_role("worker", serde_json::json!({"Statement": []}))
            .unwrap();
        assert_eq!(role.arn, "arn:aws:iam::000000000000:role/worker");
        let session = creds.issue_session(&role, "env-1", std::time::Duration::from_secs(60), None);
        assert!(session.access_key_id.starts_with("ASIA"));
        let now = time::OffsetDateTime::now_utc();
        let (secret, identity) = creds
            .lookup_session(&session.access_key_id, &session.session_token, now)
            .unwrap()
            .unwrap();
        assert_eq!(secret, session.secret_access_key);
        assert_eq!(
            identity.arn,
            "arn:aws:sts::000000000000:assumed-role/worker/env-1"
        );
        // Another key id with the same token, a forged token, expiry.
        assert!(
            creds
                .lookup_session("ASIAOTHER", &session.session_token, now)
                .unwrap()
                .is_none()
        );
        let forged = session.session_token.replacen('e', "f", 1);
        assert!(
            creds
                .lookup_session(&session.access_key_id, &forged, now)
                .unwrap()
                .is_none()
        );
        let later = now + time::Duration::seconds(120);
        assert!(
            creds
                .lookup_session(&session.access_key_id, &session.session_token, later)
                .unwrap()
                .is_none()
        );
        // Revoked.
        creds.revoke_sessions("worker").unwrap();
        assert!(
            creds
                .lookup_session(&session.access_key_id, &session.session_token, now)
                .unwrap()
                .is_none()
        );
        creds.delete_role("worker").unwrap();
        assert!(creds.role("worker").unwrap().is_none());
        // A role created again under the name does not revive old sessions.
        let again = creds
            .create_role("worker", serde_json::json!({"Statement": []}))
            .unwrap();
        assert!(
            creds
                .lookup_session(&session.access_key_id, &session.session_token, now)
                .unwrap()
                .is_none()
        );
        let fresh = creds.issue_session(&again, "env-2", std::time::Duration::from_secs(60), None);
        assert!(
            creds
                .lookup_session(&fresh.access_key_id, &fresh.session_token, now)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn credentials_files_parse() {
        let text = "[default]\naws_access_key_id = A\n[kiln]\naws_access_key_id=AKIAX\n\
                    aws_secret_access_key = s3cr3t\n";
        assert_eq!(
            parse_credentials_file(text),
            Some(("AKIAX".to_owned(), "s3cr3t".to_owned()))
        );
        assert_eq!(parse_credentials_file("[x]\n"), None);
    }
}
