//! The process-wide engine: configuration, linker, epoch ticker, and the
//! compile-once cache of function components.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{Component, ComponentExportIndex, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::bindings::FunctionCorePre;
use crate::bindings::kiln::function::runtime as wit_runtime;
use crate::host::HostState;

/// Where the exported init hook lives in a component.
const LIFECYCLE_EXPORT: &str = "kiln:function/lifecycle@0.1.0";
/// The handler interface every function must export.
const HANDLER_EXPORT: &str = "kiln:function/handler@0.1.0";

/// Settings of the process-wide engine.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// How many execution environments (component instances) may exist at
    /// once; the pooling allocator reserves slots for this many.
    pub max_environments: u32,
    /// Directory for compiled components (`*.cwasm`).
    pub cache_dir: PathBuf,
    /// Epoch tick: the granularity of deadlines and of cooperative yields of
    /// running guests back to the async executor.
    pub epoch_tick: Duration,
    /// Authenticates compiled files: each is written with an HMAC-SHA256
    /// under this key and loaded only when it verifies, so that whoever can
    /// write the cache directory cannot make this process run machine code
    /// of their own. `None` trusts the directory (an agent's, read-only).
    pub artifact_key: Option<[u8; 32]>,
    /// Where verified copies of compiled files are kept for environments
    /// that load them elsewhere (jails): a directory that vanishes with the
    /// host, such as a tmpfs.
    pub working_dir: Option<PathBuf>,
}

impl RuntimeConfig {
    /// Defaults for a host: 1000 environments, a 1 ms tick.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            max_environments: 1000,
            cache_dir: cache_dir.into(),
            epoch_tick: Duration::from_millis(1),
            artifact_key: None,
            working_dir: None,
        }
    }
}

/// Why code could not become a runnable function. Each message says what to
/// change in the uploaded artifact.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The bytes do not start with the WebAssembly magic number.
    #[error("the file is not WebAssembly (it does not start with \\0asm)")]
    NotWasm,
    /// A core module where a component is needed.
    #[error(
        "the file is a core WebAssembly module, not a component: build it with \
         `cargo build --target wasm32-wasip2` (or `kiln build`), which produces a component"
    )]
    CoreModule,
    /// wasmtime refused the component.
    #[error("the component is not valid: {0}")]
    Invalid(String),
    /// The component imports something kiln does not provide.
    #[error("the component imports something kiln does not provide: {0}")]
    Link(String),
    /// The component does not export the handler.
    #[error(
        "the component does not export `{HANDLER_EXPORT}` with \
         `handle: func(event: list<u8>, context: context) -> result<list<u8>, function-error>`: {0}"
    )]
    MissingHandler(String),
    /// The compilation cache could not be read or written.
    #[error("compilation cache at {path}: {source}")]
    Cache {
        /// The cache file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The component's bytes could not be read.
    #[error("reading the component: {0}")]
    Source(io::Error),
    /// The pooling allocator could not be set up.
    #[error("setting up the Wasm engine: {0}")]
    Engine(String),
}

