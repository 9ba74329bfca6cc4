//! The sandbox trait: the only way the data plane reaches code it runs.
//!
//! A [`Sandbox`] turns a function version's code into [`PreparedCode`] once
//! (at deploy time: this is where code is validated for its runtime), then
//! creates [`ExecutionEnvironment`]s from it. An environment serves one
//! invocation at a time and is reused while [`ExecutionEnvironment::is_reusable`]
//! holds; the data plane drops it otherwise, and dropping it releases
//! everything it held.
//!
//! Implementations: [`wasm::WasmSandbox`] (wasmtime in this process) and
//! [`jail::JailSandbox`] (the agent in namespaces, cgroups and seccomp).
//! [`Sandboxes`] picks one per runtime.

pub mod cgroup;
pub mod jail;
pub mod microvm;
pub mod relay;
pub mod scratch;
pub mod uids;
pub mod wasm;

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

/// Which kind of isolation runs a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SandboxKind {
    /// wasmtime inside the kiln process.
    Wasm,
    /// The agent in a jail.
    Jail,
    /// The agent as PID 1 of a KVM guest.
    MicroVm,
}

impl SandboxKind {
    /// The name used in logs, metrics and `kiln doctor`.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxKind::Wasm => "wasm",
            SandboxKind::Jail => "jail",
            SandboxKind::MicroVm => "microvm",
        }
    }
}

/// What a sandbox needs to prepare a version's code.
#[derive(Debug, Clone)]
pub struct CodeSpec {
    /// A stable name for this code (archive hash + handler), for caches.
    pub key: String,
    /// The runtime identifier.
    pub runtime: String,
    /// The unpacked archive.
    pub task_dir: PathBuf,
    /// The handler setting (for `wasip2`: the component's path).
    pub handler: String,
}

/// Code ready to be instantiated, opaque outside its sandbox.
#[derive(Clone)]
pub struct PreparedCode {
    kind: SandboxKind,
    inner: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for PreparedCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedCode")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl PreparedCode {
    /// Wraps a sandbox's own prepared form.
    pub fn new<T: Any + Send + Sync>(kind: SandboxKind, inner: T) -> Self {
        Self {
            kind,
            inner: Arc::new(inner),
        }
    }

    /// The sandbox's own form, if this code belongs to that kind.
    pub fn downcast<T: Any + Send + Sync>(&self, kind: SandboxKind) -> Option<&T> {
        (self.kind == kind)
            .then(|| self.inner.downcast_ref::<T>())
            .flatten()
    }
}

/// How one environment is set up.
#[derive(Debug, Clone)]
pub struct EnvironmentSpec {
    /// MemorySize in MiB.
    pub memory_mb: u32,
    /// Environment variables, Lambda's reserved ones included.
    pub env: Vec<(String, String)>,
    /// The unpacked code, shown read-only at `/var/task`.
    pub task_dir: PathBuf,
    /// Merged layers, shown read-only at `/opt`.
    pub opt_dir: Option<PathBuf>,
    /// This environment's own `/tmp`: a disk of `ephemeral_mb` where the
    /// host can mount one (see `scratch`), used as is by the in-process
    /// sandbox and bound by jails.
    pub tmp_dir: PathBuf,
    /// Whether `tmp_dir` is such a disk (else a plain directory, and jails
    /// mount a tmpfs of `ephemeral_mb` instead).
    pub tmp_is_disk: bool,
    /// The environment's own directory, removed when it ends.
    pub env_dir: PathBuf,
    /// EphemeralStorage in MiB: the size of `/tmp`.
    pub ephemeral_mb: u32,
    /// Most log bytes one invocation may produce.
    pub log_capacity: usize,
}

