//! Execution environments as the data plane holds them: each with its
//! scratch directory and its share of the capacity, warm ones in a per-slot
//! idle list.
//!
//! Lifecycle: created (cold start) -> busy (owned by one invocation) ->
//! idle (in [`IdleEnvironments`]) -> busy -> ... -> dropped (failed, idle too
//! long, evicted for capacity, or its function changed). Dropping releases
//! the sandbox's resources, the capacity permit and the directory.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::sandbox::{ExecutionEnvironment, InvocationReport, InvocationRequest};

/// Where environments keep their scratch space: `<root>/<env-id>/tmp`, a
/// disk of its own where the host can mount one (see `sandbox::scratch`).
/// Making a disk takes milliseconds, so a few directories with a disk of
/// the default EphemeralStorage are kept ready (a cold start takes one, a
/// thread makes the next).
#[derive(Debug, Clone)]
pub struct EnvironmentsDir {
    root: PathBuf,
    scratch: Option<crate::sandbox::scratch::Scratch>,
    ready: Option<Arc<ReadyDirs>>,
}

/// Environment directories made ahead with a disk of [`READY_MB`].
#[derive(Debug, Default)]
struct ReadyDirs {
    dirs: Mutex<Vec<EnvironmentDir>>,
    wanted: std::sync::Condvar,
}

/// The size of the disks made ahead: Lambda's default EphemeralStorage.
const READY_MB: u32 = 512;
/// How many are kept ready.
const READY_DIRS: usize = 8;

impl EnvironmentsDir {
    /// Opens `root`, removing what environments of an earlier process left
    /// behind (a killed server never ran their teardown), their mounts
    /// first.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        let root = root.canonicalize()?;
        unmount_under(&root);
        for entry in fs::read_dir(&root)? {
            let path = entry?.path();
            tracing::info!(path = %path.display(), "removing a leftover environment directory");
            crate::store::artifacts::remove_tree(&path)?;
        }
        Ok(Self {
            root,
            scratch: None,
            ready: None,
        })
    }

    /// Gives every new environment a `/tmp` disk of its EphemeralStorage,
    /// and starts the thread that keeps directories with a disk of the
    /// default size ready.
    pub fn with_scratch(mut self, scratch: crate::sandbox::scratch::Scratch) -> Self {
        self.scratch = Some(scratch);
        let ready = Arc::new(ReadyDirs::default());
        let maker = self.clone();
        let weak = Arc::downgrade(&ready);
        let started = std::thread::Builder::new()
            .name("kiln-scratch".into())
            .spawn(move || keep_ready(&maker, &weak));
        match started {
            Ok(_) => self.ready = Some(ready),
            Err(e) => tracing::warn!(error = %e, "no thread to make environment disks ahead"),
        }
        self
    }

    /// Whether environments get a `/tmp` disk of their own (else a plain
    /// directory, without a size limit).
    pub fn has_scratch_disks(&self) -> bool {
        self.scratch.is_some()
    }

    /// Creates the directory of a new environment, with a `/tmp` of
    /// `tmp_mb` MiB.
    pub fn create(&self, tmp_mb: u32) -> io::Result<EnvironmentDir> {
        if tmp_mb == READY_MB
            && let Some(ready) = &self.ready
        {
            let taken = ready.dirs.lock().unwrap_or_else(|p| p.into_inner()).pop();
            ready.wanted.notify_one();
            if let Some(dir) = taken {
                return Ok(dir);
            }
        }
        self.make(tmp_mb)
    }

    fn make(&self, tmp_mb: u32) -> io::Result<EnvironmentDir> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let path = self.root.join(&id);
        fs::create_dir_all(path.join("tmp"))?;
        let mut dir = EnvironmentDir {
            id,
            path,
            disk: None,
        };
        if let Some(scratch) = &self.scratch {
            dir.disk = Some(scratch.mount(&dir.path, tmp_mb)?);
        }
        Ok(dir)
    }
}

