"""Issue 3: the Lambda control-plane API through boto3 (and a few calls
through the AWS CLI): versions, aliases with weighted routing, layers,
resource policies, concurrency, async settings, tags, configuration,
pagination, validation, and the runtimes catalogue."""

import base64
import io
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter

import pytest
from botocore.exceptions import ClientError

from conftest import ACCESS_KEY, ROLE, SECRET_KEY, create, kiln, kiln_bin, signed_urlopen

ARN = "arn:aws:lambda:us-east-1:000000000000"


def error_of(excinfo):
    e = excinfo.value
    return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]["Message"]


def zip_with(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def call(lam, name, event, **kw):
    r = lam.invoke(FunctionName=name, Payload=json.dumps(event).encode(), **kw)
    body = r["Payload"].read()
    return r, json.loads(body) if body else None


def all_pages(fn, key, **kw):
    """Walks a List operation one item per page; returns every item."""
    items, marker, pages = [], None, 0
    while True:
        args = dict(kw, MaxItems=1)
        if marker:
            args["Marker"] = marker
        page = fn(**args)
        assert len(page[key]) <= 1
        items += page[key]
        pages += 1
        marker = page.get("NextMarker")
        if not marker:
            return items, pages
        assert pages < 1000


# --- versions ----------------------------------------------------------------


def test_publish_version_is_an_immutable_copy(lam, artifacts):
    create(lam, "versioned", artifacts["misbehave"], Environment={"Variables": {"GREETING": "one"}})
    v1 = lam.publish_version(FunctionName="versioned", Description="first")
    assert v1["Version"] == "1"
    assert v1["FunctionArn"] == f"{ARN}:function:versioned:1"
    assert v1["Description"] == "first"
    lam.get_waiter("published_version_active").wait(FunctionName="versioned", Qualifier="1",
                                                   WaiterConfig={"Delay": 1, "MaxAttempts": 5})
    # Nothing changed: no new version.
    again = lam.publish_version(FunctionName="versioned")
    assert again["Version"] == "1"

    lam.update_function_configuration(FunctionName="versioned", Environment={"Variables": {"GREETING": "two"}})
    latest = lam.get_function_configuration(FunctionName="versioned")
    with pytest.raises(ClientError) as e:
        lam.publish_version(FunctionName="versioned", CodeSha256="not-the-sha")
    assert error_of(e)[:2] == ("InvalidParameterValueException", 400)
    with pytest.raises(ClientError) as e:
        lam.publish_version(FunctionName="versioned", RevisionId="stale")
    assert error_of(e)[:2] == ("PreconditionFailedException", 412)
    v2 = lam.publish_version(FunctionName="versioned", CodeSha256=latest["CodeSha256"], RevisionId=latest["RevisionId"])
    assert v2["Version"] == "2"

    # Each version runs its own configuration.
    r, env = call(lam, "versioned", {"action": "env"}, Qualifier="1")
    assert r["ExecutedVersion"] == "1" and env["GREETING"] == "one" and env["AWS_LAMBDA_FUNCTION_VERSION"] == "1"
    r, env = call(lam, "versioned:2", {"action": "env"})
    assert r["ExecutedVersion"] == "2" and env["GREETING"] == "two"
    r, env = call(lam, "versioned", {"action": "env"})
    assert r["ExecutedVersion"] == "$LATEST"

    assert lam.get_function_configuration(FunctionName="versioned", Qualifier="1")["Version"] == "1"
    assert lam.get_function(FunctionName="versioned:2")["Configuration"]["Version"] == "2"

    versions, pages = all_pages(lam.list_versions_by_function, "Versions", FunctionName="versioned")
    assert [v["Version"] for v in versions] == ["$LATEST", "1", "2"]
    assert pages == 3

    # A deleted version is gone; its number is never reused.
    lam.delete_function(FunctionName="versioned", Qualifier="1")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName="versioned", Qualifier="1")
    lam.update_function_configuration(FunctionName="versioned", Timeout=7)
    assert lam.publish_version(FunctionName="versioned")["Version"] == "3"


