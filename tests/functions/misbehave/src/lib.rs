//! Test fixture: does what the event's `action` says, including everything a
//! hostile or broken function might do. Never deploy it anywhere real.
//!
//! Init reads `INIT_ACTION` from the environment: `fail` returns an error,
//! `panic` panics, `spin` never returns.

use kiln_sdk::{Context, Error};

mod call_kiln;
use call_kiln::call_kiln;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

#[derive(Deserialize)]
struct Request {
    action: String,
    #[serde(default)]
    arg: Value,
}

#[kiln_sdk::handler(init = init)]
fn run(event: Request, ctx: &Context) -> Result<Value, Error> {
    match event.action.as_str() {
        "echo" => Ok(event.arg),
        "context" => Ok(json!({
            "request_id": ctx.request_id,
            "deadline_ms": ctx.deadline_ms,
            "function_name": ctx.function_name,
            "function_version": ctx.function_version,
            "invoked_function_arn": ctx.invoked_function_arn,
            "memory_limit_mb": ctx.memory_limit_mb,
            "trace_id": ctx.trace_id,
            "client_context": ctx.client_context,
            "remaining_ms": ctx.remaining_time().as_millis() as u64,
        })),
        "env" => Ok(json!(
            std::env::vars().collect::<std::collections::BTreeMap<_, _>>()
        )),
        "invoke" => Ok(call_kiln(&event.arg)),
        "error" => Err(Error::new("Custom", "requested failure")),
        "panic" => panic!("boom: {}", event.arg),
        "print_spin" => {
            println!("still working on {}", ctx.request_id);
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "spin" => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "sleep" => {
            std::thread::sleep(Duration::from_millis(event.arg.as_u64().unwrap_or(1000)));
            Ok(json!("slept"))
        }
        "grow" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "exit" => std::process::exit(event.arg.as_i64().unwrap_or(3) as i32),
        "print" => {
            let n = event.arg.as_u64().unwrap_or(10) as usize;
            let line = "x".repeat(1023);
            for _ in 0..n {
                println!("{line}");
            }
            eprintln!("done printing");
            Ok(json!(n))
        }
        "log" => {
            kiln_sdk::log::info_with("structured", &[("key", "value")]);
            Ok(json!("logged"))
        }
        "read" => {
            let path = event.arg.as_str().unwrap_or("/etc/passwd");
            match std::fs::read_to_string(path) {
                Ok(s) => Ok(json!({"ok": s})),
                Err(e) => Ok(json!({"err": e.to_string()})),
            }
        }
        "write" => {
            let path = event.arg.as_str().unwrap_or("/var/task/x");
            match std::fs::write(path, b"data") {
                Ok(()) => Ok(json!({"ok": true})),
                Err(e) => Ok(json!({"err": e.to_string()})),
            }
        }
        "tmp_count" => {
            let n: u64 = std::fs::read_to_string("/tmp/count")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
                + 1;
            std::fs::write("/tmp/count", n.to_string())?;
            Ok(json!(n))
        }
        "whoami" => {
            std::thread::sleep(Duration::from_millis(event.arg.as_u64().unwrap_or(0)));
            let n: u64 = std::fs::read_to_string("/tmp/whoami")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
                + 1;
            std::fs::write("/tmp/whoami", n.to_string())?;
            Ok(json!({
                "stream": std::env::var("AWS_LAMBDA_LOG_STREAM_NAME").unwrap_or_default(),
                "count": n,
            }))
        }
        "big" => Ok(json!("y".repeat(event.arg.as_u64().unwrap_or(0) as usize))),
        // Writes `arg` MiB to /tmp/fill: how far it got, and why not further.
        "fill_tmp" => {
            use std::io::Write as _;
            let chunk = vec![7u8; 1 << 20];
            let mut written = 0u64;
            let result = std::fs::File::create("/tmp/fill").and_then(|mut f| {
                for _ in 0..event.arg.as_u64().unwrap_or(1) {
                    f.write_all(&chunk)?;
                    written += 1;
                }
                f.flush()
            });
            Ok(match result {
                Ok(()) => json!({"mib": written}),
                Err(e) => {
                    json!({"mib": written, "error": format!("{:?}", e.kind()), "message": e.to_string()})
                }
            })
        }
        other => Err(Error::new(
            "UnknownAction",
            format!("no action named {other}"),
        )),
    }
}

fn init() -> Result<(), Error> {
    match std::env::var("INIT_ACTION").as_deref() {
        Ok("fail") => Err(Error::new("InitFailed", "INIT_ACTION asked init to fail")),
        Ok("panic") => panic!("init panicked on request"),
        Ok("spin") => loop {
            std::hint::black_box(0);
        },
        _ => Ok(()),
    }
}
