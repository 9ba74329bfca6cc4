//! Peers measured in the same run as kiln: `wasmtime serve` (wasmtime-cli
//! from crates.io, installed once into a cache) serving a `wasi:http`
//! component that does what `examples/hello` does. Blocks of kiln and of the
//! peer alternate, so that a noisy machine shifts both alike and the ratio
//! holds.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;

use crate::load::Http;
use crate::stats::Summary;
use crate::{Scenario, leak};

/// The wasmtime the targets were set against.
pub const WASMTIME_VERSION: &str = "48.0.8";

/// Where installed peers are kept: `$KILN_BENCH_CACHE`, else
/// `~/.cache/kiln/peers`.
fn cache() -> PathBuf {
    std::env::var_os("KILN_BENCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/kiln/peers")
        })
}

/// `wasmtime` of [`WASMTIME_VERSION`], installed with `cargo install` the
/// first time (about a quarter of an hour on 2 cores).
pub fn wasmtime() -> Result<PathBuf> {
    let root = cache().join(format!("wasmtime-{WASMTIME_VERSION}"));
    let bin = root.join("bin/wasmtime");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!(
        "installing wasmtime-cli {WASMTIME_VERSION} into {} (once; it is cached)",
        root.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args(["install", "--locked", "--quiet"])
        .arg(format!("wasmtime-cli@{WASMTIME_VERSION}"))
        .arg("--root")
        .arg(&root)
        .arg("--target-dir")
        .arg(cache().join("target"))
        .status()
        .context("running cargo install wasmtime-cli")?;
    if !status.success() || !bin.exists() {
        bail!("cargo install wasmtime-cli@{WASMTIME_VERSION} failed");
    }
    Ok(bin)
}

/// A `wasmtime serve` process; killed when dropped.
pub struct Serve {
    child: Child,
    pub addr: SocketAddr,
}

impl Serve {
    /// Serves `component` on a free loopback port, with the pooling
    /// allocator (as the reference figures were taken).
    pub fn start(wasmtime: &Path, component: &Path) -> Result<Self> {
        let mut child = Command::new(wasmtime)
            // `-S cli`: the component's std reads its environment.
            .args(["serve", "--addr", "127.0.0.1:0", "-S", "cli=y"])
            .args(["-O", "pooling-allocator=y"])
            .arg(component)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", wasmtime.display()))?;
        let stderr = child.stderr.take().context("wasmtime's stderr")?;
        match announced_addr(stderr, "http://", Duration::from_secs(60)) {
            Ok(addr) => Ok(Self { child, addr }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context("wasmtime serve"))
            }
        }
    }
}

/// Reads `reader` on a thread of its own until a line says where a server
/// listens (the address after `marker`), and keeps draining it after, so
/// that the process never blocks on a full pipe. Gives up after `timeout`,
/// or when the stream ends first.
pub fn announced_addr(
    reader: impl std::io::Read + Send + 'static,
    marker: &'static str,
    timeout: Duration,
) -> Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut announced = false;
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if !announced && let Some(rest) = line.split(marker).nth(1) {
                let addr = rest
                    .split(|c: char| c.is_whitespace() || c == '/')
                    .next()
                    .unwrap_or_default();
                let _ = tx.send(
                    addr.parse::<SocketAddr>()
                        .map_err(|e| format!("{line:?}: {e}")),
                );
                announced = true;
            }
        }
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(addr)) => Ok(addr),
        Ok(Err(e)) => bail!("no address in what it said: {e}"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            bail!("it said nowhere it listens within {} s", timeout.as_secs())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            bail!("it exited before it listened")
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A peer as the report names it.
pub struct Peer {
    /// In scenario names: `wasmtime-serve`.
    pub key: &'static str,
    /// For people: `wasmtime serve`.
    pub label: &'static str,
    pub description: &'static str,
    pub workload: &'static str,
}

/// `wasmtime serve` with the greeting component.
pub const WASMTIME_SERVE: Peer = Peer {
    key: "wasmtime-serve",
    label: "wasmtime serve",
    description: "wasmtime serve 48.0.8 (pooling allocator): the same greeting as a wasi:http component, a new instance per request",
    workload: "benches/peers/noop-http",
};

/// A bare axum server answering the greeting: the HTTP stack's ceiling
/// with this load generator, no sandbox at all.
pub const AXUM_HELLO: Peer = Peer {
    key: "axum-hello",
    label: "bare axum",
    description: "axum 0.8 on the server's runtime: parse the JSON body, answer the greeting; no sandbox, no signature",
    workload: "a Rust handler",
};

/// Serves the greeting with axum on the current runtime, on a free
/// loopback port.
pub async fn axum_hello() -> Result<SocketAddr> {
    #[derive(serde::Deserialize)]
    struct Event {
        name: Option<String>,
    }
    async fn greet(body: Bytes) -> axum::Json<serde_json::Value> {
        let name = serde_json::from_slice::<Event>(&body)
            .ok()
            .and_then(|e| e.name)
            .unwrap_or_else(|| "world".to_owned());
        axum::Json(serde_json::json!({ "greeting": format!("Hello, {name}!") }))
    }
    let app = axum::Router::new().route("/", axum::routing::post(greet));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// kiln invoking `examples/hello` and the peer serving the same work, at
/// each concurrency of `levels`, in alternating blocks.
pub async fn compare(
    kiln: &Arc<Http>,
    peer: &Arc<Http>,
    who: &Peer,
    event: Bytes,
    levels: &[usize],
    quick: bool,
) -> Result<Vec<Scenario>> {
    let kiln_path = "/2015-03-31/functions/hello/invocations";
    let (blocks, per_block) = if quick { (2, 100) } else { (10, 2000) };
    let mut out = Vec::new();
    for &c in levels {
        kiln.closed_loop(kiln_path, &[], event.clone(), c, c * 10, 200)
            .await?;
        peer.closed_loop("/", &[], event.clone(), c, c * 10, 200)
            .await?;
        let (mut k, mut p) = (Vec::new(), Vec::new());
        let (mut kt, mut pt) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..blocks {
            let (a, t) = kiln
                .closed_loop(kiln_path, &[], event.clone(), c, per_block, 200)
                .await?;
            k.extend(a.into_iter().map(|a| a.latency));
            kt += t;
            let (a, t) = peer
                .closed_loop("/", &[], event.clone(), c, per_block, 200)
                .await?;
            p.extend(a.into_iter().map(|a| a.latency));
            pt += t;
        }
        let (kr, pr) = (
            k.len() as f64 / kt.as_secs_f64(),
            p.len() as f64 / pt.as_secs_f64(),
        );
        let (ks, ps) = (Summary::of(&k), Summary::of(&p));
        out.push(Scenario {
            name: leak(format!("peer-kiln-vs-{}-c{c}", who.key)),
            description: "kiln: warm invoke of examples/hello over HTTP, closed loop, in blocks alternating with the peer",
            workload: "examples/hello",
            payload_bytes: event.len(),
            concurrency: c,
            samples: k.len(),
            figure: Some(format!(
                "{:.2}× {}'s throughput, p50 {:.2}×",
                kr / pr,
                who.label,
                ks.p50 / ps.p50
            )),
            latency_us: ks,
            throughput_rps: Some(kr),
        });
        out.push(Scenario {
            name: leak(format!("peer-{}-c{c}", who.key)),
            description: who.description,
            workload: who.workload,
            payload_bytes: event.len(),
            concurrency: c,
            samples: p.len(),
            latency_us: ps,
            throughput_rps: Some(pr),
            figure: None,
        });
    }
    Ok(out)
}
