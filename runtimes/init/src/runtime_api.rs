//! The Lambda Runtime API (2018-06-01) on 127.0.0.1:9001, as the bootstrap
//! sees it.
//!
//! The runtime's life, in order: it starts (init); its first
//! `GET /runtime/invocation/next` ends init (or `POST /runtime/init/error`
//! fails it); each `next` then waits for an invocation and returns it with
//! Lambda's headers; the runtime answers with
//! `POST /runtime/invocation/{id}/response` or `.../{id}/error`, then
//! calls `next` again.
//!
//! Threat model: the bootstrap is hostile. Requests are bounded (6 MB
//! bodies, headers by hyper), out-of-order and malformed calls get 4xx with
//! Lambda's error bodies, and nothing a request does stops the server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kiln_proto::{Invocation, Outcome};
use tokio::sync::oneshot;

/// Where the API listens, as `AWS_LAMBDA_RUNTIME_API` says.
pub const ADDRESS: &str = "127.0.0.1:9001";
/// Largest response a function may post: Lambda's, as everywhere in kiln.
pub use kiln_proto::MAX_RESPONSE;
const PREFIX: &str = "/2018-06-01/runtime";

/// What init ended with.
#[derive(Debug)]
pub enum InitEvent {
    /// The runtime asked for its first invocation.
    Ready,
    /// The runtime reported an init error.
    Failed {
        /// `Lambda-Runtime-Function-Error-Type`.
        error_type: String,
        /// The error document.
        body: Vec<u8>,
    },
}

enum Phase {
    Init,
    /// Between invocations.
    Idle,
    /// An invocation was handed out and awaits its result.
    Running {
        request_id: String,
    },
}

struct State {
    phase: Phase,
    /// The invocation answered last: a second answer for it is refused the
    /// same way whether or not the next invocation has begun.
    answered: Option<String>,
    pending: Option<Invocation>,
    waiter: Option<oneshot::Sender<Invocation>>,
    result: Option<oneshot::Sender<Outcome>>,
    init: Option<oneshot::Sender<InitEvent>>,
}

/// The API's shared state, driven by the agent and the bootstrap.
#[derive(Clone)]
pub struct RuntimeApi {
    state: Arc<Mutex<State>>,
}

type Reply = Response<Full<Bytes>>;

fn json(status: StatusCode, body: serde_json::Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts")
}

fn error(status: StatusCode, error_type: &str, message: &str) -> Reply {
    json(
        status,
        serde_json::json!({ "errorMessage": message, "errorType": error_type }),
    )
}

fn accepted() -> Reply {
    json(StatusCode::ACCEPTED, serde_json::json!({ "status": "OK" }))
}

impl RuntimeApi {
    /// A fresh API in the init phase; `init` hears how init ends.
    pub fn new(init: oneshot::Sender<InitEvent>) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                phase: Phase::Init,
                answered: None,
                pending: None,
                waiter: None,
                result: None,
                init: Some(init),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts serving on [`ADDRESS`].
    pub async fn serve(&self) -> std::io::Result<()> {
        let addr: SocketAddr = ADDRESS.parse().expect("static address");
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let api = api.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .max_buf_size(64 * 1024)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(())
    }

    /// Hands an invocation to the runtime; `result` hears its outcome.
    pub fn invoke(&self, invocation: Invocation, result: oneshot::Sender<Outcome>) {
        let mut s = self.lock();
        s.result = Some(result);
        s.phase = Phase::Running {
            request_id: invocation.request_id.clone(),
        };
        match s.waiter.take() {
            Some(waiter) => {
                if let Err(invocation) = waiter.send(invocation) {
                    s.pending = Some(invocation);
                }
            }
            None => s.pending = Some(invocation),
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Reply {
        let path = req.uri().path().to_owned();
        let Some(rest) = path.strip_prefix(PREFIX) else {
            return error(
                StatusCode::NOT_FOUND,
                "NotFound",
                "Unknown path: the Runtime API lives under /2018-06-01/runtime",
            );
        };
        match (req.method(), rest) {
            (&Method::GET, "/invocation/next") => self.next().await,
            (&Method::POST, "/init/error") => {
                let error_type = header(&req, "lambda-runtime-function-error-type")
                    .unwrap_or_else(|| "Runtime.Unknown".to_owned());
                match read_body(req).await {
                    Ok(body) => self.init_error(error_type, body),
                    Err(reply) => reply,
                }
            }
            (&Method::POST, rest) => {
                let Some((id, kind)) = rest
                    .strip_prefix("/invocation/")
                    .and_then(|r| r.rsplit_once('/'))
                else {
                    return error(StatusCode::NOT_FOUND, "NotFound", "Unknown path");
                };
                let (id, kind) = (id.to_owned(), kind.to_owned());
                if kind != "response" && kind != "error" {
                    return error(StatusCode::NOT_FOUND, "NotFound", "Unknown path");
                }
                let error_type = header(&req, "lambda-runtime-function-error-type");
                let body = match read_body(req).await {
                    Ok(body) => body,
                    Err(reply) => {
                        if reply.status() == StatusCode::PAYLOAD_TOO_LARGE {
                            self.complete(&id, kiln_proto::response_too_large());
                        }
                        return reply;
                    }
                };
                let outcome = if kind == "response" {
                    Outcome::Response(body)
                } else {
                    Outcome::FunctionError {
                        error_type: error_type.unwrap_or_else(|| "Unhandled".to_owned()),
                        body,
                    }
                };
                self.complete(&id, outcome)
            }
            (_, "/invocation/next" | "/init/error") => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "This method is not allowed here",
            ),
            (_, _) => error(StatusCode::NOT_FOUND, "NotFound", "Unknown path"),
        }
    }

    async fn next(&self) -> Reply {
        let waiting = {
            let mut s = self.lock();
            match s.phase {
                Phase::Init => {
                    s.phase = Phase::Idle;
                    if let Some(init) = s.init.take() {
                        let _ = init.send(InitEvent::Ready);
                    }
                }
                Phase::Running { .. } if s.pending.is_none() => {
                    return error(
                        StatusCode::FORBIDDEN,
                        "InvalidStateTransition",
                        "State transition from Running to Next is not allowed: post the response or error of the current invocation first",
                    );
                }
                _ => {}
            }
            if let Some(inv) = s.pending.take() {
                return deliver(inv);
            }
            if s.waiter.is_some() {
                return error(
                    StatusCode::FORBIDDEN,
                    "InvalidStateTransition",
                    "Another request is already waiting for the next invocation",
                );
            }
            let (tx, rx) = oneshot::channel();
            s.waiter = Some(tx);
            rx
        };
        match waiting.await {
            Ok(inv) => deliver(inv),
            Err(_) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ServiceUnavailable",
                "The environment is shutting down",
            ),
        }
    }

