//! The `jail` sandbox: each environment is the kiln agent in its own
//! namespaces, root, cgroup, unprivileged uid and seccomp filter (built by
//! the agent itself, see `runtimes/init/src/jail.rs`), speaking
//! `runtimes/proto` with this host over a Unix socket. It runs native
//! `bootstrap`s behind the Lambda Runtime API, and Wasm components with the
//! agent's own wasmtime.
//!
//! Lifecycle of one environment, in order: a cgroup, a socket pair, the
//! agent started as root with the socket as descriptor 3 (from a dedicated
//! spawner thread, so that its parent-death signal ties it to the server's
//! life rather than to a worker thread's); `Hello`, `Configure`; init;
//! invocations; on drop, every process of the cgroup killed, the agent
//! reaped, the cgroup removed. Mounts die with the environment's mount
//! namespace; its directory is removed by the data plane.
//!
//! Threat model: the agent and everything in the jail may be hostile once
//! the function runs. The host bounds every frame it reads (the protocol
//! validates), bounds every wait by the invocation's deadline, and kills the
//! whole cgroup on any doubt.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use kiln_proto::asynchronous::{read_message, write_message};
use kiln_proto::{AgentMessage, Config, HostMessage, Invocation, JailSpec, Mode, PROTOCOL_VERSION};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::cgroup::EnvCgroup;
use super::{
    CodeSpec, EnvironmentSpec, ExecutionEnvironment, InitReport, InvocationReport,
    InvocationRequest, Outcome, PreparedCode, Sandbox, SandboxError, SandboxKind,
};
use crate::control::runtimes::{self, Family};

/// The agent, built for musl and embedded at build time (see `build.rs`).
pub static AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kiln-agent"));

/// Extra memory a Wasm environment's cgroup allows for the agent's engine
/// on top of the function's MemorySize (the component itself is held to
/// MemorySize by wasmtime).
const WASM_ENGINE_OVERHEAD: u64 = 96 << 20;
/// How long past an invocation's deadline the host waits for the agent to
/// report the timeout itself (with the function's output) before it gives
/// up on the environment.
const AGENT_GRACE: Duration = Duration::from_secs(2);
/// Host uids (and gids) functions run as, from the server's block; each
/// environment gets its own.
/// The part of the server's uid block that jails' functions run as (the
/// rest is the VMM processes').
pub(crate) const JAIL_UIDS: u32 = 60_000;

/// Writes the embedded agent to `dir` (once per content) and returns its
/// path.
pub fn install_agent(dir: &Path) -> std::io::Result<PathBuf> {
    install_once(
        dir,
        &format!("kiln-agent-{}", agent_digest()),
        0o755,
        || AGENT.to_vec(),
    )
}

/// The first 16 hex digits of the agent's SHA-256, computed once: what the
/// installed agent and the guest image built from it are named by.
pub(crate) fn agent_digest() -> &'static str {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST.get_or_init(|| {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, AGENT);
        crate::store::artifacts::hex(digest.as_ref())[..16].to_owned()
    })
}

