//! kiln's benchmark harness.
//!
//! Starts kiln in this process on loopback (its own runtime and threads),
//! deploys the workloads through the API, drives them, and writes a JSON
//! report and a markdown table into `benches/results/`.
//!
//! ```text
//! cargo run -p kiln-bench --release -- [--quick] [--out DIR]
//! ```

mod charts;
mod load;
mod peers;
mod stats;
mod suite;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use clap::Parser;
use kiln::invoke::InvokeInput;
use kiln::server::{Server, ServerConfig};
use serde::Serialize;
use serde_json::json;

use load::Http;
use stats::Summary;

#[derive(Debug, Parser)]
#[command(about = "kiln's benchmarks")]
struct Args {
    /// Run every scenario briefly (the test suite's smoke run).
    #[arg(long)]
    quick: bool,
    /// Where to write the report.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Only the security costs (SigV4 verification, opening a sealed
    /// archive), written as `security.{json,md}`.
    #[arg(long)]
    security_only: bool,
    /// Skip the peers (`wasmtime serve` is installed on first use, which
    /// takes a quarter of an hour once).
    #[arg(long)]
    no_peers: bool,
}

#[derive(Debug, Serialize)]
struct Conditions {
    date: String,
    kiln_version: &'static str,
    cores: usize,
    memory_gib: f64,
    cpu: String,
    mode: &'static str,
    server: &'static str,
}

#[derive(Debug, Serialize)]
struct Scenario {
    name: &'static str,
    description: &'static str,
    workload: &'static str,
    payload_bytes: usize,
    concurrency: usize,
    samples: usize,
    latency_us: Summary,
    throughput_rps: Option<f64>,
    /// A figure the columns above do not hold (environments per GiB, a
    /// ratio to a peer, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    figure: Option<String>,
}

/// A name made at run time, for a report that lives as long as the run.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[derive(Debug, Serialize)]
struct Report {
    conditions: Conditions,
    scenarios: Vec<Scenario>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // As `kiln serve` does, before any thread: the servers this process
    // embeds mount environments' disks and working copies, which must not
    // outlive it.
    if let Err(e) = kiln::server::private_mount_namespace() {
        eprintln!("no private mount namespace ({e}): mounts are made in the host's");
    }
    if args.security_only {
        let report = Report {
            conditions: conditions(args.quick),
            scenarios: security_scenarios(args.quick)?,
        };
        return write_report_as(&args.out, &report, "security");
    }
    let hello = std::fs::read(kiln_test_support::wasm_function("hello"))
        .context("building examples/hello")?;
    let hello_zip = kiln::package::pack_component(&hello)?;
    let native_zip =
        build_native("examples/hello").context("building examples/hello as a native bootstrap")?;
    let misbehave = std::fs::read(kiln_test_support::wasm_function("misbehave"))
        .context("building tests/functions/misbehave")?;
    let misbehave_zip = kiln::package::pack_component(&misbehave)?;
    let peer_component = kiln_test_support::wasm_function("peer-noop-http");

    // The server gets its own runtime and threads, as it would in its own
    // process; the load generator runs on the main thread's runtime.
    let data = tempfile::tempdir()?;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln-server")
        .build()?;
    let (addr, state) = server_rt.block_on(start_server(
        &server_rt,
        bench_config(data.path().join("data")),
    ))?;

    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let scale = if args.quick { 20 } else { 1 };
    let mut scenarios = Vec::new();

