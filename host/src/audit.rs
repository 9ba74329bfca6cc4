//! The audit trail: a durable, hash-chained, digest-signed record of
//! control-plane calls, and its verifier (modeled on CloudTrail's log file
//! integrity validation).
//!
//! # What this module owns
//!
//! - the directory `<data>/audit/`: `records.jsonl`, `digests.jsonl` and
//!   `public-key` (the trail's Ed25519 public key, hex, for convenience);
//! - the signing key, an Ed25519 PKCS#8 document at the path given to
//!   [`AuditLog::open`] (the server passes `<data>/keys/audit-signing.pk8`),
//!   created 0600 in a 0700 directory when missing;
//! - [`verify`], which says exactly which records and digests were modified,
//!   removed, reordered or forged, and [`list`], which reads records back.
//!
//! # Formats
//!
//! `records.jsonl` holds one JSON object per line, appended and `fdatasync`'d
//! before [`AuditLog::append`] returns, fields in this order:
//!
//! ```text
//! {"seq":7,"time":"2025-01-02T03:04:05.678Z","principal":"…","source":"10.0.0.1:5123",
//!  "action":"CreateFunction","resource":"arn:…","function":"f"|null,"params":{…},
//!  "status":201,"error":"…"|null,"prev":"<64 hex>","hash":"<64 hex>"}
//! ```
//!
//! `seq` counts from 1 without gaps; `prev` is the previous record's `hash`
//! (64 zeros for record 1); `hash` is SHA-256 over `kiln-audit-record-v1\n`
//! followed by the record without `hash` serialized as compact JSON in the
//! field order above, with `params`' object keys sorted at every depth.
//! (Floats that would not survive a JSON round trip are stored as strings, so
//! recomputing a hash from the parsed line is exact.)
//!
//! `digests.jsonl` holds one signed digest per line, written by
//! [`AuditLog::write_digest`] (every few minutes and at shutdown):
//!
//! ```text
//! {"seq":3,"time":"…","first":21,"last":30,"last_hash":"<hash of record 30>",
//!  "records":"<hex SHA-256 of the raw 32-byte hashes of records 21..=30, concatenated>",
//!  "prev_digest":"<hex SHA-256 of the previous digest line's bytes, without its newline>",
//!  "key":"<key fingerprint>","signature":"<base64 Ed25519>"}
//! ```
//!
//! Each digest covers the records written since the one before it, so the
//! digests chain and together cover every record but those written since the
//! last one. The signature is over `kiln-audit-digest-v1\n` followed by the
//! digest without `signature` as compact JSON in the order above. The key
//! fingerprint is the first 16 bytes of the SHA-256 of the raw public key,
//! in hex.
//!
//! # Writing
//!
//! One [`AuditLog`] per directory (an exclusive `flock` on `records.jsonl`
//! enforces it). Appends are serialized by a mutex that guards the files and
//! the chain tip; each record is one `write` followed by `fdatasync`. A failed
//! write is cut back off the file; if that or the sync fails the log refuses
//! further writes. On open the tail is recovered: a last line without its
//! newline, or one that does not parse, is a torn write and is truncated away
//! with a warning (in either file) — the only repair ever made. Then the tip
//! (last seq and hash, last digest) is read back from the files' ends.
//!
//! # Verification, in order
//!
//! 1. **Digests.** Parse every line of `digests.jsonl` (a line that is not a
//!    digest is reported as such). A digest is *authentic* when its `key` is
//!    the trusted key's fingerprint and its signature verifies under the
//!    trusted key. An authentic digest is trusted as a whole.
//! 2. **Digests that are not authentic** are given the place (digest number)
//!    they occupy between their authentic neighbours, and reported as
//!    *forged* when they name another key, carry a signature no signer could
//!    have produced (not 64 bytes, or a non-canonical scalar), or stand where
//!    an authentic digest already is; otherwise as *modified* (a real
//!    signature over other content).
//! 3. **Digest chain.** Walk the authentic digests by number: a number with
//!    no digest and no line standing in its place was removed; each one's
//!    `prev_digest` must be the hash of the previous one's exact line (else
//!    that line was rewritten after signing) and its `first` must follow the
//!    previous `last`. Authentic digests out of file order are reported as
//!    swapped or moved (by a longest increasing subsequence).
//! 4. **Signed ranges.** For each authentic digest, recover the true hashes
//!    `T[first..=last]` by walking backwards from `T[last] = last_hash`: the
//!    record whose recomputed hash is `T[s]` is authentic and its `prev` gives
//!    `T[s-1]`; a record numbered `s` (or whose `hash` field is `T[s]`) that
//!    does not recompute to `T[s]` was modified; no record at all means it was
//!    removed. Past a modified or removed record the walk continues with the
//!    value the neighbours agree on (the modified record's `prev` if record
//!    `s-1` recomputes to it, else record `s-1`'s own hash). The result is
//!    accepted only if the signed `records` hash equals the SHA-256 of
//!    `T[first..=last]`; then every verdict in the range is certain, and each
//!    tampering is reported once, without touching its neighbours.
//! 5. **Realignment.** If a range does not match, records may have been
//!    inserted with renumbering (a forger rewrote `seq`, `prev` and `hash`
//!    after the insertion point). Rebuild the chain forward from the previous
//!    digest's `last_hash` using only the records' content, at positions
//!    near where the range should start, with no line or one line left out;
//!    an alignment that reproduces both `last_hash` and `records` proves the
//!    left-out line forged and the rest authentic (merely renumbered; not
//!    reported, being the forgery's consequence). If nothing matches — a
//!    removed or modified record whose chain was rewritten leaves nothing to
//!    rebuild it from — the range is reported as not matching its digest;
//!    its lines are claimed only after the later ranges have realigned, so
//!    those are still checked on their own and nothing cascades.
//! 6. **Unsigned ranges** (records whose digest was removed or is not
//!    authentic) are walked the same way, anchored above by the authenticated
//!    `prev` of the first record of the next signed range, checked against
//!    the previous digest's `last_hash` below.
//! 7. **The tail** after the last authentic digest is not signed: it is
//!    reported as `uncovered`, and checked only for gaps in numbering,
//!    records whose hash does not match their content (placed by the next
//!    record's `prev` or their position, as their `seq` may be what was
//!    altered), and links broken from the last signed record (or from that
//!    record as rewritten, when the chain was rewritten before it).
//! 8. **What is left:** a line repeating an authentic record is reported as
//!    repeated; any other record line not in the trail is forged; a line that
//!    is not a record is reported with the record it stands in place of (if
//!    any, instead of reporting that record removed); removals reaching the
//!    end of the trail are reported as a truncation; records out of file order
//!    as swapped or moved; records rechained with nothing before them to
//!    explain it as rechained. Records that could not be authenticated
//!    (because what vouched for them was removed) are listed in
//!    `unconfirmed`, which is not a problem.
//!
//! # Threat model
//!
//! The verifier treats both files as hostile input. It detects any change by
//! someone without the signing key: a record covered by an authentic digest
//! cannot be modified, removed, inserted or reordered without the report
//! saying so; a digest cannot be modified or forged. Limits:
//!
//! - records written since the last digest are protected only by the hash
//!   chain (reported as `uncovered`); the server writes a digest every few
//!   minutes and at shutdown to keep that window small;
//! - removing the newest digests together with the records they cover leaves
//!   a shorter trail that verifies; compare the last digest's number with a
//!   copy kept elsewhere to notice;
//! - anyone who can read the signing key (root on the host) can rewrite the
//!   trail and re-sign it with the same key, or sign with a new key and
//!   replace `public-key`. Record the fingerprint printed at server start
//!   somewhere else and verify with `kiln audit verify --public-key`, which
//!   trusts only the key given;
//! - telling a *modified* digest from a *forged* one is a heuristic (step 2);
//!   either way the digest is not trusted and the records it covered are
//!   checked through the chain;
//! - a record's hash covers its content, not its bytes: rewriting a line
//!   into equivalent JSON (spacing, key order) is not a change and is not
//!   reported. A digest's line is chained by its exact bytes.
//!
//! Files are read whole; one trail is expected to fit in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::store::artifacts::hex;

/// The records file's name in the audit directory.
pub const RECORDS_FILE: &str = "records.jsonl";
/// The digests file's name in the audit directory.
pub const DIGESTS_FILE: &str = "digests.jsonl";
/// The public key file's name in the audit directory (hex, one line).
pub const PUBLIC_KEY_FILE: &str = "public-key";

const RECORD_DOMAIN: &[u8] = b"kiln-audit-record-v1\n";
const DIGEST_DOMAIN: &[u8] = b"kiln-audit-digest-v1\n";
/// Longest signed range searched for one inserted line (the search is
/// quadratic in the range's length).
const SKIP_SEARCH_LIMIT: usize = 1024;
/// Where realignment looks, relative to where a range should start.
const REALIGN_OFFSETS: [isize; 5] = [0, 1, -1, 2, -2];

type Hash = [u8; 32];
const ZERO: Hash = [0; 32];

/// Why the audit trail could not be opened, written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A directory could not be created.
    #[error("Cannot create the directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The signing key could not be read.
    #[error("Cannot read the audit signing key {path}")]
    ReadKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The signing key could not be written.
    #[error("Cannot write the audit signing key {path}")]
    WriteKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The signing key file is not an Ed25519 PKCS#8 document.
    #[error("The audit signing key {path} is not an Ed25519 PKCS#8 key")]
    BadKey {
        /// The key file.
        path: PathBuf,
    },
    /// No key could be generated.
    #[error("Cannot generate an audit signing key")]
    KeyGeneration,
    /// The signing key is missing although the trail already has a key.
    #[error(
        "The audit signing key {key} is missing but {public_key} names the trail's key; restore the key or move the audit directory aside"
    )]
    KeyMissing {
        /// The key file.
        key: PathBuf,
        /// The trail's public key file.
        public_key: PathBuf,
    },
    /// The signing key is not the trail's key.
    #[error(
        "The audit signing key is not the key recorded in {path}; restore the key or move the audit directory aside"
    )]
    KeyChanged {
        /// The trail's public key file.
        path: PathBuf,
    },
    /// Another process holds the audit trail open.
    #[error("The audit trail {path} is in use by another process")]
    Locked {
        /// The records file.
        path: PathBuf,
    },
    /// A file could not be opened.
    #[error("Cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file could not be read.
    #[error("Cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file could not be written or synced.
    #[error("Cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A record or digest could not be encoded.
    #[error("Cannot encode an audit entry")]
    Encode(#[source] serde_json::Error),
    /// A time could not be formatted.
    #[error("Cannot format a time")]
    Time(#[source] time::error::Format),
    /// An earlier write failed in a way that left the files in doubt.
    #[error("The audit trail refuses writes after a failed write; restart to recover")]
    Broken,
    /// A public key given to the verifier is not usable.
    #[error("Invalid audit public key: {0}")]
    PublicKey(String),
}

/// One control-plane call, as the API reports it to [`AuditLog::append`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditEntry {
    /// Who called (an access key id or user name).
    pub principal: String,
    /// Where from (`ip:port`).
    pub source: String,
    /// The operation, e.g. `CreateFunction`.
    pub action: String,
    /// What it acted on (an ARN or a name).
    pub resource: String,
    /// The function concerned, if any (for filtering).
    pub function: Option<String>,
    /// The request's parameters, secrets already removed by the caller.
    pub params: Value,
    /// The HTTP status of the response.
    pub status: u16,
    /// The error type, if the call failed.
    pub error: Option<String>,
}

/// One line of `records.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Position in the trail, from 1, without gaps.
    pub seq: u64,
    /// When the call was recorded: RFC 3339, UTC, milliseconds.
    pub time: String,
    /// Who called.
    pub principal: String,
    /// Where from (`ip:port`).
    pub source: String,
    /// The operation.
    pub action: String,
    /// What it acted on.
    pub resource: String,
    /// The function concerned, if any.
    pub function: Option<String>,
    /// The request's parameters (object keys sorted).
    pub params: Value,
    /// The HTTP status of the response.
    pub status: u16,
    /// The error type, if the call failed.
    pub error: Option<String>,
    /// The previous record's hash (64 zeros for record 1), hex.
    pub prev: String,
    /// This record's hash, hex.
    pub hash: String,
}

/// The part of a record its hash covers, in the canonical field order.
#[derive(Serialize)]
struct RecordBody<'a> {
    seq: u64,
    time: &'a str,
    principal: &'a str,
    source: &'a str,
    action: &'a str,
    resource: &'a str,
    function: Option<&'a str>,
    params: &'a Value,
    status: u16,
    error: Option<&'a str>,
    prev: &'a str,
}

/// A record's hash if it were record `seq` following `prev`, with `params`
/// already canonical.
fn record_hash(
    record: &Record,
    seq: u64,
    prev: &str,
    params: &Value,
) -> Result<Hash, serde_json::Error> {
    let body = RecordBody {
        seq,
        time: &record.time,
        principal: &record.principal,
        source: &record.source,
        action: &record.action,
        resource: &record.resource,
        function: record.function.as_deref(),
        params,
        status: record.status,
        error: record.error.as_deref(),
        prev,
    };
    let bytes = serde_json::to_vec(&body)?;
    Ok(sha256(&[RECORD_DOMAIN, &bytes]))
}