/// Writes `dir/name` with `mode` unless it is there already (the name says
/// what it holds), through a temporary file and a rename so that no reader
/// sees half of it. `contents` runs only when the file is written.
pub(crate) fn install_once(
    dir: &Path,
    name: &str,
    mode: u32,
    contents: impl FnOnce() -> Vec<u8>,
) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    if !path.is_file() {
        let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
        std::fs::write(&tmp, contents())?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

/// Puts `fd` at descriptor 3 of the child `command` starts (its channel),
/// closes every other descriptor above 2 (the server's own, and whatever
/// the server inherited: none of it is the environment's), and ties the
/// child's life to the thread that spawns it. Public for the VMM's
/// end-to-end tests, which start `kiln vmm` as the server does.
pub fn channel_on_fd3(command: &mut Command, fd: std::os::fd::RawFd) {
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe calls (dup2, fcntl, close_range/close, prctl) on
    // integers.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            let flags = libc::fcntl(3, libc::F_GETFD);
            libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            cloexec_from(4);
            // Dies with the server.
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
}

/// `close_range`'s flag that marks descriptors close-on-exec instead of
/// closing them.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Makes every descriptor from `first` up close on exec, between fork and
/// exec (only async-signal-safe calls). Marked rather than closed: the
/// standard library's own error pipe, which reports a failed exec to the
/// parent, must live until the exec.
pub(crate) fn cloexec_from(first: libc::c_uint) {
    // SAFETY: close_range takes integers and changes only this process's
    // descriptor flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == -1 {
        // Kernels before 5.11: one by one, up to the limit.
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            limit.rlim_cur.min(1 << 20) as libc::c_int
        } else {
            4096
        };
        for fd in first as libc::c_int..max {
            // SAFETY: fcntl on a descriptor number; an unused one fails
            // harmlessly with EBADF.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

type SpawnReply = std::io::Result<Child>;

/// Starts agents from one long-lived thread: a child's parent-death signal
/// fires when the thread that forked it ends.
pub(crate) struct Spawner {
    requests: std::sync::Mutex<mpsc::Sender<(Command, mpsc::Sender<SpawnReply>)>>,
}

impl Spawner {
    pub(crate) fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<(Command, mpsc::Sender<SpawnReply>)>();
        std::thread::Builder::new()
            .name("kiln-spawner".into())
            .spawn(move || {
                while let Ok((mut command, reply)) = rx.recv() {
                    let _ = reply.send(command.spawn());
                }
            })?;
        Ok(Self {
            requests: std::sync::Mutex::new(tx),
        })
    }

    pub(crate) async fn spawn(&self, command: Command) -> std::io::Result<Child> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((command, tx))
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
        tokio::task::spawn_blocking(move || rx.recv())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
    }
}

/// The jail sandbox.
pub struct JailSandbox {
    agent: PathBuf,
    wasm: Arc<kiln_wasm::Runtime>,
    spawner: Spawner,
    uids: Arc<super::uids::UidBlock>,
    cgroup_group: String,
    /// The way back to kiln's API: a socket per environment, mounted into
    /// its jail (see `sandbox::relay`).
    relay: Option<super::relay::Relay>,
}

impl std::fmt::Debug for JailSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JailSandbox")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

/// What a jailed environment runs.
enum JailCode {
    Native,
    Wasm {
        component: String,
        precompiled: Option<PathBuf>,
    },
}

impl JailSandbox {
    /// A sandbox running `agent`; Wasm code is compiled (and validated) on
    /// the host by `wasm`, whose compiled files environments then share.
    ///
    /// Its cgroups live under `kiln/<cgroup_group>/`.
    pub fn new(
        agent: PathBuf,
        wasm: Arc<kiln_wasm::Runtime>,
        cgroup_group: String,
        uids: Arc<super::uids::UidBlock>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            agent,
            cgroup_group,
            wasm,
            spawner: Spawner::start()?,
            uids,
            relay: None,
        })
    }

    /// Lets functions in jails reach kiln's API through `relay`.
    pub fn with_relay(mut self, relay: super::relay::Relay) -> Self {
        self.relay = Some(relay);
        self
    }

    /// Builds a throwaway jail around a function with no bootstrap: success
    /// is the agent reporting exactly that, from inside a finished jail.
    pub async fn probe(&self, scratch: &Path) -> Result<(), String> {
        let task = scratch.join("probe-task");
        std::fs::create_dir_all(&task).map_err(|e| format!("probe directory: {e}"))?;
        let spec = EnvironmentSpec {
            memory_mb: 128,
            env: Vec::new(),
            task_dir: task,
            opt_dir: None,
            tmp_dir: scratch.join("probe-tmp"),
            tmp_is_disk: false,
            env_dir: scratch.to_path_buf(),
            ephemeral_mb: 16,
            log_capacity: 4096,
        };
        let code = PreparedCode::new(SandboxKind::Jail, JailCode::Native);
        let mut env = self.create(&code, spec).await.map_err(|e| e.to_string())?;
        let init = env.init(Duration::from_secs(10)).await;
        match init.error {
            Some(Outcome::Failed { error_type, .. })
                if error_type == "Runtime.InvalidEntrypoint" =>
            {
                Ok(())
            }
            Some(Outcome::Failed { message, .. }) => Err(message),
            other => Err(format!("unexpected probe result: {other:?}")),
        }
    }
}

