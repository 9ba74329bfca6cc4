//! The web console at `/console`: one self-contained page (no external
//! assets), and the sign-in that gives a browser a session.
//!
//! A browser cannot sign requests with SigV4 without holding the secret
//! key in script, so the console trades the key for a session once: the
//! page posts an access key id and secret to `/console/login`, and gets an
//! HttpOnly, SameSite=Strict cookie naming a random session token. The API
//! gate accepts that cookie on reads only (GET and HEAD of operations that
//! change nothing), as the key's identity, under the key's policy, so the
//! console sees exactly what the key may read and can change nothing.
//! Sessions live in memory: a restart signs everyone out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;

use super::{ApiError, AppState};

/// The page, built into the binary.
const PAGE: &str = include_str!("../console/index.html");

/// The session cookie's name.
pub(crate) const COOKIE: &str = "kiln_console";
/// How long a session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions held at once; the oldest go first.
const MAX_SESSIONS: usize = 1024;
/// Most sessions of one key; its oldest go first, so that one key cannot
/// sign everyone else out.
const MAX_SESSIONS_PER_KEY: usize = 16;
/// Largest sign-in body: two short strings.
const MAX_LOGIN_BODY: usize = 4096;
/// Refused sign-ins a source may make per minute before it must wait.
const FAILURES_PER_MINUTE: u32 = 10;
/// A console's read of one resource is recorded in the audit trail once
/// per this long: the page polls, and the trail needs who looked at what,
/// not every poll.
const READ_AUDIT_WINDOW: Duration = Duration::from_secs(600);

/// Console sessions: token digest → access key id and expiry. Only a
/// digest of each token is held, so a memory dump gives no usable cookie.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
    /// Refused sign-ins per source address: (minute started, count).
    failures: Mutex<HashMap<std::net::IpAddr, (Instant, u32)>>,
    /// When each (session, operation, resource) read was last recorded.
    audited: Mutex<HashMap<ReadKey, Instant>>,
}

/// A console read as the audit trail counts it: (session token digest,
/// operation, resource).
type ReadKey = ([u8; 32], &'static str, String);

#[derive(Debug, Clone)]
struct Session {
    access_key_id: String,
    expires: Instant,
}

fn digest(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for `access_key_id`: its token.
    fn open(&self, access_key_id: &str) -> Result<String, ApiError> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes)
            .map_err(|_| ApiError::internal("the system's random source failed"))?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| s.expires > now);
        let oldest = |map: &HashMap<[u8; 32], Session>, key: Option<&str>| {
            map.iter()
                .filter(|(_, s)| key.is_none_or(|k| s.access_key_id == k))
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| *k)
        };
        let of_key = map
            .values()
            .filter(|s| s.access_key_id == access_key_id)
            .count();
        if of_key >= MAX_SESSIONS_PER_KEY
            && let Some(k) = oldest(&map, Some(access_key_id))
        {
            map.remove(&k);
        }
        if map.len() >= MAX_SESSIONS
            && let Some(k) = oldest(&map, None)
        {
            map.remove(&k);
        }
        map.insert(
            digest(&token),
            Session {
                access_key_id: access_key_id.to_owned(),
                expires: now + SESSION_TTL,
            },
        );
        Ok(token)
    }

    /// The access key of a live session.
    pub(crate) fn resolve(&self, token: &str) -> Option<String> {
        let key = digest(token);
        let mut map = self.lock();
        match map.get(&key) {
            Some(s) if s.expires > Instant::now() => Some(s.access_key_id.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    fn close(&self, token: &str) {
        self.lock().remove(&digest(token));
    }

    /// Whether `source` may try to sign in now (it has not been refused
    /// [`FAILURES_PER_MINUTE`] times in the last minute).
    fn may_try(&self, source: Option<std::net::IpAddr>) -> bool {
        let Some(ip) = source else { return true };
        let map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&ip).is_none_or(|(since, n)| {
            since.elapsed() >= Duration::from_secs(60) || *n < FAILURES_PER_MINUTE
        })
    }

    fn refused(&self, source: Option<std::net::IpAddr>) {
        let Some(ip) = source else { return };
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, (since, _)| since.elapsed() < Duration::from_secs(60));
        }
        let entry = map.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= Duration::from_secs(60) {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }

    /// Whether this session's read of `resource` by `operation` should go
    /// in the audit trail: the first in each [`READ_AUDIT_WINDOW`].
    pub(crate) fn audit_read(&self, token: &str, operation: &'static str, resource: &str) -> bool {
        let key = (digest(token), operation, resource.to_owned());
        let mut map = self.audited.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if map.len() > 10_000 {
            map.retain(|_, at| now.duration_since(*at) < READ_AUDIT_WINDOW);
        }
        match map.get(&key) {
            Some(at) if now.duration_since(*at) < READ_AUDIT_WINDOW => false,
            _ => {
                map.insert(key, now);
                true
            }
        }
    }
}