/// The Wasm runtime of one process.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: PathBuf,
    engine_hash: u64,
    config: RuntimeConfig,
    _ticker: Ticker,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cache_dir", &self.cache_dir)
            .field("engine_hash", &format_args!("{:016x}", self.engine_hash))
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Creates the engine, the linker and the epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Self, CompileError> {
        let n = config.max_environments.max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            // wit-component adds shim and fixup core instances next to the
            // main module; leave room for a few per component.
            .max_core_instances_per_component(16)
            .total_core_instances(n.saturating_mul(4))
            .max_memories_per_component(4)
            .total_memories(n.saturating_mul(2))
            .max_tables_per_component(16)
            .total_tables(n.saturating_mul(4))
            .total_stacks(n)
            .max_memory_size(4 << 30);

        let mut wasm = Config::new();
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            .memory_init_cow(true)
            .wasm_component_model(true);
        let engine = Engine::new(&wasm).map_err(|e| CompileError::Engine(e.to_string()))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| CompileError::Engine(e.to_string()))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| CompileError::Engine(e.to_string()))?;
        wit_runtime::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| CompileError::Engine(e.to_string()))?;

        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        let engine_hash = hasher.finish();

        fs::create_dir_all(&config.cache_dir).map_err(|source| CompileError::Cache {
            path: config.cache_dir.clone(),
            source,
        })?;
        let ticker = Ticker::start(engine.clone(), config.epoch_tick)
            .map_err(|e| CompileError::Engine(format!("starting the epoch thread: {e}")))?;
        Ok(Self {
            engine,
            linker,
            cache_dir: config.cache_dir.clone(),
            engine_hash,
            config,
            _ticker: ticker,
        })
    }

    /// The engine's settings.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Checks that `bytes` are a component this runtime can run, compiles it
    /// and stores the compiled form under `key`; later [`Runtime::load`]s
    /// with the same key deserialize instead of compiling.
    ///
    /// `key` names the code (for example the hex SHA-256 of the component);
    /// only `[0-9A-Za-z._-]` are allowed.
    pub fn compile(&self, key: &str, bytes: &[u8]) -> Result<FunctionCode, CompileError> {
        let path = self.cache_path(key)?;
        check_component_header(bytes)?;
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
        let code = self.prepare(component.clone())?;
        let mut serialized = component
            .serialize()
            .map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
        if let Some(tag) = self.tag(&path, &serialized) {
            serialized.extend_from_slice(tag.as_ref());
        }
        write_atomically(&path, &serialized)
            .map_err(|source| CompileError::Cache { path, source })?;
        Ok(code)
    }

    /// The HMAC of a compiled file's bytes, bound to its name (so that one
    /// code's file cannot stand in for another's); `None` without a key.
    fn tag(&self, path: &Path, body: &[u8]) -> Option<aws_lc_rs::hmac::Tag> {
        let key = self.config.artifact_key.as_ref()?;
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&key);
        ctx.update(b"kiln-compiled-v1\0");
        ctx.update(path.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
        ctx.update(b"\0");
        ctx.update(body);
        Some(ctx.sign())
    }

    /// The compiled bytes of a cache file, when it authenticates (or when
    /// this runtime has no key); `None` for a file to discard.
    fn authentic<'a>(&self, path: &Path, file: &'a [u8]) -> Option<&'a [u8]> {
        let Some(key) = self.config.artifact_key.as_ref() else {
            return Some(file);
        };
        let split = file.len().checked_sub(TAG_LEN)?;
        let (body, tag) = file.split_at(split);
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
        let mut message = Vec::with_capacity(body.len() + 64);
        message.extend_from_slice(b"kiln-compiled-v1\0");
        message.extend_from_slice(path.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
        message.push(0);
        message.extend_from_slice(body);
        aws_lc_rs::hmac::verify(&key, &message, tag)
            .ok()
            .map(|()| body)
    }

    /// Returns the runnable form of the code named `key`: from the cache when
    /// it holds a compatible compiled form, else compiled from `source()`.
    pub fn load(
        &self,
        key: &str,
        source: impl FnOnce() -> io::Result<Vec<u8>>,
    ) -> Result<FunctionCode, CompileError> {
        let path = self.cache_path(key)?;
        // Read the file rather than mmap it: a mapping of a file that is
        // later truncated or rewritten in place faults (SIGBUS) the whole
        // server, and a copy costs only the compiled code's size.
        match fs::read(&path) {
            Ok(file) => match self.authentic(&path, &file) {
                Some(compiled) => {
                    // SAFETY: the bytes are `Component::serialize` output of
                    // this engine configuration (its hash is in the file
                    // name) written by `compile`: with a key, the HMAC proves
                    // it; without one, the directory is the agent's own,
                    // read-only. `deserialize` still checks the header and
                    // engine compatibility; the bytes are our own copy, so
                    // nothing can change them under us.
                    match unsafe { Component::deserialize(&self.engine, compiled) } {
                        Ok(component) => return self.prepare(component),
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "discarding unusable compiled component");
                            let _ = fs::remove_file(&path);
                        }
                    }
                }
                None => {
                    tracing::warn!(path = %path.display(), "discarding a compiled component that does not authenticate (not written by this server): compiling it again");
                    let _ = fs::remove_file(&path);
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(CompileError::Cache { path, source }),
        }
        let bytes = source().map_err(CompileError::Source)?;
        self.compile(key, &bytes)
    }

    /// Loads a component from `source`, or from `precompiled` when that file
    /// holds a compatible compiled form of it (the host shares its
    /// compilation with environments this way).
    ///
    /// `precompiled` must come from a trusted writer: it is deserialized as
    /// machine code.
    pub fn load_file(
        &self,
        precompiled: Option<&Path>,
        source: &Path,
    ) -> Result<FunctionCode, CompileError> {
        if let Some(path) = precompiled
            && let Ok(bytes) = fs::read(path)
            && !bytes.is_empty()
        {
            // SAFETY: the caller vouches for the file (kiln's own compilation
            // cache, bound read-only into the environment); the bytes are our
            // copy, and `deserialize` checks the header and engine
            // compatibility.
            match unsafe { Component::deserialize(&self.engine, &bytes) } {
                Ok(component) => return self.prepare(component),
                Err(e) => {
                    tracing::debug!(error = %e, "precompiled component not usable; compiling");
                }
            }
        }
        let bytes = fs::read(source).map_err(CompileError::Source)?;
        check_component_header(&bytes)?;
        let component = Component::new(&self.engine, &bytes)
            .map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
        self.prepare(component)
    }

    /// A file environments elsewhere (jails) may load the compiled form of
    /// `key` from, if there is one: with an artifact key, a verified copy
    /// without its tag in the working directory, made once; without, the
    /// cache file itself.
    pub fn working_copy(&self, key: &str) -> Option<PathBuf> {
        let path = self.cache_path(key).ok().filter(|p| p.is_file())?;
        let (Some(_), Some(dir)) = (&self.config.artifact_key, &self.config.working_dir) else {
            return self.config.artifact_key.is_none().then_some(path);
        };
        let copy = dir.join(path.file_name()?);
        if copy.is_file() {
            return Some(copy);
        }
        let file = fs::read(&path).ok()?;
        let Some(body) = self.authentic(&path, &file) else {
            tracing::warn!(path = %path.display(), "discarding a compiled component that does not authenticate");
            let _ = fs::remove_file(&path);
            return None;
        };
        fs::create_dir_all(dir).ok()?;
        write_atomically(&copy, body).ok()?;
        Some(copy)
    }

    /// Removes the compiled form of `key`, if any.
    pub fn evict(&self, key: &str) -> Result<(), CompileError> {
        let path = self.cache_path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CompileError::Cache { path, source }),
        }
    }

    fn prepare(&self, component: Component) -> Result<FunctionCode, CompileError> {
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| CompileError::Link(format!("{e:#}")))?;
        let pre = FunctionCorePre::new(pre).map_err(|e| {
            if component.get_export_index(None, HANDLER_EXPORT).is_none() {
                CompileError::MissingHandler("it has no such export".to_owned())
            } else {
                CompileError::MissingHandler(format!("{e:#}"))
            }
        })?;
        let init = component
            .get_export_index(None, LIFECYCLE_EXPORT)
            .and_then(|lifecycle| component.get_export_index(Some(&lifecycle), "init"));
        Ok(FunctionCode {
            inner: Arc::new(CodeInner { pre, init }),
        })
    }

    fn cache_path(&self, key: &str) -> Result<PathBuf, CompileError> {
        let valid = !key.is_empty()
            && key.len() <= 200
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !key.starts_with('.');
        if !valid {
            return Err(CompileError::Cache {
                path: self.cache_dir.join(key),
                source: io::Error::new(io::ErrorKind::InvalidInput, "invalid cache key"),
            });
        }
        Ok(self
            .cache_dir
            .join(format!("{key}-{:016x}.cwasm", self.engine_hash)))
    }
}