def test_every_qualifier_form(lam, artifacts):
    create(lam, "forms", artifacts["misbehave"])
    lam.publish_version(FunctionName="forms")
    lam.create_alias(FunctionName="forms", Name="live", FunctionVersion="1")
    for name, qualifier, expected in [
        ("forms", None, "$LATEST"),
        ("forms:$LATEST", None, "$LATEST"),
        ("forms:1", None, "1"),
        ("forms:live", None, "1"),
        ("forms", "1", "1"),
        ("forms", "live", "1"),
        (f"{ARN}:function:forms", None, "$LATEST"),
        (f"{ARN}:function:forms:1", None, "1"),
        (f"{ARN}:function:forms:live", None, "1"),
        ("000000000000:function:forms:1", None, "1"),
        ("000000000000:function:forms", "live", "1"),
    ]:
        kw = {"Qualifier": qualifier} if qualifier else {}
        r, body = call(lam, name, {"action": "context"}, **kw)
        assert r["ExecutedVersion"] == expected, (name, qualifier)
        assert body["function_version"] == expected
        assert lam.get_function_configuration(FunctionName=name, **kw)["Version"] == expected
    # The invoked ARN reaches the function as the caller wrote it.
    _, body = call(lam, "forms:live", {"action": "context"})
    assert body["invoked_function_arn"] == f"{ARN}:function:forms:live"
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="forms", Qualifier="9", Payload=b"{}")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="forms:nope", Payload=b"{}")


# --- aliases -----------------------------------------------------------------


def test_alias_lifecycle_and_errors(lam, artifacts):
    create(lam, "aliased", artifacts["hello"])
    lam.publish_version(FunctionName="aliased")
    lam.update_function_configuration(FunctionName="aliased", Description="v2")
    lam.publish_version(FunctionName="aliased")

    a = lam.create_alias(FunctionName="aliased", Name="prod", FunctionVersion="1", Description="production")
    assert a["AliasArn"] == f"{ARN}:function:aliased:prod"
    assert a["FunctionVersion"] == "1"
    assert lam.get_alias(FunctionName="aliased", Name="prod")["Description"] == "production"
    lam.create_alias(FunctionName="aliased", Name="beta", FunctionVersion="2")
    lam.create_alias(FunctionName="aliased", Name="edge", FunctionVersion="$LATEST")

    aliases, _ = all_pages(lam.list_aliases, "Aliases", FunctionName="aliased")
    assert sorted(x["Name"] for x in aliases) == ["beta", "edge", "prod"]
    only_v2 = lam.list_aliases(FunctionName="aliased", FunctionVersion="2")["Aliases"]
    assert [x["Name"] for x in only_v2] == ["beta"]

    with pytest.raises(ClientError) as e:
        lam.update_alias(FunctionName="aliased", Name="prod", FunctionVersion="2", RevisionId="stale")
    assert error_of(e)[:2] == ("PreconditionFailedException", 412)
    updated = lam.update_alias(FunctionName="aliased", Name="prod", FunctionVersion="2", RevisionId=a["RevisionId"])
    assert updated["FunctionVersion"] == "2" and updated["RevisionId"] != a["RevisionId"]
    r, _ = call(lam, "aliased:prod", {})
    assert r["ExecutedVersion"] == "2"

    # A version an alias points to cannot be deleted.
    with pytest.raises(ClientError) as e:
        lam.delete_function(FunctionName="aliased", Qualifier="2")
    code, status, message = error_of(e)
    assert (code, status) == ("ResourceConflictException", 409) and "prod" in message

    for kw, expected in [
        ({"Name": "prod", "FunctionVersion": "1"}, ("ResourceConflictException", 409)),
        ({"Name": "123", "FunctionVersion": "1"}, (None, 400)),
        ({"Name": "ghost", "FunctionVersion": "9"}, ("ResourceNotFoundException", 404)),
        ({"Name": "w", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"2": 1.5}}}, (None, 400)),
        ({"Name": "w", "FunctionVersion": "$LATEST", "RoutingConfig": {"AdditionalVersionWeights": {"2": 0.5}}},
         ("InvalidParameterValueException", 400)),
        ({"Name": "w", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"1": 0.5}}},
         ("InvalidParameterValueException", 400)),
    ]:
        with pytest.raises(ClientError) as e:
            lam.create_alias(FunctionName="aliased", **kw)
        code, status, _ = error_of(e)
        assert status == expected[1], (kw, code)
        if expected[0]:
            assert code == expected[0], kw

    lam.delete_alias(FunctionName="aliased", Name="beta")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_alias(FunctionName="aliased", Name="beta")