impl EnvironmentSpec {
    /// The environment's id: the name of its directory.
    pub fn id(&self) -> String {
        self.env_dir.file_name().map_or_else(
            || uuid::Uuid::new_v4().simple().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }
}

/// One invocation as the sandbox sees it.
#[derive(Debug, Clone)]
pub struct InvocationRequest {
    /// The event payload.
    pub payload: bytes::Bytes,
    /// Request id.
    pub request_id: String,
    /// Function name.
    pub function_name: String,
    /// `$LATEST` or a version number.
    pub function_version: String,
    /// The ARN the caller used.
    pub invoked_function_arn: String,
    /// Trace id.
    pub trace_id: String,
    /// The function's Timeout.
    pub timeout: Duration,
    /// The caller's client context (decoded JSON), for synchronous calls.
    pub client_context: Option<String>,
}

/// How an invocation or init ended: the agent's wire type, which every
/// sandbox (in-process ones too) reports.
pub use kiln_proto::Outcome;

/// An invocation's outcome and measurements.
#[derive(Debug)]
pub struct InvocationReport {
    /// What happened.
    pub outcome: Outcome,
    /// The invocation's log output.
    pub logs: Vec<u8>,
    /// Time in the function.
    pub duration: Duration,
    /// Peak memory of the environment, in bytes.
    pub max_memory_bytes: u64,
}

/// The init phase's outcome and measurements.
#[derive(Debug)]
pub struct InitReport {
    /// `None` when init succeeded, else how it failed.
    pub error: Option<Outcome>,
    /// Init output.
    pub logs: Vec<u8>,
    /// Time spent in init.
    pub duration: Duration,
}

/// Sandbox failures that are not the function's own doing.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The code cannot run on this runtime; the message says why.
    #[error("{0}")]
    InvalidCode(String),
    /// No capacity for another environment right now.
    #[error("no capacity for another execution environment: {0}")]
    Capacity(String),
    /// Anything else: a server-side failure.
    #[error("sandbox failure: {0}")]
    Internal(String),
}

/// A kind of isolation that runs function code.
#[async_trait]
pub trait Sandbox: Send + Sync + 'static {
    /// Which kind this is.
    fn kind(&self) -> SandboxKind;

    /// Validates and prepares code (compiles a component, ...). Errors of
    /// the code itself are [`SandboxError::InvalidCode`].
    async fn prepare(&self, code: &CodeSpec) -> Result<PreparedCode, SandboxError>;

    /// kiln's API as code in this sandbox reaches it (the value of
    /// `AWS_ENDPOINT_URL_LAMBDA`), when it can.
    fn kiln_endpoint(&self) -> Option<String> {
        None
    }

    /// Memory an environment of `code` takes beyond the function's
    /// MemorySize (an engine or a guest kernel around it), in MiB: what the
    /// memory budget reserves on top.
    fn memory_overhead_mb(&self, _code: &PreparedCode) -> u32 {
        0
    }

    /// Creates a fresh environment for prepared code.
    async fn create(
        &self,
        code: &PreparedCode,
        spec: EnvironmentSpec,
    ) -> Result<Box<dyn ExecutionEnvironment>, SandboxError>;
}

/// One execution environment of one function version.
#[async_trait]
pub trait ExecutionEnvironment: Send {
    /// Runs the function's init phase, once, within `timeout`.
    async fn init(&mut self, timeout: Duration) -> InitReport;

    /// Runs one invocation.
    async fn invoke(&mut self, request: &InvocationRequest) -> InvocationReport;

    /// Whether another invocation may run here.
    fn is_reusable(&self) -> bool;
}

/// The error document of a failure the platform reports itself.
pub fn error_document(error_type: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "errorType": error_type,
        "errorMessage": message,
    }))
    .unwrap_or_default()
}

/// The sandboxes of one host and which runs what.
#[derive(Clone)]
pub struct Sandboxes {
    /// Runs `wasip2` functions.
    pub wasm: Arc<dyn Sandbox>,
    /// Runs native runtimes, when this host can.
    pub native: Result<Arc<dyn Sandbox>, String>,
    /// Every sandbox's verdict at start: available, or why not.
    pub availability: Vec<(SandboxKind, Result<(), String>)>,
    /// What the environments may take from the host together.
    pub limits: crate::host_limits::HostLimits,
    /// The parent cgroup of the jails, when there is one.
    pub server_cgroup: Option<Arc<cgroup::ServerCgroup>>,
}

impl std::fmt::Debug for Sandboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandboxes")
            .field("wasm", &self.wasm.kind())
            .field("native", &self.native.as_ref().map(|s| s.kind()))
            .finish()
    }
}

impl Sandboxes {
    /// The sandbox for a runtime, or why there is none on this host.
    pub fn for_runtime(&self, runtime: &str) -> Result<&Arc<dyn Sandbox>, SandboxError> {
        use crate::control::runtimes::{Family, lookup};
        match lookup(runtime).map(|r| r.family) {
            Some(Family::Wasm) => Ok(&self.wasm),
            Some(Family::Native) => self.native.as_ref().map_err(|why| {
                SandboxError::InvalidCode(format!(
                    "runtime {runtime} runs a native bootstrap, which needs the jail sandbox, and \
                     this host cannot run it: {why} (see `kiln doctor`)"
                ))
            }),
            None => Err(SandboxError::InvalidCode(format!(
                "unknown runtime {runtime}"
            ))),
        }
    }
}
