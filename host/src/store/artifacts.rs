//! Code archives: validated, sealed at rest, unpacked on demand into a
//! cache of plaintext trees.
//!
//! Each archive is sealed (see [`super::sealed`]) under the identity
//! `code/<sha256-hex>`; layers are archives too. Its files are unpacked to
//! `<cache>/<sha256-hex>/` (read-only, shown to functions at `/var/task`)
//! and layer lists merged into `<cache>/opt-<key>/`. The cache is plaintext
//! and must not outlive the server: it is emptied when the store opens and
//! a tree missing from it is unpacked again from the sealed archive, with
//! the same validation as an upload. Functions that upload the same bytes
//! share the archive and its tree.
//!
//! Threat model: the archive is hostile. Unpacking refuses what a trusted
//! unzipper refuses — absolute paths, `..`, NUL bytes, backslashes, devices,
//! duplicate names, encryption, symbolic links that lead out of the archive
//! and paths that pass through a symbolic link — and counts inflated bytes
//! while inflating, so a zip bomb stops at the limit with flat memory.
//! Relative symbolic links that stay inside the archive are kept, as Lambda
//! keeps them (`lib64 -> lib`, `libfoo.so -> libfoo.so.1`).
//! The sealed store is hostile too: an altered archive fails closed
//! ([`ArtifactError::Sealed`]) instead of being unpacked.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Cursor, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::digest;
use base64::Engine as _;

use super::sealed::{MasterKey, RotationReport, SealError, SealStats, SealedStore};

/// Limits on uploaded archives, Lambda's by default.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveLimits {
    /// Largest archive accepted, in bytes (50 MiB).
    pub max_zipped: u64,
    /// Largest total of unpacked file sizes, in bytes (250 MB).
    pub max_unzipped: u64,
    /// Most entries one archive may hold.
    pub max_entries: usize,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        Self {
            max_zipped: 50 * 1024 * 1024,
            max_unzipped: 262_144_000,
            max_entries: 20_000,
        }
    }
}

