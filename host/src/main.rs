//! The `kiln` binary.

mod cli;

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser;
use kiln::server::{Server, ServerConfig};

use cli::{Cli, Command, ServeArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A VMM process: its own threads, each with a seccomp filter; no async
    // runtime (whose threads would have none).
    let cli = match cli.command {
        Command::Vmm(args) => {
            return match cli::vmm::run(args) {
                Ok(0) => ExitCode::SUCCESS,
                Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        command => Cli { command },
    };
    // Before any thread: a mount namespace of the server's own, so that
    // its mounts cannot outlive it.
    if let Command::Serve(_) = &cli.command
        && let Err(e) = kiln::server::private_mount_namespace()
    {
        eprintln!(
            "warning: no private mount namespace ({e}): environments' mounts are made in the \
             host's and removed by the next start if the server dies"
        );
    }
    // Before the runtime: the OTLP exporter's HTTP client runs on threads
    // of its own and must not be made or dropped on the runtime's.
    let telemetry = match &cli.command {
        Command::Serve(_) => match kiln::telemetry::init() {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await.map(|()| 0),
            other => cli::run_client(other).await,
        }
    });
    drop(runtime);
    // Flushes the spans still held.
    drop(telemetry);
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    if !(args.async_time_scale > 0.0 && args.async_time_scale <= 1.0) {
        anyhow::bail!(
            "--async-time-scale must be in (0, 1], not {}",
            args.async_time_scale
        );
    }
    let root_credentials = match (
        std::env::var("KILN_ROOT_ACCESS_KEY_ID").ok(),
        std::env::var("KILN_ROOT_SECRET_ACCESS_KEY").ok(),
    ) {
        (Some(id), Some(secret)) => Some((id, secret)),
        (None, None) => None,
        _ => anyhow::bail!(
            "set both KILN_ROOT_ACCESS_KEY_ID and KILN_ROOT_SECRET_ACCESS_KEY, or neither"
        ),
    };
    let config = ServerConfig {
        listen: args.listen,
        data_dir: args.data_dir.clone(),
        region: args.region.clone(),
        account_id: args.account_id.clone(),
        max_environments: args.max_environments,
        account_concurrency: args.account_concurrency,
        env_lease: std::time::Duration::from_secs(args.env_lease.max(1)),
        guest_kernel: args.guest_kernel.clone(),
        wasm_sandbox: if args.wasm_sandbox == "jail" {
            kiln::server::WasmPlacement::Jail
        } else {
            kiln::server::WasmPlacement::InProcess
        },
        async_config: kiln::invoke::AsyncConfig {
            time_scale: args.async_time_scale,
            ..kiln::invoke::AsyncConfig::default()
        },
        idle_timeout: cli::idle_timeout(&args),
        root_credentials,
        max_clock_skew: std::time::Duration::from_secs(args.max_clock_skew),
        audit_digest_interval: std::time::Duration::from_secs(args.audit_digest_interval.max(1)),
        log_retention: kiln::invoke::logstore::Retention {
            max_age: std::time::Duration::from_secs(args.log_retention_days.saturating_mul(86_400)),
            max_bytes_per_function: args.log_retention_mb.saturating_mul(1 << 20),
        },
        telemetry: args.telemetry == "on",
        max_connections: args.max_connections,
        header_timeout: std::time::Duration::from_secs(args.header_timeout.max(1)),
        memory_budget_mb: args.memory_budget,
        max_pids: args.max_pids,
        ..ServerConfig::new()
    };
    let server = Server::start(config)
        .await
        .with_context(|| format!("starting kiln with data dir {}", args.data_dir.display()))?;
    if let Some((path, id, secret)) = server.generated_root() {
        // Shown this once; the file keeps them (mode 0600).
        println!(
            "kiln generated root credentials (saved in {}):\n  AWS_ACCESS_KEY_ID={id}\n  \
             AWS_SECRET_ACCESS_KEY={secret}",
            path.display()
        );
    }
    // Scripts and tests wait for this line (and read the port from it).
    println!(
        "kiln listening on http://{} ({} functions loaded)",
        server.local_addr(),
        server.functions_loaded()
    );
    server
        .run(shutdown_signal())
        .await
        .context("serving the API")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
