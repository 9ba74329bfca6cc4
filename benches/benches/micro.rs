//! Micro benchmarks of the hot paths (criterion): a Wasm environment
//! created and called, a warm call, the agent protocol's encode and decode,
//! and SigV4 verification of an invoke request.
//!
//! `cargo bench -p kiln-bench --bench micro` (add `-- --quick` for a short
//! run; the test suite runs it so).

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use kiln_proto::{HostMessage, Invocation};
use kiln_wasm::{Environment, EnvironmentConfig, InvocationContext, Runtime, RuntimeConfig};

fn context() -> InvocationContext {
    InvocationContext {
        request_id: "11111111-2222-3333-4444-555555555555".into(),
        function_name: "hello".into(),
        function_version: "$LATEST".into(),
        invoked_function_arn: "arn:aws:lambda:us-east-1:000000000000:function:hello".into(),
        trace_id: "Root=1-00000000-000000000000000000000000".into(),
        timeout: Duration::from_secs(3),
        client_context: None,
    }
}

fn wasm(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let runtime = Runtime::new(RuntimeConfig::new(dir.path().join("cache"))).expect("wasmtime");
    let component = std::fs::read(kiln_test_support::wasm_function("hello")).expect("hello");
    let code = runtime.compile("hello", &component).expect("compiles");
    let task = dir.path().join("task");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&task).expect("task dir");
    std::fs::create_dir_all(&tmp).expect("tmp dir");
    let config = || EnvironmentConfig {
        memory_limit_mb: 128,
        env: Vec::new(),
        task_dir: task.clone(),
        opt_dir: None,
        tmp_dir: tmp.clone(),
        log_capacity: 64 * 1024,
        kiln_endpoint: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let event = br#"{"name":"bench"}"#;
    let ctx = context();

    c.bench_function("wasm-instantiate-init-call", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut env = Environment::create(&runtime, &code, config())
                    .await
                    .expect("an environment");
                env.init(Duration::from_secs(10)).await;
                env.invoke(event, &ctx).await
            })
        })
    });
    let mut warm = rt.block_on(async {
        let mut env = Environment::create(&runtime, &code, config())
            .await
            .expect("an environment");
        env.init(Duration::from_secs(10)).await;
        env
    });
    let first = rt.block_on(warm.invoke(event, &ctx)).outcome;
    assert!(
        matches!(first, kiln_wasm::Outcome::Response(_)),
        "{first:?}"
    );
    c.bench_function("wasm-warm-call", |b| {
        b.iter(|| rt.block_on(warm.invoke(event, &ctx)))
    });
}

fn protocol(c: &mut Criterion) {
    let message = HostMessage::Invoke(Box::new(Invocation {
        request_id: "11111111-2222-3333-4444-555555555555".into(),
        deadline_ms: 1_800_000_000_000,
        invoked_function_arn: "arn:aws:lambda:us-east-1:000000000000:function:hello".into(),
        trace_id: "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=0".into(),
        client_context: None,
        cognito_identity: None,
        payload: vec![b'x'; 1024],
    }));
    let frame = kiln_proto::encode(&message).expect("encodes");
    // decode takes the frame's body, after its 4-byte length.
    let body = &frame[4..];
    assert!(kiln_proto::decode::<HostMessage>(body).is_ok());
    c.bench_function("proto-encode-invoke-1k", |b| {
        b.iter(|| kiln_proto::encode(std::hint::black_box(&message)).expect("encodes"))
    });
    c.bench_function("proto-decode-invoke-1k", |b| {
        b.iter(|| kiln_proto::decode::<HostMessage>(std::hint::black_box(body)).expect("decodes"))
    });
}

fn sigv4(c: &mut Criterion) {
    use kiln::auth::sigv4::{self, Incoming, PresignKey, PresignTarget, VerifyConfig};
    let cfg = VerifyConfig::lambda("us-east-1");
    let body = vec![b'x'; 1024];
    let path = "/2015-03-31/functions/hello/invocations";
    let now = time::OffsetDateTime::now_utc();
    let query = sigv4::presign(
        PresignTarget {
            method: "POST",
            host: "127.0.0.1:9000",
            path,
            query: &[],
            body: &body,
        },
        PresignKey {
            access_key_id: "AKIAKILNBENCH000",
            secret: "kiln-bench-secret-kiln-bench-secret-0000",
            session_token: None,
        },
        &cfg,
        now,
        600,
    )
    .expect("presigns");
    let headers: [(&str, &[u8]); 1] = [("host", b"127.0.0.1:9000")];
    let req = Incoming {
        method: "POST",
        path,
        query: Some(&query),
        headers: &headers,
        body: &body,
    };
    c.bench_function("sigv4-verify-invoke-1k", |b| {
        b.iter(|| {
            let claim = sigv4::claim(&req, &cfg, now).expect("a claim");
            sigv4::verify(
                &req,
                &claim,
                "kiln-bench-secret-kiln-bench-secret-0000",
                &cfg,
            )
            .expect("verifies")
        })
    });
}

criterion_group!(benches, wasm, protocol, sigv4);
criterion_main!(benches);
