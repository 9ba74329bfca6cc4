//! The data plane: from `Invoke` to a result.
//!
//! Steps of one synchronous invocation, in order:
//! 1. resolve the function (an in-memory table the control plane keeps
//!    current; the metadata store is never on this path);
//! 2. take a warm environment of that function version, or create one (a
//!    cold start: create + init) within the environment capacity;
//! 3. run the invocation in it, one at a time;
//! 4. put the environment back if it is still reusable, else drop it;
//! 5. answer with the payload or Lambda's error shape, and START / END /
//!    REPORT lines around the function's own log.

mod environments;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use tokio::sync::{OnceCell, Semaphore};

pub use environments::EnvironmentsDir;
use environments::{Environment, IdleEnvironments};

use crate::control::model::{ArnContext, FunctionRecord, LATEST};
use crate::sandbox::{
    CodeSpec, EnvironmentSpec, InvocationRequest, Outcome, PreparedCode, Sandbox, SandboxError,
};

/// Largest synchronous request and response payload: 6 MB.
pub const MAX_SYNC_PAYLOAD: usize = 6 * 1024 * 1024;
/// Lambda's limit on an init phase.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lambda tails the last 4 KB of the log.
const LOG_TAIL: usize = 4096;

/// Settings of the data plane.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// How many environments may exist at once, over all functions.
    pub max_environments: usize,
    /// An idle environment is torn down after this long.
    pub idle_timeout: Duration,
    /// Most log bytes one invocation may produce.
    pub log_capacity: usize,
}

/// Why an invocation could not run.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// No such function or qualifier.
    #[error("Function not found: {0}")]
    NotFound(String),
    /// Over the concurrency the server can give.
    #[error("Rate Exceeded.")]
    Throttled {
        /// Lambda's `Reason`.
        reason: &'static str,
    },
    /// The code is not runnable (an earlier deploy went wrong).
    #[error("The function's code could not be prepared: {0}")]
    InvalidCode(String),
    /// A server-side failure.
    #[error("{0}")]
    Internal(String),
}

/// An invocation as the API received it.
#[derive(Debug, Clone)]
pub struct InvokeInput {
    /// Function name.
    pub name: String,
    /// `$LATEST` or none.
    pub qualifier: Option<String>,
    /// The event.
    pub payload: Bytes,
    /// Whether to return the log tail.
    pub log_tail: bool,
    /// The caller's trace header, if any.
    pub trace_id: Option<String>,
}

/// The answer to an invocation.
#[derive(Debug, Clone)]
pub struct InvokeOutput {
    /// The request id.
    pub request_id: String,
    /// The version that ran.
    pub executed_version: String,
    /// `Some("Unhandled")` when the function failed.
    pub function_error: Option<&'static str>,
    /// Response or error payload.
    pub payload: Vec<u8>,
    /// Base64 of the log's last 4 KB, when asked for.
    pub log_result: Option<String>,
}

/// One function version's runtime state: configuration snapshot, prepared
/// code and warm environments. Replaced as a whole when the function
/// changes; the old one is retired and its environments dropped.
pub struct FunctionSlot {
    record: Arc<FunctionRecord>,
    task_dir: std::path::PathBuf,
    code: OnceCell<PreparedCode>,
    idle: IdleEnvironments,
    retired: AtomicBool,
}

impl FunctionSlot {
    fn code_spec(&self) -> CodeSpec {
        CodeSpec {
            key: self.record.code_key(),
            runtime: self.record.runtime.clone(),
            task_dir: self.task_dir.clone(),
            handler: self.record.handler.clone(),
        }
    }
}

