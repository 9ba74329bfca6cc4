//! The API's listener: accepts TCP connections and serves HTTP/1.1 on them
//! within bounds no client can lift.
//!
//! - A request head must arrive within the header timeout, counted from
//!   when the connection is ready for it: a client that connects and sends
//!   nothing, or sends a head slowly, is closed, and so is a keep-alive
//!   connection idle that long (hyper starts the same timer while it waits
//!   for the next request).
//! - At most `max_connections` are open. A new connection at the cap
//!   closes the oldest one that has not yet made an authorized request
//!   (idle attackers go first, signed clients keep theirs), else the oldest
//!   authorized one that is idle between requests; if every open
//!   connection is serving a request, the newcomer is closed instead.
//! - The gate marks a connection authorized ([`ConnectionAuth`]) when a
//!   request on it passes SigV4 and its policies.
//!
//! Shutdown, in order: stop accepting, ask every connection to finish the
//! request it serves and close, wait for them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tower::Service as _;

/// Limits of the listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// How long a request head (or the next one, on a kept-alive
    /// connection) may take to arrive; also how long a request body may go
    /// without a byte.
    pub header_timeout: Duration,
}

impl ConnectionLimits {
    /// Defaults for a process allowed `open_files` descriptors: half of them
    /// for connections (the rest are the server's own: environments, logs,
    /// the store), and a 10-second header timeout.
    pub fn for_open_files(open_files: u64) -> Self {
        Self {
            max_connections: usize::try_from(open_files / 2)
                .unwrap_or(usize::MAX)
                .clamp(64, 65_536),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Set on a request's connection once a request on it authenticates; a
/// request extension.
#[derive(Debug, Clone)]
pub struct ConnectionAuth(Arc<AtomicBool>);

impl ConnectionAuth {
    /// Marks the connection as one of a known caller.
    pub fn authenticated(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct Open {
    accepted: Instant,
    authenticated: Arc<AtomicBool>,
    /// Requests being served on it now.
    active: Arc<std::sync::atomic::AtomicUsize>,
    shed: Arc<Notify>,
}

/// Counts a request as active on its connection while it is served.
struct Active(Arc<std::sync::atomic::AtomicUsize>);

impl Active {
    fn new(count: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The open connections, for shedding.
#[derive(Default)]
struct Table {
    open: HashMap<u64, Open>,
}

impl Table {
    /// Makes room for one more under `max`: sheds the oldest connection
    /// that has not been authorized, else the oldest idle one; `false` when
    /// every one is authorized and serving a request.
    fn make_room(&mut self, max: usize) -> bool {
        if self.open.len() < max {
            return true;
        }
        let oldest = |authorized: bool| {
            self.open
                .iter()
                .filter(|(_, c)| {
                    c.authenticated.load(Ordering::Relaxed) == authorized
                        && (!authorized || c.active.load(Ordering::Relaxed) == 0)
                })
                .min_by_key(|(_, c)| c.accepted)
                .map(|(id, _)| *id)
        };
        let victim = oldest(false).or_else(|| oldest(true));
        match victim.and_then(|id| self.open.remove(&id)) {
            Some(shed) => {
                // A stored permit: the connection sees it even if it is not
                // waiting yet.
                shed.shed.notify_one();
                true
            }
            None => false,
        }
    }
}

fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves `router` on `listener` until `shutdown` completes, then lets the
/// requests in progress finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let table = Arc::new(Mutex::new(Table::default()));
    let (stop_tx, stop_rx) = watch::channel(());
    let (done_tx, done_rx) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, addr) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors or memory: give the server a moment
                // instead of spinning on the error.
                tracing::warn!(error = %e, "accepting an API connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let id = next_id;
        next_id += 1;
        let authenticated = Arc::new(AtomicBool::new(false));
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let shed = Arc::new(Notify::new());
        {
            let mut t = lock(&table);
            if !t.make_room(limits.max_connections) {
                tracing::warn!(%addr, max = limits.max_connections, "refusing an API connection: every open one is authenticated");
                continue;
            }
            t.open.insert(
                id,
                Open {
                    accepted: Instant::now(),
                    authenticated: authenticated.clone(),
                    active: active.clone(),
                    shed: shed.clone(),
                },
            );
        }
        let auth = ConnectionAuth(authenticated);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(addr));
            request.extensions_mut().insert(auth.clone());
            let serving = Active::new(active.clone());
            let call = router.clone().call(request);
            async move {
                let response = call.await;
                drop(serving);
                response
            }
        });
        let connection = http.serve_connection(TokioIo::new(tcp), service);
        let (table, mut stop_rx, done_rx) = (table.clone(), stop_rx.clone(), done_rx.clone());
        tokio::spawn(async move {
            let mut connection = pin!(connection);
            let mut stopping = false;
            loop {
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(e) = served {
                            tracing::debug!(%addr, error = %e, "API connection ended");
                        }
                        break;
                    }
                    // Dropping the connection closes it now.
                    () = shed.notified() => {
                        tracing::debug!(%addr, "shed an unauthenticated API connection");
                        break;
                    }
                    _ = stop_rx.changed(), if !stopping => {
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            lock(&table).open.remove(&id);
            drop(done_rx);
        });
    }
    drop(listener);
    let _ = stop_tx.send(());
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(table: &mut Table, id: u64, authenticated: bool, active: usize) -> Arc<Notify> {
        let shed = Arc::new(Notify::new());
        table.open.insert(
            id,
            Open {
                accepted: Instant::now() + Duration::from_millis(id),
                authenticated: Arc::new(AtomicBool::new(authenticated)),
                active: Arc::new(std::sync::atomic::AtomicUsize::new(active)),
                shed: shed.clone(),
            },
        );
        shed
    }

    #[test]
    fn the_oldest_unauthenticated_connection_goes_first() {
        let mut t = Table::default();
        let _signed = open(&mut t, 0, true, 1);
        let _idle_old = open(&mut t, 1, false, 0);
        let _idle_new = open(&mut t, 2, false, 0);
        assert!(t.make_room(4));
        assert!(t.make_room(3));
        assert!(!t.open.contains_key(&1) && t.open.contains_key(&0) && t.open.contains_key(&2));
        open(&mut t, 3, true, 1);
        open(&mut t, 4, true, 0);
        assert!(t.make_room(4));
        assert!(!t.open.contains_key(&2));
        // Every one authorized: the oldest idle one goes.
        open(&mut t, 5, true, 1);
        assert!(t.make_room(4));
        assert!(!t.open.contains_key(&4));
        // Every one authorized and serving: no room.
        open(&mut t, 6, true, 1);
        assert!(!t.make_room(4));
        assert_eq!(t.open.len(), 4);
    }

    #[test]
    fn limits_leave_descriptors_for_the_server() {
        assert_eq!(ConnectionLimits::for_open_files(1024).max_connections, 512);
        assert_eq!(ConnectionLimits::for_open_files(10).max_connections, 64);
        assert_eq!(
            ConnectionLimits::for_open_files(1 << 30).max_connections,
            65_536
        );
    }
}
