"""Observability as a user checks it: the REPORT line of an invocation, the
Tail header, /metrics counters moving by exactly what was caused, and a
trace id sent in X-Amzn-Trace-Id arriving in the function."""

import base64
import json
import math
import os
import re
import subprocess
import urllib.request

import pytest
from botocore.exceptions import ClientError

from conftest import ROOT_ENV, create, kiln_bin

REPORT = re.compile(
    r"REPORT RequestId: (?P<id>[0-9a-f-]{36})\tDuration: (?P<ms>\d+\.\d{2}) ms\t"
    r"Billed Duration: (?P<billed>\d+) ms\tMemory Size: (?P<size>\d+) MB\t"
    r"Max Memory Used: (?P<used>\d+) MB(\tInit Duration: (?P<init>\d+\.\d{2}) ms)?$"
)


def tail(r):
    return base64.b64decode(r["LogResult"]).decode()


def metrics(server):
    with urllib.request.urlopen(server.endpoint + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        return resp.read().decode()


def sample(text, name, **labels):
    """The value of one series, 0 when it does not exist yet."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("runtime", ["wasm", "native"])
def test_the_report_line_and_the_tail(lam, artifacts, runtime):
    name = f"report-{runtime}"
    if runtime == "wasm":
        create(lam, name, artifacts["misbehave"], MemorySize=256)
    else:
        create(lam, name, artifacts["native-misbehave"], MemorySize=256,
               Runtime="provided.al2023", Handler="bootstrap")
    said = b'{"action": "print", "arg": 1}' if runtime == "wasm" else b'{"action": "echo", "arg": 1}'
    first = lam.invoke(FunctionName=name, Payload=said, LogType="Tail")
    second = lam.invoke(FunctionName=name, Payload=b'{"action": "echo", "arg": 1}', LogType="Tail")
    for r, cold in ((first, True), (second, False)):
        lines = tail(r).rstrip("\n").split("\n")
        request_id = r["ResponseMetadata"]["RequestId"]
        assert lines[0] == f"START RequestId: {request_id} Version: $LATEST"
        assert lines[-2] == f"END RequestId: {request_id}"
        m = REPORT.match(lines[-1])
        assert m, lines[-1]
        assert m["id"] == request_id
        assert int(m["billed"]) == max(1, math.ceil(float(m["ms"])))
        assert m["size"] == "256"
        assert 1 <= int(m["used"]) <= 256
        assert (m["init"] is not None) == cold
    if runtime == "wasm":
        assert "x" * 1023 + "\ndone printing\nEND" in tail(first)
    # No header unless asked for.
    plain = lam.invoke(FunctionName=name, Payload=b'{"action": "echo", "arg": 1}')
    assert "LogResult" not in plain


def test_the_tail_is_the_last_4_kb(lam, artifacts):
    create(lam, "tail-big", artifacts["misbehave"])
    r = lam.invoke(FunctionName="tail-big", Payload=b'{"action": "print", "arg": 20}',
                   LogType="Tail")
    text = base64.b64decode(r["LogResult"])
    assert len(text) == 4096
    assert text.decode().rstrip("\n").split("\n")[-1].startswith("REPORT RequestId:")


def test_metrics_move_by_exactly_what_was_caused(server, lam, artifacts):
    create(lam, "metered", artifacts["misbehave"], MemorySize=512)
    create(lam, "throttled", artifacts["hello"])
    lam.put_function_concurrency(FunctionName="throttled", ReservedConcurrentExecutions=0)
    before = metrics(server)
    fv = {"function": "metered", "version": "$LATEST"}

    for _ in range(5):
        assert "FunctionError" not in lam.invoke(FunctionName="metered", Payload=b'{"action": "echo", "arg": 1}')
    for _ in range(2):
        assert lam.invoke(FunctionName="metered", Payload=b'{"action": "error"}')["FunctionError"] == "Unhandled"
    # botocore retries a throttle: count the requests that reached kiln.
    sent = []
    count = lambda **_: sent.append(1)  # noqa: E731
    lam.meta.events.register("before-send.lambda.Invoke", count)
    try:
        for _ in range(3):
            with pytest.raises(ClientError) as e:
                lam.invoke(FunctionName="throttled", Payload=b"{}")
            assert e.value.response["Error"]["Code"] == "TooManyRequestsException"
    finally:
        lam.meta.events.unregister("before-send.lambda.Invoke", count)
    assert len(sent) >= 3
    lam.invoke(FunctionName="metered", InvocationType="Event", Payload=b'{"action": "echo", "arg": 2}')

    after = metrics(server)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("kiln_async_events_received_total", function="metered") == 1
    # The async event may or may not have run yet: count it only if it has.
    ran_async = delta("kiln_invocations_total", **fv) - 7
    assert ran_async in (0, 1)
    assert delta("kiln_errors_total", **fv) == 2
    assert delta("kiln_throttles_total", function="throttled") == len(sent)
    assert delta("kiln_invocations_total", function="throttled", version="$LATEST") == 0
    assert delta("kiln_cold_starts_total", **fv) == 1
    assert delta("kiln_duration_seconds_count", **fv) == 7 + ran_async
    billed = delta("kiln_billed_milliseconds_total", **fv)
    assert billed >= 7 + ran_async
    assert delta("kiln_gb_seconds_total", **fv) == pytest.approx(billed / 1000 * 0.5)
    # Host gauges are there.
    assert re.search(r'^kiln_environments\{sandbox="wasm",state="idle"\} [1-9]', after, re.M), after
    assert re.search(r"^kiln_async_queue_depth \d+$", after, re.M)
    assert re.search(r'^kiln_host_memory_bytes\{kind="kiln_resident"\} [1-9]', after, re.M)
    assert sample(after, "kiln_concurrent_executions", function="metered") == 0
    assert after.rstrip().endswith("# EOF")


def _with_trace(lam, trace):
    def add(request, **_):
        request.headers["X-Amzn-Trace-Id"] = trace
    lam.meta.events.register_first("before-sign.lambda.Invoke", add)
    return lambda: lam.meta.events.unregister("before-sign.lambda.Invoke", add)


@pytest.mark.parametrize("runtime", ["wasm", "native"])
def test_a_trace_id_reaches_the_function(lam, artifacts, runtime):
    name = f"traced-{runtime}"
    if runtime == "wasm":
        create(lam, name, artifacts["misbehave"])
    else:
        create(lam, name, artifacts["native-misbehave"], Runtime="provided.al2023", Handler="bootstrap")
    trace = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
    undo = _with_trace(lam, trace)
    try:
        r = lam.invoke(FunctionName=name, Payload=b'{"action": "context"}')
    finally:
        undo()
    assert json.loads(r["Payload"].read())["trace_id"] == trace
    # Without one, the function still gets a well-formed new one.
    r = lam.invoke(FunctionName=name, Payload=b'{"action": "context"}')
    assert re.fullmatch(r"Root=1-[0-9a-f]{8}-[0-9a-f]{24}(;.*)?", json.loads(r["Payload"].read())["trace_id"])


def kiln_logs(server, *args, output="json"):
    out = subprocess.run([kiln_bin(), "logs", *args, "--endpoint", server.endpoint, "--output", output],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, **ROOT_ENV))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_kiln_logs_reads_streams_filters_and_follows(server, lam, artifacts):
    create(lam, "logged", artifacts["misbehave"])
    ids = [lam.invoke(FunctionName="logged", Payload=b'{"action": "print", "arg": 1}')["ResponseMetadata"]["RequestId"]
           for _ in range(2)]
    events = [json.loads(line) for line in kiln_logs(server, "logged").splitlines()]
    messages = [e["message"] for e in events]
    for request_id in ids:
        start = messages.index(f"START RequestId: {request_id} Version: $LATEST")
        end = messages.index(f"END RequestId: {request_id}")
        assert start < messages.index("done printing", start) < end
        assert REPORT.match(messages[end + 1])
    # One warm environment served both: one stream, named as Lambda names it.
    streams = {e["logStreamName"] for e in events}
    assert len(streams) == 1
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/\[\$LATEST\][0-9a-f]+", streams.pop())
    assert all(e["timestamp"] > 0 for e in events)

    reports = kiln_logs(server, "logged", "--filter", "REPORT", "--since", "10m").splitlines()
    assert [json.loads(r)["message"].split("\t")[0] for r in reports] == [f"REPORT RequestId: {i}" for i in ids]
    text = kiln_logs(server, "logged", "--filter", "END RequestId", output="text").splitlines()
    assert len(text) == 2 and text[0].endswith(f"END RequestId: {ids[0]}")

    # --follow prints what comes next.
    follow = subprocess.Popen([kiln_bin(), "logs", "logged", "--follow", "--filter", "REPORT", "--endpoint",
                               server.endpoint, "--output", "json"],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, **ROOT_ENV))
    try:
        for expected in ids:  # the history first
            assert json.loads(follow.stdout.readline())["message"].startswith(f"REPORT RequestId: {expected}")
        new = lam.invoke(FunctionName="logged", Payload=b'{"action": "echo", "arg": 1}')["ResponseMetadata"]["RequestId"]
        line = follow.stdout.readline()  # bounded by the test's own timeout if it never comes
        assert json.loads(line)["message"].startswith(f"REPORT RequestId: {new}")
    finally:
        follow.kill()
        follow.wait(timeout=10)


def test_kiln_logs_of_an_unknown_function_says_so(server):
    out = subprocess.run([kiln_bin(), "logs", "no-such-function", "--endpoint", server.endpoint],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, **ROOT_ENV))
    assert out.returncode != 0
    assert "ResourceNotFoundException" in out.stderr and "no-such-function" in out.stderr
