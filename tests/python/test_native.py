"""Issue 5: native custom runtimes behind the Lambda Runtime API, in the
jail sandbox: the public lambda_runtime crate unmodified, the SDK's native
build, failure semantics, hostile code, and Wasm inside the jail."""

import base64
import io
import json
import os
import pathlib
import socket
import subprocess
import threading
import time
import zipfile

import pytest

from conftest import KilnServer, ROLE, create, kiln, kiln_bin

ARN = "arn:aws:lambda:us-east-1:000000000000"


def native(lam, name, zip_bytes, **kw):
    return create(lam, name, zip_bytes, Runtime="provided.al2023", Handler="bootstrap", **kw)


def call(lam, name, event, **kw):
    r = lam.invoke(FunctionName=name, Payload=json.dumps(event).encode(), **kw)
    body = r["Payload"].read()
    return r, json.loads(body) if body else None


def zip_with(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, (data, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            z.writestr(info, data)
    return buf.getvalue()


def rss_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_doctor_finds_the_jail():
    out = subprocess.run([kiln_bin(), "doctor", "--output", "json", "--data-dir", "/tmp/kiln-doctor-test"],
                         capture_output=True, text=True, check=True)
    report = {s["name"]: s for s in json.loads(out.stdout)["sandboxes"]}
    assert report["wasm"]["available"]
    assert report["jail"]["available"], report["jail"]
    assert not report["microvm"]["available"] and report["microvm"]["detail"]


def test_lambda_runtime_crate_runs_unmodified(lam, artifacts):
    native(lam, "lambda-rt", artifacts["lambda-rt"], Environment={"Variables": {"OWN_VAR": "mine"}}, Timeout=5)
    r, body = call(lam, "lambda-rt", {"action": "echo", "arg": {"x": [1, 2]}})
    assert "FunctionError" not in r and body == {"echo": {"x": [1, 2]}}

    started = time.time() * 1000
    r, ctx = call(lam, "lambda-rt", {"action": "context"})
    assert ctx["request_id"] == r["ResponseMetadata"]["RequestId"]
    assert ctx["invoked_function_arn"] == f"{ARN}:function:lambda-rt"
    assert started + 4000 < ctx["deadline"] <= time.time() * 1000 + 5000
    assert ctx["function_name"] == "lambda-rt" and ctx["memory"] == 128 and ctx["version"] == "$LATEST"
    assert ctx["xray_trace_id"].startswith("Root=1-")

    _, env = call(lam, "lambda-rt", {"action": "env"})
    assert env["AWS_LAMBDA_RUNTIME_API"] == "127.0.0.1:9001"
    assert env["_HANDLER"] == "bootstrap"
    assert env["LAMBDA_TASK_ROOT"] == "/var/task"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "lambda-rt"
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "128"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/aws/lambda/lambda-rt"
    assert env["AWS_LAMBDA_LOG_STREAM_NAME"].startswith(time.strftime("%Y/%m/%d/[$LATEST]", time.gmtime()))
    assert env["AWS_REGION"] == "us-east-1"
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "on-demand"
    assert env["PATH"] and env["LD_LIBRARY_PATH"] and env["LANG"] == "en_US.UTF-8" and env["TZ"] == ":UTC"
    assert env["OWN_VAR"] == "mine"

    counts = [call(lam, "lambda-rt", {"action": "tmp"})[1]["count"] for _ in range(3)]
    assert counts == [1, 2, 3]

    r, body = call(lam, "lambda-rt", {"action": "error"})
    assert r["FunctionError"] == "Unhandled"
    assert body["errorMessage"] == "requested failure" and body["errorType"]


def test_timeouts_kill_the_environment_and_the_next_call_works(lam, artifacts):
    native(lam, "lambda-rt-slow", artifacts["lambda-rt"], Timeout=1)
    started = time.monotonic()
    r, body = call(lam, "lambda-rt-slow", {"action": "sleep", "arg": 5000})
    assert time.monotonic() - started < 3
    assert r["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in body["errorMessage"]
    r, body = call(lam, "lambda-rt-slow", {"action": "tmp"})
    assert "FunctionError" not in r and body == {"count": 1}, "a new environment"


def test_out_of_memory_is_reported_with_the_signal(lam, artifacts):
    native(lam, "lambda-rt-oom", artifacts["lambda-rt"], MemorySize=128)
    r, body = call(lam, "lambda-rt-oom", {"action": "grow"})
    assert r["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Runtime.OutOfMemory"
    assert body["errorMessage"].endswith("Error: Runtime exited with error: signal: killed")
    r, body = call(lam, "lambda-rt-oom", {"action": "echo", "arg": 1})
    assert "FunctionError" not in r and body == {"echo": 1}


def test_the_same_handler_runs_as_wasm_and_natively(lam, artifacts):
    create(lam, "hello-wasm", artifacts["hello"])
    native(lam, "hello-native", artifacts["hello-native"])
    _, wasm = call(lam, "hello-wasm", {"name": "Ada"})
    r, nat = call(lam, "hello-native", {"name": "Ada"})
    assert wasm["greeting"] == nat["greeting"] == "Hello, Ada!"
    assert nat["function"] == "hello-native" and nat["request_id"] == r["ResponseMetadata"]["RequestId"]
    r, body = call(lam, "hello-native", {"name": " "})
    assert r["FunctionError"] == "Unhandled" and body["errorType"] == "InvalidName"
    r = lam.invoke(FunctionName="hello-native", Payload=b'{"name":"log"}', LogType="Tail")
    assert "\tINFO\tgreeting log" in base64.b64decode(r["LogResult"]).decode()


def test_bootstrap_problems_are_init_errors(lam, artifacts):
    native(lam, "no-bootstrap", zip_with({"readme.txt": (b"no bootstrap here", 0o644)}))
    r, body = call(lam, "no-bootstrap", {})
    assert r["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Runtime.InvalidEntrypoint"
    assert "Couldn't find valid bootstrap(s): [/var/task/bootstrap /opt/bootstrap]" in body["errorMessage"]

    native(lam, "not-executable", zip_with({"bootstrap": (b"#!/bin/sh\n", 0o644)}))
    r, body = call(lam, "not-executable", {})
    assert body["errorType"] == "Runtime.InvalidEntrypoint" and "not executable" in body["errorMessage"]

    native(lam, "init-fails", artifacts["native-misbehave"], Environment={"Variables": {"INIT_ACTION": "fail"}})
    r, body = call(lam, "init-fails", {})
    assert r["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Fixture.InitFailed"

    native(lam, "init-exits", artifacts["native-misbehave"], Environment={"Variables": {"INIT_ACTION": "exit"}})
    r, body = call(lam, "init-exits", {})
    assert body["errorType"] == "Runtime.ExitError" and "exit status 7" in body["errorMessage"]


def test_a_bootstrap_that_exits_mid_invocation(lam, artifacts):
    native(lam, "exits", artifacts["native-misbehave"])
    r, body = call(lam, "exits", {"action": "exit", "arg": 3})
    assert r["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Runtime.ExitError"
    assert body["errorMessage"].endswith("Error: Runtime exited with error: exit status 3")
    assert call(lam, "exits", {"action": "echo", "arg": "again"})[1] == "again"


def test_function_errors_carry_the_runtimes_own_body(lam, artifacts):
    native(lam, "errors", artifacts["native-misbehave"])
    r, body = call(lam, "errors", {"action": "error"})
    assert r["FunctionError"] == "Unhandled"
    assert body == {"errorMessage": "requested failure", "errorType": "Fixture.Custom", "stackTrace": ["main.rs"]}


# --- hostile code -------------------------------------------------------------


def test_a_fork_bomb_is_contained(server, lam, artifacts):
    native(lam, "bomb", artifacts["native-misbehave"], Timeout=30)
    native(lam, "bystander", artifacts["native-misbehave"])
    assert call(lam, "bystander", {"action": "echo", "arg": 1})[1] == 1
    _, body = call(lam, "bomb", {"action": "fork_bomb"})
    assert body["forks"] < 1024 and body["errno"] == 11, body  # EAGAIN from the pids limit
    # The host and other functions are unaffected.
    assert call(lam, "bystander", {"action": "echo", "arg": 2})[1] == 2
    assert call(lam, "bomb", {"action": "echo", "arg": 3})[1] == 3


def test_the_file_system_is_the_jails(lam, artifacts):
    native(lam, "fs", artifacts["native-misbehave"])
    _, root = call(lam, "fs", {"action": "ls", "arg": "/"})
    assert root == {"ok": ["dev", "etc", "opt", "proc", "run", "tmp", "var"]}
    # /run holds only the way back to kiln's API.
    assert call(lam, "fs", {"action": "ls", "arg": "/run/kiln"})[1] == {"ok": ["api.sock"]}
    _, dev = call(lam, "fs", {"action": "ls", "arg": "/dev"})
    assert dev == {"ok": ["null", "random", "urandom", "zero"]}
    for path in ["/var/task/new", "/opt/new", "/etc/new", "/new"]:
        _, body = call(lam, "fs", {"action": "write", "arg": path})
        assert body.get("errno") == 30, (path, body)  # EROFS
    _, body = call(lam, "fs", {"action": "write", "arg": "/tmp/ok"})
    assert body == {"ok": True}
    # Nothing of the host: not its users, not its files, not kiln's data.
    _, passwd = call(lam, "fs", {"action": "read", "arg": "/etc/passwd"})
    assert "sbx_user1051:x:993:993" in passwd["ok"] and "/bin/bash" not in passwd["ok"]
    for path in ["/etc/shadow", "/root", "/work", "/proc/1/root/etc/shadow", str(pathlib.Path.cwd())]:
        _, body = call(lam, "fs", {"action": "read", "arg": path})
        assert "err" in body, (path, body)
    _, who = call(lam, "fs", {"action": "whoami"})
    # Lambda's sbx_user1051, in a user namespace of its own.
    assert who["uid"] == 993 and who["pid"] != 1 and who["hostname"] == "kiln"


def test_privileged_syscalls_are_refused(lam, artifacts):
    native(lam, "syscalls", artifacts["native-misbehave"])
    _, body = call(lam, "syscalls", {"action": "syscalls"})
    for name in ["mount", "unshare", "ptrace"]:
        assert body[name] == [-1, 1], (name, body)  # EPERM
    # Root does not exist in the function's user namespace: EINVAL.
    assert body["setuid"] == [-1, 22], body


def test_only_loopback_and_the_hosts_loopback_is_out_of_reach(lam, artifacts):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        native(lam, "net", artifacts["native-misbehave"])
        _, body = call(lam, "net", {"action": "connect", "arg": port})
        assert body["kind"] == "ConnectionRefused", body
        _, dev = call(lam, "net", {"action": "interfaces"})
        interfaces = [l.split(":")[0].strip() for l in dev.splitlines()[2:] if l.strip()]
        assert interfaces == ["lo"]
    finally:
        listener.close()


def test_output_floods_are_bounded_and_the_server_stays_flat(server, lam, artifacts):
    native(lam, "flood", artifacts["native-misbehave"], Timeout=60)
    call(lam, "flood", {"action": "echo", "arg": 0})
    before = rss_kib(server.proc.pid)
    r = lam.invoke(FunctionName="flood", Payload=json.dumps({"action": "flood", "arg": 64}).encode(), LogType="Tail")
    assert json.loads(r["Payload"].read()) == "flooded"
    tail = base64.b64decode(r["LogResult"]).decode()
    assert "bytes of log output were dropped" in tail
    after = rss_kib(server.proc.pid)
    assert after - before < 32 * 1024, (before, after)  # 64 MiB written, the server grew by less than 32


def test_the_runtime_api_survives_malformed_requests(lam, artifacts):
    native(lam, "rude", artifacts["native-misbehave"])
    _, statuses = call(lam, "rude", {"action": "bad_requests"})
    assert statuses == {
        "wrong_id": 400,
        "unknown_path": 404,
        "not_http": 400,
        "init_error_late": 403,
        "next_while_running": 403,
        "huge_header": 431,
    }
    assert call(lam, "rude", {"action": "echo", "arg": "still serving"})[1] == "still serving"
    r = lam.invoke(FunctionName="rude", Payload=b'{"action":"respond_twice"}')
    assert json.loads(r["Payload"].read()) == "first"
    # The runtime wrote what it saw after its first response completed the
    # invocation, so the line belongs to the next invocation's log.
    r = lam.invoke(FunctionName="rude", Payload=b'{"action":"echo","arg":0}', LogType="Tail")
    assert "respond_twice statuses: 202 403" in base64.b64decode(r["LogResult"]).decode()
    r, body = call(lam, "rude", {"action": "oversize"})
    assert r["FunctionError"] == "Unhandled" and body["errorType"] == "Function.ResponseSizeTooLarge"


def test_two_versions_never_share_an_environment(lam, artifacts):
    native(lam, "versions", artifacts["native-misbehave"], Environment={"Variables": {"VV": "1"}})
    lam.publish_version(FunctionName="versions")
    lam.update_function_configuration(FunctionName="versions", Environment={"Variables": {"VV": "2"}})
    lam.publish_version(FunctionName="versions")
    one = [call(lam, "versions:1", {"action": "whoami"})[1] for _ in range(2)]
    two = call(lam, "versions:2", {"action": "whoami"})[1]
    assert [w["count"] for w in one] == [1, 2] and two["count"] == 1
    assert one[0]["stream"] == one[1]["stream"] != two["stream"]
    assert "[1]" in one[0]["stream"] and "[2]" in two["stream"]


def test_a_killed_server_leaves_no_jail_behind(tmp_path, artifacts):
    data = tmp_path / "data"
    srv = KilnServer(data).start()
    try:
        lam = srv.client()
        native(lam, "orphan", artifacts["native-misbehave"])
        assert call(lam, "orphan", {"action": "echo", "arg": 1})[1] == 1
        # The environment's directory holds its jail's root (the others are
        # directories made ahead for environments to come).
        envs = [d for d in (data / "envs").iterdir() if (d / "root").exists()]
        assert len(envs) == 1
    finally:
        srv.kill()
    # The agent dies with the server (parent-death signal); its jail's
    # processes with it (PID namespace).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        agents = subprocess.run(["pgrep", "-f", f"kiln-agent.*--channel-fd"], capture_output=True, text=True).stdout.split()
        mine = [p for p in agents if str(data) in pathlib.Path(f"/proc/{p}/cmdline").read_text(errors="ignore")] if agents else []
        if not mine:
            break
        time.sleep(0.05)
    srv = KilnServer(data).start()
    try:
        # (The new server makes directories ahead for environments to come.)
        assert not (data / "envs" / envs[0].name).exists(), "the new server removed the old environment"
        leftover = [p for p in pathlib.Path("/sys/fs/cgroup/pids/kiln").glob("*")
                    if p.is_dir() and not p.name.startswith("probe")] if pathlib.Path("/sys/fs/cgroup/pids/kiln").exists() else []
        assert not [p for p in leftover if p.name == envs[0].name], leftover
        assert call(srv.client(), "orphan", {"action": "echo", "arg": 2})[1] == 2
    finally:
        srv.stop()


# --- Wasm inside the jail -------------------------------------------------------


@pytest.fixture(scope="module")
def jailed_wasm(tmp_path_factory):
    srv = KilnServer(tmp_path_factory.mktemp("jail-wasm"), ["--wasm-sandbox", "jail"]).start()
    yield srv
    srv.stop()


def test_wasm_in_the_jail_behaves_as_in_process(jailed_wasm, artifacts):
    lam = jailed_wasm.client()
    create(lam, "jw", artifacts["misbehave"], Timeout=2)
    r, body = call(lam, "jw", {"action": "echo", "arg": {"a": 1}})
    assert "FunctionError" not in r and body == {"a": 1}
    assert [call(lam, "jw", {"action": "tmp_count"})[1] for _ in range(3)] == [1, 2, 3]
    _, body = call(lam, "jw", {"action": "read", "arg": "/etc/passwd"})
    assert "err" in body
    r, body = call(lam, "jw", {"action": "error"})
    assert r["FunctionError"] == "Unhandled" and body == {"errorType": "Custom", "errorMessage": "requested failure"}
    r, body = call(lam, "jw", {"action": "panic", "arg": "jailed"})
    assert body["errorType"] == "Panic" and "jailed" in body["errorMessage"]
    r, body = call(lam, "jw", {"action": "spin"})
    assert "Task timed out after 2.00 seconds" in body["errorMessage"]
    r, body = call(lam, "jw", {"action": "grow"})
    assert body["errorType"] == "Runtime.OutOfMemory", body
    _, env = call(lam, "jw", {"action": "env"})
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "jw"
    create(lam, "jw-hello", artifacts["hello"])
    assert call(lam, "jw-hello", {"name": "jail"})[1]["greeting"] == "Hello, jail!"


def test_wasm_in_the_jail_calls_kiln_through_the_relay(jailed_wasm, artifacts, tmp_path):
    """The agent relays 127.0.0.1:9002 in the jail to kiln's API socket, and
    its wasmtime lets wasi:http reach that address and no other."""
    lam = jailed_wasm.client()
    create(lam, "jw-target", artifacts["hello"])
    create(lam, "jw-other", artifacts["hello"])
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"Statement": [{"Effect": "Allow", "Action": "lambda:InvokeFunction",
                                                 "Resource": f"{ARN}:function:jw-target"}]}))
    role = kiln(jailed_wasm, "roles", "create", "jw-caller", "--policy", str(policy))["Role"]
    create(lam, "jw-caller", artifacts["misbehave"], Role=role["Arn"])
    _, env = call(lam, "jw-caller", {"action": "env"})
    assert env["AWS_ENDPOINT_URL_LAMBDA"] == "http://127.0.0.1:9002"
    _, ok = call(lam, "jw-caller", {"action": "invoke", "arg": {"function": "jw-target", "payload": {"name": "relay"}}})
    assert ok["status"] == 200 and json.loads(ok["payload"])["greeting"] == "Hello, relay!", ok
    _, no = call(lam, "jw-caller", {"action": "invoke", "arg": {"function": "jw-other"}})
    assert (no["status"], no["error_type"]) == (403, "AccessDeniedException"), no
    _, elsewhere = call(lam, "jw-caller", {"action": "invoke",
                                           "arg": {"function": "jw-target", "endpoint": jailed_wasm.endpoint}})
    assert "HttpRequestDenied" in elsewhere["error"], elsewhere
