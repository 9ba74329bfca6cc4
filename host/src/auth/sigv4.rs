//! AWS Signature Version 4 verification: the server side of what the AWS
//! SDKs, the AWS CLI and `curl --aws-sigv4` do when they sign a request.
//!
//! Steps, in order (as AWS defines them):
//! 1. Find the signature: an `Authorization: AWS4-HMAC-SHA256 Credential=..,
//!    SignedHeaders=.., Signature=..` header, or the presigned query
//!    parameters `X-Amz-Algorithm`, `X-Amz-Credential`, `X-Amz-Date`,
//!    `X-Amz-Expires`, `X-Amz-SignedHeaders`, `X-Amz-Signature`.
//! 2. Check the credential scope (`<key>/<date>/<region>/<service>/aws4_request`)
//!    against this server's region and service and the request's date, and
//!    the date against the clock (skew window, or the presigned expiry).
//! 3. Require `host` (and `x-amz-date` for header signatures) among the
//!    signed headers.
//! 4. Build the canonical request: method, canonical URI (dot segments and
//!    repeated slashes removed; each segment percent-encoded again for
//!    every service but S3, as botocore does), canonical query (pairs
//!    sorted, RFC 3986 encoding, the signature itself left out), canonical
//!    headers (lowercase names, values trimmed with inner runs of spaces
//!    collapsed, repeated headers joined by commas), the signed header list,
//!    and the SHA-256 of the body as received. A client's
//!    `x-amz-content-sha256` must equal that hash.
//! 5. Derive the signing key from the secret (HMAC chain over date, region,
//!    service, `aws4_request`), sign the string to sign, and compare with
//!    the signature given in constant time.
//!
//! Threat model: everything here is attacker-controlled input. Nothing is
//! trusted before step 5 succeeds; parsing is bounded by the request size
//! the caller already enforced; no input can panic.

use std::time::Duration;

use aws_lc_rs::{constant_time, digest, hmac};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::store::artifacts::hex;

/// The only algorithm kiln accepts.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// The longest a presigned URL may live (AWS's limit: 7 days).
pub const MAX_PRESIGN_EXPIRY: u64 = 604_800;

/// SHA-256 of the empty string, hex.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// How paths are percent-encoded in the canonical URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathEncoding {
    /// Every service but S3 (Lambda included): each segment of the path as
    /// received (already percent-encoded) is encoded again.
    Double,
    /// S3 and the CRT test suite: the path as received, with only bytes
    /// outside the unreserved set (and not already escapes) encoded.
    Single,
}

/// What the verifier checks against.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// The region credentials must be scoped to.
    pub region: String,
    /// The service credentials must be scoped to (`lambda`).
    pub service: String,
    /// How far the request's date may be from the server's clock.
    pub max_skew: Duration,
    /// Remove `.`/`..` segments and repeated slashes (all services but S3).
    pub normalize_path: bool,
    /// See [`PathEncoding`].
    pub path_encoding: PathEncoding,
}

impl VerifyConfig {
    /// Lambda's settings in `region`, with AWS's 5-minute skew window.
    pub fn lambda(region: &str) -> Self {
        Self {
            region: region.to_owned(),
            service: "lambda".to_owned(),
            max_skew: Duration::from_secs(300),
            normalize_path: true,
            path_encoding: PathEncoding::Double,
        }
    }
}

/// A request as received, before anything in it is trusted.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The path as sent on the request line (percent-encoded).
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// Every header in the order received (names in any case).
    pub headers: &'a [(&'a str, &'a [u8])],
    /// The body as received.
    pub body: &'a [u8],
}

/// A signature found in a request, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The access key id the request says it was signed with.
    pub access_key_id: String,
    /// The session token sent along (temporary credentials).
    pub session_token: Option<String>,
    /// Whether the signature came in the query string.
    pub presigned: bool,
    signature: Vec<u8>,
    scope_date: String,
    region: String,
    service: String,
    amz_date: String,
    signed_headers: Vec<String>,
    expires: Option<u64>,
}

/// Why a request is refused. The `Display` text is what the caller sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    /// The request carries no signature at all.
    #[error(
        "Missing Authentication Token: sign the request with AWS Signature Version 4 (the AWS \
         CLI and SDKs with --endpoint-url, or curl --aws-sigv4 \"aws:amz:REGION:lambda\")"
    )]
    Missing,
    /// The signature is present but malformed or incomplete.
    #[error("{0}")]
    Malformed(String),
    /// The credential scope names another date, region or service.
    #[error("{0}")]
    Scope(String),
    /// The request's date is outside the window.
    #[error("{0}")]
    Expired(String),
    /// The body does not match the hash the client declared.
    #[error(
        "The provided x-amz-content-sha256 header does not match what was computed: the body \
         must be sent exactly as signed"
    )]
    PayloadHash,
    /// The access key is unknown, or its token does not match.
    #[error("The security token included in the request is invalid.")]
    UnknownKey,
    /// The signature does not match.
    #[error(
        "The request signature we calculated does not match the signature you provided. Check \
         your AWS Secret Access Key and signing method. Consult the service documentation for \
         details."
    )]
    Mismatch,
}

