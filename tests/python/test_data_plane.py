"""Issue 4: the data plane under load and failure: concurrency limits,
environment leases, init failures, and durable asynchronous invocation with
retries, event age and destinations."""

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.exceptions import ClientError

from conftest import ROOT_ENV, KilnServer, create, kiln_bin, signed_urlopen

ARN = "arn:aws:lambda:us-east-1:000000000000"
BUILTIN_QUEUE = "arn:aws:sqs:us-east-1:000000000000:kiln-dlq"


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """A server whose asynchronous waits run 100 times faster (1 min -> 0.6 s)."""
    srv = KilnServer(tmp_path_factory.mktemp("fast-data"), ["--async-time-scale", "0.01"]).start()
    yield srv
    srv.stop()


def call(lam, name, event, **kw):
    r = lam.invoke(FunctionName=name, Payload=json.dumps(event).encode(), **kw)
    body = r["Payload"].read()
    return r, json.loads(body) if body else None


def records(server, function, condition=None):
    url = f"{server.endpoint}/kiln/queue/{function}/records?MaxItems=1000"
    if condition:
        url += f"&Condition={condition}"
    out, marker = [], None
    while True:
        page = json.loads(signed_urlopen(url + (f"&Marker={marker}" if marker else "")).read())
        out += page["Records"]
        marker = page.get("NextMarker")
        if not marker:
            return out


def wait_for_records(server, function, n, timeout=30, condition=None):
    """Polls the built-in queue (as a user would) until n records exist."""
    deadline = time.monotonic() + timeout
    while True:
        found = records(server, function, condition)
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# --- concurrency --------------------------------------------------------------


def throttle_reason(e):
    return e.response.get("Reason") or json.loads(e.response.get("Error", {}).get("Reason", "null") or "null")


def test_reserved_concurrency_throttles_exactly_the_excess(lam, artifacts):
    create(lam, "one-at-a-time", artifacts["misbehave"])
    lam.put_function_concurrency(FunctionName="one-at-a-time", ReservedConcurrentExecutions=1)

    def attempt(_):
        try:
            call(lam, "one-at-a-time", {"action": "sleep", "arg": 1500})
            return "ok"
        except ClientError as e:
            assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 429
            assert e.response["Error"]["Code"] == "TooManyRequestsException"
            return e.response.get("Reason")

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(attempt, range(10)))
    assert outcomes.count("ok") == 1, outcomes
    assert outcomes.count("ReservedFunctionConcurrentInvocationLimitExceeded") == 9, outcomes

    lam.put_function_concurrency(FunctionName="one-at-a-time", ReservedConcurrentExecutions=0)
    with pytest.raises(ClientError) as e:
        call(lam, "one-at-a-time", {"action": "echo", "arg": 1})
    assert e.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    lam.delete_function_concurrency(FunctionName="one-at-a-time")
    assert call(lam, "one-at-a-time", {"action": "echo", "arg": 2})[1] == 2


def test_the_account_limit_is_shared_by_unreserved_functions(tmp_path, artifacts):
    srv = KilnServer(tmp_path / "data", ["--account-concurrency", "3"]).start()
    try:
        lam = srv.client()
        create(lam, "shared-a", artifacts["misbehave"])
        create(lam, "shared-b", artifacts["misbehave"])

        def attempt(i):
            try:
                call(lam, "shared-a" if i % 2 else "shared-b", {"action": "sleep", "arg": 1500})
                return "ok"
            except ClientError as e:
                return e.response.get("Reason")

        with ThreadPoolExecutor(5) as pool:
            outcomes = list(pool.map(attempt, range(5)))
        assert outcomes.count("ok") == 3, outcomes
        assert outcomes.count("ConcurrentInvocationLimitExceeded") == 2, outcomes
        assert lam.get_account_settings()["AccountLimit"]["ConcurrentExecutions"] == 3
    finally:
        srv.stop()


# --- environment lifecycle ----------------------------------------------------


def test_lease_expiry_replaces_an_environment_without_failing_a_call_in_flight(tmp_path, artifacts):
    srv = KilnServer(tmp_path / "data", ["--env-lease", "1"]).start()
    try:
        lam = srv.client()
        create(lam, "leased", artifacts["misbehave"], Timeout=10)
        # This call outlives its environment's 1 s lease.
        r, first = call(lam, "leased", {"action": "whoami", "arg": 1500})
        assert "FunctionError" not in r and first["count"] == 1
        # The environment took no further invocation: a new one serves.
        r = lam.invoke(FunctionName="leased", Payload=b'{"action":"whoami"}', LogType="Tail")
        second = json.loads(r["Payload"].read())
        assert second["stream"] != first["stream"] and second["count"] == 1
        assert "Init Duration" in base64.b64decode(r["LogResult"]).decode()
        # Within its lease, an environment is reused.
        _, third = call(lam, "leased", {"action": "whoami"})
        assert third["stream"] == second["stream"] and third["count"] == 2
    finally:
        srv.stop()


