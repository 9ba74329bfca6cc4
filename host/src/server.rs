//! `kiln serve`: assembles the stores, the sandbox, the planes and the API
//! over one data dir, and serves until told to stop.
//!
//! Data dir layout (created mode 0700):
//! - `kiln.lock`   held (flock) while a server uses the dir: one server per dir;
//! - `kiln.db`     the metadata store (SQLite, WAL);
//! - `keys/`       the master key (`master.key`, 0600, unless
//!   `KILN_MASTER_KEY` is set) and the sealed convergence secret;
//! - `code/`       code and layer archives, sealed (encrypted, chunks
//!   deduplicated: `store::sealed`);
//! - `cache/`      a tmpfs private to the server's mount namespace (on the
//!   host's `/dev/shm` where it cannot mount one) for plaintext working
//!   copies: `code/` unpacked archives, `compiled/` verified compiled
//!   components for jails; nothing of it is on disk or outlives the server;
//! - `compiled/`   compiled components, each authenticated by an HMAC under
//!   a key sealed by the master key, loaded only when it verifies;
//! - `envs/`       per-environment directories, emptied at start: each
//!   environment's `/tmp` disk (`tmp.img`, mounted at `tmp/`) and its API
//!   socket;
//! - `runtime/`    the agent, the microVM image, empty `/tmp` file systems.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_wasm::{Runtime, RuntimeConfig};

use crate::api::{self, AppState};
use crate::auth::Authenticator;
use crate::auth::keys::{Credentials, RootKey};
use crate::auth::sigv4::VerifyConfig;
use crate::control::model::ArnContext;
use crate::control::{ControlConfig, ControlPlane};
use crate::invoke::{AsyncConfig, DataPlane, DataPlaneConfig, EnvironmentsDir};
use crate::sandbox::jail::{JailSandbox, install_agent};
use crate::sandbox::wasm::WasmSandbox;
use crate::sandbox::{Sandbox, SandboxKind, Sandboxes};
use crate::store::artifacts::{ArchiveLimits, ArtifactStore};
use crate::store::meta::MetaStore;
use crate::store::queue::{QueueError, QueueStore};
use crate::store::sealed::{MasterKey, SealError, SealedStore};

/// Everything `kiln serve` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address of the API.
    pub listen: SocketAddr,
    /// Where state lives.
    pub data_dir: PathBuf,
    /// Region in ARNs.
    pub region: String,
    /// Account in ARNs.
    pub account_id: String,
    /// Most execution environments at once.
    pub max_environments: u32,
    /// The account's concurrency limit (Lambda's default: 1000).
    pub account_concurrency: u32,
    /// An environment's maximum lifetime (Lambda's: about 14 hours).
    pub env_lease: Duration,
    /// Timing of asynchronous invocation.
    pub async_config: AsyncConfig,
    /// Where Wasm functions run.
    pub wasm_sandbox: WasmPlacement,
    /// Idle environments are torn down after this long.
    pub idle_timeout: Duration,
    /// Most log bytes per invocation.
    pub log_capacity: usize,
    /// The root key from `KILN_ROOT_ACCESS_KEY_ID` /
    /// `KILN_ROOT_SECRET_ACCESS_KEY`; without it, the data dir's (generated
    /// at first start).
    pub root_credentials: Option<(String, String)>,
    /// How far a request's signing time may be from the server's clock.
    pub max_clock_skew: Duration,
    /// How often the audit trail's new records get a signed digest.
    pub audit_digest_interval: Duration,
    /// How long and how much function log is kept.
    pub log_retention: crate::invoke::logstore::Retention,
    /// The microVM guest kernel (`vmlinux`); without one, no microVMs.
    pub guest_kernel: Option<PathBuf>,
    /// Function logs at rest, metrics and console activity; off only to
    /// measure their cost.
    pub telemetry: bool,
    /// Most API connections at once; by default half the open-files limit
    /// the server runs with.
    pub max_connections: Option<usize>,
    /// How long a request head may take to arrive (and a kept-alive
    /// connection may idle).
    pub header_timeout: Duration,
    /// MiB all environments together may reserve; by default 80 % of
    /// physical memory.
    pub memory_budget_mb: Option<u64>,
    /// Processes all jailed environments together may run; by default a
    /// quarter of the host's `pid_max`.
    pub max_pids: Option<u64>,
}

