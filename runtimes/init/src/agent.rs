//! The agent's work once its environment exists: run the init phase, then
//! serve invocations one at a time until the host says stop or goes away.

use kiln_proto::asynchronous::{read_message, write_message};
use kiln_proto::{AgentMessage, Config, HostMessage, Invocation, InvocationResult, Mode, Outcome};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use crate::bootstrap::{Bootstrap, Reaper};
use crate::logs::LogBuffer;
use crate::runtime_api::{InitEvent, RuntimeApi};
use crate::wasm::WasmFunction;

/// The code the environment runs.
enum Function {
    Native {
        bootstrap: Bootstrap,
        api: RuntimeApi,
        logs: LogBuffer,
        _reaper: Reaper,
    },
    Wasm(Box<WasmFunction>),
    /// Init failed or the runtime exited: every invocation fails with this.
    Dead {
        error_type: String,
        message: String,
    },
}

/// Serves the host over `reader`/`writer` with `config` until shutdown.
pub async fn run<R, W>(
    config: Config,
    mut reader: R,
    mut writer: W,
) -> Result<(), kiln_proto::ProtoError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let relay = crate::relay::start().await;
    let (mut function, init_message) = init(&config, relay).await;
    write_message(&mut writer, &init_message).await?;
    loop {
        let message = match read_message::<HostMessage>(&mut reader).await {
            Ok(m) => m,
            // The host closed the channel: stop.
            Err(kiln_proto::ProtoError::Io(_)) => break,
            Err(e) => {
                let _ = write_message(
                    &mut writer,
                    &AgentMessage::Fatal {
                        message: e.to_string(),
                    },
                )
                .await;
                break;
            }
        };
        match message {
            HostMessage::Invoke(inv) => {
                let mut result = invoke(&config, &mut function, *inv).await;
                // Never let a log break the frame that carries the result.
                result.logs.truncate(kiln_proto::MAX_LOG);
                write_message(&mut writer, &AgentMessage::Result(Box::new(result))).await?;
            }
            HostMessage::Shutdown => break,
            HostMessage::Hello { .. } | HostMessage::Configure(_) | HostMessage::PutFile(_) => {
                write_message(
                    &mut writer,
                    &AgentMessage::Fatal {
                        message: "unexpected message: the environment is already configured".into(),
                    },
                )
                .await?;
                break;
            }
        }
    }
    if let Function::Native { bootstrap, .. } = &function {
        bootstrap.kill();
    }
    Ok(())
}

fn init_failed(
    error_type: impl Into<String>,
    message: impl Into<String>,
    logs: Vec<u8>,
) -> AgentMessage {
    AgentMessage::InitFailed {
        error_type: error_type.into(),
        message: message.into(),
        logs,
    }
}

async fn init(config: &Config, relay: Option<std::net::SocketAddr>) -> (Function, AgentMessage) {
    match &config.mode {
        Mode::Wasm {
            component,
            precompiled,
        } => match crate::wasm::load(config, component, precompiled.as_deref(), relay).await {
            Err((t, m)) => (
                Function::Dead {
                    error_type: t.clone(),
                    message: m.clone(),
                },
                init_failed(t, m, Vec::new()),
            ),
            Ok(mut f) => match f.init().await {
                Ok(logs) => (Function::Wasm(Box::new(f)), AgentMessage::Ready { logs }),
                Err((t, m, logs)) => (
                    Function::Dead {
                        error_type: t.clone(),
                        message: m.clone(),
                    },
                    init_failed(t, m, logs),
                ),
            },
        },
        Mode::Bootstrap => init_native(config).await,
    }
}