/// The data plane of one host.
pub struct DataPlane {
    sandbox: Arc<dyn Sandbox>,
    functions: RwLock<HashMap<String, Arc<FunctionSlot>>>,
    capacity: Arc<Semaphore>,
    envs: EnvironmentsDir,
    arn: ArnContext,
    config: DataPlaneConfig,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("sandbox", &self.sandbox.kind())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl DataPlane {
    /// A data plane running code in `sandbox`, with environment scratch
    /// space under `envs`.
    pub fn new(
        sandbox: Arc<dyn Sandbox>,
        envs: EnvironmentsDir,
        arn: ArnContext,
        config: DataPlaneConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            sandbox,
            functions: RwLock::new(HashMap::new()),
            capacity: Arc::new(Semaphore::new(config.max_environments)),
            envs,
            arn,
            config,
        })
    }

    /// Starts the task that tears down idle environments; it ends when the
    /// data plane is dropped.
    pub fn start_reaper(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let period = (self.config.idle_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(plane) = weak.upgrade() else { break };
                plane.reap_idle();
            }
        });
    }

    fn reap_idle(&self) {
        let idle_timeout = self.config.idle_timeout;
        for slot in self.slots() {
            let reaped = slot.idle.remove_idle_longer_than(idle_timeout);
            if reaped > 0 {
                tracing::debug!(function = %slot.record.name, reaped, "reaped idle environments");
            }
        }
    }

    fn slots(&self) -> Vec<Arc<FunctionSlot>> {
        self.functions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Validates and prepares a record's code, as a deploy does before it
    /// commits.
    pub async fn prepare(
        &self,
        record: &FunctionRecord,
        task_dir: std::path::PathBuf,
    ) -> Result<PreparedCode, SandboxError> {
        self.sandbox
            .prepare(&CodeSpec {
                key: record.code_key(),
                runtime: record.runtime.clone(),
                task_dir,
                handler: record.handler.clone(),
            })
            .await
    }

    /// Makes `record` the function's current configuration. `code`, when
    /// given, is its already prepared code; otherwise it is prepared on the
    /// first invocation (or reused from the current slot when unchanged).
    pub fn install(
        &self,
        record: FunctionRecord,
        task_dir: std::path::PathBuf,
        code: Option<PreparedCode>,
    ) {
        let mut functions = self.functions.write().unwrap_or_else(|p| p.into_inner());
        let previous = functions.get(&record.name).cloned();
        let code = code.or_else(|| {
            previous
                .as_ref()
                .filter(|p| p.record.code_key() == record.code_key())
                .and_then(|p| p.code.get().cloned())
        });
        let slot = Arc::new(FunctionSlot {
            record: Arc::new(record),
            task_dir,
            code: OnceCell::new_with(code),
            idle: IdleEnvironments::default(),
            retired: AtomicBool::new(false),
        });
        functions.insert(slot.record.name.clone(), slot);
        drop(functions);
        if let Some(previous) = previous {
            retire(&previous);
        }
    }

    /// Forgets a function and tears down its environments.
    pub fn remove(&self, name: &str) {
        let removed = self
            .functions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(slot) = removed {
            retire(&slot);
        }
    }

    /// Whether the function is known (for `DryRun`).
    pub fn exists(&self, name: &str, qualifier: Option<&str>) -> Result<(), InvokeError> {
        self.resolve(name, qualifier).map(|_| ())
    }

    fn resolve(
        &self,
        name: &str,
        qualifier: Option<&str>,
    ) -> Result<Arc<FunctionSlot>, InvokeError> {
        let not_found = || match qualifier {
            Some(q) => InvokeError::NotFound(self.arn.qualified_arn(name, q)),
            None => InvokeError::NotFound(self.arn.function_arn(name)),
        };
        if qualifier.is_some_and(|q| q != LATEST) {
            return Err(not_found());
        }
        self.functions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(not_found)
    }

    /// Runs one synchronous invocation.
    pub async fn invoke(&self, input: InvokeInput) -> Result<InvokeOutput, InvokeError> {
        let slot = self.resolve(&input.name, input.qualifier.as_deref())?;
        let request_id = uuid::Uuid::new_v4().to_string();
        let record = slot.record.clone();
        let invoked_arn = match &input.qualifier {
            Some(q) => self.arn.qualified_arn(&record.name, q),
            None => self.arn.function_arn(&record.name),
        };

        let mut log = LogBuilder::new(input.log_tail);
        log.line(&format!("START RequestId: {request_id} Version: {LATEST}"));

        let (mut env, init_duration) = match slot.idle.pop() {
            Some(env) => (env, None),
            None => match self.cold_start(&slot, &mut log).await? {
                ColdStart::Ready(env, init) => (env, Some(init)),
                ColdStart::InitFailed(error) => {
                    log.finish(&request_id, &record, Duration::ZERO, 0, None);
                    return Ok(failure_output(request_id, error, log));
                }
            },
        };

        let request = InvocationRequest {
            payload: input.payload,
            request_id: request_id.clone(),
            function_name: record.name.clone(),
            function_version: LATEST.to_owned(),
            invoked_function_arn: invoked_arn,
            trace_id: input.trace_id.unwrap_or_else(new_trace_id),
            timeout: Duration::from_secs(u64::from(record.timeout)),
        };
        let report = env.invoke(&request).await;
        log.raw(&report.logs);
        log.finish(
            &request_id,
            &record,
            report.duration,
            report.max_memory_bytes,
            init_duration,
        );

        let reusable = env.is_reusable() && !slot.retired.load(Ordering::Acquire);
        if reusable {
            slot.idle.push(env);
        }
        let output = match report.outcome {
            Outcome::Response(payload) if payload.len() > MAX_SYNC_PAYLOAD => failure_output(
                request_id,
                Outcome::FunctionError {
                    error_type: "Function.ResponseSizeTooLarge".to_owned(),
                    message: format!(
                        "Response payload size exceeded maximum allowed payload size ({MAX_SYNC_PAYLOAD} bytes)."
                    ),
                },
                log,
            ),
            Outcome::Response(payload) => InvokeOutput {
                request_id,
                executed_version: LATEST.to_owned(),
                function_error: None,
                payload,
                log_result: log.tail(),
            },
            other => failure_output(request_id, other, log),
        };
        Ok(output)
    }

    async fn cold_start(
        &self,
        slot: &Arc<FunctionSlot>,
        log: &mut LogBuilder,
    ) -> Result<ColdStart, InvokeError> {
        let code = slot
            .code
            .get_or_try_init(|| async { self.sandbox.prepare(&slot.code_spec()).await })
            .await
            .map_err(|e| match e {
                SandboxError::InvalidCode(m) => InvokeError::InvalidCode(m),
                other => InvokeError::Internal(other.to_string()),
            })?
            .clone();
        let permit = self.acquire_capacity()?;
        let dir = self.envs.create().map_err(|e| {
            InvokeError::Internal(format!("creating the environment's directory: {e}"))
        })?;
        let record = &slot.record;
        let spec = EnvironmentSpec {
            memory_mb: record.memory_size,
            env: lambda_environment(record, &self.arn, dir.id()),
            task_dir: slot.task_dir.clone(),
            opt_dir: None,
            tmp_dir: dir.tmp(),
            log_capacity: self.config.log_capacity,
        };
        let mut env = self
            .sandbox
            .create(&code, spec)
            .await
            .map_err(|e| match e {
                SandboxError::Capacity(_) => InvokeError::Throttled {
                    reason: "ConcurrentInvocationLimitExceeded",
                },
                other => InvokeError::Internal(other.to_string()),
            })?;
        let init = env.init(INIT_TIMEOUT).await;
        log.raw(&init.logs);
        if let Some(error) = init.error {
            return Ok(ColdStart::InitFailed(error));
        }
        Ok(ColdStart::Ready(
            Environment::new(env, dir, permit),
            init.duration,
        ))
    }

    /// A slot for one more environment: free capacity, else the capacity of
    /// the longest-idle environment of any function, else throttled.
    fn acquire_capacity(&self) -> Result<tokio::sync::OwnedSemaphorePermit, InvokeError> {
        loop {
            if let Ok(permit) = self.capacity.clone().try_acquire_owned() {
                return Ok(permit);
            }
            let oldest = self
                .slots()
                .into_iter()
                .filter_map(|s| s.idle.oldest_idle_since().map(|t| (t, s)))
                .min_by_key(|(t, _)| *t);
            match oldest {
                Some((_, slot)) => {
                    // Dropping the environment returns its permit.
                    if slot.idle.pop_oldest().is_none() {
                        continue;
                    }
                }
                None => {
                    return Err(InvokeError::Throttled {
                        reason: "ConcurrentInvocationLimitExceeded",
                    });
                }
            }
        }
    }

    /// Environments currently idle, over all functions.
    pub fn idle_environments(&self) -> usize {
        self.slots().iter().map(|s| s.idle.len()).sum()
    }
}

