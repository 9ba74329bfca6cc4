//! Sealed artifacts: archives kept encrypted at rest, large ones split into
//! content-defined chunks that are stored once however many archives share
//! them.
//!
//! Keys:
//! - The **master key** (32 bytes) comes from `KILN_MASTER_KEY` (64 hex
//!   digits, or base64 of 32 bytes) or else from `<keys>/master.key`, created
//!   at first start with mode 0600 in a 0700 directory. A key file that group
//!   or others may access is refused, as ssh refuses such private keys. Its
//!   id, 16 hex digits derived from the key, is written in every blob the
//!   key wraps, so a blob says which key opens it.
//! - Each artifact has its own random **data key**, wrapped by the master
//!   key with AES-256-GCM and kept in the artifact's blob.
//! - The **convergence secret** (32 random bytes, `<keys>/convergence.key`,
//!   sealed like an artifact) keys the derivation of chunk keys and chunk
//!   ids. Equal chunks thus encrypt equally and are stored once, while
//!   someone without the secret cannot confirm a guess of a chunk's
//!   content. Being wrapped rather than derived from the master key, it
//!   survives a master-key rotation unchanged, and so do the chunks.
//!
//! Layout under the store's root:
//! - `blobs/<identity>.blob`  one per artifact (identity e.g. `code/<sha256>`);
//! - `chunks/<id[..2]>/<id>`  chunk ciphertexts, named by chunk id;
//! - `.tmp-*`                 files being written, removed at open.
//!
//! Blob format, version 1 (integers little-endian):
//!
//! | bytes | field                                                       |
//! |-------|-------------------------------------------------------------|
//! | 8     | magic `KILNSEAL`                                            |
//! | 1     | format version (1)                                          |
//! | 1     | kind: 0 inline (content is the artifact), 1 chunked (content is its manifest) |
//! | 8     | id of the master key that wraps the data key                |
//! | 12    | nonce of the wrap                                           |
//! | 48    | the wrapped data key (32 bytes + 16-byte tag)               |
//! | 12    | nonce of the content                                        |
//! | 8     | the artifact's length in bytes                              |
//! | rest  | the content, encrypted under the data key, + 16-byte tag    |
//!
//! The wrap's associated data is `kiln-sealed-wrap-v1\0`, the version, the
//! master key id and the identity; the content's is `kiln-sealed-content-v1\0`,
//! the version, the kind, the length and the identity. A blob moved to
//! another identity, or with any header field changed, therefore fails to
//! authenticate. A chunked blob's manifest is: total length (u64), SHA-256
//! of the whole artifact (32), chunk count (u32), then per chunk its id
//! (32), key (32) and length (u32). Each chunk is AES-256-GCM under its
//! convergent key with its id as associated data; reassembled content must
//! match the manifest's SHA-256.
//!
//! Master-key rotation, in an order that leaves every blob readable
//! whenever it stops:
//! 1. write the new key as `master.key.new` (fsynced);
//! 2. rewrap each blob's data key, and the convergence secret, under the new
//!    key, each file replaced atomically (content and chunks untouched);
//!    meanwhile blobs name either key and both are loaded;
//! 3. rename `master.key.new` over `master.key`: the old key is gone.
//!
//! At open, a `master.key.new` left over means step 2 was interrupted: both
//! keys are loaded and the rotation is finished.
//!
//! Threat model: whoever reads the disk without the master key (a backup, a
//! stolen volume) learns how many artifacts and chunks there are, their
//! sizes and which artifacts share chunks; nothing of their content. Any
//! change to stored bytes (altered, truncated, swapped between artifacts or
//! chunks, sealed under another key) fails closed with an error naming the
//! artifact. Not covered: rolling a blob back to an older version of the
//! same identity (for content-addressed identities that is the same
//! content), deleting files (reads fail closed), and the master key in the
//! server's memory or key file — whoever holds it reads everything.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::{digest, hmac, rand};
use base64::Engine as _;
use fastcdc::v2020::FastCDC;

use super::artifacts::hex;

/// The environment variable that may hold the master key.
pub const MASTER_KEY_ENV: &str = "KILN_MASTER_KEY";

/// Content longer than this is split into chunks; shorter content is
/// sealed whole in its blob.
pub const CHUNK_THRESHOLD: usize = 1 << 20;

// Chunk sizes: archives that differ in one file share all but the chunks
// around it, so what they do not share is about two chunks; an average of
// 128 KiB (at most 512 KiB) keeps that well under a megabyte, for some 400
// chunks in Lambda's largest archive (50 MiB).
const CHUNK_MIN: u32 = 32 * 1024;
const CHUNK_AVG: u32 = 128 * 1024;
const CHUNK_MAX: u32 = 512 * 1024;
/// Longest chunk a manifest may name: fastcdc's own maximum, so manifests
/// written with other chunking parameters still read.
const CHUNK_LIMIT: u32 = fastcdc::v2020::MAXIMUM_MAX;

const MAGIC: [u8; 8] = *b"KILNSEAL";
const FORMAT_VERSION: u8 = 1;
const KIND_INLINE: u8 = 0;
const KIND_CHUNKED: u8 = 1;
const KEY_LEN: usize = 32;
const KEY_ID_LEN: usize = 8;
const TAG_LEN: usize = 16;
const WRAPPED_LEN: usize = KEY_LEN + TAG_LEN;
const HEADER_LEN: usize = MAGIC.len() + 2 + KEY_ID_LEN + NONCE_LEN + WRAPPED_LEN + NONCE_LEN + 8;
/// Largest blob read: inline content stays under the chunk threshold and
/// manifests are small, so anything bigger was not written by kiln.
const MAX_BLOB: u64 = 64 << 20;
const MANIFEST_HEAD_LEN: usize = 8 + 32 + 4;
const MANIFEST_ENTRY_LEN: usize = 32 + KEY_LEN + 4;

const WRAP_AAD: &[u8] = b"kiln-sealed-wrap-v1\0";
const CONTENT_AAD: &[u8] = b"kiln-sealed-content-v1\0";
const CHUNK_KEY_INFO: &[u8] = b"kiln-chunk-key-v1";
const CHUNK_ID_INFO: &[u8] = b"kiln-chunk-id-v1";
const KEY_ID_INFO: &[u8] = b"kiln-master-key-id-v1";
/// The convergence secret's identity; `!` keeps it apart from every
/// artifact identity, so no artifact's blob can stand in for it.
const CONVERGENCE_IDENTITY: &str = "!convergence-secret";

const BLOBS_DIR: &str = "blobs";
const CHUNKS_DIR: &str = "chunks";
const BLOB_SUFFIX: &str = ".blob";
const MASTER_KEY_FILE: &str = "master.key";
const NEW_MASTER_KEY_FILE: &str = "master.key.new";
const CONVERGENCE_FILE: &str = "convergence.key";
const TMP_PREFIX: &str = ".tmp-";

