//! The wire protocol between kiln (the host) and its environment agent
//! (`runtimes/init`), over one byte stream: a Unix socket for a jail, a
//! virtio console port for a microVM.
//!
//! Framing: each message is a frame of a little-endian `u32` length and
//! that many bytes of a postcard-encoded [`HostMessage`] or
//! [`AgentMessage`]. A frame longer than [`MAX_FRAME`] is refused before
//! anything is allocated for it; decoded messages are then checked with
//! `validate`, which bounds every list and string.
//!
//! Conversation, in order:
//! 1. both sides send `Hello` with [`PROTOCOL_VERSION`]; a mismatch ends it;
//! 2. the host sends `Configure` (the environment: function, limits,
//!    variables, how to run the code and, for a jail, how to build it);
//! 3. the agent runs the init phase and answers `Ready` or `InitFailed`;
//! 4. per invocation: the host sends `Invoke`, the agent answers `Result`,
//!    one at a time;
//! 5. the host sends `Shutdown` (or closes the stream); the agent stops the
//!    function and exits.
//!
//! Threat model: the agent runs next to hostile code and may be
//! compromised, so the host treats every agent frame as untrusted input;
//! the agent, likewise, validates the host's frames before acting on them.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version both sides must speak.
pub const PROTOCOL_VERSION: u32 = 4;

/// Largest frame body: a 6 MB payload plus headers and logs.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;

/// Largest payload of an invocation or a response in a frame (room for
/// the largest response, [`MAX_RESPONSE`]).
pub const MAX_PAYLOAD: usize = 6 * 1024 * 1024 + 4096;
/// Largest response a function may return, as Lambda counts it on every
/// path (the Runtime API, Wasm in-process and Wasm in a jail): 6,291,556
/// bytes; one more is `Function.ResponseSizeTooLarge`.
pub const MAX_RESPONSE: usize = 6_291_556;

/// The error of a response over [`MAX_RESPONSE`], in Lambda's words.
pub fn response_too_large() -> Outcome {
    Outcome::Failed {
        error_type: "Function.ResponseSizeTooLarge".to_owned(),
        message: format!(
            "Response payload size exceeded maximum allowed payload size ({MAX_RESPONSE} bytes)."
        ),
    }
}
/// Longest string field (names, ARNs, messages, variables).
pub const MAX_STRING: usize = 64 * 1024;
/// Most environment variables.
pub const MAX_ENV: usize = 1024;
/// Most log bytes attached to one message (a 1 MiB capacity plus the note
/// on what was cut).
pub const MAX_LOG: usize = 1024 * 1024 + 4096;

/// Protocol failures.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The stream failed or ended.
    #[error("channel: {0}")]
    Io(#[from] io::Error),
    /// A frame longer than allowed.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    FrameTooLarge(usize),
    /// The bytes are not a message.
    #[error("malformed message: {0}")]
    Decode(#[from] postcard::Error),
    /// A message broke a bound or a rule.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The peer speaks another version.
    #[error("protocol version {theirs} is not {PROTOCOL_VERSION}")]
    Version {
        /// The peer's version.
        theirs: u32,
    },
}

/// What the host sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// The first message.
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// A piece of a code or layer file, before `Configure`, for an agent
    /// that has no host directories to mount (a microVM's).
    PutFile(Box<FilePiece>),
    /// The environment to set up and initialize.
    Configure(Box<Config>),
    /// One invocation.
    Invoke(Box<Invocation>),
    /// Stop the function and exit.
    Shutdown,
}

/// What the agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// The first message.
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// Init finished; invocations may come.
    Ready {
        /// Init output.
        logs: Vec<u8>,
    },
    /// Init failed; the environment is done.
    InitFailed {
        /// Lambda's `errorType`.
        error_type: String,
        /// Lambda's `errorMessage`, or the runtime's own error body.
        message: String,
        /// Init output.
        logs: Vec<u8>,
    },
    /// An invocation's result.
    Result(Box<InvocationResult>),
    /// The agent cannot go on.
    Fatal {
        /// Why.
        message: String,
    },
}

