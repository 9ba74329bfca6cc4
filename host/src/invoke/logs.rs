//! An invocation's log as Lambda writes it: `START`, the function's own
//! output, `END`, `REPORT` with duration, billed duration, memory.

use std::time::Duration;

use base64::Engine as _;

use crate::control::model::{FunctionRecord, LogLevel, LogSettings};

/// Lambda tails the last 4 KB of the log.
const LOG_TAIL: usize = 4096;

/// Now as `2024-05-01T12:00:00.123Z`.
pub(super) fn rfc3339_now() -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&fmt)
        .unwrap_or_default()
}

/// Builds one invocation's log, as text (Lambda's `START`/`END`/`REPORT`
/// lines around the function's output) or, with `LogFormat: JSON`, as one
/// JSON object per line (`platform.start`, the function's lines with their
/// level and request id, `platform.report`), filtered by the levels set.
pub(super) struct LogBuilder {
    text: Vec<u8>,
    keep: bool,
    request_id: String,
    json: Option<JsonLevels>,
}

#[derive(Clone, Copy)]
struct JsonLevels {
    application: LogLevel,
    system: LogLevel,
}

/// A line in the guest SDK's layout (`time\trequest-id\tLEVEL\tmessage`
/// then `\tkey=value` fields, as Lambda's runtimes write them) as a JSON
/// record with its level and fields; `None` for any other line.
fn sdk_line(line: &str) -> Option<serde_json::Value> {
    let mut parts = line.split('\t');
    let (time, request_id, level, message) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let level = LogLevel::parse(level).filter(|_| level.bytes().all(|b| b.is_ascii_uppercase()))?;
    if !(time.len() >= 20 && time.as_bytes()[0].is_ascii_digit() && time.contains('T')) {
        return None;
    }
    let mut event = serde_json::json!({
        "timestamp": time,
        "level": level.as_str(),
        "requestId": request_id,
        "message": message,
    });
    // Fields are `key=value`; a part that is not one belongs to the
    // message (a tab the writer did not escape).
    let mut message = message.to_owned();
    for part in parts {
        match part.split_once('=') {
            Some((k, v))
                if !k.is_empty()
                    && !matches!(k, "timestamp" | "level" | "requestId" | "message") =>
            {
                event[k] = serde_json::Value::String(v.to_owned());
            }
            _ => {
                message.push('\t');
                message.push_str(part);
            }
        }
    }
    event["message"] = serde_json::Value::String(message);
    Some(event)
}

/// How an invocation ended, as `platform.report` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Success,
    Error,
    Timeout,
}

impl Status {
    pub(super) fn of(outcome: &kiln_proto::Outcome) -> Self {
        match outcome {
            kiln_proto::Outcome::Response(_) => Status::Success,
            kiln_proto::Outcome::Failed { error_type, .. } if error_type.contains("Timedout") => {
                Status::Timeout
            }
            _ => Status::Error,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Error => "error",
            Status::Timeout => "timeout",
        }
    }
}

impl LogBuilder {
    /// `keep`: whether the tail will be asked for.
    pub(super) fn new(keep: bool, settings: &LogSettings, request_id: &str) -> Self {
        Self {
            text: Vec::new(),
            keep,
            request_id: request_id.to_owned(),
            json: settings.json.then(|| JsonLevels {
                application: settings.application_level(),
                system: settings.system_level(),
            }),
        }
    }

    fn line(&mut self, line: &str) {
        self.text.extend_from_slice(line.as_bytes());
        self.text.push(b'\n');
    }

    /// A platform record: a text line, or a JSON record at INFO.
    fn platform(&mut self, text: impl FnOnce() -> String, kind: &str, record: serde_json::Value) {
        match self.json {
            None => self.line(&text()),
            Some(levels) if levels.system <= LogLevel::Info => {
                let event = serde_json::json!({
                    "time": rfc3339_now(),
                    "type": kind,
                    "record": record,
                });
                self.line(&event.to_string());
            }
            Some(_) => {}
        }
    }

    /// Appends START.
    pub(super) fn start(&mut self, version: &str) {
        let id = self.request_id.clone();
        self.platform(
            || format!("START RequestId: {id} Version: {version}"),
            "platform.start",
            serde_json::json!({ "requestId": id, "version": version }),
        );
    }

