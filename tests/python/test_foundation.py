"""Issue 2: a Lambda user deploys and invokes Wasm functions with boto3, and
every bad input gets Lambda's error type, status and a message saying what to
fix."""

import base64
import io
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.exceptions import ClientError

from conftest import ROLE, create


def error_of(excinfo):
    e = excinfo.value
    return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]["Message"]


def zip_with(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def invoke(lam, name, event, **kw):
    r = lam.invoke(FunctionName=name, Payload=json.dumps(event).encode(), **kw)
    body = r["Payload"].read()
    return r, json.loads(body) if body else None


def test_hello_deploys_waits_and_answers(lam, artifacts):
    created = create(lam, "hello", artifacts["hello"], Description="greets", Tags={"team": "kiln"})
    assert created["FunctionName"] == "hello"
    assert created["FunctionArn"] == "arn:aws:lambda:us-east-1:000000000000:function:hello"
    assert created["Runtime"] == "wasip2"
    assert created["MemorySize"] == 128 and created["Timeout"] == 3
    assert created["CodeSize"] == len(artifacts["hello"])
    lam.get_waiter("function_active_v2").wait(FunctionName="hello", WaiterConfig={"Delay": 1, "MaxAttempts": 5})

    r, body = invoke(lam, "hello", {"name": "Ada"})
    assert r["StatusCode"] == 200
    assert "FunctionError" not in r
    assert r["ExecutedVersion"] == "$LATEST"
    assert body["greeting"] == "Hello, Ada!"
    assert body["function"] == "hello"
    assert body["request_id"] == r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]

    got = lam.get_function(FunctionName="hello")
    assert got["Configuration"]["CodeSha256"] == created["CodeSha256"]
    assert got["Tags"] == {"team": "kiln"}
    assert lam.get_function_configuration(FunctionName="hello")["Description"] == "greets"
    names = [f["FunctionName"] for f in lam.list_functions()["Functions"]]
    assert "hello" in names


def test_every_function_name_form_reaches_the_function(lam, artifacts):
    create(lam, "named", artifacts["hello"])
    for name in [
        "named",
        "named:$LATEST",
        "000000000000:function:named",
        "arn:aws:lambda:us-east-1:000000000000:function:named",
    ]:
        r, body = invoke(lam, name, {"name": "x"})
        assert body["greeting"] == "Hello, x!", name
    r, body = invoke(lam, "named", {"name": "q"}, Qualifier="$LATEST")
    assert body["greeting"] == "Hello, q!"


def test_update_configuration_and_code(lam, artifacts):
    create(lam, "updated", artifacts["misbehave"])
    before = lam.get_function_configuration(FunctionName="updated")
    after = lam.update_function_configuration(
        FunctionName="updated", MemorySize=256, Timeout=5, Description="d", Environment={"Variables": {"GREETING": "hi"}}
    )
    lam.get_waiter("function_updated_v2").wait(FunctionName="updated", WaiterConfig={"Delay": 1, "MaxAttempts": 5})
    assert after["MemorySize"] == 256 and after["Timeout"] == 5
    assert after["RevisionId"] != before["RevisionId"]
    _, env = invoke(lam, "updated", {"action": "env"})
    assert env["GREETING"] == "hi"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "updated"
    assert env["AWS_REGION"] == "us-east-1"

    # A stale RevisionId is refused.
    with pytest.raises(ClientError) as e:
        lam.update_function_configuration(FunctionName="updated", Timeout=6, RevisionId=before["RevisionId"])
    assert error_of(e)[:2] == ("PreconditionFailedException", 412)

    # New code replaces the old; new environments run it.
    code = lam.update_function_code(FunctionName="updated", ZipFile=artifacts["hello"])
    lam.get_waiter("function_updated_v2").wait(FunctionName="updated", WaiterConfig={"Delay": 1, "MaxAttempts": 5})
    assert code["CodeSize"] == len(artifacts["hello"])
    _, body = invoke(lam, "updated", {"name": "new"})
    assert body["greeting"] == "Hello, new!"


def test_delete_then_not_found(lam, artifacts):
    create(lam, "doomed", artifacts["hello"])
    lam.delete_function(FunctionName="doomed")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName="doomed")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="doomed", Payload=b"{}")


def test_counter_counts_warm_invocations(lam, artifacts):
    create(lam, "counter", artifacts["counter"])
    counts = [invoke(lam, "counter", {})[1]["count"] for _ in range(3)]
    assert counts == [1, 2, 3]


