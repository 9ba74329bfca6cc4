//! Test fixture: a Lambda custom runtime written with nothing but the
//! standard library, so that it can also speak the Runtime API badly. Does
//! what the event's `action` says, including everything a hostile function
//! might try. Never deploy it anywhere real.
//!
//! `INIT_ACTION` in the environment: `fail` reports an init error, `exit`
//! exits during init.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> String {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
}

fn api() -> String {
    std::env::var("AWS_LAMBDA_RUNTIME_API").unwrap_or_else(|_| "127.0.0.1:9001".into())
}

/// Sends raw bytes and reads one response (the connection is closed after).
fn raw(request: &[u8]) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(api())?;
    stream.write_all(request)?;
    let mut data = Vec::new();
    stream.read_to_end(&mut data)?;
    let split = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&data[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: data[split + 4..].to_vec(),
    })
}

fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut req = format!(
        "{method} /2018-06-01/runtime{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        api(),
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    raw(&bytes)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn main() {
    match std::env::var("INIT_ACTION").as_deref() {
        Ok("fail") => {
            let _ = request(
                "POST",
                "/init/error",
                &[("Lambda-Runtime-Function-Error-Type", "Fixture.InitFailed")],
                br#"{"errorMessage":"INIT_ACTION asked init to fail","errorType":"Fixture.InitFailed"}"#,
            );
            std::process::exit(1);
        }
        Ok("exit") => std::process::exit(7),
        _ => {}
    }
    println!("native-misbehave starting");
    loop {
        let next = match request("GET", "/invocation/next", &[], b"") {
            Ok(r) => r,
            Err(e) => {
                eprintln!("next: {e}");
                std::process::exit(1);
            }
        };
        let id = next.header("Lambda-Runtime-Aws-Request-Id");
        let event: Value = serde_json::from_slice(&next.body).unwrap_or(Value::Null);
        let arg = event["arg"].clone();
        let result: Result<Value, (String, String)> = match event["action"].as_str().unwrap_or("") {
            "echo" => Ok(arg),
            "context" => Ok(json!({
                "request_id": id,
                "deadline_ms": next.header("Lambda-Runtime-Deadline-Ms"),
                "invoked_function_arn": next.header("Lambda-Runtime-Invoked-Function-Arn"),
                "trace_id": next.header("Lambda-Runtime-Trace-Id"),
                "client_context": next.header("Lambda-Runtime-Client-Context"),
            })),
            "env" => Ok(json!(
                std::env::vars().collect::<std::collections::BTreeMap<_, _>>()
            )),
            "invoke" => Ok(call_kiln(&arg)),
            "whoami" => {
                let count: u64 = std::fs::read_to_string("/tmp/count")
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0)
                    + 1;
                let written = std::fs::write("/tmp/count", count.to_string()).is_ok();
                // SAFETY: plain getters.
                let (uid, pid) = unsafe { (libc::getuid(), libc::getpid()) };
                Ok(json!({
                    "count": count,
                    "written": written,
                    "uid": uid,
                    "pid": pid,
                    "stream": std::env::var("AWS_LAMBDA_LOG_STREAM_NAME").unwrap_or_default(),
                    "hostname": std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(),
                }))
            }
            "error" => Err(("Fixture.Custom".into(), "requested failure".into())),
            // A JSON string of `arg` characters (`arg` + 2 bytes with its quotes).
            "big" => Ok(json!("y".repeat(arg.as_u64().unwrap_or(0) as usize))),
            "exit" => std::process::exit(arg.as_i64().unwrap_or(3) as i32),
            "sleep" => {
                std::thread::sleep(Duration::from_millis(arg.as_u64().unwrap_or(1000)));
                Ok(json!("slept"))
            }
            // Writes `arg` MiB to /tmp/fill: how far it got, and why not further.
            "fill_tmp" => Ok(fill_tmp(arg.as_u64().unwrap_or(1))),
            // Leaves a child spinning on the CPU after answering, named
            // `arg` (as /proc/PID/comm shows it) for the host to find.
            "spin_child" => {
                let name =
                    std::ffi::CString::new(arg.as_str().unwrap_or("kspin")).unwrap_or_default();
                let mut named = [0i32; 2];
                // SAFETY: pipe writes two descriptors into the array.
                unsafe { libc::pipe(named.as_mut_ptr()) };
                // SAFETY: the child only names itself, says so and spins;
                // it never returns into the runtime.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: PR_SET_NAME reads a NUL-terminated string;
                    // the write is of a live byte.
                    unsafe {
                        libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
                        libc::write(named[1], b"n".as_ptr().cast(), 1);
                    }
                    let mut x: u64 = 0;
                    loop {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                }
                // Answer once the child has its name: the host looks for it.
                let mut byte = [0u8; 1];
                // SAFETY: a read into a live byte, then closing our ends.
                unsafe {
                    libc::read(named[0], byte.as_mut_ptr().cast(), 1);
                    libc::close(named[0]);
                    libc::close(named[1]);
                }
                Ok(json!({"child": pid}))
            }
            // Opens `arg.n` connections to kiln's API relay, sends half a
            // request head on each, holds them `arg.ms`.
            "hold_relay" => {
                let relay = std::env::var("AWS_ENDPOINT_URL_LAMBDA").unwrap_or_default();
                let addr = relay.trim_start_matches("http://").to_owned();
                let mut held = Vec::new();
                for _ in 0..arg["n"].as_u64().unwrap_or(64) {
                    if let Ok(mut c) = TcpStream::connect(&addr) {
                        let _ =
                            c.write_all(b"POST /2015-03-31/functions HTTP/1.1\r\nHost: kiln\r\n");
                        held.push(c);
                    }
                }
                std::thread::sleep(Duration::from_millis(arg["ms"].as_u64().unwrap_or(3000)));
                Ok(json!({"held": held.len()}))
            }
            // Says something, then overruns its Timeout.
            "print_sleep" => {
                println!("still working on {id}");
                let _ = std::io::stdout().flush();
                std::thread::sleep(Duration::from_millis(arg.as_u64().unwrap_or(60_000)));
                Ok(json!("slept"))
            }
            "grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![7u8; 8 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "flood" => {
                let line = "z".repeat(1023);
                let mut out = std::io::stdout().lock();
                for _ in 0..arg.as_u64().unwrap_or(1) * 1024 {
                    let _ = writeln!(out, "{line}");
                }
                Ok(json!("flooded"))
            }
            "fork_bomb" => {
                let mut forks = 0u64;
                let mut last_errno = 0;
                for _ in 0..100_000 {
                    // SAFETY: the child only sleeps and exits.
                    let pid = unsafe { libc::fork() };
                    if pid == 0 {
                        std::thread::sleep(Duration::from_secs(3));
                        // SAFETY: ending the child.
                        unsafe { libc::_exit(0) };
                    }
                    if pid < 0 {
                        last_errno = errno();
                        break;
                    }
                    forks += 1;
                }
                Ok(json!({"forks": forks, "errno": last_errno}))
            }
            "write" => {
                let path = arg.as_str().unwrap_or("/var/task/x");
                Ok(match std::fs::write(path, b"data") {
                    Ok(()) => json!({"ok": true}),
                    Err(e) => json!({"err": e.to_string(), "errno": e.raw_os_error()}),
                })
            }
            "read" => {
                let path = arg.as_str().unwrap_or("/etc/shadow");
                Ok(match std::fs::read_to_string(path) {
                    Ok(s) => json!({"ok": s}),
                    Err(e) => json!({"err": e.to_string()}),
                })
            }
            "ls" => {
                let path = arg.as_str().unwrap_or("/");
                Ok(match std::fs::read_dir(path) {
                    Ok(entries) => {
                        let mut names: Vec<String> = entries
                            .flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect();
                        names.sort();
                        json!({"ok": names})
                    }
                    Err(e) => json!({"err": e.to_string()}),
                })
            }
            // Every descriptor the runtime holds, with what it is (the
            // directory being listed is left out), and what writing to
            // the ones the event names does.
            "fds" => {
                let mut open = serde_json::Map::new();
                if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
                    let listing = std::fs::read_link("/proc/self/fd")
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    for e in entries.flatten() {
                        let target = std::fs::read_link(e.path())
                            .map(|p| p.display().to_string())
                            .unwrap_or_default();
                        if target.ends_with("/fd") || target == listing {
                            continue;
                        }
                        open.insert(e.file_name().to_string_lossy().into_owned(), json!(target));
                    }
                }
                let mut writes = serde_json::Map::new();
                for fd in arg
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_i64)
                {
                    let data = b"forged by the function\n";
                    // SAFETY: a write of a live buffer to a descriptor
                    // number that may or may not be open.
                    let n = unsafe { libc::write(fd as i32, data.as_ptr().cast(), data.len()) };
                    writes.insert(
                        fd.to_string(),
                        json!(if n < 0 { -errno() } else { n as i32 }),
                    );
                }
                Ok(json!({"open": open, "writes": writes}))
            }
            "interfaces" => Ok(json!(
                std::fs::read_to_string("/proc/net/dev").unwrap_or_default()
            )),
            "connect" => {
                let addr = format!("127.0.0.1:{}", arg.as_u64().unwrap_or(1));
                Ok(
                    match TcpStream::connect_timeout(
                        &addr.parse().expect("address"),
                        Duration::from_secs(2),
                    ) {
                        Ok(_) => json!({"ok": true}),
                        Err(e) => json!({"err": e.to_string(), "kind": format!("{:?}", e.kind())}),
                    },
                )
            }
            "syscalls" => {
                let target = c"/tmp";
                // SAFETY: each call is expected to be refused; arguments are valid.
                let mount = unsafe {
                    libc::mount(
                        target.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                };
                let mount_errno = errno();
                // SAFETY: as above.
                let unshare = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                let unshare_errno = errno();
                // SAFETY: as above.
                let ptrace = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
                let ptrace_errno = errno();
                // SAFETY: as above.
                let setuid = unsafe { libc::setuid(0) };
                let setuid_errno = errno();
                Ok(json!({
                    "mount": [mount, mount_errno],
                    "unshare": [unshare, unshare_errno],
                    "ptrace": [ptrace, ptrace_errno],
                    "setuid": [setuid, setuid_errno],
                }))
            }
            // Syscalls no runtime needs, and one from the future: the errno each got.
            "unlisted_syscalls" => {
                // SAFETY: each call is expected to be refused; integer arguments.
                let acct = unsafe { libc::syscall(libc::SYS_acct, 0) };
                let acct_errno = errno();
                // SAFETY: as above.
                let personality = unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
                let personality_errno = errno();
                // SAFETY: as above.
                let future = unsafe { libc::syscall(1000) };
                let future_errno = errno();
                // SAFETY: as above; clone3 with no arguments.
                let clone3 = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
                let clone3_errno = errno();
                let _ = (acct, personality, future, clone3);
                Ok(json!({
                    "acct": acct_errno,
                    "personality": personality_errno,
                    "future": future_errno,
                    "clone3": clone3_errno,
                }))
            }
            "bad_requests" => {
                let status = |r: std::io::Result<Reply>| r.map(|r| r.status).unwrap_or(0);
                let mut out = serde_json::Map::new();
                out.insert(
                    "wrong_id".into(),
                    json!(status(request(
                        "POST",
                        "/invocation/not-the-id/response",
                        &[],
                        b"{}"
                    ))),
                );
                out.insert(
                    "unknown_path".into(),
                    json!(status(request("GET", "/nothing/here", &[], b""))),
                );
                out.insert(
                    "not_http".into(),
                    json!(status(raw(b"\x00\x01garbage\r\n\r\n"))),
                );
                out.insert(
                    "init_error_late".into(),
                    json!(status(request("POST", "/init/error", &[], b"{}"))),
                );
                out.insert(
                    "next_while_running".into(),
                    json!(status(request("GET", "/invocation/next", &[], b""))),
                );
                let huge_header = "h".repeat(200_000);
                out.insert(
                    "huge_header".into(),
                    json!(status(request(
                        "GET",
                        "/invocation/next",
                        &[("X-Huge", &huge_header)],
                        b""
                    ))),
                );
                Ok(Value::Object(out))
            }
            "respond_twice" => {
                let first = request(
                    "POST",
                    &format!("/invocation/{id}/response"),
                    &[],
                    b"\"first\"",
                )
                .map(|r| r.status)
                .unwrap_or(0);
                let second = request(
                    "POST",
                    &format!("/invocation/{id}/response"),
                    &[],
                    b"\"second\"",
                )
                .map(|r| r.status)
                .unwrap_or(0);
                eprintln!("respond_twice statuses: {first} {second}");
                continue;
            }
            "oversize" => {
                let body = vec![b'x'; 7 << 20];
                let r = request("POST", &format!("/invocation/{id}/response"), &[], &body);
                eprintln!("oversize status: {}", r.map(|r| r.status).unwrap_or(0));
                continue;
            }
            other => Err(("UnknownAction".into(), format!("no action named {other}"))),
        };
        let posted = match result {
            Ok(body) => request(
                "POST",
                &format!("/invocation/{id}/response"),
                &[],
                &serde_json::to_vec(&body).unwrap_or_default(),
            ),
            Err((t, m)) => request(
                "POST",
                &format!("/invocation/{id}/error"),
                &[("Lambda-Runtime-Function-Error-Type", &t)],
                &serde_json::to_vec(
                    &json!({"errorMessage": m, "errorType": t, "stackTrace": ["main.rs"]}),
                )
                .unwrap_or_default(),
            ),
        };
        if let Err(e) = posted {
            eprintln!("posting the result: {e}");
        }
    }
}

fn fill_tmp(mib: u64) -> Value {
    use std::io::Write as _;
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0u64;
    let result = std::fs::File::create("/tmp/fill").and_then(|mut f| {
        for _ in 0..mib {
            f.write_all(&chunk)?;
            written += 1;
        }
        f.sync_all()
    });
    match result {
        Ok(()) => json!({"mib": written}),
        Err(e) => {
            json!({"mib": written, "error": format!("{:?}", e.kind()), "message": e.to_string()})
        }
    }
}

#[path = "../../misbehave/src/call_kiln.rs"]
mod call_kiln;
use call_kiln::call_kiln;