impl SigV4Error {
    /// Lambda's error type for this failure.
    pub fn error_type(&self) -> &'static str {
        match self {
            SigV4Error::Missing => "MissingAuthenticationTokenException",
            SigV4Error::UnknownKey => "UnrecognizedClientException",
            _ => "InvalidSignatureException",
        }
    }
}

/// Finds the signature in a request and checks what can be checked without
/// the secret: its form, its scope and its date. `now` is the server's clock.
pub fn claim(
    req: &Incoming<'_>,
    cfg: &VerifyConfig,
    now: OffsetDateTime,
) -> Result<Claim, SigV4Error> {
    let authorization = header_values(req.headers, "authorization");
    let query = parse_query(req.query.unwrap_or(""));
    let presigned = query.iter().any(|(k, _)| k == "X-Amz-Signature");
    let claim = match (authorization.as_slice(), presigned) {
        ([], false) => return Err(SigV4Error::Missing),
        ([_], true) | ([_, _, ..], _) => {
            return Err(SigV4Error::Malformed(
                "Only one authentication method is allowed: an Authorization header or a \
                 presigned query string, once"
                    .to_owned(),
            ));
        }
        ([value], false) => {
            let value = std::str::from_utf8(value).map_err(|_| {
                SigV4Error::Malformed("The Authorization header is not text".to_owned())
            })?;
            from_header(req, value)?
        }
        ([], true) => from_query(&query)?,
    };
    check_scope_and_time(&claim, cfg, now)?;
    Ok(claim)
}

/// Verifies a claim with the secret of its access key. On success the
/// request is exactly what the key's holder signed.
pub fn verify(
    req: &Incoming<'_>,
    claim: &Claim,
    secret: &str,
    cfg: &VerifyConfig,
) -> Result<(), SigV4Error> {
    let canonical = canonical_request(req, claim, cfg)?;
    let expected = signature_tag(secret, claim, &canonical);
    if constant_time::verify_slices_are_equal(expected.as_ref(), &claim.signature).is_ok() {
        return Ok(());
    }
    // A presigned URL's session token may be added after signing (as STS
    // clients do); then it is not part of the canonical query.
    if claim.presigned && claim.session_token.is_some() {
        let without = Claim {
            session_token: None,
            ..claim.clone()
        };
        let canonical = canonical_request_with(req, &without, cfg, true)?;
        let expected = signature_tag(secret, claim, &canonical);
        if constant_time::verify_slices_are_equal(expected.as_ref(), &claim.signature).is_ok() {
            return Ok(());
        }
    }
    Err(SigV4Error::Mismatch)
}

/// A key to presign with: the caller's own, so a presigned link carries
/// exactly the caller's rights.
#[derive(Debug, Clone, Copy)]
pub struct PresignKey<'a> {
    /// Access key id.
    pub access_key_id: &'a str,
    /// Its secret.
    pub secret: &'a str,
    /// Its session token, for temporary credentials.
    pub session_token: Option<&'a str>,
}

/// What a presigned URL is for.
#[derive(Debug, Clone, Copy)]
pub struct PresignTarget<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The `Host` header the request will carry.
    pub host: &'a str,
    /// The path, percent-encoded as it will be sent.
    pub path: &'a str,
    /// Query parameters (unencoded) besides the signature's.
    pub query: &'a [(&'a str, &'a str)],
    /// The body the request will carry (its hash is signed).
    pub body: &'a [u8],
}

/// The query string (`query` first, then the `X-Amz-*` parameters) that
/// presigns `target` for `expires` seconds.
pub fn presign(
    target: PresignTarget<'_>,
    key: PresignKey<'_>,
    cfg: &VerifyConfig,
    now: OffsetDateTime,
    expires: u64,
) -> Result<String, SigV4Error> {
    let amz_date = format_amz_date(now);
    let scope_date = amz_date[..8].to_owned();
    let credential = format!(
        "{}/{scope_date}/{}/{}/aws4_request",
        key.access_key_id, cfg.region, cfg.service
    );
    let mut params: Vec<(String, String)> = target
        .query
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    params.push(("X-Amz-Algorithm".to_owned(), ALGORITHM.to_owned()));
    params.push(("X-Amz-Credential".to_owned(), credential));
    params.push(("X-Amz-Date".to_owned(), amz_date.clone()));
    params.push(("X-Amz-Expires".to_owned(), expires.to_string()));
    params.push(("X-Amz-SignedHeaders".to_owned(), "host".to_owned()));
    if let Some(token) = key.session_token {
        params.push(("X-Amz-Security-Token".to_owned(), token.to_owned()));
    }
    let encode = |pairs: &[(String, String)]| {
        let mut out = String::new();
        for (i, (k, v)) in pairs.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            uri_encode(&mut out, k.as_bytes());
            out.push('=');
            uri_encode(&mut out, v.as_bytes());
        }
        out
    };
    let unsigned = encode(&params);
    let claim = Claim {
        access_key_id: key.access_key_id.to_owned(),
        session_token: key.session_token.map(str::to_owned),
        presigned: true,
        signature: Vec::new(),
        scope_date,
        region: cfg.region.clone(),
        service: cfg.service.clone(),
        amz_date,
        signed_headers: vec!["host".to_owned()],
        expires: Some(expires),
    };
    let headers: [(&str, &[u8]); 1] = [("host", target.host.as_bytes())];
    let req = Incoming {
        method: target.method,
        path: target.path,
        query: Some(&unsigned),
        headers: &headers,
        body: target.body,
    };
    let canonical = canonical_request(&req, &claim, cfg)?;
    let signature = hex(signature_tag(key.secret, &claim, &canonical).as_ref());
    Ok(format!("{unsigned}&X-Amz-Signature={signature}"))
}