#[async_trait]
impl Sandbox for JailSandbox {
    fn kind(&self) -> SandboxKind {
        SandboxKind::Jail
    }

    fn kiln_endpoint(&self) -> Option<String> {
        self.relay
            .as_ref()
            .map(|_| format!("http://{}", kiln_proto::API_RELAY))
    }

    async fn prepare(&self, code: &CodeSpec) -> Result<PreparedCode, SandboxError> {
        let family = runtimes::lookup(&code.runtime).map(|r| r.family);
        match family {
            Some(Family::Native) => Ok(PreparedCode::new(SandboxKind::Jail, JailCode::Native)),
            Some(Family::Wasm) => {
                // Environments load the host's compiled file read-only.
                let component = super::wasm::prepare_for_guest(&self.wasm, code).await?;
                Ok(PreparedCode::new(
                    SandboxKind::Jail,
                    JailCode::Wasm {
                        component,
                        precompiled: self.wasm.working_copy(&code.key),
                    },
                ))
            }
            None => Err(SandboxError::InvalidCode(format!(
                "unknown runtime {}",
                code.runtime
            ))),
        }
    }

    fn memory_overhead_mb(&self, code: &PreparedCode) -> u32 {
        match code.downcast::<JailCode>(SandboxKind::Jail) {
            Some(JailCode::Wasm { .. }) => (WASM_ENGINE_OVERHEAD >> 20) as u32,
            _ => 0,
        }
    }

    async fn create(
        &self,
        code: &PreparedCode,
        spec: EnvironmentSpec,
    ) -> Result<Box<dyn ExecutionEnvironment>, SandboxError> {
        let code: &JailCode = code
            .downcast(SandboxKind::Jail)
            .ok_or_else(|| SandboxError::Internal("code prepared by another sandbox".into()))?;
        let internal =
            |what: &str, e: &dyn std::fmt::Display| SandboxError::Internal(format!("{what}: {e}"));
        let id = spec.id();
        let uid = self.uids.next(0, JAIL_UIDS);
        let memory = u64::from(spec.memory_mb) << 20;
        let (mode, precompiled, limit) = match code {
            JailCode::Native => (Mode::Bootstrap, None, memory),
            JailCode::Wasm {
                component,
                precompiled,
            } => (
                Mode::Wasm {
                    component: component.clone(),
                    precompiled: precompiled
                        .as_ref()
                        .map(|_| "/var/runtime/function.cwasm".to_owned()),
                },
                precompiled.clone(),
                memory + WASM_ENGINE_OVERHEAD,
            ),
        };
        let cgroup = tokio::task::spawn_blocking({
            let (id, memory_mb) = (id.clone(), spec.memory_mb);
            let group = self.cgroup_group.clone();
            move || EnvCgroup::create(&group, &id, memory_mb, limit)
        })
        .await
        .map_err(|e| internal("cgroup task", &e))?
        .map_err(|e| internal("cgroup", &e))?;
        let root = spec.env_dir.join("root");
        std::fs::create_dir_all(&root).map_err(|e| internal("jail root", &e))?;
        let relay = self
            .relay
            .as_ref()
            .map(|r| r.open(&spec.env_dir))
            .transpose()
            .map_err(|e| internal("the environment's API socket", &e))?;
        let config = Config {
            function_name: var(&spec.env, "AWS_LAMBDA_FUNCTION_NAME"),
            function_version: var(&spec.env, "AWS_LAMBDA_FUNCTION_VERSION"),
            memory_mb: spec.memory_mb,
            env: spec.env.clone(),
            mode,
            jail: Some(JailSpec {
                root: root.display().to_string(),
                task_dir: spec.task_dir.display().to_string(),
                opt_dir: spec.opt_dir.as_ref().map(|p| p.display().to_string()),
                precompiled: precompiled.map(|p| p.display().to_string()),
                tmp_mb: spec.ephemeral_mb,
                tmp_dir: spec.tmp_is_disk.then(|| spec.tmp_dir.display().to_string()),
                uid,
                gid: uid,
                cgroup_procs: cgroup.procs_files(),
                nofile: 1024,
                api_socket: relay.as_ref().map(|r| r.path().display().to_string()),
            }),
            log_capacity: spec.log_capacity.min(kiln_proto::MAX_LOG - 4096) as u32,
            tmp_mb: spec.ephemeral_mb,
        };

        let mut command = Command::new(&self.agent);
        command.args(["--channel-fd", "3"]).env_clear();
        start_environment(
            &self.spawner,
            Launch {
                command,
                cgroup,
                config,
                files: Vec::new(),
                log_capacity: spec.log_capacity,
                greeting_timeout: Duration::from_secs(10),
                console: None,
                relay,
            },
        )
        .await
    }
}

