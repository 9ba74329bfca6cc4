"""Fixtures for kiln's end-to-end tests: the real `kiln` binary, started on a
free loopback port with its own data dir, driven with boto3 as a Lambda user
would drive AWS.

Environment:
  KILN_BIN   path of the kiln binary (the test command sets it)
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading

import urllib.request

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

ROOT = pathlib.Path(__file__).resolve().parents[2]
READY = re.compile(r"kiln listening on (http://\S+)")

# The root key every test server is started with (KILN_ROOT_*).
ACCESS_KEY = "AKIAKILNTEST0000"
SECRET_KEY = "kiln-test-secret-kiln-test-secret-000000"
ROOT_ENV = {"KILN_ROOT_ACCESS_KEY_ID": ACCESS_KEY, "KILN_ROOT_SECRET_ACCESS_KEY": SECRET_KEY}


def sign(req: urllib.request.Request, access_key=ACCESS_KEY, secret_key=SECRET_KEY, token=None):
    """Signs a urllib request with SigV4, as the AWS SDKs would."""
    aws = AWSRequest(method=req.get_method(), url=req.full_url, data=req.data or b"",
                     headers=dict(req.header_items()))
    SigV4Auth(Credentials(access_key, secret_key, token), "lambda", "us-east-1").add_auth(aws)
    for k, v in aws.headers.items():
        req.add_unredirected_header(k, v)
    return req


def signed_urlopen(req, timeout=None, **creds):
    """urllib.request.urlopen of a SigV4-signed request (a URL or a Request)."""
    if isinstance(req, str):
        req = urllib.request.Request(req)
    return urllib.request.urlopen(sign(req, **creds), timeout=timeout)


def kiln_bin() -> str:
    path = os.environ.get("KILN_BIN")
    if not path:
        pytest.exit("KILN_BIN is not set: run the suite with ./scripts/test.sh", returncode=2)
    return path


class KilnServer:
    """One `kiln serve` process on 127.0.0.1 with a private data dir."""

    def __init__(self, data_dir: pathlib.Path, extra_args=(), env=None, listen="127.0.0.1:0", root_env=True,
                 pass_fds=(), preexec_fn=None):
        self.data_dir = data_dir
        self.pass_fds = tuple(pass_fds)
        self.preexec_fn = preexec_fn
        self.listen = listen
        self.extra_args = list(extra_args)
        self.env = dict(os.environ, **(ROOT_ENV if root_env else {}), **(env or {}))
        if not root_env:
            for k in ROOT_ENV:
                self.env.pop(k, None)
        self.stdout_lines = []
        self.proc = None
        self.endpoint = None
        self.stderr_lines = []

    def start(self, timeout=30.0):
        self.proc = subprocess.Popen(
            [kiln_bin(), "serve", "--listen", self.listen, "--data-dir", str(self.data_dir), *self.extra_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            pass_fds=self.pass_fds,
            preexec_fn=self.preexec_fn,
        )
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        # The server prints its address once it listens: wait for that line.
        found = {}

        def read_ready():
            for line in self.proc.stdout:
                self.stdout_lines.append(line)
                m = READY.search(line)
                if m:
                    found["endpoint"] = m.group(1)
                    return

        reader = threading.Thread(target=read_ready, daemon=True)
        reader.start()
        reader.join(timeout)
        if "endpoint" not in found:
            self.stop()
            raise RuntimeError("kiln did not start:\n" + "".join(self.stderr_lines[-50:]))
        self.endpoint = found["endpoint"]
        return self

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self):
        """SIGKILL: no teardown runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self, service="lambda", **config):
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=config.pop("aws_access_key_id", ACCESS_KEY),
            aws_secret_access_key=config.pop("aws_secret_access_key", SECRET_KEY),
            aws_session_token=config.pop("aws_session_token", None),
            config=Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=120, **config),
        )


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Deployable zips of the example and fixture functions, built with `kiln build`."""
    out = tmp_path_factory.mktemp("artifacts")
    zips = {}
    for name, path, native in [
        ("hello", ROOT / "examples" / "hello", False),
        ("counter", ROOT / "examples" / "counter", False),
        ("misbehave", ROOT / "tests" / "functions" / "misbehave", False),
        ("hello-native", ROOT / "examples" / "hello", True),
        ("native-misbehave", ROOT / "tests" / "functions" / "native-misbehave", True),
        ("lambda-rt", ROOT / "tests" / "functions" / "lambda-rt", True),
    ]:
        target = out / f"{name}.zip"
        flags = ["--native"] if native else []
        subprocess.run([kiln_bin(), "build", *flags, str(path), "--output", str(target)], check=True)
        zips[name] = target.read_bytes()
    return zips


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = KilnServer(tmp_path_factory.mktemp("kiln-data")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def lam(server):
    return server.client()


ROLE = "arn:aws:iam::000000000000:role/kiln-function"


def create(lam, name, zip_bytes, **kwargs):
    params = dict(
        FunctionName=name,
        Runtime="wasip2",
        Role=ROLE,
        Handler="function.wasm",
        Code={"ZipFile": zip_bytes},
    )
    params.update(kwargs)
    return lam.create_function(**params)


def kiln(server, *args):
    """Runs the kiln CLI against `server` as root and returns its JSON output."""
    out = subprocess.run([kiln_bin(), *args, "--endpoint", server.endpoint, "--output", "json"],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, **ROOT_ENV))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if out.stdout.strip() else None