impl ServerConfig {
    /// Defaults: `127.0.0.1:9000`, `./.kiln`, `us-east-1`, account
    /// `000000000000`.
    pub fn new() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
            data_dir: PathBuf::from(".kiln"),
            region: "us-east-1".to_owned(),
            account_id: "000000000000".to_owned(),
            max_environments: 1000,
            account_concurrency: 1000,
            env_lease: Duration::from_secs(14 * 3600),
            async_config: AsyncConfig::default(),
            wasm_sandbox: WasmPlacement::InProcess,
            idle_timeout: Duration::from_secs(600),
            log_capacity: 1 << 20,
            root_credentials: None,
            max_clock_skew: Duration::from_secs(300),
            audit_digest_interval: Duration::from_secs(300),
            log_retention: Default::default(),
            guest_kernel: None,
            telemetry: true,
            max_connections: None,
            header_timeout: Duration::from_secs(10),
            memory_budget_mb: None,
            max_pids: None,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Where Wasm functions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmPlacement {
    /// wasmtime in the kiln process (fastest).
    InProcess,
    /// The agent's wasmtime inside a jail (defense in depth).
    Jail,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data dir could not be prepared.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Another server holds the data dir.
    #[error("data dir {0} is in use by another kiln server (it holds kiln.lock)")]
    Locked(PathBuf),
    /// A setting is out of range.
    #[error("{0}")]
    Config(String),
    /// The metadata store could not be opened.
    #[error(transparent)]
    Meta(#[from] crate::store::meta::MetaError),
    /// The event queue could not be opened.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The master key or the sealed archives could not be opened.
    #[error(transparent)]
    Sealed(#[from] SealError),
    /// Stored archives could not be opened.
    #[error(transparent)]
    Artifacts(#[from] crate::store::artifacts::ArtifactError),
    /// The Wasm engine could not be set up.
    #[error("Wasm engine: {0}")]
    Wasm(#[from] kiln_wasm::CompileError),
    /// Stored functions could not be loaded.
    #[error("loading functions: {0}")]
    Load(#[from] crate::control::ControlError),
    /// The requested sandbox cannot run here.
    #[error("{0}")]
    Sandbox(String),
    /// The listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
}

/// A started server.
pub struct Server {
    listener: tokio::net::TcpListener,
    _working: Option<TmpfsMount>,
    connections: crate::api::connections::ConnectionLimits,
    router: axum::Router,
    state: AppState,
    addr: SocketAddr,
    _lock: fs::File,
    functions: usize,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn data_dir_error(path: &Path) -> impl FnOnce(io::Error) -> StartError + '_ {
    move |source| StartError::DataDir {
        path: path.to_path_buf(),
        source,
    }
}

impl Server {
    /// Opens the data dir, loads the stored functions and binds the API.
    pub async fn start(config: ServerConfig) -> Result<Self, StartError> {
        if config.account_id.len() != 12 || !config.account_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(StartError::Config(format!(
                "the account id must be 12 digits, not {:?}",
                config.account_id
            )));
        }
        let mut config = config;
        let machine = crate::host_limits::HostLimits::from_machine();
        let limits = crate::host_limits::HostLimits {
            memory_budget_mb: config.memory_budget_mb.unwrap_or(machine.memory_budget_mb),
            max_pids: config.max_pids.unwrap_or(machine.max_pids),
        };
        let open_files = raise_open_files_limit();
        let mut connections = crate::api::connections::ConnectionLimits::for_open_files(open_files);
        connections.header_timeout = config.header_timeout;
        if let Some(max) = config.max_connections {
            connections.max_connections = max.max(1);
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .map_err(data_dir_error(&config.data_dir))?;
        // Jails and their agents are given absolute paths.
        config.data_dir = config
            .data_dir
            .canonicalize()
            .map_err(data_dir_error(&config.data_dir))?;
        let dir = &config.data_dir;
        let lock = lock_data_dir(dir)?;

        // Bound before the sandboxes exist: they hand its address to code.
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;

        let meta = Arc::new(MetaStore::open(&dir.join("kiln.db"))?);
        let sealed = SealedStore::open(dir.join("code"), dir.join("keys"), MasterKey::from_env()?)?;
        tracing::info!(key_id = %sealed.master_key_id(), "code archives sealed under master key");
        let compiled_key = sealed_key(&sealed, crate::store::artifacts::COMPILED_KEY_IDENTITY)?;
        // Plaintext working copies live where they vanish with the server or
        // the host; the cache is emptied by `open` too.
        let (working, working_mount) = working_copies(&dir.join("cache"), limits.memory_budget_mb)
            .map_err(data_dir_error(dir))?;
        let artifacts =
            ArtifactStore::open(sealed, working.join("code"), ArchiveLimits::default())?;
        let mut wasm_config = RuntimeConfig::new(dir.join("compiled"));
        wasm_config.max_environments = config.max_environments;
        wasm_config.artifact_key = Some(compiled_key);
        wasm_config.working_dir = Some(working.join("compiled"));
        let runtime = Arc::new(Runtime::new(wasm_config)?);
        let mut envs = EnvironmentsDir::open(dir.join("envs")).map_err(data_dir_error(dir))?;
        let scratch = tokio::task::spawn_blocking({
            let (templates, probe_dir) = (dir.join("runtime").join("scratch"), dir.join("envs"));
            move || crate::sandbox::scratch::Scratch::probe(templates, &probe_dir)
        })
        .await
        .map_err(|e| StartError::Config(e.to_string()))?;
        match scratch {
            Ok(scratch) => envs = envs.with_scratch(scratch),
            Err(why) => tracing::warn!(
                reason = %why,
                "environments' /tmp is a plain directory: EphemeralStorage is not enforced"
            ),
        }

        let arn = ArnContext {
            region: config.region.clone(),
            account_id: config.account_id.clone(),
        };
        let queue = Arc::new(QueueStore::open(&dir.join("kiln.db"))?);
        let sandboxes = sandboxes(&config, runtime, addr, limits).await?;
        let data = DataPlane::new(
            sandboxes,
            envs,
            queue,
            arn.clone(),
            DataPlaneConfig {
                max_environments: config.max_environments as usize,
                idle_timeout: config.idle_timeout,
                log_capacity: config.log_capacity,
                env_lease: config.env_lease,
                account_concurrency: config.account_concurrency,
                telemetry: config.telemetry,
                memory_budget_mb: limits.memory_budget_mb,
            },
        );
        data.start_reaper();
        if config.telemetry {
            data.set_log_store(
                crate::invoke::logstore::LogStore::open(dir.join("logs"), config.log_retention)
                    .map_err(data_dir_error(dir))?,
            );
        }
        let control_meta = meta.clone();
        let control = Arc::new(ControlPlane::new(
            meta,
            artifacts,
            data.clone(),
            ControlConfig {
                arn,
                account_concurrency: config.account_concurrency,
            },
        ));
        let functions = control.load_all().await?;
        // Events run only once every function is known again.
        data.start_event_dispatcher(config.async_config.clone());

        let keys_dir = dir.join("keys");
        let root = RootKey::load(&keys_dir, config.root_credentials.clone())
            .map_err(|e| StartError::Config(e.to_string()))?;
        tracing::info!(access_key_id = %root.access_key_id, "root credentials loaded");
        let credentials_key = credentials_key(control.artifacts().sealed())?;
        let credentials = Arc::new(Credentials::new(
            &config.account_id,
            root,
            control_meta,
            &credentials_key,
        ));
        credentials
            .ensure_default_role()
            .map_err(|e| StartError::Config(format!("the default execution role: {e}")))?;
        // Environments get their execution role's credentials from the
        // store that verifies them.
        data.set_credentials(credentials.clone());
        let auth = Arc::new(Authenticator::new(
            credentials,
            VerifyConfig {
                max_skew: config.max_clock_skew,
                ..VerifyConfig::lambda(&config.region)
            },
        ));

        let audit =
            crate::audit::AuditLog::open(&dir.join("audit"), &keys_dir.join("audit-signing.pk8"))
                .map_err(|e| StartError::Config(format!("the audit trail: {e}")))?;
        tracing::info!(
            key = %audit.key_fingerprint(),
            "audit trail open; digests are signed with this key (check with `kiln audit verify`)"
        );
        let audit = Arc::new(audit);
        start_digests(audit.clone(), config.audit_digest_interval);
        let state = AppState {
            control,
            data,
            auth,
            audit,
            console: Default::default(),
        };
        let router = api::router(state.clone());
        Ok(Self {
            listener,
            _working: working_mount,
            connections,
            router,
            state,
            addr,
            _lock: lock,
            functions,
        })
    }

    /// The address the API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The planes behind the API, for embedders and benchmarks that call
    /// them without HTTP.
    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// The root key, when this start generated it (to be shown once).
    pub fn generated_root(&self) -> Option<(&Path, &str, &str)> {
        let root = self.state.auth.credentials().root();
        root.generated
            .as_deref()
            .map(|path| (path, root.access_key_id.as_str(), root.secret().expose()))
    }

    /// How many functions were loaded from the data dir.
    pub fn functions_loaded(&self) -> usize {
        self.functions
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let served =
            crate::api::connections::serve(self.listener, self.router, self.connections, shutdown)
                .await;
        // The trail's last records get their signed digest at shutdown.
        let audit = self.state.audit.clone();
        match tokio::task::spawn_blocking(move || audit.write_digest()).await {
            Ok(Ok(Some(seq))) => tracing::info!(digest = seq, "audit digest written at shutdown"),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "writing the audit digest at shutdown"),
            Err(e) => tracing::error!(error = %e, "writing the audit digest at shutdown"),
        }
        served
    }
}

/// The sandboxes this host runs: microVMs when a guest boots here, else the
/// jail when its probe passes (it runs
/// native runtimes, and Wasm when asked to), wasmtime in-process for Wasm.
async fn sandboxes(
    config: &ServerConfig,
    runtime: Arc<Runtime>,
    api: SocketAddr,
    limits: crate::host_limits::HostLimits,
) -> Result<Sandboxes, StartError> {
    let dir = &config.data_dir;
    let relay = crate::sandbox::relay::Relay::new(api);
    let group = crate::sandbox::cgroup::group_for(dir);
    let removed = tokio::task::spawn_blocking({
        let group = group.clone();
        move || crate::sandbox::cgroup::remove_leftovers(&group)
    })
    .await
    .unwrap_or(0);
    if removed > 0 {
        tracing::info!(
            cgroups = removed,
            "removed cgroups left by an earlier server"
        );
    }
    // The parent of every environment's cgroup: its limits bound them all.
    let server_cgroup = tokio::task::spawn_blocking({
        let group = group.clone();
        move || {
            crate::sandbox::cgroup::ServerCgroup::create(
                &group,
                limits.memory_budget_mb.saturating_mul(1 << 20),
                limits.max_pids,
            )
        }
    })
    .await
    .map_err(|e| StartError::Sandbox(e.to_string()))?;
    let server_cgroup = match server_cgroup {
        Ok(c) => {
            tracing::info!(
                cgroup = c.name(),
                memory_budget_mb = limits.memory_budget_mb,
                max_pids = limits.max_pids,
                "environments share one parent cgroup"
            );
            Some(Arc::new(c))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no parent cgroup for environments");
            None
        }
    };
    let parent_cgroup: Result<(), String> = server_cgroup.as_ref().map(drop).ok_or_else(|| {
        "no parent cgroup to bound the environments together (see the server's log)".to_owned()
    });
    // Host uids no other kiln server on this host uses.
    let uids = crate::sandbox::uids::UidBlock::acquire(Path::new(UID_REGISTRY))
        .map(Arc::new)
        .map_err(|e| format!("taking a block of host uids in {UID_REGISTRY}: {e}"));
    let jail: Result<Arc<JailSandbox>, String> = async {
        parent_cgroup.clone()?;
        let uids = uids.clone()?;
        let agent = install_agent(&dir.join("runtime"))
            .map_err(|e| format!("installing the agent: {e}"))?;
        let jail = JailSandbox::new(agent, runtime.clone(), group.clone(), uids)
            .map_err(|e| e.to_string())?
            .with_relay(relay);
        let scratch = dir
            .join("envs")
            .join(format!("probe-{}", uuid::Uuid::new_v4().simple()));
        let probed = jail.probe(&scratch).await;
        let _ = crate::store::artifacts::remove_tree(&scratch);
        probed.map(|()| Arc::new(jail))
    }
    .await;
    match &jail {
        Ok(_) => tracing::info!("jail sandbox available: native runtimes run in jails"),
        Err(why) => {
            tracing::warn!(reason = %why, "jail sandbox unavailable: native runtimes cannot run on this host")
        }
    }
    let microvm = match (uids, parent_cgroup) {
        (Ok(uids), Ok(())) => microvm_sandbox(config, runtime.clone(), group, uids).await,
        (Err(why), _) | (_, Err(why)) => Err(why),
    };
    let fallback = if jail.is_ok() { "jail" } else { "none" };
    match &microvm {
        Ok(_) => tracing::info!("microvm sandbox available: functions run in microVMs"),
        Err(why) => tracing::warn!(
            reason = %why,
            fallback,
            "microvm sandbox unavailable: native functions fall back to the jail, Wasm to wasmtime in-process"
        ),
    }
    let wasm: Arc<dyn Sandbox> = match (config.wasm_sandbox, &jail, &microvm) {
        (WasmPlacement::InProcess, _, Ok(vm)) => vm.clone(),
        (WasmPlacement::InProcess, _, Err(_)) => Arc::new(WasmSandbox::new(
            runtime,
            Some(crate::sandbox::relay::loopback(api)),
        )),
        (WasmPlacement::Jail, Ok(j), _) => j.clone(),
        (WasmPlacement::Jail, Err(why), _) => {
            return Err(StartError::Sandbox(format!(
                "--wasm-sandbox jail: the jail sandbox cannot run here: {why}"
            )));
        }
    };
    let availability = vec![
        (SandboxKind::Wasm, Ok(())),
        (
            SandboxKind::Jail,
            jail.as_ref().map(|_| ()).map_err(Clone::clone),
        ),
        (
            SandboxKind::MicroVm,
            microvm.as_ref().map(|_| ()).map_err(Clone::clone),
        ),
    ];
    let native = match microvm {
        Ok(vm) => Ok(vm as Arc<dyn Sandbox>),
        Err(_) => jail.map(|j| j as Arc<dyn Sandbox>),
    };
    Ok(Sandboxes {
        wasm,
        native,
        availability,
        limits,
        server_cgroup,
    })
}

/// The microVM sandbox, when a guest kernel is configured and the real
/// guest image boots to its agent here.
async fn microvm_sandbox(
    config: &ServerConfig,
    runtime: Arc<Runtime>,
    group: String,
    uids: Arc<crate::sandbox::uids::UidBlock>,
) -> Result<Arc<dyn Sandbox>, String> {
    use crate::sandbox::microvm::{MicroVmSandbox, try_boot};
    let kernel = config.guest_kernel.as_deref().ok_or_else(|| {
        "no guest kernel: build one with scripts/build-kernel.sh and pass --guest-kernel \
         (or set KILN_GUEST_KERNEL)"
            .to_owned()
    })?;
    let (image, booted) = try_boot(&config.data_dir.join("runtime"), kernel).await?;
    tracing::info!(
        boot_ms = booted.as_millis() as u64,
        "a microVM booted to its agent"
    );
    let sandbox = MicroVmSandbox::new(image, runtime, group, uids).map_err(|e| e.to_string())?;
    Ok(Arc::new(sandbox))
}

/// Where kiln servers on this host register the uid blocks they hold.
pub const UID_REGISTRY: &str = "/run/kiln/uids";

/// Moves this process into a mount namespace of its own, whose mounts
/// (environments' `/tmp` disks, the code cache) vanish with it however it
/// ends; mounts made on the host still reach it. Must run before any thread
/// is started: a mount namespace is per thread until then. Needs root.
pub fn private_mount_namespace() -> io::Result<()> {
    // SAFETY: unshare and mount with constant arguments; the process is
    // single-threaded (the caller's contract).
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit (a server's
/// connections, environments and logs all need descriptors; the soft limit
/// a shell hands down is often 1,024) and returns the limit now in force.
fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Takes an exclusive lock on the data dir for the life of the server.
fn lock_data_dir(dir: &Path) -> Result<fs::File, StartError> {
    let path = dir.join("kiln.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(data_dir_error(dir))?;
    // SAFETY: flock on a file descriptor we own and keep open; it has no
    // memory-safety preconditions.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Err(StartError::Locked(dir.to_path_buf()))
        } else {
            Err(StartError::DataDir {
                path: path.clone(),
                source: err,
            })
        };
    }
    Ok(file)
}

/// The key that protects stored access-key secrets and session tokens: 32
/// random bytes made at first start, kept sealed under the master key (so a
/// master-key rotation re-wraps it with the code archives).
fn credentials_key(sealed: &crate::store::sealed::SealedStore) -> Result<[u8; 32], StartError> {
    sealed_key(sealed, crate::store::artifacts::CREDENTIALS_KEY_IDENTITY)
}

/// A 32-byte key kept sealed under the master key as `identity`, made at
/// first start (so a master-key rotation re-wraps it with the archives).
fn sealed_key(
    sealed: &crate::store::sealed::SealedStore,
    identity: &str,
) -> Result<[u8; 32], StartError> {
    if sealed.contains(identity) {
        return sealed
            .get(identity)?
            .try_into()
            .map_err(|_| StartError::Config(format!("the sealed key {identity} is not 32 bytes")));
    }
    let mut key = [0u8; 32];
    aws_lc_rs::rand::fill(&mut key)
        .map_err(|_| StartError::Config("the system RNG failed".to_owned()))?;
    sealed.put(identity, &key)?;
    Ok(key)
}

/// The directory for plaintext working copies (unpacked code, verified
/// compiled components): a tmpfs mounted at `dir`, private to the server's
/// mount namespace, so that nothing of it is on disk or outlives the
/// server; where it cannot be mounted (not root), a directory under the
/// host's own tmpfs `/dev/shm`, which at least vanishes with the host.
/// Sized at a quarter of physical memory (it takes only what it holds).
fn working_copies(dir: &Path, budget_mb: u64) -> io::Result<(PathBuf, Option<TmpfsMount>)> {
    fs::create_dir_all(dir)?;
    // One left by a server of this data dir that ran in the host's mount
    // namespace (embedded, say) and died.
    let _ = TmpfsMount(dir.to_path_buf());
    let size_mb = crate::host_limits::physical_memory_mb()
        .map_or(budget_mb / 4, |m| m / 4)
        .max(256);
    let (target, options) = (
        std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::other("a path with a NUL byte"))?,
        std::ffi::CString::new(format!("size={size_mb}m,mode=0700"))
            .map_err(|_| io::Error::other("mount options"))?,
    );
    // SAFETY: NUL-terminated strings that outlive the call.
    let mounted = unsafe {
        libc::mount(
            c"kiln-cache".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    } == 0;
    if mounted {
        return Ok((dir.to_path_buf(), Some(TmpfsMount(dir.to_path_buf()))));
    }
    let error = io::Error::last_os_error();
    let fallback =
        PathBuf::from("/dev/shm").join(format!("kiln-{}", crate::sandbox::cgroup::group_for(dir)));
    tracing::warn!(
        error = %error,
        fallback = %fallback.display(),
        "no private tmpfs for working copies: using the host's /dev/shm"
    );
    // A name anyone could have made first: it must be ours, private and
    // not a link.
    match fs::DirBuilder::new().mode(0o700).create(&fallback) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::symlink_metadata(&fallback)?;
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no arguments.
        let me = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
            return Err(io::Error::other(format!(
                "{} is not a private directory of this user",
                fallback.display()
            )));
        }
    }
    Ok((fallback, None))
}

/// A tmpfs of the server's, unmounted when dropped (it goes with the
/// server's mount namespace anyway; this covers a server embedded in a
/// process that keeps the host's).
#[derive(Debug)]
struct TmpfsMount(PathBuf);

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        if let Ok(target) = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()) {
            // SAFETY: a NUL-terminated path; unmounting what is not mounted
            // fails harmlessly.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Signs a digest of the trail's new records every `interval`.
fn start_digests(audit: Arc<crate::audit::AuditLog>, interval: Duration) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let audit = audit.clone();
            match tokio::task::spawn_blocking(move || audit.write_digest()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "writing an audit digest"),
                Err(e) => tracing::error!(error = %e, "writing an audit digest"),
            }
        }
    });
}