/// How to start one environment's process and what to tell its agent.
pub(crate) struct Launch {
    /// The agent, or a VMM whose guest runs one.
    pub command: Command,
    /// The environment's cgroup (the process enters it itself).
    pub cgroup: EnvCgroup,
    pub config: Config,
    /// Code for an agent that cannot mount it (a microVM's).
    pub files: Vec<kiln_proto::FilePiece>,
    pub log_capacity: usize,
    pub greeting_timeout: Duration,
    /// The environment's id, when the process's stdout is a guest console
    /// to forward into the server's log.
    pub console: Option<String>,
    /// Its socket back to kiln's API, kept while it lives.
    pub relay: Option<super::relay::EnvironmentRelay>,
}

/// Starts `command` (an agent, or a VMM whose guest runs one) with the
/// channel on descriptor 3, greets the agent, sends `files` and the
/// configuration, and returns the environment; the agent answers the init
/// in [`ExecutionEnvironment::init`].
pub(crate) async fn start_environment(
    spawner: &Spawner,
    launch: Launch,
) -> Result<Box<dyn ExecutionEnvironment>, SandboxError> {
    let Launch {
        mut command,
        cgroup,
        config,
        files,
        log_capacity,
        greeting_timeout,
        console,
        relay,
    } = launch;
    let internal =
        |what: &str, e: &dyn std::fmt::Display| SandboxError::Internal(format!("{what}: {e}"));
    let program = command.get_program().to_owned();
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| internal("socket pair", &e))?;
    let theirs = OwnedFd::from(theirs);
    command
        .stdin(Stdio::null())
        .stdout(if console.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::inherit());
    channel_on_fd3(&mut command, theirs.as_raw_fd());
    let mut child = spawner.spawn(command).await.map_err(|e| {
        internal(
            &format!("starting {}", std::path::Path::new(&program).display()),
            &e,
        )
    })?;
    if let (Some(env), Some(stdout)) = (console, child.stdout.take()) {
        forward_console(env, stdout);
    }
    drop(theirs);
    ours.set_nonblocking(true)
        .map_err(|e| internal("socket", &e))?;
    let stream = tokio::net::UnixStream::from_std(ours).map_err(|e| internal("socket", &e))?;
    let (reader, writer) = stream.into_split();
    let mut env = JailEnvironment {
        reader,
        writer,
        child: Some(child),
        cgroup: Some(Arc::new(cgroup)),
        freezing: None,
        failed: false,
        log_capacity,
        _relay: relay,
    };
    let greeted = async {
        write_message(
            &mut env.writer,
            &HostMessage::Hello {
                version: PROTOCOL_VERSION,
            },
        )
        .await?;
        match read_message::<AgentMessage>(&mut env.reader).await? {
            AgentMessage::Hello { version } if version == PROTOCOL_VERSION => {}
            AgentMessage::Hello { version } => {
                return Err(kiln_proto::ProtoError::Version { theirs: version });
            }
            other => {
                return Err(kiln_proto::ProtoError::Invalid(format!(
                    "expected Hello, got {other:?}"
                )));
            }
        }
        for piece in files {
            write_message(&mut env.writer, &HostMessage::PutFile(Box::new(piece))).await?;
        }
        write_message(&mut env.writer, &HostMessage::Configure(Box::new(config))).await
    };
    match tokio::time::timeout(greeting_timeout, greeted).await {
        Ok(Ok(())) => Ok(Box::new(env)),
        Ok(Err(e)) => Err(internal("agent", &e)),
        Err(_) => Err(SandboxError::Internal(format!(
            "the agent did not answer within {} s",
            greeting_timeout.as_secs()
        ))),
    }
}

