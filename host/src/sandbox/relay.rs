//! The host end of the way from a sandbox back to kiln's API: a Unix socket
//! in the data dir, mounted into every jail, whose connections are carried
//! to the API's TCP listener on loopback. It adds no authority: each request
//! is authenticated and authorized by its SigV4 signature, as any other.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpStream, UnixListener};
use tokio::sync::Semaphore;

/// Connections relayed at once, from all environments together.
const MAX_CONNECTIONS: usize = 256;

/// Where a client on this host reaches an API listening on `addr`: the
/// loopback address of its family when it listens on every address.
pub fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// Listens on `<run_dir>/api.sock` and relays to `api`; returns the
/// socket's path. Must be called within the server's runtime.
pub fn start(run_dir: &Path, api: SocketAddr) -> io::Result<PathBuf> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)?;
    let path = run_dir.join("api.sock");
    // A socket left by an earlier server (the data dir is locked: not ours).
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    // Jailed functions run as unprivileged users of their own; the data dir
    // (0700) keeps everyone else on the host away from the socket.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666))?;
    let api = loopback(api);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let mut client = match listener.accept().await {
                Ok((client, _)) => client,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting on the API relay socket");
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
    Ok(path)
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
        let path = start(&dir.path().join("run"), api.local_addr().unwrap()).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666);
        let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let (mut server, _) = api.accept().await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }
}
