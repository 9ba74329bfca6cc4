//! Write kiln functions in Rust.
//!
//! A function is one Rust function from an event to a response, both serde
//! types carried as JSON, marked with [`handler`]:
//!
//! ```no_run
//! use kiln_sdk::{Context, Error};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Request {
//!     name: Option<String>,
//! }
//!
//! #[derive(Serialize)]
//! struct Response {
//!     greeting: String,
//!     request_id: String,
//! }
//!
//! #[kiln_sdk::handler]
//! fn hello(event: Request, ctx: &Context) -> Result<Response, Error> {
//!     let name = event.name.unwrap_or_else(|| "world".to_owned());
//!     kiln_sdk::log::info(&format!("greeting {name}"));
//!     Ok(Response {
//!         greeting: format!("Hello, {name}!"),
//!         request_id: ctx.request_id.clone(),
//!     })
//! }
//! ```
//!
//! with a `Cargo.toml` that makes a C-style dynamic library:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! kiln-sdk = "0.1"
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! `cargo build --release --target wasm32-wasip2` then writes a WebAssembly
//! component (`target/wasm32-wasip2/release/<crate>.wasm`) that implements
//! kiln's `function` world; `kiln build` does the same and zips it for
//! deployment. No other tool is needed.
//!
//! # The same function, native
//!
//! Built for any other target, the same handler becomes a Lambda custom
//! runtime: a `bootstrap` that speaks the Runtime API, for the `provided.al2023`
//! runtime (kiln's jail or microVM, or AWS Lambda itself). Add `"rlib"` to the
//! crate types (`crate-type = ["cdylib", "rlib"]`) and run
//! `kiln build --native PATH`: it builds a static `x86_64-unknown-linux-musl`
//! bootstrap around your handler and zips it. The author chooses the sandbox
//! without rewriting the function.
//!
//! # What a function sees
//! - The event as your `Deserialize` type (a payload that does not fit is
//!   reported as a `Runtime.UnmarshalError` without calling your code).
//! - A [`Context`] with the request id, deadline, function name, version,
//!   invoked ARN, memory limit, trace id and the caller's client context.
//! - Its environment variables through [`std::env`], `/tmp` read-write (kept
//!   between warm invocations of one environment), `/var/task` (its own
//!   code) and `/opt` (its layers) read-only, and no network.
//! - stdout and stderr, and the lines written with [`log`], become the
//!   invocation's log.
//!
//! # Errors
//! Return any `std::error::Error` (its type name becomes `errorType`) or an
//! [`Error::new`] with a type of your choosing. A panic is reported as an
//! `errorType` of `Panic` with the panic message, and the environment it
//! happened in is discarded.
//!
//! # Init
//! `#[kiln_sdk::handler(init = setup)]` runs `fn setup() -> Result<(), Error>`
//! once per execution environment before its first invocation.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use kiln_sdk_macros::handler;

// Lets the generated bindings name this crate by the path function crates use.
extern crate self as kiln_sdk;

/// Bindings of kiln's WIT world, generated once here so that function crates
/// need nothing but this crate.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "kiln:function/function",
        generate_all,
        pub_export_macro: true,
        export_macro_name: "__export_kiln_function",
        default_bindings_module: "::kiln_sdk::bindings",
        runtime_path: "::kiln_sdk::__private::wit_bindgen::rt",
    });
}

use bindings::kiln::function::runtime;
use bindings::kiln::function::types::{Context as WitContext, FunctionError};

/// What a function knows about the invocation it is serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The invocation's id (Lambda's `RequestId`).
    pub request_id: String,
    /// Deadline in milliseconds since the Unix epoch.
    pub deadline_ms: u64,
    /// The function's name.
    pub function_name: String,
    /// The version that runs: `$LATEST` or a number.
    pub function_version: String,
    /// The ARN the caller invoked, with its qualifier if one was given.
    pub invoked_function_arn: String,
    /// The function's memory limit in MiB.
    pub memory_limit_mb: u32,
    /// The trace id of the invocation (`X-Amzn-Trace-Id` format).
    pub trace_id: String,
    /// The client context the caller passed (`ClientContext` of Invoke,
    /// decoded: a JSON document such as `{"custom": {...}}`), if any.
    pub client_context: Option<String>,
}