/// A microVM's serial console (the VMM bounds it) into the server's log,
/// line by line, each line cut at 4 KiB.
fn forward_console(env: String, stdout: std::process::ChildStdout) {
    use std::io::{BufRead, BufReader, Read};
    let spawned = std::thread::Builder::new()
        .name("kiln-console".into())
        .spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match (&mut reader).take(4096).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        tracing::info!(target: "kiln::guest_console", env = %env, "{}", text.trim_end());
                    }
                }
                // A line longer than 4 KiB continues as the next one.
                let _ = reader.fill_buf();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread for a guest console");
    }
}

fn is_timeout(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Failed { error_type, .. } if error_type == "Sandbox.Timedout")
}

pub(crate) fn var(env: &[(String, String)], name: &str) -> String {
    env.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// One jailed environment.
struct JailEnvironment {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    child: Option<Child>,
    cgroup: Option<Arc<EnvCgroup>>,
    /// The freeze after its last invocation, while it is being written.
    freezing: Option<tokio::task::JoinHandle<()>>,
    failed: bool,
    log_capacity: usize,
    _relay: Option<super::relay::EnvironmentRelay>,
}

impl JailEnvironment {
    fn peak_memory(&self) -> u64 {
        self.cgroup
            .as_ref()
            .and_then(|c| c.peak_memory())
            .unwrap_or(0)
    }

    /// Ends the environment now: every process of its cgroup.
    fn kill(&mut self) {
        self.failed = true;
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill_all();
        }
        if let Some(child) = &mut self.child {
            let _ = child.kill();
        }
    }

    fn freeze(&self) {
        if let Some(cgroup) = &self.cgroup
            && !cgroup.freeze()
        {
            tracing::warn!("an environment's cgroup could not be frozen");
        }
    }

    /// Freezes the environment off the caller's path: the next `thaw`
    /// waits for it.
    fn freeze_after(&mut self) {
        let Some(cgroup) = self.cgroup.clone() else {
            return;
        };
        self.freezing = Some(tokio::spawn(async move {
            if !cgroup.freeze() {
                tracing::warn!("an environment's cgroup could not be frozen");
            }
        }));
    }

    async fn thaw(&mut self) {
        if let Some(freezing) = self.freezing.take() {
            let _ = freezing.await;
        }
        if let Some(cgroup) = &self.cgroup {
            cgroup.thaw();
        }
    }

    fn truncate_logs(&self, mut logs: Vec<u8>) -> Vec<u8> {
        logs.truncate(self.log_capacity + 256);
        logs
    }
}

#[async_trait]
impl ExecutionEnvironment for JailEnvironment {
    async fn init(&mut self, timeout: Duration) -> InitReport {
        let start = Instant::now();
        let result =
            tokio::time::timeout(timeout, read_message::<AgentMessage>(&mut self.reader)).await;
        let (error, logs) = match result {
            Ok(Ok(AgentMessage::Ready { logs })) => (None, logs),
            Ok(Ok(AgentMessage::InitFailed {
                error_type,
                message,
                logs,
            })) => (
                Some(Outcome::Failed {
                    error_type,
                    message,
                }),
                logs,
            ),
            Ok(Ok(other)) => (
                Some(Outcome::Failed {
                    error_type: "Runtime.Unavailable".into(),
                    message: format!("the environment sent {other:?} during init"),
                }),
                Vec::new(),
            ),
            Ok(Err(e)) => (
                Some(Outcome::Failed {
                    error_type: "Runtime.Unavailable".into(),
                    message: format!("the environment failed during init: {e}"),
                }),
                Vec::new(),
            ),
            Err(_) => (
                Some(Outcome::Failed {
                    error_type: "Runtime.InitTimeout".into(),
                    message: format!("Init timed out after {:.2} seconds", timeout.as_secs_f64()),
                }),
                Vec::new(),
            ),
        };
        if error.is_some() {
            self.kill();
        } else {
            // Ready and idle: nothing of it runs until its first invocation.
            self.freeze();
        }
        InitReport {
            error,
            logs: self.truncate_logs(logs),
            duration: start.elapsed(),
        }
    }

