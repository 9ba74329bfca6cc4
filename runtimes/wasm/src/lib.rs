//! The wasmtime embedding of kiln's `function` world (`wit/function.wit`).
//!
//! This crate is the one place that generates host bindings from `wit/`; the
//! host's in-process `wasm` sandbox and the environment agent both run Wasm
//! functions through it, so the Wasm path is written once.
//!
//! Lifecycle, after wasmtime's fast-instantiation pattern:
//! 1. [`Runtime`]: one per process. Owns the `Engine` (pooling allocator,
//!    epoch interruption), the `Linker` with WASI 0.2 and kiln's `runtime`
//!    interface, the epoch ticker thread and the on-disk compilation cache.
//! 2. [`Runtime::load`] turns a component's bytes into a [`FunctionCode`]:
//!    compiled once per code SHA-256 and engine configuration, cached on
//!    disk, loaded with `Component::deserialize` afterwards, and
//!    pre-instantiated (`InstancePre`) so that imports are resolved once.
//! 3. [`Environment::create`] makes one `Store` + instance per execution
//!    environment: its own memory limit, WASI context (environment
//!    variables, `/var/task`, `/opt`, `/tmp`) and captured stdout/stderr.
//! 4. [`Environment::init`] runs `lifecycle.init` once; [`Environment::invoke`]
//!    runs `handler.handle` once per invocation, one at a time, under the
//!    invocation's deadline.
//!
//! Threat model: the guest is hostile. It reaches the host only through the
//! imports linked here. Its linear memory is capped by the store's limiter,
//! its CPU time by epoch-based deadlines, its output by bounded log buffers,
//! and its files by WASI preopens (no network is granted). A trap, timeout or
//! out-of-memory poisons the environment: callers must drop it.

mod engine;
mod environment;
mod host;
mod logs;
mod outgoing;

pub use engine::{CompileError, FunctionCode, Runtime, RuntimeConfig, check_component_header};
pub use environment::{
    Environment, EnvironmentConfig, EnvironmentError, Failure, InitOutcome, InvocationContext,
    InvokeOutcome, Outcome,
};
pub use host::FunctionError;
pub use logs::{CappedLog, LogLevel};

/// Bindings generated from `wit/function.wit` for the host side.
mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "kiln:function/function-core",
        with: {
            "wasi": wasmtime_wasi::p2::bindings,
        },
        imports: { default: trappable },
        exports: { default: async },
        additional_derives: [PartialEq, Eq],
    });
}
