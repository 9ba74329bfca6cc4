//! One execution environment: a `Store` and an instance of one function
//! version, reused for invocation after invocation until it fails.
//!
//! States, in order: created (instantiated) -> initialized (`init` ran, or
//! the component has none) -> serving invocations one at a time -> poisoned
//! after a trap, timeout, exit or out-of-memory. A poisoned environment
//! refuses further calls; its owner drops it.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use wasmtime::component::{Instance, TypedFunc};
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::bindings::FunctionCore;
use crate::bindings::kiln::function::types::Context as WitContext;
use crate::engine::{FunctionCode, Runtime};
use crate::host::{Current, FunctionError, HostState, Limits, epoch_millis};
use crate::logs::LogSink;

/// How one environment is set up.
#[derive(Debug, Clone)]
pub struct EnvironmentConfig {
    /// Linear memory limit in MiB (the function's MemorySize).
    pub memory_limit_mb: u32,
    /// Environment variables the guest sees, in order.
    pub env: Vec<(String, String)>,
    /// Host directory shown read-only at `/var/task` (the function's code).
    pub task_dir: PathBuf,
    /// Host directory shown read-only at `/opt` (merged layers), if any.
    pub opt_dir: Option<PathBuf>,
    /// Host directory shown read-write at `/tmp`: this environment's own.
    pub tmp_dir: PathBuf,
    /// Most bytes of log one invocation may produce.
    pub log_capacity: usize,
    /// kiln's API as the guest reaches it: the one destination its
    /// `wasi:http` requests may have. `None` refuses them all.
    pub kiln_endpoint: Option<std::net::SocketAddr>,
}

/// Why an environment could not be created.
#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    /// A directory to preopen could not be opened.
    #[error("opening {path} for the guest: {message}")]
    Preopen {
        /// The host directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Every environment slot of the engine is in use.
    #[error("no free execution environment slot: {0}")]
    Capacity(String),
    /// Instantiation failed (a start function trapped, memory limit, ...).
    #[error("instantiating the component: {0}")]
    Instantiate(String),
    /// The environment failed earlier and must not be used.
    #[error("the environment failed earlier and cannot be reused")]
    Poisoned,
}

/// What the guest knows about an invocation, plus its time limit.
#[derive(Debug, Clone)]
pub struct InvocationContext {
    /// The request id.
    pub request_id: String,
    /// The function's name.
    pub function_name: String,
    /// `$LATEST` or a version number.
    pub function_version: String,
    /// The ARN the caller used.
    pub invoked_function_arn: String,
    /// The trace id.
    pub trace_id: String,
    /// The function's Timeout: the invocation's deadline is this far from
    /// its start.
    pub timeout: Duration,
    /// The caller's client context (JSON), if it passed one.
    pub client_context: Option<String>,
}

/// A call that went wrong in a way that ends the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The deadline passed.
    Timeout(Duration),
    /// The guest tried to grow its memory past the limit.
    OutOfMemory {
        /// The limit in MiB.
        limit_mb: u32,
    },
    /// The guest trapped (a panic, `unreachable`, out-of-bounds access...).
    Trap {
        /// The trap.
        message: String,
        /// What the guest reported just before trapping, if anything.
        fatal: Option<FunctionError>,
    },
    /// The guest called `exit`.
    Exit(i32),
}

impl Failure {
    /// Lambda-style `errorType`.
    pub fn error_type(&self) -> String {
        match self {
            Failure::Timeout(_) => "Sandbox.Timedout".to_owned(),
            Failure::OutOfMemory { .. } => "Runtime.OutOfMemory".to_owned(),
            Failure::Trap { fatal: Some(f), .. } => f.error_type.clone(),
            Failure::Trap { .. } => "Runtime.Trap".to_owned(),
            Failure::Exit(_) => "Runtime.ExitError".to_owned(),
        }
    }

    /// Lambda-style `errorMessage`. Within an invocation Lambda prefixes
    /// failures of the runtime (not messages the guest reported itself) with
    /// `RequestId: <id> Error: `; pass the request id for that, or `None` for
    /// the init phase.
    pub fn error_message(&self, request_id: Option<&str>) -> String {
        let bare = match self {
            Failure::Timeout(t) => format!("Task timed out after {:.2} seconds", t.as_secs_f64()),
            Failure::OutOfMemory { limit_mb } => format!(
                "Runtime exited: the function tried to use more than its MemorySize of {limit_mb} MB"
            ),
            Failure::Trap { fatal: Some(f), .. } => return f.message.clone(),
            Failure::Trap { message, .. } => format!("Runtime trapped: {message}"),
            Failure::Exit(code) => format!("Runtime exited with status {code}"),
        };
        match request_id {
            Some(id) => format!("RequestId: {id} Error: {bare}"),
            None => bare,
        }
    }
}

/// The result of an invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The response payload.
    Response(Vec<u8>),
    /// The handler returned an error; the environment stays usable.
    Error(FunctionError),
    /// The environment failed and is now poisoned.
    Failed(Failure),
}