/// Why sealing or unsealing failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The master key is malformed, missing, exposed, or not the store's.
    #[error("Master key: {0}")]
    MasterKey(String),
    /// Stored bytes do not authenticate: altered, truncated, swapped with
    /// another artifact's or sealed under another key.
    #[error("Sealed artifact {identity} is damaged or was tampered with: {what}")]
    Tampered {
        /// The artifact.
        identity: String,
        /// What failed.
        what: &'static str,
    },
    /// The blob names a master key this server does not hold.
    #[error("Sealed artifact {identity} is wrapped by master key {key_id}, which is not loaded")]
    UnknownMasterKey {
        /// The artifact.
        identity: String,
        /// The key id its header names.
        key_id: String,
    },
    /// No blob is stored under this identity.
    #[error("No sealed artifact {0}")]
    Missing(String),
    /// The identity cannot name a blob.
    #[error("Invalid artifact identity {0:?}")]
    Identity(String),
    /// The cryptographic library refused (random generator, key setup).
    #[error("Cryptography failed: {0}")]
    Crypto(&'static str),
    /// A file operation failed.
    #[error("{context}: {error}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The error (in the message, so not also a source).
        error: io::Error,
    },
}

fn tampered(identity: &str, what: &'static str) -> SealError {
    SealError::Tampered {
        identity: identity.to_owned(),
        what,
    }
}

fn io_error(context: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> SealError {
    move |error| SealError::Io {
        context: context(),
        error,
    }
}

/// A 32-byte master key and its id.
#[derive(Clone)]
pub struct MasterKey {
    key: [u8; KEY_LEN],
    id: [u8; KEY_ID_LEN],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself: Debug output ends up in logs.
        f.debug_struct("MasterKey")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    /// A new random key.
    pub fn generate() -> Result<Self, SealError> {
        Ok(Self::from_bytes(random()?))
    }

    /// The key with these bytes.
    pub fn from_bytes(key: [u8; KEY_LEN]) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(KEY_ID_INFO);
        ctx.update(&key);
        let mut id = [0; KEY_ID_LEN];
        id.copy_from_slice(&ctx.finish().as_ref()[..KEY_ID_LEN]);
        Self { key, id }
    }

    /// Parses 64 hex digits or the base64 (standard alphabet, padded or
    /// not) of 32 bytes; surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let text = text.trim();
        if let Some(key) = parse_hex32(text) {
            return Ok(Self::from_bytes(key));
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text));
        match decoded.ok().and_then(|b| <[u8; KEY_LEN]>::try_from(b).ok()) {
            Some(key) => Ok(Self::from_bytes(key)),
            // The value itself is never echoed: it may be most of a key.
            None => Err(SealError::MasterKey(format!(
                "{MASTER_KEY_ENV} must be 64 hex digits or the base64 of 32 bytes \
                 (the value given has {} characters)",
                text.len()
            ))),
        }
    }

    /// The key in `KILN_MASTER_KEY`, if that is set.
    pub fn from_env() -> Result<Option<Self>, SealError> {
        match std::env::var(MASTER_KEY_ENV) {
            Ok(text) => Self::parse(&text).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(SealError::MasterKey(format!(
                "{MASTER_KEY_ENV} must be 64 hex digits or the base64 of 32 bytes \
                 (the value given is not text)"
            ))),
        }
    }

    /// The key's id: 16 hex digits of a SHA-256 of the key.
    pub fn id(&self) -> String {
        hex(&self.id)
    }
}

/// The master keys loaded: the one that wraps, and while a rotation is
/// unfinished, the one being retired (still used to unwrap).
#[derive(Clone)]
struct Keyring {
    current: MasterKey,
    retiring: Option<MasterKey>,
}

impl Keyring {
    fn find(&self, id: &[u8; KEY_ID_LEN]) -> Option<&MasterKey> {
        std::iter::once(&self.current)
            .chain(&self.retiring)
            .find(|k| &k.id == id)
    }
}

/// The stored master-key file.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeyFile {
    version: u32,
    id: String,
    key: String,
}

/// What a stored artifact costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SealStats {
    /// Blobs stored.
    pub artifacts: u64,
    /// Their contents' total length.
    pub logical_bytes: u64,
    /// Bytes on disk: blobs plus chunks.
    pub stored_bytes: u64,
    /// Chunks stored.
    pub chunks: u64,
}

impl SealStats {
    /// Logical over stored bytes: how much chunk sharing saves.
    pub fn dedup_ratio(&self) -> f64 {
        if self.stored_bytes == 0 {
            return 1.0;
        }
        self.logical_bytes as f64 / self.stored_bytes as f64
    }
}

/// What a sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Blobs not kept.
    pub blobs: usize,
    /// Chunks no kept blob names.
    pub chunks: usize,
}

/// What a master-key rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationReport {
    /// Blobs whose data key was rewrapped.
    pub blobs_rewrapped: usize,
    /// The retired key's id.
    pub old_key_id: String,
    /// The new key's id.
    pub new_key_id: String,
}

/// Sealed artifacts under one directory, keys under another.
pub struct SealedStore {
    root: PathBuf,
    keys: PathBuf,
    keyring: RwLock<Keyring>,
    key_from_env: bool,
    convergence: hmac::Key,
    /// Puts, reads and removals share it; sweeps and rotations take it
    /// alone, so a sweep never deletes a chunk that a put in progress
    /// found present and is about to name.
    gate: RwLock<()>,
}

impl std::fmt::Debug for SealedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedStore")
            .field("root", &self.root)
            .field("keys", &self.keys)
            .field("master_key_id", &self.master_key_id())
            .finish_non_exhaustive()
    }
}