/// One line of `digests.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Digest {
    seq: u64,
    time: String,
    first: u64,
    last: u64,
    last_hash: String,
    records: String,
    prev_digest: String,
    key: String,
    signature: String,
}

/// The part of a digest its signature covers, in the canonical field order.
#[derive(Serialize)]
struct DigestBody<'a> {
    seq: u64,
    time: &'a str,
    first: u64,
    last: u64,
    last_hash: &'a str,
    records: &'a str,
    prev_digest: &'a str,
    key: &'a str,
}

impl Digest {
    /// The bytes the signature covers.
    fn signed_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let body = DigestBody {
            seq: self.seq,
            time: &self.time,
            first: self.first,
            last: self.last,
            last_hash: &self.last_hash,
            records: &self.records,
            prev_digest: &self.prev_digest,
            key: &self.key,
        };
        let mut bytes = DIGEST_DOMAIN.to_vec();
        serde_json::to_writer(&mut bytes, &body)?;
        Ok(bytes)
    }
}

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut context = digest::Context::new(&digest::SHA256);
    for part in parts {
        context.update(part);
    }
    to_hash(&context.finish())
}

fn to_hash(d: &digest::Digest) -> Hash {
    d.as_ref().try_into().unwrap_or(ZERO)
}

/// Lowercase hex to bytes; `None` for anything else.
fn unhex_vec(text: &str) -> Option<Vec<u8>> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

fn unhex(text: &str) -> Option<Hash> {
    unhex_vec(text)?.try_into().ok()
}

/// The fingerprint of an Ed25519 public key: the first 16 bytes of its
/// SHA-256, in hex.
pub fn fingerprint(public_key: &[u8]) -> String {
    hex(&sha256(&[public_key])[..16])
}

/// Decodes a public key given as text (64 hex digits or base64 of 32 bytes),
/// as `kiln audit verify --public-key` takes it.
pub fn parse_public_key(text: &str) -> Result<Vec<u8>, AuditError> {
    let text = text.trim();
    let bytes = match unhex_vec(&text.to_ascii_lowercase()) {
        Some(bytes) => bytes,
        None => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| AuditError::PublicKey("neither hex nor base64".into()))?,
    };
    if bytes.len() != 32 {
        return Err(AuditError::PublicKey(format!(
            "{} bytes, an Ed25519 public key has 32",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn format_time(t: OffsetDateTime) -> Result<String, AuditError> {
    t.to_offset(time::UtcOffset::UTC)
        .format(crate::control::model::RFC3339_MILLIS)
        .map_err(AuditError::Time)
}

/// `params` in canonical form: object keys sorted at every depth, and floats
/// that would not parse back to themselves replaced by their text.
fn canonical(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, canonical(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        Value::Number(n) if n.is_f64() => {
            let text = serde_json::to_string(&n).unwrap_or_default();
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Number(back)) if back == n => Value::Number(n),
                _ => Value::String(text),
            }
        }
        other => other,
    }
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

/// The audit trail, open for appending. `Send + Sync`: appends from many
/// tasks are serialized.
pub struct AuditLog {
    dir: PathBuf,
    key: Ed25519KeyPair,
    public_key: Vec<u8>,
    fingerprint: String,
    state: Mutex<State>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.dir)
            .field("key", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The files and the chain tip, behind the mutex.
struct State {
    records: File,
    records_len: u64,
    digests: File,
    digests_len: u64,
    /// The last record's seq and hash.
    seq: u64,
    tip: Hash,
    /// The last seq covered by a digest, the last digest's seq, and the
    /// hash of its line.
    covered: u64,
    digest_seq: u64,
    digest_prev: Hash,
    /// SHA-256 over the hashes of records `covered+1..=seq`.
    pending: digest::Context,
    broken: bool,
}

impl AuditLog {
    /// Opens (creating if needed) the audit trail in `dir`, signing digests
    /// with the Ed25519 PKCS#8 key at `signing_key_path` (created 0600 if
    /// missing). Recovers the tail: a torn last line is truncated away with a
    /// warning.
    pub fn open(dir: &Path, signing_key_path: &Path) -> Result<Self, AuditError> {
        create_private_dir(dir)?;
        let public_key_path = dir.join(PUBLIC_KEY_FILE);
        let key = load_or_create_key(signing_key_path, &public_key_path)?;
        let public_key = key.public_key().as_ref().to_vec();
        record_public_key(&public_key_path, &public_key)?;
        let fingerprint = fingerprint(&public_key);

        let records_path = dir.join(RECORDS_FILE);
        let records = open_log(&records_path)?;
        lock_exclusive(&records, &records_path)?;
        let (records_len, last_record) = recover_tail::<Record>(&records, &records_path)?;
        let digests_path = dir.join(DIGESTS_FILE);
        let digests = open_log(&digests_path)?;
        let (digests_len, last_digest) = recover_tail::<Digest>(&digests, &digests_path)?;

        let (covered, digest_seq, digest_prev, covered_hash) = match &last_digest {
            Some((d, line)) => (d.last, d.seq, sha256(&[line]), unhex(&d.last_hash)),
            None => (0, 0, ZERO, Some(ZERO)),
        };
        let (seq, tip) = match &last_record {
            Some((r, _)) if r.seq >= covered => (r.seq, stored_or_recomputed(r)),
            _ => {
                if last_record.is_some() {
                    tracing::warn!(
                        path = %records_path.display(),
                        covered,
                        "the audit trail ends before its last digest; continuing after the digest"
                    );
                }
                (covered, covered_hash.unwrap_or(ZERO))
            }
        };

        // Records since the last digest, to be covered by the next one.
        let mut since: Vec<Record> = Vec::new();
        if seq > covered {
            let mut end = records_len;
            while let Some((start, bytes)) =
                line_before(&records, end).map_err(|source| AuditError::Read {
                    path: records_path.clone(),
                    source,
                })?
            {
                end = start;
                if let Ok(r) = serde_json::from_slice::<Record>(&bytes) {
                    if r.seq <= covered {
                        break;
                    }
                    since.push(r);
                }
            }
            since.reverse();
        }
        let mut pending = digest::Context::new(&digest::SHA256);
        let mut expected = (covered + 1, covered_hash);
        for r in &since {
            let hash = stored_or_recomputed(r);
            if r.seq != expected.0 || unhex(&r.prev) != expected.1 || unhex(&r.hash) != Some(hash) {
                tracing::warn!(
                    path = %records_path.display(),
                    seq = r.seq,
                    "audit records since the last digest do not chain; `kiln audit verify` will show where"
                );
            }
            expected = (r.seq + 1, Some(hash));
            pending.update(&hash);
        }

        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            public_key,
            fingerprint,
            state: Mutex::new(State {
                records,
                records_len,
                digests,
                digests_len,
                seq,
                tip,
                covered,
                digest_seq,
                digest_prev,
                pending,
                broken: false,
            }),
        })
    }

    /// Appends one record; returns its seq once it is on disk.
    pub fn append(&self, entry: AuditEntry) -> Result<u64, AuditError> {
        let params = canonical(entry.params);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.broken {
            return Err(AuditError::Broken);
        }
        let seq = state.seq + 1;
        let mut record = Record {
            seq,
            time: format_time(OffsetDateTime::now_utc())?,
            principal: entry.principal,
            source: entry.source,
            action: entry.action,
            resource: entry.resource,
            function: entry.function,
            params: Value::Null,
            status: entry.status,
            error: entry.error,
            prev: hex(&state.tip),
            hash: String::new(),
        };
        let hash = record_hash(&record, seq, &record.prev, &params).map_err(AuditError::Encode)?;
        record.params = params;
        record.hash = hex(&hash);
        let mut line = serde_json::to_vec(&record).map_err(AuditError::Encode)?;
        line.push(b'\n');
        let state = &mut *state;
        append_line(
            &state.records,
            &mut state.records_len,
            &mut state.broken,
            &line,
            &self.dir.join(RECORDS_FILE),
        )?;
        state.seq = seq;
        state.tip = hash;
        state.pending.update(&hash);
        Ok(seq)
    }

    /// Signs a digest of the records written since the last one; returns its
    /// seq, or `None` when there was nothing new to cover.
    pub fn write_digest(&self) -> Result<Option<u64>, AuditError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.broken {
            return Err(AuditError::Broken);
        }
        if state.seq <= state.covered {
            return Ok(None);
        }
        let records = to_hash(&state.pending.clone().finish());
        let mut digest = Digest {
            seq: state.digest_seq + 1,
            time: format_time(OffsetDateTime::now_utc())?,
            first: state.covered + 1,
            last: state.seq,
            last_hash: hex(&state.tip),
            records: hex(&records),
            prev_digest: hex(&state.digest_prev),
            key: self.fingerprint.clone(),
            signature: String::new(),
        };
        let signed = digest.signed_bytes().map_err(AuditError::Encode)?;
        digest.signature =
            base64::engine::general_purpose::STANDARD.encode(self.key.sign(&signed).as_ref());
        let mut line = serde_json::to_vec(&digest).map_err(AuditError::Encode)?;
        let line_hash = sha256(&[&line]);
        line.push(b'\n');
        let state = &mut *state;
        append_line(
            &state.digests,
            &mut state.digests_len,
            &mut state.broken,
            &line,
            &self.dir.join(DIGESTS_FILE),
        )?;
        state.covered = digest.last;
        state.digest_seq = digest.seq;
        state.digest_prev = line_hash;
        state.pending = digest::Context::new(&digest::SHA256);
        Ok(Some(digest.seq))
    }

    /// The signing key's fingerprint (hex), for the server to print at start.
    pub fn key_fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }
}

fn stored_or_recomputed(r: &Record) -> Hash {
    unhex(&r.hash).unwrap_or_else(|| {
        let params = canonical(r.params.clone());
        record_hash(r, r.seq, &r.prev, &params).unwrap_or(ZERO)
    })
}

/// Appends `line` with one write and syncs it. A failed write is cut back
/// off; if that or the sync fails, `broken` is set.
fn append_line(
    file: &File,
    len: &mut u64,
    broken: &mut bool,
    line: &[u8],
    path: &Path,
) -> Result<(), AuditError> {
    let mut writer = file;
    if let Err(source) = writer.write_all(line) {
        if file.set_len(*len).is_err() {
            *broken = true;
        }
        return Err(AuditError::Write {
            path: path.to_path_buf(),
            source,
        });
    }
    if let Err(source) = file.sync_data() {
        *broken = true;
        return Err(AuditError::Write {
            path: path.to_path_buf(),
            source,
        });
    }
    *len += line.len() as u64;
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<(), AuditError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| AuditError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })
}

fn open_log(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        })
}

fn lock_exclusive(file: &File, path: &Path) -> Result<(), AuditError> {
    // SAFETY: flock on a descriptor this function borrows for the call; no
    // memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(AuditError::Locked {
            path: path.to_path_buf(),
        });
    }
    Err(AuditError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the signing key, or creates it (0600, in a 0700 directory) when
/// missing and the trail has no key yet.
fn load_or_create_key(path: &Path, public_key_path: &Path) -> Result<Ed25519KeyPair, AuditError> {
    let parse = |bytes: &[u8]| {
        Ed25519KeyPair::from_pkcs8(bytes).map_err(|_| AuditError::BadKey {
            path: path.to_path_buf(),
        })
    };
    match fs::read(path) {
        Ok(bytes) => {
            if let Ok(meta) = fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(path = %path.display(), "the audit signing key is readable by others");
            }
            return parse(&bytes);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(AuditError::ReadKey {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    if public_key_path.exists() {
        return Err(AuditError::KeyMissing {
            key: path.to_path_buf(),
            public_key: public_key_path.to_path_buf(),
        });
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent)?;
    }
    let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| AuditError::KeyGeneration)?;
    let write_err = |source| AuditError::WriteKey {
        path: path.to_path_buf(),
        source,
    };
    // Written under a temporary name and linked into place, so the key file
    // is either absent or complete, and a concurrent creator's key wins.
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(document.as_ref())?;
        file.sync_all()?;
        match fs::hard_link(&tmp, path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            other => other.map(|()| true),
        }
    })();
    let _ = fs::remove_file(&tmp);
    let created = written.map_err(write_err)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(write_err)?;
    }
    if created {
        tracing::info!(path = %path.display(), "created the audit signing key");
        parse(document.as_ref())
    } else {
        let bytes = fs::read(path).map_err(|source| AuditError::ReadKey {
            path: path.to_path_buf(),
            source,
        })?;
        parse(&bytes)
    }
}