def test_weighted_alias_routing_follows_the_weights(lam, artifacts):
    create(lam, "weighted", artifacts["hello"])
    lam.publish_version(FunctionName="weighted")
    lam.update_function_configuration(FunctionName="weighted", Description="second")
    lam.publish_version(FunctionName="weighted")
    lam.create_alias(FunctionName="weighted", Name="canary", FunctionVersion="1",
                     RoutingConfig={"AdditionalVersionWeights": {"2": 0.3}})
    got = lam.get_alias(FunctionName="weighted", Name="canary")
    assert got["RoutingConfig"]["AdditionalVersionWeights"] == {"2": 0.3}
    executed = Counter(call(lam, "weighted:canary", {"name": "w"})[0]["ExecutedVersion"] for _ in range(200))
    assert set(executed) == {"1", "2"}
    share = executed["2"] / 200
    assert 0.2 <= share <= 0.4, executed
    # Shifting all traffic back.
    lam.update_alias(FunctionName="weighted", Name="canary", RoutingConfig={"AdditionalVersionWeights": {}})
    executed = Counter(call(lam, "weighted:canary", {})[0]["ExecutedVersion"] for _ in range(20))
    assert executed == {"1": 20}


# --- layers ------------------------------------------------------------------


def test_layers_publish_list_and_merge_into_opt(lam, artifacts):
    l1 = lam.publish_layer_version(LayerName="shared", Description="base",
                                   Content={"ZipFile": zip_with({"lib/data.txt": "base", "lib/only1.txt": "1"})},
                                   CompatibleRuntimes=["wasip2"], CompatibleArchitectures=["x86_64"],
                                   LicenseInfo="MIT")
    assert l1["Version"] == 1
    assert l1["LayerArn"] == f"{ARN}:layer:shared"
    assert l1["LayerVersionArn"] == f"{ARN}:layer:shared:1"
    assert l1["Content"]["CodeSize"] > 0 and l1["Content"]["CodeSha256"]
    l2 = lam.publish_layer_version(LayerName="shared", Content={"ZipFile": zip_with({"lib/data.txt": "newer"})},
                                   CompatibleRuntimes=["wasip2"])
    assert l2["Version"] == 2
    over = lam.publish_layer_version(LayerName="override", Content={"ZipFile": zip_with({"lib/data.txt": "override"})})

    assert lam.get_layer_version(LayerName="shared", VersionNumber=1)["Description"] == "base"
    assert lam.get_layer_version(LayerName=f"{ARN}:layer:shared", VersionNumber=2)["Version"] == 2
    assert lam.get_layer_version_by_arn(Arn=f"{ARN}:layer:shared:1")["LicenseInfo"] == "MIT"
    content = urllib.request.urlopen(l1["Content"]["Location"]).read()
    assert zipfile.ZipFile(io.BytesIO(content)).read("lib/only1.txt") == b"1"

    versions, _ = all_pages(lam.list_layer_versions, "LayerVersions", LayerName="shared")
    assert [v["Version"] for v in versions] == [2, 1]
    layers, _ = all_pages(lam.list_layers, "Layers")
    by_name = {x["LayerName"]: x for x in layers}
    assert by_name["shared"]["LatestMatchingVersion"]["Version"] == 2
    assert "override" in by_name
    wasm_only = lam.list_layers(CompatibleRuntime="wasip2")["Layers"]
    assert [x["LayerName"] for x in wasm_only] == ["shared"]

    # Layers merge into /opt in order, read-only.
    create(lam, "layered", artifacts["misbehave"], Layers=[l1["LayerVersionArn"], over["LayerVersionArn"]])
    config = lam.get_function_configuration(FunctionName="layered")
    assert [x["Arn"] for x in config["Layers"]] == [l1["LayerVersionArn"], over["LayerVersionArn"]]
    _, body = call(lam, "layered", {"action": "read", "arg": "/opt/lib/data.txt"})
    assert body == {"ok": "override"}
    _, body = call(lam, "layered", {"action": "read", "arg": "/opt/lib/only1.txt"})
    assert body == {"ok": "1"}
    _, body = call(lam, "layered", {"action": "write", "arg": "/opt/lib/new.txt"})
    assert "err" in body

    lam.update_function_configuration(FunctionName="layered", Layers=[l2["LayerVersionArn"]])
    _, body = call(lam, "layered", {"action": "read", "arg": "/opt/lib/data.txt"})
    assert body == {"ok": "newer"}
    _, body = call(lam, "layered", {"action": "read", "arg": "/opt/lib/only1.txt"})
    assert "err" in body

    # Deleting a layer version does not break functions that use it.
    lam.delete_layer_version(LayerName="shared", VersionNumber=2)
    lam.delete_layer_version(LayerName="shared", VersionNumber=2)  # idempotent
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_layer_version(LayerName="shared", VersionNumber=2)
    _, body = call(lam, "layered", {"action": "read", "arg": "/opt/lib/data.txt"})
    assert body == {"ok": "newer"}
    assert lam.publish_layer_version(LayerName="shared", Content={"ZipFile": zip_with({"x": "y"})})["Version"] == 3

    for layers, fragment in [
        ([f"{ARN}:layer:shared:99"], "does not exist"),
        ([l1["LayerVersionArn"]] * 6, "more than 5"),
        ([l1["LayerVersionArn"], f"{ARN}:layer:shared:3"], "same layer"),
    ]:
        with pytest.raises(ClientError) as e:
            lam.update_function_configuration(FunctionName="layered", Layers=layers)
        code, status, message = error_of(e)
        assert (code, status) == ("InvalidParameterValueException", 400) and fragment in message, message


