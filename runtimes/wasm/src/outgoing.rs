//! Outgoing HTTP from a guest (`wasi:http/outgoing-handler`), held to one
//! destination: kiln's own API, where a function calls other functions with
//! its execution role's credentials. Every other request is refused with
//! `HTTP-request-denied` before any connection is made, so the Wasm sandbox
//! still has no network of its own.

use std::net::SocketAddr;
use std::time::Duration;

use http::uri::Scheme;
use http_body_util::BodyExt;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// A guest's time to connect when it sets none: loopback answers at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A guest's wait for response headers when it sets none. The invocation's
/// own deadline stops it sooner.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(900);

/// Which requests a guest may send.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutgoingPolicy {
    /// The one `http://` authority the guest may reach, if any.
    pub(crate) endpoint: Option<SocketAddr>,
}

impl OutgoingPolicy {
    /// The endpoint, when `authority` (as the guest wrote it, with its
    /// port) names it. `localhost` is not resolved: a name is never looked
    /// up on the guest's behalf.
    fn destination(&self, authority: &http::uri::Authority) -> Option<SocketAddr> {
        let endpoint = self.endpoint?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let ip = host.parse::<std::net::IpAddr>().ok()?;
        (SocketAddr::new(ip, port) == endpoint).then_some(endpoint)
    }
}

type ErrorFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;
type SendFuture =
    Box<dyn Future<Output = Result<(http::Response<WasiBody>, ErrorFuture), Error>> + Send>;

impl WasiHttpHooks for OutgoingPolicy {
    fn is_supported_scheme(&mut self, scheme: &Scheme) -> bool {
        // kiln's endpoint inside a sandbox is plain HTTP on loopback.
        *scheme == Scheme::HTTP
    }

    fn default_scheme(&mut self) -> Option<Scheme> {
        Some(Scheme::HTTP)
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: ErrorFuture,
    ) -> SendFuture {
        drop(fut);
        let policy = *self;
        Box::new(async move {
            let authority = request
                .uri()
                .authority()
                .cloned()
                .ok_or(Error::HttpRequestUriInvalid)?;
            let Some(endpoint) = policy.destination(&authority) else {
                tracing::debug!(%authority, "outgoing request refused: not kiln's endpoint");
                return Err(Error::HttpRequestDenied);
            };
            send(endpoint, request, options.unwrap_or_default()).await
        })
    }
}

/// Sends `request` over a new HTTP/1.1 connection to `endpoint`.
async fn send(
    endpoint: SocketAddr,
    mut request: http::Request<WasiBody>,
    options: RequestOptions,
) -> Result<(http::Response<WasiBody>, ErrorFuture), Error> {
    let connect_timeout = options.connect_timeout.unwrap_or(CONNECT_TIMEOUT);
    let stream = tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(endpoint))
        .await
        .map_err(|_| Error::ConnectionTimeout)?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Error::ConnectionRefused,
            _ => Error::Connect(e),
        })?;
    let (mut sender, connection) = tokio::time::timeout(
        connect_timeout,
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)??;
    // An origin-form target: the authority travels in `Host`.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *request.uri_mut() = http::Uri::try_from(path).map_err(|_| Error::HttpRequestUriInvalid)?;
    // The connection is driven beside the exchange; it ends once the
    // response body has been read (or dropped), and its outcome is what the
    // body's reader learns last.
    let connection = tokio::spawn(connection);
    let first_byte = options.first_byte_timeout.unwrap_or(FIRST_BYTE_TIMEOUT);
    let response = tokio::time::timeout(first_byte, sender.send_request(request))
        .await
        .map_err(|_| Error::ConnectionReadTimeout)??;
    let finished: ErrorFuture = Box::new(async move {
        match connection.await {
            Ok(outcome) => outcome.map_err(Error::from),
            Err(_) => Err(Error::ConnectionTerminated),
        }
    });
    Ok((
        response.map(|body| body.map_err(Error::from).boxed_unsync()),
        finished,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(bytes: &'static [u8]) -> WasiBody {
        http_body_util::Full::new(bytes::Bytes::from_static(bytes))
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    fn authority(s: &str) -> http::uri::Authority {
        s.parse().unwrap()
    }

    #[test]
    fn only_the_endpoint_is_allowed() {
        let policy = OutgoingPolicy {
            endpoint: Some("127.0.0.1:9002".parse().unwrap()),
        };
        assert!(policy.destination(&authority("127.0.0.1:9002")).is_some());
        for other in [
            "127.0.0.1:9003",
            "127.0.0.1",
            "127.0.0.2:9002",
            "localhost:9002",
            "example.com:9002",
            "[::1]:9002",
        ] {
            assert!(policy.destination(&authority(other)).is_none(), "{other}");
        }
        let none = OutgoingPolicy { endpoint: None };
        assert!(none.destination(&authority("127.0.0.1:9002")).is_none());
    }

    #[tokio::test]
    async fn a_refused_request_makes_no_connection() {
        // A listener the guest names but may not reach: it must see nothing.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut policy = OutgoingPolicy {
            endpoint: Some("127.0.0.1:1".parse().unwrap()),
        };
        let request = http::Request::get(format!("http://{addr}/"))
            .body(full(b""))
            .unwrap();
        let sent = Box::into_pin(policy.send_request(request, None, Box::new(async { Ok(()) })));
        assert!(matches!(sent.await, Err(Error::HttpRequestDenied)));
        let accepted = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        assert!(accepted.is_err(), "a connection was made");
    }
}