def test_a_failed_init_is_reported_and_retried_on_the_next_invoke(lam, artifacts):
    create(lam, "bad-init", artifacts["misbehave"], Environment={"Variables": {"INIT_ACTION": "fail"}})
    for _ in range(2):
        r = lam.invoke(FunctionName="bad-init", Payload=b'{"action":"echo","arg":1}', LogType="Tail")
        body = json.loads(r["Payload"].read())
        assert r["FunctionError"] == "Unhandled"
        assert body == {"errorType": "InitFailed", "errorMessage": "INIT_ACTION asked init to fail"}
    lam.update_function_configuration(FunctionName="bad-init", Environment={"Variables": {}})
    r = lam.invoke(FunctionName="bad-init", Payload=b'{"action":"echo","arg":1}', LogType="Tail")
    assert "FunctionError" not in r
    log = base64.b64decode(r["LogResult"]).decode()
    assert "Init Duration:" in log


def test_provisioned_environments_are_replaced_when_they_fail(lam, artifacts):
    create(lam, "self-healing", artifacts["misbehave"])
    lam.publish_version(FunctionName="self-healing")
    lam.put_provisioned_concurrency_config(FunctionName="self-healing", Qualifier="1", ProvisionedConcurrentExecutions=1)
    ready = poll_provisioned(lam, "self-healing", "1")
    assert ready["Status"] == "READY"
    # The first call runs in the provisioned environment, then breaks it.
    r, body = call(lam, "self-healing:1", {"action": "panic"})
    assert r["FunctionError"] == "Unhandled"
    # Its maintainer builds a replacement: the next call is warm again.
    ready = poll_provisioned(lam, "self-healing", "1")
    assert ready["AvailableProvisionedConcurrentExecutions"] == 1
    r = lam.invoke(FunctionName="self-healing:1", Payload=b'{"action":"env"}', LogType="Tail")
    env = json.loads(r["Payload"].read())
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "provisioned-concurrency"
    assert "Init Duration" not in base64.b64decode(r["LogResult"]).decode()