def test_code_and_layers_together_stay_under_250_mb(lam, artifacts):
    big = zip_with({"big.bin": b"\0" * (150 * 1024 * 1024)})
    a = lam.publish_layer_version(LayerName="big-a", Content={"ZipFile": big})
    b = lam.publish_layer_version(LayerName="big-b", Content={"ZipFile": big})
    create(lam, "heavy", artifacts["hello"], Layers=[a["LayerVersionArn"]])
    with pytest.raises(ClientError) as e:
        lam.update_function_configuration(FunctionName="heavy", Layers=[a["LayerVersionArn"], b["LayerVersionArn"]])
    code, status, message = error_of(e)
    assert (code, status) == ("InvalidParameterValueException", 400)
    assert "262144000" in message


def test_layer_version_policy(lam):
    lam.publish_layer_version(LayerName="shared-policy", Content={"ZipFile": zip_with({"a": "b"})})
    added = lam.add_layer_version_permission(LayerName="shared-policy", VersionNumber=1, StatementId="everyone",
                                             Action="lambda:GetLayerVersion", Principal="*")
    statement = json.loads(added["Statement"])
    assert statement["Sid"] == "everyone" and statement["Resource"] == f"{ARN}:layer:shared-policy:1"
    policy = lam.get_layer_version_policy(LayerName="shared-policy", VersionNumber=1)
    assert json.loads(policy["Policy"])["Statement"][0]["Principal"] == "*"
    with pytest.raises(ClientError) as e:
        lam.add_layer_version_permission(LayerName="shared-policy", VersionNumber=1, StatementId="everyone",
                                         Action="lambda:GetLayerVersion", Principal="*")
    assert error_of(e)[:2] == ("ResourceConflictException", 409)
    lam.remove_layer_version_permission(LayerName="shared-policy", VersionNumber=1, StatementId="everyone")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_layer_version_policy(LayerName="shared-policy", VersionNumber=1)


# --- resource policies -------------------------------------------------------


def test_resource_policies_per_function_and_qualifier(lam, artifacts):
    create(lam, "guarded", artifacts["hello"])
    lam.publish_version(FunctionName="guarded")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_policy(FunctionName="guarded")
    added = lam.add_permission(FunctionName="guarded", StatementId="s3-invoke", Action="lambda:InvokeFunction",
                               Principal="s3.amazonaws.com", SourceArn="arn:aws:s3:::bucket",
                               SourceAccount="000000000000")
    statement = json.loads(added["Statement"])
    assert statement == {
        "Sid": "s3-invoke",
        "Effect": "Allow",
        "Principal": {"Service": "s3.amazonaws.com"},
        "Action": "lambda:InvokeFunction",
        "Resource": f"{ARN}:function:guarded",
        "Condition": {"StringEquals": {"AWS:SourceAccount": "000000000000"},
                      "ArnLike": {"AWS:SourceArn": "arn:aws:s3:::bucket"}},
    }
    lam.add_permission(FunctionName="guarded", StatementId="account", Action="lambda:GetFunction",
                       Principal="123456789012")
    policy = lam.get_policy(FunctionName="guarded")
    doc = json.loads(policy["Policy"])
    assert doc["Version"] == "2012-10-17"
    assert [s["Sid"] for s in doc["Statement"]] == ["s3-invoke", "account"]
    assert doc["Statement"][1]["Principal"] == {"AWS": "arn:aws:iam::123456789012:root"}

    with pytest.raises(ClientError) as e:
        lam.add_permission(FunctionName="guarded", StatementId="account", Action="lambda:GetFunction", Principal="*")
    assert error_of(e)[:2] == ("ResourceConflictException", 409)
    with pytest.raises(ClientError) as e:
        lam.add_permission(FunctionName="guarded", StatementId="x", Action="s3:GetObject", Principal="*")
    assert error_of(e)[1] == 400
    with pytest.raises(ClientError) as e:
        lam.remove_permission(FunctionName="guarded", StatementId="account", RevisionId="stale")
    assert error_of(e)[:2] == ("PreconditionFailedException", 412)

    # A version has its own policy.
    lam.add_permission(FunctionName="guarded", Qualifier="1", StatementId="v1", Action="lambda:InvokeFunction",
                       Principal="*")
    v1 = json.loads(lam.get_policy(FunctionName="guarded", Qualifier="1")["Policy"])
    assert [s["Resource"] for s in v1["Statement"]] == [f"{ARN}:function:guarded:1"]

    lam.remove_permission(FunctionName="guarded", StatementId="account", RevisionId=policy["RevisionId"])
    doc = json.loads(lam.get_policy(FunctionName="guarded")["Policy"])
    assert [s["Sid"] for s in doc["Statement"]] == ["s3-invoke"]
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.remove_permission(FunctionName="guarded", StatementId="account")