enum ColdStart {
    Ready(Environment, Duration),
    InitFailed(Outcome),
}

fn retire(slot: &FunctionSlot) {
    slot.retired.store(true, Ordering::Release);
    slot.idle.clear();
}

fn failure_output(request_id: String, outcome: Outcome, log: LogBuilder) -> InvokeOutput {
    let (error_type, message) = match outcome {
        Outcome::FunctionError {
            error_type,
            message,
        }
        | Outcome::Failed {
            error_type,
            message,
        } => (error_type, message),
        Outcome::Response(_) => unreachable!("a response is not a failure"),
    };
    let payload = serde_json::to_vec(&serde_json::json!({
        "errorType": error_type,
        "errorMessage": message,
    }))
    .unwrap_or_default();
    InvokeOutput {
        request_id,
        executed_version: LATEST.to_owned(),
        function_error: Some("Unhandled"),
        payload,
        log_result: log.tail(),
    }
}

/// The environment variables Lambda sets, then the function's own.
fn lambda_environment(
    record: &FunctionRecord,
    arn: &ArnContext,
    env_id: &str,
) -> Vec<(String, String)> {
    let date = time::OffsetDateTime::now_utc().date();
    let stream = format!(
        "{:04}/{:02}/{:02}/[{LATEST}]{env_id}",
        date.year(),
        u8::from(date.month()),
        date.day()
    );
    let mut env = vec![
        ("AWS_LAMBDA_FUNCTION_NAME".to_owned(), record.name.clone()),
        ("AWS_LAMBDA_FUNCTION_VERSION".to_owned(), LATEST.to_owned()),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE".to_owned(),
            record.memory_size.to_string(),
        ),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME".to_owned(),
            format!("/aws/lambda/{}", record.name),
        ),
        ("AWS_LAMBDA_LOG_STREAM_NAME".to_owned(), stream),
        (
            "AWS_LAMBDA_INITIALIZATION_TYPE".to_owned(),
            "on-demand".to_owned(),
        ),
        ("AWS_REGION".to_owned(), arn.region.clone()),
        ("AWS_DEFAULT_REGION".to_owned(), arn.region.clone()),
        (
            "AWS_EXECUTION_ENV".to_owned(),
            format!("AWS_Lambda_{}", record.runtime),
        ),
        ("LAMBDA_TASK_ROOT".to_owned(), "/var/task".to_owned()),
        ("_HANDLER".to_owned(), record.handler.clone()),
        ("TZ".to_owned(), ":UTC".to_owned()),
        ("LANG".to_owned(), "en_US.UTF-8".to_owned()),
    ];
    env.extend(
        record
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    env
}