/// The session token in a request's cookies, if any.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty() && v.len() <= 64)
}

fn cookie(value: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("kiln_console=; Max-Age=0"))
}

/// `GET /console`: the page. Its policy forbids every source but itself,
/// so nothing it shows can load or send anything elsewhere.
pub(super) async fn page() -> Response {
    let mut response = Response::new(Body::from(PAGE));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct Login {
    access_key_id: String,
    secret_access_key: String,
}

/// `POST /console/login` with `{"AccessKeyId", "SecretAccessKey"}`: a
/// session cookie for a long-term access key. JSON only, so that no other
/// site's form can sign a browser in.
pub(super) async fn login(State(s): State<AppState>, request: Request) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let source = peer.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
    let ip = peer.map(|a| a.ip());
    if !s.console.may_try(ip) {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequestsException",
            format!(
                "More than {FAILURES_PER_MINUTE} refused sign-ins from this address in a minute: \
                 wait a minute"
            ),
        )
        .into_response();
    }
    let (id, response) = match sign_in(&s, request).await {
        Ok((id, token)) => {
            let mut response = StatusCode::NO_CONTENT.into_response();
            response
                .headers_mut()
                .insert(header::SET_COOKIE, cookie(&token, SESSION_TTL.as_secs()));
            (id, response)
        }
        Err((id, e)) => {
            s.console.refused(ip);
            (id, e.into_response())
        }
    };
    // Sign-ins with a key that exists, kept or refused, are in the audit
    // trail under its principal. A name that is no key is not recorded:
    // it may be a secret pasted into the wrong field, and anyone can send
    // one, so it must not cost a durable write.
    let Ok(caller) = s.auth.by_key(&id) else {
        return response;
    };
    let op = crate::auth::operations::Operation {
        name: "ConsoleLogin",
        action: "kiln:ConsoleLogin".to_owned(),
        resource: "*".to_owned(),
        function: None,
        qualifier: None,
        mutating: true,
    };
    let params = serde_json::json!({ "AccessKeyId": id });
    let entry = super::guard::entry(&caller.identity.arn, &source, &op, params, &response);
    match super::guard::record(&s, entry).await {
        Ok(()) => response,
        Err(failed) => failed,
    }
}

/// Checks a sign-in: the key's id, and a session token when it holds.
async fn sign_in(s: &AppState, request: Request) -> Result<(String, String), (String, ApiError)> {
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err((
            String::new(),
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaTypeException",
                "Sign in with a JSON body: {\"AccessKeyId\": ..., \"SecretAccessKey\": ...}",
            ),
        ));
    }
    // Anyone may send this: a small body, read within a small limit.
    let bytes = super::read_body(request.into_body(), MAX_LOGIN_BODY, || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLargeException",
            format!("A sign-in must be smaller than {MAX_LOGIN_BODY} bytes"),
        )
    })
    .await
    .map_err(|e| (String::new(), e))?;
    let req: Login = serde_json::from_slice(&bytes).map_err(|e| {
        (
            String::new(),
            ApiError::invalid_content(format!(
                "Sign in with {{\"AccessKeyId\": ..., \"SecretAccessKey\": ...}}: {e}"
            )),
        )
    })?;
    let id = req.access_key_id.chars().take(128).collect::<String>();
    let auth = s.auth.clone();
    let key = id.clone();
    let known = super::blocking(
        |e: crate::auth::AuthError| ApiError::internal(e.to_string()),
        move || auth.check_secret(&key, &req.secret_access_key),
    )
    .await
    .map_err(|e| (id.clone(), e))?;
    if !known {
        return Err((
            id,
            ApiError::new(
                StatusCode::FORBIDDEN,
                "UnrecognizedClientException",
                "The access key id or secret access key is not right: use a long-term key \
                 (`kiln keys create`, or the root key)",
            ),
        ));
    }
    let token = s.console.open(&id).map_err(|e| (id.clone(), e))?;
    Ok((id, token))
}