# --- concurrency --------------------------------------------------------------


def test_reserved_concurrency_and_account_settings(lam, artifacts):
    create(lam, "reserved", artifacts["hello"])
    before = lam.get_account_settings()
    assert before["AccountLimit"]["ConcurrentExecutions"] == 1000
    assert before["AccountLimit"]["CodeSizeZipped"] == 52428800
    assert before["AccountLimit"]["CodeSizeUnzipped"] == 262144000
    assert before["AccountUsage"]["FunctionCount"] >= 1
    assert lam.get_function_concurrency(FunctionName="reserved").get("ReservedConcurrentExecutions") is None

    assert lam.put_function_concurrency(FunctionName="reserved", ReservedConcurrentExecutions=25)[
        "ReservedConcurrentExecutions"] == 25
    assert lam.get_function_concurrency(FunctionName="reserved")["ReservedConcurrentExecutions"] == 25
    assert lam.get_function(FunctionName="reserved")["Concurrency"] == {"ReservedConcurrentExecutions": 25}
    after = lam.get_account_settings()
    assert after["AccountLimit"]["UnreservedConcurrentExecutions"] == \
        before["AccountLimit"]["UnreservedConcurrentExecutions"] - 25

    with pytest.raises(ClientError) as e:
        lam.put_function_concurrency(FunctionName="reserved", ReservedConcurrentExecutions=950)
    code, status, message = error_of(e)
    assert (code, status) == ("InvalidParameterValueException", 400) and "[100]" in message

    lam.delete_function_concurrency(FunctionName="reserved")
    assert "ReservedConcurrentExecutions" not in lam.get_function_concurrency(FunctionName="reserved")


def test_provisioned_concurrency_warms_environments(lam, artifacts):
    create(lam, "provisioned", artifacts["misbehave"])
    lam.publish_version(FunctionName="provisioned")
    lam.create_alias(FunctionName="provisioned", Name="live", FunctionVersion="1")

    with pytest.raises(ClientError) as e:
        lam.put_provisioned_concurrency_config(FunctionName="provisioned", Qualifier="$LATEST",
                                               ProvisionedConcurrentExecutions=1)
    assert error_of(e)[:2] == ("InvalidParameterValueException", 400)
    with pytest.raises(lam.exceptions.ProvisionedConcurrencyConfigNotFoundException):
        lam.get_provisioned_concurrency_config(FunctionName="provisioned", Qualifier="live")

    put = lam.put_provisioned_concurrency_config(FunctionName="provisioned", Qualifier="live",
                                                 ProvisionedConcurrentExecutions=2)
    assert put["RequestedProvisionedConcurrentExecutions"] == 2
    assert put["Status"] in ("IN_PROGRESS", "READY")
    # Users poll for READY; so does this test, within a bounded time.
    deadline = time.monotonic() + 30
    while True:
        got = lam.get_provisioned_concurrency_config(FunctionName="provisioned", Qualifier="live")
        if got["Status"] == "READY" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert got["Status"] == "READY", got
    assert got["AvailableProvisionedConcurrentExecutions"] == 2
    assert got["AllocatedProvisionedConcurrentExecutions"] == 2

    # The first call already finds a warm, provisioned environment.
    r = lam.invoke(FunctionName="provisioned:live", Payload=json.dumps({"action": "env"}).encode(), LogType="Tail")
    env = json.loads(r["Payload"].read())
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "provisioned-concurrency"
    assert "Init Duration" not in base64.b64decode(r["LogResult"]).decode()

    configs, _ = all_pages(lam.list_provisioned_concurrency_configs, "ProvisionedConcurrencyConfigs",
                           FunctionName="provisioned")
    assert [c["FunctionArn"] for c in configs] == [f"{ARN}:function:provisioned:live"]

    lam.delete_provisioned_concurrency_config(FunctionName="provisioned", Qualifier="live")
    with pytest.raises(lam.exceptions.ProvisionedConcurrencyConfigNotFoundException):
        lam.get_provisioned_concurrency_config(FunctionName="provisioned", Qualifier="live")


