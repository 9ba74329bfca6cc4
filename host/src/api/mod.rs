//! The HTTP API: Lambda's REST API as botocore's service model defines it
//! (paths, JSON shapes, status codes, error shapes), plus kiln's own
//! endpoints under `/kiln` and the health checks.
//!
//! Bodies are read here, within per-operation size limits, so that an
//! oversized request gets Lambda's error type rather than a bare 413.

pub mod connections;
mod console;
mod error;
mod functions;
mod guard;
mod invoke;
mod keys;
mod layers;
mod query;
mod queue;
mod settings;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};

use serde::de::DeserializeOwned;

pub use error::ApiError;

use crate::control::ControlPlane;
use crate::invoke::DataPlane;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Functions and configuration.
    pub control: Arc<ControlPlane>,
    /// Invocations.
    pub data: Arc<DataPlane>,
    /// Signatures and policies.
    pub auth: Arc<crate::auth::Authenticator>,
    /// Where control-plane calls are recorded.
    pub audit: Arc<crate::audit::AuditLog>,
    /// Signed-in consoles.
    pub console: Arc<console::Sessions>,
}

/// Largest control-plane request body: Lambda's limit for a direct upload
/// (a 50 MB zip, base64-encoded, plus the JSON around it).
pub const MAX_CONTROL_BODY: usize = 70_167_211;

/// The API's router.
pub fn router(state: AppState) -> Router {
    use axum::routing::{delete, put};
    const F: &str = "/2015-03-31/functions/{name}";
    Router::new()
        // Functions.
        .route(
            "/2015-03-31/functions",
            post(functions::create).get(functions::list),
        )
        .route("/2015-03-31/functions/", get(functions::list))
        .route(F, get(functions::get).delete(functions::delete))
        .route(
            &format!("{F}/configuration"),
            get(functions::get_configuration).put(functions::update_configuration),
        )
        .route(&format!("{F}/code"), put(functions::update_code))
        .route(&format!("{F}/invocations"), post(invoke::invoke))
        // Versions and aliases.
        .route(
            &format!("{F}/versions"),
            post(functions::publish_version).get(functions::list_versions),
        )
        .route(
            &format!("{F}/aliases"),
            post(functions::create_alias).get(functions::list_aliases),
        )
        .route(
            &format!("{F}/aliases/{{alias}}"),
            get(functions::get_alias)
                .put(functions::update_alias)
                .delete(functions::delete_alias),
        )
        // Resource policies.
        .route(
            &format!("{F}/policy"),
            post(settings::add_permission).get(settings::get_policy),
        )
        .route(
            &format!("{F}/policy/{{sid}}"),
            delete(settings::remove_permission),
        )
        // Concurrency.
        .route(
            "/2017-10-31/functions/{name}/concurrency",
            put(settings::put_concurrency).delete(settings::delete_concurrency),
        )
        .route(
            "/2019-09-30/functions/{name}/concurrency",
            get(settings::get_concurrency),
        )
        .route(
            "/2019-09-30/functions/{name}/provisioned-concurrency",
            put(settings::put_provisioned)
                .get(settings::get_provisioned)
                .delete(settings::delete_provisioned),
        )
        .route(
            "/2016-08-19/account-settings",
            get(settings::account_settings),
        )
        .route(
            "/2016-08-19/account-settings/",
            get(settings::account_settings),
        )
        // Asynchronous invocation settings.
        .route(
            "/2019-09-25/functions/{name}/event-invoke-config",
            put(settings::put_event_invoke)
                .post(settings::update_event_invoke)
                .get(settings::get_event_invoke)
                .delete(settings::delete_event_invoke),
        )
        .route(
            "/2019-09-25/functions/{name}/event-invoke-config/list",
            get(settings::list_event_invoke),
        )
        // Tags.
        .route(
            "/2017-03-31/tags/{arn}",
            post(settings::tag_resource)
                .get(settings::list_tags)
                .delete(settings::untag_resource),
        )
        // Layers.
        .route("/2018-10-31/layers", get(layers::list_or_find))
        .route("/2018-10-31/layers/", get(layers::list_or_find))
        .route(
            "/2018-10-31/layers/{layer}/versions",
            post(layers::publish).get(layers::list_versions),
        )
        .route(
            "/2018-10-31/layers/{layer}/versions/{version}",
            get(layers::get_version).delete(layers::delete_version),
        )
        .route(
            "/2018-10-31/layers/{layer}/versions/{version}/policy",
            post(layers::add_permission).get(layers::get_policy),
        )
        .route(
            "/2018-10-31/layers/{layer}/versions/{version}/policy/{sid}",
            delete(layers::remove_permission),
        )
        // kiln's own.
        .route(
            "/kiln/functions/{name}/code.zip",
            get(functions::download_code),
        )
        .route("/kiln/functions/{name}/logs", get(functions::function_logs))
        .route(
            "/kiln/functions/{name}/activity",
            get(functions::function_activity),
        )
        .route(
            "/kiln/functions/{name}/config-history",
            get(functions::config_history),
        )
        .route(
            "/kiln/layers/{layer}/{version}/content.zip",
            get(layers::download),
        )
        .route("/kiln/queue/{name}/records", get(queue::list))
        .route("/kiln/queue/{name}/records/{id}", get(queue::show))
        .route("/kiln/queue/{name}/redrive", post(queue::redrive))
        .route("/kiln/keys", post(keys::create_key).get(keys::list_keys))
        .route("/kiln/keys/{id}", delete(keys::delete_key))
        .route("/kiln/roles", post(keys::create_role).get(keys::list_roles))
        .route("/kiln/roles/{role}", delete(keys::delete_role))
        .route(
            "/kiln/roles/{role}/revoke-sessions",
            post(keys::revoke_sessions),
        )
        .route("/kiln/master-key/rotate", post(keys::rotate_master))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard::guard))
        // The console's page and sign-in; its reads go through the gate.
        .route("/console", get(console::page))
        .route("/console/", get(console::page))
        .route("/console/login", post(console::login))
        .route("/console/logout", post(console::logout))
        .route("/console/session", get(console::session))
        // STS and IAM in AWS's query protocol: signed for their own
        // services, so authenticated in their module.
        .route("/", post(query::handle).get(query::handle))
        // Unauthenticated: health checks and Prometheus scrapes.
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/ready", get(|| async { "ready" }))
        .fallback(unknown_operation)
        .method_not_allowed_fallback(unknown_operation)
        // Limits are enforced per operation in `read_body`.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// `Marker` and `MaxItems` of a List operation.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct Paging {
    #[serde(rename = "Marker")]
    pub(crate) marker: Option<String>,
    #[serde(rename = "MaxItems")]
    max_items: Option<String>,
}

