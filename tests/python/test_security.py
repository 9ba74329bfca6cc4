"""Authentication and authorization end to end: SigV4 as boto3, the AWS CLI
and urllib sign it, access keys with identity policies, resource policies
from AddPermission, presigned links, and the root key a fresh data dir
generates."""

import datetime
import json
import os
import stat
import subprocess
import urllib.error
import urllib.request

import botocore.auth
import pytest
from botocore.exceptions import ClientError

from conftest import ROOT_ENV, KilnServer, create, kiln, kiln_bin, sign

ARN = "arn:aws:lambda:us-east-1:000000000000"


def error_of(call):
    try:
        call()
    except ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]["Message"]
    raise AssertionError("the call succeeded")


def http_error(req):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    body = json.loads(e.value.read() or b"{}")
    return e.value.code, e.value.headers.get("x-amzn-ErrorType"), body.get("message", "")


def test_wrong_secret_and_unknown_keys_are_refused(server):
    bad = server.client(aws_secret_access_key="x" * 40)
    assert error_of(bad.list_functions)[:2] == ("InvalidSignatureException", 403)
    unknown = server.client(aws_access_key_id="AKIAUNKNOWNKEY000")
    code, status, message = error_of(unknown.list_functions)
    assert (code, status) == ("UnrecognizedClientException", 403)
    assert "security token" in message


def test_unsigned_and_altered_requests_are_refused(server):
    status, kind, message = http_error(urllib.request.Request(server.endpoint + "/2015-03-31/functions/"))
    assert (status, kind) == (403, "MissingAuthenticationTokenException")
    assert "Signature Version 4" in message
    # Health checks and metrics stay open.
    assert urllib.request.urlopen(server.endpoint + "/health").read() == b"ok"

    # The body is part of the signature.
    req = urllib.request.Request(server.endpoint + "/2015-03-31/functions/none/invocations",
                                 data=b'{"a": 1}', method="POST")
    sign(req)
    req.data = b'{"a": 2}'
    assert http_error(req)[:2] == (403, "InvalidSignatureException")

    # So is every signed header.
    req = urllib.request.Request(server.endpoint + "/2015-03-31/functions/", headers={"X-Amz-Target": "a"})
    sign(req)
    req.add_unredirected_header("X-amz-target", "b")
    assert http_error(req)[:2] == (403, "InvalidSignatureException")


@pytest.mark.parametrize("minutes,accepted", [(-4, True), (4, True), (-6, False), (6, False)])
def test_clock_skew_window_is_five_minutes(server, monkeypatch, minutes, accepted):
    real = botocore.auth.get_current_datetime
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda: real() + datetime.timedelta(minutes=minutes))
    lam = server.client()
    if accepted:
        lam.list_functions()
    else:
        code, status, message = error_of(lam.list_functions)
        assert (code, status) == ("InvalidSignatureException", 403)
        assert "Signature expired" in message or "not yet current" in message


