//! The `wasm` sandbox: components run by wasmtime inside the kiln process,
//! through `kiln-wasm` (pooling allocator, memory limit, epoch deadlines,
//! capability-only WASI).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kiln_wasm::{
    CompileError, Environment, EnvironmentConfig, EnvironmentError, FunctionCode,
    InvocationContext, Runtime,
};

use super::{
    CodeSpec, EnvironmentSpec, ExecutionEnvironment, InitReport, InvocationReport,
    InvocationRequest, Outcome, PreparedCode, Sandbox, SandboxError, SandboxKind,
};
use crate::store::artifacts::safe_relative;

/// The in-process Wasm sandbox.
#[derive(Debug, Clone)]
pub struct WasmSandbox {
    runtime: Arc<Runtime>,
    /// kiln's API on loopback: the one place a guest's `wasi:http`
    /// requests may go.
    endpoint: Option<SocketAddr>,
}

impl WasmSandbox {
    /// A sandbox over the process's Wasm runtime whose guests may call
    /// kiln's API at `endpoint`.
    pub fn new(runtime: Arc<Runtime>, endpoint: Option<SocketAddr>) -> Self {
        Self { runtime, endpoint }
    }
}

/// For sandboxes that run Wasm inside a guest (jail, microVM): validates
/// and compiles `code` on the host as in-process Wasm does, and gives the
/// component's path as the guest sees it under `/var/task`.
pub(crate) async fn prepare_for_guest(
    runtime: &Arc<Runtime>,
    code: &CodeSpec,
) -> Result<String, SandboxError> {
    WasmSandbox::new(runtime.clone(), None)
        .prepare(code)
        .await?;
    let rel = safe_relative(&code.handler)
        .ok_or_else(|| SandboxError::InvalidCode("invalid Handler path".into()))?;
    Ok(std::path::Path::new("/var/task")
        .join(rel)
        .display()
        .to_string())
}

#[async_trait]
impl Sandbox for WasmSandbox {
    fn kind(&self) -> SandboxKind {
        SandboxKind::Wasm
    }

    fn kiln_endpoint(&self) -> Option<String> {
        self.endpoint.map(|a| format!("http://{a}"))
    }

    async fn prepare(&self, code: &CodeSpec) -> Result<PreparedCode, SandboxError> {
        if code.runtime != "wasip2" {
            return Err(SandboxError::InvalidCode(format!(
                "the wasm sandbox runs the wasip2 runtime, not {}",
                code.runtime
            )));
        }
        let rel = safe_relative(&code.handler).ok_or_else(|| {
            SandboxError::InvalidCode(format!(
                "Handler {:?} is not a path inside the zip file; for runtime wasip2 the Handler \
                 names the component, for example function.wasm",
                code.handler
            ))
        })?;
        let (task_dir, runtime, key, handler) = (
            code.task_dir.clone(),
            self.runtime.clone(),
            code.key.clone(),
            code.handler.clone(),
        );
        let compiled = tokio::task::spawn_blocking(move || {
            runtime.load(&key, || {
                // Links are followed only while they stay in the code.
                match crate::store::artifacts::inside(&task_dir, &rel) {
                    Some(path) if path.is_file() => std::fs::read(&path),
                    _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "missing")),
                }
            })
        })
        .await
        .map_err(|e| SandboxError::Internal(format!("compile task: {e}")))?;
        match compiled {
            Ok(code) => Ok(PreparedCode::new(SandboxKind::Wasm, code)),
            Err(CompileError::Source(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SandboxError::InvalidCode(format!(
                    "The zip file has no file at the Handler path {handler:?}: for runtime wasip2 \
                     the Handler names the component inside the zip (kiln build puts it at \
                     function.wasm)"
                )))
            }
            Err(
                e
                @ (CompileError::Cache { .. } | CompileError::Engine(_) | CompileError::Source(_)),
            ) => Err(SandboxError::Internal(e.to_string())),
            Err(e) => Err(SandboxError::InvalidCode(format!("{handler}: {e}"))),
        }
    }

    async fn create(
        &self,
        code: &PreparedCode,
        spec: EnvironmentSpec,
    ) -> Result<Box<dyn ExecutionEnvironment>, SandboxError> {
        let code: &FunctionCode = code
            .downcast(SandboxKind::Wasm)
            .ok_or_else(|| SandboxError::Internal("code prepared by another sandbox".to_owned()))?;
        let config = EnvironmentConfig {
            memory_limit_mb: spec.memory_mb,
            env: spec.env,
            task_dir: spec.task_dir,
            opt_dir: spec.opt_dir,
            tmp_dir: spec.tmp_dir,
            log_capacity: spec.log_capacity,
            kiln_endpoint: self.endpoint,
        };
        match Environment::create(&self.runtime, code, config).await {
            Ok(env) => Ok(Box::new(WasmEnvironment { env })),
            Err(EnvironmentError::Capacity(m)) => Err(SandboxError::Capacity(m)),
            Err(e) => Err(SandboxError::Internal(e.to_string())),
        }
    }
}

struct WasmEnvironment {
    env: Environment,
}

fn outcome(outcome: kiln_wasm::Outcome, request_id: Option<&str>) -> Outcome {
    match outcome {
        kiln_wasm::Outcome::Response(bytes) => Outcome::Response(bytes),
        kiln_wasm::Outcome::Error(e) => Outcome::FunctionError {
            body: super::error_document(&e.error_type, &e.message),
            error_type: e.error_type,
        },
        kiln_wasm::Outcome::Failed(f) => Outcome::Failed {
            error_type: f.error_type(),
            message: f.error_message(request_id),
        },
    }
}

#[async_trait]
impl ExecutionEnvironment for WasmEnvironment {
    async fn init(&mut self, timeout: Duration) -> InitReport {
        let report = self.env.init(timeout).await;
        InitReport {
            error: report.result.err().map(|o| outcome(o, None)),
            logs: report.logs,
            duration: report.duration,
        }
    }

    async fn invoke(&mut self, request: &InvocationRequest) -> InvocationReport {
        let ctx = InvocationContext {
            request_id: request.request_id.clone(),
            function_name: request.function_name.clone(),
            function_version: request.function_version.clone(),
            invoked_function_arn: request.invoked_function_arn.clone(),
            trace_id: request.trace_id.clone(),
            timeout: request.timeout,
            client_context: request.client_context.clone(),
        };
        let report = self.env.invoke(&request.payload, &ctx).await;
        InvocationReport {
            outcome: outcome(report.outcome, Some(&request.request_id)),
            logs: report.logs,
            duration: report.duration,
            max_memory_bytes: report.max_memory_bytes as u64,
        }
    }

    fn is_reusable(&self) -> bool {
        !self.env.is_poisoned()
    }
}
