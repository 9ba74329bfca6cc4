//! The bounded buffer behind a guest's stdout, stderr and `runtime.log`.
//!
//! Everything a guest writes during one invocation (or its init) lands in
//! one buffer, which the environment drains when the call ends. The buffer
//! is capped: a guest that floods its output loses the excess (counted and
//! reported in a final line), never the host's memory.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Severity of a structured log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Finest detail.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected but handled.
    Warn,
    /// A failure.
    Error,
}

impl LogLevel {
    fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "TRACE",
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warn => "WARN",
            LogLevel::Error => "ERROR",
        }
    }
}

/// Output of one invocation, capped: what fits is kept, the rest counted
/// and reported when the output is taken. Shared with the agent, which
/// fills one from a native bootstrap's pipes.
#[derive(Debug)]
pub struct CappedLog {
    bytes: Vec<u8>,
    capacity: usize,
    dropped: u64,
}

impl CappedLog {
    /// At most `capacity` bytes between two [`Self::take`]s.
    pub fn new(capacity: usize) -> Self {
        Self {
            bytes: Vec::new(),
            capacity,
            dropped: 0,
        }
    }

    /// Appends what fits.
    pub fn push(&mut self, data: &[u8]) {
        let room = self.capacity.saturating_sub(self.bytes.len());
        let kept = room.min(data.len());
        self.bytes.extend_from_slice(&data[..kept]);
        self.dropped += (data.len() - kept) as u64;
    }

    /// Takes everything since the last call, with a note of what was cut.
    pub fn take(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.bytes);
        if self.dropped > 0 {
            if !out.is_empty() && !out.ends_with(b"\n") {
                out.push(b'\n');
            }
            out.extend_from_slice(
                format!(
                    "[kiln] {} bytes of log output were dropped: the limit is {} bytes per invocation\n",
                    self.dropped, self.capacity
                )
                .as_bytes(),
            );
            self.dropped = 0;
        }
        out
    }
}

/// A cheap handle to one environment's log buffer.
#[derive(Clone)]
pub(crate) struct LogSink {
    inner: Arc<Mutex<CappedLog>>,
}

impl LogSink {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(CappedLog::new(capacity))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CappedLog> {
        // A poisoned lock only means a writer panicked mid-append; the bytes
        // are still a valid (if cut) log.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends raw output, keeping what fits.
    pub(crate) fn write(&self, data: &[u8]) {
        self.lock().push(data);
    }

    /// Appends one structured line in Lambda's text layout:
    /// `time<TAB>request id<TAB>LEVEL<TAB>message[<TAB>key=value...]`.
    pub(crate) fn structured(
        &self,
        time: SystemTime,
        request_id: Option<&str>,
        level: LogLevel,
        message: &str,
        fields: &[(&str, &str)],
    ) {
        let mut line = String::with_capacity(64 + message.len());
        line.push_str(&format_rfc3339_millis(time));
        line.push('\t');
        line.push_str(request_id.unwrap_or("-"));
        line.push('\t');
        line.push_str(level.as_str());
        line.push('\t');
        push_escaped(&mut line, message);
        for (k, v) in fields {
            line.push('\t');
            push_escaped(&mut line, k);
            line.push('=');
            push_escaped(&mut line, v);
        }
        line.push('\n');
        self.write(line.as_bytes());
    }

    /// Takes everything written since the last call.
    pub(crate) fn take(&self) -> Vec<u8> {
        self.lock().take()
    }
}

/// Keeps one log line one line: newlines inside a message are escaped.
fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
}

/// `2024-05-01T12:00:00.123Z`, without pulling a date crate into the guest path.
pub(crate) fn format_rfc3339_millis(t: SystemTime) -> String {
    let ms = crate::host::epoch_millis(t);
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let (y, mo, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{:03}Z",
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl IsTerminal for LogSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LogSink {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        LogSink::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always accept: what does not fit is counted as dropped, so a
        // flooding guest never blocks waiting for room that will not come.
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogSink {
    async fn ready(&mut self) {}
}

impl AsyncWrite for LogSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        LogSink::write(&self, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn output_past_capacity_is_dropped_and_reported() {
        let sink = LogSink::new(10);
        sink.write(b"0123456789abcdef");
        let out = String::from_utf8(sink.take()).unwrap();
        assert!(out.starts_with("0123456789\n[kiln] 6 bytes"), "{out}");
        assert!(
            sink.take().is_empty(),
            "take drains the buffer and the count"
        );
    }

    #[test]
    fn structured_lines_use_lambdas_layout() {
        let sink = LogSink::new(1024);
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        sink.structured(t, Some("req-1"), LogLevel::Warn, "a\nb", &[("k", "v")]);
        assert_eq!(
            String::from_utf8(sink.take()).unwrap(),
            "2023-11-14T22:13:20.123Z\treq-1\tWARN\ta\\nb\tk=v\n"
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