impl Context {
    /// The deadline as a point in time.
    pub fn deadline(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.deadline_ms)
    }

    /// Time left before the deadline, as the host counts it.
    pub fn remaining_time(&self) -> Duration {
        #[cfg(target_family = "wasm")]
        {
            Duration::from_millis(runtime::remaining_time_ms())
        }
        #[cfg(not(target_family = "wasm"))]
        {
            self.deadline()
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default()
        }
    }
}

impl From<WitContext> for Context {
    fn from(c: WitContext) -> Self {
        Self {
            request_id: c.request_id,
            deadline_ms: c.deadline_ms,
            function_name: c.function_name,
            function_version: c.function_version,
            invoked_function_arn: c.invoked_function_arn,
            memory_limit_mb: c.memory_limit_mb,
            trace_id: c.trace_id,
            client_context: current_client_context(),
        }
    }
}

/// The current invocation's client context, as the host holds it.
fn current_client_context() -> Option<String> {
    #[cfg(target_family = "wasm")]
    {
        runtime::client_context()
    }
    #[cfg(not(target_family = "wasm"))]
    {
        None
    }
}

/// An error a function returns instead of a response: the caller receives
/// `{"errorType": ..., "errorMessage": ...}` with `X-Amz-Function-Error`.
///
/// Any `std::error::Error` converts into it with `?`, taking its type name as
/// the error type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    error_type: String,
    message: String,
}

impl Error {
    /// An error with an explicit type (for example `"InvalidInput"`).
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error_type: error_type.into(),
            message: message.into(),
        }
    }

    /// The `errorType` the caller will see.
    pub fn error_type(&self) -> &str {
        &self.error_type
    }

    /// The `errorMessage` the caller will see.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

// `Error` deliberately does not implement `std::error::Error`, so that this
// blanket conversion (the one `?` uses) does not overlap `From<T> for T`.
impl<E: std::error::Error> From<E> for Error {
    fn from(e: E) -> Self {
        Self::new(short_type_name::<E>(), e.to_string())
    }
}

fn short_type_name<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>();
    // Strip the module path of the outermost type only: `a::B<c::D>` -> `B<c::D>`.
    let head_end = full.find('<').unwrap_or(full.len());
    let start = full[..head_end].rfind("::").map_or(0, |i| i + 2);
    full[start..].to_owned()
}

impl From<Error> for FunctionError {
    fn from(e: Error) -> Self {
        FunctionError {
            error_type: e.error_type,
            message: e.message,
        }
    }
}

/// Structured logging into the invocation's log.
///
/// `println!` and `eprintln!` reach the same log; these add a level and
/// key/value fields that kiln keeps apart from the message.
pub mod log {
    use super::runtime::Level;

    #[cfg(target_family = "wasm")]
    fn write(level: Level, message: &str, fields: &[(&str, &str)]) {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        super::runtime::log(level, message, &fields);
    }

    /// Natively there is no host call: the line goes to stdout, which the
    /// runtime's log captures, in the same layout kiln writes.
    #[cfg(not(target_family = "wasm"))]
    fn write(level: Level, message: &str, fields: &[(&str, &str)]) {
        let level = match level {
            Level::Trace => "TRACE",
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        };
        // Escaped as kiln's Wasm runtime escapes them, so that a line is
        // one line and its tabs separate only its columns.
        let escape = |s: &str| {
            s.replace('\n', "\\n")
                .replace('\r', "\\r")
                .replace('\t', "\\t")
        };
        let mut line = format!(
            "{}\t{}\t{level}\t{}",
            crate::native::timestamp(),
            crate::native::current_request_id().unwrap_or_else(|| "-".into()),
            escape(message)
        );
        for (k, v) in fields {
            line.push_str(&format!("\t{}={}", escape(k), escape(v)));
        }
        println!("{line}");
    }

    /// Logs a line at `debug`.
    pub fn debug(message: &str) {
        write(Level::Debug, message, &[]);
    }

    /// Logs a line at `info`.
    pub fn info(message: &str) {
        write(Level::Info, message, &[]);
    }

    /// Logs a line at `warn`.
    pub fn warn(message: &str) {
        write(Level::Warn, message, &[]);
    }

    /// Logs a line at `error`.
    pub fn error(message: &str) {
        write(Level::Error, message, &[]);
    }

    /// Logs a line at `info` with key/value fields.
    pub fn info_with(message: &str, fields: &[(&str, &str)]) {
        write(Level::Info, message, fields);
    }
}