def test_identity_and_resource_policies(server, lam, artifacts, tmp_path):
    for name in ("sec-open", "sec-closed", "sec-shared", "sec-denied"):
        create(lam, name, artifacts["hello"])
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "lambda:Invoke*", "Resource": [f"{ARN}:function:sec-open", f"{ARN}:function:sec-open:*"]},
        {"Effect": "Allow", "Action": "lambda:Get*", "Resource": "*"},
        {"Effect": "Deny", "Action": "lambda:GetPolicy", "Resource": "*"},
        {"Effect": "Deny", "NotAction": "lambda:Get*", "Resource": f"{ARN}:function:sec-denied"},
    ]}
    path = tmp_path / "alice.json"
    path.write_text(json.dumps(policy))
    key = kiln(server, "keys", "create", "alice", "--policy", str(path))["AccessKey"]
    alice = server.client(aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])

    assert alice.invoke(FunctionName="sec-open", Payload=b'{"name": "a"}')["StatusCode"] == 200
    assert alice.invoke(FunctionName="sec-open", Qualifier="$LATEST")["StatusCode"] == 200
    code, status, message = error_of(lambda: alice.invoke(FunctionName="sec-closed"))
    assert (code, status) == ("AccessDeniedException", 403)
    assert message == (f"User: arn:aws:iam::000000000000:user/alice is not authorized to perform: "
                       f"lambda:InvokeFunction on resource: {ARN}:function:sec-closed because no "
                       f"identity-based policy allows the lambda:InvokeFunction action")
    # Allowed by lambda:Get*, except where an explicit Deny says otherwise.
    assert alice.get_function(FunctionName="sec-closed")["Configuration"]["FunctionName"] == "sec-closed"
    code, _, message = error_of(lambda: alice.get_policy(FunctionName="sec-open"))
    assert code == "AccessDeniedException" and "explicit deny" in message
    # Nothing else: no writes, no key administration.
    assert error_of(lambda: alice.delete_function(FunctionName="sec-open"))[0] == "AccessDeniedException"
    req = urllib.request.Request(server.endpoint + "/kiln/keys")
    sign(req, access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"])
    assert http_error(req)[:2] == (403, "AccessDeniedException")

    # A resource policy naming alice allows what her own policy does not...
    alice_arn = "arn:aws:iam::000000000000:user/alice"
    lam.add_permission(FunctionName="sec-shared", StatementId="alice", Action="lambda:InvokeFunction",
                       Principal=alice_arn)
    assert alice.invoke(FunctionName="sec-shared")["StatusCode"] == 200
    # ...but not past her explicit Deny.
    lam.add_permission(FunctionName="sec-denied", StatementId="alice", Action="lambda:InvokeFunction",
                       Principal=alice_arn)
    code, _, message = error_of(lambda: alice.invoke(FunctionName="sec-denied"))
    assert code == "AccessDeniedException" and "explicit deny" in message

    # Keys are listed without secrets, and a deleted key stops working.
    listed = kiln(server, "keys", "list")["AccessKeys"]
    assert [k["UserName"] for k in listed] == ["alice"]
    assert key["SecretAccessKey"] not in json.dumps(listed)
    kiln(server, "keys", "delete", key["AccessKeyId"])
    assert error_of(alice.list_functions)[0] == "UnrecognizedClientException"


def test_bad_policies_are_refused_with_the_reason(server, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"Statement": [{"Effect": "allow", "Action": "*", "Resource": "*"}]}))
    out = subprocess.run([kiln_bin(), "keys", "create", "bob", "--policy", str(path), "--endpoint", server.endpoint],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, **ROOT_ENV))
    assert out.returncode != 0
    assert "MalformedPolicyDocumentException" in out.stderr and '"allow"' in out.stderr, out.stderr


def test_presigned_links_carry_the_callers_rights(server, lam, artifacts):
    create(lam, "sec-code", artifacts["hello"])
    location = lam.get_function(FunctionName="sec-code")["Code"]["Location"]
    assert "X-Amz-Signature=" in location and "X-Amz-Expires=600" in location
    assert urllib.request.urlopen(location).read() == artifacts["hello"]
    # An altered link is refused.
    status, kind, _ = http_error(location.replace("sec-code", "sec-cod"))
    assert (status, kind) == (403, "InvalidSignatureException")


def test_a_new_data_dir_generates_root_credentials_once(tmp_path):
    data = tmp_path / "data"
    srv = KilnServer(data, root_env=False).start()
    try:
        printed = "".join(srv.stdout_lines)
        creds = data / "keys" / "root-credentials"
        assert f"saved in {creds}" in printed, printed
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        text = creds.read_text()
        key_id = text.split("aws_access_key_id = ")[1].split()[0]
        secret = text.split("aws_secret_access_key = ")[1].split()[0]
        assert f"AWS_SECRET_ACCESS_KEY={secret}" in printed
        lam = srv.client(aws_access_key_id=key_id, aws_secret_access_key=secret)
        assert lam.list_functions()["Functions"] == []
        # The secret never reaches the log.
        assert secret not in "".join(srv.stderr_lines)
    finally:
        srv.stop()
    again = KilnServer(data, root_env=False).start()
    try:
        assert "generated root credentials" not in "".join(again.stdout_lines)
    finally:
        again.stop()


