//! The host end of the way from a sandbox back to kiln's API: a Unix socket
//! per environment, in the environment's own directory and mounted into its
//! jail, whose connections are carried to the API's TCP listener on
//! loopback. It adds no authority: each request is authenticated and
//! authorized by its SigV4 signature, as any other.
//!
//! Threat model: the environment is hostile and may try to starve others.
//! Each environment has its own socket and its own [`PER_ENVIRONMENT`]
//! connections, so one that holds all of its own (half-sent requests, say)
//! takes nothing from another; the API's header and body timeouts end what
//! it leaves hanging. The socket and its task end with the environment.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpStream, UnixListener};
use tokio::sync::Semaphore;

/// Connections relayed at once for one environment; more wait in its own
/// listen backlog.
pub const PER_ENVIRONMENT: usize = 32;

/// Where a client on this host reaches an API listening on `addr`: the
/// loopback address of its family when it listens on every address.
pub fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// Makes each environment's way back to the API.
#[derive(Debug, Clone, Copy)]
pub struct Relay {
    api: SocketAddr,
}

impl Relay {
    /// A relay to the API listening on `api`.
    pub fn new(api: SocketAddr) -> Self {
        Self { api: loopback(api) }
    }

    /// Listens on `<dir>/api.sock` for one environment, until the returned
    /// handle is dropped. Must be called within the server's runtime.
    pub fn open(&self, dir: &Path) -> io::Result<EnvironmentRelay> {
        let path = dir.join("api.sock");
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = bind_in(dir, "api.sock")?;
        // The function runs as an unprivileged user of its own; the data
        // dir (0700) keeps everyone else on the host away from the socket.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666))?;
        let api = self.api;
        let slots = Arc::new(Semaphore::new(PER_ENVIRONMENT));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut client = match listener.accept().await {
                    Ok((client, _)) => client,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting on an environment's API socket");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                tokio::spawn(async move {
                    let _permit = permit;
                    match TcpStream::connect(api).await {
                        Ok(mut server) => {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                        Err(e) => tracing::warn!(error = %e, "relaying to the API"),
                    }
                });
            }
        });
        Ok(EnvironmentRelay { path, task })
    }
}

/// Binds a Unix socket `name` in `dir` whatever the length of `dir`'s path
/// (a socket's path is limited to 107 bytes; a data dir's can be longer):
/// through the directory's descriptor in `/proc/self/fd`.
fn bind_in(dir: &Path, name: &str) -> io::Result<UnixListener> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let handle = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?;
    UnixListener::bind(format!("/proc/self/fd/{}/{name}", handle.as_raw_fd()))
}

/// One environment's socket; stops listening (and removes the socket) when
/// dropped. Connections already relayed finish on their own.
#[derive(Debug)]
pub struct EnvironmentRelay {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl EnvironmentRelay {
    /// The socket's path on the host.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for EnvironmentRelay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn unspecified_addresses_become_loopback() {
        let a: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        assert_eq!(loopback(a), "127.0.0.1:9000".parse().unwrap());
        let b: SocketAddr = "[::]:9000".parse().unwrap();
        assert_eq!(loopback(b), "[::1]:9000".parse().unwrap());
        let c: SocketAddr = "127.0.0.5:1".parse().unwrap();
        assert_eq!(loopback(c), c);
    }

    #[tokio::test]
    async fn bytes_cross_the_relay_both_ways() {
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::new(api.local_addr().unwrap())
            .open(dir.path())
            .unwrap();
        let mode = fs::metadata(relay.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666);
        let mut client = tokio::net::UnixStream::connect(relay.path()).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let (mut server, _) = api.accept().await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        let path = relay.path().to_path_buf();
        drop(relay);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn one_environment_holding_its_connections_does_not_block_another() {
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::new(api.local_addr().unwrap());
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (greedy, other) = (relay.open(a.path()).unwrap(), relay.open(b.path()).unwrap());
        // The greedy one takes all of its slots and more.
        let mut held = Vec::new();
        for _ in 0..PER_ENVIRONMENT + 8 {
            let mut c = tokio::net::UnixStream::connect(greedy.path())
                .await
                .unwrap();
            c.write_all(b"POST / HTTP/1.1\r\n").await.unwrap();
            held.push(c);
        }
        let mut accepted = Vec::new();
        for _ in 0..PER_ENVIRONMENT {
            accepted.push(api.accept().await.unwrap());
        }
        // The other one still gets through at once.
        let mut c = tokio::net::UnixStream::connect(other.path()).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let (mut server, _) = tokio::time::timeout(std::time::Duration::from_secs(2), api.accept())
            .await
            .expect("the other environment's connection is relayed")
            .unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
}