# --- asynchronous invocation settings -----------------------------------------


def test_event_invoke_configs(lam, artifacts):
    create(lam, "async-settings", artifacts["hello"])
    lam.publish_version(FunctionName="async-settings")
    dlq = f"{ARN}:function:dead-letters"
    put = lam.put_function_event_invoke_config(
        FunctionName="async-settings", MaximumRetryAttempts=1, MaximumEventAgeInSeconds=120,
        DestinationConfig={"OnFailure": {"Destination": dlq}})
    assert put["FunctionArn"] == f"{ARN}:function:async-settings:$LATEST"
    assert put["MaximumRetryAttempts"] == 1 and put["MaximumEventAgeInSeconds"] == 120
    assert put["DestinationConfig"]["OnFailure"]["Destination"] == dlq
    assert put["LastModified"].year >= 2024

    updated = lam.update_function_event_invoke_config(FunctionName="async-settings", MaximumRetryAttempts=0)
    assert updated["MaximumRetryAttempts"] == 0 and updated["MaximumEventAgeInSeconds"] == 120
    replaced = lam.put_function_event_invoke_config(FunctionName="async-settings", MaximumRetryAttempts=2)
    assert "MaximumEventAgeInSeconds" not in replaced

    lam.put_function_event_invoke_config(FunctionName="async-settings", Qualifier="1", MaximumRetryAttempts=0)
    assert lam.get_function_event_invoke_config(FunctionName="async-settings", Qualifier="1")["MaximumRetryAttempts"] == 0
    configs, _ = all_pages(lam.list_function_event_invoke_configs, "FunctionEventInvokeConfigs",
                           FunctionName="async-settings")
    assert sorted(c["FunctionArn"] for c in configs) == [f"{ARN}:function:async-settings:$LATEST",
                                                         f"{ARN}:function:async-settings:1"]

    for kw in ({"MaximumRetryAttempts": 3}, {"MaximumEventAgeInSeconds": 21601},
               {"DestinationConfig": {"OnSuccess": {"Destination": "not-an-arn"}}}):
        with pytest.raises(ClientError) as e:
            lam.put_function_event_invoke_config(FunctionName="async-settings", **kw)
        assert error_of(e)[1] == 400, kw

    lam.delete_function_event_invoke_config(FunctionName="async-settings", Qualifier="1")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function_event_invoke_config(FunctionName="async-settings", Qualifier="1")


# --- tags --------------------------------------------------------------------


def test_tags(lam, artifacts):
    create(lam, "tagged", artifacts["hello"], Tags={"team": "kiln", "stage": "dev"})
    arn = f"{ARN}:function:tagged"
    assert lam.list_tags(Resource=arn)["Tags"] == {"team": "kiln", "stage": "dev"}
    lam.tag_resource(Resource=arn, Tags={"stage": "prod", "owner": "ops"})
    assert lam.list_tags(Resource=arn)["Tags"] == {"team": "kiln", "stage": "prod", "owner": "ops"}
    lam.untag_resource(Resource=arn, TagKeys=["team", "owner"])
    assert lam.list_tags(Resource=arn)["Tags"] == {"stage": "prod"}
    assert lam.get_function(FunctionName="tagged")["Tags"] == {"stage": "prod"}
    with pytest.raises(ClientError) as e:
        lam.tag_resource(Resource=f"{arn}:1", Tags={"a": "b"})
    assert error_of(e)[1] == 400
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.list_tags(Resource=f"{ARN}:function:untagged-nothing")


# --- configuration fields and validation --------------------------------------