fn signature_tag(secret: &str, claim: &Claim, canonical: &str) -> hmac::Tag {
    let scope = format!(
        "{}/{}/{}/aws4_request",
        claim.scope_date, claim.region, claim.service
    );
    let string_to_sign = format!(
        "{ALGORITHM}\n{}\n{scope}\n{}",
        claim.amz_date,
        hex(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref())
    );
    let k_date = hmac_sign(
        format!("AWS4{secret}").as_bytes(),
        claim.scope_date.as_bytes(),
    );
    let k_region = hmac_sign(k_date.as_ref(), claim.region.as_bytes());
    let k_service = hmac_sign(k_region.as_ref(), claim.service.as_bytes());
    let k_signing = hmac_sign(k_service.as_ref(), b"aws4_request");
    hmac_sign(k_signing.as_ref(), string_to_sign.as_bytes())
}

fn hmac_sign(key: &[u8], data: &[u8]) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
}

/// The canonical request of step 4.
pub fn canonical_request(
    req: &Incoming<'_>,
    claim: &Claim,
    cfg: &VerifyConfig,
) -> Result<String, SigV4Error> {
    canonical_request_with(req, claim, cfg, false)
}

fn canonical_request_with(
    req: &Incoming<'_>,
    claim: &Claim,
    cfg: &VerifyConfig,
    omit_token: bool,
) -> Result<String, SigV4Error> {
    let body_hash = hex(digest::digest(&digest::SHA256, req.body).as_ref());
    if let [declared] = header_values(req.headers, "x-amz-content-sha256").as_slice()
        && *declared != body_hash.as_bytes()
    {
        return Err(SigV4Error::PayloadHash);
    }
    let uri = canonical_uri(req.path, cfg)?;
    let query = canonical_query(req.query.unwrap_or(""), claim.presigned, omit_token);
    let mut headers = String::new();
    for name in &claim.signed_headers {
        let values = header_values(req.headers, name);
        if values.is_empty() {
            return Err(SigV4Error::Malformed(format!(
                "The header {name:?} is in SignedHeaders but not in the request"
            )));
        }
        headers.push_str(name);
        headers.push(':');
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                headers.push(',');
            }
            let text = std::str::from_utf8(v).map_err(|_| {
                SigV4Error::Malformed(format!("The signed header {name:?} is not UTF-8"))
            })?;
            push_collapsed(&mut headers, text);
        }
        headers.push('\n');
    }
    Ok(format!(
        "{}\n{uri}\n{query}\n{headers}\n{}\n{body_hash}",
        req.method,
        claim.signed_headers.join(";")
    ))
}

/// Trims a header value and collapses inner runs of spaces to one.
fn push_collapsed(out: &mut String, value: &str) {
    let mut space = false;
    for c in value.trim_matches(|c| c == ' ' || c == '\t').chars() {
        if c == ' ' || c == '\t' {
            space = true;
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push(c);
    }
}

fn from_header(req: &Incoming<'_>, value: &str) -> Result<Claim, SigV4Error> {
    let rest = value.strip_prefix(ALGORITHM).ok_or_else(|| {
        SigV4Error::Malformed(format!(
            "Unsupported authorization type: only {ALGORITHM} is accepted"
        ))
    })?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        let (k, v) = part.split_once('=').ok_or_else(|| {
            SigV4Error::Malformed(format!(
                "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' \
                 parameters; {part:?} is not key=value"
            ))
        })?;
        let slot = match k {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => {
                return Err(SigV4Error::Malformed(format!(
                    "Unknown Authorization header parameter {k:?}"
                )));
            }
        };
        if slot.replace(v).is_some() {
            return Err(SigV4Error::Malformed(format!(
                "The Authorization header repeats {k:?}"
            )));
        }
    }
    let missing = |what: &str| {
        SigV4Error::Malformed(format!("Authorization header requires '{what}' parameter"))
    };
    let credential = credential.ok_or_else(|| missing("Credential"))?;
    let signed = signed.ok_or_else(|| missing("SignedHeaders"))?;
    let signature = signature.ok_or_else(|| missing("Signature"))?;
    let amz_date = match header_values(req.headers, "x-amz-date").as_slice() {
        [v] => std::str::from_utf8(v).unwrap_or("").to_owned(),
        [] => {
            return Err(SigV4Error::Malformed(
                "Authorization header requires existence of the X-Amz-Date header".to_owned(),
            ));
        }
        _ => return Err(SigV4Error::Malformed("X-Amz-Date is repeated".to_owned())),
    };
    let token = match header_values(req.headers, "x-amz-security-token").as_slice() {
        [] => None,
        [v] => Some(std::str::from_utf8(v).unwrap_or("").to_owned()),
        _ => {
            return Err(SigV4Error::Malformed(
                "X-Amz-Security-Token is repeated".to_owned(),
            ));
        }
    };
    let claim = build_claim(credential, signed, signature, amz_date, token, false, None)?;
    for required in ["host", "x-amz-date"] {
        if !claim.signed_headers.iter().any(|h| h == required) {
            return Err(SigV4Error::Malformed(format!(
                "The {required} header must be signed (it is not in SignedHeaders)"
            )));
        }
    }
    // A session token need not be signed (AWS allows adding it after
    // signing); it is checked against the key's own token all the same.
    Ok(claim)
}

