//! The native side of the SDK: on a non-Wasm target, the same handler runs
//! as a Lambda custom runtime `bootstrap` that speaks the Runtime API
//! (2018-06-01) at `AWS_LAMBDA_RUNTIME_API`.
//!
//! The loop, in order: run the init hook (an error is posted to
//! `/runtime/init/error` and ends the process); then forever: `GET
//! /runtime/invocation/next`, call the handler (panics caught), `POST` its
//! response or its error.

use std::cell::RefCell;
use std::io::Read;
use std::panic::{AssertUnwindSafe, catch_unwind};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Context, Error};

thread_local! {
    static REQUEST_ID: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The request id being served, for log lines.
pub(crate) fn current_request_id() -> Option<String> {
    REQUEST_ID.with(|r| r.borrow().clone())
}

/// Now as `2024-05-01T12:00:00.123Z`.
pub(crate) fn timestamp() -> String {
    let now = crate::clock::Utc::now();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        now.year, now.month, now.day, now.hour, now.minute, now.second, now.millis
    )
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    fn new() -> Self {
        let host =
            std::env::var("AWS_LAMBDA_RUNTIME_API").unwrap_or_else(|_| "127.0.0.1:9001".into());
        // No timeouts: `next` waits as long as there is no invocation.
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        Self {
            base: format!("http://{host}/2018-06-01/runtime"),
            agent,
        }
    }

    fn post(&self, path: &str, error_type: Option<&str>, body: &[u8]) {
        let mut request = self.agent.post(&format!("{}{path}", self.base));
        if let Some(t) = error_type {
            request = request.header("Lambda-Runtime-Function-Error-Type", t);
        }
        match request.send(body) {
            Ok(mut r) => {
                // Read to the end: only a finished response lets the
                // connection go back to the pool for the next `next`.
                let status = r.status();
                let _ = r.body_mut().read_to_vec();
                if !status.is_success() {
                    eprintln!("kiln-sdk: the Runtime API answered {status} to POST {path}");
                }
            }
            Err(e) => {
                eprintln!("kiln-sdk: POST {path}: {e}");
                std::process::exit(1);
            }
        }
    }
}

fn error_body(e: &Error) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "errorType": e.error_type(),
        "errorMessage": e.message(),
    }))
    .unwrap_or_default()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the handler panicked".to_owned())
}

/// Runs `handler` as a custom runtime; never returns.
pub fn run<E, R, Er, Ie>(
    handler: fn(E, &Context) -> Result<R, Er>,
    init: Option<fn() -> Result<(), Ie>>,
) -> !
where
    E: DeserializeOwned,
    R: Serialize,
    Er: Into<Error>,
    Ie: Into<Error>,
{
    let api = Api::new();
    if let Some(init) = init {
        let outcome = catch_unwind(AssertUnwindSafe(init))
            .map_err(|p| Error::new("Panic", panic_message(p.as_ref())))
            .and_then(|r| r.map_err(Into::into));
        if let Err(e) = outcome {
            api.post("/init/error", Some(e.error_type()), &error_body(&e));
            std::process::exit(1);
        }
    }
    loop {
        let mut response = match api
            .agent
            .get(&format!("{}/invocation/next", api.base))
            .call()
        {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                eprintln!("kiln-sdk: the Runtime API answered {} to next", r.status());
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("kiln-sdk: GET next: {e}");
                std::process::exit(1);
            }
        };
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let ctx = Context {
            request_id: header("lambda-runtime-aws-request-id"),
            deadline_ms: header("lambda-runtime-deadline-ms").parse().unwrap_or(0),
            function_name: env("AWS_LAMBDA_FUNCTION_NAME"),
            function_version: env("AWS_LAMBDA_FUNCTION_VERSION"),
            invoked_function_arn: header("lambda-runtime-invoked-function-arn"),
            memory_limit_mb: env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").parse().unwrap_or(0),
            trace_id: header("lambda-runtime-trace-id"),
            client_context: Some(header("lambda-runtime-client-context")).filter(|c| !c.is_empty()),
        };
        let mut event = Vec::new();
        if let Err(e) = response.body_mut().as_reader().read_to_end(&mut event) {
            eprintln!("kiln-sdk: reading the event: {e}");
            std::process::exit(1);
        }
        // SAFETY: the runtime is single-threaded: nothing reads the
        // environment concurrently with this write.
        unsafe { std::env::set_var("_X_AMZN_TRACE_ID", &ctx.trace_id) };
        REQUEST_ID.with(|r| *r.borrow_mut() = Some(ctx.request_id.clone()));
        let result = catch_unwind(AssertUnwindSafe(|| {
            crate::__private::call(handler, &event, &ctx)
        }))
        .unwrap_or_else(|p| Err(Error::new("Panic", panic_message(p.as_ref()))));
        let id = ctx.request_id.clone();
        match result {
            Ok(body) => api.post(&format!("/invocation/{id}/response"), None, &body),
            Err(e) => api.post(
                &format!("/invocation/{id}/error"),
                Some(e.error_type()),
                &error_body(&e),
            ),
        }
        REQUEST_ID.with(|r| *r.borrow_mut() = None);
    }
}
