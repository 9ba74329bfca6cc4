//! An invocation's log as Lambda writes it: `START`, the function's own
//! output, `END`, `REPORT` with duration, billed duration, memory.

use std::time::Duration;

use base64::Engine as _;

use crate::control::model::FunctionRecord;

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

/// Builds one invocation's log.
pub(super) struct LogBuilder {
    text: Vec<u8>,
    keep: bool,
}

impl LogBuilder {
    /// `keep`: whether the tail will be asked for.
    pub(super) fn new(keep: bool) -> Self {
        Self {
            text: Vec::new(),
            keep,
        }
    }

    pub(super) fn line(&mut self, line: &str) {
        self.text.extend_from_slice(line.as_bytes());
        self.text.push(b'\n');
    }

    pub(super) fn raw(&mut self, bytes: &[u8]) {
        self.text.extend_from_slice(bytes);
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            self.text.push(b'\n');
        }
    }

    /// Appends END and REPORT.
    pub(super) fn finish(
        &mut self,
        request_id: &str,
        record: &FunctionRecord,
        duration: Duration,
        max_memory_bytes: u64,
        init: Option<Duration>,
    ) {
        let ms = duration.as_secs_f64() * 1000.0;
        let billed = ms.ceil().max(1.0) as u64;
        let max_used_mb = max_memory_bytes.div_ceil(1 << 20);
        let mut report = format!(
            "REPORT RequestId: {request_id}\tDuration: {ms:.2} ms\tBilled Duration: {billed} ms\t\
             Memory Size: {} MB\tMax Memory Used: {max_used_mb} MB",
            record.memory_size
        );
        if let Some(init) = init {
            report.push_str(&format!(
                "\tInit Duration: {:.2} ms",
                init.as_secs_f64() * 1000.0
            ));
        }
        self.line(&format!("END RequestId: {request_id}"));
        self.line(&report);
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