    /// Appends the function's own output (init or invocation).
    pub(super) fn raw(&mut self, bytes: &[u8]) {
        let Some(levels) = self.json else {
            self.text.extend_from_slice(bytes);
            if !bytes.is_empty() && !bytes.ends_with(b"\n") {
                self.text.push(b'\n');
            }
            return;
        };
        let timestamp = rfc3339_now();
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let line = String::from_utf8_lossy(line);
            // A line that already is a JSON object is the function's own
            // structured record: kept as written, filtered by its level.
            let object = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .filter(serde_json::Value::is_object);
            match object {
                Some(record) => {
                    let level = record
                        .get("level")
                        .and_then(|l| l.as_str())
                        .and_then(LogLevel::parse)
                        .unwrap_or(LogLevel::Info);
                    if level >= levels.application {
                        self.line(&line);
                    }
                }
                None => {
                    let event = sdk_line(&line).unwrap_or_else(|| {
                        serde_json::json!({
                            "timestamp": timestamp,
                            "level": "INFO",
                            "requestId": self.request_id,
                            "message": line,
                        })
                    });
                    let level = event["level"].as_str().and_then(LogLevel::parse);
                    if level.unwrap_or(LogLevel::Info) >= levels.application {
                        self.line(&event.to_string());
                    }
                }
            }
        }
    }

    /// Appends the platform's line for an invocation the environment did
    /// not finish, as Lambda writes it after the function's own output:
    /// `<time> <request id> Task timed out after 3.00 seconds` for a
    /// timeout, the error's message and type for a runtime that failed.
    pub(super) fn failure(&mut self, outcome: &kiln_proto::Outcome, timeout: Duration) {
        let kiln_proto::Outcome::Failed {
            error_type,
            message,
        } = outcome
        else {
            return;
        };
        let text = if error_type == "Sandbox.Timedout" {
            format!("Task timed out after {:.2} seconds", timeout.as_secs_f64())
        } else {
            // Lambda prefixes the request id itself; say it once.
            let bare = message
                .strip_prefix(&format!("RequestId: {} Error: ", self.request_id))
                .unwrap_or(message);
            format!("Error: {bare} ({error_type})")
        };
        match self.json {
            None => {
                let line = format!("{} {} {text}", rfc3339_now(), self.request_id);
                self.line(&line);
            }
            Some(levels) if levels.system <= LogLevel::Error => {
                let event = serde_json::json!({
                    "timestamp": rfc3339_now(),
                    "level": "ERROR",
                    "requestId": self.request_id,
                    "message": text,
                    "errorType": error_type,
                });
                self.line(&event.to_string());
            }
            Some(_) => {}
        }
    }

    /// Appends END and REPORT (or `platform.report`).
    pub(super) fn finish(
        &mut self,
        record: &FunctionRecord,
        status: Status,
        duration: Duration,
        max_memory_bytes: u64,
        init: Option<Duration>,
    ) {
        let request_id = self.request_id.clone();
        let ms = duration.as_secs_f64() * 1000.0;
        let billed = ms.ceil().max(1.0) as u64;
        let max_used_mb = max_memory_bytes.div_ceil(1 << 20);
        let init_ms = init.map(|i| i.as_secs_f64() * 1000.0);
        if self.json.is_none() {
            self.line(&format!("END RequestId: {request_id}"));
        }
        let mut metrics = serde_json::json!({
            "durationMs": (ms * 100.0).round() / 100.0,
            "billedDurationMs": billed,
            "memorySizeMB": record.memory_size,
            "maxMemoryUsedMB": max_used_mb,
        });
        if let Some(init_ms) = init_ms {
            metrics["initDurationMs"] = serde_json::json!((init_ms * 100.0).round() / 100.0);
        }
        self.platform(
            || {
                let mut report = format!(
                    "REPORT RequestId: {request_id}\tDuration: {ms:.2} ms\tBilled Duration: {billed} ms\t\
                     Memory Size: {} MB\tMax Memory Used: {max_used_mb} MB",
                    record.memory_size
                );
                if let Some(init_ms) = init_ms {
                    report.push_str(&format!("\tInit Duration: {init_ms:.2} ms"));
                }
                report
            },
            "platform.report",
            serde_json::json!({
                "requestId": request_id,
                "metrics": metrics,
                "status": status.as_str(),
            }),
        );
        if tracing::enabled!(target: "kiln::function", tracing::Level::DEBUG) {
            tracing::debug!(
                target: "kiln::function",
                function = %record.name,
                version = %record.version,
                "{}",
                String::from_utf8_lossy(&self.text)
            );
        }
    }

    /// The whole log so far.
    pub(super) fn text(&self) -> &[u8] {
        &self.text
    }

    /// Base64 of the last 4 KB, if asked for.
    pub(super) fn tail(&self) -> Option<String> {
        self.keep.then(|| {
            let start = self.text.len().saturating_sub(LOG_TAIL);
            base64::engine::general_purpose::STANDARD.encode(&self.text[start..])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(logging: serde_json::Value) -> FunctionRecord {
        serde_json::from_value(serde_json::json!({
            "name": "f", "runtime": "wasip2", "role": "r", "handler": "h",
            "description": "", "timeout": 3, "memory_size": 256,
            "ephemeral_storage": 512, "environment": {}, "architectures": [],
            "code_sha256_hex": "", "code_sha256": "", "code_size": 0,
            "revision_id": "", "last_modified": "", "tags": {},
            "logging": logging,
        }))
        .unwrap()
    }

    fn lines(log: &LogBuilder) -> Vec<String> {
        String::from_utf8(log.text().to_vec())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn text_format_is_lambdas_lines() {
        let r = record(serde_json::json!({}));
        let mut log = LogBuilder::new(false, &r.logging, "id-1");
        log.start("$LATEST");
        log.raw(b"hello");
        let init = Some(Duration::from_micros(4_500));
        log.finish(
            &r,
            Status::Success,
            Duration::from_micros(1_200),
            3 << 20,
            init,
        );
        let l = lines(&log);
        assert_eq!(l[0], "START RequestId: id-1 Version: $LATEST");
        assert_eq!(l[1], "hello");
        assert_eq!(l[2], "END RequestId: id-1");
        assert_eq!(
            l[3],
            "REPORT RequestId: id-1\tDuration: 1.20 ms\tBilled Duration: 2 ms\t\
             Memory Size: 256 MB\tMax Memory Used: 3 MB\tInit Duration: 4.50 ms"
        );
    }

    #[test]
    fn a_timeout_writes_lambdas_line_after_the_functions_output() {
        let r = record(serde_json::json!({}));
        let mut log = LogBuilder::new(false, &r.logging, "id-9");
        log.start("$LATEST");
        log.raw(b"working...\n");
        let timeout = kiln_proto::Outcome::Failed {
            error_type: "Sandbox.Timedout".into(),
            message: "RequestId: id-9 Error: Task timed out after 3.00 seconds".into(),
        };
        log.failure(&timeout, Duration::from_secs(3));
        log.finish(&r, Status::Timeout, Duration::from_secs(3), 0, None);
        let l = lines(&log);
        assert_eq!(l[1], "working...");
        assert!(
            l[2].ends_with(" id-9 Task timed out after 3.00 seconds"),
            "{}",
            l[2]
        );
        assert!(l[2].starts_with("20"), "{}", l[2]);
        assert_eq!(l[3], "END RequestId: id-9");
        let mut log = LogBuilder::new(false, &r.logging, "id-9");
        log.failure(
            &kiln_proto::Outcome::Failed {
                error_type: "Runtime.ExitError".into(),
                message: "RequestId: id-9 Error: Runtime exited with error: signal: killed".into(),
            },
            Duration::from_secs(3),
        );
        let l = lines(&log);
        assert!(
            l[0].ends_with(
                "id-9 Error: Runtime exited with error: signal: killed (Runtime.ExitError)"
            ),
            "{}",
            l[0]
        );
    }

    #[test]
    fn json_format_wraps_lines_and_reports_as_records() {
        let r = record(serde_json::json!({ "json": true }));
        let mut log = LogBuilder::new(false, &r.logging, "id-2");
        log.start("7");
        log.raw(b"plain line\n{\"level\":\"DEBUG\",\"message\":\"hidden\"}\n{\"level\":\"ERROR\",\"message\":\"kept\"}\n");
        log.finish(&r, Status::Error, Duration::from_micros(500), 1, None);
        let l: Vec<serde_json::Value> = lines(&log)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(l.len(), 4, "{l:?}");
        assert_eq!(l[0]["type"], "platform.start");
        assert_eq!(l[0]["record"]["requestId"], "id-2");
        assert_eq!(l[0]["record"]["version"], "7");
        assert_eq!(l[1]["level"], "INFO");
        assert_eq!(l[1]["message"], "plain line");
        assert_eq!(l[1]["requestId"], "id-2");
        assert_eq!(l[2]["message"], "kept");
        assert_eq!(l[3]["type"], "platform.report");
        assert_eq!(l[3]["record"]["status"], "error");
        assert_eq!(l[3]["record"]["metrics"]["billedDurationMs"], 1);
        assert_eq!(l[3]["record"]["metrics"]["memorySizeMB"], 256);
        assert!(l[3]["record"]["metrics"].get("initDurationMs").is_none());
    }

    #[test]
    fn json_levels_filter_function_and_platform_records() {
        let r = record(serde_json::json!({
            "json": true, "application_level": "WARN", "system_level": "WARN",
        }));
        let mut log = LogBuilder::new(false, &r.logging, "id-3");
        log.start("$LATEST");
        log.raw(b"info line\n{\"level\":\"warning\",\"message\":\"w\"}\n");
        log.raw(b"2026-11-23T10:00:00.000Z\tid-3\tINFO\tsdk info\n");
        log.raw(b"2026-11-23T10:00:00.000Z\tid-3\tERROR\tsdk error\tk=v\ttabbed part\n");
        log.finish(&r, Status::Success, Duration::from_millis(1), 1, None);
        let l = lines(&log);
        assert_eq!(l.len(), 2, "{l:?}");
        assert!(l[0].contains("\"message\":\"w\""));
        let sdk: serde_json::Value = serde_json::from_str(&l[1]).unwrap();
        assert_eq!(sdk["level"], "ERROR");
        assert_eq!(sdk["message"], "sdk error\ttabbed part");
        assert_eq!(sdk["requestId"], "id-3");
        assert_eq!(sdk["k"], "v");
    }
}