/// Writes `<dir>/public-key` if missing; refuses a key other than the one
/// already recorded there.
fn record_public_key(path: &Path, public_key: &[u8]) -> Result<(), AuditError> {
    match fs::read_to_string(path) {
        Ok(text) => match parse_public_key(&text) {
            Ok(existing) if existing == public_key => Ok(()),
            _ => Err(AuditError::KeyChanged {
                path: path.to_path_buf(),
            }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let write_err = |source| AuditError::Write {
                path: path.to_path_buf(),
                source,
            };
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(path)
                .map_err(write_err)?;
            file.write_all(format!("{}\n", hex(public_key)).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(write_err)
        }
        Err(source) => Err(AuditError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The line that ends at `end` (just after its newline, or at end of file):
/// its start offset and bytes without the newline.
fn line_before(file: &File, end: u64) -> io::Result<Option<(u64, Vec<u8>)>> {
    if end == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, end - 1)?;
    let stop = if last[0] == b'\n' { end - 1 } else { end };
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut pos = stop;
    let start = loop {
        if pos == 0 {
            break 0;
        }
        let size = pos.min(8192);
        let mut chunk = vec![0u8; size as usize];
        file.read_exact_at(&mut chunk, pos - size)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            let start = pos - size + i as u64 + 1;
            chunks.push(chunk.split_off(i + 1));
            break start;
        }
        pos -= size;
        chunks.push(chunk);
    };
    let line: Vec<u8> = chunks.into_iter().rev().flatten().collect();
    Ok(Some((start, line)))
}

/// A file's length after recovery, and its last parsable line (value and
/// bytes).
type Tail<T> = (u64, Option<(T, Vec<u8>)>);

/// Truncates a torn last line (no newline, or not parsable as `T`) and
/// returns what is left of the file's tail.
fn recover_tail<T: serde::de::DeserializeOwned>(
    file: &File,
    path: &Path,
) -> Result<Tail<T>, AuditError> {
    let read_err = |source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut len = file.metadata().map_err(read_err)?.len();
    let Some((start, bytes)) = line_before(file, len).map_err(read_err)? else {
        return Ok((0, None));
    };
    let mut last_byte = [0u8; 1];
    file.read_exact_at(&mut last_byte, len - 1)
        .map_err(read_err)?;
    match serde_json::from_slice::<T>(&bytes) {
        Ok(value) if last_byte[0] == b'\n' => return Ok((len, Some((value, bytes)))),
        _ => {
            tracing::warn!(
                path = %path.display(),
                offset = start,
                bytes = len - start,
                "truncating a torn last line (a write interrupted by a crash)"
            );
            file.set_len(start)
                .and_then(|()| file.sync_data())
                .map_err(|source| AuditError::Write {
                    path: path.to_path_buf(),
                    source,
                })?;
            len = start;
        }
    }
    // Resume from the last line that parses; anything unparsable before it
    // stays for the verifier to report.
    let mut end = len;
    while let Some((start, bytes)) = line_before(file, end).map_err(read_err)? {
        if let Ok(value) = serde_json::from_slice::<T>(&bytes) {
            return Ok((len, Some((value, bytes))));
        }
        tracing::warn!(path = %path.display(), offset = start, "an audit line does not parse");
        end = start;
    }
    Ok((len, None))
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// Which records [`list`] returns; every field set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only records about this function.
    pub function: Option<String>,
    /// Only records of this principal.
    pub principal: Option<String>,
    /// Only records at or after this time (millisecond precision).
    pub since: Option<OffsetDateTime>,
    /// Only records before this time (millisecond precision).
    pub until: Option<OffsetDateTime>,
    /// Only records of this action.
    pub action: Option<String>,
}

/// The records in `dir` matching `filter`, in file order. Lines that are not
/// records are skipped ([`verify`] reports them).
pub fn list(dir: &Path, filter: &Filter) -> Result<Vec<Record>, AuditError> {
    let since = filter.since.map(format_time).transpose()?;
    let until = filter.until.map(format_time).transpose()?;
    let bytes = read_optional(&dir.join(RECORDS_FILE))?;
    Ok(split_lines(&bytes)
        .into_iter()
        .filter_map(|(_, line)| serde_json::from_slice::<Record>(line).ok())
        .filter(|r| {
            filter
                .function
                .as_ref()
                .is_none_or(|f| r.function.as_ref() == Some(f))
                && filter.principal.as_ref().is_none_or(|p| &r.principal == p)
                && filter.action.as_ref().is_none_or(|a| &r.action == a)
                && since.as_ref().is_none_or(|s| &r.time >= s)
                && until.as_ref().is_none_or(|u| &r.time < u)
        })
        .collect())
}

fn read_optional(path: &Path) -> Result<Vec<u8>, AuditError> {
    match fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(AuditError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Lines with their 1-based numbers; a last line without newline counts.
fn split_lines(bytes: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut number = 0;
    while !rest.is_empty() {
        number += 1;
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                out.push((number, &rest[..i]));
                rest = &rest[i + 1..];
            }
            None => {
                out.push((number, rest));
                break;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Lines of `records.jsonl` that are records.
    pub records: u64,
    /// Lines of `digests.jsonl` that are digests.
    pub digests: u64,
    /// Every tampering found, digests first, then records in trail order.
    pub problems: Vec<Problem>,
    /// Records after the last authentic digest, not signed yet.
    pub uncovered: Option<(u64, u64)>,
    /// Records whose authenticity could not be established because what
    /// vouched for them was removed or altered (not problems themselves).
    pub unconfirmed: Vec<(u64, u64)>,
    /// The fingerprint of the key the digests were checked against.
    pub key: String,
}

impl VerifyReport {
    /// No problem found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One tampering with the trail. `Display` gives one precise line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// A line of `records.jsonl` is not a record.
    NotARecord {
        /// The line number (from 1).
        line: u64,
        /// The record missing where this line stands, if any.
        replaces: Option<u64>,
    },
    /// A record's content or hash was changed.
    RecordModified {
        /// The record.
        seq: u64,
    },
    /// Records were deleted.
    RecordsRemoved {
        /// The first one.
        first: u64,
        /// The last one.
        last: u64,
    },
    /// The newest records were deleted.
    RecordsTruncated {
        /// The first one.
        first: u64,
        /// The last one.
        last: u64,
    },
    /// Two records exchanged places.
    RecordsSwapped {
        /// The lower seq.
        first: u64,
        /// The higher seq.
        second: u64,
    },
    /// A record was moved elsewhere in the file.
    RecordMoved {
        /// The record.
        seq: u64,
        /// Where it is now.
        line: u64,
    },
    /// A line repeats an authentic record.
    RecordRepeated {
        /// The record.
        seq: u64,
        /// The repeating line.
        line: u64,
    },
    /// A line holds a record that is not part of the trail.
    RecordForged {
        /// The line.
        line: u64,
        /// The authentic record before it in the file (`None`: at the start).
        after: Option<u64>,
    },
    /// Records kept their content but their `seq`, `prev` or `hash` were
    /// rewritten, with no other tampering before them to explain it.
    RecordsRechained {
        /// The first one.
        first: u64,
        /// The last one.
        last: u64,
    },
    /// An unsigned record's `prev` is not the hash of the record before it.
    RecordChainBroken {
        /// The record.
        seq: u64,
    },
    /// The records a digest covers do not hash to its `records` value, and
    /// the change could not be localized.
    RangeMismatch {
        /// The digest.
        digest: u64,
        /// Its first record.
        first: u64,
        /// Its last record.
        last: u64,
    },
    /// A line of `digests.jsonl` is not a digest.
    NotADigest {
        /// The line number (from 1).
        line: u64,
        /// The digest missing where this line stands, if any.
        replaces: Option<u64>,
    },
    /// A digest's content was changed after signing.
    DigestModified {
        /// The digest.
        seq: u64,
    },
    /// A digest still verifies, but its line's bytes differ from those the
    /// next digest chains to.
    DigestRewritten {
        /// The digest.
        seq: u64,
        /// The digest that chains to it.
        next: u64,
    },
    /// A digest was not signed by the trail's key.
    DigestForged {
        /// The digest number it stands at.
        seq: u64,
    },
    /// Digests were deleted.
    DigestsRemoved {
        /// The first one.
        first: u64,
        /// The last one.
        last: u64,
    },
    /// Two digests exchanged places.
    DigestsSwapped {
        /// The lower seq.
        first: u64,
        /// The higher seq.
        second: u64,
    },
    /// A digest was moved elsewhere in the file.
    DigestMoved {
        /// The digest.
        seq: u64,
        /// Where it is now.
        line: u64,
    },
    /// A line repeats an authentic digest.
    DigestRepeated {
        /// The digest.
        seq: u64,
        /// The repeating line.
        line: u64,
    },
    /// Two authentic digests do not chain (only the key's holder can cause
    /// this).
    DigestDiscontinuous {
        /// The later digest.
        seq: u64,
    },
}

fn span(f: &mut fmt::Formatter<'_>, noun: &str, first: u64, last: u64) -> fmt::Result {
    if first == last {
        write!(f, "{noun} {first} was")
    } else {
        write!(f, "{noun}s {first}–{last} were")
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotARecord { line, replaces } => {
                write!(f, "line {line} of {RECORDS_FILE} is not a record")?;
                match replaces {
                    Some(seq) => write!(f, " (in place of record {seq})"),
                    None => Ok(()),
                }
            }
            Problem::RecordModified { seq } => write!(f, "record {seq} was modified"),
            Problem::RecordsRemoved { first, last } => {
                span(f, "record", *first, *last)?;
                write!(f, " removed")
            }
            Problem::RecordsTruncated { first, last } => {
                span(f, "record", *first, *last)?;
                write!(f, " removed (truncated)")
            }
            Problem::RecordsSwapped { first, second } => {
                write!(f, "records {first} and {second} are out of order (swapped)")
            }
            Problem::RecordMoved { seq, line } => {
                write!(
                    f,
                    "record {seq} was moved (now at line {line} of {RECORDS_FILE})"
                )
            }
            Problem::RecordRepeated { seq, line } => {
                write!(
                    f,
                    "record {seq} is repeated at line {line} of {RECORDS_FILE}"
                )
            }
            Problem::RecordForged { line, after } => {
                write!(f, "line {line} of {RECORDS_FILE} is a forged record, ")?;
                match after {
                    Some(seq) => write!(f, "inserted after record {seq}"),
                    None => write!(f, "inserted before the first record"),
                }
            }
            Problem::RecordsRechained { first, last } => {
                span(f, "record", *first, *last)?;
                write!(f, " renumbered or rechained")
            }
            Problem::RecordChainBroken { seq } => write!(
                f,
                "record {seq} does not follow record {} (its prev hash differs)",
                seq.saturating_sub(1)
            ),
            Problem::RangeMismatch {
                digest,
                first,
                last,
            } => write!(
                f,
                "records {first}–{last} do not match digest {digest} (forged, modified or removed records)"
            ),
            Problem::NotADigest { line, replaces } => {
                write!(f, "line {line} of {DIGESTS_FILE} is not a digest")?;
                match replaces {
                    Some(seq) => write!(f, " (in place of digest {seq})"),
                    None => Ok(()),
                }
            }
            Problem::DigestModified { seq } => {
                write!(f, "digest {seq}: signature does not verify (modified)")
            }
            Problem::DigestRewritten { seq, next } => write!(
                f,
                "digest {seq} was modified: its line differs from the one digest {next} chains to"
            ),
            Problem::DigestForged { seq } => {
                write!(f, "digest {seq} is forged: not signed by the trail's key")
            }
            Problem::DigestsRemoved { first, last } => {
                span(f, "digest", *first, *last)?;
                write!(f, " removed")
            }
            Problem::DigestsSwapped { first, second } => {
                write!(f, "digests {first} and {second} are out of order (swapped)")
            }
            Problem::DigestMoved { seq, line } => {
                write!(
                    f,
                    "digest {seq} was moved (now at line {line} of {DIGESTS_FILE})"
                )
            }
            Problem::DigestRepeated { seq, line } => {
                write!(
                    f,
                    "digest {seq} is repeated at line {line} of {DIGESTS_FILE}"
                )
            }
            Problem::DigestDiscontinuous { seq } => {
                write!(f, "digest {seq} does not continue the digest before it")
            }
        }
    }
}

/// Verifies the trail in `dir` against `public_key` (the raw 32-byte Ed25519
/// key; `None` trusts `<dir>/public-key`). See the module header for the
/// steps and what the report can and cannot say.
pub fn verify(dir: &Path, public_key: Option<&[u8]>) -> Result<VerifyReport, AuditError> {
    let key = match public_key {
        Some(key) if key.len() == 32 => key.to_vec(),
        Some(key) => {
            return Err(AuditError::PublicKey(format!(
                "{} bytes, an Ed25519 public key has 32",
                key.len()
            )));
        }
        None => {
            let path = dir.join(PUBLIC_KEY_FILE);
            let text =
                fs::read_to_string(&path).map_err(|source| AuditError::Read { path, source })?;
            parse_public_key(&text)?
        }
    };
    let fp = fingerprint(&key);
    let digest_bytes = read_optional(&dir.join(DIGESTS_FILE))?;
    let record_bytes = read_optional(&dir.join(RECORDS_FILE))?;

    let digests = check_digests(&digest_bytes, &key, &fp);
    let mut records = RecordCheck::new(&record_bytes);
    let unconfirmed = records.run(&digests.signed);

    let mut problems = digests.problems;
    problems.extend(records.problems.into_iter().map(|(_, p)| p));
    Ok(VerifyReport {
        records: records.lines.len() as u64,
        digests: digests.count,
        problems,
        uncovered: records.uncovered,
        unconfirmed,
        key: fp,
    })
}

/// A range of records covered by an authentic digest.
#[derive(Debug, Clone)]
struct Signed {
    digest: u64,
    first: u64,
    last: u64,
    last_hash: Hash,
    records: Hash,
}

struct DigestCheck {
    count: u64,
    problems: Vec<Problem>,
    signed: Vec<Signed>,
}

struct DigestLine {
    line: u64,
    digest: Digest,
    line_hash: Hash,
    authentic: bool,
    well_formed: bool,
}

/// Whether `signature` could have come from an Ed25519 signer: 64 bytes
/// whose scalar half is below the group order.
fn well_formed_signature(signature: &str) -> bool {
    // The group order L, little-endian.
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(signature) else {
        return false;
    };
    if bytes.len() != 64 {
        return false;
    }
    // S < L, compared from the most significant byte.
    for (s, l) in bytes[32..].iter().rev().zip(L.iter().rev()) {
        if s != l {
            return s < l;
        }
    }
    false
}

fn check_digests(bytes: &[u8], key: &[u8], fp: &str) -> DigestCheck {
    let verifier = UnparsedPublicKey::new(&ED25519, key);
    let mut lines: Vec<DigestLine> = Vec::new();
    let mut garbage: Vec<u64> = Vec::new();
    for (number, line) in split_lines(bytes) {
        match serde_json::from_slice::<Digest>(line) {
            Ok(digest) => {
                let signature = base64::engine::general_purpose::STANDARD
                    .decode(&digest.signature)
                    .unwrap_or_default();
                let authentic = digest.key == fp
                    && digest
                        .signed_bytes()
                        .is_ok_and(|m| verifier.verify(&m, &signature).is_ok());
                let well_formed = well_formed_signature(&digest.signature);
                lines.push(DigestLine {
                    line: number,
                    line_hash: sha256(&[line]),
                    digest,
                    authentic,
                    well_formed,
                });
            }
            Err(_) => garbage.push(number),
        }
    }
    let mut problems: Vec<Problem> = Vec::new();

    // Authentic digests by number; repeats reported.
    let mut by_seq: BTreeMap<u64, usize> = BTreeMap::new();
    let mut unique: Vec<usize> = Vec::new();
    for (i, l) in lines.iter().enumerate().filter(|(_, l)| l.authentic) {
        match by_seq.entry(l.digest.seq) {
            std::collections::btree_map::Entry::Occupied(_) => {
                problems.push(Problem::DigestRepeated {
                    seq: l.digest.seq,
                    line: l.line,
                });
            }
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(i);
                unique.push(i);
            }
        }
    }

    // The place of every other line, between its authentic neighbours.
    let neighbours = |line: u64| {
        let before = unique
            .iter()
            .rev()
            .map(|&i| &lines[i])
            .find(|l| l.line < line)
            .map_or(0, |l| l.digest.seq);
        let after = unique
            .iter()
            .map(|&i| &lines[i])
            .find(|l| l.line > line)
            .map(|l| l.digest.seq);
        (before, after)
    };
    let mut explained: BTreeSet<u64> = BTreeSet::new();
    let mut others: Vec<(u64, Problem)> = Vec::new();
    for l in lines.iter().filter(|l| !l.authentic) {
        let (before, after) = neighbours(l.line);
        let claimed = l.digest.seq;
        let slot = if claimed > before && after.is_none_or(|a| claimed < a) {
            claimed
        } else {
            before.saturating_add(1)
        };
        let forged = l.digest.key != fp
            || !l.well_formed
            || by_seq.contains_key(&slot)
            || explained.contains(&slot);
        explained.insert(slot);
        others.push((
            l.line,
            if forged {
                Problem::DigestForged { seq: slot }
            } else {
                Problem::DigestModified { seq: slot }
            },
        ));
    }
    for &line in &garbage {
        let (before, after) = neighbours(line);
        let slot = before.saturating_add(1);
        let replaces = (after == Some(slot.saturating_add(1))
            && !by_seq.contains_key(&slot)
            && !explained.contains(&slot))
        .then_some(slot);
        if let Some(slot) = replaces {
            explained.insert(slot);
        }
        others.push((line, Problem::NotADigest { line, replaces }));
    }
    others.sort_by_key(|(line, _)| *line);
    problems.extend(others.into_iter().map(|(_, p)| p));

    // The chain, by number.
    let mut signed: Vec<Signed> = Vec::new();
    let mut expected = 1;
    let mut previous: Option<&DigestLine> = None;
    for (&seq, &i) in &by_seq {
        let d = &lines[i];
        if seq > expected {
            for (first, last) in subtract(expected, seq - 1, &explained) {
                problems.push(Problem::DigestsRemoved { first, last });
            }
        }
        let mut continuous = d.digest.first >= 1 && d.digest.first <= d.digest.last;
        match previous {
            _ if seq == 1 => {
                continuous &= d.digest.first == 1 && unhex(&d.digest.prev_digest) == Some(ZERO);
            }
            Some(p) if p.digest.seq.saturating_add(1) == seq => {
                if unhex(&d.digest.prev_digest) != Some(p.line_hash) {
                    problems.push(Problem::DigestRewritten {
                        seq: p.digest.seq,
                        next: seq,
                    });
                }
                continuous &= d.digest.first == p.digest.last.saturating_add(1);
            }
            _ => {}
        }
        let after_previous = signed.last().is_none_or(|s| d.digest.first > s.last);
        if !continuous || !after_previous {
            problems.push(Problem::DigestDiscontinuous { seq });
        }
        if let (true, Some(last_hash), Some(records)) = (
            after_previous && d.digest.first >= 1 && d.digest.first <= d.digest.last,
            unhex(&d.digest.last_hash),
            unhex(&d.digest.records),
        ) {
            signed.push(Signed {
                digest: seq,
                first: d.digest.first,
                last: d.digest.last,
                last_hash,
                records,
            });
        }
        previous = Some(d);
        expected = seq.saturating_add(1);
    }

    // File order of the authentic digests.
    let order: Vec<(u64, u64)> = unique
        .iter()
        .map(|&i| (lines[i].digest.seq, lines[i].line))
        .collect();
    for issue in order_issues(&order) {
        problems.push(match issue {
            OrderIssue::Swapped(first, second) => Problem::DigestsSwapped { first, second },
            OrderIssue::Moved(seq, line) => Problem::DigestMoved { seq, line },
        });
    }

    DigestCheck {
        count: lines.len() as u64,
        problems,
        signed,
    }
}

/// Consecutive runs in a sorted list.
fn runs(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &s in sorted {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == s => *last = s,
            _ => out.push((s, s)),
        }
    }
    out
}

/// Sorted, merged runs.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (first, last) in ranges {
        match out.last_mut() {
            Some((_, end)) if first <= end.saturating_add(1) => *end = (*end).max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// Takes `seq` out of the runs; whether it was in one.
fn take(ranges: &mut Vec<(u64, u64)>, seq: u64) -> bool {
    let Some(k) = ranges.iter().position(|&(f, l)| f <= seq && seq <= l) else {
        return false;
    };
    let (first, last) = ranges.remove(k);
    if seq < last {
        ranges.insert(k, (seq + 1, last));
    }
    if first < seq {
        ranges.insert(k, (first, seq - 1));
    }
    true
}

/// `first..=last` without `holes`, as runs.
fn subtract(first: u64, last: u64, holes: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut from = first;
    for &hole in holes.range(first..=last) {
        if hole > from {
            out.push((from, hole - 1));
        }
        from = hole.saturating_add(1);
    }
    if from <= last && from >= first {
        out.push((from, last));
    }
    out
}

enum OrderIssue {
    Swapped(u64, u64),
    Moved(u64, u64),
}

/// Items `(seq, line)` in file order: which are out of order. Two items that
/// exchanged places are a swap; otherwise the items outside a longest
/// increasing subsequence were moved.
fn order_issues(items: &[(u64, u64)]) -> Vec<OrderIssue> {
    if items.windows(2).all(|w| w[0].0 < w[1].0) {
        return Vec::new();
    }
    let mut sorted: Vec<u64> = items.iter().map(|i| i.0).collect();
    sorted.sort_unstable();
    let differ: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].0 != sorted[i])
        .collect();
    if let [i, j] = differ[..]
        && items[i].0 == sorted[j]
        && items[j].0 == sorted[i]
    {
        let (a, b) = (items[i].0, items[j].0);
        return vec![OrderIssue::Swapped(a.min(b), a.max(b))];
    }
    // Longest strictly increasing subsequence.
    let mut tails: Vec<usize> = Vec::new();
    let mut parent: Vec<Option<usize>> = vec![None; items.len()];
    for i in 0..items.len() {
        let pos = tails.partition_point(|&j| items[j].0 < items[i].0);
        if pos > 0 {
            parent[i] = Some(tails[pos - 1]);
        }
        if pos == tails.len() {
            tails.push(i);
        } else {
            tails[pos] = i;
        }
    }
    let mut keep = vec![false; items.len()];
    let mut cursor = tails.last().copied();
    while let Some(i) = cursor {
        keep[i] = true;
        cursor = parent[i];
    }
    items
        .iter()
        .zip(keep)
        .filter(|(_, kept)| !kept)
        .map(|(&(seq, line), _)| OrderIssue::Moved(seq, line))
        .collect()
}

/// One parsed line of `records.jsonl`.
struct RecLine {
    line: u64,
    record: Record,
    /// The hash recomputed from the line's own fields.
    recomputed: Option<Hash>,
    /// The canonical body without `seq` and `prev`: the bytes between
    /// `{"seq":N` and `"<prev>"}`, so realignment hashes without encoding.
    middle: Option<Vec<u8>>,
    stored_hash: Option<Hash>,
    stored_prev: Option<Hash>,
}

impl RecLine {
    /// The line's hash matches its content.
    fn consistent(&self) -> bool {
        self.recomputed.is_some() && self.recomputed == self.stored_hash
    }

    /// The hash of this line's content as record `seq` following `prev`.
    fn hash_as(&self, seq: u64, prev: &Hash) -> Option<Hash> {
        let middle = self.middle.as_ref()?;
        Some(sha256(&[
            RECORD_DOMAIN,
            b"{\"seq\":",
            seq.to_string().as_bytes(),
            middle,
            b"\"",
            hex(prev).as_bytes(),
            b"\"}",
        ]))
    }
}

/// A record's canonical body without `seq` and `prev` (see
/// [`RecLine::middle`]).
fn body_middle(record: &Record, params: &Value) -> Option<Vec<u8>> {
    const HEAD: &[u8] = b"{\"seq\":0";
    const TAIL: &[u8] = b"\"\"}";
    let body = RecordBody {
        seq: 0,
        time: &record.time,
        principal: &record.principal,
        source: &record.source,
        action: &record.action,
        resource: &record.resource,
        function: record.function.as_deref(),
        params,
        status: record.status,
        error: record.error.as_deref(),
        prev: "",
    };
    let bytes = serde_json::to_vec(&body).ok()?;
    let inner = bytes.strip_prefix(HEAD)?.strip_suffix(TAIL)?;
    Some(inner.to_vec())
}

/// What became of a parsed record line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Free,
    Authentic(u64),
    Modified(u64),
    /// Content authentic, `seq`/`prev`/`hash` rewritten.
    Rechained(u64),
    Unconfirmed(u64),
    Uncovered(u64),
    Forged,
    Repeated(u64),
}

impl Fate {
    /// The record this line is, if it is one of the trail's.
    fn seq(self) -> Option<u64> {
        match self {
            Fate::Authentic(s)
            | Fate::Modified(s)
            | Fate::Rechained(s)
            | Fate::Unconfirmed(s)
            | Fate::Uncovered(s) => Some(s),
            Fate::Free | Fate::Forged | Fate::Repeated(_) => None,
        }
    }
}

#[derive(Clone, Copy)]
enum Pick {
    /// The line recomputes to `T[s]`; `authed`: `T[s]` was authenticated.
    Match { authed: bool },
    /// The line stands for record `s` but does not recompute to `T[s]`.
    Mismatch { authed: bool },
}

/// The result of walking a range backwards from its upper anchor.
struct Walk {
    /// `T[first..=last]`, where known.
    t: Vec<Option<Hash>>,
    picks: Vec<(usize, u64, Pick)>,
    missing: Vec<u64>,
    /// The value found for `T[first-1]`, and whether it is authenticated.
    lower: Option<Hash>,
    lower_authed: bool,
}

/// A forward realignment that reproduced a digest.
struct Aligned {
    /// Line index, seq, `T[seq-1]`, `T[seq]`.
    lines: Vec<(usize, u64, Hash, Hash)>,
    skipped: Option<usize>,
}

struct RecordCheck {
    lines: Vec<RecLine>,
    garbage: Vec<u64>,
    by_seq: HashMap<u64, Vec<usize>>,
    by_recomputed: HashMap<Hash, Vec<usize>>,
    by_stored: HashMap<Hash, Vec<usize>>,
    fate: Vec<Fate>,
    /// Runs of records known to have existed and found nowhere.
    removed: Vec<(u64, u64)>,
    /// `(position in the trail, problem)`.
    problems: Vec<(u64, Problem)>,
    /// Signed ranges that match neither as found nor realigned.
    mismatched: Vec<(u64, u64)>,
    uncovered: Option<(u64, u64)>,
}

fn commitment(t: &[Option<Hash>]) -> Option<Hash> {
    let mut context = digest::Context::new(&digest::SHA256);
    for h in t {
        context.update(h.as_ref()?);
    }
    Some(to_hash(&context.finish()))
}

impl RecordCheck {
    fn new(bytes: &[u8]) -> Self {
        let mut lines = Vec::new();
        let mut garbage = Vec::new();
        for (number, line) in split_lines(bytes) {
            match serde_json::from_slice::<Record>(line) {
                Ok(record) => {
                    let params = canonical(record.params.clone());
                    let recomputed = record_hash(&record, record.seq, &record.prev, &params).ok();
                    let middle = body_middle(&record, &params);
                    lines.push(RecLine {
                        line: number,
                        stored_hash: unhex(&record.hash),
                        stored_prev: unhex(&record.prev),
                        record,
                        recomputed,
                        middle,
                    });
                }
                Err(_) => garbage.push(number),
            }
        }
        let mut by_seq: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut by_recomputed: HashMap<Hash, Vec<usize>> = HashMap::new();
        let mut by_stored: HashMap<Hash, Vec<usize>> = HashMap::new();
        for (i, l) in lines.iter().enumerate() {
            by_seq.entry(l.record.seq).or_default().push(i);
            if let Some(h) = l.recomputed {
                by_recomputed.entry(h).or_default().push(i);
            }
            if let Some(h) = l.stored_hash {
                by_stored.entry(h).or_default().push(i);
            }
        }
        let fate = vec![Fate::Free; lines.len()];
        Self {
            lines,
            garbage,
            by_seq,
            by_recomputed,
            by_stored,
            fate,
            removed: Vec::new(),
            problems: Vec::new(),
            mismatched: Vec::new(),
            uncovered: None,
        }
    }

    fn remove_all(&mut self, missing: &[u64]) {
        let mut sorted = missing.to_vec();
        sorted.sort_unstable();
        self.removed.extend(runs(&sorted));
    }

    fn free(&self, i: usize, taken: &HashSet<usize>) -> bool {
        self.fate[i] == Fate::Free && !taken.contains(&i)
    }

    fn free_with_seq(&self, seq: u64, taken: &HashSet<usize>) -> Vec<usize> {
        self.by_seq
            .get(&seq)
            .map(|v| v.iter().copied().filter(|&i| self.free(i, taken)).collect())
            .unwrap_or_default()
    }

    /// The best value for `T[seq]` once the record above no longer vouches
    /// for it: `from_prev` (the record above's `prev`) if record `seq`
    /// recomputes to it, else record `seq`'s own hash.
    fn hint(&self, seq: u64, from_prev: Option<Hash>, taken: &HashSet<usize>) -> Option<Hash> {
        if seq == 0 {
            return Some(ZERO);
        }
        let candidates = self.free_with_seq(seq, taken);
        if let Some(p) = from_prev
            && candidates
                .iter()
                .any(|&i| self.lines[i].recomputed == Some(p))
        {
            return Some(p);
        }
        if let Some(&i) = candidates.iter().find(|&&i| self.lines[i].consistent()) {
            return self.lines[i].recomputed;
        }
        from_prev.or_else(|| candidates.first().and_then(|&i| self.lines[i].stored_hash))
    }

    /// Step 4: walk `first..=last` backwards from `upper` (`T[last]`).
    fn walk(&self, first: u64, last: u64, upper: Option<(Hash, bool)>) -> Walk {
        let mut taken: HashSet<usize> = HashSet::new();
        let n = usize::try_from(last - first + 1).unwrap_or(usize::MAX);
        let mut t_list = vec![None; n];
        let mut picks = Vec::new();
        let mut missing = Vec::new();
        let (mut t, mut authed) = match upper {
            Some((h, a)) => (Some(h), a),
            None => (None, false),
        };
        for s in (first..=last).rev() {
            t_list[(s - first) as usize] = t;
            let exact = t.and_then(|h| {
                self.by_recomputed
                    .get(&h)?
                    .iter()
                    .copied()
                    .find(|&i| self.lines[i].record.seq == s && self.free(i, &taken))
            });
            if let Some(i) = exact {
                taken.insert(i);
                picks.push((i, s, Pick::Match { authed }));
                t = self.lines[i].stored_prev;
                authed &= t.is_some();
                continue;
            }
            let standing = t
                .and_then(|h| {
                    self.by_stored
                        .get(&h)?
                        .iter()
                        .copied()
                        .find(|&i| self.free(i, &taken))
                })
                .or_else(|| self.free_with_seq(s, &taken).first().copied());
            match standing {
                Some(i) => {
                    taken.insert(i);
                    picks.push((
                        i,
                        s,
                        Pick::Mismatch {
                            authed: authed && t.is_some(),
                        },
                    ));
                    t = self.hint(s - 1, self.lines[i].stored_prev, &taken);
                }
                None => {
                    missing.push(s);
                    t = self.hint(s - 1, None, &taken);
                }
            }
            authed = false;
        }
        Walk {
            t: t_list,
            picks,
            missing,
            lower: t,
            lower_authed: authed,
        }
    }

    /// Step 5: rebuild `first..=last` forward from `anchor` (`T[first-1]`)
    /// out of the lines' content, starting near position `p0`, leaving out
    /// no line or one.
    fn realign(&self, range: &Signed, anchor: Hash, p0: usize) -> Option<Aligned> {
        let n = usize::try_from(range.last - range.first + 1).ok()?;
        let len = self.lines.len();
        let all_free = |from: usize, to: usize| (from..to).all(|i| self.fate[i] == Fate::Free);
        let matches = |t: &[Hash]| {
            t.last() == Some(&range.last_hash)
                && commitment(&t.iter().map(|h| Some(*h)).collect::<Vec<_>>())
                    == Some(range.records)
        };
        let chain = |positions: &mut dyn Iterator<Item = usize>, from: Hash, seq: u64| {
            let mut out = Vec::new();
            let mut cur = from;
            for (k, p) in positions.enumerate() {
                cur = self.lines[p].hash_as(seq + k as u64, &cur)?;
                out.push(cur);
            }
            Some(out)
        };
        for delta in REALIGN_OFFSETS {
            let Some(p) = p0.checked_add_signed(delta) else {
                continue;
            };
            if p + n > len || !all_free(p, p + n) {
                continue;
            }
            let Some(prefix) = chain(&mut (p..p + n), anchor, range.first) else {
                continue;
            };
            if matches(&prefix) {
                return Some(self.aligned(range, anchor, &prefix, (p..p + n).collect(), None));
            }
            if n > SKIP_SEARCH_LIMIT || p + n + 1 > len || !all_free(p, p + n + 1) {
                continue;
            }
            for k in 0..n {
                let from = if k == 0 { anchor } else { prefix[k - 1] };
                let Some(rest) = chain(&mut (p + k + 1..p + n + 1), from, range.first + k as u64)
                else {
                    continue;
                };
                let t: Vec<Hash> = prefix[..k].iter().copied().chain(rest).collect();
                if matches(&t) {
                    let positions = (p..p + n + 1).filter(|&q| q != p + k).collect();
                    return Some(self.aligned(range, anchor, &t, positions, Some(p + k)));
                }
            }
        }
        None
    }

    fn aligned(
        &self,
        range: &Signed,
        anchor: Hash,
        t: &[Hash],
        positions: Vec<usize>,
        skipped: Option<usize>,
    ) -> Aligned {
        let lines = positions
            .into_iter()
            .enumerate()
            .map(|(k, p)| {
                let prev = if k == 0 { anchor } else { t[k - 1] };
                (p, range.first + k as u64, prev, t[k])
            })
            .collect();
        Aligned { lines, skipped }
    }

    fn first_position(&self, seq: u64) -> usize {
        self.lines
            .iter()
            .position(|l| l.record.seq >= seq)
            .unwrap_or(self.lines.len())
    }

    /// Steps 4 and 5 for one signed range. Returns the link below it
    /// (`T[first-1]` and whether it is authenticated), the last position
    /// used, and the renumbering shift if it was realigned.
    fn check_signed(
        &mut self,
        range: &Signed,
        anchor: Option<Hash>,
        p0: usize,
    ) -> (Option<(Hash, bool)>, Option<usize>, Option<i128>) {
        if range.last - range.first > self.lines.len() as u64 + (1 << 20) {
            self.problems.push((
                range.first,
                Problem::RangeMismatch {
                    digest: range.digest,
                    first: range.first,
                    last: range.last,
                },
            ));
            return (None, None, None);
        }
        let walk = self.walk(range.first, range.last, Some((range.last_hash, true)));
        let t_at = |s: u64| walk.t[(s - range.first) as usize];
        let confirmed = commitment(&walk.t) == Some(range.records);
        let last_pos = walk.picks.iter().map(|p| p.0).max();
        if confirmed {
            for &(i, s, pick) in &walk.picks {
                self.fate[i] = match pick {
                    Pick::Match { .. } if self.lines[i].stored_hash == t_at(s) => {
                        Fate::Authentic(s)
                    }
                    _ => Fate::Modified(s),
                };
            }
            self.remove_all(&walk.missing);
            let first_matched = walk
                .picks
                .iter()
                .any(|&(_, s, pick)| s == range.first && matches!(pick, Pick::Match { .. }));
            let link = walk.lower.map(|h| (h, first_matched));
            return (link, last_pos, Some(0));
        }
        if let Some(aligned) = anchor.and_then(|a| self.realign(range, a, p0)) {
            for &(i, s, prev, hash) in &aligned.lines {
                let l = &self.lines[i];
                let intact =
                    l.record.seq == s && l.stored_prev == Some(prev) && l.stored_hash == Some(hash);
                self.fate[i] = if intact {
                    Fate::Authentic(s)
                } else {
                    Fate::Rechained(s)
                };
            }
            if let Some(i) = aligned.skipped {
                self.fate[i] = Fate::Forged;
            }
            let last = aligned.lines.last().map(|&(i, ..)| i);
            let shift = last.map(|i| i128::from(self.lines[i].record.seq) - i128::from(range.last));
            return (anchor.map(|a| (a, true)), last, shift);
        }
        let complete = walk.t.iter().all(Option::is_some);
        if complete {
            // The range does not match and the change cannot be localized.
            self.problems.push((
                range.first,
                Problem::RangeMismatch {
                    digest: range.digest,
                    first: range.first,
                    last: range.last,
                },
            ));
            // Its lines are claimed only after every range had its chance
            // to realign over them.
            self.mismatched.push((range.first, range.last));
            return (None, last_pos, None);
        }
        // Records are missing in a way that leaves some `T` unknown: keep what
        // is certain.
        for &(i, s, pick) in &walk.picks {
            let consistent = self.lines[i].consistent();
            self.fate[i] = match pick {
                Pick::Match { authed: true } if self.lines[i].stored_hash == t_at(s) => {
                    Fate::Authentic(s)
                }
                Pick::Match { authed: true } | Pick::Mismatch { authed: true } => Fate::Modified(s),
                _ if consistent => Fate::Unconfirmed(s),
                _ => Fate::Modified(s),
            };
        }
        self.remove_all(&walk.missing);
        (
            walk.lower.map(|h| (h, walk.lower_authed)),
            last_pos,
            Some(0),
        )
    }

    /// Step 6: records between signed ranges.
    fn check_unsigned(&mut self, first: u64, last: u64, upper: Option<(Hash, bool)>) {
        if last - first > self.lines.len() as u64 + (1 << 20) {
            return;
        }
        let walk = self.walk(first, last, upper);
        for &(i, s, pick) in &walk.picks {
            let l = &self.lines[i];
            self.fate[i] = match pick {
                Pick::Match { authed: true } if l.stored_hash == walk.t[(s - first) as usize] => {
                    Fate::Authentic(s)
                }
                Pick::Match { authed: true } | Pick::Mismatch { authed: true } => Fate::Modified(s),
                _ if l.consistent() => Fate::Unconfirmed(s),
                _ => Fate::Modified(s),
            };
        }
        self.remove_all(&walk.missing);
    }

    /// Step 7: the unsigned tail after record `n` (whose hash is `anchor`).
    fn check_tail(&mut self, n: u64, anchor: Hash, shift: i128) {
        let claimed = |i: usize| i128::from(self.lines[i].record.seq) - shift;
        let mut groups: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, l) in self.lines.iter().enumerate() {
            if self.fate[i] != Fate::Free {
                continue;
            }
            // A line whose hash does not match its content may have had its
            // seq altered: the next record's `prev`, or else its position
            // after a sound record, says which record it is.
            let seq = if l.consistent() {
                claimed(i)
            } else {
                let by_chain = l.stored_hash.and_then(|h| {
                    self.lines
                        .iter()
                        .enumerate()
                        .find(|(j, m)| {
                            self.fate[*j] == Fate::Free
                                && m.consistent()
                                && m.stored_prev == Some(h)
                        })
                        .map(|(j, _)| claimed(j) - 1)
                });
                let by_position = i
                    .checked_sub(1)
                    .filter(|&j| self.lines[j].consistent())
                    .map(|j| claimed(j) + 1);
                by_chain
                    .or(by_position)
                    .filter(|&s| s > i128::from(n))
                    .unwrap_or_else(|| claimed(i))
            };
            if seq > i128::from(n)
                && let Ok(seq) = u64::try_from(seq)
            {
                groups.entry(seq).or_default().push(i);
            }
        }
        let mut expected = n.saturating_add(1);
        // The previous record's hash, when the previous record is present
        // and its hash can be relied on.
        let mut prev: Option<Hash> = Some(anchor);
        let mut highest = None;
        for (&s, candidates) in &groups {
            if s > expected {
                self.removed.push((expected, s - 1));
                prev = None;
            }
            let lines = &self.lines;
            let pick = candidates
                .iter()
                .copied()
                .find(|&i| lines[i].consistent() && prev.is_some() && lines[i].stored_prev == prev)
                .or_else(|| candidates.iter().copied().find(|&i| lines[i].consistent()))
                .unwrap_or(candidates[0]);
            let l = &self.lines[pick];
            if l.consistent() {
                self.fate[pick] = Fate::Uncovered(s);
                if prev.is_some() && l.stored_prev != prev {
                    self.problems
                        .push((s, Problem::RecordChainBroken { seq: s }));
                }
                prev = l.stored_hash;
            } else {
                self.fate[pick] = Fate::Modified(s);
                prev = None;
            }
            highest = Some(s);
            expected = s.saturating_add(1);
        }
        self.uncovered = highest.map(|h| (n.saturating_add(1), h));
    }

    /// Runs steps 4 to 8 over the signed ranges; returns the unconfirmed
    /// runs.
    fn run(&mut self, signed: &[Signed]) -> Vec<(u64, u64)> {
        let mut links: Vec<Option<(Hash, bool)>> = Vec::with_capacity(signed.len());
        let mut last_pos: Option<usize> = None;
        let mut shift: i128 = 0;
        for (k, range) in signed.iter().enumerate() {
            let (below_end, below_hash) = match k {
                0 => (0, ZERO),
                _ => (signed[k - 1].last, signed[k - 1].last_hash),
            };
            let anchor = (range.first == below_end.saturating_add(1)).then_some(below_hash);
            let p0 = match (anchor, last_pos) {
                (Some(_), Some(p)) if k > 0 => p + 1,
                _ => self.first_position(range.first),
            };
            let (link, pos, range_shift) = self.check_signed(range, anchor, p0);
            links.push(link);
            last_pos = pos;
            shift = range_shift.unwrap_or(0);
        }
        for (k, range) in signed.iter().enumerate() {
            let below_end = if k == 0 { 0 } else { signed[k - 1].last };
            if range.first > below_end.saturating_add(1) {
                self.check_unsigned(below_end + 1, range.first - 1, links[k]);
            }
        }
        for (first, last) in std::mem::take(&mut self.mismatched) {
            for (i, l) in self.lines.iter().enumerate() {
                if self.fate[i] == Fate::Free && (first..=last).contains(&l.record.seq) {
                    self.fate[i] = Fate::Unconfirmed(l.record.seq);
                }
            }
        }
        let (n, mut anchor) = signed.last().map_or((0, ZERO), |r| (r.last, r.last_hash));
        // If the last signed record was rechained, so was the tail after it:
        // the tail links to the record as rewritten.
        if let Some(p) = last_pos
            && self.fate[p] == Fate::Rechained(n)
            && let Some(h) = self.lines[p].stored_hash
        {
            anchor = h;
        }
        self.check_tail(n, anchor, shift);
        self.finish()
    }

    /// Step 8: leftovers, garbage, removals, order, rechaining.
    fn finish(&mut self) -> Vec<(u64, u64)> {
        // Lines not in the trail: repeats of an authentic record, or forged.
        for i in 0..self.lines.len() {
            if self.fate[i] != Fate::Free {
                continue;
            }
            let l = &self.lines[i];
            let repeated = self.by_seq.get(&l.record.seq).and_then(|same| {
                same.iter()
                    .find(|&&j| j != i && self.lines[j].record == l.record)
                    .and_then(|&j| self.fate[j].seq())
            });
            self.fate[i] = match repeated {
                Some(seq) => Fate::Repeated(seq),
                None => Fate::Forged,
            };
        }
        // The trail's records by line number.
        let placed: Vec<(u64, u64)> = self
            .lines
            .iter()
            .zip(&self.fate)
            .filter_map(|(l, f)| f.seq().map(|s| (s, l.line)))
            .collect();
        let before = |line: u64| {
            placed
                .iter()
                .rev()
                .find(|(_, l)| *l < line)
                .map(|(s, _)| *s)
        };
        let after = |line: u64| placed.iter().find(|(_, l)| *l > line).map(|(s, _)| *s);

        for (i, l) in self.lines.iter().enumerate() {
            let at = before(l.line);
            match self.fate[i] {
                Fate::Modified(seq) => self.problems.push((seq, Problem::RecordModified { seq })),
                Fate::Forged => self.problems.push((
                    at.map_or(0, |s| s.saturating_add(1)),
                    Problem::RecordForged {
                        line: l.line,
                        after: at,
                    },
                )),
                Fate::Repeated(seq) => self
                    .problems
                    .push((seq, Problem::RecordRepeated { seq, line: l.line })),
                _ => {}
            }
        }
        let mut removed = merge(std::mem::take(&mut self.removed));
        for &line in &self.garbage {
            let slot = before(line).unwrap_or(0).saturating_add(1);
            let replaces = (after(line).is_none_or(|b| b == slot.saturating_add(1))
                && take(&mut removed, slot))
            .then_some(slot);
            self.problems
                .push((slot, Problem::NotARecord { line, replaces }));
        }
        let highest = placed.iter().map(|(s, _)| *s).max().unwrap_or(0);
        for (first, last) in removed {
            let problem = if last > highest {
                Problem::RecordsTruncated { first, last }
            } else {
                Problem::RecordsRemoved { first, last }
            };
            self.problems.push((first, problem));
        }
        for issue in order_issues(&placed) {
            self.problems.push(match issue {
                OrderIssue::Swapped(first, second) => {
                    (first, Problem::RecordsSwapped { first, second })
                }
                OrderIssue::Moved(seq, line) => (seq, Problem::RecordMoved { seq, line }),
            });
        }
        // Rechained records are reported only when nothing before them
        // explains the rewrite.
        let collect = |want: fn(Fate) -> Option<u64>, fate: &[Fate]| {
            let mut seqs: Vec<u64> = fate.iter().filter_map(|&f| want(f)).collect();
            seqs.sort_unstable();
            seqs.dedup();
            runs(&seqs)
        };
        let rechained = collect(
            |f| match f {
                Fate::Rechained(s) => Some(s),
                _ => None,
            },
            &self.fate,
        );
        for (first, last) in rechained {
            if self.problems.iter().all(|(at, _)| *at > first) {
                self.problems
                    .push((first, Problem::RecordsRechained { first, last }));
            }
        }
        self.problems.sort_by_key(|(at, _)| *at);
        collect(
            |f| match f {
                Fate::Unconfirmed(s) => Some(s),
                _ => None,
            },
            &self.fate,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    struct Trail {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        key: PathBuf,
    }

    impl Trail {
        fn new() -> Self {
            let tmp = tempfile::tempdir().expect("tempdir");
            let dir = tmp.path().join("audit");
            let key = tmp.path().join("keys").join("audit-signing.pk8");
            Self {
                _tmp: tmp,
                dir,
                key,
            }
        }

        fn open(&self) -> AuditLog {
            AuditLog::open(&self.dir, &self.key).expect("open")
        }

        fn records(&self) -> PathBuf {
            self.dir.join(RECORDS_FILE)
        }

        fn digests(&self) -> PathBuf {
            self.dir.join(DIGESTS_FILE)
        }

        fn report(&self) -> VerifyReport {
            verify(&self.dir, None).expect("verify")
        }

        fn problems(&self) -> Vec<Problem> {
            self.report().problems
        }

        fn edit(&self, path: &Path, f: impl FnOnce(&mut Vec<String>)) {
            let text = fs::read_to_string(path).expect("read");
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            f(&mut lines);
            let mut out = lines.join("\n");
            if !lines.is_empty() {
                out.push('\n');
            }
            fs::write(path, out).expect("write");
        }
    }

    fn entry(i: u64) -> AuditEntry {
        AuditEntry {
            principal: format!("user-{}", i % 3),
            source: "10.0.0.1:5123".into(),
            action: ["CreateFunction", "UpdateFunctionCode", "DeleteFunction"][(i % 3) as usize]
                .into(),
            resource: format!("arn:aws:lambda:us-east-1:000000000000:function:f{}", i % 4),
            function: Some(format!("f{}", i % 4)),
            params: json!({"memory": 128 + i, "env": {"Z": "x", "A": [1.5, "y", null]}}),
            status: 200,
            error: i
                .is_multiple_of(5)
                .then(|| "ResourceConflictException".to_owned()),
        }
    }

    /// 50 records with a digest after every 10, and `extra` records after.
    fn build_with(extra: u64) -> Trail {
        let trail = Trail::new();
        let log = trail.open();
        for i in 1..=50 + extra {
            assert_eq!(log.append(entry(i)).expect("append"), i);
            if i % 10 == 0 && i <= 50 {
                assert_eq!(log.write_digest().expect("digest"), Some(i / 10));
            }
        }
        trail
    }

    fn build() -> Trail {
        build_with(0)
    }

    /// Flips the lowest bit of the byte just after `needle`.
    fn flip(line: &str, needle: &str) -> String {
        let at = line.find(needle).expect("needle") + needle.len();
        let mut bytes = line.as_bytes().to_vec();
        bytes[at] ^= 1;
        String::from_utf8(bytes).expect("utf-8")
    }

    fn parse(line: &str) -> Record {
        serde_json::from_str(line).expect("record")
    }

    fn rehash(r: &mut Record) {
        let params = canonical(r.params.clone());
        r.hash = hex(&record_hash(r, r.seq, &r.prev, &params).expect("hash"));
    }

    fn forged(seq: u64, prev: &str) -> Record {
        let mut r = Record {
            seq,
            time: "2030-01-01T00:00:00.000Z".into(),
            principal: "mallory".into(),
            source: "10.6.6.6:666".into(),
            action: "DeleteFunction".into(),
            resource: "arn:aws:lambda:us-east-1:000000000000:function:f0".into(),
            function: Some("f0".into()),
            params: json!({}),
            status: 204,
            error: None,
            prev: prev.into(),
            hash: String::new(),
        };
        rehash(&mut r);
        r
    }

    /// A digest of records `first..=last` chained after the last digest
    /// line, signed by `key`, naming `key_field`.
    fn forge_digest(
        trail: &Trail,
        first: u64,
        last: u64,
        key: &Ed25519KeyPair,
        key_field: &str,
        signature: Option<String>,
    ) -> String {
        let records = fs::read_to_string(trail.records()).expect("records");
        let covered: Vec<Record> = records
            .lines()
            .map(parse)
            .filter(|r| (first..=last).contains(&r.seq))
            .collect();
        let mut context = digest::Context::new(&digest::SHA256);
        for r in &covered {
            context.update(&unhex(&r.hash).expect("hash"));
        }
        let digests = fs::read_to_string(trail.digests()).expect("digests");
        let previous: Digest =
            serde_json::from_str(digests.lines().last().expect("a digest")).expect("digest");
        let mut d = Digest {
            seq: previous.seq + 1,
            time: "2030-01-01T00:00:00.000Z".into(),
            first,
            last,
            last_hash: covered.last().expect("records").hash.clone(),
            records: hex(&to_hash(&context.finish())),
            prev_digest: hex(&sha256(&[digests.lines().last().expect("line").as_bytes()])),
            key: key_field.into(),
            signature: String::new(),
        };
        d.signature = signature.unwrap_or_else(|| {
            base64::engine::general_purpose::STANDARD
                .encode(key.sign(&d.signed_bytes().expect("bytes")).as_ref())
        });
        serde_json::to_string(&d).expect("json")
    }

    #[test]
    fn audit_log_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<AuditLog>();
    }

    #[test]
    fn clean_trail_has_no_problems() {
        let trail = build();
        let report = trail.report();
        assert_eq!(report.problems, vec![]);
        assert_eq!((report.records, report.digests), (50, 5));
        assert_eq!(report.uncovered, None);
        assert!(report.unconfirmed.is_empty());
        assert!(report.is_clean());

        let log = trail.open();
        assert_eq!(log.write_digest().expect("digest"), None);
        for i in 51..=53 {
            log.append(entry(i)).expect("append");
        }
        let report = trail.report();
        assert_eq!(report.problems, vec![]);
        assert_eq!(report.uncovered, Some((51, 53)));
        assert_eq!(log.write_digest().expect("digest"), Some(6));
        let report = trail.report();
        assert_eq!((report.problems, report.uncovered), (vec![], None));
    }

    #[test]
    fn key_files_are_private_and_stable() {
        let trail = build();
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&trail.key), 0o600);
        assert_eq!(mode(trail.key.parent().expect("parent")), 0o700);
        assert_eq!(mode(&trail.dir), 0o700);
        let log = trail.open();
        let text = fs::read_to_string(trail.dir.join(PUBLIC_KEY_FILE)).expect("public key");
        let public = parse_public_key(&text).expect("parse");
        assert_eq!(public, log.public_key());
        assert_eq!(fingerprint(&public), log.key_fingerprint());
        assert_eq!(log.key_fingerprint().len(), 32);
        assert!(matches!(
            AuditLog::open(&trail.dir, &trail.key),
            Err(AuditError::Locked { .. })
        ));
        drop(log);
        fs::remove_file(&trail.key).expect("remove key");
        assert!(matches!(
            AuditLog::open(&trail.dir, &trail.key),
            Err(AuditError::KeyMissing { .. })
        ));
    }

    #[test]
    fn modified_record_action() {
        let trail = build();
        trail.edit(&trail.records(), |l| l[6] = flip(&l[6], "\"action\":\""));
        assert_eq!(trail.problems(), vec![Problem::RecordModified { seq: 7 }]);
    }

    #[test]
    fn modified_record_params() {
        let trail = build();
        trail.edit(&trail.records(), |l| l[6] = flip(&l[6], "\"Z\":\""));
        assert_eq!(trail.problems(), vec![Problem::RecordModified { seq: 7 }]);
    }

    #[test]
    fn modified_record_hash() {
        let trail = build();
        trail.edit(&trail.records(), |l| l[6] = flip(&l[6], "\"hash\":\""));
        assert_eq!(trail.problems(), vec![Problem::RecordModified { seq: 7 }]);
    }

    #[test]
    fn modified_record_at_range_ends() {
        let trail = build();
        trail.edit(&trail.records(), |l| {
            l[9] = flip(&l[9], "\"principal\":\"");
            l[10] = flip(&l[10], "\"source\":\"");
        });
        assert_eq!(
            trail.problems(),
            vec![
                Problem::RecordModified { seq: 10 },
                Problem::RecordModified { seq: 11 }
            ]
        );
    }

    #[test]
    fn modified_record_rehashed() {
        // The hash recomputed to match the new content: the next record's
        // `prev` and the digest still name the original.
        let trail = build();
        trail.edit(&trail.records(), |l| {
            let mut r = parse(&l[6]);
            r.status = 500;
            rehash(&mut r);
            l[6] = serde_json::to_string(&r).expect("json");
        });
        assert_eq!(trail.problems(), vec![Problem::RecordModified { seq: 7 }]);
    }

    #[test]
    fn removed_record() {
        let trail = build();
        trail.edit(&trail.records(), |l| {
            l.remove(6);
        });
        assert_eq!(
            trail.problems(),
            vec![Problem::RecordsRemoved { first: 7, last: 7 }]
        );
    }

    #[test]
    fn removed_records_across_a_digest() {
        let trail = build();
        trail.edit(&trail.records(), |l| {
            l.drain(9..11);
        });
        assert_eq!(
            trail.problems(),
            vec![Problem::RecordsRemoved {
                first: 10,
                last: 11
            }]
        );
    }

    #[test]
    fn swapped_records() {
        let trail = build();
        trail.edit(&trail.records(), |l| l.swap(6, 7));
        assert_eq!(
            trail.problems(),
            vec![Problem::RecordsSwapped {
                first: 7,
                second: 8
            }]
        );
    }

    #[test]
    fn moved_record() {
        let trail = build();
        trail.edit(&trail.records(), |l| {
            let r = l.remove(2);
            l.push(r);
        });
        assert_eq!(
            trail.problems(),
            vec![Problem::RecordMoved { seq: 3, line: 50 }]
        );
    }

    #[test]
    fn truncated_trail() {
        let trail = build();
        trail.edit(&trail.records(), |l| l.truncate(40));
        assert_eq!(
            trail.problems(),
            vec![Problem::RecordsTruncated {
                first: 41,
                last: 50
            }]
        );
    }

    #[test]
    fn truncated_trail_inside_a_digest() {
        let trail = build();
        trail.edit(&trail.records(), |l| l.truncate(45));
        let report = trail.report();
        assert_eq!(
            report.problems,
            vec![Problem::RecordsTruncated {
                first: 46,
                last: 50
            }]
        );
        // What vouched for records 41..45 is gone.
        assert_eq!(report.unconfirmed, vec![(41, 45)]);
    }

    #[test]
    fn forged_record_inserted_with_renumbering() {
        let trail = build();
        trail.edit(&trail.records(), |l| {
            let mut records: Vec<Record> = l.iter().map(|s| parse(s)).collect();
            let fake = forged(8, &records[6].hash);
            let mut prev = fake.hash.clone();
            for r in &mut records[7..] {
                r.seq += 1;
                r.prev = prev;
                rehash(r);
                prev = r.hash.clone();
            }
            records.insert(7, fake);
            *l = records
                .iter()
                .map(|r| serde_json::to_string(r).expect("json"))
                .collect();
        });
        assert_eq!(
            trail.problems(),
            vec![Problem::RecordForged {
                line: 8,
                after: Some(7)
            }]
        );
    }

    fn renumbered(l: &mut Vec<String>, edit: impl FnOnce(&mut Vec<Record>)) {
        let mut records: Vec<Record> = l.iter().map(|s| parse(s)).collect();
        edit(&mut records);
        let mut prev = hex(&ZERO);
        for (k, r) in records.iter_mut().enumerate() {
            r.seq = k as u64 + 1;
            r.prev = prev;
            rehash(r);
            prev = r.hash.clone();
        }
        *l = records
            .iter()
            .map(|r| serde_json::to_string(r).expect("json"))
            .collect();
    }

    #[test]
    fn forged_record_inserted_first_with_renumbering() {
        let trail = build();
        trail.edit(&trail.records(), |l| {
            renumbered(l, |records| records.insert(0, forged(1, &hex(&ZERO))));
        });
        assert_eq!(
            trail.problems(),
            vec![Problem::RecordForged {
                line: 1,
                after: None
            }]
        );
    }

    #[test]
    fn forged_record_inserted_at_a_digest_boundary_with_renumbering() {
        let trail = build_with(2);
        trail.edit(&trail.records(), |l| {
            renumbered(l, |records| records.insert(10, forged(11, "")));
        });
        let report = trail.report();
        assert_eq!(
            report.problems,
            vec![Problem::RecordForged {
                line: 11,
                after: Some(10)
            }]
        );
        assert_eq!(report.uncovered, Some((51, 52)));
    }

    #[test]
    fn removed_record_hidden_by_renumbering() {
        // The removed record's content is gone, so the range cannot be
        // rebuilt: its digest says so, and the ranges after it realign.
        let trail = build();
        trail.edit(&trail.records(), |l| {
            renumbered(l, |records| {
                records.remove(6);
            });
        });
        let report = trail.report();
        assert_eq!(
            report.problems,
            vec![Problem::RangeMismatch {
                digest: 1,
                first: 1,
                last: 10
            }]
        );
        assert_eq!(report.unconfirmed, vec![(1, 9)]);
    }

    #[test]
    fn forged_record_appended_with_a_signed_seq() {
        let trail = build();
        trail.edit(&trail.records(), |l| {
            let prev = parse(&l[23]).hash;
            l.push(serde_json::to_string(&forged(25, &prev)).expect("json"));
        });
        assert_eq!(
            trail.problems(),
            vec![Problem::RecordForged {
                line: 51,
                after: Some(50)
            }]
        );
    }

    #[test]
    fn forged_record_inserted_into_a_signed_range() {
        let trail = build();
        trail.edit(&trail.records(), |l| {
            let prev = parse(&l[6]).hash;
            l.insert(7, serde_json::to_string(&forged(8, &prev)).expect("json"));
        });
        assert_eq!(
            trail.problems(),
            vec![Problem::RecordForged {
                line: 8,
                after: Some(7)
            }]
        );
    }

    #[test]
    fn forged_record_replacing_one() {
        // A new record 8 in place of the real one, the chain after it
        // rewritten: only the signed digest can tell, and it does.
        let trail = build();
        trail.edit(&trail.records(), |l| {
            let mut records: Vec<Record> = l.iter().map(|s| parse(s)).collect();
            records[7] = forged(8, &records[6].hash);
            for k in 8..records.len() {
                records[k].prev = records[k - 1].hash.clone();
                rehash(&mut records[k]);
            }
            *l = records
                .iter()
                .map(|r| serde_json::to_string(r).expect("json"))
                .collect();
        });
        assert_eq!(
            trail.problems(),
            vec![Problem::RangeMismatch {
                digest: 1,
                first: 1,
                last: 10
            }]
        );
    }

    #[test]
    fn repeated_record() {
        let trail = build();
        trail.edit(&trail.records(), |l| {
            let copy = l[6].clone();
            l.insert(7, copy);
        });
        assert_eq!(
            trail.problems(),
            vec![Problem::RecordRepeated { seq: 7, line: 8 }]
        );
    }

    #[test]
    fn garbage_line() {
        let trail = build();
        trail.edit(&trail.records(), |l| l.insert(19, "{\"seq\": oops".into()));
        assert_eq!(
            trail.problems(),
            vec![Problem::NotARecord {
                line: 20,
                replaces: None
            }]
        );
    }

    #[test]
    fn truncated_line() {
        let trail = build();
        trail.edit(&trail.records(), |l| {
            let half = l[6].len() / 2;
            l[6].truncate(half);
        });
        assert_eq!(
            trail.problems(),
            vec![Problem::NotARecord {
                line: 7,
                replaces: Some(7)
            }]
        );
    }

    #[test]
    fn modified_record_in_the_unsigned_tail() {
        let trail = build_with(5);
        trail.edit(&trail.records(), |l| l[52] = flip(&l[52], "\"action\":\""));
        let report = trail.report();
        assert_eq!(report.problems, vec![Problem::RecordModified { seq: 53 }]);
        assert_eq!(report.uncovered, Some((51, 55)));
    }

    #[test]
    fn removed_record_in_the_unsigned_tail() {
        let trail = build_with(5);
        trail.edit(&trail.records(), |l| {
            l.remove(52);
        });
        assert_eq!(
            trail.problems(),
            vec![Problem::RecordsRemoved {
                first: 53,
                last: 53
            }]
        );
    }

    #[test]
    fn modified_digest() {
        let trail = build();
        trail.edit(&trail.digests(), |l| l[2] = flip(&l[2], "\"time\":\""));
        let report = trail.report();
        assert_eq!(report.problems, vec![Problem::DigestModified { seq: 3 }]);
        // Its records are still authenticated through the chain.
        assert!(report.unconfirmed.is_empty());
    }

    #[test]
    fn modified_digest_records_hash() {
        let trail = build();
        trail.edit(&trail.digests(), |l| l[4] = flip(&l[4], "\"records\":\""));
        let report = trail.report();
        assert_eq!(report.problems, vec![Problem::DigestModified { seq: 5 }]);
        assert_eq!(report.uncovered, Some((41, 50)));
    }

    #[test]
    fn reformatted_digest() {
        // Same content, different bytes: the next digest's chain notices.
        let trail = build();
        trail.edit(&trail.digests(), |l| l[1] = l[1].replacen(',', ", ", 1));
        assert_eq!(
            trail.problems(),
            vec![Problem::DigestRewritten { seq: 2, next: 3 }]
        );
    }

    #[test]
    fn removed_digest() {
        let trail = build();
        trail.edit(&trail.digests(), |l| {
            l.remove(2);
        });
        let report = trail.report();
        assert_eq!(
            report.problems,
            vec![Problem::DigestsRemoved { first: 3, last: 3 }]
        );
        assert!(report.unconfirmed.is_empty());
    }

    #[test]
    fn removed_digest_and_a_record_it_covered_modified() {
        let trail = build();
        trail.edit(&trail.digests(), |l| {
            l.remove(2);
        });
        trail.edit(&trail.records(), |l| l[24] = flip(&l[24], "\"action\":\""));
        let report = trail.report();
        assert_eq!(
            report.problems,
            vec![
                Problem::DigestsRemoved { first: 3, last: 3 },
                Problem::RecordModified { seq: 25 }
            ]
        );
        assert_eq!(report.unconfirmed, vec![(21, 24)]);
    }

    #[test]
    fn reordered_digests() {
        let trail = build();
        trail.edit(&trail.digests(), |l| l.swap(2, 3));
        assert_eq!(
            trail.problems(),
            vec![Problem::DigestsSwapped {
                first: 3,
                second: 4
            }]
        );
    }

    #[test]
    fn repeated_digest() {
        let trail = build();
        trail.edit(&trail.digests(), |l| {
            let copy = l[1].clone();
            l.insert(2, copy);
        });
        assert_eq!(
            trail.problems(),
            vec![Problem::DigestRepeated { seq: 2, line: 3 }]
        );
    }

    #[test]
    fn forged_digest_with_another_key() {
        let trail = build_with(5);
        let mallory = Ed25519KeyPair::generate().expect("key");
        let fp = fingerprint(mallory.public_key().as_ref());
        let line = forge_digest(&trail, 51, 55, &mallory, &fp, None);
        trail.edit(&trail.digests(), |l| l.push(line));
        let report = trail.report();
        assert_eq!(report.problems, vec![Problem::DigestForged { seq: 6 }]);
        assert_eq!(report.uncovered, Some((51, 55)));
    }

    #[test]
    fn forged_digest_with_a_garbage_signature() {
        let trail = build_with(5);
        let log = trail.open();
        let signature = base64::engine::general_purpose::STANDARD.encode([0xff; 64]);
        let line = forge_digest(
            &trail,
            51,
            55,
            &Ed25519KeyPair::generate().expect("key"),
            &log.key_fingerprint(),
            Some(signature),
        );
        drop(log);
        trail.edit(&trail.digests(), |l| l.push(line));
        assert_eq!(trail.problems(), vec![Problem::DigestForged { seq: 6 }]);
    }

    #[test]
    fn forged_digest_over_forged_records() {
        // Records appended after the last digest and a digest over them:
        // the records are reported unsigned, the digest forged.
        let trail = build();
        trail.edit(&trail.records(), |l| {
            let prev = parse(&l[49]).hash;
            l.push(serde_json::to_string(&forged(51, &prev)).expect("json"));
        });
        let mallory = Ed25519KeyPair::generate().expect("key");
        let fp = fingerprint(mallory.public_key().as_ref());
        let line = forge_digest(&trail, 51, 51, &mallory, &fp, None);
        trail.edit(&trail.digests(), |l| l.push(line));
        let report = trail.report();
        assert_eq!(report.problems, vec![Problem::DigestForged { seq: 6 }]);
        assert_eq!(report.uncovered, Some((51, 51)));
    }

    #[test]
    fn garbage_digest_line() {
        let trail = build();
        trail.edit(&trail.digests(), |l| l[2].truncate(40));
        assert_eq!(
            trail.problems(),
            vec![Problem::NotADigest {
                line: 3,
                replaces: Some(3)
            }]
        );
    }

    #[test]
    fn another_expected_key() {
        let trail = build();
        let other = Ed25519KeyPair::generate().expect("key");
        let report = verify(&trail.dir, Some(other.public_key().as_ref())).expect("verify");
        assert_eq!(
            report.problems,
            (1..=5)
                .map(|seq| Problem::DigestForged { seq })
                .collect::<Vec<_>>()
        );
        assert_eq!(report.uncovered, Some((1, 50)));
        // The expected key, given explicitly, verifies.
        let public =
            parse_public_key(&fs::read_to_string(trail.dir.join(PUBLIC_KEY_FILE)).expect("read"))
                .expect("parse");
        let report = verify(&trail.dir, Some(&public)).expect("verify");
        assert_eq!(report.problems, vec![]);
    }

    #[test]
    fn concurrent_appends_chain() {
        let trail = Trail::new();
        let log = Arc::new(trail.open());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..25 {
                        log.append(entry(t * 100 + i)).expect("append");
                        if i % 7 == 6 {
                            log.write_digest().expect("digest");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        log.write_digest().expect("digest");
        let report = trail.report();
        assert_eq!(report.problems, vec![]);
        assert_eq!(report.records, 200);
        assert_eq!(report.uncovered, None);
        let seqs: Vec<u64> = list(&trail.dir, &Filter::default())
            .expect("list")
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    }

    #[test]
    fn torn_writes_are_recovered_on_open() {
        let trail = Trail::new();
        let log = trail.open();
        for i in 1..=12 {
            log.append(entry(i)).expect("append");
        }
        log.write_digest().expect("digest");
        drop(log);
        // A crash in the middle of writing record 13 and digest 2.
        let records = fs::read_to_string(trail.records()).expect("read");
        let last = records.lines().last().expect("line").to_owned();
        let mut file = OpenOptions::new()
            .append(true)
            .open(trail.records())
            .expect("open");
        file.write_all(&last.as_bytes()[..last.len() / 2])
            .expect("write");
        let digests = fs::read_to_string(trail.digests()).expect("read");
        let mut file = OpenOptions::new()
            .append(true)
            .open(trail.digests())
            .expect("open");
        file.write_all(&digests.as_bytes()[..30]).expect("write");
        assert_eq!(
            trail.problems(),
            vec![
                Problem::NotADigest {
                    line: 2,
                    replaces: None
                },
                Problem::NotARecord {
                    line: 13,
                    replaces: None
                }
            ]
        );

        let log = trail.open();
        assert_eq!(
            fs::read_to_string(trail.records()).expect("read"),
            records,
            "the torn line is cut off"
        );
        assert_eq!(log.append(entry(13)).expect("append"), 13);
        assert_eq!(log.write_digest().expect("digest"), Some(2));
        drop(log);
        let log = trail.open();
        assert_eq!(log.append(entry(14)).expect("append"), 14);
        assert_eq!(log.write_digest().expect("digest"), Some(3));
        let report = trail.report();
        assert_eq!(report.problems, vec![]);
        assert_eq!((report.records, report.digests), (14, 3));
    }

    #[test]
    fn list_filters() {
        let trail = build();
        let all = |f: Filter| list(&trail.dir, &f).expect("list");
        assert_eq!(all(Filter::default()).len(), 50);
        let by_function = all(Filter {
            function: Some("f1".into()),
            ..Filter::default()
        });
        assert_eq!(by_function.len(), 13);
        assert!(
            by_function
                .iter()
                .all(|r| r.function.as_deref() == Some("f1"))
        );
        let combined = all(Filter {
            principal: Some("user-1".into()),
            action: Some("UpdateFunctionCode".into()),
            ..Filter::default()
        });
        assert_eq!(combined.len(), 17);
        let now = OffsetDateTime::now_utc();
        let hour = time::Duration::hours(1);
        assert_eq!(
            all(Filter {
                since: Some(now - hour),
                until: Some(now + hour),
                ..Filter::default()
            })
            .len(),
            50
        );
        assert!(
            all(Filter {
                since: Some(now + hour),
                ..Filter::default()
            })
            .is_empty()
        );

        // Time bounds, precisely: since is inclusive, until exclusive.
        trail.edit(&trail.records(), |l| {
            for (k, line) in l.iter_mut().enumerate().take(3) {
                let mut r = parse(line);
                r.time = format!("2024-05-0{}T12:00:00.000Z", k + 1);
                *line = serde_json::to_string(&r).expect("json");
            }
        });
        let window = all(Filter {
            since: Some(time::macros::datetime!(2024-05-02 12:00 UTC)),
            until: Some(time::macros::datetime!(2024-05-03 12:00 UTC)),
            ..Filter::default()
        });
        assert_eq!(window.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn params_are_canonical_and_stable() {
        let value = canonical(json!({"b": 1, "a": [0.1, 1e300, {"y": 2.5, "x": null}]}));
        assert_eq!(
            serde_json::to_string(&value).expect("json"),
            r#"{"a":[0.1,1e+300,{"x":null,"y":2.5}],"b":1}"#
        );
        let reparsed: Value =
            serde_json::from_str(&serde_json::to_string(&value).expect("json")).expect("parse");
        assert_eq!(canonical(reparsed), value);
    }

    /// A single-byte flip in records.jsonl (every 7th byte, so every field
    /// of some record) is reported as exactly one problem about the record
    /// on that line.
    #[test]
    fn every_flipped_record_byte_is_one_problem() {
        let trail = build_with(3);
        let original = fs::read(trail.records()).expect("read");
        let mut line = 1;
        for at in 0..original.len() {
            if original[at] == b'\n' {
                line += 1;
                continue;
            }
            if at % 7 != 0 {
                continue;
            }
            let mut bytes = original.clone();
            bytes[at] ^= 1;
            fs::write(trail.records(), &bytes).expect("write");
            let problems = trail.problems();
            let expected = [
                Problem::RecordModified { seq: line },
                // The last record is unsigned: nothing says it existed.
                Problem::NotARecord {
                    line,
                    replaces: (line < 53).then_some(line),
                },
            ];
            assert!(
                problems.len() == 1 && expected.contains(&problems[0]),
                "byte {at} of line {line}: {problems:?}"
            );
        }
    }

    /// Every single-byte flip in digests.jsonl is reported as exactly one
    /// problem about the digest on that line.
    #[test]
    fn every_flipped_digest_byte_is_one_problem() {
        let trail = build();
        let original = fs::read(trail.digests()).expect("read");
        let mut line = 1;
        for at in 0..original.len() {
            if original[at] == b'\n' {
                line += 1;
                continue;
            }
            let mut bytes = original.clone();
            bytes[at] ^= 1;
            fs::write(trail.digests(), &bytes).expect("write");
            let problems = trail.problems();
            let expected = [
                Problem::DigestModified { seq: line },
                Problem::DigestForged { seq: line },
                Problem::NotADigest {
                    line,
                    replaces: (line < 5).then_some(line),
                },
            ];
            assert!(
                problems.len() == 1 && expected.contains(&problems[0]),
                "byte {at} of line {line}: {problems:?}"
            );
        }
    }

    /// Removing or swapping any line is reported as exactly that.
    #[test]
    fn every_removed_or_swapped_line_is_one_problem() {
        let trail = build_with(3);
        let original = fs::read_to_string(trail.records()).expect("read");
        let lines: Vec<String> = original.lines().map(str::to_owned).collect();
        let write = |lines: &[String]| {
            fs::write(trail.records(), lines.join("\n") + "\n").expect("write");
        };
        for k in 0..lines.len() {
            let seq = k as u64 + 1;
            let mut edited = lines.clone();
            edited.remove(k);
            write(&edited);
            let expected = if seq == 53 {
                Problem::RecordsTruncated {
                    first: seq,
                    last: seq,
                }
            } else {
                Problem::RecordsRemoved {
                    first: seq,
                    last: seq,
                }
            };
            // Record 53 is unsigned: its removal cannot be seen.
            let problems = trail.problems();
            if seq == 53 {
                assert_eq!(problems, vec![], "removed {seq}");
            } else {
                assert_eq!(problems, vec![expected], "removed {seq}");
            }
            if k + 1 < lines.len() {
                let mut edited = lines.clone();
                edited.swap(k, k + 1);
                write(&edited);
                assert_eq!(
                    trail.problems(),
                    vec![Problem::RecordsSwapped {
                        first: seq,
                        second: seq + 1
                    }],
                    "swapped {seq}"
                );
            }
        }
        let digests = fs::read_to_string(trail.digests()).expect("read");
        let lines: Vec<String> = digests.lines().map(str::to_owned).collect();
        write(&original.lines().map(str::to_owned).collect::<Vec<_>>());
        for k in 0..lines.len() - 1 {
            let seq = k as u64 + 1;
            let mut edited = lines.clone();
            edited.remove(k);
            fs::write(trail.digests(), edited.join("\n") + "\n").expect("write");
            assert_eq!(
                trail.problems(),
                vec![Problem::DigestsRemoved {
                    first: seq,
                    last: seq
                }],
                "removed digest {seq}"
            );
        }
    }

    #[test]
    fn hostile_files_do_not_panic() {
        let trail = build();
        let key = Ed25519KeyPair::from_pkcs8(&fs::read(&trail.key).expect("key")).expect("key");
        let fp = fingerprint(key.public_key().as_ref());
        let sign = |seq: u64, first: u64, last: u64| {
            let mut d = Digest {
                seq,
                time: String::new(),
                first,
                last,
                last_hash: hex(&ZERO),
                records: hex(&ZERO),
                prev_digest: hex(&ZERO),
                key: fp.clone(),
                signature: String::new(),
            };
            d.signature = base64::engine::general_purpose::STANDARD
                .encode(key.sign(&d.signed_bytes().expect("bytes")).as_ref());
            serde_json::to_string(&d).expect("json")
        };
        trail.edit(&trail.digests(), |l| {
            l.push(sign(6, 60, 59));
            l.push(sign(7, 51, u64::MAX));
            l.push(sign(u64::MAX, 1, 1));
            l.push(sign(8, 51, 1 << 40));
            l.push(String::new());
            l.push("[]".into());
        });
        trail.edit(&trail.records(), |l| {
            let mut r = parse(&l[0]);
            for seq in [0, u64::MAX, 1 << 40] {
                r.seq = seq;
                l.push(serde_json::to_string(&r).expect("json"));
            }
            l.insert(5, String::new());
            l.push("\u{0}\u{1}garbage".into());
            l.push("{\"seq\":1}".into());
        });
        let started = std::time::Instant::now();
        let report = trail.report();
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert!(!report.problems.is_empty());
        for problem in &report.problems {
            assert!(!problem.to_string().is_empty());
        }
    }

    #[test]
    fn realignment_hash_is_the_record_hash() {
        let trail = build();
        let bytes = fs::read(trail.records()).expect("read");
        let check = RecordCheck::new(&bytes);
        for l in &check.lines {
            let prev = l.stored_prev.expect("prev");
            assert_eq!(l.hash_as(l.record.seq, &prev), l.recomputed);
            assert_eq!(l.recomputed, l.stored_hash);
        }
    }

    #[test]
    fn problem_texts() {
        let cases = [
            (Problem::RecordModified { seq: 7 }, "record 7 was modified"),
            (
                Problem::RecordsRemoved { first: 7, last: 7 },
                "record 7 was removed",
            ),
            (
                Problem::RecordsTruncated {
                    first: 41,
                    last: 50,
                },
                "records 41–50 were removed (truncated)",
            ),
            (
                Problem::RecordsSwapped {
                    first: 7,
                    second: 8,
                },
                "records 7 and 8 are out of order (swapped)",
            ),
            (
                Problem::RecordForged {
                    line: 8,
                    after: Some(7),
                },
                "line 8 of records.jsonl is a forged record, inserted after record 7",
            ),
            (
                Problem::NotARecord {
                    line: 7,
                    replaces: Some(7),
                },
                "line 7 of records.jsonl is not a record (in place of record 7)",
            ),
            (
                Problem::DigestModified { seq: 3 },
                "digest 3: signature does not verify (modified)",
            ),
            (
                Problem::DigestForged { seq: 4 },
                "digest 4 is forged: not signed by the trail's key",
            ),
            (
                Problem::DigestsRemoved { first: 3, last: 3 },
                "digest 3 was removed",
            ),
            (
                Problem::DigestsSwapped {
                    first: 3,
                    second: 4,
                },
                "digests 3 and 4 are out of order (swapped)",
            ),
        ];
        for (problem, text) in cases {
            assert_eq!(problem.to_string(), text);
        }
    }
}