/// An invocation's result with what was measured along the way.
#[derive(Debug)]
pub struct InvokeOutcome {
    /// What happened.
    pub outcome: Outcome,
    /// stdout, stderr and structured log lines of this invocation.
    pub logs: Vec<u8>,
    /// Time spent in the guest.
    pub duration: Duration,
    /// Peak linear memory of the environment so far, in bytes.
    pub max_memory_bytes: usize,
}

/// The result of the init phase.
#[derive(Debug)]
pub struct InitOutcome {
    /// `Ok` when the environment may serve invocations.
    pub result: Result<(), InitFailure>,
    /// Output of the init phase.
    pub logs: Vec<u8>,
    /// Time spent initializing.
    pub duration: Duration,
}

/// Why init failed: the guest's own error, or a failure of the environment.
pub type InitFailure = Outcome;

/// One execution environment.
pub struct Environment {
    store: Store<HostState>,
    instance: Instance,
    bindings: FunctionCore,
    init: Option<TypedFunc<(), (Result<(), FunctionError>,)>>,
    memory_limit_mb: u32,
    poisoned: bool,
    initialized: bool,
    invocations: u64,
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Environment")
            .field("memory_limit_mb", &self.memory_limit_mb)
            .field("poisoned", &self.poisoned)
            .field("initialized", &self.initialized)
            .field("invocations", &self.invocations)
            .finish_non_exhaustive()
    }
}