/// How the environment runs the code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// A native `bootstrap` behind the Lambda Runtime API.
    Bootstrap,
    /// A WebAssembly component run by the agent's wasmtime.
    Wasm {
        /// The component, inside the environment (e.g. `/var/task/function.wasm`).
        component: String,
        /// Its compiled form, when the host made one available.
        precompiled: Option<String>,
    },
}

/// Where a [`FilePiece`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CodeRoot {
    /// `/var/task`.
    Task,
    /// `/opt` (the merged layers).
    Opt,
}

/// Most bytes of a file in one [`FilePiece`]; larger files come in pieces.
pub const MAX_PIECE: usize = 4 * 1024 * 1024;
/// Longest relative path of a code file.
pub const MAX_PATH: usize = 4096;

/// Part of a file of the function's code or layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePiece {
    /// Which tree.
    pub root: CodeRoot,
    /// Relative path inside it: `/`-separated normal components only.
    pub path: String,
    /// Permission bits (executable or not).
    pub mode: u32,
    /// Whether this piece continues the file (else it starts it).
    pub append: bool,
    /// The bytes.
    pub data: Vec<u8>,
}

impl FilePiece {
    /// Whether `path` is a safe relative path: no root, no `..` or `.`,
    /// no empty component, no NUL.
    pub fn path_is_safe(path: &str) -> bool {
        !path.is_empty()
            && path.len() <= MAX_PATH
            && !path.contains('\0')
            && path
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
    }
}

/// How to build a jail (absent in a microVM, which is its own boundary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSpec {
    /// Host directory that becomes the root (a tmpfs is mounted on it).
    pub root: String,
    /// Host directory shown read-only at `/var/task`.
    pub task_dir: String,
    /// Host directory shown read-only at `/opt`.
    pub opt_dir: Option<String>,
    /// Host file shown read-only at the `precompiled` path of [`Mode::Wasm`].
    pub precompiled: Option<String>,
    /// Size of `/tmp` in MiB.
    pub tmp_mb: u32,
    /// Host directory bound read-write at `/tmp` (the environment's own
    /// disk); without one, `/tmp` is a tmpfs of `tmp_mb`.
    pub tmp_dir: Option<String>,
    /// The unprivileged user the function runs as.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// `cgroup.procs` files the agent enters before anything else.
    pub cgroup_procs: Vec<String>,
    /// Most open files.
    pub nofile: u64,
    /// Host path of the Unix socket that leads to kiln's API, shown at
    /// [`API_SOCKET`] inside; the agent relays [`API_RELAY`] to it.
    pub api_socket: Option<String>,
}

/// Where a jail sees kiln's API socket.
pub const API_SOCKET: &str = "/run/kiln/api.sock";
/// Where code in an environment reaches kiln's API over TCP, as its
/// `AWS_ENDPOINT_URL_LAMBDA` says: the agent relays it to [`API_SOCKET`].
pub const API_RELAY: &str = "127.0.0.1:9002";

/// The environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Function name.
    pub function_name: String,
    /// `$LATEST` or a version.
    pub function_version: String,
    /// MemorySize in MiB.
    pub memory_mb: u32,
    /// Environment variables, Lambda's and the function's.
    pub env: Vec<(String, String)>,
    /// How to run the code.
    pub mode: Mode,
    /// How to build the jail, when there is one.
    pub jail: Option<JailSpec>,
    /// Most log bytes per invocation.
    pub log_capacity: u32,
    /// Size of `/tmp` in MiB where the agent mounts it itself (a microVM).
    pub tmp_mb: u32,
}

/// One invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invocation {
    /// Request id.
    pub request_id: String,
    /// Deadline in ms since the Unix epoch.
    pub deadline_ms: u64,
    /// The ARN the caller used.
    pub invoked_function_arn: String,
    /// Trace id.
    pub trace_id: String,
    /// `X-Amz-Client-Context`, base64, if given.
    pub client_context: Option<String>,
    /// Cognito identity JSON, if any.
    pub cognito_identity: Option<String>,
    /// The event.
    pub payload: Vec<u8>,
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The response payload.
    Response(Vec<u8>),
    /// The function reported an error (`/error`): its type and body.
    FunctionError {
        /// `Lambda-Runtime-Function-Error-Type`.
        error_type: String,
        /// The error document the runtime posted.
        body: Vec<u8>,
    },
    /// The environment failed (the runtime exited, a trap, ...); it is done.
    Failed {
        /// Lambda's `errorType`.
        error_type: String,
        /// Lambda's `errorMessage`.
        message: String,
    },
}