impl Paging {
    /// `MaxItems` as a number (its range is checked by each operation).
    pub(crate) fn max_items(&self) -> Result<Option<i64>, ApiError> {
        self.max_items
            .as_deref()
            .map(|m| {
                m.parse::<i64>().map_err(|_| {
                    ApiError::invalid_parameter(format!("MaxItems must be a number, not {m:?}"))
                })
            })
            .transpose()
    }
}

/// A List operation's answer: `{"<key>": [...], "NextMarker": ...}`.
pub(crate) fn listing<T: serde::Serialize>(
    key: &str,
    items: Vec<T>,
    next: Option<String>,
) -> axum::Json<serde_json::Value> {
    let mut body = serde_json::Map::new();
    body.insert(
        key.to_owned(),
        serde_json::to_value(items).unwrap_or_default(),
    );
    if let Some(next) = next {
        body.insert("NextMarker".to_owned(), next.into());
    }
    axum::Json(body.into())
}

/// A request's headers as signature verification takes them.
pub(crate) fn header_pairs(headers: &axum::http::HeaderMap) -> Vec<(&str, &[u8])> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect()
}

/// The host the caller used, for links back to this server.
pub(crate) fn host(headers: &axum::http::HeaderMap) -> String {
    headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or("127.0.0.1:9000")
        .to_owned()
}

async fn unknown_operation(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "UnknownOperationException",
        format!(
            "kiln does not serve {} {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// Every response carries `x-amzn-RequestId`, as Lambda's do.
/// Gives every response a request id, every invocation a trace (the
/// caller's `X-Amzn-Trace-Id`, or a new one), and every request a span.
async fn request_id(mut request: Request, next: Next) -> Response {
    use tracing::Instrument as _;

    let invocation = request.method() == axum::http::Method::POST
        && request.uri().path().ends_with("/invocations");
    if invocation
        && !request.headers().contains_key("x-amzn-trace-id")
        && let Ok(v) = HeaderValue::from_str(&crate::invoke::new_trace_id())
    {
        request.headers_mut().insert("x-amzn-trace-id", v);
    }
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        "request",
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    crate::telemetry::set_remote_parent(
        &span,
        request
            .headers()
            .get("x-amzn-trace-id")
            .and_then(|v| v.to_str().ok()),
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if !response.headers().contains_key("x-amzn-requestid") {
        let id = uuid::Uuid::new_v4().to_string();
        if let Ok(v) = HeaderValue::from_str(&id) {
            response.headers_mut().insert("x-amzn-requestid", v);
        }
    }
    response
}

/// Runs blocking store work off the async workers, its error answered as
/// `error` says.
pub(crate) async fn blocking<T: Send + 'static, E: Send + 'static>(
    error: impl FnOnce(E) -> ApiError,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("store task failed: {e}")))?
        .map_err(error)
}

/// How long a request body may go without a byte: a client that stops
/// half-way through a body does not hold its connection (and whatever
/// waits on it) for longer.
pub const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// How long a whole request body may take (a 70 MB upload at 1 MB/s): a
/// client that trickles bytes cannot hold a connection indefinitely.
pub const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// Reads a body of at most `limit` bytes; a larger one is answered with
/// `too_large`, one that stalls for [`BODY_IDLE_TIMEOUT`] with 408.
pub(crate) async fn read_body(
    body: Body,
    limit: usize,
    too_large: impl FnOnce() -> ApiError,
) -> Result<Bytes, ApiError> {
    read_body_within(body, limit, BODY_IDLE_TIMEOUT, too_large).await
}

async fn read_body_within(
    body: Body,
    limit: usize,
    idle: std::time::Duration,
    too_large: impl FnOnce() -> ApiError,
) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt as _;
    let mut body = http_body_util::Limited::new(body, limit);
    let mut bytes = bytes::BytesMut::new();
    let deadline = tokio::time::Instant::now() + BODY_DEADLINE;
    loop {
        let wait = idle.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let frame = match tokio::time::timeout(wait, body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "RequestTimeoutException",
                    format!(
                        "The request body did not arrive in time: no byte for {} ms, or not all \
                         of it within {} s",
                        idle.as_millis(),
                        BODY_DEADLINE.as_secs()
                    ),
                ));
            }
            Ok(None) => return Ok(bytes.freeze()),
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => {
                return Err(if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    ApiError::invalid_content(format!("could not read the request body: {e}"))
                });
            }
        };
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
}

