//! Asynchronous invocation: the dispatcher that drains the durable queue
//! into the same invoke path as synchronous calls.
//!
//! For each claimed event, in order:
//! 1. too old (past `MaximumEventAgeInSeconds`)? -> failure, `EventAgeExceeded`;
//! 2. invoke; a response -> success;
//! 3. a function error -> retried after 1 min, then 2 min, up to
//!    `MaximumRetryAttempts` (default 2), then failure, `RetriesExhausted`;
//! 4. a throttle or a system error -> retried with exponential backoff
//!    (1 s doubling to 5 min) for as long as the event's age allows;
//! 5. a success goes to the `OnSuccess` destination, a failure to
//!    `OnFailure` — another function (as a new event) or kiln's built-in
//!    queue — as Lambda's invocation record. With no `OnFailure` set, kiln
//!    keeps the record in its built-in queue rather than dropping it.
//!
//! Every wait is multiplied by [`AsyncConfig::time_scale`], so that tests
//! can run Lambda's schedule in fractions of a second.

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use super::{DataPlane, InvokeError, InvokeInput};
use crate::control::model::LATEST;
use crate::store::queue::{Completion, DestinationRecord, Event, NewEvent, QueueStore, now_ms};

/// Timing of asynchronous invocation.
#[derive(Debug, Clone)]
pub struct AsyncConfig {
    /// Multiplies every wait and age (1.0 in production).
    pub time_scale: f64,
    /// Wait before the first retry of a function error; the second waits
    /// twice as long.
    pub retry_base: Duration,
    /// First backoff after a throttle or system error.
    pub backoff_min: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// `MaximumEventAgeInSeconds` when none is configured.
    pub default_max_age: Duration,
    /// Default `MaximumRetryAttempts`.
    pub default_retries: u32,
    /// Events run at once.
    pub concurrency: usize,
}

impl Default for AsyncConfig {
    fn default() -> Self {
        Self {
            time_scale: 1.0,
            retry_base: Duration::from_secs(60),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            default_max_age: Duration::from_secs(6 * 3600),
            default_retries: 2,
            concurrency: 64,
        }
    }
}

impl AsyncConfig {
    fn scaled_ms(&self, d: Duration) -> i64 {
        (d.as_secs_f64() * 1000.0 * self.time_scale).round() as i64
    }
}

impl DataPlane {
    /// Starts draining the queue; the task ends with the data plane.
    pub fn start_event_dispatcher(self: &Arc<Self>, config: AsyncConfig) {
        tokio::spawn(dispatch(Arc::downgrade(self), self.queue.clone(), config));
    }
}