def test_code_is_sealed_at_rest_and_fails_closed(tmp_path, artifacts):
    data = tmp_path / "data"
    srv = KilnServer(data).start()
    try:
        lam = srv.client()
        create(lam, "sealed-a", artifacts["hello"])
        create(lam, "sealed-b", artifacts["counter"])
        out = subprocess.run([kiln_bin(), "keys", "rotate-master", "--endpoint", srv.endpoint, "--output", "json"],
                             capture_output=True, text=True, timeout=60, env=dict(os.environ, **ROOT_ENV))
        assert out.returncode == 0, out.stderr
        rotated = json.loads(out.stdout)
        assert rotated["BlobsRewrapped"] >= 2 and rotated["OldKeyId"] != rotated["NewKeyId"]
        assert lam.invoke(FunctionName="sealed-a")["StatusCode"] == 200
        sha_a = lam.get_function(FunctionName="sealed-a")["Configuration"]["CodeSha256"]
    finally:
        srv.stop()

    # Nothing under code/ holds the archives' plaintext.
    needle = artifacts["hello"][30:94]
    blobs = [p for p in (data / "code").rglob("*") if p.is_file()]
    assert blobs and not any(needle in p.read_bytes() for p in blobs)

    # Alter sealed-a's archive: it fails closed, naming it; sealed-b still runs.
    import base64
    hex_a = base64.b64decode(sha_a).hex()
    blob = next(p for p in blobs if hex_a in p.name)
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 1
    blob.write_bytes(bytes(raw))
    srv = KilnServer(data).start()
    try:
        lam = srv.client()
        assert lam.invoke(FunctionName="sealed-b")["StatusCode"] == 200
        with pytest.raises(ClientError):
            lam.invoke(FunctionName="sealed-a")
        log = "".join(srv.stderr_lines)
        assert "sealed-a" in log and hex_a in log and "does not authenticate" in log, log[-3000:]
    finally:
        srv.stop()


def audit_cli(data, *args):
    out = subprocess.run([kiln_bin(), "audit", *args, "--data-dir", str(data), "--output", "json"],
                         capture_output=True, text=True, timeout=60)
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else None, out.stderr


def test_the_audit_trail_records_and_proves_control_plane_calls(tmp_path, artifacts):
    data = tmp_path / "data"
    srv = KilnServer(data).start()
    try:
        lam = srv.client()
        create(lam, "audited", artifacts["hello"], Environment={"Variables": {"TOKEN": "s3cr3t-value"}})
        lam.update_function_configuration(FunctionName="audited", MemorySize=256)
        create(lam, "other", artifacts["hello"])
        lam.invoke(FunctionName="audited")  # data plane: not audited
        lam.delete_function(FunctionName="other")
        error_of(lambda: lam.get_function(FunctionName="missing"))
    finally:
        srv.stop()  # writes the shutdown digest

    code, report, err = audit_cli(data, "verify")
    assert code == 0, (report, err)
    assert report["problems"] == [] and report["digests"] >= 1 and report["uncovered"] is None
    code, records, _ = audit_cli(data, "list", "--function", "audited")
    assert [r["action"] for r in records] == ["CreateFunction", "UpdateFunctionConfiguration"]
    assert all(r["principal"] == "arn:aws:iam::000000000000:root" for r in records)
    assert records[0]["source"].startswith("127.0.0.1:")
    assert records[0]["params"]["body"]["Code"]["ZipFile"].endswith("base64 characters>")
    code, failed, _ = audit_cli(data, "list", "--action", "GetFunction")
    assert [(r["status"], r["error"]) for r in failed] == [(404, "ResourceNotFoundException")]
    trail = (data / "audit" / "records.jsonl").read_bytes()
    assert b"s3cr3t-value" not in trail and b"InvokeFunction" not in trail

    # Tampering is reported exactly, and nothing else.
    lines = trail.splitlines(keepends=True)
    modified = lines.copy()
    modified[1] = modified[1].replace(b"UpdateFunctionConfiguration", b"UpdateFunctionConfiguratioN")
    (data / "audit" / "records.jsonl").write_bytes(b"".join(modified))
    code, report, _ = audit_cli(data, "verify")
    assert code == 1 and [p["problem"] for p in report["problems"]] == ["record_modified"], report
    text = subprocess.run([kiln_bin(), "audit", "verify", "--data-dir", str(data)], capture_output=True, text=True)
    assert text.stdout.splitlines()[0] == "record 2 was modified", text.stdout

    removed = lines[:2] + lines[3:]
    (data / "audit" / "records.jsonl").write_bytes(b"".join(removed))
    code, report, _ = audit_cli(data, "verify")
    assert code == 1 and [p["problem"] for p in report["problems"]] == ["records_removed"], report

    (data / "audit" / "records.jsonl").write_bytes(trail)
    assert audit_cli(data, "verify")[0] == 0