/// An invocation's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvocationResult {
    /// The request it answers.
    pub request_id: String,
    /// What happened.
    pub outcome: Outcome,
    /// The invocation's output.
    pub logs: Vec<u8>,
    /// Peak memory of the environment, in bytes, if known.
    pub max_memory_bytes: u64,
}

fn check_str(what: &str, s: &str) -> Result<(), ProtoError> {
    if s.len() > MAX_STRING {
        return Err(ProtoError::Invalid(format!(
            "{what} has {} bytes; the limit is {MAX_STRING}",
            s.len()
        )));
    }
    if s.contains('\0') {
        return Err(ProtoError::Invalid(format!("{what} contains a NUL byte")));
    }
    Ok(())
}

fn check_bytes(what: &str, b: &[u8], max: usize) -> Result<(), ProtoError> {
    if b.len() > max {
        return Err(ProtoError::Invalid(format!(
            "{what} has {} bytes; the limit is {max}",
            b.len()
        )));
    }
    Ok(())
}

/// Bounds every field of a message.
pub trait Validate {
    /// `Ok` when every field is within its bounds.
    fn validate(&self) -> Result<(), ProtoError>;
}

impl Validate for HostMessage {
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            HostMessage::Hello { .. } | HostMessage::Shutdown => Ok(()),
            HostMessage::Configure(c) => c.validate(),
            HostMessage::PutFile(p) => {
                if !FilePiece::path_is_safe(&p.path) {
                    return Err(ProtoError::Invalid(format!(
                        "file path {:?} is not a safe relative path",
                        p.path.chars().take(200).collect::<String>()
                    )));
                }
                if p.mode & !0o777 != 0 {
                    return Err(ProtoError::Invalid(format!("file mode {:o}", p.mode)));
                }
                check_bytes("file piece", &p.data, MAX_PIECE)
            }
            HostMessage::Invoke(i) => i.validate(),
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ProtoError> {
        check_str("function name", &self.function_name)?;
        check_str("function version", &self.function_version)?;
        if self.env.len() > MAX_ENV {
            return Err(ProtoError::Invalid(format!(
                "{} environment variables; the limit is {MAX_ENV}",
                self.env.len()
            )));
        }
        for (k, v) in &self.env {
            check_str("variable name", k)?;
            check_str("variable value", v)?;
            if k.is_empty() || k.contains('=') {
                return Err(ProtoError::Invalid(format!(
                    "variable name {k:?} is not valid"
                )));
            }
        }
        if let Mode::Wasm {
            component,
            precompiled,
        } = &self.mode
        {
            check_str("component path", component)?;
            if let Some(p) = precompiled {
                check_str("precompiled path", p)?;
            }
        }
        if let Some(j) = &self.jail {
            for p in [&j.root, &j.task_dir]
                .into_iter()
                .chain(j.opt_dir.iter())
                .chain(j.tmp_dir.iter())
                .chain(j.precompiled.iter())
                .chain(j.cgroup_procs.iter())
            {
                check_str("jail path", p)?;
                if !p.starts_with('/') {
                    return Err(ProtoError::Invalid(format!(
                        "jail path {p:?} is not absolute"
                    )));
                }
            }
            if j.cgroup_procs.len() > 16 {
                return Err(ProtoError::Invalid("too many cgroups".into()));
            }
            if j.uid == 0 || j.gid == 0 {
                return Err(ProtoError::Invalid("a function never runs as root".into()));
            }
        }
        if self.tmp_mb > 10240 {
            return Err(ProtoError::Invalid("/tmp over 10240 MiB".into()));
        }
        if self.log_capacity as usize > MAX_LOG {
            return Err(ProtoError::Invalid("log capacity over the limit".into()));
        }
        Ok(())
    }
}