/// `POST /console/logout`: ends the session and clears the cookie.
pub(super) async fn logout(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = session_cookie(&headers) {
        s.console.close(token);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie("", 0));
    response
}

/// The caller a session token stands for: its key as the key is now (a
/// deleted key ends the session).
pub(crate) fn caller(s: &AppState, token: &str) -> Option<crate::auth::Authenticated> {
    let id = s.console.resolve(token)?;
    s.auth.by_key(&id).ok()
}

/// `GET /console/session`: who the session is, or 401.
pub(super) async fn session(State(s): State<AppState>, headers: HeaderMap) -> Response {
    match session_cookie(&headers).and_then(|t| caller(&s, t)) {
        Some(caller) => {
            Json(serde_json::json!({ "Principal": caller.identity.arn })).into_response()
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UnrecognizedClientException",
            "Not signed in, or the session expired: sign in again",
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_resolve_until_closed() {
        let s = Sessions::default();
        let t = s.open("AKIA1").unwrap();
        assert_eq!(t.len(), 43);
        assert_eq!(s.resolve(&t).as_deref(), Some("AKIA1"));
        assert_eq!(s.resolve("forged"), None);
        s.close(&t);
        assert_eq!(s.resolve(&t), None);
    }

    #[test]
    fn one_key_cannot_sign_everyone_out() {
        let s = Sessions::default();
        let other = s.open("AKIAOTHER").unwrap();
        let first = s.open("AKIA1").unwrap();
        for _ in 0..MAX_SESSIONS_PER_KEY {
            s.open("AKIA1").unwrap();
        }
        assert_eq!(s.resolve(&first), None, "the key's oldest session went");
        assert_eq!(s.resolve(&other).as_deref(), Some("AKIAOTHER"));
    }

    #[test]
    fn refused_sign_ins_are_limited_per_source() {
        let s = Sessions::default();
        let ip = Some(std::net::IpAddr::from([127, 0, 0, 9]));
        for _ in 0..FAILURES_PER_MINUTE {
            assert!(s.may_try(ip));
            s.refused(ip);
        }
        assert!(!s.may_try(ip));
        assert!(s.may_try(Some(std::net::IpAddr::from([127, 0, 0, 10]))));
    }

    #[test]
    fn a_read_is_audited_once_per_window() {
        let s = Sessions::default();
        assert!(s.audit_read("t", "GetFunction", "arn:f"));
        assert!(!s.audit_read("t", "GetFunction", "arn:f"));
        assert!(s.audit_read("t", "GetFunction", "arn:g"));
        assert!(s.audit_read("u", "GetFunction", "arn:f"));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; kiln_console=tok; b=2"),
        );
        assert_eq!(session_cookie(&h), Some("tok"));
        h.insert(header::COOKIE, HeaderValue::from_static("kiln_console="));
        assert_eq!(session_cookie(&h), None);
    }

    #[test]
    fn the_page_is_self_contained() {
        // The SVG namespace is a name, not a fetch.
        let page = PAGE.replace("'http://www.w3.org/2000/svg'", "");
        let code: Vec<&str> = page
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect();
        for external in ["http://", "https://", "src=", "@import", "url("] {
            assert!(
                !code.iter().any(|l| l.contains(external)),
                "the console must load nothing: {external}"
            );
        }
    }
}