def test_configuration_history_names_every_state_and_who_made_it(server, lam, artifacts, tmp_path):
    create(lam, "hist", artifacts["hello"])
    lam.update_function_configuration(FunctionName="hist", MemorySize=256)
    lam.publish_version(FunctionName="hist")
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"Statement": [{"Effect": "Allow", "Action": "lambda:UpdateFunctionConfiguration",
                                               "Resource": f"{ARN}:function:hist"}]}))
    key = kiln(server, "keys", "create", "carol", "--policy", str(path))["AccessKey"]
    carol = server.client(aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    carol.update_function_configuration(FunctionName="hist", Timeout=9)
    lam.delete_function(FunctionName="hist")

    changes = kiln(server, "config-history", "hist")["Changes"]
    assert [c["Action"] for c in changes] == ["CreateFunction", "UpdateFunctionConfiguration", "PublishVersion",
                                              "UpdateFunctionConfiguration", "DeleteFunction"]
    assert [c["Configuration"] and c["Configuration"]["MemorySize"] for c in changes[:4]] == [128, 256, 256, 256]
    assert changes[2]["Configuration"]["Version"] == "1"
    assert changes[3]["Configuration"]["Timeout"] == 9
    assert changes[3]["Principal"] == "arn:aws:iam::000000000000:user/carol"
    assert changes[4]["Configuration"] is None
    assert all(c["Time"].endswith("Z") for c in changes)


def test_environments_get_their_roles_credentials(server, lam, artifacts, tmp_path):
    create(lam, "role-allowed", artifacts["hello"])
    create(lam, "role-denied", artifacts["hello"])
    path = tmp_path / "worker.json"
    path.write_text(json.dumps({"Statement": [{"Effect": "Allow", "Action": "lambda:InvokeFunction",
                                               "Resource": f"{ARN}:function:role-allowed"}]}))
    role = kiln(server, "roles", "create", "worker", "--policy", str(path))["Role"]
    assert role["Arn"] == "arn:aws:iam::000000000000:role/worker"
    create(lam, "role-fn", artifacts["misbehave"], Role=role["Arn"])
    create(lam, "no-role-fn", artifacts["misbehave"])

    env = json.loads(lam.invoke(FunctionName="role-fn", Payload=b'{"action": "env"}')["Payload"].read())
    assert env["AWS_ACCESS_KEY_ID"].startswith("ASIA") and env["AWS_SESSION_TOKEN"]
    # The default role's session: credentials that are allowed nothing.
    plain = json.loads(lam.invoke(FunctionName="no-role-fn", Payload=b'{"action": "env"}')["Payload"].read())
    default = server.client(aws_access_key_id=plain["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=plain["AWS_SECRET_ACCESS_KEY"],
                            aws_session_token=plain["AWS_SESSION_TOKEN"])
    assert error_of(lambda: default.invoke(FunctionName="role-allowed"))[0] == "AccessDeniedException"

    # The credentials carry exactly the role's permissions...
    as_role = server.client(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                            aws_session_token=env["AWS_SESSION_TOKEN"])
    assert as_role.invoke(FunctionName="role-allowed")["StatusCode"] == 200
    code, _, message = error_of(lambda: as_role.invoke(FunctionName="role-denied"))
    assert code == "AccessDeniedException"
    assert message.startswith("User: arn:aws:sts::000000000000:assumed-role/worker/role-fn-")
    # ...and a forged token or another key id is refused.
    token = env["AWS_SESSION_TOKEN"]
    # Never the token itself (one in 256 ends in "AA").
    tail = "AA" if token[-2:] != "AA" else "BA"
    forged = server.client(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                           aws_session_token=token[:-2] + tail)
    assert error_of(forged.list_functions)[0] in ("UnrecognizedClientException", "InvalidSignatureException")

    # Revoked: refused from now on.
    kiln(server, "roles", "revoke-sessions", "worker")
    assert error_of(lambda: as_role.invoke(FunctionName="role-allowed"))[0] == "UnrecognizedClientException"


@pytest.mark.parametrize("sandbox", ["wasm", "native"])
def test_functions_call_kiln_with_their_roles_credentials(server, lam, artifacts, tmp_path, sandbox):
    """From inside its sandbox (wasmtime in-process, or a jail), a function
    invokes another function with its role's credentials: allowed where the
    role allows, AccessDenied elsewhere, refused once its sessions are
    revoked. Wasm reaches kiln through wasi:http, native code through the
    agent's relay at AWS_ENDPOINT_URL_LAMBDA."""
    create(lam, f"callee-ok-{sandbox}", artifacts["hello"])
    create(lam, f"callee-no-{sandbox}", artifacts["hello"])
    path = tmp_path / "caller.json"
    path.write_text(json.dumps({"Statement": [{"Effect": "Allow", "Action": "lambda:InvokeFunction",
                                               "Resource": f"{ARN}:function:callee-ok-{sandbox}"}]}))
    role = kiln(server, "roles", "create", f"caller-{sandbox}", "--policy", str(path))["Role"]
    caller = f"caller-{sandbox}"
    if sandbox == "wasm":
        create(lam, caller, artifacts["misbehave"], Role=role["Arn"])
    else:
        create(lam, caller, artifacts["native-misbehave"], Role=role["Arn"],
               Runtime="provided.al2023", Handler="bootstrap")

    def call(function, **extra):
        event = {"action": "invoke", "arg": {"function": function, "payload": {"name": "caller"}, **extra}}
        r = lam.invoke(FunctionName=caller, Payload=json.dumps(event).encode())
        assert "FunctionError" not in r, r
        return json.loads(r["Payload"].read())

    env = json.loads(lam.invoke(FunctionName=caller, Payload=b'{"action": "env"}')["Payload"].read())
    expected = server.endpoint if sandbox == "wasm" else "http://127.0.0.1:9002"
    assert env["AWS_ENDPOINT_URL_LAMBDA"] == expected

    allowed = call(f"callee-ok-{sandbox}")
    assert allowed["status"] == 200 and allowed["function_error"] is None, allowed
    answer = json.loads(allowed["payload"])
    assert (answer["greeting"], answer["function"]) == ("Hello, caller!", f"callee-ok-{sandbox}")

    denied = call(f"callee-no-{sandbox}")
    assert (denied["status"], denied["error_type"]) == (403, "AccessDeniedException"), denied
    assert f"assumed-role/caller-{sandbox}/" in denied["message"]

    if sandbox == "wasm":
        # wasi:http reaches kiln and nothing else: a listener the guest
        # names is never connected to.
        import socket
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen(1)
            other.settimeout(0.2)
            port = other.getsockname()[1]
            refused = call(f"callee-ok-{sandbox}", endpoint=f"http://127.0.0.1:{port}")
            assert "HttpRequestDenied" in refused["error"], refused
            with pytest.raises(TimeoutError):
                other.accept()

    kiln(server, "roles", "revoke-sessions", f"caller-{sandbox}")
    revoked = call(f"callee-ok-{sandbox}")
    assert (revoked["status"], revoked["error_type"]) == (403, "UnrecognizedClientException"), revoked


def test_no_body_is_read_for_an_unknown_key(server):
    """A request naming no known key is refused from its head alone: kiln
    answers without waiting for (or buffering) the 60 MB it announces."""
    import socket
    import time
    host = server.endpoint.removeprefix("http://")
    addr, port = host.split(":")
    now = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    head = (f"POST /2015-03-31/functions HTTP/1.1\r\nHost: {host}\r\nX-Amz-Date: {now}\r\n"
            f"Authorization: AWS4-HMAC-SHA256 Credential=AKIANOBODY000000/{now[:8]}/us-east-1/lambda/aws4_request, "
            f"SignedHeaders=host;x-amz-date, Signature={'0' * 64}\r\n"
            f"Content-Length: 60000000\r\n\r\n")
    with socket.create_connection((addr, int(port)), timeout=10) as s:
        s.sendall(head.encode())
        answer = s.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 403"), answer
    assert "x-amzn-errortype: unrecognizedclientexception" in answer.lower(), answer
