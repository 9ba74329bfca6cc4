//! The data plane: from `Invoke` to a result.
//!
//! Steps of one synchronous invocation, in order:
//! 1. resolve the function and qualifier to a version (an alias with
//!    weights picks one per call) in an in-memory table the control plane
//!    keeps current; the metadata store is never on this path;
//! 2. take a warm environment of that version — provisioned ones first —
//!    or create one (a cold start: create + init) within the capacity;
//! 3. run the invocation in it, one at a time;
//! 4. put the environment back if it is still reusable, else drop it;
//! 5. answer with the payload or Lambda's error shape, and START / END /
//!    REPORT lines around the function's own log.

pub mod activity;
mod concurrency;
mod environments;
mod events;
mod logs;
pub mod logstore;
mod provisioned;
mod registry;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

pub use environments::EnvironmentsDir;
pub use events::AsyncConfig;
pub use provisioned::ProvisionedStatus;
pub use registry::{AliasRoute, FunctionSlot};

use concurrency::Governor;
use environments::{Environment, ProvisionedLease};
use logs::LogBuilder;
use registry::FunctionEntry;

use crate::control::model::{ArnContext, EventInvokeRecord, FunctionRecord, LATEST};
use crate::sandbox::{
    EnvironmentSpec, InitReport, InvocationRequest, Outcome, PreparedCode, SandboxError, Sandboxes,
    error_document,
};
use crate::store::queue::{NewEvent, QueueStore};
use crate::telemetry::TARGET as TRACE;

/// Largest synchronous request payload: 6 MB.
pub const MAX_SYNC_PAYLOAD: usize = 6 * 1024 * 1024;
/// Largest response, on every path: Lambda's 6,291,556 bytes.
pub use kiln_proto::MAX_RESPONSE;
/// Largest asynchronous (`Event`) payload: 1 MB.
pub const MAX_ASYNC_PAYLOAD: usize = 1024 * 1024;
/// Lambda's limit on an init phase.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the data plane.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// How many environments may exist at once, over all functions.
    pub max_environments: usize,
    /// An idle environment is torn down after this long.
    pub idle_timeout: Duration,
    /// Most log bytes one invocation may produce.
    pub log_capacity: usize,
    /// An environment's maximum lifetime (lease): past it, it takes no new
    /// invocation and is shut down.
    pub env_lease: Duration,
    /// The account's concurrency limit.
    pub account_concurrency: u32,
    /// Whether invocations are counted in metrics and console activity
    /// (off only to measure what that costs).
    pub telemetry: bool,
    /// MiB all environments together may reserve (each its MemorySize).
    pub memory_budget_mb: u64,
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
    /// The host's memory budget is reserved by running environments.
    #[error(
        "Rate Exceeded: the function needs {needed_mb} MiB for a new execution environment and \
         this host's memory budget for environments ({budget_mb} MiB, `kiln serve \
         --memory-budget`) is reserved by running ones; retry, or lower MemorySize"
    )]
    MemoryBudget {
        /// MemorySize (and the sandbox's overhead) of the environment asked for.
        needed_mb: u32,
        /// The budget.
        budget_mb: u64,
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
    /// `$LATEST`, a version, an alias, or none.
    pub qualifier: Option<String>,
    /// The event.
    pub payload: Bytes,
    /// Whether to return the log tail.
    pub log_tail: bool,
    /// The caller's trace header, if any.
    pub trace_id: Option<String>,
    /// The request id, when it was assigned earlier (an event's).
    pub request_id: Option<String>,
    /// The caller's client context (decoded JSON), synchronous calls only.
    pub client_context: Option<String>,
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

/// How an environment came to be, as `AWS_LAMBDA_INITIALIZATION_TYPE` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InitType {
    OnDemand,
    Provisioned,
}

impl InitType {
    fn as_str(self) -> &'static str {
        match self {
            InitType::OnDemand => "on-demand",
            InitType::Provisioned => "provisioned-concurrency",
        }
    }
}