impl SealedStore {
    /// Opens (creating) the store at `root` with keys under `keys`.
    ///
    /// `env_key` is the key from `KILN_MASTER_KEY` ([`MasterKey::from_env`]);
    /// without one the key file is used, created at first start. Finishes a
    /// rotation a crash interrupted.
    pub fn open(
        root: impl Into<PathBuf>,
        keys: impl Into<PathBuf>,
        env_key: Option<MasterKey>,
    ) -> Result<Self, SealError> {
        let root = root.into();
        let keys = keys.into();
        for dir in [
            root.clone(),
            root.join(BLOBS_DIR),
            root.join(CHUNKS_DIR),
            keys.clone(),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_error(|| format!("creating {}", dir.display())))?;
        }
        remove_tmp_files(&root)?;
        remove_tmp_files(&keys)?;
        let key_from_env = env_key.is_some();
        let keyring = match env_key {
            Some(current) => Keyring {
                current,
                retiring: None,
            },
            None => load_keyring(&keys)?,
        };
        let convergence = load_convergence(&keys, &keyring, key_from_env)?;
        let store = Self {
            root,
            keys,
            keyring: RwLock::new(keyring),
            key_from_env,
            convergence,
            gate: RwLock::new(()),
        };
        if store.keyring().retiring.is_some() {
            let _alone = store.gate_alone();
            match store.finish_rotation() {
                Ok(n) => tracing::info!(
                    rewrapped = n,
                    key_id = %store.master_key_id(),
                    "finished an interrupted master key rotation"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "could not finish an interrupted master key rotation; both keys stay loaded"
                ),
            }
        }
        Ok(store)
    }

    /// The directory holding blobs and chunks.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The id of the master key that wraps new data keys.
    pub fn master_key_id(&self) -> String {
        self.keyring().current.id()
    }

    /// Whether a blob is stored under `identity` (not whether it is intact).
    pub fn contains(&self, identity: &str) -> bool {
        self.blob_path(identity).is_ok_and(|p| p.is_file())
    }

    /// Seals `content` under `identity`, replacing what was there; durable
    /// when it returns.
    pub fn put(&self, identity: &str, content: &[u8]) -> Result<(), SealError> {
        let path = self.blob_path(identity)?;
        let _shared = self.gate_shared();
        let (kind, body) = if content.len() > CHUNK_THRESHOLD {
            (KIND_CHUNKED, self.store_chunks(content)?.encode())
        } else {
            (KIND_INLINE, content.to_vec())
        };
        let master = self.keyring().current.clone();
        let blob = seal_blob(&master, identity, kind, content.len() as u64, body)?;
        let parent = path.parent().unwrap_or(&self.root);
        create_dir_durably(parent)
            .map_err(io_error(|| format!("creating {}", parent.display())))?;
        write_file_durably(&self.root, &path, &blob)
    }

    /// The content stored under `identity`, authenticated.
    pub fn get(&self, identity: &str) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::new();
        self.read_to(identity, &mut out)?;
        Ok(out)
    }

    /// Writes the content stored under `identity` to `out`, returning its
    /// length. Chunks are authenticated one by one as they are written and
    /// the whole at the end: on error, discard what was written.
    pub fn read_to(&self, identity: &str, out: &mut impl Write) -> Result<u64, SealError> {
        let path = self.blob_path(identity)?;
        let _shared = self.gate_shared();
        let bytes = read_blob_file(&path, identity)?;
        let keyring = self.keyring().clone();
        let (header, content) = open_blob(&keyring, identity, bytes)?;
        let written = io_error(|| format!("writing out {identity}"));
        if header.kind == KIND_INLINE {
            out.write_all(&content).map_err(written)?;
            return Ok(header.length);
        }
        let manifest = Manifest::decode(identity, &content, header.length)?;
        let mut hash = digest::Context::new(&digest::SHA256);
        for chunk in &manifest.chunks {
            let plain = self.read_chunk(identity, chunk)?;
            hash.update(&plain);
            out.write_all(&plain)
                .map_err(io_error(|| format!("writing out {identity}")))?;
        }
        if hash.finish().as_ref() != manifest.sha256 {
            return Err(tampered(
                identity,
                "the reassembled content does not match its digest",
            ));
        }
        Ok(manifest.total)
    }

    /// Removes the blob of `identity` (its chunks go at the next sweep);
    /// whether there was one.
    pub fn remove(&self, identity: &str) -> Result<bool, SealError> {
        let path = self.blob_path(identity)?;
        let _shared = self.gate_shared();
        remove_file_durably(&path)
    }

    /// Every stored identity, sorted.
    pub fn identities(&self) -> Result<Vec<String>, SealError> {
        let _shared = self.gate_shared();
        self.list_identities()
    }

    /// Removes the blobs not in `keep` and the chunks no kept blob names.
    /// Fails, before removing any chunk, when a kept blob's manifest cannot
    /// be read: its chunks can't be told from garbage.
    pub fn sweep(&self, keep: &HashSet<String>) -> Result<SweepReport, SealError> {
        let _alone = self.gate_alone();
        let mut report = SweepReport::default();
        let mut live = Vec::new();
        for identity in self.list_identities()? {
            if keep.contains(&identity) {
                live.push(identity);
            } else if remove_file_durably(&self.blob_path(&identity)?)? {
                report.blobs += 1;
            }
        }
        let keyring = self.keyring().clone();
        let mut named: HashSet<[u8; 32]> = HashSet::new();
        for identity in &live {
            let bytes = read_blob_file(&self.blob_path(identity)?, identity)?;
            let header = Header::decode(identity, &bytes)?;
            if header.kind == KIND_CHUNKED {
                let (_, content) = open_blob(&keyring, identity, bytes)?;
                let manifest = Manifest::decode(identity, &content, header.length)?;
                named.extend(manifest.chunks.iter().map(|c| c.id));
            }
        }
        let chunks = self.root.join(CHUNKS_DIR);
        for sub in read_dir(&chunks)? {
            let sub_path = sub.path();
            if !sub_path.is_dir() {
                remove_file_durably(&sub_path)?;
                continue;
            }
            let mut left = 0;
            for entry in read_dir(&sub_path)? {
                let keep = entry
                    .file_name()
                    .to_str()
                    .and_then(parse_hex32)
                    .is_some_and(|id| named.contains(&id));
                if keep {
                    left += 1;
                } else if remove_file_durably(&entry.path())? {
                    report.chunks += 1;
                }
            }
            if left == 0 {
                // Another sweep's business if it fails; nothing depends on it.
                let _ = fs::remove_dir(&sub_path);
            }
        }
        Ok(report)
    }

    /// Rewraps every data key, and the convergence secret, under `new`,
    /// which then replaces the key file; content and chunks are untouched.
    /// Refused when the key comes from `KILN_MASTER_KEY`: the operator
    /// rotates that one.
    pub fn rotate_master(&self, new: MasterKey) -> Result<RotationReport, SealError> {
        if self.key_from_env {
            return Err(SealError::MasterKey(format!(
                "the master key comes from {MASTER_KEY_ENV}; rotation replaces {}, \
                 so unset {MASTER_KEY_ENV} and restart with the key file first",
                self.keys.join(MASTER_KEY_FILE).display()
            )));
        }
        let _alone = self.gate_alone();
        if self.keyring().retiring.is_some() {
            self.finish_rotation()?;
        }
        let old = self.keyring().current.clone();
        if new.id == old.id {
            return Err(SealError::MasterKey(
                "the new master key is the current one".to_owned(),
            ));
        }
        write_key_file(&self.keys, &self.keys.join(NEW_MASTER_KEY_FILE), &new)?;
        {
            let mut keyring = self.keyring_mut();
            keyring.retiring = Some(old.clone());
            keyring.current = new.clone();
        }
        let blobs_rewrapped = self.finish_rotation()?;
        Ok(RotationReport {
            blobs_rewrapped,
            old_key_id: old.id(),
            new_key_id: new.id(),
        })
    }

    /// Artifact and chunk counts and sizes. Reads blob headers only: the
    /// figures are not authenticated.
    pub fn stats(&self) -> Result<SealStats, SealError> {
        let _shared = self.gate_shared();
        let mut stats = SealStats::default();
        for identity in self.list_identities()? {
            let path = self.blob_path(&identity)?;
            let mut head = Vec::with_capacity(HEADER_LEN);
            let file = fs::File::open(&path)
                .map_err(io_error(|| format!("reading {}", path.display())))?;
            let stored = file
                .metadata()
                .map_err(io_error(|| format!("reading {}", path.display())))?
                .len();
            file.take(HEADER_LEN as u64)
                .read_to_end(&mut head)
                .map_err(io_error(|| format!("reading {}", path.display())))?;
            let header = Header::decode(&identity, &head)?;
            stats.artifacts += 1;
            stats.logical_bytes += header.length;
            stats.stored_bytes += stored;
        }
        for sub in read_dir(&self.root.join(CHUNKS_DIR))? {
            if !sub.path().is_dir() {
                continue;
            }
            for entry in read_dir(&sub.path())? {
                let meta = entry
                    .metadata()
                    .map_err(io_error(|| format!("reading {}", entry.path().display())))?;
                stats.chunks += 1;
                stats.stored_bytes += meta.len();
            }
        }
        Ok(stats)
    }

    fn keyring(&self) -> RwLockReadGuard<'_, Keyring> {
        self.keyring.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn keyring_mut(&self) -> RwLockWriteGuard<'_, Keyring> {
        self.keyring.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn gate_shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn gate_alone(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn blob_path(&self, identity: &str) -> Result<PathBuf, SealError> {
        if !is_valid_identity(identity) {
            return Err(SealError::Identity(identity.to_owned()));
        }
        Ok(self
            .root
            .join(BLOBS_DIR)
            .join(format!("{identity}{BLOB_SUFFIX}")))
    }

    fn chunk_path(&self, id: &[u8; 32]) -> PathBuf {
        let name = hex(id);
        self.root.join(CHUNKS_DIR).join(&name[..2]).join(name)
    }

    /// Every identity with a blob; the caller holds the gate.
    fn list_identities(&self) -> Result<Vec<String>, SealError> {
        let mut out = Vec::new();
        collect_identities(&self.root.join(BLOBS_DIR), "", &mut out)?;
        out.sort();
        Ok(out)
    }

    /// Stores the chunks of `content` not already stored (durably) and
    /// returns its manifest.
    fn store_chunks(&self, content: &[u8]) -> Result<Manifest, SealError> {
        let mut chunks = Vec::new();
        let mut touched = BTreeSet::new();
        for cut in FastCDC::new(content, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
            let bytes = &content[cut.offset..cut.offset + cut.length];
            let chunk = ChunkRef {
                id: hmac_of(&self.convergence, CHUNK_ID_INFO, bytes),
                key: hmac_of(&self.convergence, CHUNK_KEY_INFO, bytes),
                length: cut.length as u32,
            };
            if let Some(dir) = self.write_chunk(&chunk, bytes)? {
                touched.insert(dir);
            }
            chunks.push(chunk);
        }
        // Each chunk file was fsynced; its directory entry is durable once
        // the directory is, which the blob naming it must wait for.
        for dir in &touched {
            sync_dir(dir)?;
        }
        Ok(Manifest {
            total: content.len() as u64,
            sha256: digest32(content),
            chunks,
        })
    }

    /// Writes one chunk unless a file of the right length is there; the
    /// directory written into, when written.
    fn write_chunk(&self, chunk: &ChunkRef, bytes: &[u8]) -> Result<Option<PathBuf>, SealError> {
        let path = self.chunk_path(&chunk.id);
        let sealed_len = bytes.len() as u64 + TAG_LEN as u64;
        if let Ok(meta) = fs::metadata(&path)
            && meta.is_file()
            && meta.len() == sealed_len
        {
            return Ok(None);
        }
        let mut sealed = bytes.to_vec();
        // A fixed nonce is safe here: the key is derived from this very
        // plaintext, so each chunk key encrypts exactly one plaintext and
        // no (key, nonce) pair ever covers two different messages.
        aead_key(&chunk.key)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key([0; NONCE_LEN]),
                Aad::from(chunk.id),
                &mut sealed,
            )
            .map_err(|_| SealError::Crypto("sealing a chunk"))?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        create_dir_durably(&dir).map_err(io_error(|| format!("creating {}", dir.display())))?;
        write_file(&self.root, &path, &sealed)?;
        Ok(Some(dir))
    }

    fn read_chunk(&self, identity: &str, chunk: &ChunkRef) -> Result<Vec<u8>, SealError> {
        let path = self.chunk_path(&chunk.id);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(tampered(identity, "a chunk it names is missing"));
            }
            Err(e) => return Err(io_error(|| format!("reading {}", path.display()))(e)),
        };
        let sealed_len = chunk.length as usize + TAG_LEN;
        let mut buf = Vec::with_capacity(sealed_len);
        file.take(sealed_len as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(io_error(|| format!("reading {}", path.display())))?;
        if buf.len() != sealed_len {
            return Err(tampered(identity, "a chunk has the wrong length"));
        }
        let len = aead_key(&chunk.key)?
            .open_in_place(
                Nonce::assume_unique_for_key([0; NONCE_LEN]),
                Aad::from(chunk.id),
                &mut buf,
            )
            .map_err(|_| tampered(identity, "a chunk does not authenticate"))?
            .len();
        buf.truncate(len);
        Ok(buf)
    }

    /// Rewraps whatever the retiring key still wraps, then retires it by
    /// renaming the new key file over the old. The caller holds the gate
    /// alone.
    fn finish_rotation(&self) -> Result<usize, SealError> {
        let keyring = self.keyring().clone();
        let mut rewrapped = 0;
        for identity in self.list_identities()? {
            let path = self.blob_path(&identity)?;
            if rewrap_file(&self.root, &path, &identity, &keyring)? {
                rewrapped += 1;
            }
        }
        rewrap_file(
            &self.keys,
            &self.keys.join(CONVERGENCE_FILE),
            CONVERGENCE_IDENTITY,
            &keyring,
        )?;
        let new = self.keys.join(NEW_MASTER_KEY_FILE);
        let current = self.keys.join(MASTER_KEY_FILE);
        fs::rename(&new, &current).map_err(io_error(|| {
            format!("renaming {} to {}", new.display(), current.display())
        }))?;
        sync_dir(&self.keys)?;
        self.keyring_mut().retiring = None;
        Ok(rewrapped)
    }
}