def test_concurrent_invocations_get_their_own_environments(lam, artifacts):
    create(lam, "parallel", artifacts["misbehave"])
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: invoke(lam, "parallel", {"action": "whoami", "arg": 500})[1], range(4)))
    streams = {r["stream"] for r in results}
    assert len(streams) == 4, results
    assert all(r["count"] == 1 for r in results)
    # Sequential calls afterwards reuse a warm one.
    again = invoke(lam, "parallel", {"action": "whoami"})[1]
    assert again["stream"] in streams and again["count"] == 2


def test_list_functions_pages(lam, artifacts):
    for i in range(3):
        create(lam, f"page-{i}", artifacts["hello"])
    seen, marker = [], None
    while True:
        kw = {"MaxItems": 2}
        if marker:
            kw["Marker"] = marker
        page = lam.list_functions(**kw)
        assert len(page["Functions"]) <= 2
        seen += [f["FunctionName"] for f in page["Functions"]]
        marker = page.get("NextMarker")
        if not marker:
            break
    assert [n for n in seen if n.startswith("page-")] == ["page-0", "page-1", "page-2"]
    assert len(seen) == len(set(seen))


# --- bad input -------------------------------------------------------------


def test_not_a_zip(lam):
    with pytest.raises(ClientError) as e:
        create(lam, "notzip", b"this is not a zip file")
    code, status, message = error_of(e)
    assert (code, status) == ("InvalidParameterValueException", 400)
    assert "unzip" in message


def test_no_component_at_handler(lam, artifacts):
    with pytest.raises(ClientError) as e:
        create(lam, "nohandler", artifacts["hello"], Handler="missing.wasm")
    code, status, message = error_of(e)
    assert (code, status) == ("InvalidParameterValueException", 400)
    assert "missing.wasm" in message and "Handler" in message


def test_core_module_instead_of_component(lam):
    with pytest.raises(ClientError) as e:
        create(lam, "coremodule", zip_with({"function.wasm": b"\0asm\x01\0\0\0"}))
    code, status, message = error_of(e)
    assert (code, status) == ("InvalidParameterValueException", 400)
    assert "core WebAssembly module, not a component" in message


def test_unknown_function(lam):
    for call in (
        lambda: lam.get_function(FunctionName="no-such-function"),
        lambda: lam.invoke(FunctionName="no-such-function", Payload=b"{}"),
        lambda: lam.delete_function(FunctionName="no-such-function"),
        lambda: lam.update_function_code(FunctionName="no-such-function", ZipFile=b"x"),
    ):
        with pytest.raises(ClientError) as e:
            call()
        code, status, message = error_of(e)
        assert (code, status) == ("ResourceNotFoundException", 404)
        assert "no-such-function" in message


def test_duplicate_name(lam, artifacts):
    create(lam, "twice", artifacts["hello"])
    with pytest.raises(ClientError) as e:
        create(lam, "twice", artifacts["hello"])
    code, status, message = error_of(e)
    assert (code, status) == ("ResourceConflictException", 409)
    assert "twice" in message


@pytest.mark.parametrize("name", ["bad name!", "a" * 65, "with/slash", "ünïcode"])
def test_invalid_name(lam, artifacts, name):
    with pytest.raises(ClientError) as e:
        create(lam, name, artifacts["hello"])
    code, status, _ = error_of(e)
    assert status == 400, code


def test_out_of_range_settings(lam, artifacts):
    for kw in ({"MemorySize": 10241}, {"Timeout": 901}, {"Runtime": "python3.12"}, {"Role": "not-a-role"},
               {"Environment": {"Variables": {"AWS_REGION": "x"}}}):
        with pytest.raises(ClientError) as e:
            create(lam, "settings", artifacts["hello"], **kw)
        code, status, message = error_of(e)
        assert status == 400, (kw, code, message)


def test_payload_not_json(lam, artifacts):
    create(lam, "json-only", artifacts["hello"])
    with pytest.raises(ClientError) as e:
        lam.invoke(FunctionName="json-only", Payload=b"{not json")
    code, status, message = error_of(e)
    assert (code, status) == ("InvalidRequestContentException", 400)
    assert "json" in message.lower()


