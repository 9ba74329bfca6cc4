//! The Wasm embedding driven directly, with real components built from the
//! workspace's function crates: what a function can and cannot do, and how
//! each kind of failure is reported.

use std::path::Path;
use std::time::Duration;

use kiln_wasm::{
    CompileError, Environment, EnvironmentConfig, EnvironmentError, Failure, FunctionCode,
    InvocationContext, Outcome, Runtime, RuntimeConfig,
};
use serde_json::{Value, json};

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    runtime: Runtime,
}

impl Fixture {
    fn new(max_environments: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let mut config = RuntimeConfig::new(root.join("cache"));
        config.max_environments = max_environments;
        let runtime = Runtime::new(config).unwrap();
        std::fs::create_dir_all(root.join("task")).unwrap();
        std::fs::write(root.join("task/data.txt"), "task data").unwrap();
        Self {
            _dir: dir,
            root,
            runtime,
        }
    }

    fn code(&self, package: &str) -> FunctionCode {
        let wasm = std::fs::read(kiln_test_support::wasm_function(package)).unwrap();
        self.runtime.compile(package, &wasm).unwrap()
    }

    fn config(&self, env_name: &str, env: &[(&str, &str)]) -> EnvironmentConfig {
        let tmp = self.root.join("envs").join(env_name);
        std::fs::create_dir_all(&tmp).unwrap();
        EnvironmentConfig {
            memory_limit_mb: 128,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            task_dir: self.root.join("task"),
            opt_dir: None,
            tmp_dir: tmp,
            log_capacity: 64 * 1024,
            kiln_endpoint: None,
        }
    }

    async fn environment(&self, package: &str, env_name: &str) -> Environment {
        let code = self.code(package);
        let mut env = Environment::create(&self.runtime, &code, self.config(env_name, &[]))
            .await
            .unwrap();
        assert!(env.init(Duration::from_secs(10)).await.result.is_ok());
        env
    }
}

fn ctx(timeout_ms: u64) -> InvocationContext {
    InvocationContext {
        request_id: "11111111-2222-3333-4444-555555555555".into(),
        function_name: "fixture".into(),
        function_version: "$LATEST".into(),
        invoked_function_arn: "arn:aws:lambda:us-east-1:000000000000:function:fixture".into(),
        trace_id: "Root=1-00000000-000000000000000000000000".into(),
        timeout: Duration::from_millis(timeout_ms),
        client_context: None,
    }
}

async fn call(env: &mut Environment, action: &str, arg: Value, timeout_ms: u64) -> Outcome {
    let event = serde_json::to_vec(&json!({"action": action, "arg": arg})).unwrap();
    env.invoke(&event, &ctx(timeout_ms)).await.outcome
}