async fn init_native(config: &Config) -> (Function, AgentMessage) {
    let dead = |t: &str, m: &str| Function::Dead {
        error_type: t.to_owned(),
        message: m.to_owned(),
    };
    let path = match crate::bootstrap::find() {
        Ok(p) => p,
        Err(m) => {
            return (
                dead("Runtime.InvalidEntrypoint", &m),
                init_failed("Runtime.InvalidEntrypoint", m, Vec::new()),
            );
        }
    };
    let (init_tx, init_rx) = oneshot::channel();
    let api = RuntimeApi::new(init_tx);
    if let Err(e) = api.serve().await {
        let m = format!("The Runtime API could not start: {e}");
        return (
            dead("Runtime.Unavailable", &m),
            init_failed("Runtime.Unavailable", m, Vec::new()),
        );
    }
    let reaper = match Reaper::start() {
        Ok(r) => r,
        Err(e) => {
            let m = format!("Could not watch the bootstrap: {e}");
            return (
                dead("Runtime.Unavailable", &m),
                init_failed("Runtime.Unavailable", m, Vec::new()),
            );
        }
    };
    let logs = LogBuffer::new(config.log_capacity as usize);
    let mut bootstrap = match Bootstrap::spawn(&path, &config.env, &logs, &reaper) {
        Ok(b) => b,
        Err(e) => {
            let m = crate::bootstrap::explain_spawn_error(&path, &e);
            // The function's log says it too: that is where its author looks.
            let mut output = logs.take();
            output.extend_from_slice(format!("{m}\n").as_bytes());
            return (
                dead("Runtime.InvalidEntrypoint", &m),
                init_failed("Runtime.InvalidEntrypoint", m, output),
            );
        }
    };
    // Init ends when the runtime first asks for an invocation, reports an
    // init error, or exits. (The host bounds how long this may take.)
    tokio::select! {
        event = init_rx => {
            bootstrap.drain_output();
            match event {
                Ok(InitEvent::Ready) => {
                    let message = AgentMessage::Ready { logs: logs.take() };
                    (
                        Function::Native {
                            bootstrap,
                            api,
                            logs,
                            _reaper: reaper,
                        },
                        message,
                    )
                }
                Ok(InitEvent::Failed { error_type, body }) => {
                    bootstrap.kill();
                    let body = String::from_utf8_lossy(&body).into_owned();
                    (dead(&error_type, &body), init_failed(error_type, body, logs.take()))
                }
                Err(_) => {
                    bootstrap.kill();
                    let m = "The Runtime API stopped during init".to_owned();
                    (dead("Runtime.Unavailable", &m), init_failed("Runtime.Unavailable", m, logs.take()))
                }
            }
        }
        exit = bootstrap.wait() => {
            bootstrap.drain_output();
            let m = format!("Runtime exited with error: {}", exit.describe());
            (dead("Runtime.ExitError", &m), init_failed("Runtime.ExitError", m, logs.take()))
        }
    }
}

async fn invoke(config: &Config, function: &mut Function, inv: Invocation) -> InvocationResult {
    let request_id = inv.request_id.clone();
    let (outcome, logs, memory) = match function {
        Function::Dead {
            error_type,
            message,
        } => (
            Outcome::Failed {
                error_type: error_type.clone(),
                message: format!("RequestId: {request_id} Error: {message}"),
            },
            Vec::new(),
            0,
        ),
        Function::Wasm(f) => f.invoke(config, &inv).await,
        Function::Native {
            bootstrap,
            api,
            logs,
            ..
        } => {
            if let Some(exit) = bootstrap.exited() {
                let message = format!("Runtime exited with error: {}", exit.describe());
                *function = Function::Dead {
                    error_type: "Runtime.ExitError".into(),
                    message: message.clone(),
                };
                (
                    Outcome::Failed {
                        error_type: "Runtime.ExitError".into(),
                        message: format!("RequestId: {request_id} Error: {message}"),
                    },
                    Vec::new(),
                    0,
                )
            } else {
                // The agent ends a late invocation itself, so that what the
                // function printed until then still reaches its log (the
                // host only backs this deadline up).
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let left = std::time::Duration::from_millis(inv.deadline_ms.saturating_sub(now_ms));
                let (tx, rx) = oneshot::channel();
                api.invoke(inv, tx);
                let mut timed_out = false;
                let outcome = tokio::select! {
                    outcome = rx => outcome.unwrap_or(Outcome::Failed {
                        error_type: "Runtime.Unavailable".into(),
                        message: format!("RequestId: {request_id} Error: the Runtime API stopped"),
                    }),
                    exit = bootstrap.wait() => Outcome::Failed {
                        error_type: "Runtime.ExitError".into(),
                        message: format!("RequestId: {request_id} Error: Runtime exited with error: {}", exit.describe()),
                    },
                    () = tokio::time::sleep(left) => {
                        timed_out = true;
                        Outcome::Failed {
                            error_type: "Sandbox.Timedout".into(),
                            message: format!(
                                "RequestId: {request_id} Error: Task timed out after {:.2} seconds",
                                left.as_secs_f64()
                            ),
                        }
                    }
                };
                bootstrap.drain_output();
                let logs = logs.take();
                if timed_out {
                    bootstrap.kill();
                    *function = Function::Dead {
                        error_type: "Sandbox.Timedout".into(),
                        message: "an earlier invocation timed out and the runtime was stopped"
                            .into(),
                    };
                    return InvocationResult {
                        request_id,
                        outcome,
                        logs,
                        max_memory_bytes: 0,
                    };
                }
                if let (Outcome::Failed { .. }, Some(exit)) = (&outcome, bootstrap.exited()) {
                    *function = Function::Dead {
                        error_type: "Runtime.ExitError".into(),
                        message: format!("Runtime exited with error: {}", exit.describe()),
                    };
                }
                (outcome, logs, 0)
            }
        }
    };
    InvocationResult {
        request_id,
        outcome,
        logs,
        max_memory_bytes: memory,
    }
}
