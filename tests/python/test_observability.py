"""Observability as a user checks it: the REPORT line of an invocation, the
Tail header, /metrics counters moving by exactly what was caused, and a
trace id sent in X-Amzn-Trace-Id arriving in the function."""

import base64
import json
import math
import os
import re
import time
import subprocess
import urllib.request

import pytest
from botocore.exceptions import ClientError

from conftest import ROOT_ENV, KilnServer, create, kiln_bin

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

    # Wait for the event's invocation to be counted (kiln counts an
    # invocation only once it has left the concurrency count).
    deadline = time.monotonic() + 30
    while True:
        after = metrics(server)
        if sample(after, "kiln_invocations_total", **fv) - sample(before, "kiln_invocations_total", **fv) >= 8:
            break
        assert time.monotonic() < deadline, "the async event never ran"
        time.sleep(0.05)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("kiln_async_events_received_total", function="metered") == 1
    ran_async = 1
    assert delta("kiln_invocations_total", **fv) == 8
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
    # Nothing runs any more.
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


def test_the_json_log_format(lam, artifacts):
    name = "json-logs"
    with pytest.raises(ClientError) as e:
        create(lam, name, artifacts["misbehave"],
               LoggingConfig={"LogFormat": "Text", "ApplicationLogLevel": "WARN"})
    assert e.value.response["Error"]["Code"] == "InvalidParameterValueException"
    assert "LogFormat to JSON" in e.value.response["Error"]["Message"]
    config = create(lam, name, artifacts["misbehave"])["LoggingConfig"]
    assert config == {"LogFormat": "Text", "LogGroup": f"/aws/lambda/{name}"}

    config = lam.update_function_configuration(
        FunctionName=name, LoggingConfig={"LogFormat": "JSON"})["LoggingConfig"]
    assert config == {"LogFormat": "JSON", "ApplicationLogLevel": "INFO", "SystemLogLevel": "INFO",
                      "LogGroup": f"/aws/lambda/{name}"}
    r = lam.invoke(FunctionName=name, Payload=b'{"action": "log"}', LogType="Tail")
    request_id = r["ResponseMetadata"]["RequestId"]
    records = [json.loads(line) for line in tail(r).splitlines()]
    assert records[0]["type"] == "platform.start"
    assert records[0]["record"] == {"requestId": request_id, "version": "$LATEST"}
    line = [x for x in records if x.get("message") == "structured"][0]
    assert (line["level"], line["requestId"], line["key"]) == ("INFO", request_id, "value")
    report = records[-1]
    assert report["type"] == "platform.report" and report["record"]["status"] == "success"
    metrics = report["record"]["metrics"]
    assert metrics["billedDurationMs"] == max(1, math.ceil(metrics["durationMs"]))
    assert metrics["memorySizeMB"] == 128 and "initDurationMs" in metrics

    # WARN drops the function's INFO line and the platform's records.
    lam.update_function_configuration(
        FunctionName=name,
        LoggingConfig={"LogFormat": "JSON", "ApplicationLogLevel": "WARN", "SystemLogLevel": "WARN"})
    r = lam.invoke(FunctionName=name, Payload=b'{"action": "log"}', LogType="Tail")
    assert tail(r) == ""
    with pytest.raises(ClientError) as e:
        lam.update_function_configuration(FunctionName=name, LoggingConfig={"SystemLogLevel": "ERROR"})
    assert e.value.response["Error"]["Code"] == "ValidationException"

    # Back to text.
    lam.update_function_configuration(FunctionName=name, LoggingConfig={"LogFormat": "Text"})
    r = lam.invoke(FunctionName=name, Payload=b'{"action": "log"}', LogType="Tail")
    assert tail(r).startswith("START RequestId: ")
    assert lam.get_function_configuration(FunctionName=name)["LoggingConfig"]["LogFormat"] == "Text"


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on loopback: keeps every request's body."""

    def __init__(self):
        import http.server
        import threading

        self.requests = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.arrived:
                    receiver.requests.append((self.path, self.headers["Content-Type"], body))
                    receiver.arrived.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", self.headers["Content-Type"])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def wait_for(self, done, timeout=30):
        with self.arrived:
            assert self.arrived.wait_for(lambda: done(self.requests), timeout), self.requests

    def close(self):
        self.httpd.shutdown()


def json_spans(requests):
    spans = []
    for path, _, body in requests:
        assert path == "/v1/traces"
        for rs in json.loads(body)["resourceSpans"]:
            service = [a["value"]["stringValue"] for a in rs["resource"]["attributes"]
                       if a["key"] == "service.name"]
            for ss in rs["scopeSpans"]:
                for s in ss["spans"]:
                    spans.append(dict(s, service=service))
    return spans


@pytest.mark.parametrize("protocol", ["http/json", "http/protobuf"])
def test_spans_are_exported_over_otlp_in_the_callers_trace(tmp_path, artifacts, protocol):
    receiver = OtlpReceiver()
    srv = KilnServer(tmp_path / "data", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }).start()
    try:
        lam = srv.client()
        create(lam, "traced", artifacts["misbehave"])
        trace = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
        undo = _with_trace(lam, trace)
        r = lam.invoke(FunctionName="traced", Payload=b'{"action": "echo", "arg": 1}')
        undo()
        assert r["StatusCode"] == 200
        trace_id = "5759e988bd862e3fe1be46a994272793"
        wanted = {"request", "InvokeFunction", "route", "acquire_environment", "create_sandbox",
                  "init", "invoke", "store_log"}
        if protocol == "http/protobuf":
            # The ids travel as raw bytes in the protobuf.
            receiver.wait_for(lambda reqs: any(bytes.fromhex(trace_id) in b for _, _, b in reqs))
            assert all(t == "application/x-protobuf" for _, t, _ in receiver.requests)
            body = b"".join(b for _, _, b in receiver.requests)
            for name in wanted:
                assert name.encode() in body, name
            return

        def complete(reqs):
            names = {s["name"] for s in json_spans(reqs) if s["traceId"] == trace_id}
            return wanted <= names
        receiver.wait_for(complete)
        spans = [s for s in json_spans(receiver.requests) if s["traceId"] == trace_id]
        by_name = {s["name"]: s for s in spans}
        assert all(s["service"] == ["kiln"] for s in spans)
        # The API's span hangs under the caller's span, the operation under
        # it, and the invocation's steps under the operation.
        parent = {s["name"]: s.get("parentSpanId") for s in spans}
        assert parent["request"] == "53995c3f42cd8ad8"
        assert parent["InvokeFunction"] == by_name["request"]["spanId"]
        for step in ("route", "acquire_environment", "invoke", "store_log"):
            assert parent[step] == by_name["InvokeFunction"]["spanId"], step
        for step in ("create_sandbox", "init"):
            assert parent[step] == by_name["acquire_environment"]["spanId"], step
        attrs = {a["key"]: a["value"] for a in by_name["invoke"]["attributes"]}
        assert attrs["faas.invocation_id"]["stringValue"] == r["ResponseMetadata"]["RequestId"]

        # An event queued without a header is traced under the id kiln made
        # for it, which the function also got.
        lam.invoke(FunctionName="traced", InvocationType="Event", Payload=b'{"action": "echo", "arg": 2}')
        receiver.wait_for(lambda reqs: any(s["name"] == "async_event" for s in json_spans(reqs)))
        event = [s for s in json_spans(receiver.requests) if s["name"] == "async_event"][0]
        enqueue = [s for s in json_spans(receiver.requests) if s["name"] == "enqueue"][0]
        assert event["traceId"] == enqueue["traceId"] != trace_id
    finally:
        srv.stop()
        receiver.close()

