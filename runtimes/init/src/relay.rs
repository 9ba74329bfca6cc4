//! The function's way back to kiln: a TCP listener on [`API_RELAY`] inside
//! the environment whose connections are carried, byte for byte, to the
//! host's API socket mounted at [`API_SOCKET`]. The relay adds no authority:
//! kiln authenticates and authorizes each request by its SigV4 signature,
//! made with the credentials of the function's execution role.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use kiln_proto::{API_RELAY, API_SOCKET};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::Semaphore;

/// Connections relayed at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;

/// Starts the relay when the environment has an API socket, returning the
/// address it listens on.
pub async fn start() -> Option<SocketAddr> {
    if !Path::new(API_SOCKET).exists() {
        return None;
    }
    let listener = match TcpListener::bind(API_RELAY).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kiln-agent: the API relay cannot listen on {API_RELAY}: {e}");
            return None;
        }
    };
    let addr = listener.local_addr().ok()?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _permit = permit;
                match UnixStream::connect(API_SOCKET).await {
                    Ok(mut host) => {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut host).await;
                    }
                    Err(e) => eprintln!("kiln-agent: reaching kiln's API: {e}"),
                }
            });
        }
    });
    Some(addr)
}