/// Why an archive was refused or could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The bytes are not a readable zip archive.
    #[error(
        "Could not unzip uploaded file. Please check your file, then try to upload again. ({0})"
    )]
    NotZip(String),
    /// The archive is larger than allowed.
    #[error("Zipped size {size} bytes exceeds the limit of {limit} bytes")]
    ZippedTooLarge {
        /// The archive's size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The unpacked files are larger than allowed.
    #[error("Unzipped size must be smaller than {limit} bytes")]
    UnzippedTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The archive has more entries than allowed.
    #[error("The archive has {count} entries; at most {limit} are allowed")]
    TooManyEntries {
        /// Entries found.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// One entry is refused.
    #[error("The archive entry {name:?} is refused: {reason}")]
    Entry {
        /// The entry's name as stored (lossy UTF-8).
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// An entry's data is corrupt (bad CRC, truncated stream...).
    #[error("The archive entry {name:?} could not be read: {message}")]
    Corrupt {
        /// The entry's name.
        name: String,
        /// What the decoder said.
        message: String,
    },
    /// A file the caller asked for is not in the archive.
    #[error("The archive has no file {0:?}")]
    MissingFile(String),
    /// Storage failed on the server side.
    #[error("storing the archive: {0}")]
    Io(#[from] io::Error),
    /// The sealed archive is missing, does not authenticate, or could not
    /// be sealed.
    #[error(transparent)]
    Sealed(#[from] SealError),
}

impl ArtifactError {
    /// Whether the uploader caused the error (as opposed to the server).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, ArtifactError::Io(_) | ArtifactError::Sealed(_))
    }
}

/// A stored archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArchive {
    /// Hex SHA-256 of the archive bytes: its name in the store.
    pub sha256_hex: String,
    /// Base64 SHA-256, as Lambda's `CodeSha256` shows it.
    pub sha256_base64: String,
    /// Archive size in bytes (`CodeSize`).
    pub size: u64,
    /// Total size of the unpacked files.
    pub unzipped_size: u64,
}

/// The archive store: sealed archives plus their unpacked cache.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    sealed: Arc<SealedStore>,
    cache: PathBuf,
    limits: ArchiveLimits,
}

impl ArtifactStore {
    /// Opens the store over `sealed`, with unpacked trees under `cache`,
    /// which is emptied: plaintext does not outlive a server. Archives an
    /// older kiln kept in plaintext in the sealed store's root are sealed
    /// and their plaintext removed.
    pub fn open(
        sealed: SealedStore,
        cache: impl Into<PathBuf>,
        limits: ArchiveLimits,
    ) -> Result<Self, ArtifactError> {
        let cache = cache.into();
        remove_tree(&cache)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cache)?;
        seal_plaintext_archives(&sealed)?;
        Ok(Self {
            sealed: Arc::new(sealed),
            cache,
            limits,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> ArchiveLimits {
        self.limits
    }

    /// The sealed store under the archives.
    pub fn sealed(&self) -> &SealedStore {
        &self.sealed
    }

    /// Counts and sizes of the sealed archives (see [`SealStats`]).
    pub fn stats(&self) -> Result<SealStats, ArtifactError> {
        Ok(self.sealed.stats()?)
    }

    /// Rotates the master key to a new random one (see
    /// [`SealedStore::rotate_master`]).
    pub fn rotate_master(&self) -> Result<RotationReport, ArtifactError> {
        Ok(self.sealed.rotate_master(MasterKey::generate()?)?)
    }

    /// Validates `zip`, unpacks it (unless the same bytes are already
    /// unpacked) and seals it (unless the same bytes are already sealed).
    pub fn put(&self, zip: &[u8]) -> Result<StoredArchive, ArtifactError> {
        let size = zip.len() as u64;
        if size > self.limits.max_zipped {
            return Err(ArtifactError::ZippedTooLarge {
                size,
                limit: self.limits.max_zipped,
            });
        }
        let sha = digest::digest(&digest::SHA256, zip);
        let sha256_hex = hex(sha.as_ref());
        let sha256_base64 = base64::engine::general_purpose::STANDARD.encode(sha.as_ref());

        // Unpacking validates: nothing is sealed for a refused archive.
        let unzipped_size = self.unpack_into_cache(&sha256_hex, zip)?;
        let identity = identity(&sha256_hex);
        if !self.sealed.contains(&identity) {
            self.sealed.put(&identity, zip)?;
        }
        Ok(StoredArchive {
            sha256_hex,
            sha256_base64,
            size,
            unzipped_size,
        })
    }

    /// The directory holding the unpacked files of an archive, unpacked
    /// again from the sealed archive when the cache lacks it.
    pub fn ensure_dir(&self, sha256_hex: &str) -> Result<PathBuf, ArtifactError> {
        let dir = self.cache_dir(sha256_hex)?;
        if !dir.is_dir() {
            let zip = self.sealed.get(&identity(sha256_hex))?;
            self.unpack_into_cache(sha256_hex, &zip)?;
        }
        Ok(dir)
    }

    /// Reads the archive as uploaded, authenticated.
    pub fn read_zip(&self, sha256_hex: &str) -> Result<Vec<u8>, ArtifactError> {
        self.cache_dir(sha256_hex)?;
        Ok(self.sealed.get(&identity(sha256_hex))?)
    }

    /// Reads one unpacked file, `path` being relative to the archive root.
    pub fn read_file(&self, sha256_hex: &str, path: &str) -> Result<Vec<u8>, ArtifactError> {
        let rel = safe_relative(path).ok_or_else(|| ArtifactError::MissingFile(path.to_owned()))?;
        let dir = self.ensure_dir(sha256_hex)?;
        let full = match inside(&dir, &rel) {
            Some(p) => p,
            None => return Err(ArtifactError::MissingFile(path.to_owned())),
        };
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_file() => Ok(fs::read(&full)?),
            Ok(_) => Err(ArtifactError::MissingFile(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(ArtifactError::MissingFile(path.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The directory that merges layers in order (later ones win where
    /// paths collide), built once per list of archives; `None` for none.
    /// Files are hard links to the layers' own (read-only) files.
    pub fn merged_layers(&self, layers: &[String]) -> Result<Option<PathBuf>, ArtifactError> {
        if layers.is_empty() {
            return Ok(None);
        }
        let dir = self
            .cache
            .join(format!("{MERGED_PREFIX}{}", merged_key(layers)));
        if dir.is_dir() {
            return Ok(Some(dir));
        }
        let sources = layers
            .iter()
            .map(|sha| self.ensure_dir(sha))
            .collect::<Result<Vec<_>, _>>()?;
        let tmp = self.cache.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        fs::create_dir(&tmp)?;
        let built = sources.iter().try_for_each(|src| overlay(src, &tmp));
        if let Err(e) = built {
            let _ = remove_tree(&tmp);
            return Err(e.into());
        }
        match fs::rename(&tmp, &dir) {
            Ok(()) => {}
            Err(_) if dir.is_dir() => remove_tree(&tmp)?,
            Err(e) => return Err(e.into()),
        }
        Ok(Some(dir))
    }

    /// Removes every archive and merged directory not named in `keep`
    /// (hex SHA-256s of archives, and archive lists of merged layers),
    /// and the chunks only they used; returns how many archives and cached
    /// directories went. Callers serialize it with every write to the store.
    pub fn sweep(
        &self,
        keep_archives: &HashSet<String>,
        keep_merged: &[Vec<String>],
    ) -> Result<usize, ArtifactError> {
        let mut keep: HashSet<String> = keep_archives.iter().map(|sha| identity(sha)).collect();
        // Keys kept sealed beside the archives are not archives.
        keep.extend(
            self.sealed
                .identities()?
                .into_iter()
                .filter(|i| i.starts_with("keys/")),
        );
        let mut removed = self.sealed.sweep(&keep)?.blobs;
        let merged: HashSet<String> = keep_merged
            .iter()
            .map(|l| format!("{MERGED_PREFIX}{}", merged_key(l)))
            .collect();
        for entry in fs::read_dir(&self.cache)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = if name.starts_with(MERGED_PREFIX) {
                merged.contains(&name)
            } else if name.starts_with(".tmp-") {
                true
            } else {
                keep_archives.contains(&name)
            };
            if !keep {
                let path = entry.path();
                if path.is_dir() {
                    remove_tree(&path)?;
                } else {
                    fs::remove_file(&path)?;
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Deletes an archive and its unpacked files (its chunks go at the next
    /// sweep).
    pub fn remove(&self, sha256_hex: &str) -> Result<(), ArtifactError> {
        let dir = self.cache_dir(sha256_hex)?;
        self.sealed.remove(&identity(sha256_hex))?;
        Ok(remove_tree(&dir)?)
    }

    /// Where an archive's files are unpacked; only hex digests name one.
    fn cache_dir(&self, sha256_hex: &str) -> Result<PathBuf, ArtifactError> {
        if sha256_hex.len() != 64 || !sha256_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SealError::Identity(identity(sha256_hex)).into());
        }
        Ok(self.cache.join(sha256_hex))
    }

    /// Unpacks `zip` (whose digest is `sha256_hex`) into the cache unless
    /// it is there; the unpacked size.
    fn unpack_into_cache(&self, sha256_hex: &str, zip: &[u8]) -> Result<u64, ArtifactError> {
        let dir = self.cache_dir(sha256_hex)?;
        if dir.is_dir() {
            // Same bytes as an archive already validated and unpacked.
            return Ok(tree_size(&dir)?);
        }
        let tmp = self.cache.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        let unzipped = match unpack(zip, &tmp, &self.limits) {
            Ok(n) => n,
            Err(e) => {
                let _ = remove_tree(&tmp);
                return Err(e);
            }
        };
        match fs::rename(&tmp, &dir) {
            Ok(()) => {}
            // Another unpacking of the same bytes won the race.
            Err(_) if dir.is_dir() => remove_tree(&tmp)?,
            Err(e) => return Err(e.into()),
        }
        Ok(unzipped)
    }
}

/// The sealed identity of an archive.
fn identity(sha256_hex: &str) -> String {
    format!("code/{sha256_hex}")
}

/// Seals archives an older kiln kept in plaintext (`<root>/<sha>.zip`,
/// with trees `<root>/<sha>/` and `<root>/opt-*`), then removes the
/// plaintext. A file whose digest is not its name is left alone.
fn seal_plaintext_archives(sealed: &SealedStore) -> Result<(), ArtifactError> {
    let root = sealed.root();
    let is_sha = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some(sha) = name.strip_suffix(".zip").filter(|s| is_sha(s)) {
            let zip = fs::read(&path)?;
            if hex(digest::digest(&digest::SHA256, &zip).as_ref()) != sha {
                tracing::warn!(path = %path.display(), "not sealing a plaintext archive whose digest is not its name");
                continue;
            }
            sealed.put(&identity(sha), &zip)?;
            fs::remove_file(&path)?;
            tracing::info!(sha256 = sha, "sealed a plaintext archive");
        } else if (is_sha(&name) || name.starts_with(MERGED_PREFIX)) && path.is_dir() {
            remove_tree(&path)?;
        }
    }
    Ok(())
}

/// The sealed identity of the credentials key (see `server`); sweeps keep
/// every `keys/` identity.
pub const CREDENTIALS_KEY_IDENTITY: &str = "keys/credentials";

/// The sealed identity of the key that authenticates compiled components
/// (see `kiln_wasm::RuntimeConfig::artifact_key`).
pub const COMPILED_KEY_IDENTITY: &str = "keys/compiled";

const MERGED_PREFIX: &str = "opt-";

fn merged_key(layers: &[String]) -> String {
    hex(digest::digest(&digest::SHA256, layers.join(",").as_bytes()).as_ref())
}

/// Puts the tree at `src` over `dest`: directories merged, files replaced.
fn overlay(src: &Path, dest: &Path) -> io::Result<()> {
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let target = dest.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            // A file or link of an earlier layer gives way to the directory.
            if target.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
                fs::remove_file(&target)?;
            }
            fs::create_dir_all(&target)?;
            overlay(&entry.path(), &target)?;
        } else if kind.is_file() {
            if target.is_dir() {
                remove_tree(&target)?;
            } else if target.symlink_metadata().is_ok() {
                fs::remove_file(&target)?;
            }
            if fs::hard_link(entry.path(), &target).is_err() {
                fs::copy(entry.path(), &target)?;
            }
        } else if kind.is_symlink() {
            // Checked when its layer was unpacked: it stays inside /opt.
            if target.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                remove_tree(&target)?;
            } else if target.symlink_metadata().is_ok() {
                fs::remove_file(&target)?;
            }
            std::os::unix::fs::symlink(fs::read_link(entry.path())?, &target)?;
        }
    }
    Ok(())
}

/// `root/rel` with its links resolved, if it is under `root` (also after
/// resolving): for the host's own reads of files in an unpacked archive,
/// which must never follow a link out of it.
pub fn inside(root: &Path, rel: &Path) -> Option<PathBuf> {
    let root = root.canonicalize().ok()?;
    let full = root.join(rel).canonicalize().ok()?;
    full.starts_with(&root).then_some(full)
}

/// A path inside an archive, as a relative path without `.`/`..` tricks.
pub fn safe_relative(path: &str) -> Option<PathBuf> {
    if path.is_empty() || path.contains('\0') || path.contains('\\') {
        return None;
    }
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

/// Longest symbolic link target accepted (Linux's PATH_MAX).
const MAX_LINK: usize = 4096;

/// Whether a link at `link` (a safe relative path in the archive) pointing
/// at `target` resolves inside the archive: relative, its `..`s all
/// leading (so they climb real directories: a link's own path never passes
/// through a link, see `unpack`) and never above the root. A `..` after a
/// name is refused: the name may be another link, and `d/..` is then not
/// where it seems (`d -> .`, `up -> d/d/../..`).
fn link_stays_inside(link: &Path, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return false;
    }
    let mut depth = link.components().count().saturating_sub(1);
    let mut descended = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if descended || depth == 0 => return false,
            ".." => depth -= 1,
            _ => descended = true,
        }
    }
    true
}

/// Unpacks `zip` into `dest` (created), returning the unpacked byte count.
fn unpack(zip: &[u8], dest: &Path, limits: &ArchiveLimits) -> Result<u64, ArtifactError> {
    let mut archive =
        zip::ZipArchive::new(Cursor::new(zip)).map_err(|e| ArtifactError::NotZip(e.to_string()))?;
    if archive.len() > limits.max_entries {
        return Err(ArtifactError::TooManyEntries {
            count: archive.len(),
            limit: limits.max_entries,
        });
    }
    // The zip crate keeps one entry per name, so a repeated name would be
    // silently shadowed: another unzipper could see the other file.
    if let Some(name) = repeated_name(zip) {
        return Err(ArtifactError::Entry {
            name,
            reason: "the name appears twice",
        });
    }
    fs::create_dir(dest)?;
    let mut seen = HashSet::new();
    let mut links: HashSet<PathBuf> = HashSet::new();
    let mut total: u64 = 0;
    for index in 0..archive.len() {
        let mut entry = archive
            .by_index(index)
            .map_err(|e| ArtifactError::NotZip(e.to_string()))?;
        let raw = entry.name_raw().to_vec();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let refuse = |reason| ArtifactError::Entry {
            name: name.clone(),
            reason,
        };
        let text = std::str::from_utf8(&raw).map_err(|_| refuse("the name is not UTF-8"))?;
        if text.contains('\0') {
            return Err(refuse("the name contains a NUL byte"));
        }
        if text.contains('\\') {
            return Err(refuse(
                "the name contains a backslash; use '/' between directories",
            ));
        }
        if text.starts_with('/') {
            return Err(refuse("the path is absolute"));
        }
        if text.split('/').any(|part| part == "..") {
            return Err(refuse("the path contains '..'"));
        }
        let rel = safe_relative(text).ok_or_else(|| refuse("the path is empty"))?;
        if entry.encrypted() {
            return Err(refuse("the entry is encrypted"));
        }
        let mode = entry.unix_mode().unwrap_or(0);
        let is_dir = entry.is_dir() || mode & S_IFMT == S_IFDIR;
        match mode & S_IFMT {
            0 | S_IFREG | S_IFDIR | S_IFLNK => {}
            _ => {
                return Err(refuse(
                    "only regular files, directories and symbolic links are allowed",
                ));
            }
        }
        if !seen.insert(rel.clone()) {
            return Err(refuse("the name appears twice"));
        }
        // A path through a link would be written wherever the link leads,
        // and a link checked against its name would not be checked against
        // where it really is.
        if rel.ancestors().skip(1).any(|a| links.contains(a)) {
            return Err(refuse(
                "the path passes through a symbolic link of the archive",
            ));
        }
        let target = dest.join(&rel);
        if mode & S_IFMT == S_IFLNK {
            let mut link = String::new();
            (&mut entry)
                .take(MAX_LINK as u64 + 1)
                .read_to_string(&mut link)
                .map_err(|_| refuse("the symbolic link's target is not UTF-8 text"))?;
            if link.len() > MAX_LINK {
                return Err(refuse("the symbolic link's target is too long"));
            }
            if !link_stays_inside(&rel, &link) {
                return Err(refuse(
                    "the symbolic link leads outside the archive; links must be relative and \
                     stay inside it",
                ));
            }
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)
                    .map_err(|_| refuse("a file and a directory share this path"))?;
            }
            std::os::unix::fs::symlink(&link, &target)
                .map_err(|_| refuse("a file and a directory share this path"))?;
            links.insert(rel);
            continue;
        }
        if is_dir {
            fs::create_dir_all(&target)
                .map_err(|_| refuse("a file and a directory share this path"))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .map_err(|_| refuse("a file and a directory share this path"))?;
        }
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|_| refuse("a file and a directory share this path"))?;
        let remaining = limits.max_unzipped - total;
        // Read one byte past the budget: reaching it proves the limit is
        // exceeded without inflating the rest.
        let mut limited = (&mut entry).take(remaining + 1);
        let copied = io::copy(&mut limited, &mut out).map_err(|e| {
            if e.kind() == io::ErrorKind::Other || e.kind() == io::ErrorKind::InvalidData {
                ArtifactError::Corrupt {
                    name: name.clone(),
                    message: e.to_string(),
                }
            } else {
                ArtifactError::Io(e)
            }
        })?;
        if copied > remaining {
            return Err(ArtifactError::UnzippedTooLarge {
                limit: limits.max_unzipped,
            });
        }
        total += copied;
        out.flush()?;
        let executable = mode & 0o111 != 0;
        fs::set_permissions(
            &target,
            fs::Permissions::from_mode(if executable { 0o555 } else { 0o444 }),
        )?;
    }
    Ok(total)
}

/// The first name the central directory lists twice. Reads the end of
/// central directory record and walks the file headers it points to;
/// anything malformed is left to the zip parser, which has accepted it.
fn repeated_name(zip: &[u8]) -> Option<String> {
    const EOCD: [u8; 4] = [0x50, 0x4b, 0x05, 0x06];
    const CDFH: [u8; 4] = [0x50, 0x4b, 0x01, 0x02];
    let u16_at = |b: &[u8], at: usize| -> Option<usize> {
        Some(usize::from(u16::from_le_bytes(
            b.get(at..at + 2)?.try_into().ok()?,
        )))
    };
    let u32_at = |b: &[u8], at: usize| -> Option<usize> {
        usize::try_from(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?)).ok()
    };
    // The record is 22 bytes plus a comment of at most 65535.
    let from = zip.len().saturating_sub(22 + 65_535);
    let eocd = (from..zip.len().saturating_sub(21))
        .rev()
        .find(|&i| zip.get(i..i + 4) == Some(&EOCD[..]))?;
    let entries = u16_at(zip, eocd + 10)?;
    let mut at = u32_at(zip, eocd + 16)?;
    if entries == 0xffff || at == 0xffff_ffff {
        // Zip64: the crate's own count is all there is to go on.
        return None;
    }
    let mut seen = HashSet::new();
    for _ in 0..entries {
        if zip.get(at..at + 4)? != CDFH {
            return None;
        }
        let name_len = u16_at(zip, at + 28)?;
        let extra_len = u16_at(zip, at + 30)?;
        let comment_len = u16_at(zip, at + 32)?;
        let name = zip.get(at + 46..at + 46 + name_len)?;
        if !seen.insert(name) {
            return Some(String::from_utf8_lossy(name).into_owned());
        }
        at += 46 + name_len + extra_len + comment_len;
    }
    None
}

