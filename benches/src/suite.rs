//! The scenarios a user compares platforms by: throughput over
//! concurrency (a no-op and a 64 KB echo), an open-loop run, cold start per
//! sandbox over new versions, scale-up of one new function, and warm
//! environments per GiB.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;

use crate::load::Http;
use crate::stats::Summary;
use crate::{Scenario, leak};

/// Concurrency levels of the sweep.
pub const LEVELS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// The 64 KB echo's event: `misbehave` returns its `arg`.
pub fn echo_event() -> Bytes {
    let arg = "x".repeat(64 * 1024);
    Bytes::from(format!(r#"{{"action":"echo","arg":"{arg}"}}"#))
}

/// Closed-loop throughput and latency at each level of [`LEVELS`].
pub async fn sweep(
    http: &Arc<Http>,
    label: &'static str,
    function: &str,
    workload: &'static str,
    event: Bytes,
    quick: bool,
) -> Result<Vec<Scenario>> {
    let path = format!("/2015-03-31/functions/{function}/invocations");
    let mut out = Vec::new();
    for c in LEVELS {
        let total = if quick { c * 10 } else { (c * 400).max(4000) };
        http.closed_loop(&path, &[], event.clone(), c, c * 5, 200)
            .await?;
        let (answers, elapsed) = http
            .closed_loop(&path, &[], event.clone(), c, total, 200)
            .await?;
        let latencies: Vec<Duration> = answers.iter().map(|a| a.latency).collect();
        out.push(Scenario {
            name: leak(format!("sweep-{label}-c{c}")),
            description: "warm invocations from closed-loop clients, one keep-alive connection each",
            workload,
            payload_bytes: event.len(),
            concurrency: c,
            samples: latencies.len(),
            latency_us: Summary::of(&latencies),
            throughput_rps: Some(latencies.len() as f64 / elapsed.as_secs_f64()),
            figure: None,
        });
    }
    Ok(out)
}

/// Requests at a fixed rate whatever the answers; latency from each
/// request's scheduled time, so a stall counts against every request it
/// delays.
pub async fn open_loop(
    http: &Arc<Http>,
    function: &str,
    event: Bytes,
    rate: f64,
    duration: Duration,
) -> Result<Scenario> {
    let path = format!("/2015-03-31/functions/{function}/invocations");
    let run = http.open_loop(&path, event.clone(), rate, duration).await?;
    let late = Summary::of(&run.lateness);
    Ok(Scenario {
        name: leak(format!("open-loop-noop-{rate:.0}rps")),
        description: "warm invocations sent at a fixed rate (open loop) on as many connections as needed; throughput is the rate achieved",
        workload: "examples/hello",
        payload_bytes: event.len(),
        concurrency: run.connections,
        samples: run.latencies.len(),
        latency_us: Summary::of(&run.latencies),
        throughput_rps: Some(run.latencies.len() as f64 / run.elapsed.as_secs_f64()),
        figure: Some(format!(
            "offered {rate:.0}/s on {} connections; sends late by p50 {} p99 {} (timer grain)",
            run.connections,
            crate::stats::fmt_us(late.p50),
            crate::stats::fmt_us(late.p99)
        )),
    })
}

/// The first invocation of each of `n` new versions of `function`: each
/// version gets its first environment on that call (a cold start), over a
/// fresh connection.
pub async fn cold_versions(
    http: &Http,
    function: &str,
    event: &[u8],
    n: usize,
) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let body = serde_json::to_vec(&serde_json::json!({ "Description": format!("v{i}") }))?;
        let (status, answer) = http
            .request(
                "PUT",
                &format!("/2015-03-31/functions/{function}/configuration"),
                body,
            )
            .await?;
        if status != 200 {
            bail!(
                "UpdateFunctionConfiguration: {status} {}",
                String::from_utf8_lossy(&answer)
            );
        }
        let (status, answer) = http
            .request(
                "POST",
                &format!("/2015-03-31/functions/{function}/versions"),
                b"{}".to_vec(),
            )
            .await?;
        if status != 201 {
            bail!(
                "PublishVersion: {status} {}",
                String::from_utf8_lossy(&answer)
            );
        }
        let version: serde_json::Value = serde_json::from_slice(&answer)?;
        let version = version["Version"].as_str().unwrap_or("$LATEST").to_owned();
        let path = format!("/2015-03-31/functions/{function}/invocations?Qualifier={version}");
        let t = Instant::now();
        let (status, answer) = http.request("POST", &path, event.to_vec()).await?;
        samples.push(t.elapsed());
        if status != 200 || answer.starts_with(b"{\"errorType\"") {
            bail!(
                "first invoke of {function}:{version}: {status} {}",
                String::from_utf8_lossy(&answer)
            );
        }
    }
    Ok(samples)
}