    client_rt.block_on(async {
        let http = Http::new(addr);
        deploy(&http, "hello", &hello_zip).await?;
        let event = br#"{"name":"bench"}"#;

        // Warm invoke, server side: the data plane without HTTP.
        let n = 20_000 / scale;
        let data_plane = state.data.clone();
        let samples = server_rt
            .spawn(async move {
                let input = hello_input(event);
                for _ in 0..200 {
                    data_plane.invoke(input.clone()).await?;
                }
                let mut samples = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    let out = data_plane.invoke(input.clone()).await?;
                    samples.push(t.elapsed());
                    if out.function_error.is_some() {
                        bail!("hello failed: {}", String::from_utf8_lossy(&out.payload));
                    }
                }
                anyhow::Ok(samples)
            })
            .await??;
        scenarios.push(Scenario {
            name: "warm-invoke-server-side",
            description: "DataPlane::invoke of a warm Wasm environment, no HTTP",
            workload: "examples/hello",
            payload_bytes: event.len(),
            concurrency: 1,
            samples: samples.len(),
            latency_us: Summary::of(&samples),
            throughput_rps: None,
            figure: None,
        });

        // Warm invoke over HTTP on loopback, one connection, closed loop.
        let n = 20_000 / scale;
        let (samples, elapsed) = http.invoke_loop("hello", event, 200, n).await?;
        scenarios.push(Scenario {
            name: "warm-invoke-http",
            description: "POST .../invocations over HTTP/1.1 keep-alive on loopback, closed loop",
            workload: "examples/hello",
            payload_bytes: event.len(),
            concurrency: 1,
            samples: samples.len(),
            latency_us: Summary::of(&samples),
            throughput_rps: Some(samples.len() as f64 / elapsed.as_secs_f64()),
            figure: None,
        });

        // What logs at rest, metrics and console activity cost per
        // invocation: a second server with --telemetry off, measured in
        // alternating blocks with the first so that drift hits both alike.
        let quiet_config = ServerConfig {
            telemetry: false,
            ..bench_config(data.path().join("data-quiet"))
        };
        let (quiet_addr, quiet_state) = start_server(&server_rt, quiet_config).await?;
        let quiet_http = Http::new(quiet_addr);
        let quiet_plane = quiet_state.data.clone();
        deploy(&quiet_http, "hello", &hello_zip).await?;
        let (blocks, per_block) = if args.quick { (4, 50) } else { (40, 500) };
        let (on_plane, off_plane) = (state.data.clone(), quiet_plane);
        let (on, off) = server_rt
            .spawn(async move {
                let input = hello_input(event);
                for _ in 0..200 {
                    off_plane.invoke(input.clone()).await?;
                }
                let (mut on, mut off) = (Vec::new(), Vec::new());
                for _ in 0..blocks {
                    for (plane, out) in [(&on_plane, &mut on), (&off_plane, &mut off)] {
                        for _ in 0..per_block {
                            let t = Instant::now();
                            plane.invoke(input.clone()).await?;
                            out.push(t.elapsed());
                        }
                    }
                }
                anyhow::Ok((on, off))
            })
            .await??;
        for (name, description, samples) in [
            ("telemetry-on-server-side", "DataPlane::invoke of a warm Wasm environment with logs at rest, metrics and console activity (the default), interleaved with telemetry-off", on),
            ("telemetry-off-server-side", "the same on a server started with --telemetry off", off),
        ] {
            scenarios.push(Scenario {
                name,
                description,
                workload: "examples/hello",
                payload_bytes: event.len(),
                concurrency: 1,
                samples: samples.len(),
                latency_us: Summary::of(&samples),
                throughput_rps: None,
                figure: None,
            });
        }
        let (mut on, mut off) = (Vec::new(), Vec::new());
        let (mut on_time, mut off_time) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        quiet_http.invoke_loop("hello", event, 200, 1).await?;
        for _ in 0..blocks {
            let (s, t) = http.invoke_loop("hello", event, 5, per_block).await?;
            on.extend(s);
            on_time += t;
            let (s, t) = quiet_http.invoke_loop("hello", event, 5, per_block).await?;
            off.extend(s);
            off_time += t;
        }
        for (name, description, samples, time) in [
            ("telemetry-on-http", "warm invoke over HTTP with logs at rest, metrics and console activity (the default), interleaved with telemetry-off", on, on_time),
            ("telemetry-off-http", "the same on a server started with --telemetry off", off, off_time),
        ] {
            scenarios.push(Scenario {
                name,
                description,
                workload: "examples/hello",
                payload_bytes: event.len(),
                concurrency: 1,
                samples: samples.len(),
                latency_us: Summary::of(&samples),
                throughput_rps: Some(samples.len() as f64 / time.as_secs_f64()),
                figure: None,
            });
        }

        // First invoke of a newly created function: the environment is
        // created and initialized on this call (the component was compiled
        // at CreateFunction; this measures the cold start of the data plane).
        let n = (50 / scale).max(3);
        let mut first = Vec::with_capacity(n);
        let mut create = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("cold-{i}");
            let t = Instant::now();
            deploy(&http, &name, &hello_zip).await?;
            create.push(t.elapsed());
            let t = Instant::now();
            http.invoke_once(&name, event).await?;
            first.push(t.elapsed());
        }
        scenarios.push(Scenario {
            name: "first-invoke-after-create",
            description: "first Invoke of a function right after CreateFunction returned (cold start: instantiate + init + call), over HTTP",
            workload: "examples/hello",
            payload_bytes: event.len(),
            concurrency: 1,
            samples: first.len(),
            latency_us: Summary::of(&first),
            throughput_rps: None,
            figure: None,
        });
        // Asynchronous invocation: acknowledged events per second with 64
        // clients (each ack means the event is fsync'd), then the time from
        // an acknowledgement to the start of the invocation, one at a time.
        let queue_put = json!({ "DestinationConfig": { "OnSuccess": { "Destination": "arn:aws:sqs:us-east-1:000000000000:kiln-dlq" } } });
        let (status, body) = http
            .request(
                "PUT",
                "/2019-09-25/functions/hello/event-invoke-config",
                serde_json::to_vec(&queue_put)?,
            )
            .await?;
        if status != 200 {
            bail!("PutFunctionEventInvokeConfig: {status} {}", String::from_utf8_lossy(&body));
        }
        let http = std::sync::Arc::new(Http::new(addr));
        let n = 20_000 / scale;
        let (acks, elapsed) = http
            .closed_loop(
                "/2015-03-31/functions/hello/invocations",
                &[("x-amz-invocation-type", "Event")],
                bytes::Bytes::from_static(event),
                64,
                n,
                202,
            )
            .await?;
        let latencies: Vec<_> = acks.iter().map(|a| a.latency).collect();
        scenarios.push(Scenario {
            name: "async-enqueue",
            description: "Event invocations acknowledged (202 after the event is fsync'd; batched commits), 64 closed-loop clients",
            workload: "examples/hello",
            payload_bytes: event.len(),
            concurrency: 64,
            samples: acks.len(),
            latency_us: Summary::of(&latencies),
            throughput_rps: Some(acks.len() as f64 / elapsed.as_secs_f64()),
            figure: None,
        });
        let queue = state.data.queue().clone();
        // Let the backlog drain before measuring an idle queue's latency.
        let drained = Instant::now();
        while queue.depth()? > 0 && drained.elapsed() < std::time::Duration::from_secs(300) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let before = queue.records("hello", 0, usize::MAX >> 1)?.last().map_or(0, |r| r.id);
        let n = (200 / scale).max(5);
        let mut starts = Vec::with_capacity(n);
        let mut cursor = before;
        for _ in 0..n {
            let (acks, _) = http
                .closed_loop(
                    "/2015-03-31/functions/hello/invocations",
                    &[("x-amz-invocation-type", "Event")],
                    bytes::Bytes::from_static(event),
                    1,
                    1,
                    202,
                )
                .await?;
            // From the moment the request was sent: the time a caller waits
            // for its event to start running.
            let sent_ms = (acks[0].answered_at - acks[0].latency)
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs_f64()
                * 1000.0;
            let waited = Instant::now();
            let record = loop {
                if let Some(r) = queue.records("hello", cursor, 1)?.pop() {
                    break r;
                }
                if waited.elapsed() > std::time::Duration::from_secs(30) {
                    bail!("an event did not run within 30 s");
                }
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            };
            cursor = record.id;
            let started_ms = record.record["kilnAttemptTimes"][0].as_f64().unwrap_or(sent_ms);
            starts.push(std::time::Duration::from_secs_f64(((started_ms - sent_ms).max(0.0)) / 1000.0));
        }
        scenarios.push(Scenario {
            name: "async-enqueue-to-start",
            description: "from sending an Event invocation to the start of its invocation (enqueue with fsync, dispatch), queue otherwise idle; start times have 1 ms resolution",
            workload: "examples/hello",
            payload_bytes: event.len(),
            concurrency: 1,
            samples: starts.len(),
            latency_us: Summary::of(&starts),
            throughput_rps: None,
            figure: None,
        });
        // Native custom runtime in the jail: the same handler built as a
        // bootstrap. A cold start here is a new environment: namespaces,
        // pivot_root, cgroup, the agent, the bootstrap's first /next.
        let native_cold = (50 / scale).max(3);
        let mut first = Vec::with_capacity(native_cold);
        let mut jail_missing = None;
        for i in 0..native_cold {
            let name = format!("native-cold-{i}");
            if let Err(e) =
                deploy_as(&http, &name, &native_zip, "provided.al2023", "bootstrap").await
            {
                jail_missing = Some(e);
                break;
            }
            let t = Instant::now();
            http.invoke_once(&name, event).await?;
            first.push(t.elapsed());
        }
        if let Some(why) = jail_missing {
            eprintln!("skipping the native jail scenarios: {why:#}");
        } else {
            scenarios.push(Scenario {
                name: "native-jail-cold-start",
                description: "first Invoke of a new native function (examples/hello built with kiln build --native) in the jail sandbox, over HTTP",
                workload: "examples/hello (native)",
                payload_bytes: event.len(),
                concurrency: 1,
                samples: first.len(),
                latency_us: Summary::of(&first),
                throughput_rps: None,
                figure: None,
            });
            let n = 10_000 / scale;
            let (samples, elapsed) = http.invoke_loop("native-cold-0", event, 200, n).await?;
            scenarios.push(Scenario {
                name: "native-jail-warm-invoke-http",
                description: "warm Invoke of a native function in the jail over HTTP/1.1 keep-alive on loopback, closed loop (host -> agent -> Runtime API -> bootstrap and back)",
                workload: "examples/hello (native)",
                payload_bytes: event.len(),
                concurrency: 1,
                samples: samples.len(),
                latency_us: Summary::of(&samples),
                throughput_rps: Some(samples.len() as f64 / elapsed.as_secs_f64()),
                figure: None,
            });
        }
        // The comparison suite: throughput over concurrency, open loop,
        // scale-up, cold start per sandbox over new versions, density.
        deploy(&http, "echo", &misbehave_zip).await?;
        let noop = bytes::Bytes::from_static(event);
        scenarios.append(
            &mut suite::sweep(&http, "noop", "hello", "examples/hello", noop.clone(), args.quick)
                .await?,
        );
        scenarios.append(
            &mut suite::sweep(
                &http,
                "echo-64k",
                "echo",
                "tests/functions/misbehave (echo)",
                suite::echo_event(),
                args.quick,
            )
            .await?,
        );
        // Half the closed-loop throughput at 16 clients: a load the server
        // keeps up with, where queueing is what the latency shows.
        let c16 = scenarios
            .iter()
            .find(|s| s.name == "sweep-noop-c16")
            .and_then(|s| s.throughput_rps)
            .unwrap_or(1000.0);
        let seconds = if args.quick { 1 } else { 10 };
        scenarios.push(
            suite::open_loop(&http, "hello", noop.clone(), (c16 / 2.0).round(), std::time::Duration::from_secs(seconds))
                .await?,
        );
        deploy(&http, "scale", &misbehave_zip).await?;
        let clients = if args.quick { 20 } else { 200 };
        scenarios.push(
            suite::scale_up(&http, "scale", bytes::Bytes::from_static(br#"{"action":"sleep","arg":50}"#), clients)
                .await?,
        );
        let versions = (50 / scale).max(3);
        deploy(&http, "coldv", &hello_zip).await?;
        let samples = suite::cold_versions(&http, "coldv", event, versions).await?;
        scenarios.push(cold_scenario("wasm-in-process", "examples/hello", &samples, event.len()));
        deploy(&http, "dense", &misbehave_zip).await?;
        scenarios.push(
            suite::density(&http, "dense", "wasm-in-process", "tests/functions/misbehave", if args.quick { 20 } else { 400 })
                .await?,
        );
        let native_cold = async {
            deploy_as(&http, "coldv-native", &native_zip, "provided.al2023", "bootstrap").await?;
            suite::cold_versions(&http, "coldv-native", event, versions).await
        };
        match native_cold.await {
            Ok(samples) => {
                scenarios.push(cold_scenario("native-jail", "examples/hello (native)", &samples, event.len()));
                let dense = build_native("tests/functions/native-misbehave")?;
                deploy_as(&http, "dense-native", &dense, "provided.al2023", "bootstrap").await?;
                scenarios.push(
                    suite::density(&http, "dense-native", "native-jail", "tests/functions/native-misbehave", if args.quick { 4 } else { 40 })
                        .await?,
                );
            }
            Err(why) => eprintln!("skipping the native jail suite scenarios: {why:#}"),
        }
        // Wasm in the jail: a server that places Wasm functions there.
        let jail_config = ServerConfig {
            wasm_sandbox: kiln::server::WasmPlacement::Jail,
            ..bench_config(data.path().join("data-jail"))
        };
        let jailed = async {
            let (jail_addr, _) = start_server(&server_rt, jail_config).await?;
            let jail_http = std::sync::Arc::new(Http::new(jail_addr));
            deploy(&jail_http, "coldv", &hello_zip).await?;
            let samples = suite::cold_versions(&jail_http, "coldv", event, versions).await?;
            deploy(&jail_http, "dense", &misbehave_zip).await?;
            let density = suite::density(
                &jail_http,
                "dense",
                "wasm-jail",
                "tests/functions/misbehave",
                if args.quick { 4 } else { 40 },
            )
            .await?;
            anyhow::Ok((samples, density))
        };
        match jailed.await {
            Ok((samples, density)) => {
                scenarios.push(cold_scenario("wasm-jail", "examples/hello", &samples, event.len()));
                scenarios.push(density);
            }
            Err(why) => eprintln!("skipping the Wasm-in-the-jail scenarios: {why:#}"),
        }
        // MicroVMs where a guest boots: kiln doctor's probe decides.
        match microvm_kernel(&data.path().join("doctor")).await {
            Ok(kernel) => {
                // Its own process: a microVM's VMM is `kiln vmm`, started
                // from the server's executable.
                let measured = async {
                    let server = KilnProcess::start(&data.path().join("data-vm"), &kernel)?;
                    let vm_http = Http::new(server.addr);
                    deploy_as(&vm_http, "coldv", &native_zip, "provided.al2023", "bootstrap")
                        .await?;
                    suite::cold_versions(&vm_http, "coldv", event, versions).await
                };
                match measured.await {
                    Ok(samples) => scenarios.push(cold_scenario(
                        "microvm",
                        "examples/hello (native)",
                        &samples,
                        event.len(),
                    )),
                    Err(why) => eprintln!("skipping the microVM cold start: {why:#}"),
                }
            }
            Err(why) => eprintln!("skipping the microVM cold start: {why:#}"),
        }

        // Peers, interleaved with kiln on the same work.
        let wasmtime = if args.no_peers {
            Err(anyhow::anyhow!("--no-peers"))
        } else {
            peers::wasmtime()
        };
        match wasmtime {
            Ok(wasmtime) => {
                let compared = async {
                    let serve = peers::Serve::start(&wasmtime, &peer_component)?;
                    let peer = std::sync::Arc::new(Http::unsigned(serve.addr));
                    peers::compare(
                        &http,
                        &peer,
                        &peers::WASMTIME_SERVE,
                        noop.clone(),
                        &[1, 16],
                        args.quick,
                    )
                    .await
                };
                match compared.await {
                    Ok(mut s) => scenarios.append(&mut s),
                    Err(why) => eprintln!("skipping the wasmtime serve comparison: {why:#}"),
                }
            }
            Err(why) => eprintln!("skipping the wasmtime serve comparison: {why:#}"),
        }

        // A bare axum server on kiln's runtime: the HTTP stack's ceiling.
        let axum = async {
            let addr = server_rt.spawn(peers::axum_hello()).await??;
            let peer = std::sync::Arc::new(Http::unsigned(addr));
            peers::compare(&http, &peer, &peers::AXUM_HELLO, noop.clone(), &[1, 16], args.quick)
                .await
        };
        match axum.await {
            Ok(mut s) => scenarios.append(&mut s),
            Err(why) => eprintln!("skipping the bare axum comparison: {why:#}"),
        }

        // The VMM on this machine's KVM with the no_std test guest (a
        // Linux guest cannot boot here; see benches/README.md).
        match kvm_scenarios(args.quick) {
            Ok(mut s) => scenarios.append(&mut s),
            Err(why) => eprintln!("skipping the KVM scenarios: {why:#}"),
        }
        scenarios.append(&mut security_scenarios(args.quick)?);
        scenarios.push(Scenario {
            name: "create-function",
            description: "CreateFunction of an already-compiled component (zip upload, validation, store commit)",
            workload: "examples/hello",
            payload_bytes: hello_zip.len(),
            concurrency: 1,
            samples: create.len(),
            latency_us: Summary::of(&create),
            throughput_rps: None,
            figure: None,
        });
        anyhow::Ok(())
    })?;