def poll_provisioned(lam, name, qualifier, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        got = lam.get_provisioned_concurrency_config(FunctionName=name, Qualifier=qualifier)
        if (got["Status"] == "READY" and got["AvailableProvisionedConcurrentExecutions"] ==
                got["RequestedProvisionedConcurrentExecutions"]) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


# --- asynchronous invocation --------------------------------------------------


def test_event_invocations_are_acknowledged_then_run(fast, artifacts):
    lam = fast.client()
    create(lam, "async-echo", artifacts["misbehave"])
    lam.put_function_event_invoke_config(FunctionName="async-echo",
                                         DestinationConfig={"OnSuccess": {"Destination": BUILTIN_QUEUE}})
    r = lam.invoke(FunctionName="async-echo", InvocationType="Event",
                   Payload=json.dumps({"action": "echo", "arg": {"hello": "async"}}).encode())
    assert r["StatusCode"] == 202
    request_id = r["ResponseMetadata"]["RequestId"]
    [rec] = wait_for_records(fast, "async-echo", 1)
    record = rec["record"]
    assert rec["condition"] == "Success"
    assert record["requestContext"] == {
        "requestId": request_id,
        "functionArn": f"{ARN}:function:async-echo:$LATEST",
        "condition": "Success",
        "approximateInvokeCount": 1,
    }
    assert record["requestPayload"] == {"action": "echo", "arg": {"hello": "async"}}
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert record["responsePayload"] == {"hello": "async"}
    assert record["version"] == "1.0"


def test_function_errors_are_retried_then_dead_lettered(fast, artifacts):
    lam = fast.client()
    create(lam, "always-fails", artifacts["misbehave"])
    r = lam.invoke(FunctionName="always-fails", InvocationType="Event", Payload=b'{"action":"error"}')
    assert r["StatusCode"] == 202
    [rec] = wait_for_records(fast, "always-fails", 1)
    record = rec["record"]
    assert rec["condition"] == "RetriesExhausted"
    assert record["requestContext"]["approximateInvokeCount"] == 3
    assert record["responseContext"]["functionError"] == "Unhandled"
    assert record["responsePayload"] == {"errorType": "Custom", "errorMessage": "requested failure"}
    # Lambda waits 1 minute, then 2 minutes; scaled by 0.01 here.
    t = record["kilnAttemptTimes"]
    assert len(t) == 3
    assert t[1] - t[0] >= 600 and t[2] - t[1] >= 1200, t


def test_retry_attempts_follow_the_event_invoke_config(fast, artifacts):
    lam = fast.client()
    create(lam, "fails-once", artifacts["misbehave"])
    lam.put_function_event_invoke_config(FunctionName="fails-once", MaximumRetryAttempts=0)
    lam.invoke(FunctionName="fails-once", InvocationType="Event", Payload=b'{"action":"panic"}')
    [rec] = wait_for_records(fast, "fails-once", 1)
    assert rec["record"]["requestContext"]["approximateInvokeCount"] == 1
    assert rec["record"]["responsePayload"]["errorType"] == "Panic"


def test_events_past_their_age_go_to_the_dead_letter_queue(fast, artifacts):
    lam = fast.client()
    create(lam, "throttled", artifacts["misbehave"])
    lam.put_function_concurrency(FunctionName="throttled", ReservedConcurrentExecutions=0)
    lam.put_function_event_invoke_config(FunctionName="throttled", MaximumEventAgeInSeconds=60)
    lam.invoke(FunctionName="throttled", InvocationType="Event", Payload=b'{"action":"echo","arg":1}')
    [rec] = wait_for_records(fast, "throttled", 1)
    assert rec["condition"] == "EventAgeExceeded"
    assert rec["record"]["responseContext"]["statusCode"] == 429
    # Throttles do not count as function errors: several tries, none ran.
    assert rec["record"]["requestContext"]["approximateInvokeCount"] >= 2


def test_destination_functions_receive_the_record(fast, artifacts):
    lam = fast.client()
    create(lam, "source", artifacts["misbehave"])
    create(lam, "collector", artifacts["misbehave"])
    lam.put_function_event_invoke_config(FunctionName="source", MaximumRetryAttempts=0, DestinationConfig={
        "OnFailure": {"Destination": f"{ARN}:function:collector"}})
    lam.put_function_event_invoke_config(FunctionName="collector", DestinationConfig={
        "OnSuccess": {"Destination": BUILTIN_QUEUE}})
    lam.invoke(FunctionName="source", InvocationType="Event", Payload=b'{"action":"error"}')
    [rec] = wait_for_records(fast, "collector", 1)
    # The collector ran with the record as its event (echo would need an
    # "action"; the record has none, so the collector reports it as unknown).
    delivered = rec["record"]["requestPayload"]
    assert delivered["requestContext"]["condition"] == "RetriesExhausted"
    assert delivered["requestContext"]["functionArn"] == f"{ARN}:function:source:$LATEST"


def test_async_payload_limit_is_1_mb(fast, artifacts):
    lam = fast.client()
    create(lam, "async-big", artifacts["misbehave"])
    with pytest.raises(ClientError) as e:
        lam.invoke(FunctionName="async-big", InvocationType="Event",
                   Payload=json.dumps({"action": "echo", "arg": "x" * (1024 * 1024)}).encode())
    assert e.value.response["Error"]["Code"] == "RequestTooLargeException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="async-missing", InvocationType="Event", Payload=b"{}")


def test_the_dlq_cli_lists_shows_and_redrives(fast, artifacts):
    lam = fast.client()
    create(lam, "redriven", artifacts["misbehave"], Environment={"Variables": {"MODE": "a"}})
    lam.put_function_event_invoke_config(FunctionName="redriven", MaximumRetryAttempts=0)
    for i in range(2):
        lam.invoke(FunctionName="redriven", InvocationType="Event", Payload=json.dumps({"action": "grow", "arg": i}).encode())
    wait_for_records(fast, "redriven", 2)

    def kiln(*args):
        out = subprocess.run([kiln_bin(), "dlq", *args, "--endpoint", fast.endpoint],
                             capture_output=True, text=True, timeout=60, env=dict(os.environ, **ROOT_ENV))
        assert out.returncode == 0, out.stderr
        return out.stdout

    listed = json.loads(kiln("list", "redriven", "--output", "json"))
    assert len(listed) == 2 and {r["condition"] for r in listed} == {"RetriesExhausted"}
    text = kiln("list", "redriven")
    assert "RetriesExhausted" in text
    shown = json.loads(kiln("show", "redriven", str(listed[0]["id"])))
    assert shown["requestPayload"]["action"] == "grow"

    # Redrive one record: its event runs again (and fails again, so a new
    # record takes its place).
    first, second = listed[0]["id"], listed[1]["id"]
    assert "1 events" in kiln("redrive", "redriven", "--id", str(first))
    deadline = time.monotonic() + 30
    while True:
        ids = [r["id"] for r in records(fast, "redriven")]
        if (first not in ids and len(ids) == 2) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert first not in ids and second in ids and len(ids) == 2, ids
    assert "2 events" in kiln("redrive", "redriven")