def test_configuration_fields_round_trip(server, lam, artifacts, tmp_path):
    # Another role of this account, for the update below.
    nothing = tmp_path / "nothing.json"
    nothing.write_text(json.dumps({"Statement": []}))
    kiln(server, "roles", "create", "other", "--policy", str(nothing))
    c = create(lam, "fields", artifacts["hello"], Description="d", Timeout=30, MemorySize=512,
               EphemeralStorage={"Size": 1024}, Architectures=["x86_64"], PackageType="Zip",
               Environment={"Variables": {"A_B": "c"}})
    assert c["Handler"] == "function.wasm" and c["Runtime"] == "wasip2" and c["Role"] == ROLE
    assert c["EphemeralStorage"] == {"Size": 1024}
    assert c["Architectures"] == ["x86_64"] and c["PackageType"] == "Zip"
    assert c["State"] == "Active" and c["LastUpdateStatus"] == "Successful"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000", c["LastModified"])
    u = lam.update_function_configuration(FunctionName="fields", EphemeralStorage={"Size": 10240}, MemorySize=10240,
                                          Timeout=900, Role="arn:aws:iam::000000000000:role/other")
    lam.get_waiter("function_updated_v2").wait(FunctionName="fields", WaiterConfig={"Delay": 1, "MaxAttempts": 5})
    assert (u["EphemeralStorage"]["Size"], u["MemorySize"], u["Timeout"]) == (10240, 10240, 900)
    assert u["Role"].endswith("role/other")

    for kw in ({"EphemeralStorage": {"Size": 10241}}, {"MemorySize": 10241}, {"Timeout": 901},
               {"Description": "x" * 257}, {"Handler": "has space"}, {"Role": "nope"},
               {"Environment": {"Variables": {"LAMBDA_TASK_ROOT": "x"}}},
               {"Environment": {"Variables": {"K": "v" * 5000}}}):
        with pytest.raises(ClientError) as e:
            lam.update_function_configuration(FunctionName="fields", **kw)
        assert error_of(e)[1] == 400, kw
    for kw in ({"Architectures": ["arm64"]}, {"PackageType": "Image"}, {"Runtime": "python3.12"}):
        with pytest.raises(ClientError) as e:
            create(lam, "fields-bad", artifacts["hello"], **kw)
        assert error_of(e)[:2] == ("InvalidParameterValueException", 400), kw


def test_deprecated_runtimes_are_refused_and_listed(lam, artifacts):
    with pytest.raises(ClientError) as e:
        create(lam, "old-runtime", artifacts["hello"], Runtime="provided", Handler="bootstrap")
    code, status, message = error_of(e)
    assert (code, status) == ("InvalidParameterValueException", 400)
    assert "no longer supported for creating or updating" in message
    out = subprocess.run([kiln_bin(), "runtimes", "--output", "json"], check=True, capture_output=True, text=True)
    runtimes = {r["Runtime"]: r for r in json.loads(out.stdout)}
    assert set(runtimes) == {"wasip2", "provided", "provided.al2", "provided.al2023"}
    assert runtimes["wasip2"]["State"] == "supported"
    assert runtimes["provided"]["State"].startswith("deprecated")
    assert runtimes["provided"]["BlockFunctionCreateDate"] == "2024-02-08"


def test_list_functions_with_all_versions(lam, artifacts):
    create(lam, "listed", artifacts["hello"])
    lam.publish_version(FunctionName="listed")
    functions, _ = all_pages(lam.list_functions, "Functions", FunctionVersion="ALL")
    listed = [(f["FunctionName"], f["Version"]) for f in functions if f["FunctionName"] == "listed"]
    assert listed == [("listed", "$LATEST"), ("listed", "1")]
    plain = [f["Version"] for f in lam.list_functions()["Functions"] if f["FunctionName"] == "listed"]
    assert plain == ["$LATEST"]