/// An identity is `/`-separated segments of ASCII letters, digits, `.`,
/// `_` and `-`, none empty, starting with `.` (so no `..`, and no clash
/// with temporary files) or ending with `.blob` (so no directory of blobs
/// clashes with a blob).
fn is_valid_identity(identity: &str) -> bool {
    !identity.is_empty()
        && identity.len() <= 512
        && identity.split('/').all(|segment| {
            !segment.is_empty()
                && !segment.starts_with('.')
                && !segment.ends_with(BLOB_SUFFIX)
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

fn collect_identities(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), SealError> {
    for entry in read_dir(dir)? {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if path.is_dir() {
            collect_identities(&path, &format!("{prefix}{name}/"), out)?;
        } else if let Some(stem) = name.strip_suffix(BLOB_SUFFIX) {
            let identity = format!("{prefix}{stem}");
            if is_valid_identity(&identity) {
                out.push(identity);
            }
        }
    }
    Ok(())
}

/// A blob's fixed-size header.
#[derive(Clone, Copy)]
struct Header {
    kind: u8,
    key_id: [u8; KEY_ID_LEN],
    wrap_nonce: [u8; NONCE_LEN],
    wrapped: [u8; WRAPPED_LEN],
    content_nonce: [u8; NONCE_LEN],
    length: u64,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        out.push(self.kind);
        out.extend_from_slice(&self.key_id);
        out.extend_from_slice(&self.wrap_nonce);
        out.extend_from_slice(&self.wrapped);
        out.extend_from_slice(&self.content_nonce);
        out.extend_from_slice(&self.length.to_le_bytes());
        out
    }

    fn decode(identity: &str, bytes: &[u8]) -> Result<Self, SealError> {
        let mut r = Reader::new(bytes);
        let truncated = || tampered(identity, "the header is truncated");
        if r.array::<8>().ok_or_else(truncated)? != MAGIC {
            return Err(tampered(identity, "the file is not a sealed blob"));
        }
        let [version, kind] = r.array::<2>().ok_or_else(truncated)?;
        if version != FORMAT_VERSION {
            return Err(tampered(identity, "the format version is unknown"));
        }
        if kind != KIND_INLINE && kind != KIND_CHUNKED {
            return Err(tampered(identity, "the content kind is unknown"));
        }
        Ok(Self {
            kind,
            key_id: r.array().ok_or_else(truncated)?,
            wrap_nonce: r.array().ok_or_else(truncated)?,
            wrapped: r.array().ok_or_else(truncated)?,
            content_nonce: r.array().ok_or_else(truncated)?,
            length: u64::from_le_bytes(r.array().ok_or_else(truncated)?),
        })
    }
}

/// Reads fixed-size fields without ever indexing out of bounds.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let end = self.at.checked_add(N)?;
        let field = self.bytes.get(self.at..end)?.try_into().ok()?;
        self.at = end;
        Some(field)
    }

    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.at)
    }
}