async fn dispatch(plane: Weak<DataPlane>, queue: Arc<QueueStore>, config: AsyncConfig) {
    let running = Arc::new(Semaphore::new(config.concurrency.max(1)));
    loop {
        let Ok(first) = running.clone().acquire_owned().await else {
            return;
        };
        let room = running.available_permits() + 1;
        let events = match queue.claim(room.min(64)).await {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(error = %e, "claiming events");
                if plane.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if events.is_empty() {
            drop(first);
            if plane.strong_count() == 0 {
                return;
            }
            let q = queue.clone();
            let next_due = tokio::task::spawn_blocking(move || q.next_due())
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
            let wait = next_due
                .map(|due| Duration::from_millis((due - now_ms()).clamp(0, 1000) as u64))
                .unwrap_or(Duration::from_secs(1));
            tokio::select! {
                () = queue.ready.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        let mut first = Some(first);
        for event in events {
            let permit = match first.take() {
                Some(p) => p,
                None => match running.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (plane, queue, config) = (plane.clone(), queue.clone(), config.clone());
            tokio::spawn(async move {
                let id = event.id;
                let span = event_span(&event);
                let completion = match plane.upgrade() {
                    Some(plane) => process(&plane, &config, event).instrument(span).await,
                    None => return,
                };
                if let Err(e) = queue.complete(id, completion).await {
                    tracing::error!(event = id, error = %e, "completing an event");
                }
                drop(permit);
            });
        }
    }
}

/// The span of one attempt at an event: in the trace of the request that
/// queued it.
fn event_span(event: &Event) -> tracing::Span {
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        "async_event",
        otel.kind = "consumer",
        faas.invocation_id = %event.request_id,
        faas.name = %event.function,
        attempt = event.attempts,
        age_ms = now_ms() - event.enqueued_ms,
    );
    crate::telemetry::set_remote_parent(&span, event.trace_id.as_deref());
    span
}

/// What happened to one attempt.
enum Attempt {
    Success { version: String, payload: Vec<u8> },
    FunctionError { version: String, payload: Vec<u8> },
    Throttled,
    SystemError(String),
    Gone(String),
}

async fn process(plane: &DataPlane, config: &AsyncConfig, event: Event) -> Completion {
    let settings = plane.event_config(&event.function, event.qualifier.as_deref());
    let max_retries = settings
        .maximum_retry_attempts
        .unwrap_or(config.default_retries);
    let max_age_ms = config.scaled_ms(
        settings
            .maximum_event_age_in_seconds
            .map_or(config.default_max_age, |s| {
                Duration::from_secs(u64::from(s))
            }),
    );
    let age = |now: i64| now - event.enqueued_ms;
    let age_now = age(now_ms());
    plane.metrics().async_attempt(
        &event.function,
        Duration::from_millis(u64::try_from(age_now).unwrap_or(0)),
    );
    if age_now > max_age_ms {
        // Never invoked this time: the attempt counter already moved.
        return failure(
            plane,
            &settings.on_failure,
            &event,
            event.attempts - 1,
            "EventAgeExceeded",
            None,
        );
    }
    let attempt = match plane
        .invoke(InvokeInput {
            name: event.function.clone(),
            qualifier: event.qualifier.clone(),
            payload: event.payload.clone().into(),
            log_tail: false,
            trace_id: event.trace_id.clone(),
            request_id: Some(event.request_id.clone()),
            client_context: None,
        })
        .await
    {
        Ok(out) if out.function_error.is_none() => Attempt::Success {
            version: out.executed_version,
            payload: out.payload,
        },
        Ok(out) => Attempt::FunctionError {
            version: out.executed_version,
            payload: out.payload,
        },
        Err(InvokeError::Throttled { .. } | InvokeError::MemoryBudget { .. }) => Attempt::Throttled,
        Err(e @ (InvokeError::NotFound(_) | InvokeError::InvalidCode(_))) => {
            Attempt::Gone(e.to_string())
        }
        Err(e @ InvokeError::Internal(_)) => Attempt::SystemError(e.to_string()),
    };
    let now = now_ms();
    match attempt {
        Attempt::Success { version, payload } => {
            let response = Response {
                status: 200,
                version,
                function_error: false,
                payload,
            };
            success(plane, &settings.on_success, &event, response)
        }
        Attempt::FunctionError { version, payload } => {
            let response = Response {
                status: 200,
                version,
                function_error: true,
                payload,
            };
            if event.errors >= max_retries {
                return failure(
                    plane,
                    &settings.on_failure,
                    &event,
                    event.attempts,
                    "RetriesExhausted",
                    Some(response),
                );
            }
            let delay = config.scaled_ms(config.retry_base * 2u32.pow(event.errors));
            if age(now + delay) > max_age_ms {
                return failure(
                    plane,
                    &settings.on_failure,
                    &event,
                    event.attempts,
                    "EventAgeExceeded",
                    Some(response),
                );
            }
            Completion::Retry {
                due_ms: now + delay,
                function_error: true,
            }
        }
        Attempt::Throttled | Attempt::SystemError(_) => {
            if let Attempt::SystemError(e) = &attempt {
                tracing::warn!(request_id = %event.request_id, error = %e, "event will be retried");
            }
            let tries = event
                .attempts
                .saturating_sub(event.errors)
                .saturating_sub(1);
            let backoff = config
                .backoff_min
                .saturating_mul(2u32.saturating_pow(tries.min(16)))
                .min(config.backoff_max);
            let delay = config.scaled_ms(backoff).max(1);
            if age(now + delay) > max_age_ms {
                let status = if matches!(attempt, Attempt::Throttled) {
                    429
                } else {
                    500
                };
                let response = Response {
                    status,
                    version: event.qualifier.clone().unwrap_or_else(|| LATEST.to_owned()),
                    function_error: false,
                    payload: Vec::new(),
                };
                return failure(
                    plane,
                    &settings.on_failure,
                    &event,
                    event.attempts,
                    "EventAgeExceeded",
                    Some(response),
                );
            }
            Completion::Retry {
                due_ms: now + delay,
                function_error: false,
            }
        }
        Attempt::Gone(reason) => {
            let response = Response {
                status: 404,
                version: event.qualifier.clone().unwrap_or_else(|| LATEST.to_owned()),
                function_error: false,
                payload: serde_json::to_vec(
                    &json!({"errorType": "ResourceNotFoundException", "errorMessage": reason}),
                )
                .unwrap_or_default(),
            };
            failure(
                plane,
                &settings.on_failure,
                &event,
                event.attempts,
                "RetriesExhausted",
                Some(response),
            )
        }
    }
}

struct Response {
    status: u16,
    version: String,
    function_error: bool,
    payload: Vec<u8>,
}

/// Lambda's invocation record.
fn record(
    plane: &DataPlane,
    event: &Event,
    count: u32,
    condition: &str,
    response: Option<&Response>,
) -> Value {
    let qualifier = event.qualifier.as_deref().unwrap_or(LATEST);
    let as_json = |bytes: &[u8]| {
        serde_json::from_slice::<Value>(bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
    };
    let mut r = json!({
        "version": "1.0",
        "timestamp": crate::invoke::logs::rfc3339_now(),
        "requestContext": {
            "requestId": event.request_id,
            "functionArn": plane.arn.qualified_arn(&event.function, qualifier),
            "condition": condition,
            "approximateInvokeCount": count,
        },
        "requestPayload": as_json(&event.payload),
        // kiln's addition: when each attempt started (ms since the epoch).
        "kilnAttemptTimes": event.attempt_log,
    });
    if let Some(resp) = response {
        let mut ctx = json!({ "statusCode": resp.status, "executedVersion": resp.version });
        if resp.function_error {
            ctx["functionError"] = "Unhandled".into();
        }
        r["responseContext"] = ctx;
        if !resp.payload.is_empty() {
            r["responsePayload"] = as_json(&resp.payload);
        }
    }
    r
}

fn success(
    plane: &DataPlane,
    destination: &Option<String>,
    event: &Event,
    response: Response,
) -> Completion {
    match destination {
        None => Completion::Finish {
            record: None,
            follow_up: None,
        },
        Some(d) => deliver(
            plane,
            d,
            event,
            record(plane, event, event.attempts, "Success", Some(&response)),
            "Success",
        ),
    }
}

fn failure(
    plane: &DataPlane,
    destination: &Option<String>,
    event: &Event,
    count: u32,
    condition: &str,
    response: Option<Response>,
) -> Completion {
    let r = record(plane, event, count, condition, response.as_ref());
    tracing::info!(function = %event.function, request_id = %event.request_id, condition, "event failed");
    plane.metrics().async_dropped(&event.function, condition);
    match destination {
        Some(d) => deliver(plane, d, event, r, condition),
        None => builtin(event, r, condition),
    }
}

fn builtin(event: &Event, record: Value, condition: &str) -> Completion {
    Completion::Finish {
        record: Some(Box::new(DestinationRecord {
            function: event.function.clone(),
            condition: condition.to_owned(),
            request_id: event.request_id.clone(),
            record,
        })),
        follow_up: None,
    }
}

/// Sends a record to a destination: kiln's built-in queue, or a function
/// (as a new event of its own). A destination function that does not exist
/// leaves the record in the built-in queue, marked so.
fn deliver(
    plane: &DataPlane,
    destination: &str,
    event: &Event,
    mut r: Value,
    condition: &str,
) -> Completion {
    if destination == plane.arn.builtin_queue_arn() {
        return builtin(event, r, condition);
    }
    let target = crate::control::names::parse_function_ref(destination, &plane.arn)
        .ok()
        .filter(|t| plane.resolve(&t.name, t.qualifier.as_deref()).is_ok());
    match target {
        Some(t) => Completion::Finish {
            record: None,
            follow_up: Some(Box::new(NewEvent {
                request_id: uuid::Uuid::new_v4().to_string(),
                function: t.name,
                qualifier: t.qualifier,
                payload: serde_json::to_vec(&r).unwrap_or_default(),
                trace_id: event.trace_id.clone(),
            })),
        },
        None => {
            tracing::warn!(%destination, request_id = %event.request_id, "destination unreachable; kept in the built-in queue");
            plane
                .metrics()
                .destination_failure(&event.function, condition != "Success");
            r["kilnDeliveryError"] = format!("destination {destination} does not exist").into();
            builtin(event, r, condition)
        }
    }
}
