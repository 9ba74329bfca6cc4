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
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
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