/// `clients` first calls of one new function at once: how long until all
/// are answered, and each one's latency.
pub async fn scale_up(
    http: &Arc<Http>,
    function: &str,
    event: Bytes,
    clients: usize,
) -> Result<Scenario> {
    let path = format!("/2015-03-31/functions/{function}/invocations");
    let (answers, elapsed) = http
        .closed_loop(&path, &[], event.clone(), clients, clients, 200)
        .await?;
    let latencies: Vec<Duration> = answers.iter().map(|a| a.latency).collect();
    Ok(Scenario {
        name: leak(format!("scale-up-{clients}")),
        description: "concurrent first calls of a function just created: every call that finds no idle environment creates one",
        workload: "tests/functions/misbehave (sleep 50 ms)",
        payload_bytes: event.len(),
        concurrency: clients,
        samples: latencies.len(),
        latency_us: Summary::of(&latencies),
        throughput_rps: None,
        figure: Some(format!(
            "all {clients} answered in {:.1} ms",
            elapsed.as_secs_f64() * 1000.0
        )),
    })
}

/// Resident memory of this process (the in-process server and the load
/// generator) plus every jail's cgroup: what warm environments cost the
/// host.
pub fn host_memory_bytes() -> u64 {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    // cgroup v2, else v1's memory hierarchy.
    let jails = [
        "/sys/fs/cgroup/kiln/memory.current",
        "/sys/fs/cgroup/memory/kiln/memory.usage_in_bytes",
    ]
    .iter()
    .find_map(|f| std::fs::read_to_string(f).ok()?.trim().parse::<u64>().ok())
    .unwrap_or(0);
    rss + jails
}

/// Holds `n` warm environments of `function` (n overlapping calls that
/// sleep, so each needs its own environment) and reports how many fit in a
/// GiB of host memory at that cost.
pub async fn density(
    http: &Arc<Http>,
    function: &str,
    sandbox: &'static str,
    workload: &'static str,
    n: usize,
) -> Result<Scenario> {
    let event = Bytes::from_static(br#"{"action":"sleep","arg":300}"#);
    let before = host_memory_bytes();
    let path = format!("/2015-03-31/functions/{function}/invocations");
    let (answers, _) = http
        .closed_loop(&path, &[], event.clone(), n, n, 200)
        .await?;
    let after = host_memory_bytes();
    let per_env = after.saturating_sub(before) as f64 / n as f64;
    // The environments go once measured, so that they weigh on nothing
    // measured after.
    let (status, answer) = http
        .request(
            "DELETE",
            &format!("/2015-03-31/functions/{function}"),
            Vec::new(),
        )
        .await?;
    if status != 204 {
        bail!(
            "DeleteFunction {function}: {status} {}",
            String::from_utf8_lossy(&answer)
        );
    }
    let latencies: Vec<Duration> = answers.iter().map(|a| a.latency).collect();
    Ok(Scenario {
        name: leak(format!("density-{sandbox}")),
        description: "warm environments held after n overlapping calls; host memory (process RSS + jail cgroups) before and after",
        workload,
        payload_bytes: event.len(),
        concurrency: n,
        samples: n,
        latency_us: Summary::of(&latencies),
        throughput_rps: None,
        figure: Some(if per_env > 0.0 {
            format!(
                "{:.0} environments/GiB ({:.0} KiB each)",
                (1u64 << 30) as f64 / per_env,
                per_env / 1024.0
            )
        } else {
            "not measurable: host memory did not grow".to_owned()
        }),
    })
}
