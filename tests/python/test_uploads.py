"""Upload validation as trusted unzippers do it, end to end: every hostile
archive is refused with 400 and a message naming the entry, and nothing of
it is kept."""

import io
import zipfile

import pytest
from botocore.exceptions import ClientError

from conftest import create


def archive(entries, compression=zipfile.ZIP_DEFLATED):
    """A zip of (name, unix mode, bytes); mode 0 means a plain file."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, mode, data in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            if mode:
                info.create_system = 3
                info.external_attr = mode << 16
            z.writestr(info, data)
    return buf.getvalue()


def refused(lam, zip_bytes):
    with pytest.raises(ClientError) as e:
        create(lam, "hostile", zip_bytes)
    err = e.value.response["Error"]
    return e.value.response["ResponseMetadata"]["HTTPStatusCode"], err["Code"], err["Message"]


@pytest.mark.parametrize("name,mode,reason", [
    ("../evil", 0, "'..'"),
    ("lib/../../evil", 0, "'..'"),
    ("/etc/passwd", 0, "absolute"),
    ("a\\b", 0, "backslash"),
    ("link", 0o120777, "symbolic link leads outside the archive"),
    ("dev", 0o020644, "only regular files, directories and symbolic links"),
    ("fifo", 0o010644, "only regular files, directories and symbolic links"),
])
def test_hostile_entries_are_refused_by_name(lam, name, mode, reason):
    status, code, message = refused(lam, archive([("function.wasm", 0, b"x"), (name, mode, b"/etc/passwd")]))
    assert status == 400 and code == "InvalidParameterValueException", (code, message)
    assert repr(name).strip("'") in message or name in message, message
    assert reason in message, message


def test_a_nul_byte_in_a_name_is_refused(lam):
    raw = archive([("function.wasm", 0, b"x"), ("evilQname", 0, b"y")])
    raw = raw.replace(b"evilQname", b"evil\x00name")  # local header and central directory
    status, code, message = refused(lam, raw)
    assert status == 400 and "NUL" in message, message


def test_duplicate_names_are_refused(lam):
    with pytest.warns(UserWarning):
        raw = archive([("function.wasm", 0, b"x"), ("lib/a", 0, b"1"), ("lib/a", 0, b"2")])
    status, _, message = refused(lam, raw)
    assert status == 400 and "lib/a" in message and "twice" in message, message


def test_a_zip_bomb_stops_at_the_unzipped_limit(lam):
    # 300 MB of zeros deflate to about 300 KB.
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("function.wasm", b"x")
        with z.open("bomb.bin", "w") as f:
            chunk = bytes(1 << 20)
            for _ in range(300):
                f.write(chunk)
    assert len(bomb.getvalue()) < 1 << 20
    status, code, message = refused(lam, bomb.getvalue())
    assert status == 400 and "262144000" in message, (code, message)


def test_too_many_entries_are_refused(lam):
    raw = archive([(f"f{i}", 0, b"") for i in range(20_001)], compression=zipfile.ZIP_STORED)
    status, _, message = refused(lam, raw)
    assert status == 400 and "20001 entries" in message and "20000" in message, message


def test_nothing_of_a_refused_upload_is_kept(lam, server):
    refused(lam, archive([("../evil", 0, b"x")]))
    with pytest.raises(ClientError) as e:
        lam.get_function(FunctionName="hostile")
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    leftovers = [p for p in (server.data_dir / "cache").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
