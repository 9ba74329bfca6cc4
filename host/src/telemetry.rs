//! kiln's own diagnostics: the log lines it writes to stderr, and its
//! spans, exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and not otherwise.
//!
//! Spans are written under the target [`TARGET`], which the stderr log
//! never shows: without an exporter they are disabled where they are
//! created and cost one branch. Their trace is the request's X-Ray trace
//! (`X-Amzn-Trace-Id`, or the one kiln makes up), so a trace viewer shows
//! kiln's spans under the same id the function was handed.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The target of kiln's spans.
pub const TARGET: &str = "kiln::trace";

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter's settings are not usable.
    #[error("OTLP export (OTEL_EXPORTER_OTLP_*): {0}")]
    Exporter(String),
    /// `KILN_LOG` is not a filter.
    #[error("KILN_LOG is not a valid filter: {0}")]
    Filter(String),
}

/// Keeps the exporter running; flushes what it holds when dropped.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("kiln: flushing spans: {e}");
        }
    }
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()))
}

/// Installs the process's subscriber: stderr lines filtered by `KILN_LOG`
/// (default `info`), and OTLP export of spans when configured.
pub fn init() -> Result<Telemetry, TelemetryError> {
    let directives = std::env::var("KILN_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{directives},{TARGET}=off"))
        .map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let provider = if otlp_configured() {
        if std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").is_ok_and(|p| p.trim() == "grpc") {
            return Err(TelemetryError::Exporter(
                "kiln exports over HTTP: set OTEL_EXPORTER_OTLP_PROTOCOL to http/protobuf \
                 (the default) or http/json"
                    .to_owned(),
            ));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "kiln".into()))
            .build();
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        )
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("kiln"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(TARGET, tracing::Level::TRACE),
            )
    });
    tracing_subscriber::registry().with(fmt).with(otel).init();
    Ok(Telemetry { provider })
}

/// Makes `span` a child of the X-Ray trace `header` names, when spans are
/// exported and the header is well formed.
pub fn set_remote_parent(span: &tracing::Span, header: Option<&str>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if span.is_disabled() {
        return;
    }
    if let Some(parent) = header.and_then(remote_parent) {
        let _ = span.set_parent(parent);
    }
}

/// The parent of a request's spans: the X-Ray trace `header` names
/// (`Root=1-xxxxxxxx-yyyyyyyyyyyyyyyyyyyyyyyy;Parent=16hex;Sampled=1`).
/// Without a `Parent`, a made-up one stands in, so that the trace id is
/// still the header's. `Sampled` is X-Ray's decision, handed to the
/// function as it came; kiln's spans are exported whenever export is on.
pub fn remote_parent(header: &str) -> Option<opentelemetry::Context> {
    let mut trace = None;
    let mut parent = None;
    for part in header.split(';') {
        match part.trim().split_once('=') {
            Some(("Root", root)) => {
                let mut pieces = root.split('-');
                let (version, time, random) = (pieces.next()?, pieces.next()?, pieces.next()?);
                if version != "1" || time.len() != 8 || random.len() != 24 {
                    return None;
                }
                trace = TraceId::from_hex(&format!("{time}{random}")).ok();
            }
            Some(("Parent", p)) if p.len() == 16 => parent = SpanId::from_hex(p).ok(),
            _ => {}
        }
    }
    let trace = trace.filter(|t| *t != TraceId::INVALID)?;
    let parent = parent.filter(|p| *p != SpanId::INVALID).unwrap_or_else(|| {
        let mut bytes = [0u8; 8];
        if aws_lc_rs::rand::fill(&mut bytes).is_err() {
            bytes = 1u64.to_be_bytes();
        }
        SpanId::from_bytes(bytes)
    });
    let context = SpanContext::new(
        trace,
        parent,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    Some(opentelemetry::Context::new().with_remote_span_context(context))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_xray_header_becomes_the_remote_parent() {
        let cx = remote_parent(
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
        )
        .unwrap();
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "5759e988bd862e3fe1be46a994272793"
        );
        assert_eq!(sc.span_id().to_string(), "53995c3f42cd8ad8");
        assert!(sc.is_sampled() && sc.is_remote());

        let cx = remote_parent("Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=0").unwrap();
        let sc = cx.span().span_context().clone();
        assert!(sc.is_sampled());
        assert_ne!(sc.span_id(), SpanId::INVALID);

        for bad in [
            "",
            "Root=2-5759e988-bd862e3fe1be46a994272793",
            "Root=1-zz-yy",
            "Parent=1",
        ] {
            assert!(remote_parent(bad).is_none(), "{bad}");
        }
    }
}