fn from_query(query: &[(String, String)]) -> Result<Claim, SigV4Error> {
    let get = |name: &str| -> Result<Option<&str>, SigV4Error> {
        let mut found = query.iter().filter(|(k, _)| k == name);
        let first = found.next().map(|(_, v)| v.as_str());
        if found.next().is_some() {
            return Err(SigV4Error::Malformed(format!(
                "The query parameter {name} is repeated"
            )));
        }
        Ok(first)
    };
    let require = |name: &str| -> Result<&str, SigV4Error> {
        get(name)?.ok_or_else(|| {
            SigV4Error::Malformed(format!(
                "A presigned request requires the {name} query parameter"
            ))
        })
    };
    if require("X-Amz-Algorithm")? != ALGORITHM {
        return Err(SigV4Error::Malformed(format!(
            "X-Amz-Algorithm must be {ALGORITHM}"
        )));
    }
    let expires: u64 = require("X-Amz-Expires")?
        .parse()
        .ok()
        .filter(|e| (1..=MAX_PRESIGN_EXPIRY).contains(e))
        .ok_or_else(|| {
            SigV4Error::Malformed(format!(
                "X-Amz-Expires must be a number of seconds from 1 to {MAX_PRESIGN_EXPIRY}"
            ))
        })?;
    let claim = build_claim(
        require("X-Amz-Credential")?,
        require("X-Amz-SignedHeaders")?,
        require("X-Amz-Signature")?,
        require("X-Amz-Date")?.to_owned(),
        get("X-Amz-Security-Token")?.map(str::to_owned),
        true,
        Some(expires),
    )?;
    if !claim.signed_headers.iter().any(|h| h == "host") {
        return Err(SigV4Error::Malformed(
            "The host header must be signed (it is not in X-Amz-SignedHeaders)".to_owned(),
        ));
    }
    Ok(claim)
}

fn build_claim(
    credential: &str,
    signed: &str,
    signature: &str,
    amz_date: String,
    session_token: Option<String>,
    presigned: bool,
    expires: Option<u64>,
) -> Result<Claim, SigV4Error> {
    let parts: Vec<&str> = credential.split('/').collect();
    let [key, date, region, service, terminator] = parts.as_slice() else {
        return Err(SigV4Error::Malformed(format!(
            "Credential must be KEY/YYYYMMDD/REGION/SERVICE/aws4_request, not {credential:?}"
        )));
    };
    if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(SigV4Error::UnknownKey);
    }
    if *terminator != "aws4_request" {
        return Err(SigV4Error::Scope(
            "Credential should be scoped with a valid terminator: 'aws4_request'".to_owned(),
        ));
    }
    let signature = unhex(signature).filter(|s| s.len() == 32).ok_or_else(|| {
        SigV4Error::Malformed("Signature must be 64 hexadecimal digits".to_owned())
    })?;
    let signed_headers: Vec<String> = signed.split(';').map(str::to_owned).collect();
    let sorted = signed_headers.windows(2).all(|w| w[0] < w[1]);
    let valid = signed_headers.iter().all(|h| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    });
    if !sorted || !valid {
        return Err(SigV4Error::Malformed(format!(
            "SignedHeaders must be lowercase header names, sorted and separated by ';', not \
             {signed:?}"
        )));
    }
    Ok(Claim {
        access_key_id: (*key).to_owned(),
        session_token,
        presigned,
        signature,
        scope_date: (*date).to_owned(),
        region: (*region).to_owned(),
        service: (*service).to_owned(),
        amz_date,
        signed_headers,
        expires,
    })
}