mod clock;
pub mod lambda;
#[cfg(not(target_family = "wasm"))]
mod native;

/// What the `#[handler]` macro expands to calls; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;

    pub use crate::bindings::__export_kiln_function as export;
    pub use crate::bindings::exports::kiln::function::handler::Guest as HandlerGuest;
    pub use crate::bindings::exports::kiln::function::lifecycle::Guest as LifecycleGuest;
    pub use crate::bindings::kiln::function::types::{Context as WitContext, FunctionError};

    use super::{Context, Error};
    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use std::sync::Once;

    static PANIC_HOOK: Once = Once::new();

    /// Routes panics to the host before the trap that follows them, so the
    /// caller sees the panic message rather than only "unreachable".
    fn install_panic_hook() {
        PANIC_HOOK.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                let message = info.to_string();
                eprintln!("{message}");
                crate::runtime::report_fatal(&FunctionError {
                    error_type: "Panic".to_owned(),
                    message,
                });
            }));
        });
    }

    /// Decodes the event, runs the author's handler, encodes the response.
    pub fn call<E, R, Er>(
        handler: fn(E, &Context) -> Result<R, Er>,
        event: &[u8],
        context: &Context,
    ) -> Result<Vec<u8>, Error>
    where
        E: DeserializeOwned,
        R: Serialize,
        Er: Into<Error>,
    {
        let event: E = serde_json::from_slice(event).map_err(|e| {
            Error::new(
                "Runtime.UnmarshalError",
                format!(
                    "the event is not a valid {}: {e}",
                    super::short_type_name::<E>()
                ),
            )
        })?;
        let response = handler(event, context).map_err(Into::into)?;
        serde_json::to_vec(&response).map_err(|e| {
            Error::new(
                "Runtime.MarshalError",
                format!("the response could not be encoded as JSON: {e}"),
            )
        })
    }

    /// The Wasm export: [`call`] with WIT types.
    pub fn dispatch<E, R, Er>(
        handler: fn(E, &Context) -> Result<R, Er>,
        event: Vec<u8>,
        context: WitContext,
    ) -> Result<Vec<u8>, FunctionError>
    where
        E: DeserializeOwned,
        R: Serialize,
        Er: Into<Error>,
    {
        install_panic_hook();
        call(handler, &event, &Context::from(context)).map_err(FunctionError::from)
    }

    /// The native entry point: runs the handler as a custom runtime.
    #[cfg(not(target_family = "wasm"))]
    pub fn run_native<E, R, Er, Ie>(
        handler: fn(E, &Context) -> Result<R, Er>,
        init: Option<fn() -> Result<(), Ie>>,
    ) -> !
    where
        E: DeserializeOwned,
        R: Serialize,
        Er: Into<Error>,
        Ie: Into<Error>,
    {
        crate::native::run(handler, init)
    }

    /// Runs the author's init hook, if any.
    pub fn init<Er: Into<Error>>(
        init: Option<fn() -> Result<(), Er>>,
    ) -> Result<(), FunctionError> {
        install_panic_hook();
        match init {
            Some(f) => f().map_err(|e| FunctionError::from(e.into())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct MyFailure;
    impl fmt::Display for MyFailure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("it broke")
        }
    }
    impl std::error::Error for MyFailure {}

    #[test]
    fn std_errors_convert_with_their_short_type_name() {
        let e: Error = MyFailure.into();
        assert_eq!(e.error_type(), "MyFailure");
        assert_eq!(e.message(), "it broke");
        let e: Error = "x".parse::<u32>().unwrap_err().into();
        assert_eq!(e.error_type(), "ParseIntError");
    }

    #[test]
    fn generic_type_names_keep_their_parameters() {
        assert_eq!(
            short_type_name::<Vec<String>>(),
            "Vec<alloc::string::String>"
        );
        assert_eq!(short_type_name::<u8>(), "u8");
    }

    #[test]
    fn deadline_is_milliseconds_since_the_epoch() {
        let ctx = Context {
            request_id: "r".into(),
            deadline_ms: 1_500,
            function_name: "f".into(),
            function_version: "$LATEST".into(),
            invoked_function_arn: "arn".into(),
            memory_limit_mb: 128,
            trace_id: String::new(),
            client_context: None,
        };
        assert_eq!(ctx.deadline(), UNIX_EPOCH + Duration::from_millis(1_500));
    }
}