/// One chunk as a manifest names it.
#[derive(Clone, Copy)]
struct ChunkRef {
    id: [u8; 32],
    key: [u8; KEY_LEN],
    length: u32,
}

/// The chunks of one artifact, in order.
struct Manifest {
    total: u64,
    sha256: [u8; 32],
    chunks: Vec<ChunkRef>,
}

impl Manifest {
    fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(MANIFEST_HEAD_LEN + self.chunks.len() * MANIFEST_ENTRY_LEN);
        out.extend_from_slice(&self.total.to_le_bytes());
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.id);
            out.extend_from_slice(&c.key);
            out.extend_from_slice(&c.length.to_le_bytes());
        }
        out
    }

    /// Parses a manifest (already authenticated, but checked all the same:
    /// a bug must not turn into a panic or a huge allocation).
    fn decode(identity: &str, bytes: &[u8], length: u64) -> Result<Self, SealError> {
        let bad = || tampered(identity, "the manifest is malformed");
        let mut r = Reader::new(bytes);
        let total = u64::from_le_bytes(r.array().ok_or_else(bad)?);
        let sha256 = r.array().ok_or_else(bad)?;
        let count = u32::from_le_bytes(r.array().ok_or_else(bad)?) as usize;
        if total != length || count.checked_mul(MANIFEST_ENTRY_LEN) != Some(r.remaining()) {
            return Err(bad());
        }
        let mut chunks = Vec::with_capacity(count);
        let mut sum: u64 = 0;
        for _ in 0..count {
            let chunk = ChunkRef {
                id: r.array().ok_or_else(bad)?,
                key: r.array().ok_or_else(bad)?,
                length: u32::from_le_bytes(r.array().ok_or_else(bad)?),
            };
            if chunk.length == 0 || chunk.length > CHUNK_LIMIT {
                return Err(bad());
            }
            sum += u64::from(chunk.length);
            chunks.push(chunk);
        }
        if sum != total {
            return Err(bad());
        }
        Ok(Self {
            total,
            sha256,
            chunks,
        })
    }
}

fn wrap_aad(key_id: &[u8; KEY_ID_LEN], identity: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_AAD.len() + 1 + KEY_ID_LEN + identity.len());
    aad.extend_from_slice(WRAP_AAD);
    aad.push(FORMAT_VERSION);
    aad.extend_from_slice(key_id);
    aad.extend_from_slice(identity.as_bytes());
    aad
}

fn content_aad(kind: u8, length: u64, identity: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(CONTENT_AAD.len() + 2 + 8 + identity.len());
    aad.extend_from_slice(CONTENT_AAD);
    aad.push(FORMAT_VERSION);
    aad.push(kind);
    aad.extend_from_slice(&length.to_le_bytes());
    aad.extend_from_slice(identity.as_bytes());
    aad
}

fn aead_key(key: &[u8; KEY_LEN]) -> Result<LessSafeKey, SealError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| SealError::Crypto("setting up an AES-256-GCM key"))
}

fn random<const N: usize>() -> Result<[u8; N], SealError> {
    let mut bytes = [0; N];
    rand::fill(&mut bytes).map_err(|_| SealError::Crypto("the random generator"))?;
    Ok(bytes)
}

fn hmac_of(key: &hmac::Key, info: &[u8], bytes: &[u8]) -> [u8; 32] {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(info);
    ctx.update(bytes);
    let mut out = [0; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

fn digest32(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// Wraps `data_key` under `master` for `identity`.
fn wrap(
    master: &MasterKey,
    identity: &str,
    data_key: &[u8; KEY_LEN],
) -> Result<([u8; NONCE_LEN], [u8; WRAPPED_LEN]), SealError> {
    let nonce = random()?;
    let mut buf = data_key.to_vec();
    aead_key(&master.key)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(wrap_aad(&master.id, identity)),
            &mut buf,
        )
        .map_err(|_| SealError::Crypto("wrapping a data key"))?;
    let wrapped = buf
        .try_into()
        .map_err(|_| SealError::Crypto("wrapping a data key"))?;
    Ok((nonce, wrapped))
}

/// Unwraps the data key of `identity`'s blob with the master key its
/// header names.
fn unwrap(keyring: &Keyring, identity: &str, header: &Header) -> Result<[u8; KEY_LEN], SealError> {
    let master = keyring
        .find(&header.key_id)
        .ok_or_else(|| SealError::UnknownMasterKey {
            identity: identity.to_owned(),
            key_id: hex(&header.key_id),
        })?;
    let mut buf = header.wrapped;
    let key = aead_key(&master.key)?
        .open_in_place(
            Nonce::assume_unique_for_key(header.wrap_nonce),
            Aad::from(wrap_aad(&header.key_id, identity)),
            &mut buf,
        )
        .map_err(|_| tampered(identity, "the wrapped data key does not authenticate"))?;
    (&*key)
        .try_into()
        .map_err(|_| tampered(identity, "the wrapped data key does not authenticate"))
}

/// A blob: header plus `content` sealed under a fresh data key.
fn seal_blob(
    master: &MasterKey,
    identity: &str,
    kind: u8,
    length: u64,
    mut content: Vec<u8>,
) -> Result<Vec<u8>, SealError> {
    let data_key = random()?;
    let (wrap_nonce, wrapped) = wrap(master, identity, &data_key)?;
    let content_nonce = random()?;
    aead_key(&data_key)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(content_nonce),
            Aad::from(content_aad(kind, length, identity)),
            &mut content,
        )
        .map_err(|_| SealError::Crypto("sealing content"))?;
    let header = Header {
        kind,
        key_id: master.id,
        wrap_nonce,
        wrapped,
        content_nonce,
        length,
    };
    let mut blob = header.encode();
    blob.extend_from_slice(&content);
    Ok(blob)
}

/// Authenticates and decrypts a blob: its header and its content.
fn open_blob(
    keyring: &Keyring,
    identity: &str,
    mut blob: Vec<u8>,
) -> Result<(Header, Vec<u8>), SealError> {
    let header = Header::decode(identity, &blob)?;
    let data_key = unwrap(keyring, identity, &header)?;
    let mut content = blob.split_off(HEADER_LEN);
    let len = aead_key(&data_key)?
        .open_in_place(
            Nonce::assume_unique_for_key(header.content_nonce),
            Aad::from(content_aad(header.kind, header.length, identity)),
            &mut content,
        )
        .map_err(|_| tampered(identity, "the content does not authenticate"))?
        .len();
    content.truncate(len);
    if header.kind == KIND_INLINE && len as u64 != header.length {
        return Err(tampered(
            identity,
            "the content's length is not the header's",
        ));
    }
    Ok((header, content))
}

/// Replaces the blob at `path` by one whose data key is wrapped by the
/// keyring's current key; false when it already was.
fn rewrap_file(
    tmp_dir: &Path,
    path: &Path,
    identity: &str,
    keyring: &Keyring,
) -> Result<bool, SealError> {
    let mut bytes = read_blob_file(path, identity)?;
    let header = Header::decode(identity, &bytes)?;
    if header.key_id == keyring.current.id {
        return Ok(false);
    }
    let data_key = unwrap(keyring, identity, &header)?;
    let (wrap_nonce, wrapped) = wrap(&keyring.current, identity, &data_key)?;
    let rewrapped = Header {
        key_id: keyring.current.id,
        wrap_nonce,
        wrapped,
        ..header
    };
    bytes.splice(..HEADER_LEN, rewrapped.encode());
    write_file_durably(tmp_dir, path, &bytes)?;
    Ok(true)
}

fn read_blob_file(path: &Path, identity: &str) -> Result<Vec<u8>, SealError> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SealError::Missing(identity.to_owned()));
        }
        Err(e) => return Err(io_error(|| format!("reading {}", path.display()))(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_BLOB + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(|| format!("reading {}", path.display())))?;
    if bytes.len() as u64 > MAX_BLOB {
        return Err(tampered(
            identity,
            "the blob is larger than any kiln writes",
        ));
    }
    Ok(bytes)
}