/// Bytes of the tag after a compiled file's body.
const TAG_LEN: usize = 32;

/// Distinguishes "not Wasm" and "core module" from a component before
/// handing the bytes to the compiler, so the error says what to fix.
pub fn check_component_header(bytes: &[u8]) -> Result<(), CompileError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(CompileError::NotWasm);
    }
    // Bytes 4..8 are a u16 version and a u16 layer: layer 0 is a core module,
    // layer 1 a component.
    let layer = u16::from_le_bytes([bytes[6], bytes[7]]);
    match layer {
        0 => Err(CompileError::CoreModule),
        1 => Ok(()),
        other => Err(CompileError::Invalid(format!(
            "unknown WebAssembly layer {other}"
        ))),
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(bytes)?;
    tmp.1.sync_all()?;
    fs::rename(&tmp.0, path)
}

fn tempfile_in(dir: &Path) -> io::Result<(PathBuf, fs::File)> {
    for attempt in 0..16u32 {
        let name = format!(
            ".tmp-{}-{}-{attempt}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        );
        let path = dir.join(name);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "could not create a temporary file",
    ))
}

/// A function's code, compiled and pre-instantiated: cheap to clone, shared
/// by all environments of the function versions that use it.
#[derive(Clone)]
pub struct FunctionCode {
    pub(crate) inner: Arc<CodeInner>,
}

impl std::fmt::Debug for FunctionCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionCode")
            .field("has_init", &self.has_init())
            .finish_non_exhaustive()
    }
}

impl FunctionCode {
    /// Whether the component exports `lifecycle.init`.
    pub fn has_init(&self) -> bool {
        self.inner.init.is_some()
    }
}

pub(crate) struct CodeInner {
    pub(crate) pre: FunctionCorePre<HostState>,
    pub(crate) init: Option<ComponentExportIndex>,
}

/// Advances the engine's epoch every tick, for deadlines and yields.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine, tick: Duration) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_check_names_the_problem() {
        assert!(matches!(
            check_component_header(b"PK\x03\x04...."),
            Err(CompileError::NotWasm)
        ));
        assert!(matches!(
            check_component_header(b"\0asm\x01\0\0\0"),
            Err(CompileError::CoreModule)
        ));
        assert!(check_component_header(b"\0asm\x0d\0\x01\0").is_ok());
        assert!(matches!(
            check_component_header(b"\0as"),
            Err(CompileError::NotWasm)
        ));
    }
}
