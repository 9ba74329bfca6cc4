//! The `kiln` command line: the server (`serve`) and the author's tools
//! (`build`, `deploy`, `invoke`).

pub mod build;
pub mod client;
pub mod progress;
pub mod vmm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use client::{Client, Endpoint, Output, path_segment};

/// kiln: a self-hosted, Lambda-compatible function platform.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: the Lambda API and the functions.
    #[command(after_help = "Example:\n  kiln serve --listen 127.0.0.1:9000 --data-dir ./.kiln")]
    Serve(ServeArgs),
    /// Build a function crate into a deployable zip: a Wasm component at
    /// function.wasm, or with --native a static bootstrap (provided.al2023).
    #[command(
        after_help = "Examples:\n  kiln build examples/hello --output hello.zip\n  kiln build --native examples/hello --output hello-native.zip"
    )]
    Build {
        /// The function crate (a directory with Cargo.toml).
        path: PathBuf,
        /// Where to write the zip (default: <crate>.zip, <crate>-native.zip).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Build a native custom runtime (x86_64-unknown-linux-musl) instead
        /// of a Wasm component.
        #[arg(long)]
        native: bool,
    },
    /// Run one microVM (started by the server; the channel is an inherited
    /// descriptor).
    #[command(
        hide = true,
        after_help = "Example:\n  kiln vmm --kernel vmlinux --initrd initramfs.cpio --memory 128 --channel-fd 3"
    )]
    Vmm(vmm::VmmArgs),
    /// Say which sandboxes this machine can run, and why not the others.
    #[command(after_help = "Example:\n  kiln doctor --output json")]
    Doctor {
        /// Where the probes may write (the server's data dir).
        #[arg(long, env = "KILN_DATA_DIR", default_value = ".kiln")]
        data_dir: PathBuf,
        /// The microVM guest kernel to try booting.
        #[arg(long, env = "KILN_GUEST_KERNEL")]
        guest_kernel: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Create a function, or update its code if it exists.
    #[command(
        after_help = "Examples:\n  kiln deploy hello examples/hello\n  kiln deploy hello hello.zip --memory 256 --timeout 10"
    )]
    Deploy(DeployArgs),
    /// The built-in queue of asynchronous invocation records (dead letters).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// List the runtimes kiln accepts, with their lifecycle dates.
    #[command(after_help = "Example:\n  kiln runtimes --output json")]
    Runtimes {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Invoke a function and print its response.
    #[command(
        after_help = "Examples:\n  kiln invoke hello --payload '{\"name\":\"Ada\"}'\n  kiln invoke hello --output json"
    )]
    Invoke(InvokeArgs),
    /// Access keys: each belongs to a user and carries one identity policy.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Execution roles: a function's Role; its environments get temporary
    /// credentials that act under the role's policy.
    #[command(subcommand)]
    Roles(RolesCommand),
    /// Provisioned concurrency of a version or alias: environments
    /// initialized ahead of invocations.
    #[command(subcommand)]
    Provisioned(ProvisionedCommand),
    /// Every configuration state of a function and its versions: who
    /// changed what, and when.
    #[command(
        after_help = "Examples:\n  kiln config-history hello\n  kiln config-history hello --output json"
    )]
    ConfigHistory {
        /// The function.
        function: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// The audit trail of control-plane calls (read from the data dir).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// A function's logs: START, its output, END and REPORT of every
    /// invocation, from every environment's log stream, oldest first.
    #[command(
        after_help = "Examples:\n  kiln logs hello\n  kiln logs hello --since 10m --filter REPORT\n  \
                            kiln logs hello --follow\n  kiln logs hello --output json   # one event per line"
    )]
    Logs(LogsArgs),
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The function.
    pub function: String,
    /// Keep printing new events as they arrive (until interrupted).
    #[arg(long, short)]
    pub follow: bool,
    /// Only events this recent: `30s`, `10m`, `2h`, `7d`.
    #[arg(long)]
    pub since: Option<String>,
    /// Only events whose message contains this text.
    #[arg(long)]
    pub filter: Option<String>,
    /// Only the lines of this invocation (its START to its REPORT).
    #[arg(long)]
    pub request_id: Option<String>,
    /// Most events printed at first (the latest ones).
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    #[command(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the trail against its signed digests: report exactly which
    /// record or digest was modified, removed, reordered or forged. Exits 1
    /// when anything was.
    #[command(
        after_help = "Examples:\n  kiln audit verify --data-dir .kiln\n  kiln audit verify --public-key trusted-audit-key.txt --output json"
    )]
    Verify {
        /// The server's data dir.
        #[arg(long, env = "KILN_DATA_DIR", default_value = ".kiln")]
        data_dir: PathBuf,
        /// The trail's public key as recorded elsewhere (hex or base64):
        /// trust that rather than the data dir's copy.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// List records, filtered by function, principal, action and time.
    #[command(
        after_help = "Examples:\n  kiln audit list --function hello\n  kiln audit list --principal arn:aws:iam::000000000000:user/ci --since 2026-11-23T00:00:00Z"
    )]
    List {
        /// The server's data dir.
        #[arg(long, env = "KILN_DATA_DIR", default_value = ".kiln")]
        data_dir: PathBuf,
        /// Only calls on this function.
        #[arg(long)]
        function: Option<String>,
        /// Only calls by this principal (ARN).
        #[arg(long)]
        principal: Option<String>,
        /// Only this action (CreateFunction, ...).
        #[arg(long)]
        action: Option<String>,
        /// Only records at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only records before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an access key for USER with the identity policy in FILE; the
    /// secret is printed this once.
    #[command(
        after_help = "Example:\n  kiln keys create ci --policy invoke-only.json\n\ninvoke-only.json:\n  {\"Version\": \"2012-10-17\", \"Statement\": [{\"Effect\": \"Allow\",\n    \"Action\": \"lambda:Invoke*\", \"Resource\": \"arn:aws:lambda:*:*:function:hello*\"}]}"
    )]
    Create {
        /// The key's user name.
        user: String,
        /// The identity policy (IAM JSON).
        #[arg(long)]
        policy: PathBuf,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// List access keys (never their secrets).
    #[command(after_help = "Example:\n  kiln keys list --output json")]
    List {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Replace the master key: every stored data key is re-wrapped under a
    /// new one (code and chunks are not re-encrypted).
    #[command(after_help = "Example:\n  kiln keys rotate-master")]
    RotateMaster {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete an access key; requests signed with it are refused at once.
    #[command(after_help = "Example:\n  kiln keys delete AKIA...")]
    Delete {
        /// The access key id.
        access_key_id: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProvisionedCommand {
    /// Set COUNT environments for FUNCTION:QUALIFIER and wait until they
    /// are ready, showing progress.
    #[command(
        after_help = "Examples:\n  kiln provisioned set hello live 5\n  kiln provisioned set hello 3 10 --no-wait --output json"
    )]
    Set {
        /// The function's name.
        function: String,
        /// A published version or an alias (not $LATEST).
        qualifier: String,
        /// Environments to keep initialized (1 or more).
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
        /// Return once the setting is accepted, without waiting.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for READY before giving up (the setting stays).
        #[arg(long, default_value_t = 600)]
        wait_timeout: u64,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Show the setting and how many environments are ready.
    #[command(after_help = "Example:\n  kiln provisioned get hello live --output json")]
    Get {
        /// The function's name.
        function: String,
        /// A published version or an alias.
        qualifier: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Remove the setting; its environments are torn down.
    #[command(after_help = "Example:\n  kiln provisioned delete hello live")]
    Delete {
        /// The function's name.
        function: String,
        /// A published version or an alias.
        qualifier: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolesCommand {
    /// Create a role NAME with the identity policy in FILE.
    #[command(after_help = "Example:\n  kiln roles create worker --policy worker.json")]
    Create {
        /// The role's name.
        name: String,
        /// The identity policy (IAM JSON).
        #[arg(long)]
        policy: PathBuf,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// List roles.
    #[command(after_help = "Example:\n  kiln roles list")]
    List {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Delete a role; its sessions' credentials stop working.
    #[command(after_help = "Example:\n  kiln roles delete worker")]
    Delete {
        /// The role's name.
        name: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Refuse every credential issued to the role's sessions so far.
    #[command(after_help = "Example:\n  kiln roles revoke-sessions worker")]
    RevokeSessions {
        /// The role's name.
        name: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List a function's records (failed events, and successes routed here).
    #[command(
        after_help = "Examples:\n  kiln dlq list my-function\n  kiln dlq list my-function --condition RetriesExhausted --output json"
    )]
    List {
        /// The function.
        function: String,
        /// Only records with this condition (Success, RetriesExhausted, EventAgeExceeded).
        #[arg(long)]
        condition: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Print one record: Lambda's invocation record JSON.
    #[command(after_help = "Example:\n  kiln dlq show my-function 42")]
    Show {
        /// The function.
        function: String,
        /// The record's id (from `kiln dlq list`).
        id: i64,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Send records' events back to the function as new asynchronous invocations.
    #[command(
        after_help = "Examples:\n  kiln dlq redrive my-function\n  kiln dlq redrive my-function --id 42 --id 43"
    )]
    Redrive {
        /// The function.
        function: String,
        /// Only these records (default: all of the function's).
        #[arg(long = "id")]
        ids: Vec<i64>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address of the API.
    #[arg(long, env = "KILN_LISTEN", default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Where kiln keeps its state.
    #[arg(long, env = "KILN_DATA_DIR", default_value = ".kiln")]
    pub data_dir: PathBuf,
    /// Region in ARNs.
    #[arg(long, env = "KILN_REGION", default_value = "us-east-1")]
    pub region: String,
    /// Account id in ARNs (12 digits).
    #[arg(long, env = "KILN_ACCOUNT_ID", default_value = "000000000000")]
    pub account_id: String,
    /// Most execution environments alive at once.
    #[arg(long, default_value_t = 1000)]
    pub max_environments: u32,
    /// Seconds an idle environment is kept warm.
    #[arg(long, default_value_t = 600)]
    pub idle_timeout: u64,
    /// The account's concurrency limit.
    #[arg(long, default_value_t = 1000)]
    pub account_concurrency: u32,
    /// Seconds an environment may live (its lease); then it takes no new
    /// invocation and is shut down.
    #[arg(long, default_value_t = 14 * 3600)]
    pub env_lease: u64,
    /// Where Wasm functions run: `wasm` (wasmtime in the kiln process) or
    /// `jail` (the agent's wasmtime inside a jail, for defense in depth).
    #[arg(long, value_parser = ["wasm", "jail"], default_value = "wasm")]
    pub wasm_sandbox: String,
    /// The microVM guest kernel (`vmlinux` from scripts/build-kernel.sh).
    /// Functions run in microVMs when it boots here; else they fall back
    /// (see `kiln doctor`).
    #[arg(long, env = "KILN_GUEST_KERNEL")]
    pub guest_kernel: Option<PathBuf>,
    /// Multiplies every asynchronous wait (retries, backoff, event age):
    /// 0.01 runs Lambda's minutes in fractions of a second, for tests.
    #[arg(long, default_value_t = 1.0)]
    pub async_time_scale: f64,
    /// Seconds a request's SigV4 signing time may differ from the server's
    /// clock (AWS's window: 300).
    #[arg(long, env = "KILN_MAX_CLOCK_SKEW", default_value_t = 300)]
    pub max_clock_skew: u64,
    /// Seconds between signed digests of the audit trail (one is also
    /// written at shutdown).
    #[arg(long, default_value_t = 300)]
    pub audit_digest_interval: u64,
    /// Days function logs are kept (streams not written for longer go).
    #[arg(long, default_value_t = 7)]
    pub log_retention_days: u64,
    /// MiB of logs kept per function; its oldest streams go first.
    #[arg(long, default_value_t = 64)]
    pub log_retention_mb: u64,
    /// `off` keeps no function logs at rest, counts no metrics and no
    /// console activity (Tail and the REPORT line still work): for
    /// measuring what they cost.
    #[arg(long, value_parser = ["on", "off"], default_value = "on")]
    pub telemetry: String,
    /// Most API connections open at once (default: half the open-files
    /// limit). At the limit, the oldest connection that has not made a
    /// signed request is closed for a new one.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds a request head may take to arrive, and a kept-alive
    /// connection may stay idle.
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// MiB of memory all execution environments together may reserve (each
    /// its MemorySize); past it, invocations that need a new environment
    /// get 429. Default: 80 % of physical memory.
    #[arg(long)]
    pub memory_budget: Option<u64>,
    /// Processes all jailed environments together may run. Default: a
    /// quarter of the host's kernel.pid_max.
    #[arg(long)]
    pub max_pids: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The function's name.
    pub name: String,
    /// A zip built by `kiln build`, or a function crate to build.
    pub code: PathBuf,
    /// MemorySize in MB (128-10240).
    #[arg(long)]
    pub memory: Option<u32>,
    /// Timeout in seconds (1-900).
    #[arg(long)]
    pub timeout: Option<u32>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Execution role ARN for a new function.
    #[arg(long, default_value = "arn:aws:iam::000000000000:role/kiln-function")]
    pub role: String,
    /// Build a crate directory as a native bootstrap (provided.al2023)
    /// instead of a Wasm component.
    #[arg(long)]
    pub native: bool,
    /// The runtime of a new function (default: from the zip: wasip2 for
    /// function.wasm, provided.al2023 for bootstrap).
    #[arg(long)]
    pub runtime: Option<String>,
    #[command(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Debug, clap::Args)]
pub struct InvokeArgs {
    /// Function name or ARN, optionally with :qualifier.
    pub name: String,
    /// The event, as JSON.
    #[arg(long, default_value = "{}")]
    pub payload: String,
    /// Print the log tail of the invocation to stderr.
    #[arg(long)]
    pub log: bool,
    #[command(flatten)]
    pub endpoint: Endpoint,
}

/// Runs a client subcommand; `serve` is handled by the caller.
pub async fn run_client(command: Command) -> Result<i32> {
    match command {
        Command::Serve(_) => unreachable!("serve is not a client command"),
        Command::Vmm(_) => unreachable!("vmm runs without the async runtime"),
        Command::Doctor {
            data_dir,
            guest_kernel,
            output,
        } => doctor(&data_dir, guest_kernel, output).await,
        Command::Build {
            path,
            output,
            native,
        } => {
            let started = std::time::Instant::now();
            eprintln!(
                "building {} for {} (cargo reports its progress below)",
                path.display(),
                if native {
                    build::NATIVE_TARGET
                } else {
                    "wasm32-wasip2"
                }
            );
            let built = if native {
                build::build_native(&path, output.as_deref())?
            } else {
                build::build(&path, output.as_deref())?
            };
            eprintln!(
                "built {} ({} bytes) in {:.1} s: deploy it with `kiln deploy {} {}`",
                built.zip.display(),
                built.zip_size,
                started.elapsed().as_secs_f64(),
                built.name,
                built.zip.display()
            );
            Ok(0)
        }
        Command::Deploy(args) => deploy(args).await,
        Command::Dlq(command) => dlq(command).await,
        Command::Runtimes { output } => {
            runtimes(output);
            Ok(0)
        }
        Command::Invoke(args) => invoke(args).await,
        Command::Keys(command) => keys(command).await,
        Command::Roles(command) => roles(command).await,
        Command::Provisioned(command) => provisioned(command).await,
        Command::Audit(command) => audit(command),
        Command::Logs(args) => logs(args).await,
        Command::ConfigHistory { function, endpoint } => {
            let path = format!("/kiln/functions/{}/config-history", path_segment(&function));
            admin(&endpoint, reqwest::Method::GET, &path, None, |v| {
                v["Changes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        let config = &c["Configuration"];
                        let state = if config.is_null() {
                            "deleted".to_owned()
                        } else {
                            format!(
                                "version {} memory {} timeout {} code {}",
                                config["Version"].as_str().unwrap_or("?"),
                                config["MemorySize"],
                                config["Timeout"],
                                config["CodeSha256"].as_str().unwrap_or("?")
                            )
                        };
                        format!(
                            "{} {:<28} {:<45} {state}",
                            c["Time"].as_str().unwrap_or(""),
                            c["Action"].as_str().unwrap_or(""),
                            c["Principal"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .await
        }
    }
}

fn audit(command: AuditCommand) -> Result<i32> {
    use kiln::audit;
    match command {
        AuditCommand::Verify {
            data_dir,
            public_key,
            output,
        } => {
            let key = public_key
                .map(|p| -> Result<Vec<u8>> {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    Ok(audit::parse_public_key(text.trim())?)
                })
                .transpose()?;
            let report = audit::verify(&data_dir.join("audit"), key.as_deref())?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Text => {
                    for p in &report.problems {
                        println!("{p}");
                    }
                    println!(
                        "{} records, {} digests, key {}: {}",
                        report.records,
                        report.digests,
                        report.key,
                        if report.problems.is_empty() {
                            "intact".to_owned()
                        } else {
                            format!("{} problems", report.problems.len())
                        }
                    );
                    if let Some((first, last)) = report.uncovered {
                        println!("records {first}-{last} are not yet covered by a signed digest");
                    }
                }
            }
            Ok(i32::from(!report.problems.is_empty()))
        }
        AuditCommand::List {
            data_dir,
            function,
            principal,
            action,
            since,
            until,
            output,
        } => {
            let time = |t: Option<String>| -> Result<Option<time::OffsetDateTime>> {
                t.map(|t| {
                    time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                        .with_context(|| format!("{t:?} is not an RFC 3339 time"))
                })
                .transpose()
            };
            let filter = audit::Filter {
                function,
                principal,
                action,
                since: time(since)?,
                until: time(until)?,
            };
            let records = audit::list(&data_dir.join("audit"), &filter)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&records)?),
                Output::Text => {
                    for r in &records {
                        println!(
                            "{:>6} {} {:<28} {:<45} {} {} {}",
                            r.seq,
                            r.time,
                            r.action,
                            r.principal,
                            r.status,
                            r.resource,
                            r.error.as_deref().unwrap_or("")
                        );
                    }
                }
            }
            Ok(0)
        }
    }
}

/// Sends one admin request and prints its answer (`text`: the lines
/// `render` makes of it).
/// `30s`, `10m`, `2h`, `7d` as a duration.
fn parse_since(text: &str) -> Result<std::time::Duration> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .with_context(|| format!("--since {text:?}: expected a number and a unit, as in 10m"))?;
    let seconds = match unit {
        "s" => 1,
        "m" | "" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => anyhow::bail!("--since {text:?}: unknown unit {other:?} (use s, m, h or d)"),
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(seconds)))
}

async fn logs(args: LogsArgs) -> Result<i32> {
    let client = Client::new(&args.endpoint)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut since = match &args.since {
        Some(s) => Some(now_ms - parse_since(s)?.as_millis() as i64),
        None => None,
    };
    // Events at `since` already printed: the next poll returns them again.
    let mut printed_at_since = 0usize;
    let mut limit = args.limit.clamp(1, 10_000);
    loop {
        let mut query = vec![format!("limit={limit}")];
        if let Some(s) = since {
            query.push(format!("since={s}"));
        }
        if let Some(f) = &args.filter {
            query.push(format!("filter={}", path_segment(f)));
        }
        if let Some(id) = &args.request_id {
            query.push(format!("requestId={}", path_segment(id)));
        }
        let path = format!(
            "/kiln/functions/{}/logs?{}",
            path_segment(&args.function),
            query.join("&")
        );
        let response = client
            .send(reqwest::Method::GET, &path, &[], Vec::new())
            .await?
            .into_success()?;
        let body = response.json()?;
        let events = body["Events"].as_array().cloned().unwrap_or_default();
        let mut skip = printed_at_since;
        for event in &events {
            let at = event["timestamp"].as_i64().unwrap_or(0);
            if Some(at) == since && skip > 0 {
                skip -= 1;
                continue;
            }
            if Some(at) == since {
                printed_at_since += 1;
            } else {
                since = Some(at);
                printed_at_since = 1;
            }
            match args.endpoint.output {
                Output::Json => println!("{}", serde_json::to_string(event)?),
                Output::Text => println!(
                    "{} {} {}",
                    format_ms(at),
                    event["logStreamName"].as_str().unwrap_or(""),
                    event["message"].as_str().unwrap_or("")
                ),
            }
        }
        if !args.follow {
            return Ok(0);
        }
        // Following: everything new, a poll a second.
        limit = 10_000;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC.
fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(kiln::control::model::RFC3339_MILLIS).ok())
        .unwrap_or_else(|| ms.to_string())
}

fn provisioned_line(v: &Value) -> String {
    format!(
        "{} ready of {} requested ({} allocated){}",
        v["AvailableProvisionedConcurrentExecutions"],
        v["RequestedProvisionedConcurrentExecutions"],
        v["AllocatedProvisionedConcurrentExecutions"],
        match v["Status"].as_str() {
            Some(status) => format!(": {status}"),
            None => String::new(),
        }
    )
}

async fn provisioned(command: ProvisionedCommand) -> Result<i32> {
    use reqwest::Method;
    let path = |function: &str, qualifier: &str| {
        format!(
            "/2019-09-30/functions/{}/provisioned-concurrency?Qualifier={}",
            path_segment(function),
            path_segment(qualifier)
        )
    };
    match command {
        ProvisionedCommand::Get {
            function,
            qualifier,
            endpoint,
        } => {
            admin(
                &endpoint,
                Method::GET,
                &path(&function, &qualifier),
                None,
                |v| vec![provisioned_line(v)],
            )
            .await
        }
        ProvisionedCommand::Delete {
            function,
            qualifier,
            endpoint,
        } => {
            admin(
                &endpoint,
                Method::DELETE,
                &path(&function, &qualifier),
                None,
                |_| {
                    vec![format!(
                        "removed provisioned concurrency of {function}:{qualifier}"
                    )]
                },
            )
            .await
        }
        ProvisionedCommand::Set {
            function,
            qualifier,
            count,
            no_wait,
            wait_timeout,
            endpoint,
        } => {
            let client = Client::new(&endpoint)?;
            let url = path(&function, &qualifier);
            let body = serde_json::to_vec(&json!({ "ProvisionedConcurrentExecutions": count }))?;
            let mut state = client
                .send(Method::PUT, &url, &[], body)
                .await?
                .into_success()?
                .json()?;
            if !no_wait {
                let bar = progress::counter(
                    u64::from(count),
                    format!("{function}:{qualifier} environments ready"),
                );
                let deadline =
                    std::time::Instant::now() + std::time::Duration::from_secs(wait_timeout);
                loop {
                    let ready = state["AvailableProvisionedConcurrentExecutions"]
                        .as_u64()
                        .unwrap_or(0);
                    bar.set_position(ready.min(u64::from(count)));
                    match state["Status"].as_str() {
                        Some("READY") => break,
                        Some("FAILED") => {
                            bar.abandon();
                            bail!(
                                "provisioned concurrency of {function}:{qualifier} failed: {}",
                                state["StatusReason"].as_str().unwrap_or("no reason given")
                            );
                        }
                        _ => {}
                    }
                    if std::time::Instant::now() >= deadline {
                        bar.abandon();
                        bail!(
                            "{function}:{qualifier} was not READY after {wait_timeout} s ({}); \
                             the setting stays: see `kiln provisioned get {function} {qualifier}`",
                            provisioned_line(&state)
                        );
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    state = client
                        .send(Method::GET, &url, &[], vec![])
                        .await?
                        .into_success()?
                        .json()?;
                }
                bar.finish();
            }
            match endpoint.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&state)?),
                Output::Text => println!("{function}:{qualifier}: {}", provisioned_line(&state)),
            }
            Ok(0)
        }
    }
}

async fn admin(
    endpoint: &Endpoint,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    render: impl FnOnce(&Value) -> Vec<String>,
) -> Result<i32> {
    let client = Client::new(endpoint)?;
    let body = body
        .map(|b| serde_json::to_vec(&b))
        .transpose()?
        .unwrap_or_default();
    let response = client.send(method, path, &[], body).await?.into_success()?;
    let value = if response.body.is_empty() {
        Value::Null
    } else {
        response.json()?
    };
    match endpoint.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Output::Text => render(&value).iter().for_each(|l| println!("{l}")),
    }
    Ok(0)
}

fn read_policy(path: &std::path::Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the policy {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

async fn keys(command: KeysCommand) -> Result<i32> {
    use reqwest::Method;
    match command {
        KeysCommand::Create {
            user,
            policy,
            endpoint,
        } => {
            let body = json!({ "UserName": user, "PolicyDocument": read_policy(&policy)? });
            admin(&endpoint, Method::POST, "/kiln/keys", Some(body), |v| {
                let k = &v["AccessKey"];
                vec![
                    format!(
                        "created an access key for {}",
                        k["UserName"].as_str().unwrap_or("")
                    ),
                    format!(
                        "AWS_ACCESS_KEY_ID={}",
                        k["AccessKeyId"].as_str().unwrap_or("")
                    ),
                    format!(
                        "AWS_SECRET_ACCESS_KEY={}",
                        k["SecretAccessKey"].as_str().unwrap_or("")
                    ),
                    "(the secret is shown only now)".to_owned(),
                ]
            })
            .await
        }
        KeysCommand::List { endpoint } => {
            admin(&endpoint, Method::GET, "/kiln/keys", None, |v| {
                let mut lines = vec![format!(
                    "{:<24} {:<20} {}",
                    "ACCESS KEY ID", "USER", "CREATED"
                )];
                for k in v["AccessKeys"].as_array().into_iter().flatten() {
                    lines.push(format!(
                        "{:<24} {:<20} {}",
                        k["AccessKeyId"].as_str().unwrap_or(""),
                        k["UserName"].as_str().unwrap_or(""),
                        k["CreateDate"].as_str().unwrap_or("")
                    ));
                }
                lines
            })
            .await
        }
        KeysCommand::RotateMaster { endpoint } => {
            admin(
                &endpoint,
                Method::POST,
                "/kiln/master-key/rotate",
                None,
                |v| {
                    vec![format!(
                        "master key {} replaced by {}: {} data keys re-wrapped",
                        v["OldKeyId"].as_str().unwrap_or(""),
                        v["NewKeyId"].as_str().unwrap_or(""),
                        v["BlobsRewrapped"]
                    )]
                },
            )
            .await
        }
        KeysCommand::Delete {
            access_key_id,
            endpoint,
        } => {
            let path = format!("/kiln/keys/{}", path_segment(&access_key_id));
            admin(&endpoint, Method::DELETE, &path, None, |_| {
                vec![format!("deleted {access_key_id}")]
            })
            .await
        }
    }
}

async fn roles(command: RolesCommand) -> Result<i32> {
    use reqwest::Method;
    match command {
        RolesCommand::Create {
            name,
            policy,
            endpoint,
        } => {
            let body = json!({ "RoleName": name, "PolicyDocument": read_policy(&policy)? });
            admin(&endpoint, Method::POST, "/kiln/roles", Some(body), |v| {
                vec![format!(
                    "created role {}: use it as a function's Role",
                    v["Role"]["Arn"].as_str().unwrap_or("")
                )]
            })
            .await
        }
        RolesCommand::List { endpoint } => {
            admin(&endpoint, Method::GET, "/kiln/roles", None, |v| {
                v["Roles"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| r["Arn"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .await
        }
        RolesCommand::Delete { name, endpoint } => {
            let path = format!("/kiln/roles/{}", path_segment(&name));
            admin(&endpoint, Method::DELETE, &path, None, |_| {
                vec![format!("deleted role {name}")]
            })
            .await
        }
        RolesCommand::RevokeSessions { name, endpoint } => {
            let path = format!("/kiln/roles/{}/revoke-sessions", path_segment(&name));
            admin(&endpoint, Method::POST, &path, None, |_| {
                vec![format!("revoked every session of {name} issued so far")]
            })
            .await
        }
    }
}

async fn deploy(args: DeployArgs) -> Result<i32> {
    let zip = if args.code.is_dir() {
        let out = std::env::temp_dir().join(format!("kiln-deploy-{}.zip", std::process::id()));
        let built = if args.native {
            build::build_native(&args.code, Some(&out))?
        } else {
            build::build(&args.code, Some(&out))?
        };
        let bytes = std::fs::read(&built.zip)?;
        let _ = std::fs::remove_file(&built.zip);
        bytes
    } else {
        std::fs::read(&args.code).with_context(|| format!("reading {}", args.code.display()))?
    };
    let mut variables = serde_json::Map::new();
    for pair in &args.env {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("--env {pair:?} is not KEY=VALUE");
        };
        variables.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    // The settings given on the command line, as configuration members.
    let mut settings = json!({});
    if let Some(m) = args.memory {
        settings["MemorySize"] = m.into();
    }
    if let Some(t) = args.timeout {
        settings["Timeout"] = t.into();
    }
    if !variables.is_empty() {
        settings["Environment"] = json!({ "Variables": variables });
    }
    let client = Client::new(&args.endpoint)?;
    let name = path_segment(&args.name);
    let zip_b64 = base64::engine::general_purpose::STANDARD.encode(&zip);
    let existing = client
        .send(
            reqwest::Method::GET,
            &format!("/2015-03-31/functions/{name}"),
            &[],
            vec![],
        )
        .await?;
    let config = if existing.status == 404 {
        let native = zip_holds(&zip, kiln::package::BOOTSTRAP_IN_ZIP);
        let runtime = args.runtime.clone().unwrap_or_else(|| {
            if native {
                "provided.al2023".into()
            } else {
                "wasip2".into()
            }
        });
        let mut body = settings.clone();
        body["FunctionName"] = args.name.clone().into();
        body["Runtime"] = runtime.into();
        body["Role"] = args.role.clone().into();
        body["Handler"] = if native {
            "bootstrap".into()
        } else {
            build::COMPONENT_IN_ZIP.into()
        };
        body["Code"] = json!({ "ZipFile": zip_b64 });
        client
            .send(
                reqwest::Method::POST,
                "/2015-03-31/functions",
                &[],
                serde_json::to_vec(&body)?,
            )
            .await?
            .into_success()?
            .json()?
    } else {
        existing.into_success()?;
        let mut config = client
            .send(
                reqwest::Method::PUT,
                &format!("/2015-03-31/functions/{name}/code"),
                &[],
                serde_json::to_vec(&json!({ "ZipFile": zip_b64 }))?,
            )
            .await?
            .into_success()?
            .json()?;
        if settings.as_object().is_some_and(|o| !o.is_empty()) {
            config = client
                .send(
                    reqwest::Method::PUT,
                    &format!("/2015-03-31/functions/{name}/configuration"),
                    &[],
                    serde_json::to_vec(&settings)?,
                )
                .await?
                .into_success()?
                .json()?;
        }
        config
    };
    match args.endpoint.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&config)?),
        Output::Text => println!(
            "deployed {} ({} bytes, CodeSha256 {}, {} MB, {} s timeout)",
            config["FunctionArn"].as_str().unwrap_or(&args.name),
            config["CodeSize"],
            config["CodeSha256"].as_str().unwrap_or_default(),
            config["MemorySize"],
            config["Timeout"],
        ),
    }
    Ok(0)
}

async fn dlq(command: DlqCommand) -> Result<i32> {
    match command {
        DlqCommand::List {
            function,
            condition,
            endpoint,
        } => {
            let client = Client::new(&endpoint)?;
            let mut records = Vec::new();
            let mut marker: Option<String> = None;
            loop {
                let mut path = format!(
                    "/kiln/queue/{}/records?MaxItems=1000",
                    path_segment(&function)
                );
                if let Some(c) = &condition {
                    path.push_str(&format!("&Condition={}", path_segment(c)));
                }
                if let Some(m) = &marker {
                    path.push_str(&format!("&Marker={m}"));
                }
                let page = client
                    .send(reqwest::Method::GET, &path, &[], vec![])
                    .await?
                    .into_success()?
                    .json()?;
                records.extend(page["Records"].as_array().cloned().unwrap_or_default());
                marker = page["NextMarker"].as_str().map(str::to_owned);
                if marker.is_none() {
                    break;
                }
            }
            match endpoint.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&records)?),
                Output::Text => {
                    println!(
                        "{:<8} {:<18} {:<38} {:<6} CREATED",
                        "ID", "CONDITION", "REQUEST ID", "TRIES"
                    );
                    for r in &records {
                        let created = time::OffsetDateTime::from_unix_timestamp_nanos(
                            i128::from(r["created_ms"].as_i64().unwrap_or(0)) * 1_000_000,
                        )
                        .map(|t| t.to_string())
                        .unwrap_or_default();
                        println!(
                            "{:<8} {:<18} {:<38} {:<6} {created}",
                            r["id"],
                            r["condition"].as_str().unwrap_or_default(),
                            r["request_id"].as_str().unwrap_or_default(),
                            r["record"]["requestContext"]["approximateInvokeCount"],
                        );
                    }
                    eprintln!("{} records", records.len());
                }
            }
            Ok(0)
        }
        DlqCommand::Show {
            function,
            id,
            endpoint,
        } => {
            let client = Client::new(&endpoint)?;
            let record = client
                .send(
                    reqwest::Method::GET,
                    &format!("/kiln/queue/{}/records/{id}", path_segment(&function)),
                    &[],
                    vec![],
                )
                .await?
                .into_success()?
                .json()?;
            let doc = match endpoint.output {
                Output::Json => record,
                Output::Text => record["record"].clone(),
            };
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(0)
        }
        DlqCommand::Redrive {
            function,
            ids,
            endpoint,
        } => {
            let client = Client::new(&endpoint)?;
            let body = if ids.is_empty() {
                json!({})
            } else {
                json!({ "Ids": ids })
            };
            let result = client
                .send(
                    reqwest::Method::POST,
                    &format!("/kiln/queue/{}/redrive", path_segment(&function)),
                    &[],
                    serde_json::to_vec(&body)?,
                )
                .await?
                .into_success()?
                .json()?;
            match endpoint.output {
                Output::Json => println!("{result}"),
                Output::Text => println!("{} events sent back to {function}", result["Redriven"]),
            }
            Ok(0)
        }
    }
}

async fn doctor(
    data_dir: &std::path::Path,
    guest_kernel: Option<PathBuf>,
    output: Output,
) -> Result<i32> {
    let report = kiln::doctor::examine(data_dir, guest_kernel.as_deref()).await;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => {
            for s in &report.sandboxes {
                println!(
                    "{:<8} {:<4} {}",
                    s.name,
                    if s.available { "yes" } else { "no" },
                    s.detail
                );
            }
            let l = &report.limits;
            println!(
                "memory budget of all environments: {} MiB ({}; kiln serve --memory-budget)",
                l.memory_budget_mb,
                l.physical_memory_mb.map_or_else(
                    || "physical memory unknown".to_owned(),
                    |p| format!("80 % of {p} MiB")
                )
            );
            println!(
                "processes of all jailed environments: {} (a quarter of pid_max {}; kiln serve --max-pids)",
                l.max_pids, l.host_pid_max
            );
        }
    }
    Ok(0)
}

fn runtimes(output: Output) {
    let rows = kiln::control::runtimes::table(time::OffsetDateTime::now_utc().date());
    match output {
        Output::Json => {
            let doc: Vec<Value> = rows
                .iter()
                .map(|[id, state, deprecation, create, update, description]| {
                    json!({
                        "Runtime": id,
                        "State": state,
                        "DeprecationDate": deprecation,
                        "BlockFunctionCreateDate": create,
                        "BlockFunctionUpdateDate": update,
                        "Description": description,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
        Output::Text => {
            println!(
                "{:<16} {:<40} {:<12} {:<14} {:<14} DESCRIPTION",
                "RUNTIME", "STATE", "DEPRECATED", "CREATE BLOCKED", "UPDATE BLOCKED"
            );
            for [id, state, deprecation, create, update, description] in rows {
                println!(
                    "{id:<16} {state:<40} {deprecation:<12} {create:<14} {update:<14} {description}"
                );
            }
        }
    }
}

/// Whether a zip has an entry named `name`.
fn zip_holds(zip: &[u8], name: &str) -> bool {
    zip::ZipArchive::new(std::io::Cursor::new(zip))
        .map(|mut a| a.by_name(name).is_ok())
        .unwrap_or(false)
}

async fn invoke(args: InvokeArgs) -> Result<i32> {
    if let Err(e) = serde_json::from_str::<Value>(&args.payload) {
        bail!("--payload is not JSON: {e}");
    }
    let client = Client::new(&args.endpoint)?;
    let mut headers = vec![];
    if args.log || args.endpoint.output == Output::Json {
        headers.push(("x-amz-log-type", "Tail"));
    }
    let response = client
        .send(
            reqwest::Method::POST,
            &format!(
                "/2015-03-31/functions/{}/invocations",
                path_segment(&args.name)
            ),
            &headers,
            args.payload.into_bytes(),
        )
        .await?
        .into_success()?;
    let function_error = response.header("x-amz-function-error").map(str::to_owned);
    let log = response
        .header("x-amz-log-result")
        .and_then(|l| base64::engine::general_purpose::STANDARD.decode(l).ok())
        .map(|l| String::from_utf8_lossy(&l).into_owned());
    match args.endpoint.output {
        Output::Json => {
            let payload = serde_json::from_slice::<Value>(&response.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&response.body).into()));
            let doc = json!({
                "StatusCode": response.status,
                "ExecutedVersion": response.header("x-amz-executed-version"),
                "FunctionError": function_error,
                "Payload": payload,
                "Log": log,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Output::Text => {
            if let Some(log) = &log {
                eprint!("{log}");
            }
            println!("{}", String::from_utf8_lossy(&response.body));
            if let Some(kind) = &function_error {
                eprintln!("the function failed ({kind})");
            }
        }
    }
    Ok(if function_error.is_some() { 1 } else { 0 })
}

/// The idle timeout as a duration.
pub fn idle_timeout(args: &ServeArgs) -> Duration {
    Duration::from_secs(args.idle_timeout.max(1))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Every command a user runs has examples in its --help, and every one
    /// that answers (all but the server and the build, whose --output is the
    /// zip) can answer in JSON for scripts.
    #[test]
    fn every_command_has_examples_and_json_output() {
        fn leaves(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
            if cmd.is_hide_set() {
                return;
            }
            if cmd.get_subcommands().next().is_none() {
                out.push((path, cmd.clone()));
                return;
            }
            for sub in cmd.get_subcommands() {
                leaves(sub, format!("{path} {}", sub.get_name()), out);
            }
        }
        let mut all = Vec::new();
        leaves(&super::Cli::command(), "kiln".to_owned(), &mut all);
        assert!(all.len() > 15, "{}", all.len());
        for (path, cmd) in all {
            if path == "kiln help" || path.starts_with("kiln help ") {
                continue;
            }
            let examples = cmd
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(
                examples.contains("Example") && examples.contains(&path),
                "{path}: its --help needs examples that run it"
            );
            if path == "kiln serve" || path == "kiln build" {
                continue;
            }
            let output = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some("output"))
                .unwrap_or_else(|| panic!("{path} has no --output"));
            let values: Vec<String> = output
                .get_possible_values()
                .iter()
                .map(|v| v.get_name().to_owned())
                .collect();
            assert!(values.contains(&"json".to_owned()), "{path}: --output json");
        }
    }
}