impl Environment {
    /// Instantiates `code` in a fresh store configured by `config`.
    pub async fn create(
        runtime: &Runtime,
        code: &FunctionCode,
        config: EnvironmentConfig,
    ) -> Result<Self, EnvironmentError> {
        let log = LogSink::new(config.log_capacity);
        let mut wasi = WasiCtxBuilder::new();
        wasi.envs(&config.env)
            .stdout(log.clone())
            .stderr(log.clone())
            .initial_cwd("/var/task")
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let mut preopen = |host: &PathBuf, guest: &str, perms: FsPerms| {
            wasi.preopened_dir(host, guest, perms)
                .map(|_| ())
                .map_err(|e| EnvironmentError::Preopen {
                    path: host.clone(),
                    message: format!("{e:#}"),
                })
        };
        preopen(&config.task_dir, "/var/task", FsPerms::ReadOnly)?;
        if let Some(opt) = &config.opt_dir {
            preopen(opt, "/opt", FsPerms::ReadOnly)?;
        }
        preopen(&config.tmp_dir, "/tmp", FsPerms::ReadWrite)?;

        let memory_limit =
            usize::try_from(u64::from(config.memory_limit_mb) << 20).unwrap_or(usize::MAX);
        let state = HostState {
            wasi: wasi.build(),
            table: Default::default(),
            limits: Limits {
                memory_limit,
                peak_memory: 0,
                memory_exceeded: false,
            },
            log,
            current: None,
            fatal: None,
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            outgoing: crate::outgoing::OutgoingPolicy {
                endpoint: config.kiln_endpoint,
            },
        };
        let mut store = Store::new(runtime.engine(), state);
        store.limiter(|s| &mut s.limits);
        // Every tick the running guest yields to the executor (so one guest
        // cannot starve the others on a worker thread) and is stopped once
        // its deadline has passed.
        store.epoch_deadline_callback(|ctx| {
            let expired = ctx
                .data()
                .current
                .as_ref()
                .is_some_and(|c| Instant::now() >= c.deadline);
            Ok(if expired {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        store.set_epoch_deadline(1);

        let instance = code
            .inner
            .pre
            .instance_pre()
            .instantiate_async(&mut store)
            .await
            .map_err(|e| {
                let text = format!("{e:#}");
                if text.contains("limit") && text.contains("concurrent") {
                    EnvironmentError::Capacity(text)
                } else {
                    EnvironmentError::Instantiate(text)
                }
            })?;
        let bindings = FunctionCore::new(&mut store, &instance)
            .map_err(|e| EnvironmentError::Instantiate(format!("{e:#}")))?;
        let init = match &code.inner.init {
            Some(index) => Some(
                instance
                    .get_typed_func::<(), (Result<(), FunctionError>,)>(&mut store, index)
                    .map_err(|e| {
                        EnvironmentError::Instantiate(format!(
                            "`kiln:function/lifecycle@0.1.0#init` has the wrong type: {e:#}"
                        ))
                    })?,
            ),
            None => None,
        };
        Ok(Self {
            store,
            instance,
            bindings,
            init,
            memory_limit_mb: config.memory_limit_mb,
            poisoned: false,
            initialized: false,
            invocations: 0,
        })
    }

    /// Whether the environment failed and must be dropped.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Whether init has completed successfully.
    pub fn is_initialized(&self) -> bool {
        self.initialized
    }

    /// How many invocations this environment has served.
    pub fn invocations(&self) -> u64 {
        self.invocations
    }

    /// Runs `lifecycle.init`, if the component exports it, within `timeout`.
    pub async fn init(&mut self, timeout: Duration) -> InitOutcome {
        let start = Instant::now();
        if self.poisoned {
            return InitOutcome {
                result: Err(Outcome::Failed(Failure::Trap {
                    message: "environment already failed".into(),
                    fatal: None,
                })),
                logs: Vec::new(),
                duration: Duration::ZERO,
            };
        }
        let Some(init) = self.init else {
            self.initialized = true;
            return InitOutcome {
                result: Ok(()),
                logs: Vec::new(),
                duration: start.elapsed(),
            };
        };
        self.begin(None, start + timeout, None);
        let call = init.call_async(&mut self.store, ());
        let result = tokio::time::timeout(timeout, call).await;
        let outcome = match result {
            Ok(Ok((Ok(()),))) => Ok(()),
            Ok(Ok((Err(e),))) => Err(Outcome::Error(e)),
            Ok(Err(e)) => Err(Outcome::Failed(self.classify(e, timeout))),
            Err(_elapsed) => Err(Outcome::Failed(Failure::Timeout(timeout))),
        };
        // An init error leaves the guest in an unknown state: like Lambda,
        // the next invocation starts over in a fresh environment.
        match &outcome {
            Ok(()) => self.initialized = true,
            Err(_) => self.poisoned = true,
        }
        let logs = self.end();
        InitOutcome {
            result: outcome,
            logs,
            duration: start.elapsed(),
        }
    }

    /// Runs one invocation. Runs `init` first if it has not run yet (with
    /// the invocation's own time limit).
    pub async fn invoke(&mut self, event: &[u8], ctx: &InvocationContext) -> InvokeOutcome {
        let start = Instant::now();
        if self.poisoned {
            return InvokeOutcome {
                outcome: Outcome::Failed(Failure::Trap {
                    message: "environment already failed".into(),
                    fatal: None,
                }),
                logs: Vec::new(),
                duration: Duration::ZERO,
                max_memory_bytes: self.store.data().limits.peak_memory,
            };
        }
        let deadline = start + ctx.timeout;
        self.begin(
            Some(ctx.request_id.clone()),
            deadline,
            ctx.client_context.clone(),
        );
        let wit_ctx = WitContext {
            request_id: ctx.request_id.clone(),
            deadline_ms: epoch_millis(SystemTime::now() + ctx.timeout),
            function_name: ctx.function_name.clone(),
            function_version: ctx.function_version.clone(),
            invoked_function_arn: ctx.invoked_function_arn.clone(),
            memory_limit_mb: self.memory_limit_mb,
            trace_id: ctx.trace_id.clone(),
        };
        let call =
            self.bindings
                .kiln_function_handler()
                .call_handle(&mut self.store, event, &wit_ctx);
        let result = tokio::time::timeout_at(deadline.into(), call).await;
        let outcome = match result {
            Ok(Ok(Ok(response))) => Outcome::Response(response),
            Ok(Ok(Err(error))) => Outcome::Error(error),
            Ok(Err(e)) => Outcome::Failed(self.classify(e, ctx.timeout)),
            Err(_elapsed) => Outcome::Failed(Failure::Timeout(ctx.timeout)),
        };
        if matches!(outcome, Outcome::Failed(_)) {
            self.poisoned = true;
        }
        self.invocations += 1;
        let logs = self.end();
        InvokeOutcome {
            outcome,
            logs,
            duration: start.elapsed(),
            max_memory_bytes: self.store.data().limits.peak_memory,
        }
    }

    fn begin(
        &mut self,
        request_id: Option<String>,
        deadline: Instant,
        client_context: Option<String>,
    ) {
        let data = self.store.data_mut();
        data.current = Some(Current {
            request_id: request_id.unwrap_or_default(),
            deadline,
            client_context,
        });
        data.fatal = None;
        self.store.set_epoch_deadline(1);
    }

    fn end(&mut self) -> Vec<u8> {
        let data = self.store.data_mut();
        data.current = None;
        data.fatal = None;
        data.log.take()
    }

    fn classify(&mut self, error: wasmtime::Error, timeout: Duration) -> Failure {
        let data = self.store.data_mut();
        if data.limits.memory_exceeded {
            return Failure::OutOfMemory {
                limit_mb: self.memory_limit_mb,
            };
        }
        if let Some(exit) = error.downcast_ref::<I32Exit>() {
            return Failure::Exit(exit.0);
        }
        if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return Failure::Timeout(timeout);
        }
        // The full error carries the guest's backtrace: keep it in the log
        // for the author, and give the caller the short cause.
        data.log.write(format!("{error:?}\n").as_bytes());
        Failure::Trap {
            message: error.root_cause().to_string(),
            fatal: data.fatal.take(),
        }
    }

    /// The instance, for embedders that look up further exports.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }
}
