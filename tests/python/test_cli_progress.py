"""The CLI's long operations show progress on a terminal and stay quiet for
scripts: a large upload in `kiln deploy`, and `kiln provisioned set`
waiting for its environments."""

import io
import json
import os
import pty
import select
import subprocess
import time
import zipfile

from conftest import ROOT_ENV, create, kiln, kiln_bin


def in_terminal(args, timeout=120):
    """Runs the CLI with a pseudo-terminal as its stdout and stderr, as a
    person at a terminal would; returns its exit code and what it drew."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(args[0], args, dict(os.environ, **ROOT_ENV, TERM="xterm"))
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, out
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        out += data
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def big_zip(artifacts, tmp_path):
    """The hello component plus 3 MiB that do not compress."""
    buf = io.BytesIO(artifacts["hello"])
    with zipfile.ZipFile(buf, "a") as z:
        z.writestr(zipfile.ZipInfo("data.bin"), os.urandom(3 << 20))
    path = tmp_path / "big.zip"
    path.write_bytes(buf.getvalue())
    return path


def test_a_large_upload_shows_its_progress(server, artifacts, tmp_path):
    path = big_zip(artifacts, tmp_path)
    code, drawn = in_terminal([kiln_bin(), "deploy", "big-upload", str(path), "--endpoint", server.endpoint])
    assert code == 0, drawn
    assert "uploading" in drawn and "100%" in drawn, drawn

    # For a script: the result on stdout, nothing drawn on stderr.
    out = subprocess.run([kiln_bin(), "deploy", "big-upload", str(path), "--endpoint", server.endpoint,
                          "--output", "json"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, **ROOT_ENV))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["FunctionName"] == "big-upload"
    assert "uploading" not in out.stderr


def test_waiting_for_provisioned_concurrency_shows_environments_ready(server, lam, artifacts):
    create(lam, "pc-progress", artifacts["hello"])
    lam.publish_version(FunctionName="pc-progress")
    lam.create_alias(FunctionName="pc-progress", Name="live", FunctionVersion="1")
    code, drawn = in_terminal([kiln_bin(), "provisioned", "set", "pc-progress", "live", "2",
                               "--endpoint", server.endpoint])
    assert code == 0, drawn
    assert "environments ready" in drawn and "2/2" in drawn, drawn
    assert "2 ready of 2 requested (2 allocated): READY" in drawn, drawn

    state = kiln(server, "provisioned", "get", "pc-progress", "live")
    assert state["Status"] == "READY" and state["AvailableProvisionedConcurrentExecutions"] == 2
    kiln(server, "provisioned", "delete", "pc-progress", "live")
    out = subprocess.run([kiln_bin(), "provisioned", "get", "pc-progress", "live", "--endpoint", server.endpoint],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, **ROOT_ENV))
    assert out.returncode != 0 and "ProvisionedConcurrencyConfigNotFoundException" in out.stderr