    let report = Report {
        conditions: conditions(args.quick),
        scenarios,
    };
    write_report(&args.out, &report, args.quick)?;
    for chart in charts::draw(&args.out, &report.scenarios)? {
        eprintln!("wrote {}", chart.display());
    }
    drop(server_rt);
    Ok(())
}

/// The `kiln` binary beside this one (built by [`build_native`]).
fn kiln_exe() -> Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .context("the bench binary has a directory")?
        .join("kiln"))
}

/// `kiln serve` as a process of its own, on a free loopback port; killed
/// when dropped.
struct KilnProcess {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl KilnProcess {
    fn start(data_dir: &std::path::Path, kernel: &std::path::Path) -> Result<Self> {
        let mut child = std::process::Command::new(kiln_exe()?)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .arg("--guest-kernel")
            .arg(kernel)
            .env("KILN_ROOT_ACCESS_KEY_ID", load::BENCH_KEY.0)
            .env("KILN_ROOT_SECRET_ACCESS_KEY", load::BENCH_KEY.1)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting kiln serve")?;
        let stdout = child.stdout.take().context("kiln's stdout")?;
        match peers::announced_addr(
            stdout,
            "kiln listening on http://",
            std::time::Duration::from_secs(120),
        ) {
            Ok(addr) => Ok(Self { child, addr }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context("kiln serve"))
            }
        }
    }
}