def test_payload_over_6_mb(lam, artifacts):
    create(lam, "big-payload", artifacts["misbehave"])
    payload = json.dumps({"action": "echo", "arg": "x" * (6 * 1024 * 1024)}).encode()
    with pytest.raises(ClientError) as e:
        lam.invoke(FunctionName="big-payload", Payload=payload)
    code, status, message = error_of(e)
    assert (code, status) == ("RequestTooLargeException", 413)
    assert "6291456" in message
    # Just under the limit is fine.
    r, body = invoke(lam, "big-payload", {"action": "echo", "arg": "y" * (6 * 1024 * 1024 - 64)})
    assert "FunctionError" not in r and len(body) == 6 * 1024 * 1024 - 64


def test_guest_panic_is_unhandled(lam, artifacts):
    create(lam, "panics", artifacts["misbehave"])
    r, body = invoke(lam, "panics", {"action": "panic", "arg": "at the disco"})
    assert r["StatusCode"] == 200
    assert r["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Panic"
    assert "boom" in body["errorMessage"] and "at the disco" in body["errorMessage"]
    r, body = invoke(lam, "panics", {"action": "echo", "arg": 1})
    assert "FunctionError" not in r and body == 1


def test_guest_trap_is_unhandled(lam, artifacts):
    create(lam, "exits", artifacts["misbehave"])
    r, body = invoke(lam, "exits", {"action": "exit", "arg": 3})
    assert r["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Runtime.ExitError"
    assert set(body) == {"errorType", "errorMessage"}


def test_handler_error_is_reported(lam, artifacts):
    create(lam, "errs", artifacts["misbehave"])
    r, body = invoke(lam, "errs", {"action": "error"})
    assert r["FunctionError"] == "Unhandled"
    assert body == {"errorType": "Custom", "errorMessage": "requested failure"}


def test_timeout_then_next_invoke_works(lam, artifacts):
    create(lam, "slow", artifacts["misbehave"], Timeout=1)
    started = time.monotonic()
    r, body = invoke(lam, "slow", {"action": "spin"})
    took = time.monotonic() - started
    assert r["FunctionError"] == "Unhandled"
    assert "Task timed out after 1.00 seconds" in body["errorMessage"]
    assert took < 3, took
    r, body = invoke(lam, "slow", {"action": "echo", "arg": "alive"})
    assert "FunctionError" not in r and body == "alive"


def test_memory_past_limit_then_next_invoke_works(lam, artifacts):
    create(lam, "hungry", artifacts["misbehave"], MemorySize=128)
    first = invoke(lam, "hungry", {"action": "whoami"})[1]
    r, body = invoke(lam, "hungry", {"action": "grow"})
    assert r["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Runtime.OutOfMemory"
    assert "128 MB" in body["errorMessage"]
    # The failed environment is gone: the next call starts a new one.
    r = lam.invoke(FunctionName="hungry", Payload=json.dumps({"action": "whoami"}).encode(), LogType="Tail")
    after = json.loads(r["Payload"].read())
    assert "FunctionError" not in r
    assert after["stream"] != first["stream"] and after["count"] == 1
    assert "Init Duration" in base64.b64decode(r["LogResult"]).decode()


def test_log_tail_has_lambdas_lines(lam, artifacts):
    create(lam, "tails", artifacts["misbehave"])
    r = lam.invoke(FunctionName="tails", Payload=json.dumps({"action": "log"}).encode(), LogType="Tail")
    log = base64.b64decode(r["LogResult"]).decode()
    request_id = r["ResponseMetadata"]["RequestId"]
    assert f"START RequestId: {request_id} Version: $LATEST" in log
    assert "\tINFO\tstructured\tkey=value" in log
    assert f"END RequestId: {request_id}" in log
    assert f"REPORT RequestId: {request_id}\tDuration: " in log
    assert "Memory Size: 128 MB" in log


def test_dry_run_checks_existence(lam, artifacts):
    create(lam, "dry", artifacts["hello"])
    assert lam.invoke(FunctionName="dry", InvocationType="DryRun")["StatusCode"] == 204
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="not-there", InvocationType="DryRun")


def test_functions_survive_a_restart(tmp_path, artifacts):
    from conftest import KilnServer

    srv = KilnServer(tmp_path / "data").start()
    try:
        lam = srv.client()
        create(lam, "durable", artifacts["hello"])
    finally:
        srv.kill()
    srv = KilnServer(tmp_path / "data").start()
    try:
        _, body = invoke(srv.client(), "durable", {"name": "again"})
        assert body["greeting"] == "Hello, again!"
    finally:
        srv.stop()
