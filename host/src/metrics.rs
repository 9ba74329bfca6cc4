//! What `/metrics` reports: per-function counters and histograms the data
//! plane records as invocations happen, and host gauges read at scrape
//! time. Encoded by `prometheus-client` in the OpenMetrics text format.
//!
//! Label sets are small: `function` and `version` (or `function` alone
//! where Lambda's metric has no version), so the number of series grows
//! with deployed versions, not with traffic.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Buckets from 100 µs to about 15 min, in seconds: Wasm invocations take
/// well under a millisecond, Lambda's longest timeout is 900 s.
fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    ])
}

/// Event ages, in seconds: up to Lambda's 6-hour maximum.
fn age_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0,
    ])
}

fn fv(function: &str, version: &str) -> Labels {
    vec![
        ("function", function.to_owned()),
        ("version", version.to_owned()),
    ]
}

fn f(function: &str) -> Labels {
    vec![("function", function.to_owned())]
}

/// How one invocation ended, for [`Metrics::invocation`].
#[derive(Debug, Clone, Copy)]
pub struct InvocationMetrics<'a> {
    pub function: &'a str,
    pub version: &'a str,
    /// Run time of the handler (zero when init failed).
    pub duration: Duration,
    /// MemorySize in MiB, for GB-seconds.
    pub memory_mb: u32,
    /// Set on a cold start: how long init took.
    pub init: Option<Duration>,
    /// A function error, a timeout, a crash: anything but a response.
    pub error: bool,
    /// Served by a provisioned environment.
    pub provisioned: bool,
    /// The function has provisioned concurrency but this ran on demand.
    pub spilled: bool,
}

