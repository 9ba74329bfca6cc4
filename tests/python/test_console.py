"""The web console at /console as a user meets it: sign in with an access
key, read functions, charts, recent invocations and their logs, and change
nothing. The browser test drives Debian's headless Chromium and keeps a
screenshot in target/artifacts/console.png."""

import http.cookiejar
import json
import pathlib
import shutil
import time
import urllib.error
import urllib.request

import pytest

from conftest import ACCESS_KEY, ROOT, SECRET_KEY, create, kiln

ARTIFACTS = ROOT / "target" / "artifacts"


def opener():
    """A urllib opener that keeps cookies, as a browser does."""
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))


def call(op, url, method="GET", body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with op.open(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, resp.headers, json.loads(raw) if raw.startswith(b"{") else raw
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, e.headers, json.loads(raw) if raw.startswith(b"{") else raw


def trail(server):
    path = server.data_dir / "audit" / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def login(server, op, key_id=ACCESS_KEY, secret=SECRET_KEY):
    return call(op, server.endpoint + "/console/login", "POST",
                json.dumps({"AccessKeyId": key_id, "SecretAccessKey": secret}).encode(),
                {"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def deployed(server, lam, artifacts):
    """One function with a version and an alias, invoked three times (one
    failure). Returns its name and the request ids."""
    name = "console-fn"
    create(lam, name, artifacts["misbehave"], Description="for the console",
           LoggingConfig={"LogFormat": "JSON"})
    lam.publish_version(FunctionName=name)
    lam.create_alias(FunctionName=name, Name="live", FunctionVersion="1")
    ids = []
    for action in ("echo", "log", "error"):
        r = lam.invoke(FunctionName=name, Payload=json.dumps({"action": action, "arg": 1}).encode())
        ids.append(r["ResponseMetadata"]["RequestId"])
    return name, ids


def test_the_page_loads_nothing_from_elsewhere(server):
    status, headers, body = call(opener(), server.endpoint + "/console")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert b"<form id=\"login\"" in body


def test_a_session_reads_as_its_key_and_changes_nothing(server, lam, deployed, tmp_path):
    name, _ = deployed
    op = opener()
    status, _, err = login(server, op, secret="wrong-secret")
    assert (status, err["Type"]) == (403, "User")
    assert "not right" in err["message"]
    status, _, err = call(op, server.endpoint + "/console/session")
    assert status == 401

    status, headers, _ = login(server, op)
    assert status == 204
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, _, who = call(op, server.endpoint + "/console/session")
    assert (status, who["Principal"]) == (200, "arn:aws:iam::000000000000:root")
    status, _, listed = call(op, server.endpoint + "/2015-03-31/functions")
    assert status == 200 and name in [f["FunctionName"] for f in listed["Functions"]]

    # Read-only: a change with the cookie is refused, and nothing changed.
    status, headers, err = call(op, f"{server.endpoint}/2015-03-31/functions/{name}", "DELETE")
    assert (status, headers["x-amzn-ErrorType"]) == (403, "AccessDeniedException")
    assert "may only read" in err["message"]
    assert lam.get_function(FunctionName=name)["Configuration"]["FunctionName"] == name

    # A key with a narrow policy sees only what the policy allows.
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "lambda:ListFunctions", "Resource": "*"}]}
    path = tmp_path / "viewer.json"
    path.write_text(json.dumps(policy))
    key = kiln(server, "keys", "create", "viewer", "--policy", str(path))["AccessKey"]
    viewer = opener()
    assert login(server, viewer, key["AccessKeyId"], key["SecretAccessKey"])[0] == 204
    assert call(viewer, server.endpoint + "/2015-03-31/functions")[0] == 200
    status, headers, _ = call(viewer, f"{server.endpoint}/kiln/functions/{name}/activity")
    assert (status, headers["x-amzn-ErrorType"]) == (403, "AccessDeniedException")

    # Deleting the key ends its sessions.
    kiln(server, "keys", "delete", key["AccessKeyId"])
    status, headers, _ = call(viewer, server.endpoint + "/2015-03-31/functions")
    assert (status, headers["x-amzn-ErrorType"]) == (403, "UnrecognizedClientException")

    # Sign-ins with a key that exists are in the audit trail, the refused
    # one too; a name that is no key is not (it may be a pasted secret).
    assert login(server, opener(), "not-a-key-id", "x")[0] == 403
    logins = [r for r in trail(server) if r.get("action") == "ConsoleLogin"]
    assert [r["status"] for r in logins][-3:] == [403, 204, 204]
    assert not any("not-a-key-id" in json.dumps(r) for r in trail(server))
    # A sign-in is small: a large body is refused before it is read whole.
    status, headers, _ = call(opener(), server.endpoint + "/console/login", "POST", b"{" + b" " * 10_000 + b"}",
                              {"Content-Type": "application/json"})
    assert (status, headers["x-amzn-ErrorType"]) == (413, "RequestEntityTooLargeException")

    # A console's reads are recorded once per resource and window, however
    # often its page polls.
    reads = lambda: [r for r in trail(server) if r.get("action") == "GetFunction"
                     and r.get("principal") == "arn:aws:iam::000000000000:root"]
    before = len(reads())
    for _ in range(3):
        assert call(op, f"{server.endpoint}/2015-03-31/functions/{name}")[0] == 200
    assert len(reads()) == before + 1


def test_activity_counts_the_invocations_and_finds_their_logs(server, deployed):
    name, ids = deployed
    op = opener()
    login(server, op)
    status, _, act = call(op, f"{server.endpoint}/kiln/functions/{name}/activity")
    assert status == 200
    assert act["PeriodSeconds"] == 10 and len(act["Buckets"]) == 180
    assert sum(b["Invocations"] for b in act["Buckets"]) == 3
    assert sum(b["Errors"] for b in act["Buckets"]) == 1
    assert sum(b["ColdStarts"] for b in act["Buckets"]) == 1
    busy = [b for b in act["Buckets"] if b["Invocations"]]
    assert all(b["P50Ms"] is not None and b["P50Ms"] <= b["P99Ms"] for b in busy)
    assert [r["RequestId"] for r in act["Recent"]] == ids[::-1]
    assert act["Recent"][0]["Error"] is not None and act["Recent"][1]["Error"] is None
    assert act["Queue"] == {"Pending": 0}

    # The function logs JSON: its invocation's records, start to report.
    status, _, logs = call(op, f"{server.endpoint}/kiln/functions/{name}/logs?requestId={ids[1]}")
    assert status == 200
    records = [json.loads(e["message"]) for e in logs["Events"]]
    assert records[0]["type"] == "platform.start" and records[0]["record"]["requestId"] == ids[1]
    assert records[-1]["type"] == "platform.report" and records[-1]["record"]["status"] == "success"
    structured = [r for r in records if r.get("message") == "structured"]
    assert structured and structured[0]["level"] == "INFO" and structured[0]["key"] == "value"


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "Debian's chromium and chromium-driver are needed: ./scripts/test.sh installs them"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000",
                "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_console_in_headless_chromium(server, lam, deployed):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    name, ids = deployed
    browser = chromium()
    try:
        wait = WebDriverWait(browser, 30, poll_frequency=0.2)
        browser.get(server.endpoint + "/console")
        wait.until(lambda b: b.find_element(By.ID, "access-key-id").is_displayed())
        browser.find_element(By.ID, "access-key-id").send_keys(ACCESS_KEY)
        browser.find_element(By.ID, "secret-access-key").send_keys(SECRET_KEY)
        browser.find_element(By.ID, "login-submit").click()

        row = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, f'tr.function[data-name="{name}"]'))
        assert "Signed" not in browser.find_element(By.ID, "error").text
        row[0].find_element(By.TAG_NAME, "a").click()

        # The three invocations are in the invocations chart, the failure in
        # the errors chart.
        chart = wait.until(lambda b: [c for c in b.find_elements(By.ID, "chart-invocations")
                                      if c.get_attribute("data-total") == "3"])[0]
        bars = chart.find_elements(By.CSS_SELECTOR, "rect.bar")
        assert len(bars) == 180
        assert sum(int(b.get_attribute("data-count")) for b in bars) == 3
        assert browser.find_element(By.ID, "chart-errors").get_attribute("data-total") == "1"
        assert browser.find_elements(By.CSS_SELECTOR, "#chart-duration polyline.p50") or \
            browser.find_elements(By.CSS_SELECTOR, "#chart-duration circle.point-p50")

        # Configuration, versions and aliases.
        config = browser.find_element(By.ID, "config").text
        assert "wasip2" in config and "JSON" in config
        versions = [v.get_attribute("data-version") for v in browser.find_elements(By.CSS_SELECTOR, "tr.version")]
        assert "1" in versions
        assert browser.find_elements(By.CSS_SELECTOR, 'tr.alias[data-alias="live"]')

        # Recent invocations, and the logs of one of them.
        rows = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "tr.invocation"))
        assert [r.get_attribute("data-request-id") for r in rows] == ids[::-1]
        rows[1].click()
        wait.until(lambda b: ids[1] in b.find_element(By.ID, "logs").text)
        assert "platform.report" in browser.find_element(By.ID, "logs").text

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "console.png"))
        assert (ARTIFACTS / "console.png").stat().st_size > 10_000

        # Nothing was blocked or failed in the page (but the first look at
        # the session, made before signing in).
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
                  and not ("/console/session" in e["message"] and "401" in e["message"])]
        assert severe == [], severe
    finally:
        browser.quit()
