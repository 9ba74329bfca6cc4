//! A lean HTTP/1.1 client for load: one keep-alive connection per worker,
//! requests sent back to back (closed loop), latency taken per request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

/// The root key the benchmark's server is given, and its client signs with.
pub const BENCH_KEY: (&str, &str) = (
    "AKIAKILNBENCH000",
    "kiln-bench-secret-kiln-bench-secret-0000",
);

/// How long a signed request is reused: well inside the 5-minute window.
const RESIGN_AFTER: Duration = Duration::from_secs(60);

/// A signed request target, and when it was signed.
type Signed = (String, Instant);

/// Connects to one server.
pub struct Http {
    addr: SocketAddr,
    /// Whether requests are signed (kiln) or sent as they are (a peer).
    sign: bool,
    /// Presigned targets by (method, path, body): signing every request
    /// would put the client's HMACs into the latencies measured, so a
    /// signature is reused for a minute, as a replayed request is valid.
    signed: std::sync::Mutex<std::collections::HashMap<(String, String, Bytes), Signed>>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            sign: true,
            signed: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// A client for a server that takes unsigned requests (a peer).
    pub fn unsigned(addr: SocketAddr) -> Self {
        Self {
            sign: false,
            ..Self::new(addr)
        }
    }

    /// `path` with a SigV4 presigned query for `method` and `body`.
    fn signed_target(&self, method: &str, path: &str, body: &Bytes) -> Result<String> {
        if !self.sign {
            return Ok(path.to_owned());
        }
        let key = (method.to_owned(), path.to_owned(), body.clone());
        let mut cache = self
            .signed
            .lock()
            .map_err(|_| anyhow::anyhow!("signature cache poisoned"))?;
        if let Some((target, at)) = cache.get(&key)
            && at.elapsed() < RESIGN_AFTER
        {
            return Ok(target.clone());
        }
        let (path_only, query) = path.split_once('?').unwrap_or((path, ""));
        let pairs: Vec<(String, String)> = form_pairs(query);
        let pairs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let host = self.addr.to_string();
        let target = kiln::auth::sigv4::PresignTarget {
            method,
            host: &host,
            path: path_only,
            query: &pairs,
            body,
        };
        let signing_key = kiln::auth::sigv4::PresignKey {
            access_key_id: BENCH_KEY.0,
            secret: BENCH_KEY.1,
            session_token: None,
        };
        let cfg = kiln::auth::sigv4::VerifyConfig::lambda("us-east-1");
        let query = kiln::auth::sigv4::presign(
            target,
            signing_key,
            &cfg,
            time::OffsetDateTime::now_utc(),
            600,
        )
        .map_err(|e| anyhow::anyhow!("signing {path}: {e}"))?;
        let signed = format!("{path_only}?{query}");
        cache.insert(key, (signed.clone(), Instant::now()));
        Ok(signed)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn send(
        &self,
        sender: &mut SendRequest<Full<Bytes>>,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes)> {
        self.send_with(sender, method, path, &[], body)
            .await
            .map(|(status, _, body)| (status, body))
    }

    async fn send_with(
        &self,
        sender: &mut SendRequest<Full<Bytes>>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(u16, hyper::HeaderMap, Bytes)> {
        let target = self.signed_target(method, path, &body)?;
        self.send_signed(sender, method, &target, headers, body)
            .await
    }

    /// Sends to a target signed beforehand ([`Self::signed_target`]), so
    /// that the client's signing stays out of the latencies measured.
    async fn send_signed(
        &self,
        sender: &mut SendRequest<Full<Bytes>>,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(u16, hyper::HeaderMap, Bytes)> {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(target)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder.body(Full::new(body))?;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, headers, body))
    }

    /// One request on a fresh connection.
    pub async fn request(&self, method: &str, path: &str, body: Vec<u8>) -> Result<(u16, Bytes)> {
        let mut sender = self.connect().await?;
        self.send(&mut sender, method, path, Bytes::from(body))
            .await
    }

    /// One invocation on a fresh connection; fails on anything but 200
    /// without a function error.
    pub async fn invoke_once(&self, function: &str, event: &'static [u8]) -> Result<()> {
        let mut sender = self.connect().await?;
        let path = format!("/2015-03-31/functions/{function}/invocations");
        let (status, body) = self
            .send(&mut sender, "POST", &path, Bytes::from_static(event))
            .await?;
        if status != 200 || body.starts_with(b"{\"errorType\"") {
            bail!(
                "invoke {function}: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }

    /// `warmup` then `n` invocations back to back on one connection; the
    /// latency of each and the time of the measured part.
    pub async fn invoke_loop(
        &self,
        function: &str,
        event: &'static [u8],
        warmup: usize,
        n: usize,
    ) -> Result<(Vec<Duration>, Duration)> {
        let mut sender = self.connect().await?;
        let path = format!("/2015-03-31/functions/{function}/invocations");
        let body = Bytes::from_static(event);
        let target = self.signed_target("POST", &path, &body)?;
        for _ in 0..warmup {
            self.send_signed(&mut sender, "POST", &target, &[], body.clone())
                .await?;
        }
        let mut samples = Vec::with_capacity(n);
        let start = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            let (status, _, response) = self
                .send_signed(&mut sender, "POST", &target, &[], body.clone())
                .await?;
            samples.push(t.elapsed());
            if status != 200 {
                bail!(
                    "invoke {function}: {status} {}",
                    String::from_utf8_lossy(&response)
                );
            }
        }
        Ok((samples, start.elapsed()))
    }
}

/// One request of a closed-loop run: when it was answered and what.
#[derive(Debug, Clone)]
pub struct Answer {
    pub latency: Duration,
    pub answered_at: std::time::SystemTime,
}

impl Http {
    /// `concurrency` connections, each sending its share of `total`
    /// requests back to back; every answer must have `expect` status.
    pub async fn closed_loop(
        self: &std::sync::Arc<Self>,
        path: &str,
        headers: &'static [(&'static str, &'static str)],
        body: Bytes,
        concurrency: usize,
        total: usize,
        expect: u16,
    ) -> Result<(Vec<Answer>, Duration)> {
        let target = std::sync::Arc::new(self.signed_target("POST", path, &body)?);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for worker in 0..concurrency {
            let n = total / concurrency + usize::from(worker < total % concurrency);
            let (http, path, body, target) =
                (self.clone(), path.to_owned(), body.clone(), target.clone());
            tasks.push(tokio::spawn(async move {
                let mut sender = http.connect().await?;
                let mut answers = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    let (status, _, response) = http
                        .send_signed(&mut sender, "POST", &target, headers, body.clone())
                        .await?;
                    if status != expect {
                        bail!("{path}: {status} {}", String::from_utf8_lossy(&response));
                    }
                    answers.push(Answer {
                        latency: t.elapsed(),
                        answered_at: std::time::SystemTime::now(),
                    });
                }
                anyhow::Ok(answers)
            }));
        }
        let mut answers = Vec::with_capacity(total);
        for t in tasks {
            answers.extend(t.await??);
        }
        Ok((answers, start.elapsed()))
    }
}

impl Http {
    /// Requests at `rate` per second for `duration`, each sent at its
    /// scheduled time on an idle connection (a new one when none is idle),
    /// whatever the answers so far. Latency counts from the moment a
    /// request's turn came, so a slow answer delays no later measurement;
    /// how late the generator itself was (its timer has a 1 ms grain) is
    /// reported apart.
    pub async fn open_loop(
        self: &std::sync::Arc<Self>,
        path: &str,
        body: Bytes,
        rate: f64,
        duration: Duration,
    ) -> Result<OpenLoop> {
        type Pool = std::sync::Arc<std::sync::Mutex<Vec<SendRequest<Full<Bytes>>>>>;
        let pool: Pool = Default::default();
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let target = std::sync::Arc::new(self.signed_target("POST", path, &body)?);
        let n = (rate * duration.as_secs_f64()).ceil() as usize;
        let start = tokio::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due).await;
            let late = due.elapsed();
            let (http, body, pool, opened, target) = (
                self.clone(),
                body.clone(),
                pool.clone(),
                opened.clone(),
                target.clone(),
            );
            tasks.spawn(async move {
                let sent = Instant::now();
                let idle = pool.lock().ok().and_then(|mut p| p.pop());
                let mut sender = match idle {
                    Some(s) => s,
                    None => {
                        opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        http.connect().await?
                    }
                };
                let (status, _, response) = http
                    .send_signed(&mut sender, "POST", &target, &[], body)
                    .await?;
                let latency = sent.elapsed();
                if status != 200 {
                    bail!("open loop: {status} {}", String::from_utf8_lossy(&response));
                }
                if let Ok(mut p) = pool.lock() {
                    p.push(sender);
                }
                anyhow::Ok((latency, late))
            });
        }
        let mut latencies = Vec::with_capacity(n);
        let mut lateness = Vec::with_capacity(n);
        while let Some(done) = tasks.join_next().await {
            let (latency, late) = done??;
            latencies.push(latency);
            lateness.push(late);
        }
        Ok(OpenLoop {
            latencies,
            lateness,
            elapsed: start.elapsed(),
            connections: opened.load(std::sync::atomic::Ordering::Relaxed),
        })
    }
}

/// What an open-loop run measured.
pub struct OpenLoop {
    /// Per request, from its turn to its answer.
    pub latencies: Vec<Duration>,
    /// Per request, how long after its scheduled time its turn came.
    pub lateness: Vec<Duration>,
    /// From the first scheduled send to the last answer.
    pub elapsed: Duration,
    /// Most connections used at once.
    pub connections: usize,
}

/// `k=v&...` as decoded pairs (bench paths use plain ASCII).
fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}
