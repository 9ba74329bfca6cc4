//! The per-store host state and kiln's `runtime` interface, which is all a
//! guest can call besides WASI.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Result};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::kiln::function::{runtime, types};
use crate::logs::{LogLevel, LogSink};

pub use crate::bindings::kiln::function::types::FunctionError;

/// Longest message or field the guest may log in one line; longer ones are cut.
const MAX_LOG_FIELD: usize = 64 * 1024;
/// Most fields one log line may carry; the rest are dropped.
const MAX_LOG_FIELDS: usize = 64;

/// What one `Store` holds: WASI, limits, the log, and the invocation in
/// progress.
pub(crate) struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: Limits,
    pub(crate) log: LogSink,
    /// Set while an invocation runs.
    pub(crate) current: Option<Current>,
    /// The guest's last word before a trap (`runtime.report-fatal`).
    pub(crate) fatal: Option<FunctionError>,
    pub(crate) http: wasmtime_wasi_http::WasiHttpCtx,
    /// Where `wasi:http` requests may go: kiln's API only.
    pub(crate) outgoing: crate::outgoing::OutgoingPolicy,
}

pub(crate) struct Current {
    pub(crate) request_id: String,
    pub(crate) deadline: Instant,
    pub(crate) client_context: Option<String>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime_wasi_http::WasiHttpView for HostState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outgoing,
        }
    }
}

/// Caps an environment's linear memory at the function's MemorySize and
/// remembers the peak, for `Max Memory Used`.
pub(crate) struct Limits {
    pub(crate) memory_limit: usize,
    pub(crate) peak_memory: usize,
    pub(crate) memory_exceeded: bool,
}

/// Tables are the other guest-growable host allocation; bound them too.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool> {
        if desired > self.memory_limit {
            self.memory_exceeded = true;
            return Err(wasmtime::format_err!(
                "memory limit of {} MiB exceeded",
                self.memory_limit >> 20
            ));
        }
        self.peak_memory = self.peak_memory.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

impl types::Host for HostState {}

impl runtime::Host for HostState {
    fn log(
        &mut self,
        level: runtime::Level,
        message: String,
        fields: Vec<(String, String)>,
    ) -> Result<()> {
        let level = match level {
            runtime::Level::Trace => LogLevel::Trace,
            runtime::Level::Debug => LogLevel::Debug,
            runtime::Level::Info => LogLevel::Info,
            runtime::Level::Warn => LogLevel::Warn,
            runtime::Level::Error => LogLevel::Error,
        };
        let request_id = self.current.as_ref().map(|c| c.request_id.as_str());
        let fields: Vec<(&str, &str)> = fields
            .iter()
            .take(MAX_LOG_FIELDS)
            .map(|(k, v)| (truncate(k, MAX_LOG_FIELD), truncate(v, MAX_LOG_FIELD)))
            .collect();
        self.log.structured(
            SystemTime::now(),
            request_id,
            level,
            truncate(&message, MAX_LOG_FIELD),
            &fields,
        );
        Ok(())
    }

    fn remaining_time_ms(&mut self) -> Result<u64> {
        Ok(self.current.as_ref().map_or(0, |c| {
            c.deadline
                .saturating_duration_since(Instant::now())
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX)
        }))
    }

    fn client_context(&mut self) -> Result<Option<String>> {
        Ok(self.current.as_ref().and_then(|c| c.client_context.clone()))
    }

    fn report_fatal(&mut self, error: FunctionError) -> Result<()> {
        self.fatal = Some(FunctionError {
            error_type: truncate(&error.error_type, 256).to_owned(),
            message: truncate(&error.message, MAX_LOG_FIELD).to_owned(),
        });
        Ok(())
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Milliseconds since the Unix epoch of a wall-clock time.
pub(crate) fn epoch_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn limiter_refuses_growth_past_the_limit_and_records_the_peak() {
        let mut l = Limits {
            memory_limit: 128 << 20,
            peak_memory: 0,
            memory_exceeded: false,
        };
        assert!(l.memory_growing(0, 64 << 20, None).unwrap());
        assert!(l.memory_growing(64 << 20, 128 << 20, None).unwrap());
        assert!(
            l.memory_growing(128 << 20, (128 << 20) + 65536, None)
                .is_err()
        );
        assert!(l.memory_exceeded);
        assert_eq!(l.peak_memory, 128 << 20);
    }
}