/// Parses a JSON request body of a control-plane operation.
pub(crate) async fn json_body<T: DeserializeOwned>(
    body: Body,
    operation: &str,
) -> Result<T, ApiError> {
    let bytes = read_body(body, MAX_CONTROL_BODY, || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLargeException",
            format!("Request must be smaller than {MAX_CONTROL_BODY} bytes for the {operation} operation"),
        )
    })
    .await?;
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid_content(format!("Could not parse request body into json: {e}"))
    })
}

/// `GET /metrics`: OpenMetrics text. Per function and version: what the
/// data plane counted (`crate::metrics`); per host: environments, memory,
/// queue depth, and which sandboxes this host can run and which one runs
/// each kind of function, so that a fallback (no microVM here, say) is
/// visible to monitoring.
async fn metrics(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;

    let sandboxes = state.data.sandboxes();
    let snapshot = {
        let data = state.data.clone();
        tokio::task::spawn_blocking(move || data.metrics_snapshot())
            .await
            .ok()
    };
    let Some(snapshot) = snapshot else {
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from("reading the host's gauges failed"))
            .unwrap_or_default();
    };
    let mut registry = crate::metrics::snapshot_registry(&snapshot);
    let available = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    registry.register(
        "sandbox_available",
        "Whether this host can run the sandbox (probed at start)",
        available.clone(),
    );
    for (kind, verdict) in &sandboxes.availability {
        available
            .get_or_create(&vec![("sandbox", kind.as_str())])
            .set(i64::from(verdict.is_ok()));
    }
    let selected = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    registry.register(
        "sandbox_selected",
        "The sandbox each kind of function runs in on this host",
        selected.clone(),
    );
    selected
        .get_or_create(&vec![
            ("family", "wasm"),
            ("sandbox", sandboxes.wasm.kind().as_str()),
        ])
        .set(1);
    if let Ok(native) = &sandboxes.native {
        selected
            .get_or_create(&vec![
                ("family", "native"),
                ("sandbox", native.kind().as_str()),
            ])
            .set(1);
    }
    // What the environments may take from the host, and what they hold.
    let (budget_mb, reserved_mb) = state.data.memory_budget();
    let host = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    registry.register(
        "environment_limit",
        "What all execution environments together may take from the host (memory in bytes, processes)",
        host.clone(),
    );
    let used = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    registry.register(
        "environment_use",
        "What the execution environments hold of their limit now",
        used.clone(),
    );
    let mib = |m: u64| i64::try_from(m.saturating_mul(1 << 20)).unwrap_or(i64::MAX);
    host.get_or_create(&vec![("resource", "memory_bytes")])
        .set(mib(budget_mb));
    used.get_or_create(&vec![("resource", "memory_bytes")])
        .set(mib(reserved_mb));
    host.get_or_create(&vec![("resource", "processes")])
        .set(i64::try_from(sandboxes.limits.max_pids).unwrap_or(i64::MAX));
    if let Some(cgroup) = &sandboxes.server_cgroup {
        used.get_or_create(&vec![("resource", "processes")])
            .set(i64::try_from(cgroup.process_count()).unwrap_or(i64::MAX));
    }
    let Ok(body) = state.data.metrics().encode(&registry) else {
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from("encoding metrics failed"))
            .unwrap_or_default();
    };
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that sends a little, then nothing more.
    struct Stalled(bool);

    impl http_body::Body for Stalled {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            if self.0 {
                std::task::Poll::Pending
            } else {
                self.0 = true;
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                    b"half",
                )))))
            }
        }
    }

    #[tokio::test]
    async fn a_body_that_stops_arriving_is_answered_408() {
        let idle = std::time::Duration::from_millis(100);
        let e = read_body_within(Body::new(Stalled(false)), 1024, idle, || {
            ApiError::internal("too large")
        })
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::REQUEST_TIMEOUT);
        // A whole body within the limit reads; a larger one is too large.
        let whole = read_body_within(Body::from("whole"), 1024, idle, || ApiError::internal("x"));
        assert_eq!(whole.await.unwrap(), Bytes::from_static(b"whole"));
        let big = read_body_within(Body::from("0123456789"), 4, idle, || {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "TooLarge", "big")
        });
        assert_eq!(big.await.unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