def test_no_request_makes_a_500(server, artifacts):
    """Malformed bodies, wrong types and odd paths on every route: always a
    4xx with Lambda's error shape, never a server error."""
    create(server.client(), "target", artifacts["hello"])
    routes = [
        ("POST", "/2015-03-31/functions"),
        ("PUT", "/2015-03-31/functions/target/configuration"),
        ("PUT", "/2015-03-31/functions/target/code"),
        ("POST", "/2015-03-31/functions/target/versions"),
        ("POST", "/2015-03-31/functions/target/aliases"),
        ("PUT", "/2015-03-31/functions/target/aliases/x"),
        ("POST", "/2015-03-31/functions/target/policy"),
        ("PUT", "/2017-10-31/functions/target/concurrency"),
        ("PUT", "/2019-09-30/functions/target/provisioned-concurrency?Qualifier=1"),
        ("PUT", "/2019-09-25/functions/target/event-invoke-config"),
        ("POST", "/2017-03-31/tags/arn:aws:lambda:us-east-1:000000000000:function:target"),
        ("POST", "/2018-10-31/layers/l/versions"),
        ("POST", "/2018-10-31/layers/l/versions/1/policy"),
        ("GET", "/2015-03-31/functions/target?Qualifier=bad%20q"),
        ("GET", "/2015-03-31/functions/?MaxItems=0"),
        ("GET", "/2015-03-31/functions/?MaxItems=abc"),
        ("GET", "/2015-03-31/functions/?Marker=!!!"),
        ("GET", "/2018-10-31/layers/l/versions/notanumber"),
        ("DELETE", "/2018-10-31/layers/bad%20name/versions/1"),
        ("GET", "/2015-03-31/functions/arn:aws:lambda:us-east-1:000000000000:function:target:1:2"),
        ("DELETE", "/2017-03-31/tags/not-an-arn?tagKeys=a"),
    ]
    bodies = [b"", b"{", b"[]", b"null", b'{"FunctionName": 5, "Role": [], "Code": "x"}',
              b'{"ReservedConcurrentExecutions": "many"}', b'{"Name": "a", "FunctionVersion": 1}',
              b'{"Tags": {"a": 1}}', b'{"MaximumRetryAttempts": -1, "Content": {"ZipFile": "%%%"}}',
              json.dumps({"FunctionName": "x" * 5000, "Role": ROLE, "Runtime": "wasip2", "Code": {"ZipFile": "AAAA"}}).encode()]
    for method, path in routes:
        for body in bodies:
            req = urllib.request.Request(server.endpoint + path, data=body if method != "GET" else None, method=method)
            try:
                with signed_urlopen(req) as r:
                    status, headers = r.status, r.headers
            except urllib.error.HTTPError as e:
                status, headers = e.code, e.headers
                payload = json.loads(e.read() or b"{}")
                assert "message" in payload, (method, path, body, payload)
                assert headers.get("x-amzn-ErrorType"), (method, path, body)
            assert status < 500, (method, path, body, status)


# --- the AWS CLI's own request shapes ----------------------------------------


def aws(server, *args):
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
               AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1", AWS_PAGER="")
    cli = os.path.join(os.path.dirname(os.path.realpath(os.sys.executable)), "aws")
    out = subprocess.run([cli, "--endpoint-url", server.endpoint, "--output", "json", "lambda", *args],
                         capture_output=True, text=True, env=env, timeout=60)
    return out


def test_the_aws_cli_works_unchanged(server, artifacts, tmp_path):
    zip_path = tmp_path / "hello.zip"
    zip_path.write_bytes(artifacts["hello"])
    out = aws(server, "create-function", "--function-name", "cli-hello", "--runtime", "wasip2",
              "--handler", "function.wasm", "--role", ROLE, "--zip-file", f"fileb://{zip_path}")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["FunctionArn"] == f"{ARN}:function:cli-hello"

    out = aws(server, "wait", "function-active-v2", "--function-name", "cli-hello")
    assert out.returncode == 0, out.stderr

    response = tmp_path / "out.json"
    out = aws(server, "invoke", "--function-name", "cli-hello", "--payload", '{"name":"CLI"}', str(response))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["StatusCode"] == 200
    assert json.loads(response.read_text())["greeting"] == "Hello, CLI!"

    out = aws(server, "publish-version", "--function-name", "cli-hello", "--description", "from the cli")
    assert out.returncode == 0, out.stderr and json.loads(out.stdout)["Version"] == "1"
    out = aws(server, "create-alias", "--function-name", "cli-hello", "--name", "live", "--function-version", "1")
    assert out.returncode == 0, out.stderr
    out = aws(server, "list-versions-by-function", "--function-name", "cli-hello")
    assert [v["Version"] for v in json.loads(out.stdout)["Versions"]] == ["$LATEST", "1"]
    out = aws(server, "list-functions")
    assert out.returncode == 0 and "cli-hello" in [f["FunctionName"] for f in json.loads(out.stdout)["Functions"]]
    out = aws(server, "get-alias", "--function-name", "cli-hello", "--name", "live")
    assert json.loads(out.stdout)["FunctionVersion"] == "1"
    out = aws(server, "put-function-concurrency", "--function-name", "cli-hello", "--reserved-concurrent-executions", "5")
    assert json.loads(out.stdout) == {"ReservedConcurrentExecutions": 5}
    out = aws(server, "get-account-settings")
    assert json.loads(out.stdout)["AccountLimit"]["ConcurrentExecutions"] == 1000

    # Errors come back as the CLI prints Lambda's.
    out = aws(server, "get-function", "--function-name", "cli-missing")
    assert out.returncode != 0
    assert "ResourceNotFoundException" in out.stderr