fn check_scope_and_time(
    claim: &Claim,
    cfg: &VerifyConfig,
    now: OffsetDateTime,
) -> Result<(), SigV4Error> {
    if claim.region != cfg.region {
        return Err(SigV4Error::Scope(format!(
            "Credential should be scoped to a valid region, not '{}'. This kiln server's region \
             is '{}'",
            claim.region, cfg.region
        )));
    }
    if claim.service != cfg.service {
        return Err(SigV4Error::Scope(format!(
            "Credential should be scoped to correct service: '{}', not '{}'",
            cfg.service, claim.service
        )));
    }
    let date = parse_amz_date(&claim.amz_date).ok_or_else(|| {
        SigV4Error::Malformed(format!(
            "X-Amz-Date must be in the form YYYYMMDD'T'HHMMSS'Z', not {:?}",
            claim.amz_date
        ))
    })?;
    if claim.amz_date.get(..8) != Some(claim.scope_date.as_str()) {
        return Err(SigV4Error::Scope(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from \
             HTTP: '{}' != '{}'",
            claim.scope_date,
            claim.amz_date.get(..8).unwrap_or("")
        )));
    }
    let skew = time::Duration::try_from(cfg.max_skew).unwrap_or(time::Duration::minutes(5));
    let fmt = |t: OffsetDateTime| format_amz_date(t);
    if date > now + skew {
        return Err(SigV4Error::Expired(format!(
            "Signature not yet current: {} is still later than {} ({} + {} min.)",
            claim.amz_date,
            fmt(now + skew),
            fmt(now),
            skew.whole_minutes()
        )));
    }
    match claim.expires {
        None if date < now - skew => Err(SigV4Error::Expired(format!(
            "Signature expired: {} is now earlier than {} ({} - {} min.)",
            claim.amz_date,
            fmt(now - skew),
            fmt(now),
            skew.whole_minutes()
        ))),
        Some(expires) if date + time::Duration::seconds(expires as i64) < now => {
            Err(SigV4Error::Expired(format!(
                "Request has expired: signed at {} for {expires} seconds, now {}",
                claim.amz_date,
                fmt(now)
            )))
        }
        _ => Ok(()),
    }
}

/// `20150830T123600Z` as a UTC time.
pub fn parse_amz_date(s: &str) -> Option<OffsetDateTime> {
    let fmt = format_description!("[year][month][day]T[hour][minute][second]Z");
    time::PrimitiveDateTime::parse(s, &fmt)
        .ok()
        .map(time::PrimitiveDateTime::assume_utc)
}

/// A UTC time as `20150830T123600Z`.
pub fn format_amz_date(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Every value of a header, by case-insensitive name, in order.
fn header_values<'a>(headers: &'a [(&'a str, &'a [u8])], name: &str) -> Vec<&'a [u8]> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v)
        .collect()
}

/// The canonical URI: normalized, and each segment encoded per `cfg`.
fn canonical_uri(path: &str, cfg: &VerifyConfig) -> Result<String, SigV4Error> {
    if !path.starts_with('/') {
        return Err(SigV4Error::Malformed(format!(
            "The request path must start with '/', not {path:?}"
        )));
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    let segments = if cfg.normalize_path {
        // Dot segments resolved and empty ones dropped; a trailing slash
        // stays (as an empty last segment) unless nothing is left.
        let last = segments.len().saturating_sub(1);
        let mut kept: Vec<&str> = Vec::with_capacity(segments.len());
        let mut trailing_slash = false;
        for (i, seg) in segments.iter().enumerate() {
            match *seg {
                "" | "." => trailing_slash = i == last,
                ".." => {
                    kept.pop();
                    trailing_slash = i == last;
                }
                s => {
                    kept.push(s);
                    trailing_slash = false;
                }
            }
        }
        if trailing_slash && !kept.is_empty() {
            kept.push("");
        }
        kept
    } else {
        segments
    };
    let mut out = String::from("/");
    for (i, seg) in segments.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        encode_segment(&mut out, seg, cfg.path_encoding);
    }
    Ok(out)
}

fn encode_segment(out: &mut String, seg: &str, mode: PathEncoding) {
    match mode {
        PathEncoding::Double => uri_encode(out, seg.as_bytes()),
        PathEncoding::Single => {
            let bytes = seg.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                let b = bytes[i];
                let escape = b == b'%'
                    && bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
                if escape {
                    out.push('%');
                    out.push(char::from(bytes[i + 1]).to_ascii_uppercase());
                    out.push(char::from(bytes[i + 2]).to_ascii_uppercase());
                    i += 3;
                } else {
                    uri_encode(out, &[b]);
                    i += 1;
                }
            }
        }
    }
}