/// The data plane's metrics.
pub struct Metrics {
    registry: Registry,
    invocations: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    throttles: Family<Labels, Counter>,
    duration: Histograms,
    init_duration: Histograms,
    cold_starts: Family<Labels, Counter>,
    provisioned_used: Family<Labels, Counter>,
    provisioned_spilled: Family<Labels, Counter>,
    async_received: Family<Labels, Counter>,
    async_age: Histograms,
    async_dropped: Family<Labels, Counter>,
    dead_letter_errors: Family<Labels, Counter>,
    destination_failures: Family<Labels, Counter>,
    billed_ms: Family<Labels, Counter>,
    gb_seconds: Family<Labels, Counter<f64, AtomicU64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            invocations: Family::default(),
            errors: Family::default(),
            throttles: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            init_duration: Family::new_with_constructor(duration_histogram),
            cold_starts: Family::default(),
            provisioned_used: Family::default(),
            provisioned_spilled: Family::default(),
            async_received: Family::default(),
            async_age: Family::new_with_constructor(age_histogram),
            async_dropped: Family::default(),
            dead_letter_errors: Family::default(),
            destination_failures: Family::default(),
            billed_ms: Family::default(),
            gb_seconds: Family::default(),
            registry: Registry::with_prefix("kiln"),
        };
        let registry = &mut m.registry;
        registry.register(
            "invocations",
            "Invocations that ran (or failed to start) per function version",
            m.invocations.clone(),
        );
        registry.register(
            "errors",
            "Invocations that ended in a function error, timeout or crash",
            m.errors.clone(),
        );
        registry.register(
            "throttles",
            "Invocations refused for concurrency (429 TooManyRequestsException)",
            m.throttles.clone(),
        );
        registry.register(
            "duration_seconds",
            "Handler run time per invocation",
            m.duration.clone(),
        );
        registry.register(
            "init_duration_seconds",
            "Init phase time of each new environment that served a call",
            m.init_duration.clone(),
        );
        registry.register(
            "cold_starts",
            "Invocations that had to create their environment",
            m.cold_starts.clone(),
        );
        registry.register(
            "provisioned_concurrency_invocations",
            "Invocations served by a provisioned environment",
            m.provisioned_used.clone(),
        );
        registry.register(
            "provisioned_concurrency_spillover_invocations",
            "Invocations of a function with provisioned concurrency that ran on demand",
            m.provisioned_spilled.clone(),
        );
        registry.register(
            "async_events_received",
            "Events accepted by asynchronous Invoke",
            m.async_received.clone(),
        );
        registry.register(
            "async_event_age_seconds",
            "Time from enqueue to each attempt's start",
            m.async_age.clone(),
        );
        registry.register(
            "async_events_dropped",
            "Events given up on (retries exhausted or too old), by reason",
            m.async_dropped.clone(),
        );
        registry.register(
            "dead_letter_errors",
            "Failure records that could not reach their OnFailure destination",
            m.dead_letter_errors.clone(),
        );
        registry.register(
            "destination_delivery_failures",
            "Records that could not reach their destination (success or failure)",
            m.destination_failures.clone(),
        );
        registry.register(
            "billed_milliseconds",
            "Billed duration (rounded up to 1 ms) per function version",
            m.billed_ms.clone(),
        );
        registry.register(
            "gb_seconds",
            "Billed GB-seconds (billed duration x MemorySize) per function version",
            m.gb_seconds.clone(),
        );
        m
    }

    /// Records one invocation that reached an environment (or failed to
    /// create one).
    pub fn invocation(&self, i: InvocationMetrics<'_>) {
        let labels = fv(i.function, i.version);
        self.invocations.get_or_create(&labels).inc();
        if i.error {
            self.errors.get_or_create(&labels).inc();
        }
        self.duration
            .get_or_create(&labels)
            .observe(i.duration.as_secs_f64());
        if let Some(init) = i.init {
            self.cold_starts.get_or_create(&labels).inc();
            self.init_duration
                .get_or_create(&labels)
                .observe(init.as_secs_f64());
        }
        if i.provisioned {
            self.provisioned_used.get_or_create(&labels).inc();
        }
        if i.spilled {
            self.provisioned_spilled.get_or_create(&labels).inc();
        }
        let billed = billed_ms(i.duration);
        self.billed_ms.get_or_create(&labels).inc_by(billed);
        self.gb_seconds
            .get_or_create(&labels)
            .inc_by(billed as f64 / 1000.0 * f64::from(i.memory_mb) / 1024.0);
    }

    pub fn throttle(&self, function: &str) {
        self.throttles.get_or_create(&f(function)).inc();
    }

    pub fn async_received(&self, function: &str) {
        self.async_received.get_or_create(&f(function)).inc();
    }

    pub fn async_attempt(&self, function: &str, age: Duration) {
        self.async_age
            .get_or_create(&f(function))
            .observe(age.as_secs_f64());
    }

    pub fn async_dropped(&self, function: &str, reason: &str) {
        let mut labels = f(function);
        labels.push(("reason", reason.to_owned()));
        self.async_dropped.get_or_create(&labels).inc();
    }

    /// A record that did not reach its destination; `on_failure` says which
    /// kind of destination it was.
    pub fn destination_failure(&self, function: &str, on_failure: bool) {
        self.destination_failures.get_or_create(&f(function)).inc();
        if on_failure {
            self.dead_letter_errors.get_or_create(&f(function)).inc();
        }
    }

    /// The registry's text, followed by `gauges`' (read now).
    pub fn encode(&self, gauges: &Registry) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        // Each encode ends with `# EOF`; only the last may.
        if let Some(body) = text.strip_suffix("# EOF\n") {
            text.truncate(body.len());
        }
        encode(&mut text, gauges)?;
        Ok(text)
    }
}

/// Lambda bills duration rounded up to the millisecond, at least 1 ms.
pub fn billed_ms(duration: Duration) -> u64 {
    let ms = duration.as_secs_f64() * 1000.0;
    ms.ceil().max(1.0) as u64
}

/// Gauges computed at scrape time.
pub struct Snapshot {
    /// (sandbox, state, count): state is `busy`, `idle` or `provisioned`.
    pub environments: Vec<(&'static str, &'static str, u64)>,
    /// (function, in flight).
    pub concurrency: Vec<(String, u32)>,
    /// Events waiting in the asynchronous queue.
    pub queue_depth: u64,
}