impl Validate for Invocation {
    fn validate(&self) -> Result<(), ProtoError> {
        check_str("request id", &self.request_id)?;
        check_str("invoked ARN", &self.invoked_function_arn)?;
        check_str("trace id", &self.trace_id)?;
        for s in self.client_context.iter().chain(&self.cognito_identity) {
            check_str("context", s)?;
        }
        check_bytes("payload", &self.payload, MAX_PAYLOAD)
    }
}

impl Validate for AgentMessage {
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            AgentMessage::Hello { .. } => Ok(()),
            AgentMessage::Ready { logs } => check_bytes("logs", logs, MAX_LOG),
            AgentMessage::InitFailed {
                error_type,
                message,
                logs,
            } => {
                check_str("error type", error_type)?;
                check_str("error message", message)?;
                check_bytes("logs", logs, MAX_LOG)
            }
            AgentMessage::Result(r) => {
                check_str("request id", &r.request_id)?;
                check_bytes("logs", &r.logs, MAX_LOG)?;
                match &r.outcome {
                    Outcome::Response(p) => check_bytes("response", p, MAX_PAYLOAD),
                    Outcome::FunctionError { error_type, body } => {
                        check_str("error type", error_type)?;
                        check_bytes("error body", body, MAX_PAYLOAD)
                    }
                    Outcome::Failed {
                        error_type,
                        message,
                    } => {
                        check_str("error type", error_type)?;
                        check_str("error message", message)
                    }
                }
            }
            AgentMessage::Fatal { message } => check_str("message", message),
        }
    }
}

/// A message as a frame (length prefix included).
pub fn encode<T: Serialize + Validate>(message: &T) -> Result<Vec<u8>, ProtoError> {
    message.validate()?;
    let mut frame = vec![0u8; 4];
    let body = postcard::to_extend(message, Vec::new())?;
    if body.len() > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge(body.len()));
    }
    frame[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes and validates a frame body.
pub fn decode<T: DeserializeOwned + Validate>(body: &[u8]) -> Result<T, ProtoError> {
    let (message, rest): (T, &[u8]) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(ProtoError::Invalid(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    message.validate()?;
    Ok(message)
}

fn frame_len(header: [u8; 4]) -> Result<usize, ProtoError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge(len));
    }
    Ok(len)
}

/// Reads one message from a blocking stream.
pub fn read_message<T: DeserializeOwned + Validate>(r: &mut impl Read) -> Result<T, ProtoError> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header)?;
    let mut body = vec![0u8; frame_len(header)?];
    r.read_exact(&mut body)?;
    decode(&body)
}

/// Writes one message to a blocking stream.
pub fn write_message<T: Serialize + Validate>(
    w: &mut impl Write,
    message: &T,
) -> Result<(), ProtoError> {
    w.write_all(&encode(message)?)?;
    w.flush()?;
    Ok(())
}

/// Async framing over tokio streams.
#[cfg(feature = "tokio")]
pub mod asynchronous {
    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::{ProtoError, Validate, decode, encode, frame_len};

    /// Reads one message.
    pub async fn read_message<T: DeserializeOwned + Validate>(
        r: &mut (impl AsyncRead + Unpin),
    ) -> Result<T, ProtoError> {
        let mut header = [0u8; 4];
        r.read_exact(&mut header).await?;
        let mut body = vec![0u8; frame_len(header)?];
        r.read_exact(&mut body).await?;
        decode(&body)
    }