/// The ready-directory maker's loop: tops the pool up to [`READY_DIRS`]
/// whenever one is taken; ends when the pool's owner is gone.
fn keep_ready(maker: &EnvironmentsDir, ready: &std::sync::Weak<ReadyDirs>) {
    loop {
        let Some(pool) = ready.upgrade() else { return };
        let short = {
            let dirs = pool.dirs.lock().unwrap_or_else(|p| p.into_inner());
            let dirs = pool
                .wanted
                .wait_timeout_while(dirs, Duration::from_secs(1), |d| d.len() >= READY_DIRS)
                .map_or_else(|p| p.into_inner().0, |(d, _)| d);
            dirs.len() < READY_DIRS
        };
        if !short {
            continue;
        }
        match maker.make(READY_MB) {
            Ok(dir) => pool
                .dirs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(dir),
            Err(e) => {
                tracing::warn!(error = %e, "making an environment disk ahead");
                drop(pool);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Unmounts whatever is mounted under `root` (left by a server of this
/// data dir that died in the host's mount namespace).
fn unmount_under(root: &std::path::Path) {
    let Ok(table) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = format!("{}/", root.display());
    // Deepest first.
    let mut points: Vec<&str> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        if let Ok(c) = std::ffi::CString::new(point) {
            tracing::info!(mount = point, "unmounting a leftover environment mount");
            // SAFETY: a NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// One environment's directory, removed when dropped (its disk unmounted
/// first).
#[derive(Debug)]
pub struct EnvironmentDir {
    id: String,
    path: PathBuf,
    disk: Option<crate::sandbox::scratch::ScratchDisk>,
}

impl EnvironmentDir {
    /// The environment's id (32 hex digits).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its `/tmp`.
    pub fn tmp(&self) -> PathBuf {
        self.path.join("tmp")
    }

    /// The directory itself.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for EnvironmentDir {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.path);
        let disk = self.disk.take();
        let remove = move || {
            drop(disk);
            if let Err(e) = crate::store::artifacts::remove_tree(&path) {
                tracing::warn!(path = %path.display(), error = %e, "removing an environment directory");
            }
        };
        // /tmp may be large: keep the removal off the async workers.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(remove);
            }
            Err(_) => remove(),
        }
    }
}

/// Counts the environments of one provisioned concurrency config: those
/// that exist (initializing included: the maintainer's count) and those
/// ready for invocations (the status's count), and wakes its maintainer
/// when one goes away.
#[derive(Debug, Default)]
pub(super) struct ProvisionedCount {
    live: AtomicUsize,
    ready: AtomicUsize,
    pub(super) changed: Notify,
}

impl ProvisionedCount {
    pub(super) fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Environments initialized and waiting for (or serving) invocations.
    pub(super) fn ready(&self) -> usize {
        self.ready.load(Ordering::Acquire)
    }
}

/// Held by a provisioned environment: counts it while it lives, and as
/// ready once its init has succeeded.
#[derive(Debug)]
pub(super) struct ProvisionedLease {
    count: Arc<ProvisionedCount>,
    ready: bool,
}

impl ProvisionedLease {
    pub(super) fn new(count: Arc<ProvisionedCount>) -> Self {
        count.live.fetch_add(1, Ordering::AcqRel);
        Self {
            count,
            ready: false,
        }
    }

    fn set_ready(&mut self) {
        if !self.ready {
            self.ready = true;
            self.count.ready.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for ProvisionedLease {
    fn drop(&mut self) {
        if self.ready {
            self.count.ready.fetch_sub(1, Ordering::AcqRel);
        }
        self.count.live.fetch_sub(1, Ordering::AcqRel);
        self.count.changed.notify_one();
    }
}

/// A live environment with what it holds.
pub struct Environment {
    // Field order is drop order: the sandbox environment goes first, then its
    // directory, its capacity permit, and last its provisioned lease (so the
    // maintainer that replaces it finds the capacity free).
    env: Box<dyn ExecutionEnvironment>,
    _dir: EnvironmentDir,
    pub(super) _reservation: super::Reservation,
    lease: Option<ProvisionedLease>,
    created: Instant,
    /// Its log stream's name.
    stream: String,
}

impl Environment {
    pub(super) fn new(
        env: Box<dyn ExecutionEnvironment>,
        dir: EnvironmentDir,
        reservation: super::Reservation,
        lease: Option<ProvisionedLease>,
        stream: String,
    ) -> Self {
        Self {
            env,
            _dir: dir,
            _reservation: reservation,
            lease,
            created: Instant::now(),
            stream,
        }
    }

    /// The name of the log stream its invocations write to.
    pub(super) fn log_stream(&self) -> &str {
        &self.stream
    }

    /// Whether the environment has lived longer than `max_lifetime` and
    /// must take no further invocation.
    pub(super) fn is_expired(&self, max_lifetime: Duration) -> bool {
        self.created.elapsed() >= max_lifetime
    }

    /// Whether the environment belongs to a provisioned concurrency config.
    pub(super) fn is_provisioned(&self) -> bool {
        self.lease.is_some()
    }

    /// Counts a provisioned environment as ready (its init succeeded and it
    /// is about to join its pool).
    pub(super) fn set_provisioned_ready(&mut self) {
        if let Some(lease) = &mut self.lease {
            lease.set_ready();
        }
    }

    pub(super) async fn invoke(&mut self, request: &InvocationRequest) -> InvocationReport {
        self.env.invoke(request).await
    }

    pub(super) fn is_reusable(&self) -> bool {
        self.env.is_reusable()
    }
}

/// Warm environments of one function version, most recently used last.
#[derive(Default)]
pub(super) struct IdleEnvironments {
    envs: Mutex<Vec<(Environment, Instant)>>,
}

impl IdleEnvironments {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Environment, Instant)>> {
        self.envs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used environment (its caches are the warmest).
    pub(super) fn pop(&self) -> Option<Environment> {
        self.lock().pop().map(|(e, _)| e)
    }

    pub(super) fn push(&self, env: Environment) {
        self.lock().push((env, Instant::now()));
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// MiB of the memory budget these environments hold.
    pub(super) fn reserved_mb(&self) -> u64 {
        self.lock()
            .iter()
            .map(|(e, _)| e._reservation.memory_mb())
            .sum()
    }

    /// When the longest-idle environment became idle.
    pub(super) fn oldest_idle_since(&self) -> Option<Instant> {
        self.lock().first().map(|(_, t)| *t)
    }

    /// Takes the longest-idle environment (to drop it).
    pub(super) fn pop_oldest(&self) -> Option<Environment> {
        let mut envs = self.lock();
        (!envs.is_empty()).then(|| envs.remove(0).0)
    }

    /// Drops the environments `expired` says are done (given each one and
    /// when it became idle); returns how many.
    pub(super) fn remove_where(&self, expired: impl Fn(&Environment, Instant) -> bool) -> usize {
        let removed: Vec<Environment> = {
            let mut envs = self.lock();
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *envs)
                .into_iter()
                .partition(|(e, t)| expired(e, *t));
            *envs = kept;
            gone.into_iter().map(|(e, _)| e).collect()
        };
        // Dropped outside the lock.
        removed.len()
    }

    pub(super) fn clear(&self) {
        let all: Vec<_> = std::mem::take(&mut *self.lock());
        drop(all);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn leftover_directories_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("envs");
        fs::create_dir_all(root.join("stale/tmp")).unwrap();
        fs::write(root.join("stale/tmp/file"), b"x").unwrap();
        let envs = EnvironmentsDir::open(&root).unwrap();
        assert!(!root.join("stale").exists());
        let d = envs.create(512).unwrap();
        let tmp = d.tmp();
        assert!(tmp.is_dir());
        assert_eq!(d.id().len(), 32);
        drop(d);
        assert!(!tmp.exists());
        assert!(Path::new(&root).is_dir());
    }
}