fn response(outcome: Outcome) -> Value {
    match outcome {
        Outcome::Response(bytes) => serde_json::from_slice(&bytes).unwrap(),
        other => panic!("expected a response, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_answers_with_a_greeting_and_its_context() {
    let f = Fixture::new(4);
    let mut env = f.environment("hello", "e1").await;
    let out = env.invoke(br#"{"name":"Ada"}"#, &ctx(3000)).await;
    let body = response(out.outcome);
    assert_eq!(body["greeting"], "Hello, Ada!");
    assert_eq!(body["request_id"], "11111111-2222-3333-4444-555555555555");
    assert_eq!(body["version"], "$LATEST");
    let logs = String::from_utf8(out.logs).unwrap();
    assert!(logs.contains("\tINFO\tgreeting Ada"), "{logs}");
    assert!(out.max_memory_bytes > 0);
}

#[tokio::test]
async fn the_context_reaches_the_guest() {
    let f = Fixture::new(4);
    let mut env = f.environment("misbehave", "e1").await;
    let body = response(call(&mut env, "context", Value::Null, 3000).await);
    assert_eq!(body["function_name"], "fixture");
    assert_eq!(body["memory_limit_mb"], 128);
    assert_eq!(body["trace_id"], "Root=1-00000000-000000000000000000000000");
    let remaining = body["remaining_ms"].as_u64().unwrap();
    assert!(remaining > 0 && remaining <= 3000, "{remaining}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let deadline = body["deadline_ms"].as_u64().unwrap();
    assert!(
        deadline > now_ms && deadline <= now_ms + 3000,
        "{deadline} vs {now_ms}"
    );
}

#[tokio::test]
async fn compiled_components_are_cached_on_disk() {
    let f = Fixture::new(4);
    let wasm = std::fs::read(kiln_test_support::wasm_function("hello")).unwrap();
    f.runtime.compile("hello-key", &wasm).unwrap();
    let cached: Vec<_> = std::fs::read_dir(f.root.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        cached
            .iter()
            .any(|n| n.starts_with("hello-key-") && n.ends_with(".cwasm")),
        "{cached:?}"
    );
    // A second runtime on the same cache deserializes instead of compiling.
    let again = Runtime::new(RuntimeConfig::new(f.root.join("cache"))).unwrap();
    let code = again
        .load("hello-key", || panic!("the cache should have been used"))
        .unwrap();
    assert!(code.has_init());
    // A corrupt cache entry is discarded and the code compiled again.
    for name in &cached {
        std::fs::write(f.root.join("cache").join(name), b"garbage").unwrap();
    }
    let code = again.load("hello-key", || Ok(wasm.clone())).unwrap();
    assert!(code.has_init());
}

#[tokio::test]
async fn a_compiled_file_not_written_under_the_key_is_compiled_again_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let keyed = |key: [u8; 32]| {
        let mut c = RuntimeConfig::new(dir.path().join("cache"));
        c.max_environments = 2;
        c.artifact_key = Some(key);
        c.working_dir = Some(dir.path().join("work"));
        Runtime::new(c).unwrap()
    };
    let runtime = keyed([7; 32]);
    let hello = std::fs::read(kiln_test_support::wasm_function("hello")).unwrap();
    let misbehave = std::fs::read(kiln_test_support::wasm_function("misbehave")).unwrap();
    runtime.compile("code-a", &hello).unwrap();
    // Someone who can write the directory but has no key puts another
    // function's machine code where code-a's is (here: compiled by a
    // runtime with a different key, so its format is right).
    let forger = keyed([9; 32]);
    forger.compile("code-a", &misbehave).unwrap();
    // The runtime with the right key refuses it and compiles code-a's own
    // source again: it runs hello, not misbehave.
    let code = runtime.load("code-a", || Ok(hello.clone())).unwrap();
    let task = dir.path().join("task");
    std::fs::create_dir_all(&task).unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut env = Environment::create(
        &runtime,
        &code,
        EnvironmentConfig {
            memory_limit_mb: 128,
            env: Vec::new(),
            task_dir: task,
            opt_dir: None,
            tmp_dir: tmp,
            log_capacity: 4096,
            kiln_endpoint: None,
        },
    )
    .await
    .unwrap();
    assert!(env.init(Duration::from_secs(10)).await.result.is_ok());
    let answer = response(call(&mut env, "echo", json!("x"), 3000).await);
    assert!(answer.get("greeting").is_some(), "{answer}");
    // Its file is authentic again; the jail's working copy is the bare
    // compiled form of it, and a copy of a forged file is never made.
    let copy = runtime.working_copy("code-a").unwrap();
    assert!(copy.starts_with(dir.path().join("work")));
    forger.compile("code-b", &misbehave).unwrap();
    assert!(runtime.working_copy("code-b").is_none());
}

#[test]
fn non_components_are_refused_with_what_to_fix() {
    let f = Fixture::new(1);
    let core_module = b"\0asm\x01\0\0\0";
    match f.runtime.compile("core", core_module) {
        Err(e @ CompileError::CoreModule) => assert!(e.to_string().contains("wasm32-wasip2")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        f.runtime.compile("zip", b"PK\x03\x04 not wasm"),
        Err(CompileError::NotWasm)
    ));
    assert!(matches!(
        f.runtime.compile("bad-key/..", b"\0asm\x0d\0\x01\0"),
        Err(CompileError::Cache { .. })
    ));
    // An empty component is valid Wasm but not a function.
    match f.runtime.compile("empty", b"\0asm\x0d\0\x01\0") {
        Err(e @ CompileError::MissingHandler(_)) => {
            assert!(e.to_string().contains("kiln:function/handler@0.1.0"))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn handler_errors_keep_the_environment() {
    let f = Fixture::new(4);
    let mut env = f.environment("misbehave", "e1").await;
    match call(&mut env, "error", Value::Null, 3000).await {
        Outcome::Error(e) => {
            assert_eq!(e.error_type, "Custom");
            assert_eq!(e.message, "requested failure");
        }
        other => panic!("{other:?}"),
    }
    assert!(!env.is_poisoned());
    assert_eq!(
        response(call(&mut env, "echo", json!(7), 3000).await),
        json!(7)
    );
}

#[tokio::test]
async fn a_panic_is_reported_with_its_message_and_poisons_the_environment() {
    let f = Fixture::new(4);
    let mut env = f.environment("misbehave", "e1").await;
    match call(&mut env, "panic", json!("now"), 3000).await {
        Outcome::Failed(failure @ Failure::Trap { .. }) => {
            assert_eq!(failure.error_type(), "Panic");
            assert!(
                failure.error_message(Some("r")).contains("boom: \"now\""),
                "{failure:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(env.is_poisoned());
    assert!(matches!(
        call(&mut env, "echo", json!(1), 3000).await,
        Outcome::Failed(_)
    ));
}

#[tokio::test]
async fn a_spinning_guest_is_stopped_at_its_deadline() {
    let f = Fixture::new(4);
    let mut env = f.environment("misbehave", "e1").await;
    let start = std::time::Instant::now();
    let out = call(&mut env, "spin", Value::Null, 300).await;
    let took = start.elapsed();
    assert_eq!(
        out,
        Outcome::Failed(Failure::Timeout(Duration::from_millis(300)))
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(
        Failure::Timeout(Duration::from_millis(300)).error_message(Some("r")),
        "RequestId: r Error: Task timed out after 0.30 seconds"
    );
    assert!(env.is_poisoned());
}

#[tokio::test]
async fn a_guest_blocked_in_the_host_is_stopped_at_its_deadline() {
    let f = Fixture::new(4);
    let mut env = f.environment("misbehave", "e1").await;
    let start = std::time::Instant::now();
    let out = call(&mut env, "sleep", json!(10_000), 300).await;
    assert!(
        matches!(out, Outcome::Failed(Failure::Timeout(_))),
        "{out:?}"
    );
    assert!(start.elapsed() < Duration::from_millis(1500));
}

#[tokio::test]
async fn memory_growth_past_the_limit_is_out_of_memory() {
    let f = Fixture::new(4);
    let mut env = f.environment("misbehave", "e1").await;
    let out = env.invoke(br#"{"action":"grow"}"#, &ctx(10_000)).await;
    assert_eq!(
        out.outcome,
        Outcome::Failed(Failure::OutOfMemory { limit_mb: 128 })
    );
    assert!(out.max_memory_bytes <= 128 << 20);
    assert!(env.is_poisoned());
}

#[tokio::test]
async fn exit_is_reported_with_its_status() {
    let f = Fixture::new(4);
    let mut env = f.environment("misbehave", "e1").await;
    // WASI 0.2's `exit` carries success or failure only: any non-zero status
    // arrives as 1.
    assert_eq!(
        call(&mut env, "exit", json!(3), 3000).await,
        Outcome::Failed(Failure::Exit(1))
    );
    assert!(env.is_poisoned());
}

#[tokio::test]
async fn output_floods_are_bounded() {
    let f = Fixture::new(4);
    let mut env = f.environment("misbehave", "e1").await;
    // 2 MiB of stdout against a 64 KiB log budget.
    let out = env
        .invoke(br#"{"action":"print","arg":2048}"#, &ctx(10_000))
        .await;
    assert_eq!(response(out.outcome), json!(2048));
    assert!(out.logs.len() < 64 * 1024 + 200, "{}", out.logs.len());
    let text = String::from_utf8_lossy(&out.logs);
    assert!(
        text.contains("bytes of log output were dropped"),
        "{}",
        &text[text.len() - 200..]
    );
}

#[tokio::test]
async fn the_file_system_is_task_ro_tmp_rw_and_nothing_else() {
    let f = Fixture::new(4);
    let mut env = f.environment("misbehave", "e1").await;
    let host_file = response(call(&mut env, "read", json!("/etc/passwd"), 3000).await);
    assert!(host_file.get("err").is_some(), "{host_file}");
    let escape = response(call(&mut env, "read", json!("/var/task/../../etc/passwd"), 3000).await);
    assert!(escape.get("err").is_some(), "{escape}");
    let task = response(call(&mut env, "read", json!("/var/task/data.txt"), 3000).await);
    assert_eq!(task["ok"], "task data");
    let write_task = response(call(&mut env, "write", json!("/var/task/new"), 3000).await);
    assert!(write_task.get("err").is_some(), "{write_task}");
    assert!(!Path::new(&f.root.join("task/new")).exists());
    let write_tmp = response(call(&mut env, "write", json!("/tmp/new"), 3000).await);
    assert_eq!(write_tmp["ok"], true);
    assert!(f.root.join("envs/e1/new").exists());
}

#[tokio::test]
async fn tmp_and_memory_persist_while_warm_and_not_across_environments() {
    let f = Fixture::new(4);
    let mut first = f.environment("misbehave", "e1").await;
    for expected in 1..=3 {
        assert_eq!(
            response(call(&mut first, "tmp_count", Value::Null, 3000).await),
            json!(expected)
        );
    }
    let mut second = f.environment("misbehave", "e2").await;
    assert_eq!(
        response(call(&mut second, "tmp_count", Value::Null, 3000).await),
        json!(1)
    );
    assert_eq!(first.invocations(), 3);
}

#[tokio::test]
async fn environment_variables_are_the_configured_ones() {
    let f = Fixture::new(4);
    let code = f.code("misbehave");
    let mut env = Environment::create(
        &f.runtime,
        &code,
        f.config("e1", &[("GREETING", "hi"), ("AWS_REGION", "us-east-1")]),
    )
    .await
    .unwrap();
    let vars = response(call(&mut env, "env", Value::Null, 3000).await);
    assert_eq!(vars, json!({"GREETING": "hi", "AWS_REGION": "us-east-1"}));
}

#[tokio::test]
async fn init_errors_and_panics_fail_the_environment() {
    let f = Fixture::new(4);
    let code = f.code("misbehave");
    let mut env = Environment::create(
        &f.runtime,
        &code,
        f.config("e1", &[("INIT_ACTION", "fail")]),
    )
    .await
    .unwrap();
    let init = env.init(Duration::from_secs(10)).await;
    match init.result {
        Err(Outcome::Error(e)) => assert_eq!(e.error_type, "InitFailed"),
        other => panic!("{other:?}"),
    }
    assert!(env.is_poisoned());

    let mut env = Environment::create(
        &f.runtime,
        &code,
        f.config("e2", &[("INIT_ACTION", "spin")]),
    )
    .await
    .unwrap();
    let init = env.init(Duration::from_millis(200)).await;
    assert!(matches!(
        init.result,
        Err(Outcome::Failed(Failure::Timeout(_)))
    ));
}

#[tokio::test]
async fn the_pool_bounds_the_number_of_environments() {
    let f = Fixture::new(2);
    let code = f.code("hello");
    let a = Environment::create(&f.runtime, &code, f.config("a", &[]))
        .await
        .unwrap();
    let _b = Environment::create(&f.runtime, &code, f.config("b", &[]))
        .await
        .unwrap();
    let third = Environment::create(&f.runtime, &code, f.config("c", &[])).await;
    assert!(
        matches!(third, Err(EnvironmentError::Capacity(_))),
        "{third:?}"
    );
    drop(a);
    Environment::create(&f.runtime, &code, f.config("c", &[]))
        .await
        .expect("a freed slot is reusable");
}
