"""Issue 4: durability of asynchronous invocation under crashes. 500 Event
invocations are sent while the server is killed with SIGKILL three times
and restarted; every event that got a 202 must be processed at least once
(checked through its OnSuccess record). Duplicates are counted and printed,
not hidden."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from conftest import KilnServer, create, signed_urlopen

BUILTIN_QUEUE = "arn:aws:sqs:us-east-1:000000000000:kiln-dlq"
EVENTS = 500
KILL_AT = (100, 250, 400)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_acknowledged_events_survive_sigkill(tmp_path, artifacts):
    port = free_port()
    data = tmp_path / "data"
    server = KilnServer(data, listen=f"127.0.0.1:{port}").start()
    endpoint = server.endpoint
    lam = server.client()
    create(lam, "crash-sink", artifacts["misbehave"])
    lam.put_function_event_invoke_config(FunctionName="crash-sink",
                                         DestinationConfig={"OnSuccess": {"Destination": BUILTIN_QUEUE}})

    acked = {}
    lock = threading.Lock()
    up = threading.Event()
    up.set()
    failed_sends = 0

    def send(i):
        nonlocal failed_sends
        body = json.dumps({"action": "echo", "arg": i}).encode()
        for _ in range(2000):
            up.wait(60)
            req = urllib.request.Request(f"{endpoint}/2015-03-31/functions/crash-sink/invocations", data=body,
                                         method="POST", headers={"X-Amz-Invocation-Type": "Event"})
            try:
                with signed_urlopen(req, timeout=10) as r:
                    if r.status == 202:
                        with lock:
                            acked[i] = r.headers["x-amzn-RequestId"]
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                with lock:
                    failed_sends += 1
                time.sleep(0.01)
        raise AssertionError(f"event {i} was never acknowledged")

    kills = 0
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(send, i) for i in range(EVENTS)]
        for threshold in KILL_AT:
            while True:
                with lock:
                    n = len(acked)
                if n >= threshold:
                    break
                time.sleep(0.001)
            up.clear()
            server.kill()
            kills += 1
            server = KilnServer(data, listen=f"127.0.0.1:{port}").start()
            up.set()
        for f in futures:
            f.result()
    assert kills == 3 and len(acked) == EVENTS

    # Every acknowledged event runs; users poll the queue, so does the test.
    wanted = set(acked.values())
    deadline = time.monotonic() + 120
    while True:
        recs, marker = [], None
        while True:
            url = f"{endpoint}/kiln/queue/crash-sink/records?MaxItems=1000" + (f"&Marker={marker}" if marker else "")
            page = json.loads(signed_urlopen(url).read())
            recs += page["Records"]
            marker = page.get("NextMarker")
            if not marker:
                break
        seen = {r["request_id"] for r in recs}
        if wanted <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    server.stop()
    missing = wanted - seen
    assert not missing, f"{len(missing)} acknowledged events were never processed"
    assert all(r["condition"] == "Success" for r in recs)
    records_per_event = len(recs) - len(seen)
    reinvoked = [r for r in recs if r["record"]["requestContext"]["approximateInvokeCount"] > 1]
    extra = sum(r["record"]["requestContext"]["approximateInvokeCount"] - 1 for r in recs)
    print(f"\ncrash test: {EVENTS} events acknowledged across {kills} SIGKILLs ({failed_sends} sends refused while "
          f"down); {len(recs)} success records for {len(seen)} events (duplicate records: {records_per_event}); "
          f"{len(reinvoked)} events started more than once ({extra} extra invocations)")