/// Loads the key file, with a rotation's new key when one is pending, or
/// creates the key file at first start.
fn load_keyring(keys: &Path) -> Result<Keyring, SealError> {
    let current_path = keys.join(MASTER_KEY_FILE);
    let new_path = keys.join(NEW_MASTER_KEY_FILE);
    match (read_key_file(&current_path)?, read_key_file(&new_path)?) {
        (Some(old), Some(new)) => Ok(Keyring {
            current: new,
            retiring: Some(old),
        }),
        (Some(current), None) => Ok(Keyring {
            current,
            retiring: None,
        }),
        (None, Some(_)) => Err(SealError::MasterKey(format!(
            "{} exists but {} does not; if it is the store's key, rename it",
            new_path.display(),
            current_path.display()
        ))),
        (None, None) => {
            if keys.join(CONVERGENCE_FILE).exists() {
                return Err(SealError::MasterKey(format!(
                    "{} is missing, but this store was sealed with a master key: \
                     restore the file or set {MASTER_KEY_ENV}",
                    current_path.display()
                )));
            }
            let current = MasterKey::generate()?;
            write_key_file(keys, &current_path, &current)?;
            tracing::info!(
                key_id = %current.id(),
                path = %current_path.display(),
                "created a master key"
            );
            Ok(Keyring {
                current,
                retiring: None,
            })
        }
    }
}