    fn complete(&self, id: &str, outcome: Outcome) -> Reply {
        let mut s = self.lock();
        let running = matches!(&s.phase, Phase::Running { request_id } if request_id == id);
        if !running && s.answered.as_deref() == Some(id) {
            return error(
                StatusCode::FORBIDDEN,
                "InvalidStateTransition",
                "This invocation already has a response",
            );
        }
        let current = match &s.phase {
            Phase::Running { request_id } => request_id.clone(),
            _ => {
                return error(
                    StatusCode::FORBIDDEN,
                    "InvalidStateTransition",
                    "No invocation is in progress: call /runtime/invocation/next first",
                );
            }
        };
        if current != id {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestID",
                "Invalid request ID",
            );
        }
        let Some(result) = s.result.take() else {
            return error(
                StatusCode::FORBIDDEN,
                "InvalidStateTransition",
                "This invocation already has a response",
            );
        };
        s.phase = Phase::Idle;
        s.answered = Some(current);
        let _ = result.send(outcome);
        accepted()
    }

    fn init_error(&self, error_type: String, body: Vec<u8>) -> Reply {
        let mut s = self.lock();
        if !matches!(s.phase, Phase::Init) {
            return error(
                StatusCode::FORBIDDEN,
                "InvalidStateTransition",
                "Init errors can only be reported during init",
            );
        }
        match s.init.take() {
            Some(init) => {
                let _ = init.send(InitEvent::Failed { error_type, body });
                accepted()
            }
            None => error(
                StatusCode::FORBIDDEN,
                "InvalidStateTransition",
                "Init already ended",
            ),
        }
    }
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(256).collect())
}

async fn read_body(req: Request<Incoming>) -> Result<Vec<u8>, Reply> {
    match Limited::new(req.into_body(), MAX_RESPONSE).collect().await {
        Ok(collected) => Ok(collected.to_bytes().to_vec()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            &format!("Exceeded maximum allowed payload size ({MAX_RESPONSE} bytes)."),
        )),
        Err(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "The request body could not be read",
        )),
    }
}

fn deliver(inv: Invocation) -> Reply {
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("lambda-runtime-aws-request-id", &inv.request_id)
        .header("lambda-runtime-deadline-ms", inv.deadline_ms.to_string())
        .header(
            "lambda-runtime-invoked-function-arn",
            &inv.invoked_function_arn,
        )
        .header("lambda-runtime-trace-id", &inv.trace_id);
    if let Some(c) = &inv.client_context {
        b = b.header("lambda-runtime-client-context", c);
    }
    if let Some(c) = &inv.cognito_identity {
        b = b.header("lambda-runtime-cognito-identity", c);
    }
    b.body(Full::new(Bytes::from(inv.payload)))
        .unwrap_or_else(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InvalidInvocation",
                "The invocation's headers are not valid",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation(id: &str) -> Invocation {
        Invocation {
            request_id: id.to_owned(),
            deadline_ms: 0,
            invoked_function_arn: String::new(),
            trace_id: String::new(),
            client_context: None,
            cognito_identity: None,
            payload: b"{}".to_vec(),
        }
    }

    #[test]
    fn a_second_answer_is_refused_alike_before_and_after_the_next_invocation() {
        let (init, _) = oneshot::channel();
        let api = RuntimeApi::new(init);
        api.lock().phase = Phase::Idle;
        let (tx, _rx) = oneshot::channel();
        api.invoke(invocation("a"), tx);
        assert_eq!(api.complete("a", Outcome::Response(vec![])).status(), 202);
        // Before the next invocation...
        assert_eq!(api.complete("a", Outcome::Response(vec![])).status(), 403);
        // ...and while it runs: the same answer, whatever the timing.
        let (tx, _rx2) = oneshot::channel();
        api.invoke(invocation("b"), tx);
        assert_eq!(api.complete("a", Outcome::Response(vec![])).status(), 403);
        assert_eq!(api.complete("x", Outcome::Response(vec![])).status(), 400);
        assert_eq!(api.complete("b", Outcome::Response(vec![])).status(), 202);
    }
}