/// Bytes of the regular files under `dir`; links are not followed.
fn tree_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        total += if kind.is_dir() {
            tree_size(&entry.path())?
        } else if kind.is_file() {
            entry.metadata()?.len()
        } else {
            0
        };
    }
    Ok(total)
}

/// Removes a tree, also when it does not exist.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    /// Builds a zip from `(name, mode, contents)` entries.
    pub(crate) fn zip_of(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, mode, data) in entries {
            let opts = SimpleFileOptions::default().unix_permissions(*mode);
            if mode & S_IFMT == S_IFLNK {
                w.add_symlink(*name, std::str::from_utf8(data).unwrap(), opts)
                    .unwrap();
            } else {
                w.start_file(*name, opts).unwrap();
                w.write_all(data).unwrap();
            }
        }
        w.finish().unwrap().into_inner()
    }

    /// Builds a zip of uncompressed entries: cheap for large contents.
    fn stored_zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .unix_permissions(0o644);
        for (name, data) in entries {
            w.start_file(*name, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn open_in(dir: &Path, limits: ArchiveLimits) -> ArtifactStore {
        let sealed = SealedStore::open(dir.join("code"), dir.join("keys"), None).unwrap();
        ArtifactStore::open(sealed, dir.join("cache/code"), limits).unwrap()
    }

    fn store(limits: ArchiveLimits) -> (tempfile::TempDir, ArtifactStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(dir.path(), limits);
        (dir, store)
    }

    #[test]
    fn stores_unpacks_and_dedupes() {
        let (_d, store) = store(ArchiveLimits::default());
        let zip = zip_of(&[
            ("function.wasm", 0o644, b"abc"),
            ("bin/bootstrap", 0o755, b"#!"),
        ]);
        let a = store.put(&zip).unwrap();
        assert_eq!(a.size, zip.len() as u64);
        assert_eq!(a.unzipped_size, 5);
        assert_eq!(
            store.read_file(&a.sha256_hex, "function.wasm").unwrap(),
            b"abc"
        );
        assert_eq!(
            store.read_file(&a.sha256_hex, "./function.wasm").unwrap(),
            b"abc"
        );
        let mode = fs::metadata(
            store
                .ensure_dir(&a.sha256_hex)
                .unwrap()
                .join("bin/bootstrap"),
        )
        .unwrap()
        .permissions()
        .mode();
        assert_eq!(mode & 0o777, 0o555);
        assert_eq!(store.put(&zip).unwrap(), a, "same bytes, same artifact");
        assert!(matches!(
            store.read_file(&a.sha256_hex, "../x"),
            Err(ArtifactError::MissingFile(_))
        ));
        assert_eq!(store.read_zip(&a.sha256_hex).unwrap(), zip);
        store.remove(&a.sha256_hex).unwrap();
        assert!(!store.cache.join(&a.sha256_hex).exists());
        assert!(matches!(
            store.read_zip(&a.sha256_hex),
            Err(ArtifactError::Sealed(SealError::Missing(_)))
        ));
    }

    #[test]
    fn hostile_entries_are_refused_by_name() {
        let (_d, store) = store(ArchiveLimits::default());
        let cases: &[(&str, u32, &str)] = &[
            ("../evil", 0o644, "'..'"),
            ("a/../../evil", 0o644, "'..'"),
            ("/etc/passwd", 0o644, "absolute"),
            ("a\\b", 0o644, "backslash"),
            ("link", S_IFLNK | 0o777, "leads outside the archive"),
        ];
        for (name, mode, why) in cases {
            let zip = zip_of(&[(name, *mode, b"/etc/passwd")]);
            match store.put(&zip) {
                Err(e @ ArtifactError::Entry { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(why), "{name}: {msg}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        // Nothing of a refused archive is left behind.
        let left: Vec<_> = fs::read_dir(&store.cache).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(store.stats().unwrap(), SealStats::default());
    }

    #[test]
    fn links_inside_the_archive_are_kept_and_links_out_refused() {
        let (_d, store) = store(ArchiveLimits::default());
        let zip = zip_of(&[
            ("lib/libfoo.so.1", 0o644, b"elf"),
            ("lib/libfoo.so", S_IFLNK | 0o777, b"libfoo.so.1"),
            ("lib64", S_IFLNK | 0o777, b"lib"),
            ("bin/tool", S_IFLNK | 0o777, b"../lib/./libfoo.so.1"),
        ]);
        let stored = store.put(&zip).unwrap();
        let dir = store.ensure_dir(&stored.sha256_hex).unwrap();
        assert_eq!(fs::read(dir.join("lib64/libfoo.so")).unwrap(), b"elf");
        assert_eq!(fs::read(dir.join("bin/tool")).unwrap(), b"elf");
        assert_eq!(fs::read_link(dir.join("lib64")).unwrap(), Path::new("lib"));
        for (entries, why) in [
            (
                vec![("a/b/up", S_IFLNK | 0o777, &b"../../.."[..])],
                "leads outside",
            ),
            (vec![("up", S_IFLNK | 0o777, &b".."[..])], "leads outside"),
            (
                vec![("abs", S_IFLNK | 0o777, &b"/etc"[..])],
                "leads outside",
            ),
            (
                vec![
                    ("x", S_IFLNK | 0o777, &b"."[..]),
                    ("x/y/l", S_IFLNK | 0o777, &b"../.."[..]),
                ],
                "passes through a symbolic link",
            ),
            (
                vec![
                    ("d", S_IFLNK | 0o777, &b"e"[..]),
                    ("d/f", 0o644, &b"data"[..]),
                ],
                "passes through a symbolic link",
            ),
        ] {
            match store.put(&zip_of(&entries)) {
                Err(e @ ArtifactError::Entry { .. }) => {
                    assert!(e.to_string().contains(why), "{entries:?}: {e}")
                }
                other => panic!("{entries:?}: {other:?}"),
            }
        }
        assert!(link_stays_inside(Path::new("a/b/l"), "../c/./d"));
        assert!(!link_stays_inside(Path::new("a/l"), "../../x"));
        assert!(link_stays_inside(Path::new("a/l"), "../x"));
        // `..` after a name: the name may be a link (`d -> .`).
        assert!(!link_stays_inside(Path::new("up"), "d/d/../.."));
        assert!(!link_stays_inside(Path::new("a/l"), "../x/../y"));
        let chain = zip_of(&[
            ("d", S_IFLNK | 0o777, b"."),
            ("up", S_IFLNK | 0o777, b"d/d/d/d/../../../../.."),
        ]);
        assert!(matches!(
            store.put(&chain),
            Err(ArtifactError::Entry { .. })
        ));
        // Layers keep their links when merged.
        let other = store.put(&zip_of(&[("lib/extra", 0o644, b"x")])).unwrap();
        let merged = store
            .merged_layers(&[stored.sha256_hex.clone(), other.sha256_hex.clone()])
            .unwrap()
            .unwrap();
        assert_eq!(fs::read(merged.join("lib64/extra")).unwrap(), b"x");
        assert!(
            fs::symlink_metadata(merged.join("lib/libfoo.so"))
                .unwrap()
                .is_symlink()
        );
    }

    #[test]
    fn a_repeated_name_is_refused() {
        let (_d, store) = store(ArchiveLimits::default());
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, data) in [("lib/a", b"1"), ("lib/b", b"2")] {
            w.start_file(name, SimpleFileOptions::default()).unwrap();
            w.write_all(data).unwrap();
        }
        let raw = w.finish().unwrap().into_inner();
        // Rename b to a in the local header and the central directory.
        let mut raw = raw;
        for i in 0..raw.len().saturating_sub(4) {
            if &raw[i..i + 5] == b"lib/b" {
                raw[i + 4] = b'a';
            }
        }
        match store.put(&raw) {
            Err(e @ ArtifactError::Entry { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("lib/a") && msg.contains("twice"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(repeated_name(&zip_of(&[("a", 0o644, b"1")])), None);
    }

    #[test]
    fn a_zip_bomb_stops_at_the_limit() {
        let limits = ArchiveLimits {
            max_unzipped: 1 << 20,
            ..ArchiveLimits::default()
        };
        let (_d, store) = store(limits);
        let zeros = vec![0u8; 4 << 20];
        let zip = zip_of(&[("bomb", 0o644, &zeros)]);
        assert!(zip.len() < 64 * 1024, "compresses well: {}", zip.len());
        assert!(matches!(
            store.put(&zip),
            Err(ArtifactError::UnzippedTooLarge { .. })
        ));
    }

    #[test]
    fn garbage_and_oversized_archives_are_refused() {
        let (_d, store) = store(ArchiveLimits {
            max_zipped: 100,
            ..ArchiveLimits::default()
        });
        assert!(matches!(
            store.put(b"not a zip"),
            Err(ArtifactError::NotZip(_))
        ));
        assert!(matches!(
            store.put(&[0u8; 101]),
            Err(ArtifactError::ZippedTooLarge { .. })
        ));
    }

    #[test]
    fn layers_merge_in_order_and_unused_archives_are_swept() {
        let (_d, store) = store(ArchiveLimits::default());
        let a = store
            .put(&zip_of(&[
                ("lib/a.txt", 0o644, b"a"),
                ("shared.txt", 0o644, b"from a"),
            ]))
            .unwrap();
        let b = store
            .put(&zip_of(&[
                ("lib/b.txt", 0o644, b"b"),
                ("shared.txt", 0o644, b"from b"),
            ]))
            .unwrap();
        let order = vec![a.sha256_hex.clone(), b.sha256_hex.clone()];
        let merged = store.merged_layers(&order).unwrap().unwrap();
        assert_eq!(fs::read(merged.join("lib/a.txt")).unwrap(), b"a");
        assert_eq!(fs::read(merged.join("lib/b.txt")).unwrap(), b"b");
        assert_eq!(fs::read(merged.join("shared.txt")).unwrap(), b"from b");
        assert_eq!(store.merged_layers(&order).unwrap().unwrap(), merged);
        assert_eq!(store.merged_layers(&[]).unwrap(), None);

        let keep: HashSet<String> = [a.sha256_hex.clone()].into();
        let removed = store.sweep(&keep, &[]).unwrap();
        assert_eq!(removed, 3, "b's archive, b's files, the merged dir");
        assert!(store.cache.join(&a.sha256_hex).is_dir());
        assert!(!store.cache.join(&b.sha256_hex).exists());
        assert!(!merged.exists());
        assert!(store.read_zip(&b.sha256_hex).is_err());
        assert_eq!(store.stats().unwrap().artifacts, 1);

        // Merging rebuilds the layers' trees the cache lost.
        remove_tree(&store.cache.join(&a.sha256_hex)).unwrap();
        let merged = store
            .merged_layers(std::slice::from_ref(&a.sha256_hex))
            .unwrap()
            .unwrap();
        assert_eq!(fs::read(merged.join("shared.txt")).unwrap(), b"from a");
    }

    #[test]
    fn trees_are_a_cache_of_the_sealed_archives() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(dir.path(), ArchiveLimits::default());
        let zip = zip_of(&[("function.wasm", 0o644, b"wasm bytes")]);
        let a = store.put(&zip).unwrap();
        let tree = store.ensure_dir(&a.sha256_hex).unwrap();
        assert_eq!(tree, dir.path().join("cache/code").join(&a.sha256_hex));
        // No plaintext archive or tree beside the sealed one.
        let code: Vec<_> = fs::read_dir(dir.path().join("code"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(code.len(), 2, "{code:?}");
        assert!(code.contains(&"blobs".to_owned()) && code.contains(&"chunks".to_owned()));

        // The cache goes with the server; the tree comes back on demand.
        drop(store);
        let store = open_in(dir.path(), ArchiveLimits::default());
        assert!(!tree.exists(), "the cache is emptied at open");
        assert_eq!(
            store.read_file(&a.sha256_hex, "function.wasm").unwrap(),
            b"wasm bytes"
        );
        assert!(tree.join("function.wasm").is_file());
        assert_eq!(store.put(&zip).unwrap(), a);
        assert!(matches!(
            store.ensure_dir("../../etc"),
            Err(ArtifactError::Sealed(SealError::Identity(_)))
        ));
    }

    #[test]
    fn a_tampered_archive_is_not_unpacked() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(dir.path(), ArchiveLimits::default());
        let a = store
            .put(&zip_of(&[("bootstrap", 0o755, b"#!/bin/sh")]))
            .unwrap();
        let blob = dir
            .path()
            .join("code/blobs/code")
            .join(format!("{}.blob", a.sha256_hex));
        let mut bytes = fs::read(&blob).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&blob, &bytes).unwrap();
        remove_tree(&store.cache.join(&a.sha256_hex)).unwrap();
        for result in [
            store.ensure_dir(&a.sha256_hex).map(|_| ()),
            store.read_zip(&a.sha256_hex).map(|_| ()),
        ] {
            match result {
                Err(e @ ArtifactError::Sealed(SealError::Tampered { .. })) => {
                    assert!(e.to_string().contains(&a.sha256_hex), "{e}");
                    assert!(!e.is_client_error());
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(!store.cache.join(&a.sha256_hex).exists());
    }

    #[test]
    fn rotation_keeps_archives_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(dir.path(), ArchiveLimits::default());
        let zip = zip_of(&[("index.js", 0o644, b"exports.handler = 1")]);
        let a = store.put(&zip).unwrap();
        let old = store.sealed().master_key_id();
        let report = store.rotate_master().unwrap();
        assert_eq!(report.blobs_rewrapped, 1);
        assert_eq!(report.old_key_id, old);
        assert_ne!(store.sealed().master_key_id(), old);
        drop(store);
        let store = open_in(dir.path(), ArchiveLimits::default());
        assert_eq!(store.read_zip(&a.sha256_hex).unwrap(), zip);
    }

    #[test]
    fn plaintext_archives_of_an_older_layout_are_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let code = dir.path().join("code");
        fs::create_dir_all(code.join("opt-x")).unwrap();
        let zip = zip_of(&[("a.txt", 0o644, b"a")]);
        let sha = hex(digest::digest(&digest::SHA256, &zip).as_ref());
        fs::write(code.join(format!("{sha}.zip")), &zip).unwrap();
        fs::create_dir(code.join(&sha)).unwrap();
        fs::write(code.join(&sha).join("a.txt"), b"a").unwrap();
        let store = open_in(dir.path(), ArchiveLimits::default());
        assert!(!code.join(format!("{sha}.zip")).exists());
        assert!(!code.join(&sha).exists());
        assert!(!code.join("opt-x").exists());
        assert_eq!(store.read_zip(&sha).unwrap(), zip);
        assert_eq!(store.read_file(&sha, "a.txt").unwrap(), b"a");
    }

    /// Twenty functions bundling the same 30 MB dependency (incompressible)
    /// beside a small file of their own: the dependency is stored once.
    #[test]
    fn a_shared_dependency_is_stored_once() {
        const DEP: usize = 30_000_000;
        const FUNCTIONS: usize = 20;
        let (_d, store) = store(ArchiveLimits::default());
        let mut dependency = vec![0u8; DEP];
        fastrand::Rng::with_seed(0x6b696c6e).fill(&mut dependency);
        let mut logical = 0;
        for i in 0..FUNCTIONS {
            let handler = format!("exports.handler = async () => {i};\n");
            let zip = stored_zip_of(&[
                ("node_modules/dep/index.bin", &dependency),
                ("index.js", handler.as_bytes()),
            ]);
            logical += zip.len() as u64;
            store.put(&zip).unwrap();
        }
        let stats = store.stats().unwrap();
        let ratio = stats.dedup_ratio();
        println!(
            "dedup: {} archives, logical {} bytes, stored {} bytes in {} chunks, ratio {ratio:.1}x",
            stats.artifacts, stats.logical_bytes, stats.stored_bytes, stats.chunks
        );
        assert_eq!(stats.artifacts, FUNCTIONS as u64);
        assert_eq!(stats.logical_bytes, logical);
        assert!(ratio > 15.0, "{stats:?}");
    }

    #[test]
    fn safe_relative_paths() {
        assert_eq!(safe_relative("a/./b"), Some(PathBuf::from("a/b")));
        assert_eq!(safe_relative("../a"), None);
        assert_eq!(safe_relative("/a"), None);
        assert_eq!(safe_relative("."), None);
        assert_eq!(safe_relative(""), None);
    }
}