    /// Writes one message.
    pub async fn write_message<T: Serialize + Validate>(
        w: &mut (impl AsyncWrite + Unpin),
        message: &T,
    ) -> Result<(), ProtoError> {
        w.write_all(&encode(message)?).await?;
        w.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_pieces_take_only_safe_relative_paths() {
        let piece = |path: &str| {
            HostMessage::PutFile(Box::new(FilePiece {
                root: CodeRoot::Task,
                path: path.into(),
                mode: 0o755,
                append: false,
                data: b"#!".to_vec(),
            }))
        };
        for good in ["bootstrap", "lib/x.so", "a/b/c"] {
            assert!(
                decode::<HostMessage>(&encode(&piece(good)).unwrap()[4..]).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a/",
            "a\0b",
        ] {
            assert!(encode(&piece(bad)).is_err(), "{bad:?}");
        }
        let mut big = FilePiece {
            root: CodeRoot::Opt,
            path: "big".into(),
            mode: 0o644,
            append: true,
            data: vec![0; MAX_PIECE + 1],
        };
        assert!(encode(&HostMessage::PutFile(Box::new(big.clone()))).is_err());
        big.data.truncate(MAX_PIECE);
        big.mode = 0o4755;
        assert!(
            encode(&HostMessage::PutFile(Box::new(big))).is_err(),
            "setuid refused"
        );
    }

    fn config() -> Config {
        Config {
            function_name: "f".into(),
            function_version: "$LATEST".into(),
            memory_mb: 128,
            env: vec![("A".into(), "b".into())],
            mode: Mode::Bootstrap,
            jail: Some(JailSpec {
                root: "/data/envs/x/root".into(),
                task_dir: "/data/code/abc".into(),
                opt_dir: None,
                precompiled: None,
                tmp_mb: 512,
                tmp_dir: Some("/data/envs/x/tmp".into()),
                uid: 1000,
                gid: 1000,
                cgroup_procs: vec!["/sys/fs/cgroup/pids/kiln/x/cgroup.procs".into()],
                nofile: 1024,
                api_socket: Some("/data/run/api.sock".into()),
            }),
            log_capacity: 1 << 20,
            tmp_mb: 512,
        }
    }

    #[test]
    fn messages_round_trip() {
        let messages = vec![
            HostMessage::Hello {
                version: PROTOCOL_VERSION,
            },
            HostMessage::Configure(Box::new(config())),
            HostMessage::Invoke(Box::new(Invocation {
                request_id: "r".into(),
                deadline_ms: 5,
                invoked_function_arn: "arn".into(),
                trace_id: "t".into(),
                client_context: None,
                cognito_identity: Some("{}".into()),
                payload: b"{}".to_vec(),
            })),
            HostMessage::Shutdown,
        ];
        let mut stream = Vec::new();
        for m in &messages {
            write_message(&mut stream, m).unwrap();
        }
        let mut r = &stream[..];
        for m in &messages {
            assert_eq!(&read_message::<HostMessage>(&mut r).unwrap(), m);
        }
        assert!(matches!(
            read_message::<HostMessage>(&mut r),
            Err(ProtoError::Io(_))
        ));
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let header = (u32::MAX).to_le_bytes();
        let mut r = &header[..];
        assert!(matches!(
            read_message::<AgentMessage>(&mut r),
            Err(ProtoError::FrameTooLarge(_))
        ));
    }

    #[test]
    fn bounds_are_enforced_on_both_sides() {
        let mut c = config();
        c.env = (0..MAX_ENV + 1)
            .map(|i| (format!("K{i}"), "v".into()))
            .collect();
        assert!(encode(&HostMessage::Configure(Box::new(c))).is_err());
        let mut c = config();
        c.jail.as_mut().unwrap().uid = 0;
        assert!(encode(&HostMessage::Configure(Box::new(c))).is_err());
        let big = AgentMessage::Result(Box::new(InvocationResult {
            request_id: "r".into(),
            outcome: Outcome::Response(vec![0; MAX_PAYLOAD + 1]),
            logs: vec![],
            max_memory_bytes: 0,
        }));
        assert!(encode(&big).is_err());
        // A hostile agent that skips `encode`'s checks is still caught.
        let body = postcard::to_stdvec(&big).unwrap();
        assert!(matches!(
            decode::<AgentMessage>(&body),
            Err(ProtoError::Invalid(_))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let _ = decode::<HostMessage>(&bytes);
            let _ = decode::<AgentMessage>(&bytes);
        }
        // Valid frames with a byte flipped, too.
        let good = encode(&HostMessage::Configure(Box::new(config()))).unwrap();
        for i in 4..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0xff;
            let _ = decode::<HostMessage>(&bad[4..]);
        }
    }

    #[tokio::test]
    #[cfg(feature = "tokio")]
    async fn async_framing_matches_blocking() {
        let mut buf = Vec::new();
        asynchronous::write_message(
            &mut buf,
            &AgentMessage::Fatal {
                message: "x".into(),
            },
        )
        .await
        .unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_message::<AgentMessage>(&mut r).unwrap(),
            AgentMessage::Fatal {
                message: "x".into()
            }
        );
    }
}
