//! Wasm functions inside the environment: the same `kiln-wasm` embedding
//! the host uses in-process, here with one environment per agent.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_proto::{Config, Invocation, Outcome};
use kiln_wasm::{Environment, EnvironmentConfig, InvocationContext, Runtime, RuntimeConfig};

/// A loaded component and its environment.
pub struct WasmFunction {
    env: Environment,
    _runtime: Runtime,
}

/// Loads the component (its compiled form when the host provided one) and
/// instantiates it. Errors are init errors: (type, message).
pub async fn load(
    config: &Config,
    component: &str,
    precompiled: Option<&str>,
    kiln_endpoint: Option<std::net::SocketAddr>,
) -> Result<WasmFunction, (String, String)> {
    let fail = |t: &str, m: String| (t.to_owned(), m);
    // The agent never writes compiled code; /var/runtime exists (read-only).
    let mut runtime_config = RuntimeConfig::new("/var/runtime");
    runtime_config.max_environments = 1;
    let runtime =
        Runtime::new(runtime_config).map_err(|e| fail("Runtime.WasmEngine", e.to_string()))?;
    let component = PathBuf::from(component);
    let code = runtime
        .load_file(precompiled.map(std::path::Path::new), &component)
        .map_err(|e| fail("Runtime.InvalidComponent", e.to_string()))?;
    let env = Environment::create(
        &runtime,
        &code,
        EnvironmentConfig {
            memory_limit_mb: config.memory_mb,
            env: config.env.clone(),
            task_dir: "/var/task".into(),
            opt_dir: Some("/opt".into()),
            tmp_dir: "/tmp".into(),
            log_capacity: config.log_capacity as usize,
            kiln_endpoint,
        },
    )
    .await
    .map_err(|e| fail("Runtime.WasmInstantiate", e.to_string()))?;
    Ok(WasmFunction {
        env,
        _runtime: runtime,
    })
}

fn failure(outcome: kiln_wasm::Outcome, request_id: Option<&str>) -> (String, String, bool) {
    match outcome {
        kiln_wasm::Outcome::Error(e) => (e.error_type, e.message, false),
        kiln_wasm::Outcome::Failed(f) => (f.error_type(), f.error_message(request_id), true),
        kiln_wasm::Outcome::Response(_) => unreachable!("not a failure"),
    }
}

impl WasmFunction {
    /// Runs `lifecycle.init`: `Ok(logs)` or `Err((type, message, logs))`.
    pub async fn init(&mut self) -> Result<Vec<u8>, (String, String, Vec<u8>)> {
        let report = self.env.init(Duration::from_secs(10)).await;
        match report.result {
            Ok(()) => Ok(report.logs),
            Err(o) => {
                let (t, m, _) = failure(o, None);
                Err((t, m, report.logs))
            }
        }
    }

    /// Runs one invocation.
    pub async fn invoke(&mut self, config: &Config, inv: &Invocation) -> (Outcome, Vec<u8>, u64) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let ctx = InvocationContext {
            request_id: inv.request_id.clone(),
            function_name: config.function_name.clone(),
            function_version: config.function_version.clone(),
            invoked_function_arn: inv.invoked_function_arn.clone(),
            trace_id: inv.trace_id.clone(),
            timeout: Duration::from_millis(inv.deadline_ms.saturating_sub(now_ms).max(1)),
            client_context: inv.client_context.clone(),
        };
        let report = self.env.invoke(&inv.payload, &ctx).await;
        let outcome = match report.outcome {
            kiln_wasm::Outcome::Response(bytes) if bytes.len() > kiln_proto::MAX_RESPONSE => {
                kiln_proto::response_too_large()
            }
            kiln_wasm::Outcome::Response(bytes) => Outcome::Response(bytes),
            other => {
                let (error_type, message, fatal) = failure(other, Some(&inv.request_id));
                if fatal {
                    Outcome::Failed {
                        error_type,
                        message,
                    }
                } else {
                    Outcome::FunctionError {
                        body: serde_json::to_vec(&serde_json::json!({
                            "errorType": error_type,
                            "errorMessage": message,
                        }))
                        .unwrap_or_default(),
                        error_type,
                    }
                }
            }
        };
        (outcome, report.logs, report.max_memory_bytes as u64)
    }
}