    async fn invoke(&mut self, request: &InvocationRequest) -> InvocationReport {
        let start = Instant::now();
        let failed = |error_type: &str, message: String| Outcome::Failed {
            error_type: error_type.to_owned(),
            message,
        };
        if self.failed {
            return InvocationReport {
                outcome: failed(
                    "Runtime.Unavailable",
                    format!(
                        "RequestId: {} Error: the environment failed earlier",
                        request.request_id
                    ),
                ),
                logs: Vec::new(),
                duration: Duration::ZERO,
                max_memory_bytes: 0,
            };
        }
        self.thaw().await;
        let oom_kills = self.cgroup.as_ref().map_or(0, |c| c.oom_kills());
        let deadline_ms = SystemTime::now()
            .checked_add(request.timeout)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        let invocation = Invocation {
            request_id: request.request_id.clone(),
            deadline_ms,
            invoked_function_arn: request.invoked_function_arn.clone(),
            trace_id: request.trace_id.clone(),
            client_context: request.client_context.clone(),
            cognito_identity: None,
            payload: request.payload.to_vec(),
        };
        let exchange = async {
            write_message(&mut self.writer, &HostMessage::Invoke(Box::new(invocation))).await?;
            loop {
                match read_message::<AgentMessage>(&mut self.reader).await? {
                    AgentMessage::Result(r) if r.request_id == request.request_id => return Ok(*r),
                    AgentMessage::Result(_) => continue,
                    AgentMessage::Fatal { message } => {
                        return Err(kiln_proto::ProtoError::Invalid(format!(
                            "the agent failed: {message}"
                        )));
                    }
                    other => {
                        return Err(kiln_proto::ProtoError::Invalid(format!(
                            "unexpected {other:?}"
                        )));
                    }
                }
            }
        };
        // The agent ends a late invocation itself and returns its output;
        // this deadline is the backstop for an agent that does not.
        let result = tokio::time::timeout(request.timeout + AGENT_GRACE, exchange).await;
        let timed_out = |request: &InvocationRequest| {
            failed(
                "Sandbox.Timedout",
                format!(
                    "RequestId: {} Error: Task timed out after {:.2} seconds",
                    request.request_id,
                    request.timeout.as_secs_f64()
                ),
            )
        };
        let (outcome, logs) = match result {
            // The agent measured from when it received the invocation; the
            // function's Timeout is what the caller set.
            Ok(Ok(r)) if is_timeout(&r.outcome) => (timed_out(request), r.logs),
            Ok(Ok(r)) => (r.outcome, r.logs),
            Ok(Err(e)) => (
                failed(
                    "Runtime.Unavailable",
                    format!(
                        "RequestId: {} Error: the environment failed: {e}",
                        request.request_id
                    ),
                ),
                Vec::new(),
            ),
            Err(_) => (timed_out(request), Vec::new()),
        };
        let max_memory_bytes = self.peak_memory();
        let oom = self
            .cgroup
            .as_ref()
            .is_some_and(|c| c.oom_kills() > oom_kills);
        let outcome = match outcome {
            // The kernel killed the function for its memory: Lambda's type,
            // with the runtime's own message.
            Outcome::Failed { message, .. } if oom => Outcome::Failed {
                error_type: "Runtime.OutOfMemory".to_owned(),
                message,
            },
            other => other,
        };
        if matches!(outcome, Outcome::Failed { .. }) {
            self.kill();
        } else {
            // Answered: the environment stops until its next invocation,
            // whatever the function left running (the caller need not
            // wait for that).
            self.freeze_after();
        }
        InvocationReport {
            outcome,
            logs: self.truncate_logs(logs),
            duration: start.elapsed(),
            max_memory_bytes,
        }
    }

    fn is_reusable(&self) -> bool {
        !self.failed
    }
}

impl Drop for JailEnvironment {
    fn drop(&mut self) {
        self.kill();
        let child = self.child.take();
        let cgroup = self.cgroup.take();
        // Reaping and removing the cgroup can block briefly; never on an
        // async worker.
        let finish = move || {
            if let Some(mut child) = child {
                let _ = child.wait();
            }
            drop(cgroup);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(finish);
            }
            Err(_) => finish(),
        }
    }
}