impl Drop for KilnProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guest kernel, when `kiln doctor`'s probe boots a guest with it here.
async fn microvm_kernel(scratch: &std::path::Path) -> Result<PathBuf> {
    let kernel = match std::env::var_os("KILN_GUEST_KERNEL") {
        Some(k) => PathBuf::from(k),
        None => {
            let script = kiln_test_support::workspace_root().join("scripts/build-kernel.sh");
            let out = std::process::Command::new(&script)
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running {}", script.display()))?;
            if !out.status.success() {
                bail!("scripts/build-kernel.sh failed");
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
        }
    };
    let out = std::process::Command::new(kiln_exe()?)
        .args(["doctor", "--output", "json", "--data-dir"])
        .arg(scratch)
        .arg("--guest-kernel")
        .arg(&kernel)
        .output()
        .context("running kiln doctor")?;
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("kiln doctor's report")?;
    let vm = report["sandboxes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "microvm")
        .context("kiln doctor reports no microvm sandbox")?;
    if vm["available"] != true {
        bail!(
            "microVMs cannot boot on this machine: {}",
            vm["detail"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(kernel)
}

/// A server of the bench: on loopback, its data in `data_dir`, the bench's
/// root key.
fn bench_config(data_dir: PathBuf) -> ServerConfig {
    ServerConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir,
        root_credentials: Some((load::BENCH_KEY.0.to_owned(), load::BENCH_KEY.1.to_owned())),
        // The scenarios measure speed and the memory environments really
        // use (scale-up and density make hundreds of 128 MB environments),
        // not admission: a budget that never binds. Every environment still
        // reserves its MemorySize, so admission's cost is in the figures.
        memory_budget_mb: Some(1 << 20),
        ..ServerConfig::new()
    }
}

/// Starts a server on `rt` and keeps it serving there: its address and
/// its planes.
async fn start_server(
    rt: &tokio::runtime::Runtime,
    config: ServerConfig,
) -> Result<(std::net::SocketAddr, kiln::api::AppState)> {
    let server = rt.spawn(Server::start(config)).await??;
    let addr = server.local_addr();
    let state = server.state();
    rt.spawn(server.run(std::future::pending()));
    Ok((addr, state))
}

/// An invocation of `hello` from the data plane's side.
fn hello_input(event: &'static [u8]) -> InvokeInput {
    InvokeInput {
        name: "hello".into(),
        qualifier: None,
        payload: bytes::Bytes::from_static(event),
        log_tail: false,
        trace_id: None,
        request_id: None,
        client_context: None,
    }
}

fn cold_scenario(
    sandbox: &str,
    workload: &'static str,
    samples: &[std::time::Duration],
    payload: usize,
) -> Scenario {
    Scenario {
        name: leak(format!("cold-start-{sandbox}")),
        description: "first Invoke of a newly published version (its first environment: create, init, call), over a new HTTP connection",
        workload,
        payload_bytes: payload,
        concurrency: 1,
        samples: samples.len(),
        latency_us: Summary::of(samples),
        throughput_rps: None,
        figure: None,
    }
}

async fn deploy(http: &Http, name: &str, zip: &[u8]) -> Result<()> {
    deploy_as(http, name, zip, "wasip2", "function.wasm").await
}

async fn deploy_as(
    http: &Http,
    name: &str,
    zip: &[u8],
    runtime: &str,
    handler: &str,
) -> Result<()> {
    let body = json!({
        "FunctionName": name,
        "Runtime": runtime,
        "Role": "arn:aws:iam::000000000000:role/kiln-function",
        "Handler": handler,
        "Code": { "ZipFile": base64::engine::general_purpose::STANDARD.encode(zip) },
    });
    let (status, body) = http
        .request("POST", "/2015-03-31/functions", serde_json::to_vec(&body)?)
        .await?;
    if status != 201 {
        bail!(
            "CreateFunction {name}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// The costs security adds, measured in-process on their own: verifying
/// one SigV4-signed invoke request (canonical request, key derivation,
/// HMAC, constant-time compare), and opening a sealed 50 MB archive
/// (unwrap, AES-256-GCM over every content-defined chunk, SHA-256 of the
/// whole).
fn security_scenarios(quick: bool) -> Result<Vec<Scenario>> {
    use kiln::auth::sigv4::{self, Incoming, PresignKey, PresignTarget, VerifyConfig};
    let cfg = VerifyConfig::lambda("us-east-1");
    let body = vec![b'x'; 1024];
    let path = "/2015-03-31/functions/hello/invocations";
    let key = PresignKey {
        access_key_id: load::BENCH_KEY.0,
        secret: load::BENCH_KEY.1,
        session_token: None,
    };
    let target = PresignTarget {
        method: "POST",
        host: "127.0.0.1:9000",
        path,
        query: &[],
        body: &body,
    };
    let now = time::OffsetDateTime::now_utc();
    let query = sigv4::presign(target, key, &cfg, now, 600)
        .map_err(|e| anyhow::anyhow!("presigning: {e}"))?;
    let headers: [(&str, &[u8]); 2] = [
        ("host", b"127.0.0.1:9000"),
        ("content-type", b"application/json"),
    ];
    let req = Incoming {
        method: "POST",
        path,
        query: Some(&query),
        headers: &headers,
        body: &body,
    };
    let n = if quick { 200 } else { 20_000 };
    let mut verify = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        let claim = sigv4::claim(&req, &cfg, now).map_err(|e| anyhow::anyhow!("{e}"))?;
        sigv4::verify(&req, &claim, load::BENCH_KEY.1, &cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
        verify.push(t.elapsed());
    }

    let dir = tempfile::tempdir()?;
    let master = kiln::store::sealed::MasterKey::generate()?;
    let store = kiln::store::sealed::SealedStore::open(
        dir.path().join("code"),
        dir.path().join("keys"),
        Some(master),
    )?;
    let size = if quick { 5 << 20 } else { 50 << 20 };
    let mut rng = fastrand::Rng::with_seed(7);
    let mut content = vec![0u8; size];
    rng.fill(&mut content);
    store.put("code/bench", &content)?;
    let rounds = if quick { 2 } else { 10 };
    let mut open = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = std::time::Instant::now();
        let plain = store.get("code/bench")?;
        open.push(t.elapsed());
        anyhow::ensure!(plain.len() == size, "the sealed archive came back short");
    }
    Ok(vec![
        Scenario {
            name: "sigv4-verify",
            description: "Verify one SigV4-signed invoke request (1 KiB body), in-process",
            workload: "POST /2015-03-31/functions/hello/invocations",
            payload_bytes: body.len(),
            concurrency: 1,
            samples: verify.len(),
            latency_us: Summary::of(&verify),
            throughput_rps: None,
            figure: None,
        },
        Scenario {
            name: "open-sealed-archive",
            description: "Read and decrypt a sealed archive (chunked AES-256-GCM, SHA-256 checked) from the page cache",
            workload: "incompressible content",
            payload_bytes: size,
            concurrency: 1,
            samples: open.len(),
            latency_us: Summary::of(&open),
            throughput_rps: None,
            figure: None,
        },
    ])
}

/// VM creation, boot to a ready virtio console, and a channel round trip,
/// with `tests/guests/virtio-echo` in-process (no seccomp, no jail).
fn kvm_scenarios(quick: bool) -> Result<Vec<Scenario>> {
    use kiln::vmm::{Vm, VmConfig, feed_console};
    use std::io::{Read, Write};
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("/dev/kvm")?;
    let root = kiln_test_support::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("testguest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = std::process::Command::new(cargo)
        .current_dir(root.join("tests/guests/virtio-echo"))
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .status()?;
    if !status.success() {
        bail!("building the test guest failed");
    }
    let kernel = std::fs::read(target.join("x86_64-unknown-none/release/virtio-echo"))?;
    let config = VmConfig {
        memory_mib: 128,
        vcpus: 1,
        kernel,
        initrd: None,
        cmdline_extra: String::new(),
        log_max: 64 << 10,
        log_to_stdout: false,
        irqchip: false,
        seccomp: false,
    };
    let n = if quick { 3 } else { 50 };
    let (mut create, mut ready, mut round_trips) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let (mut host, guest) = std::os::unix::net::UnixStream::pair()?;
        host.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        let t = Instant::now();
        let vm = Vm::create(Vm::open_kvm()?, &config, Box::new(guest.try_clone()?))?;
        create.push(t.elapsed());
        let console = vm.console();
        let stop = vm.stop_flag();
        let feeder = std::thread::spawn(move || feed_console(&console, guest, &stop));
        let runner = std::thread::spawn(move || vm.run(|| {}));
        // Ready: the first byte echoed back means the guest booted, set
        // up the device and serves its queues.
        let mut b = [0u8; 1];
        let t = Instant::now();
        host.write_all(b"x")?;
        host.read_exact(&mut b)?;
        ready.push(t.elapsed());
        if i == 0 {
            let msg = [b'k'; 64];
            let mut back = [0u8; 64];
            for _ in 0..if quick { 20 } else { 500 } {
                let t = Instant::now();
                host.write_all(&msg)?;
                host.read_exact(&mut back)?;
                round_trips.push(t.elapsed());
            }
        }
        host.write_all(b"\x04")?;
        host.read_exact(&mut b)?;
        let stopped = runner
            .join()
            .map_err(|_| anyhow::anyhow!("the VM thread panicked"))?;
        drop(host);
        let _ = feeder.join();
        if stopped.reason != kiln::vmm::StopReason::Reset {
            bail!("the test guest stopped with {:?}", stopped.reason);
        }
    }
    Ok(vec![
        Scenario {
            name: "kvm-vm-create",
            description: "kiln's VMM: KVM_CREATE_VM, 128 MiB of guest memory, loading the ELF guest, zero page and page tables, one long-mode vCPU with CPUID and MSRs",
            workload: "tests/guests/virtio-echo",
            payload_bytes: 0,
            concurrency: 1,
            samples: create.len(),
            latency_us: Summary::of(&create),
            throughput_rps: None,
            figure: None,
        },
        Scenario {
            name: "kvm-testguest-ready",
            description: "from starting the vCPU to the first byte echoed over the virtio console (boot, device setup, one round trip); polling guest, no interrupts",
            workload: "tests/guests/virtio-echo",
            payload_bytes: 1,
            concurrency: 1,
            samples: ready.len(),
            latency_us: Summary::of(&ready),
            throughput_rps: None,
            figure: None,
        },
        Scenario {
            name: "kvm-virtio-console-round-trip",
            description: "64 bytes host -> guest -> host over the virtio console (two queue notifications, MMIO exits)",
            workload: "tests/guests/virtio-echo",
            payload_bytes: 64,
            concurrency: 1,
            samples: round_trips.len(),
            latency_us: Summary::of(&round_trips),
            throughput_rps: None,
            figure: None,
        },
    ])
}

/// `examples/hello` as a native bootstrap zip, built by the `kiln` CLI
/// (`kiln build --native`) that sits beside this binary.
/// A crate of the workspace built with `kiln build --native`.
fn build_native(krate: &str) -> Result<Vec<u8>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let root = kiln_test_support::workspace_root();
    let status = std::process::Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "--locked", "-p", "kiln"])
        .status()?;
    if !status.success() {
        bail!("cargo build -p kiln failed");
    }
    let kiln = kiln_exe()?;
    let out = tempfile::tempdir()?;
    let zip = out.path().join("native.zip");
    let status = std::process::Command::new(&kiln)
        .arg("build")
        .arg("--native")
        .arg(root.join(krate))
        .arg("--output")
        .arg(&zip)
        .status()
        .with_context(|| format!("running {}", kiln.display()))?;
    if !status.success() {
        bail!("kiln build --native {krate} failed");
    }
    Ok(std::fs::read(zip)?)
}

fn conditions(quick: bool) -> Conditions {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    Conditions {
        date: time::OffsetDateTime::now_utc().date().to_string(),
        kiln_version: env!("CARGO_PKG_VERSION"),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        cpu,
        mode: if quick {
            "quick (smoke run, few samples)"
        } else {
            "full"
        },
        server: "kiln in-process on its own tokio runtime, load generator on another thread, loopback HTTP/1.1",
    }
}

fn write_report(dir: &std::path::Path, report: &Report, quick: bool) -> Result<()> {
    write_report_as(dir, report, if quick { "quick" } else { "latest" })
}

fn write_report_as(dir: &std::path::Path, report: &Report, stem: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let json_path = dir.join(format!("{stem}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(report)?)?;
    let mut md = String::new();
    let c = &report.conditions;
    md.push_str(&format!(
        "Measured {} on {} cores ({}), {} GiB, kiln {} — {}.\n\n",
        c.date, c.cores, c.cpu, c.memory_gib, c.kiln_version, c.mode
    ));
    md.push_str("| scenario | workload | payload | concurrency | samples | p50 | p99 | p99.9 | throughput | figure |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for s in &report.scenarios {
        md.push_str(&format!(
            "| {} | {} | {} B | {} | {} | {} | {} | {} | {} | {} |\n",
            s.name,
            s.workload,
            s.payload_bytes,
            s.concurrency,
            s.samples,
            stats::fmt_us(s.latency_us.p50),
            stats::fmt_us(s.latency_us.p99),
            stats::fmt_us(s.latency_us.p999),
            s.throughput_rps
                .map_or("-".to_owned(), |r| format!("{r:.0} req/s")),
            s.figure.as_deref().unwrap_or("-"),
        ));
    }
    let md_path = dir.join(format!("{stem}.md"));
    std::fs::write(&md_path, &md)?;
    print!("{md}");
    eprintln!("wrote {} and {}", json_path.display(), md_path.display());
    Ok(())
}