/// Query pairs, percent-decoded (`+` stays a `+`, as AWS reads it).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn canonical_query(query: &str, presigned: bool, omit_token: bool) -> String {
    let mut pairs: Vec<(String, String)> = parse_query(query)
        .into_iter()
        .filter(|(k, _)| !(presigned && k == "X-Amz-Signature"))
        .filter(|(k, _)| !(omit_token && k == "X-Amz-Security-Token"))
        .map(|(k, v)| {
            let mut ek = String::new();
            uri_encode(&mut ek, k.as_bytes());
            let mut ev = String::new();
            uri_encode(&mut ev, v.as_bytes());
            (ek, ev)
        })
        .collect();
    pairs.sort();
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if let Some(b) = decoded {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 3986 encoding: everything but `A-Za-z0-9-._~` as `%XX`.
fn uri_encode(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    /// A request parsed from the test suite's text form.
    struct Parsed {
        method: String,
        path: String,
        query: Option<String>,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
    }

    impl Parsed {
        fn parse(text: &str) -> Self {
            let (head, body) = text.split_once("\n\n").unwrap_or((text, ""));
            let mut lines = head.lines();
            let request_line = lines.next().unwrap();
            let request_line = request_line
                .strip_suffix(" HTTP/1.1")
                .unwrap_or(request_line);
            let (method, target) = request_line.split_once(' ').unwrap();
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                None => (target.to_owned(), None),
            };
            let headers = lines
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (n, v) = l.split_once(':').unwrap();
                    (n.to_owned(), v.trim().as_bytes().to_vec())
                })
                .collect();
            Self {
                method: method.to_owned(),
                path,
                query,
                headers,
                body: body.trim_end_matches('\n').as_bytes().to_vec(),
            }
        }

        fn check(&self, cfg: &VerifyConfig, now: OffsetDateTime) -> Result<String, SigV4Error> {
            self.check_token(cfg, now, None)
        }

        /// As the server does: the signature, then the key's own token.
        fn check_token(
            &self,
            cfg: &VerifyConfig,
            now: OffsetDateTime,
            token: Option<&str>,
        ) -> Result<String, SigV4Error> {
            let headers: Vec<(&str, &[u8])> = self
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_slice()))
                .collect();
            let req = Incoming {
                method: &self.method,
                path: &self.path,
                query: self.query.as_deref(),
                headers: &headers,
                body: &self.body,
            };
            let c = claim(&req, cfg, now)?;
            let canonical = canonical_request(&req, &c, cfg)?;
            let secret = if c.access_key_id == "ANOTREAL" {
                "notrealrnrELgWzOk3IfjzDKtFBhDby"
            } else {
                SECRET
            };
            verify(&req, &c, secret, cfg)?;
            if c.session_token.as_deref() != token {
                return Err(SigV4Error::UnknownKey);
            }
            Ok(canonical)
        }
    }

    struct Case {
        name: String,
        token: Option<String>,
        cfg: VerifyConfig,
        now: OffsetDateTime,
        requests: Vec<(Parsed, String)>,
    }

    /// The AWS SigV4 test suite (from the aws-sigv4 crate's copy of the
    /// CRT suite), as `testdata/sigv4-suite.json`.
    fn suite() -> Vec<Case> {
        let cases: serde_json::Value =
            serde_json::from_str(include_str!("testdata/sigv4-suite.json")).unwrap();
        let mut out = Vec::new();
        for case in cases.as_array().unwrap() {
            let name = case["name"].as_str().unwrap().to_owned();
            // Not HTTP/1.1 as hyper accepts it: an obsolete folded header
            // and a raw space in the request target.
            if name == "get-header-value-multiline" || name == "get-space-unnormalized" {
                continue;
            }
            let mut requests = Vec::new();
            for kind in ["header", "query"] {
                if let Some(text) = case[format!("{kind}_signed_request")].as_str() {
                    let canonical = case[format!("{kind}_canonical_request")]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    requests.push((Parsed::parse(text), canonical));
                }
            }
            let ctx = &case["context"];
            let (cfg, now) = if ctx.is_null() {
                // The two older cases: Lambda-style double encoding; scope
                // and time from the request itself.
                let (req, _) = &requests[0];
                let auth = req
                    .headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("authorization"))
                    .unwrap();
                let auth = std::str::from_utf8(&auth.1).unwrap();
                let cred = auth.split("Credential=").nth(1).unwrap();
                let scope: Vec<&str> = cred.split(',').next().unwrap().split('/').collect();
                let date = req
                    .headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("x-amz-date"))
                    .unwrap();
                let cfg = VerifyConfig {
                    region: scope[2].to_owned(),
                    service: scope[3].to_owned(),
                    ..VerifyConfig::lambda(scope[2])
                };
                (
                    cfg,
                    parse_amz_date(std::str::from_utf8(&date.1).unwrap()).unwrap(),
                )
            } else {
                let ts = ctx["timestamp"].as_str().unwrap();
                let now = OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
                    .unwrap();
                let cfg = VerifyConfig {
                    region: ctx["region"].as_str().unwrap().to_owned(),
                    service: ctx["service"].as_str().unwrap().to_owned(),
                    max_skew: Duration::from_secs(300),
                    normalize_path: ctx["normalize"].as_bool().unwrap_or(true),
                    path_encoding: PathEncoding::Single,
                };
                (cfg, now)
            };
            let token = ctx["credentials"]["token"].as_str().map(str::to_owned);
            out.push(Case {
                name,
                token,
                cfg,
                now,
                requests,
            });
        }
        out
    }

    #[test]
    fn the_aws_test_vectors_verify() {
        let cases = suite();
        assert!(cases.len() >= 38, "{}", cases.len());
        let mut checked = 0;
        for case in &cases {
            for (req, canonical) in &case.requests {
                let got = req
                    .check_token(&case.cfg, case.now, case.token.as_deref())
                    .unwrap_or_else(|e| panic!("{}: {e}", case.name));
                // That file's canonical request carries another date than
                // its signed request (which verifies); the rest must match.
                // post-sts-header-after adds the token after signing: its
                // canonical query has none.
                let got = if case.name == "post-sts-header-after" {
                    got.replace(
                        &format!("&X-Amz-Security-Token={}", token_query(&case.token)),
                        "",
                    )
                } else {
                    got
                };
                if case.name != "double-encode-path" {
                    assert_eq!(&got, canonical, "{}", case.name);
                }
                checked += 1;
            }
        }
        assert!(checked >= 70, "{checked}");
    }

    fn token_query(token: &Option<String>) -> String {
        let mut out = String::new();
        uri_encode(&mut out, token.as_deref().unwrap_or("").as_bytes());
        out
    }

    /// Every one-field change to a signed request must be refused.
    #[test]
    fn any_one_field_mutation_is_refused() {
        for case in suite() {
            for (req, _) in &case.requests {
                for (what, mutated) in mutations(req) {
                    let result = mutated.check_token(&case.cfg, case.now, case.token.as_deref());
                    assert!(
                        result.is_err(),
                        "{}: mutating {what} was accepted",
                        case.name
                    );
                }
            }
        }
    }

    fn mutations(req: &Parsed) -> Vec<(String, Parsed)> {
        let clone = |r: &Parsed| Parsed {
            method: r.method.clone(),
            path: r.path.clone(),
            query: r.query.clone(),
            headers: r.headers.clone(),
            body: r.body.clone(),
        };
        let mut out = Vec::new();
        let mut m = clone(req);
        m.method = if m.method == "GET" { "POST" } else { "GET" }.to_owned();
        out.push(("method".to_owned(), m));
        let mut m = clone(req);
        m.path.push('x');
        out.push(("path".to_owned(), m));
        let mut m = clone(req);
        m.body.push(b'!');
        out.push(("body".to_owned(), m));
        let mut m = clone(req);
        m.query = Some(match &req.query {
            Some(q) => format!("{q}&Extra=1"),
            None => "Extra=1".to_owned(),
        });
        out.push(("query (added)".to_owned(), m));
        if let Some(q) = &req.query {
            for (i, pair) in q.split('&').enumerate() {
                let mut pairs: Vec<String> = q.split('&').map(str::to_owned).collect();
                pairs[i] = format!("{pair}0");
                let mut m = clone(req);
                m.query = Some(pairs.join("&"));
                out.push((format!("query pair {pair}"), m));
            }
        }
        for (i, (name, value)) in req.headers.iter().enumerate() {
            let mut m = clone(req);
            let mut v = value.clone();
            // Change a character of the value (not only its spacing).
            match v.iter().rposition(u8::is_ascii_alphanumeric) {
                Some(p) => v[p] = if v[p] == b'1' { b'2' } else { b'1' },
                None => v.push(b'1'),
            }
            m.headers[i].1 = v;
            out.push((format!("header {name}"), m));
        }
        out
    }

    fn lambda_request(amz_date: &str, sign_with: &str, region: &str) -> Parsed {
        let cfg = VerifyConfig::lambda(region);
        let mut req = Parsed {
            method: "POST".to_owned(),
            path: "/2015-03-31/functions/hello/invocations".to_owned(),
            query: None,
            headers: vec![
                ("Host".to_owned(), b"127.0.0.1:9000".to_vec()),
                ("X-Amz-Date".to_owned(), amz_date.as_bytes().to_vec()),
            ],
            body: b"{}".to_vec(),
        };
        let credential = format!(
            "AKIDEXAMPLE/{}/{region}/lambda/aws4_request",
            &amz_date[..8]
        );
        let mut header = format!(
            "{ALGORITHM} Credential={credential}, SignedHeaders=host;x-amz-date, Signature={}",
            "0".repeat(64)
        );
        let signature = {
            let headers: Vec<(&str, &[u8])> = req
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_slice()))
                .collect();
            let claim = from_header(
                &Incoming {
                    method: &req.method,
                    path: &req.path,
                    query: None,
                    headers: &headers,
                    body: &req.body,
                },
                &header,
            )
            .unwrap();
            let incoming = Incoming {
                method: &req.method,
                path: &req.path,
                query: None,
                headers: &headers,
                body: &req.body,
            };
            let canonical = canonical_request(&incoming, &claim, &cfg).unwrap();
            hex(signature_tag(sign_with, &claim, &canonical).as_ref())
        };
        header = header.replace(&"0".repeat(64), &signature);
        req.headers
            .push(("Authorization".to_owned(), header.into_bytes()));
        req
    }

    #[test]
    fn clock_skew_window() {
        let cfg = VerifyConfig::lambda("us-east-1");
        let signed_at = parse_amz_date("20261123T120000Z").unwrap();
        let req = lambda_request("20261123T120000Z", SECRET, "us-east-1");
        for (offset, ok) in [
            (0, true),
            (299, true),
            (-299, true),
            (301, false),
            (-301, false),
            (3600, false),
        ] {
            let now = signed_at + time::Duration::seconds(offset);
            let result = req.check(&cfg, now);
            assert_eq!(result.is_ok(), ok, "offset {offset}: {result:?}");
            if !ok {
                assert!(matches!(result, Err(SigV4Error::Expired(_))), "{result:?}");
            }
        }
        let narrow = VerifyConfig {
            max_skew: Duration::from_secs(60),
            ..cfg
        };
        assert!(
            req.check(&narrow, signed_at + time::Duration::seconds(61))
                .is_err()
        );
    }

    #[test]
    fn scope_secret_and_form_are_checked() {
        let cfg = VerifyConfig::lambda("us-east-1");
        let now = parse_amz_date("20261123T120000Z").unwrap();
        assert!(
            lambda_request("20261123T120000Z", SECRET, "us-east-1")
                .check(&cfg, now)
                .is_ok()
        );
        assert_eq!(
            lambda_request("20261123T120000Z", "another secret", "us-east-1").check(&cfg, now),
            Err(SigV4Error::Mismatch)
        );
        assert!(matches!(
            lambda_request("20261123T120000Z", SECRET, "eu-west-1").check(&cfg, now),
            Err(SigV4Error::Scope(_))
        ));
        // Unsigned: nothing to check.
        let mut unsigned = lambda_request("20261123T120000Z", SECRET, "us-east-1");
        unsigned.headers.pop();
        assert_eq!(unsigned.check(&cfg, now), Err(SigV4Error::Missing));
        assert_eq!(
            SigV4Error::Missing.error_type(),
            "MissingAuthenticationTokenException"
        );
        assert_eq!(
            SigV4Error::Mismatch.error_type(),
            "InvalidSignatureException"
        );
        assert_eq!(
            SigV4Error::UnknownKey.error_type(),
            "UnrecognizedClientException"
        );
    }

    #[test]
    fn presigned_links_verify_until_they_expire() {
        let cfg = VerifyConfig::lambda("us-east-1");
        let now = parse_amz_date("20261123T120000Z").unwrap();
        let key = PresignKey {
            access_key_id: "AKIDEXAMPLE",
            secret: SECRET,
            session_token: None,
        };
        let path = "/kiln/functions/hello/code.zip";
        let target = PresignTarget {
            method: "GET",
            host: "127.0.0.1:9000",
            path,
            query: &[("Qualifier", "1")],
            body: &[],
        };
        let query = presign(target, key, &cfg, now, 600).unwrap();
        let req = Parsed {
            method: "GET".to_owned(),
            path: path.to_owned(),
            query: Some(query.clone()),
            headers: vec![("Host".to_owned(), b"127.0.0.1:9000".to_vec())],
            body: Vec::new(),
        };
        assert!(req.check(&cfg, now + time::Duration::seconds(599)).is_ok());
        assert!(matches!(
            req.check(&cfg, now + time::Duration::seconds(601)),
            Err(SigV4Error::Expired(_))
        ));
        let other = Parsed {
            query: Some(query.replace("Qualifier=1", "Qualifier=2")),
            ..req
        };
        assert_eq!(other.check(&cfg, now), Err(SigV4Error::Mismatch));
    }

    #[test]
    fn host_and_date_must_be_signed() {
        let cfg = VerifyConfig::lambda("us-east-1");
        let now = parse_amz_date("20261123T120000Z").unwrap();
        let mut req = lambda_request("20261123T120000Z", SECRET, "us-east-1");
        let auth = &mut req.headers.last_mut().unwrap().1;
        *auth = String::from_utf8(auth.clone())
            .unwrap()
            .replace("SignedHeaders=host;x-amz-date", "SignedHeaders=x-amz-date")
            .into_bytes();
        let err = req.check(&cfg, now).unwrap_err();
        assert!(
            err.to_string().contains("host header must be signed"),
            "{err}"
        );
    }

    #[test]
    fn malformed_authorization_never_panics() {
        let cfg = VerifyConfig::lambda("us-east-1");
        let now = parse_amz_date("20261123T120000Z").unwrap();
        for value in [
            "",
            "AWS4-HMAC-SHA256",
            "AWS4-HMAC-SHA256 Credential=",
            "AWS4-HMAC-SHA256 Credential=a/b, SignedHeaders=host, Signature=zz",
            "AWS4-HMAC-SHA256 Credential=AK/20261123/us-east-1/lambda/aws4_request, \
             SignedHeaders=x-amz-date;host, Signature=00",
            "Basic dXNlcjpwYXNz",
            "AWS4-HMAC-SHA256 Credential=AK/2/us-east-1/lambda/aws4_request,Credential=x",
        ] {
            let req = Parsed {
                method: "GET".to_owned(),
                path: "/".to_owned(),
                query: Some("%zz=%".to_owned()),
                headers: vec![
                    ("Host".to_owned(), b"h".to_vec()),
                    ("X-Amz-Date".to_owned(), b"20261123T120000Z".to_vec()),
                    ("Authorization".to_owned(), value.as_bytes().to_vec()),
                ],
                body: Vec::new(),
            };
            assert!(req.check(&cfg, now).is_err(), "{value}");
        }
    }
}
