//! Code archives: validated, unpacked once per content hash, kept under the
//! data dir.
//!
//! Layout: `<root>/<sha256-hex>.zip` (the archive as uploaded) and
//! `<root>/<sha256-hex>/` (its files, read-only, shown to functions at
//! `/var/task`). Functions that upload the same bytes share both.
//!
//! Threat model: the archive is hostile. Unpacking refuses what a trusted
//! unzipper refuses — absolute paths, `..`, NUL bytes, backslashes,
//! symlinks, devices, duplicate names, encryption — and counts inflated
//! bytes while inflating, so a zip bomb stops at the limit with flat memory.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Cursor, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use aws_lc_rs::digest;
use base64::Engine as _;

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
}

impl ArtifactError {
    /// Whether the uploader caused the error (as opposed to the server).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, ArtifactError::Io(_))
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

/// The archive store under one directory.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
    limits: ArchiveLimits,
}

impl ArtifactStore {
    /// Opens (creating) the store at `root`, removing half-written leftovers
    /// of a previous run.
    pub fn open(root: impl Into<PathBuf>, limits: ArchiveLimits) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        for entry in fs::read_dir(&root)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                remove_tree(&entry.path())?;
            }
        }
        Ok(Self { root, limits })
    }

    /// The limits in force.
    pub fn limits(&self) -> ArchiveLimits {
        self.limits
    }

    /// Validates `zip`, unpacks it (unless the same bytes are already
    /// stored) and keeps the archive.
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

        let dir = self.dir(&sha256_hex);
        let zip_path = self.zip_path(&sha256_hex);
        let unzipped_size = if dir.is_dir() && zip_path.is_file() {
            // Same bytes as a stored archive: already validated and unpacked.
            tree_size(&dir)?
        } else {
            let tmp = self.root.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
            let unpacked = unpack(zip, &tmp, &self.limits);
            let unzipped = match unpacked {
                Ok(n) => n,
                Err(e) => {
                    let _ = remove_tree(&tmp);
                    return Err(e);
                }
            };
            write_file_atomically(&self.root, &zip_path, zip)?;
            match fs::rename(&tmp, &dir) {
                Ok(()) => {}
                // Another upload of the same bytes won the race.
                Err(_) if dir.is_dir() => remove_tree(&tmp)?,
                Err(e) => return Err(e.into()),
            }
            unzipped
        };
        Ok(StoredArchive {
            sha256_hex,
            sha256_base64,
            size,
            unzipped_size,
        })
    }

    /// The directory holding the unpacked files of an archive.
    pub fn dir(&self, sha256_hex: &str) -> PathBuf {
        self.root.join(sha256_hex)
    }

    /// The stored archive file.
    pub fn zip_path(&self, sha256_hex: &str) -> PathBuf {
        self.root.join(format!("{sha256_hex}.zip"))
    }

    /// Reads the archive as uploaded.
    pub fn read_zip(&self, sha256_hex: &str) -> io::Result<Vec<u8>> {
        fs::read(self.zip_path(sha256_hex))
    }

    /// Reads one unpacked file, `path` being relative to the archive root.
    pub fn read_file(&self, sha256_hex: &str, path: &str) -> Result<Vec<u8>, ArtifactError> {
        let rel = safe_relative(path).ok_or_else(|| ArtifactError::MissingFile(path.to_owned()))?;
        let full = self.dir(sha256_hex).join(rel);
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
    pub fn merged_layers(&self, layers: &[String]) -> io::Result<Option<PathBuf>> {
        if layers.is_empty() {
            return Ok(None);
        }
        let dir = self
            .root
            .join(format!("{MERGED_PREFIX}{}", merged_key(layers)));
        if dir.is_dir() {
            return Ok(Some(dir));
        }
        let tmp = self.root.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        fs::create_dir(&tmp)?;
        let built = layers
            .iter()
            .try_for_each(|sha| overlay(&self.dir(sha), &tmp));
        if let Err(e) = built {
            let _ = remove_tree(&tmp);
            return Err(e);
        }
        match fs::rename(&tmp, &dir) {
            Ok(()) => {}
            Err(_) if dir.is_dir() => remove_tree(&tmp)?,
            Err(e) => return Err(e),
        }
        Ok(Some(dir))
    }

    /// Removes every archive and merged directory not named in `keep`
    /// (hex SHA-256s of archives, and archive lists of merged layers).
    /// Callers serialize it with every write to the store.
    pub fn sweep(
        &self,
        keep_archives: &HashSet<String>,
        keep_merged: &[Vec<String>],
    ) -> io::Result<usize> {
        let merged: HashSet<String> = keep_merged
            .iter()
            .map(|l| format!("{MERGED_PREFIX}{}", merged_key(l)))
            .collect();
        let mut removed = 0;
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = if let Some(sha) = name.strip_suffix(".zip") {
                keep_archives.contains(sha)
            } else if name.starts_with(MERGED_PREFIX) {
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

    /// Deletes an archive and its files.
    pub fn remove(&self, sha256_hex: &str) -> io::Result<()> {
        match fs::remove_file(self.zip_path(sha256_hex)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        remove_tree(&self.dir(sha256_hex))
    }
}

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
            if target.exists() && !target.is_dir() {
                fs::remove_file(&target)?;
            }
            fs::create_dir_all(&target)?;
            overlay(&entry.path(), &target)?;
        } else if kind.is_file() {
            if target.is_dir() {
                remove_tree(&target)?;
            } else if target.exists() {
                fs::remove_file(&target)?;
            }
            if fs::hard_link(entry.path(), &target).is_err() {
                fs::copy(entry.path(), &target)?;
            }
        }
    }
    Ok(())
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
    fs::create_dir(dest)?;
    let mut seen = HashSet::new();
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
            0 | S_IFREG | S_IFDIR => {}
            S_IFLNK => return Err(refuse("symbolic links are not allowed")),
            _ => return Err(refuse("only regular files and directories are allowed")),
        }
        if !seen.insert(rel.clone()) {
            return Err(refuse("the name appears twice"));
        }
        let target = dest.join(&rel);
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

fn write_file_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

fn tree_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            tree_size(&entry.path())?
        } else {
            meta.len()
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

    fn store(limits: ArchiveLimits) -> (tempfile::TempDir, ArtifactStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path().join("code"), limits).unwrap();
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
        let mode = fs::metadata(store.dir(&a.sha256_hex).join("bin/bootstrap"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o555);
        assert_eq!(store.put(&zip).unwrap(), a, "same bytes, same artifact");
        assert!(matches!(
            store.read_file(&a.sha256_hex, "../x"),
            Err(ArtifactError::MissingFile(_))
        ));
        store.remove(&a.sha256_hex).unwrap();
        assert!(!store.dir(&a.sha256_hex).exists());
    }

    #[test]
    fn hostile_entries_are_refused_by_name() {
        let (_d, store) = store(ArchiveLimits::default());
        let cases: &[(&str, u32, &str)] = &[
            ("../evil", 0o644, "'..'"),
            ("a/../../evil", 0o644, "'..'"),
            ("/etc/passwd", 0o644, "absolute"),
            ("a\\b", 0o644, "backslash"),
            ("link", S_IFLNK | 0o777, "symbolic links"),
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
        let left: Vec<_> = fs::read_dir(&store.root).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
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
        assert_eq!(removed, 3, "b's zip, b's files, the merged dir");
        assert!(store.dir(&a.sha256_hex).is_dir());
        assert!(!store.dir(&b.sha256_hex).exists());
        assert!(!merged.exists());
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