/// Reads a key file, refusing one that group or others may access.
fn read_key_file(path: &Path) -> Result<Option<MasterKey>, SealError> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(|| format!("reading {}", path.display()))(e)),
    };
    // fstat of the file opened, not a second lookup of the path.
    let meta = file
        .metadata()
        .map_err(io_error(|| format!("reading {}", path.display())))?;
    if !meta.is_file() {
        return Err(SealError::MasterKey(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SealError::MasterKey(format!(
            "{} is accessible by group or others (mode {mode:03o}); it must be private \
             to the server's user: run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let mut text = Vec::new();
    file.take(4096)
        .read_to_end(&mut text)
        .map_err(io_error(|| format!("reading {}", path.display())))?;
    let corrupt = |why: &str| SealError::MasterKey(format!("{} is corrupt: {why}", path.display()));
    let stored: KeyFile = serde_json::from_slice(&text).map_err(|_| corrupt("not a key file"))?;
    if stored.version != 1 {
        return Err(corrupt("unknown version"));
    }
    let key = parse_hex32(&stored.key)
        .map(MasterKey::from_bytes)
        .ok_or_else(|| corrupt("the key is not 64 hex digits"))?;
    if key.id() != stored.id {
        return Err(corrupt("its key id does not match its key"));
    }
    Ok(Some(key))
}

fn write_key_file(dir: &Path, path: &Path, key: &MasterKey) -> Result<(), SealError> {
    let stored = KeyFile {
        version: 1,
        id: key.id(),
        key: hex(&key.key),
    };
    let mut text = serde_json::to_vec(&stored).map_err(|e| SealError::Io {
        context: format!("encoding {}", path.display()),
        error: io::Error::other(e),
    })?;
    text.push(b'\n');
    write_file_durably(dir, path, &text)
}

/// Unseals the convergence secret, creating it at first start.
fn load_convergence(
    keys: &Path,
    keyring: &Keyring,
    key_from_env: bool,
) -> Result<hmac::Key, SealError> {
    let path = keys.join(CONVERGENCE_FILE);
    let source = if key_from_env {
        MASTER_KEY_ENV.to_owned()
    } else {
        keys.join(MASTER_KEY_FILE).display().to_string()
    };
    let secret: [u8; 32] = match read_blob_file(&path, CONVERGENCE_IDENTITY) {
        Ok(bytes) => {
            let (_, secret) =
                open_blob(keyring, CONVERGENCE_IDENTITY, bytes).map_err(|e| match e {
                    SealError::UnknownMasterKey { key_id, .. } => SealError::MasterKey(format!(
                        "this store is sealed under master key {key_id}, but the key from \
                         {source} is {}",
                        keyring.current.id()
                    )),
                    SealError::Tampered { what, .. } => SealError::MasterKey(format!(
                        "{} does not authenticate under master key {} ({what})",
                        path.display(),
                        keyring.current.id()
                    )),
                    other => other,
                })?;
            secret.try_into().map_err(|_| {
                SealError::MasterKey(format!("{} holds no 32-byte secret", path.display()))
            })?
        }
        Err(SealError::Missing(_)) => {
            let secret = random()?;
            let blob = seal_blob(
                &keyring.current,
                CONVERGENCE_IDENTITY,
                KIND_INLINE,
                32,
                secret.to_vec(),
            )?;
            write_file_durably(keys, &path, &blob)?;
            secret
        }
        Err(e) => return Err(e),
    };
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &secret))
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, SealError> {
    let context = || format!("listing {}", dir.display());
    fs::read_dir(dir)
        .map_err(io_error(context))?
        .collect::<io::Result<Vec<_>>>()
        .map_err(io_error(context))
}

/// Removes what writes interrupted by a crash left (files, or directories
/// of an older layout).
fn remove_tmp_files(dir: &Path) -> Result<(), SealError> {
    for entry in read_dir(dir)? {
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(io_error(|| format!("removing {}", path.display())))?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), SealError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(|| format!("syncing {}", dir.display())))
}

/// Creates `dir` and missing parents, each entry made durable.
fn create_dir_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        create_dir_durably(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    match parent {
        Some(parent) => fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

/// Writes `path` through a fsynced temporary file in `tmp_dir` (same file
/// system) renamed over it: readers see the old bytes or the new, never
/// part. Not durable until the directory is synced.
fn write_file(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SealError> {
    let tmp = tmp_dir.join(format!("{TMP_PREFIX}{}", uuid::Uuid::new_v4()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(io_error(|| format!("writing {}", path.display())))
}

/// [`write_file`], then the directory synced so the new entry survives a
/// crash.
fn write_file_durably(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SealError> {
    write_file(tmp_dir, path, bytes)?;
    sync_dir(path.parent().unwrap_or(tmp_dir))
}

/// Removes a file durably; whether it was there.
fn remove_file_durably(path: &Path) -> Result<bool, SealError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error(|| format!("removing {}", path.display()))(e)),
    }
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> SealedStore {
        SealedStore::open(dir.join("code"), dir.join("keys"), None).unwrap()
    }

    fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut out = vec![0; len];
        rng.fill(&mut out);
        out
    }

    fn blob_file(store: &SealedStore, identity: &str) -> PathBuf {
        store.blob_path(identity).unwrap()
    }

    /// The chunk files of `identity`, in manifest order.
    fn chunk_files(store: &SealedStore, identity: &str) -> Vec<PathBuf> {
        let bytes = fs::read(blob_file(store, identity)).unwrap();
        let header = Header::decode(identity, &bytes).unwrap();
        let (_, content) = open_blob(&store.keyring().clone(), identity, bytes).unwrap();
        let manifest = Manifest::decode(identity, &content, header.length).unwrap();
        manifest
            .chunks
            .iter()
            .map(|c| store.chunk_path(&c.id))
            .collect()
    }

    /// Asserts `identity` fails closed, with its name in the error.
    fn assert_fails_closed(store: &SealedStore, identity: &str, case: &str) {
        match store.get(identity) {
            Err(e @ (SealError::Tampered { .. } | SealError::UnknownMasterKey { .. })) => {
                assert!(e.to_string().contains(identity), "{case}: {e}");
            }
            other => panic!("{case}: {:?}", other.map(|v| v.len())),
        }
    }

    #[test]
    fn small_and_large_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let small = b"hello".to_vec();
        let large = pseudo_random(1, 5 << 20);
        store.put("code/small", &small).unwrap();
        store.put("code/large", &large).unwrap();
        store.put("code/empty", b"").unwrap();
        assert_eq!(store.get("code/small").unwrap(), small);
        assert_eq!(store.get("code/large").unwrap(), large);
        assert_eq!(store.get("code/empty").unwrap(), b"");
        let mut streamed = Vec::new();
        assert_eq!(
            store.read_to("code/large", &mut streamed).unwrap(),
            large.len() as u64
        );
        assert_eq!(streamed, large);
        assert!(chunk_files(&store, "code/large").len() > 4);

        // Nothing of the plaintext is on disk.
        let needle = &large[1000..1032];
        for path in walk(dir.path()) {
            let bytes = fs::read(&path).unwrap();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{path:?} holds plaintext"
            );
        }

        // Reopening reads the same key file and convergence secret.
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.get("code/large").unwrap(), large);
        let stats = store.stats().unwrap();
        assert_eq!(stats.artifacts, 3);
        assert_eq!(stats.logical_bytes, 5 + (5 << 20));
        assert_eq!(
            store.identities().unwrap(),
            ["code/empty", "code/large", "code/small"]
        );
        assert!(matches!(
            store.get("code/nothing"),
            Err(SealError::Missing(_))
        ));
        for bad in ["", "../x", "code/../x", "a//b", "code/.tmp-x", "a b"] {
            assert!(
                matches!(store.put(bad, b"x"), Err(SealError::Identity(_))),
                "{bad}"
            );
        }
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    #[test]
    fn the_key_file_is_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let key_path = dir.path().join("keys").join(MASTER_KEY_FILE);
        let mode = fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let keys_mode = fs::metadata(dir.path().join("keys"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(keys_mode & 0o777, 0o700);
        let stored: KeyFile = serde_json::from_slice(&fs::read(&key_path).unwrap()).unwrap();
        assert_eq!(stored.id, store.master_key_id());
        drop(store);

        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = SealedStore::open(dir.path().join("code"), dir.path().join("keys"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("chmod 600") && err.contains("644"), "{err}");
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();

        // A lost key file is not silently replaced by a new key.
        fs::rename(&key_path, dir.path().join("saved.key")).unwrap();
        let err = SealedStore::open(dir.path().join("code"), dir.path().join("keys"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is missing"), "{err}");
        fs::rename(dir.path().join("saved.key"), &key_path).unwrap();
        open(dir.path());
    }

    #[test]
    fn master_keys_parse_from_hex_or_base64_only() {
        let key = [7u8; 32];
        let by_hex = MasterKey::parse(&hex(&key)).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        let by_b64 = MasterKey::parse(&format!(" {b64}\n")).unwrap();
        assert_eq!(by_hex.id(), by_b64.id());
        assert_eq!(by_hex.id().len(), 16);
        for bad in [
            "",
            "abc",
            &hex(&[7u8; 31]),
            &"g".repeat(64),
            &base64::engine::general_purpose::STANDARD.encode([1u8; 31]),
        ] {
            let err = MasterKey::parse(bad).unwrap_err().to_string();
            assert!(err.contains(MASTER_KEY_ENV), "{err}");
        }
        assert!(!format!("{by_hex:?}").contains(&hex(&key)));
    }

    #[test]
    fn altered_blobs_fail_closed_naming_the_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let small = pseudo_random(2, 1000);
        let large = pseudo_random(3, 3 << 20);
        for identity in ["code/small", "code/large"] {
            let content = if identity == "code/small" {
                &small
            } else {
                &large
            };
            store.put(identity, content).unwrap();
            let path = blob_file(&store, identity);
            let original = fs::read(&path).unwrap();
            // One byte in each header field, and in the content.
            let offsets = [0, 8, 9, 10, 18, 30, 78, 90, HEADER_LEN, original.len() - 1];
            for at in offsets {
                let mut bytes = original.clone();
                bytes[at] ^= 0x01;
                fs::write(&path, &bytes).unwrap();
                assert_fails_closed(&store, identity, &format!("flip at {at}"));
            }
            for len in [0, 10, HEADER_LEN - 1, HEADER_LEN, original.len() - 1] {
                fs::write(&path, &original[..len]).unwrap();
                assert_fails_closed(&store, identity, &format!("truncated to {len}"));
            }
            fs::write(&path, &original).unwrap();
            assert_eq!(&store.get(identity).unwrap(), content);
        }

        // One artifact's blob under another's name.
        let a = blob_file(&store, "code/small");
        let b = blob_file(&store, "code/large");
        fs::rename(&a, &b).unwrap();
        assert_fails_closed(&store, "code/large", "swapped blobs");
        match store.get("code/large") {
            Err(SealError::Tampered { identity, what }) => {
                assert_eq!(identity, "code/large");
                assert_eq!(what, "the wrapped data key does not authenticate");
            }
            other => panic!("{:?}", other.map(|v| v.len())),
        }
    }

    #[test]
    fn altered_or_swapped_chunks_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let large = pseudo_random(4, 4 << 20);
        store.put("code/large", &large).unwrap();
        let chunks = chunk_files(&store, "code/large");
        let (first, second) = (&chunks[0], &chunks[1]);
        let original = fs::read(first).unwrap();

        let mut flipped = original.clone();
        flipped[100] ^= 0x80;
        fs::write(first, &flipped).unwrap();
        assert_fails_closed(&store, "code/large", "flipped chunk byte");
        fs::write(first, &original).unwrap();
        assert_eq!(store.get("code/large").unwrap(), large);

        // Swap the two chunk files.
        let tmp = dir.path().join("swap");
        fs::rename(first, &tmp).unwrap();
        fs::rename(second, first).unwrap();
        fs::rename(&tmp, second).unwrap();
        assert_fails_closed(&store, "code/large", "swapped chunks");

        // Swapped back it reads again; without the chunk it fails.
        fs::rename(second, &tmp).unwrap();
        fs::rename(first, second).unwrap();
        fs::rename(&tmp, first).unwrap();
        assert_eq!(store.get("code/large").unwrap(), large);
        fs::remove_file(first).unwrap();
        assert_fails_closed(&store, "code/large", "missing chunk");
    }

    #[test]
    fn a_wrong_master_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.put("code/a", b"secret").unwrap();
        let right = store.master_key_id();
        drop(store);
        let wrong = MasterKey::generate().unwrap();
        let err = SealedStore::open(
            dir.path().join("code"),
            dir.path().join("keys"),
            Some(wrong.clone()),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SealError::MasterKey(_)), "{msg}");
        assert!(msg.contains(&right) && msg.contains(&wrong.id()), "{msg}");

        // A blob sealed in another store, under another key.
        let other_dir = tempfile::tempdir().unwrap();
        let other = SealedStore::open(
            other_dir.path().join("code"),
            other_dir.path().join("keys"),
            Some(wrong),
        )
        .unwrap();
        other.put("code/a", b"other").unwrap();
        let store = open(dir.path());
        fs::copy(blob_file(&other, "code/a"), blob_file(&store, "code/a")).unwrap();
        assert_fails_closed(&store, "code/a", "foreign blob");
    }

    #[test]
    fn rotation_rewraps_every_key_and_retires_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let large = pseudo_random(5, 3 << 20);
        store.put("code/small", b"small").unwrap();
        store.put("code/large", &large).unwrap();
        let chunks_before: Vec<_> = chunk_files(&store, "code/large")
            .iter()
            .map(|p| fs::read(p).unwrap())
            .collect();
        let old = store.keyring().current.clone();
        let old_content = fs::read(blob_file(&store, "code/large")).unwrap()[HEADER_LEN..].to_vec();

        let new = MasterKey::generate().unwrap();
        let report = store.rotate_master(new.clone()).unwrap();
        assert_eq!(report.blobs_rewrapped, 2);
        assert_eq!(report.old_key_id, old.id());
        assert_eq!(report.new_key_id, new.id());
        assert_eq!(store.master_key_id(), new.id());
        assert!(!dir.path().join("keys").join(NEW_MASTER_KEY_FILE).exists());
        assert_eq!(store.get("code/small").unwrap(), b"small");
        assert_eq!(store.get("code/large").unwrap(), large);
        // Content and chunks untouched.
        let blob = fs::read(blob_file(&store, "code/large")).unwrap();
        assert_eq!(blob[HEADER_LEN..], old_content[..]);
        let chunks_after: Vec<_> = chunk_files(&store, "code/large")
            .iter()
            .map(|p| fs::read(p).unwrap())
            .collect();
        assert_eq!(chunks_before, chunks_after);

        // The old key unwraps nothing any more, even with the header's key
        // id set back to it.
        let old_ring = Keyring {
            current: old.clone(),
            retiring: None,
        };
        let mut header = Header::decode("code/large", &blob).unwrap();
        assert!(matches!(
            unwrap(&old_ring, "code/large", &header),
            Err(SealError::UnknownMasterKey { .. })
        ));
        header.key_id = old.id;
        assert!(matches!(
            unwrap(&old_ring, "code/large", &header),
            Err(SealError::Tampered { .. })
        ));
        drop(store);
        assert!(matches!(
            SealedStore::open(dir.path().join("code"), dir.path().join("keys"), Some(old)),
            Err(SealError::MasterKey(_))
        ));
        // The new key file is the one read at the next start.
        let store = open(dir.path());
        assert_eq!(store.master_key_id(), new.id());
        assert_eq!(store.get("code/large").unwrap(), large);
    }

    #[test]
    fn an_interrupted_rotation_finishes_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.put("code/a", b"a").unwrap();
        store.put("code/b", b"b").unwrap();
        let old_id = store.master_key_id();
        drop(store);
        // Step 1 done, step 2 done for code/a only.
        let keys = dir.path().join("keys");
        let new = MasterKey::generate().unwrap();
        write_key_file(&keys, &keys.join(NEW_MASTER_KEY_FILE), &new).unwrap();
        let old = read_key_file(&keys.join(MASTER_KEY_FILE)).unwrap().unwrap();
        let ring = Keyring {
            current: new.clone(),
            retiring: Some(old),
        };
        let a = dir.path().join("code/blobs/code/a.blob");
        assert!(rewrap_file(&dir.path().join("code"), &a, "code/a", &ring).unwrap());

        let store = open(dir.path());
        assert_ne!(old_id, new.id());
        assert_eq!(store.master_key_id(), new.id());
        assert!(!keys.join(NEW_MASTER_KEY_FILE).exists());
        assert_eq!(store.get("code/a").unwrap(), b"a");
        assert_eq!(store.get("code/b").unwrap(), b"b");
        let b = fs::read(dir.path().join("code/blobs/code/b.blob")).unwrap();
        assert_eq!(Header::decode("code/b", &b).unwrap().key_id, new.id);
    }

    #[test]
    fn sweep_keeps_shared_chunks_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let shared = pseudo_random(6, 3 << 20);
        let mut a = shared.clone();
        a.extend(pseudo_random(7, 2 << 20));
        let mut b = shared;
        b.extend(pseudo_random(8, 2 << 20));
        store.put("code/a", &a).unwrap();
        store.put("code/b", &b).unwrap();
        store.put("code/c", b"small").unwrap();
        let before = store.stats().unwrap();
        assert!(
            before.stored_bytes < (a.len() + b.len()) as u64 * 4 / 5,
            "{before:?}"
        );

        let report = store.sweep(&["code/a".to_owned()].into()).unwrap();
        assert_eq!(report.blobs, 2);
        assert!(report.chunks > 0, "{report:?}");
        assert_eq!(store.get("code/a").unwrap(), a);
        assert!(matches!(store.get("code/b"), Err(SealError::Missing(_))));
        let after = store.stats().unwrap();
        assert_eq!(after.artifacts, 1);
        assert_eq!(after.chunks, chunk_files(&store, "code/a").len() as u64);
        assert!(store.remove("code/a").unwrap());
        assert!(!store.remove("code/a").unwrap());
        assert_eq!(store.sweep(&HashSet::new()).unwrap().blobs, 0);
        assert_eq!(store.stats().unwrap(), SealStats::default());
    }
}
