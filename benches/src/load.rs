//! A lean HTTP/1.1 client for load: one keep-alive connection per worker,
//! requests sent back to back (closed loop), latency taken per request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

/// Connects to one server.
pub struct Http {
    addr: SocketAddr,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
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
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
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
        for _ in 0..warmup {
            self.send(&mut sender, "POST", &path, body.clone()).await?;
        }
        let mut samples = Vec::with_capacity(n);
        let start = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            let (status, response) = self.send(&mut sender, "POST", &path, body.clone()).await?;
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
        let start = Instant::now();
        let mut tasks = Vec::new();
        for worker in 0..concurrency {
            let n = total / concurrency + usize::from(worker < total % concurrency);
            let (http, path, body) = (self.clone(), path.to_owned(), body.clone());
            tasks.push(tokio::spawn(async move {
                let mut sender = http.connect().await?;
                let mut answers = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    let (status, _, response) = http
                        .send_with(&mut sender, "POST", &path, headers, body.clone())
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