/// The data plane of one host.
pub struct DataPlane {
    sandboxes: Sandboxes,
    functions: RwLock<HashMap<String, FunctionEntry>>,
    capacity: Arc<Semaphore>,
    /// The memory budget, one permit per MiB.
    memory: Arc<Semaphore>,
    envs: EnvironmentsDir,
    arn: ArnContext,
    config: DataPlaneConfig,
    provisioned: Mutex<HashMap<(String, String), provisioned::Maintainer>>,
    governor: Arc<Governor>,
    queue: Arc<QueueStore>,
    event_configs: RwLock<HashMap<(String, String), EventInvokeRecord>>,
    /// Issues each environment its execution role's credentials.
    credentials: std::sync::OnceLock<Arc<crate::auth::keys::Credentials>>,
    metrics: crate::metrics::Metrics,
    activity: activity::Activity,
    logs: std::sync::OnceLock<logstore::LogStore>,
    me: Weak<DataPlane>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("sandboxes", &self.sandboxes)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl DataPlane {
    /// A data plane running code in `sandbox`, with environment scratch
    /// space under `envs`.
    pub fn new(
        sandboxes: Sandboxes,
        envs: EnvironmentsDir,
        queue: Arc<QueueStore>,
        arn: ArnContext,
        config: DataPlaneConfig,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            sandboxes,
            functions: RwLock::new(HashMap::new()),
            capacity: Arc::new(Semaphore::new(config.max_environments)),
            memory: Arc::new(Semaphore::new(
                usize::try_from(config.memory_budget_mb)
                    .unwrap_or(usize::MAX)
                    .min(Semaphore::MAX_PERMITS),
            )),
            envs,
            arn,
            governor: Governor::new(config.account_concurrency),
            config,
            provisioned: Mutex::new(HashMap::new()),
            queue,
            event_configs: RwLock::new(HashMap::new()),
            credentials: std::sync::OnceLock::new(),
            metrics: crate::metrics::Metrics::new(),
            activity: activity::Activity::default(),
            logs: std::sync::OnceLock::new(),
            me: me.clone(),
        })
    }

    /// Starts the task that tears down idle environments; it ends when the
    /// data plane is dropped.
    pub fn start_reaper(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        // Often enough that neither an idle timeout nor a lease of a few
        // seconds is overshot by much.
        let period = (self.config.idle_timeout.min(self.config.env_lease) / 4)
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
        let (idle_timeout, lease) = (self.config.idle_timeout, self.config.env_lease);
        for slot in self.slots() {
            let reaped = slot.idle.remove_where(|env, since| {
                since.elapsed() >= idle_timeout || env.is_expired(lease)
            });
            // Provisioned environments stay while their lease lasts: keeping
            // them warm is their job. Their maintainer replaces them.
            let expired = slot
                .provisioned
                .remove_where(|env, _| env.is_expired(lease));
            if reaped + expired > 0 {
                tracing::debug!(function = %slot.record.name, version = %slot.version(), reaped, expired, "retired environments");
            }
        }
    }

    /// A warm environment of `slot` whose lease has not ended: provisioned
    /// ones first.
    fn take_warm(&self, slot: &FunctionSlot) -> Option<Environment> {
        for pool in [&slot.provisioned, &slot.idle] {
            while let Some(env) = pool.pop() {
                if env.is_expired(self.config.env_lease) {
                    // Shut down gracefully: it served its last invocation.
                    drop(env);
                    continue;
                }
                return Some(env);
            }
        }
        None
    }

    /// Sets a function's reserved concurrency for admission control.
    pub fn set_reserved(&self, function: &str, reserved: Option<u32>) {
        self.governor.set_reserved(function, reserved);
    }

    /// Invocations of `function` in flight now.
    pub fn in_flight(&self, function: &str) -> u32 {
        self.governor.in_flight(function)
    }

    /// Sets (or, with `None`, removes) the asynchronous invocation settings
    /// of a function's qualifier (`$LATEST` for the unqualified function).
    pub fn set_event_config(
        &self,
        function: &str,
        qualifier: &str,
        config: Option<EventInvokeRecord>,
    ) {
        let mut map = self
            .event_configs
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let key = (function.to_owned(), qualifier.to_owned());
        match config {
            Some(c) => map.insert(key, c),
            None => map.remove(&key),
        };
    }

    /// The settings that apply to an event for `function` through
    /// `qualifier` (defaults when none are set).
    pub(crate) fn event_config(
        &self,
        function: &str,
        qualifier: Option<&str>,
    ) -> EventInvokeRecord {
        let map = self.event_configs.read().unwrap_or_else(|p| p.into_inner());
        map.get(&(function.to_owned(), qualifier.unwrap_or(LATEST).to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// Stores an `Event` invocation durably and returns its request id
    /// (the caller answers 202 only after this returns).
    pub async fn enqueue(&self, input: InvokeInput) -> Result<String, InvokeError> {
        self.resolve(&input.name, input.qualifier.as_deref())?;
        let request_id = input
            .request_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        self.metrics.async_received(&input.name);
        self.queue
            .enqueue(NewEvent {
                request_id: request_id.clone(),
                function: input.name,
                qualifier: input.qualifier,
                payload: input.payload.to_vec(),
                trace_id: input.trace_id,
            })
            .instrument(tracing::info_span!(target: TRACE, "enqueue"))
            .await
            .map_err(|e| InvokeError::Internal(format!("storing the event: {e}")))?;
        Ok(request_id)
    }

    /// The queue of asynchronous invocations.
    pub fn queue(&self) -> &Arc<QueueStore> {
        &self.queue
    }

    fn read_functions(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, FunctionEntry>> {
        self.functions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_functions(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, FunctionEntry>> {
        self.functions.write().unwrap_or_else(|p| p.into_inner())
    }

    fn slots(&self) -> Vec<Arc<FunctionSlot>> {
        self.read_functions()
            .values()
            .flat_map(|e| e.versions.values().cloned())
            .collect()
    }

    pub(crate) fn slot(&self, name: &str, version: &str) -> Option<Arc<FunctionSlot>> {
        self.read_functions()
            .get(name)
            .and_then(|e| e.versions.get(version).cloned())
    }

    /// The host's sandboxes and which runs what.
    pub fn sandboxes(&self) -> &Sandboxes {
        &self.sandboxes
    }

    /// Validates and prepares a record's code, as a deploy does before it
    /// commits.
    pub async fn prepare(
        &self,
        record: &FunctionRecord,
        task_dir: PathBuf,
    ) -> Result<PreparedCode, SandboxError> {
        let slot = FunctionSlot::new(record.clone(), task_dir, None, None);
        self.sandboxes
            .for_runtime(&record.runtime)?
            .prepare(&slot.code_spec())
            .await
    }

    /// Makes `record` the state of its version (`$LATEST` or a number).
    /// `code`, when given, is its prepared code; otherwise it is reused from
    /// the slot it replaces when unchanged, or prepared at first use.
    pub fn install(
        &self,
        record: FunctionRecord,
        task_dir: PathBuf,
        opt_dir: Option<PathBuf>,
        code: Option<PreparedCode>,
    ) {
        let mut functions = self.write_functions();
        let entry = functions.entry(record.name.clone()).or_default();
        let previous = entry.versions.get(&record.version).cloned();
        let code = code.or_else(|| {
            previous
                .as_ref()
                .filter(|p| p.record.code_key() == record.code_key())
                .and_then(|p| p.code.get().cloned())
        });
        if record.is_latest() {
            self.governor
                .set_reserved(&record.name, record.reserved_concurrency);
        }
        let slot = Arc::new(FunctionSlot::new(record, task_dir, opt_dir, code));
        entry
            .versions
            .insert(slot.record.version.clone(), slot.clone());
        drop(functions);
        if let Some(previous) = previous {
            previous.retire();
        }
        // Provisioned environments of the version start over on the new slot.
        self.wake_provisioned(&slot.record.name);
    }

    /// Forgets one published version.
    pub fn remove_version(&self, name: &str, version: &str) {
        let removed = self
            .write_functions()
            .get_mut(name)
            .and_then(|e| e.versions.remove(version));
        if let Some(slot) = removed {
            slot.retire();
        }
    }

    /// Sets (or, with `None`, removes) an alias's route.
    pub fn set_alias(&self, name: &str, alias: &str, route: Option<AliasRoute>) {
        let mut functions = self.write_functions();
        let Some(entry) = functions.get_mut(name) else {
            return;
        };
        match route {
            Some(r) => entry.aliases.insert(alias.to_owned(), r),
            None => entry.aliases.remove(alias),
        };
    }

    /// Forgets a function: its versions, aliases and provisioned
    /// environments.
    pub fn remove(&self, name: &str) {
        let removed = self.write_functions().remove(name);
        self.activity.remove(name);
        self.provisioned_lock()
            .retain(|(function, _), _| function != name);
        self.governor.set_reserved(name, None);
        self.event_configs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(function, _), _| function != name);
        if let Some(entry) = removed {
            for slot in entry.versions.values() {
                slot.retire();
            }
        }
    }

    /// A function's tags (`aws:ResourceTag/*` of requests that name it);
    /// none for a function that does not exist.
    pub fn function_tags(&self, name: &str) -> Vec<(String, String)> {
        self.slot(name, LATEST)
            .map(|slot| {
                slot.record
                    .tags
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Checks that a function and qualifier exist (for `DryRun`).
    pub fn exists(&self, name: &str, qualifier: Option<&str>) -> Result<(), InvokeError> {
        self.resolve(name, qualifier).map(|_| ())
    }

    fn resolve(
        &self,
        name: &str,
        qualifier: Option<&str>,
    ) -> Result<Arc<FunctionSlot>, InvokeError> {
        let functions = self.read_functions();
        functions
            .get(name)
            .and_then(|e| e.resolve(qualifier, fastrand::f64()))
            .ok_or_else(|| {
                InvokeError::NotFound(match qualifier {
                    Some(q) => self.arn.qualified_arn(name, q),
                    None => self.arn.function_arn(name),
                })
            })
    }

    /// The version a qualifier currently names, if any.
    pub fn version_of(&self, name: &str, qualifier: &str) -> Option<String> {
        self.read_functions().get(name)?.version_of(qualifier)
    }

    /// Keeps function logs in `store` from now on.
    pub fn set_log_store(&self, store: logstore::LogStore) {
        let _ = self.logs.set(store);
    }

    /// The function log store, once set.
    pub fn logs(&self) -> Option<&logstore::LogStore> {
        self.logs.get()
    }

    async fn store_log(&self, function: &str, stream: &str, log: &LogBuilder) {
        if let Some(store) = self.logs.get() {
            store
                .append(function, stream, log.text())
                .instrument(tracing::info_span!(target: TRACE, "store_log"))
                .await;
        }
    }

    /// Counts a finished invocation in metrics and activity.
    fn observe(&self, m: crate::metrics::InvocationMetrics<'_>, a: activity::Finished<'_>) {
        if self.config.telemetry {
            self.metrics.invocation(m);
            self.activity.finished(&a);
        }
    }

    /// Recent activity per function, for the console.
    pub fn activity(&self) -> &activity::Activity {
        &self.activity
    }

    /// What the data plane has counted.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The gauges of `/metrics`, read now.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let mut environments: HashMap<(&'static str, &'static str), u64> = HashMap::new();
        let mut concurrency = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for slot in self.slots() {
            let kind = self
                .sandboxes
                .for_runtime(&slot.record.runtime)
                .map_or("none", |s| s.kind().as_str());
            *environments.entry((kind, "idle")).or_default() += slot.idle.len() as u64;
            *environments.entry((kind, "provisioned")).or_default() +=
                slot.provisioned.len() as u64;
            names.insert(slot.record.name.clone());
        }
        let alive = (self.config.max_environments - self.capacity.available_permits()) as u64;
        let warm: u64 = environments.values().sum();
        let kinds: Vec<&'static str> = environments.keys().map(|(k, _)| *k).collect();
        // Busy environments are not filed by function; count them under the
        // sandbox of the only kind in use, else as `mixed`.
        let busy_kind = match kinds.first() {
            Some(first) if kinds.iter().all(|k| k == first) => *first,
            _ => "mixed",
        };
        environments.insert((busy_kind, "busy"), alive.saturating_sub(warm));
        for name in names {
            let n = self.governor.in_flight(&name);
            concurrency.push((name, n));
        }
        crate::metrics::Snapshot {
            environments: environments
                .into_iter()
                .map(|((sandbox, state), n)| (sandbox, state, n))
                .collect(),
            concurrency,
            queue_depth: self.queue.depth().unwrap_or(0),
        }
    }

    /// Runs one synchronous invocation.
    pub async fn invoke(&self, input: InvokeInput) -> Result<InvokeOutput, InvokeError> {
        let function = input.name.clone();
        let result = self.run_invocation(input).await;
        if let Err(InvokeError::Throttled { .. } | InvokeError::MemoryBudget { .. }) = &result
            && self.config.telemetry
        {
            self.metrics.throttle(&function);
            self.activity.throttled(&function);
        }
        result
    }

    async fn run_invocation(&self, input: InvokeInput) -> Result<InvokeOutput, InvokeError> {
        let route = tracing::info_span!(
            target: TRACE,
            "route",
            function = %input.name,
            qualifier = input.qualifier.as_deref().unwrap_or(""),
            version = tracing::field::Empty,
        );
        let (slot, admitted) = route.in_scope(|| {
            let slot = self.resolve(&input.name, input.qualifier.as_deref())?;
            tracing::Span::current().record("version", slot.record.version.as_str());
            // Admission first: a throttled call does no work and holds nothing.
            let admitted = self
                .governor
                .acquire(&input.name)
                .map_err(|reason| InvokeError::Throttled { reason })?;
            Ok::<_, InvokeError>((slot, admitted))
        })?;
        let concurrency = admitted.in_flight;
        let request_id = input
            .request_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let record = slot.record.clone();
        let invoked_arn = match &input.qualifier {
            Some(q) => self.arn.qualified_arn(&record.name, q),
            None => self.arn.function_arn(&record.name),
        };

        let mut log = LogBuilder::new(input.log_tail, &record.logging, &request_id);
        log.start(&record.version);

        let acquire = tracing::info_span!(
            target: TRACE,
            "acquire_environment",
            warm = tracing::field::Empty
        );
        let warm = acquire.in_scope(|| self.take_warm(&slot));
        acquire.record("warm", warm.is_some());
        let (mut env, init_duration) = match warm {
            Some(env) => (env, None),
            None => {
                let (env, init, stream) = self
                    .create_environment(&slot, InitType::OnDemand, None)
                    .instrument(acquire)
                    .await?;
                log.raw(&init.logs);
                match (env, init.error) {
                    (Some(env), None) => (env, Some(init.duration)),
                    (_, error) => {
                        log.finish(&record, logs::Status::Error, Duration::ZERO, 0, None);
                        self.store_log(&record.name, &stream, &log).await;
                        let error = error.unwrap_or(Outcome::Failed {
                            error_type: "Runtime.Unknown".to_owned(),
                            message: "the environment failed to start".to_owned(),
                        });
                        self.observe(
                            crate::metrics::InvocationMetrics {
                                function: &record.name,
                                version: &record.version,
                                duration: Duration::ZERO,
                                memory_mb: record.memory_size,
                                init: Some(init.duration),
                                error: true,
                                provisioned: false,
                                spilled: self.has_provisioned(&record.name, &record.version),
                            },
                            activity::Finished {
                                function: &record.name,
                                version: &record.version,
                                request_id: &request_id,
                                log_stream: &stream,
                                duration: Duration::ZERO,
                                init: Some(init.duration),
                                error: Some(error_type(&error)),
                                concurrency,
                            },
                        );
                        return Ok(failure_output(request_id, &record, error, log));
                    }
                }
            }
        };

        let request = InvocationRequest {
            payload: input.payload,
            request_id: request_id.clone(),
            function_name: record.name.clone(),
            function_version: record.version.clone(),
            invoked_function_arn: invoked_arn,
            trace_id: input.trace_id.unwrap_or_else(new_trace_id),
            timeout: Duration::from_secs(u64::from(record.timeout)),
            client_context: input.client_context,
        };
        let report = env
            .invoke(&request)
            .instrument(tracing::info_span!(
                target: TRACE,
                "invoke",
                faas.invocation_id = %request_id,
                faas.name = %record.name,
                faas.version = %record.version,
            ))
            .await;
        // The invocation no longer runs: it leaves the concurrency count
        // before it is counted as done, so that anyone who sees it in the
        // totals sees it gone from the count.
        drop(admitted);
        let provisioned = env.is_provisioned();
        let failed = !matches!(&report.outcome, Outcome::Response(p) if p.len() <= MAX_RESPONSE);
        self.observe(
            crate::metrics::InvocationMetrics {
                function: &record.name,
                version: &record.version,
                duration: report.duration,
                memory_mb: record.memory_size,
                init: init_duration,
                error: failed,
                provisioned,
                spilled: !provisioned && self.has_provisioned(&record.name, &record.version),
            },
            activity::Finished {
                function: &record.name,
                version: &record.version,
                request_id: &request_id,
                log_stream: env.log_stream(),
                duration: report.duration,
                init: init_duration,
                error: failed.then(|| match &report.outcome {
                    Outcome::Response(_) => "Function.ResponseSizeTooLarge",
                    other => error_type(other),
                }),
                concurrency,
            },
        );
        log.raw(&report.logs);
        log.failure(&report.outcome, request.timeout);
        log.finish(
            &record,
            logs::Status::of(&report.outcome),
            report.duration,
            report.max_memory_bytes,
            init_duration,
        );
        self.store_log(&record.name, env.log_stream(), &log).await;

        if env.is_reusable() && !slot.is_retired() && !env.is_expired(self.config.env_lease) {
            if env.is_provisioned() {
                slot.provisioned.push(env);
            } else {
                slot.idle.push(env);
            }
        }
        let output = match report.outcome {
            Outcome::Response(payload) if payload.len() > MAX_RESPONSE => {
                failure_output(request_id, &record, kiln_proto::response_too_large(), log)
            }
            Outcome::Response(payload) => InvokeOutput {
                request_id,
                executed_version: record.version.clone(),
                function_error: None,
                payload,
                log_result: log.tail(),
            },
            other => failure_output(request_id, &record, other, log),
        };
        Ok(output)
    }

    /// Creates and initializes an environment for `slot`. Returns the
    /// environment when init succeeded, and the init report either way.
    async fn create_environment(
        &self,
        slot: &Arc<FunctionSlot>,
        init_type: InitType,
        lease: Option<ProvisionedLease>,
    ) -> Result<(Option<Environment>, InitReport, String), InvokeError> {
        let sandbox = self
            .sandboxes
            .for_runtime(&slot.record.runtime)
            .map_err(|e| InvokeError::InvalidCode(e.to_string()))?
            .clone();
        let code = slot
            .code
            .get_or_try_init(|| async { sandbox.prepare(&slot.code_spec()).await })
            .await
            .map_err(|e| match e {
                SandboxError::InvalidCode(m) => InvokeError::InvalidCode(m),
                other => InvokeError::Internal(other.to_string()),
            })?
            .clone();
        let permit = self.acquire_capacity(
            record_memory(&slot.record).saturating_add(sandbox.memory_overhead_mb(&code)),
        )?;
        let dir = self
            .envs
            .create(slot.record.ephemeral_storage)
            .map_err(|e| {
                InvokeError::Internal(format!("creating the environment's directory: {e}"))
            })?;
        let record = &slot.record;
        let stream = log_stream_name(record, dir.id());
        let mut variables = lambda_environment(record, &self.arn, &stream, init_type);
        variables.extend(self.role_credentials(record, dir.id()));
        if let Some(endpoint) = sandbox.kiln_endpoint()
            && !variables
                .iter()
                .any(|(k, _)| k == "AWS_ENDPOINT_URL_LAMBDA")
        {
            variables.push(("AWS_ENDPOINT_URL_LAMBDA".to_owned(), endpoint));
        }
        let spec = EnvironmentSpec {
            memory_mb: record.memory_size,
            env: variables,
            task_dir: slot.task_dir.clone(),
            opt_dir: slot.opt_dir.clone(),
            tmp_dir: dir.tmp(),
            tmp_is_disk: self.envs.has_scratch_disks(),
            env_dir: dir.path().to_path_buf(),
            ephemeral_mb: record.ephemeral_storage,
            log_capacity: self.config.log_capacity,
        };
        let mut env = sandbox
            .create(&code, spec)
            .instrument(tracing::info_span!(
                target: TRACE,
                "create_sandbox",
                sandbox = sandbox.kind().as_str(),
            ))
            .await
            .map_err(|e| match e {
                SandboxError::Capacity(_) => InvokeError::Throttled {
                    reason: "ConcurrentInvocationLimitExceeded",
                },
                other => InvokeError::Internal(other.to_string()),
            })?;
        let init = env
            .init(INIT_TIMEOUT)
            .instrument(tracing::info_span!(target: TRACE, "init", init_type = init_type.as_str()))
            .await;
        if init.error.is_some() {
            return Ok((None, init, stream));
        }
        Ok((
            Some(Environment::new(env, dir, permit, lease, stream.clone())),
            init,
            stream,
        ))
    }

    /// A slot for one more environment and `memory_mb` of the host's memory
    /// budget: free ones, else those of the longest-idle on-demand
    /// environments of any function (dropped to make room), else
    /// throttled.
    fn acquire_capacity(&self, memory_mb: u32) -> Result<Reservation, InvokeError> {
        let too_much = || InvokeError::MemoryBudget {
            needed_mb: memory_mb,
            budget_mb: self.config.memory_budget_mb,
        };
        if u64::from(memory_mb) > self.config.memory_budget_mb {
            return Err(too_much());
        }
        // Evict only when that makes enough room: a function that cannot
        // fit must not cost every other function its warm environments.
        let idle_mb: u64 = self.slots().iter().map(|s| s.idle.reserved_mb()).sum();
        if self.memory.available_permits() as u64 + idle_mb < u64::from(memory_mb) {
            return Err(too_much());
        }
        let mut slot = None;
        loop {
            if slot.is_none() {
                slot = self.capacity.clone().try_acquire_owned().ok();
            }
            let memory = self.memory.clone().try_acquire_many_owned(memory_mb).ok();
            if let (Some(_), Some(memory)) = (&slot, memory) {
                return Ok(Reservation {
                    _slot: slot.take().expect("checked above"),
                    memory,
                });
            }
            let oldest = self
                .slots()
                .into_iter()
                .filter_map(|s| s.idle.oldest_idle_since().map(|t| (t, s)))
                .min_by_key(|(t, _)| *t);
            match oldest {
                Some((_, idle)) => {
                    // Dropping the environment returns its slot and memory.
                    drop(idle.idle.pop_oldest());
                }
                None if slot.is_none() => {
                    return Err(InvokeError::Throttled {
                        reason: "ConcurrentInvocationLimitExceeded",
                    });
                }
                None => return Err(too_much()),
            }
        }
    }

    /// The host's memory budget for environments and how much of it they
    /// hold now, in MiB.
    pub fn memory_budget(&self) -> (u64, u64) {
        let budget = self.config.memory_budget_mb;
        (
            budget,
            budget.saturating_sub(self.memory.available_permits() as u64),
        )
    }

    /// Environments currently idle, over all functions.
    pub fn idle_environments(&self) -> usize {
        self.slots()
            .iter()
            .map(|s| s.idle.len() + s.provisioned.len())
            .sum()
    }
}

/// What an environment of `record` reserves of the memory budget: its
/// MemorySize.
fn record_memory(record: &FunctionRecord) -> u32 {
    record.memory_size
}

/// An environment's share of the host: a slot of `max_environments` and
/// its memory; both return when it is dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    _slot: tokio::sync::OwnedSemaphorePermit,
    memory: tokio::sync::OwnedSemaphorePermit,
}

impl Reservation {
    /// MiB of the memory budget held.
    pub(crate) fn memory_mb(&self) -> u64 {
        self.memory.num_permits() as u64
    }
}

/// The error type of a failed outcome, as the console lists it.
fn error_type(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::FunctionError { error_type, .. } | Outcome::Failed { error_type, .. }
            if !error_type.is_empty() =>
        {
            error_type
        }
        _ => "Unhandled",
    }
}

fn failure_output(
    request_id: String,
    record: &FunctionRecord,
    outcome: Outcome,
    log: LogBuilder,
) -> InvokeOutput {
    let payload = match outcome {
        Outcome::FunctionError { body, .. } => body,
        Outcome::Failed {
            error_type,
            message,
        } => error_document(&error_type, &message),
        Outcome::Response(_) => unreachable!("a response is not a failure"),
    };
    InvokeOutput {
        request_id,
        executed_version: record.version.clone(),
        function_error: Some("Unhandled"),
        payload,
        log_result: log.tail(),
    }
}

impl DataPlane {
    /// Lets environments receive their execution role's credentials.
    pub fn set_credentials(&self, credentials: Arc<crate::auth::keys::Credentials>) {
        let _ = self.credentials.set(credentials);
    }

    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`
    /// of a new session of the function's role, when its Role names a kiln
    /// role. They last the environment's lease and five minutes more: an
    /// environment is replaced at its lease, and its successor gets new
    /// ones, so no environment holds expired credentials.
    fn role_credentials(&self, record: &FunctionRecord, env_id: &str) -> Vec<(String, String)> {
        let Some(credentials) = self.credentials.get() else {
            return Vec::new();
        };
        let role = match credentials.role(&record.role) {
            Ok(Some(role)) => role,
            Ok(None) => return Vec::new(),
            Err(e) => {
                tracing::error!(function = %record.name, error = %e, "looking up the execution role");
                return Vec::new();
            }
        };
        let lifetime = self.config.env_lease + Duration::from_secs(300);
        let session = credentials.issue_session(
            &role,
            &format!("{}-{env_id}", record.name),
            lifetime,
            Some(&self.arn.function_arn(&record.name)),
        );
        vec![
            ("AWS_ACCESS_KEY_ID".to_owned(), session.access_key_id),
            (
                "AWS_SECRET_ACCESS_KEY".to_owned(),
                session.secret_access_key.expose().to_owned(),
            ),
            ("AWS_SESSION_TOKEN".to_owned(), session.session_token),
        ]
    }
}

/// The environment variables Lambda sets, then the function's own.
/// The log stream of a new environment, as Lambda names it.
fn log_stream_name(record: &FunctionRecord, env_id: &str) -> String {
    let date = time::OffsetDateTime::now_utc().date();
    format!(
        "{:04}/{:02}/{:02}/[{}]{env_id}",
        date.year(),
        u8::from(date.month()),
        date.day(),
        record.version,
    )
}

fn lambda_environment(
    record: &FunctionRecord,
    arn: &ArnContext,
    stream: &str,
    init_type: InitType,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("AWS_LAMBDA_FUNCTION_NAME".to_owned(), record.name.clone()),
        (
            "AWS_LAMBDA_FUNCTION_VERSION".to_owned(),
            record.version.clone(),
        ),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE".to_owned(),
            record.memory_size.to_string(),
        ),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME".to_owned(),
            record
                .logging
                .log_group
                .clone()
                .unwrap_or_else(|| format!("/aws/lambda/{}", record.name)),
        ),
        ("AWS_LAMBDA_LOG_STREAM_NAME".to_owned(), stream.to_owned()),
        (
            "AWS_LAMBDA_INITIALIZATION_TYPE".to_owned(),
            init_type.as_str().to_owned(),
        ),
        ("AWS_REGION".to_owned(), arn.region.clone()),
        ("AWS_DEFAULT_REGION".to_owned(), arn.region.clone()),
        ("LAMBDA_TASK_ROOT".to_owned(), "/var/task".to_owned()),
        ("LAMBDA_RUNTIME_DIR".to_owned(), "/var/runtime".to_owned()),
        ("_HANDLER".to_owned(), record.handler.clone()),
        ("TZ".to_owned(), ":UTC".to_owned()),
        ("LANG".to_owned(), "en_US.UTF-8".to_owned()),
    ];
    // As Lambda tells its runtimes, so that a runtime client can write JSON
    // and filter by level itself.
    if record.logging.json {
        env.push(("AWS_LAMBDA_LOG_FORMAT".to_owned(), "JSON".to_owned()));
        env.push((
            "AWS_LAMBDA_LOG_LEVEL".to_owned(),
            record.logging.application_level().as_str().to_owned(),
        ));
    }
    match crate::control::runtimes::lookup(&record.runtime).map(|r| r.family) {
        Some(crate::control::runtimes::Family::Native) => env.extend([
            (
                "AWS_LAMBDA_RUNTIME_API".to_owned(),
                "127.0.0.1:9001".to_owned(),
            ),
            (
                "PATH".to_owned(),
                "/usr/local/bin:/usr/bin/:/bin:/opt/bin".to_owned(),
            ),
            (
                "LD_LIBRARY_PATH".to_owned(),
                "/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib"
                    .to_owned(),
            ),
        ]),
        _ => env.push((
            "AWS_EXECUTION_ENV".to_owned(),
            format!("AWS_Lambda_{}", record.runtime),
        )),
    }
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