/// A new X-Ray style trace id: `Root=1-<8 hex seconds>-<24 hex random>`.
pub fn new_trace_id() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("Root=1-{secs:08x}-{};Sampled=0", &random[..24])
}

/// The invocation's log: START, the function's output, END, REPORT.
struct LogBuilder {
    text: Vec<u8>,
    keep: bool,
}

impl LogBuilder {
    fn new(keep: bool) -> Self {
        Self {
            text: Vec::new(),
            keep,
        }
    }

    fn line(&mut self, line: &str) {
        self.text.extend_from_slice(line.as_bytes());
        self.text.push(b'\n');
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.text.extend_from_slice(bytes);
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            self.text.push(b'\n');
        }
    }

    fn finish(
        &mut self,
        request_id: &str,
        record: &FunctionRecord,
        duration: Duration,
        max_memory_bytes: u64,
        init: Option<Duration>,
    ) {
        let ms = duration.as_secs_f64() * 1000.0;
        let billed = ms.ceil().max(1.0) as u64;
        let max_used_mb = max_memory_bytes.div_ceil(1 << 20);
        let mut report = format!(
            "REPORT RequestId: {request_id}\tDuration: {ms:.2} ms\tBilled Duration: {billed} ms\t\
             Memory Size: {} MB\tMax Memory Used: {max_used_mb} MB",
            record.memory_size
        );
        if let Some(init) = init {
            report.push_str(&format!(
                "\tInit Duration: {:.2} ms",
                init.as_secs_f64() * 1000.0
            ));
        }
        self.line(&format!("END RequestId: {request_id}"));
        self.line(&report);
        if tracing::enabled!(target: "kiln::function", tracing::Level::DEBUG) {
            tracing::debug!(
                target: "kiln::function",
                function = %record.name,
                "{}",
                String::from_utf8_lossy(&self.text)
            );
        }
    }

    fn tail(&self) -> Option<String> {
        self.keep.then(|| {
            let start = self.text.len().saturating_sub(LOG_TAIL);
            base64::engine::general_purpose::STANDARD.encode(&self.text[start..])
        })
    }
}