/// The scrape-time gauges as a registry of their own.
pub fn snapshot_registry(s: &Snapshot) -> Registry {
    let mut registry = Registry::with_prefix("kiln");
    let envs = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    registry.register(
        "environments",
        "Execution environments alive, by sandbox and state",
        envs.clone(),
    );
    for (sandbox, state, n) in &s.environments {
        envs.get_or_create(&vec![("sandbox", *sandbox), ("state", *state)])
            .set(*n as i64);
    }
    let concurrent = Family::<Labels, Gauge>::default();
    registry.register(
        "concurrent_executions",
        "Invocations in progress per function",
        concurrent.clone(),
    );
    for (function, n) in &s.concurrency {
        concurrent.get_or_create(&f(function)).set(i64::from(*n));
    }
    let depth = Gauge::<i64>::default();
    depth.set(s.queue_depth as i64);
    registry.register(
        "async_queue_depth",
        "Events waiting in the asynchronous invocation queue",
        depth,
    );
    let memory = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    registry.register(
        "host_memory_bytes",
        "Memory of the host (total, available) and of the kiln process (resident)",
        memory.clone(),
    );
    for (kind, bytes) in host_memory() {
        memory
            .get_or_create(&vec![("kind", kind)])
            .set(bytes as i64);
    }
    registry
}

/// `MemTotal` and `MemAvailable` of the host, and this process's RSS.
fn host_memory() -> Vec<(&'static str, u64)> {
    let read = |path| std::fs::read_to_string(path).unwrap_or_default();
    let (meminfo, status) = (read("/proc/meminfo"), read("/proc/self/status"));
    [
        (&meminfo, "MemTotal:", "total"),
        (&meminfo, "MemAvailable:", "available"),
        (&status, "VmRSS:", "kiln_resident"),
    ]
    .into_iter()
    .filter_map(|(text, key, kind)| Some((kind, kib_field(text, key)? * 1024)))
    .collect()
}

/// The value of a `Key:   123 kB` line of a /proc file.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{{labels}}} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn billing_rounds_up_to_the_millisecond() {
        assert_eq!(billed_ms(Duration::from_micros(1)), 1);
        assert_eq!(billed_ms(Duration::from_micros(1001)), 2);
        assert_eq!(billed_ms(Duration::from_millis(100)), 100);
        assert_eq!(billed_ms(Duration::ZERO), 1);
    }

    #[test]
    fn an_invocation_moves_its_series() {
        let m = Metrics::new();
        for error in [false, true, false] {
            m.invocation(InvocationMetrics {
                function: "f",
                version: "$LATEST",
                duration: Duration::from_micros(1500),
                memory_mb: 512,
                init: error.then_some(Duration::from_millis(3)),
                error,
                provisioned: false,
                spilled: false,
            });
        }
        m.throttle("f");
        let text = m
            .encode(&snapshot_registry(&Snapshot {
                environments: vec![("wasm", "idle", 2)],
                concurrency: vec![("f".into(), 0)],
                queue_depth: 4,
            }))
            .unwrap();
        let fv = r#"function="f",version="$LATEST""#;
        assert_eq!(sample(&text, "kiln_invocations_total", fv), Some(3.0));
        assert_eq!(sample(&text, "kiln_errors_total", fv), Some(1.0));
        assert_eq!(sample(&text, "kiln_cold_starts_total", fv), Some(1.0));
        assert_eq!(
            sample(&text, "kiln_billed_milliseconds_total", fv),
            Some(6.0)
        );
        // 6 ms at 0.5 GB.
        assert_eq!(sample(&text, "kiln_gb_seconds_total", fv), Some(0.003));
        assert_eq!(
            sample(&text, "kiln_throttles_total", r#"function="f""#),
            Some(1.0)
        );
        assert_eq!(sample(&text, "kiln_duration_seconds_count", fv), Some(3.0));
        assert_eq!(
            sample(&text, "kiln_environments", r#"sandbox="wasm",state="idle""#),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "kiln_async_queue_depth", "").or_else(|| {
                text.lines()
                    .find(|l| l.starts_with("kiln_async_queue_depth "))
                    .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            }),
            Some(4.0)
        );
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }
}
