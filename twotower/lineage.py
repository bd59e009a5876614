"""Lineage: what produced a run or an artifact (data, config, code, environment, times).

A lineage record is a plain JSON-ready dictionary. The pipeline writes it to
``<run>/lineage.json`` and the same record (as it stood at export time) to the artifact
manifest under ``"lineage"``, so a served index traces back to its input files, its resolved
config and the code that trained it::

    {
      "lineage_version": 1,
      "run_id": "3f2a9c1e0b7d",            # the same in lineage.json and the manifest
      "command": "twotower pipeline --config configs/default.yaml",
      "cwd": "/home/me/twotower",
      "host": {"hostname", "platform", "machine", "cpus", "cuda"},
      "started": "2025-01-01T12:00:00+00:00", "finished": "...",   # finished: lineage.json only
      "stages": {"data": 0.4, "train": 61.2, ...},                 # seconds; lineage.json only
      "config": {"files": [{"path", "sha256"}], "overrides": {..}, "resolved": "config.yaml",
                 "resolved_sha256": "..."},
      "seed": {"seed_everything": 0, "data.seed": 0},
      "data": {"format", "path", "fingerprint", "source", "cache", "cache_hit",
               "files": [{"path", "bytes", "sha256"}]},
      "code": {"package_version", "git_commit", "git_dirty", "source_sha256"},
      "versions": {"python", "torch", "pytorch_lightning", "numpy", "pandas", "pyarrow", "faiss",
                   ...},
      "checkpoint": {"path", "sha256"}
    }

``code.source_sha256`` hashes the package's own ``.py`` files, so the code version is known even
without git (an installed wheel); ``git_dirty`` is True when tracked or untracked files differ
from the commit.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twotower import __version__
from twotower.artifact import sha256_file

LINEAGE_VERSION = 1
LINEAGE_FILE = "lineage.json"
#: Input files are hashed one by one (sha256) only up to this total size; above it the data
#: fingerprint (which reads every byte once already) stands for them.
HASH_FILES_MAX_BYTES = 2 << 30
#: Distribution name -> import name of the versions recorded.
VERSIONED = {
    "torch": "torch",
    "pytorch_lightning": "pytorch_lightning",
    "numpy": "numpy",
    "pandas": "pandas",
    "pyarrow": "pyarrow",
    "faiss": "faiss",
    "jsonargparse": "jsonargparse",
}
#: Fields that only the final ``lineage.json`` holds (not yet known at export time).
RUN_ONLY_FIELDS = ("finished", "stages")


def now_iso() -> str:
    """The current UTC time as an ISO string (seconds)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the libraries that shape the results (None when missing)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, module in VERSIONED.items():
        try:
            out[name] = str(getattr(importlib.import_module(module), "__version__", "unknown"))
        except ImportError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        out["cuda"] = None
    return out


def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def source_sha256(package_dir: Path | None = None) -> str:
    """sha256 over the package's ``.py`` files (relative names and contents, sorted)."""
    package_dir = package_dir or Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        h.update(f.relative_to(package_dir).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def code_version() -> dict[str, Any]:
    """Package version, git commit and dirty flag (when the package lives in a git checkout)."""
    package_dir = Path(__file__).resolve().parent
    out: dict[str, Any] = {
        "package_version": __version__,
        "git_commit": None,
        "git_dirty": None,
        "source_sha256": source_sha256(package_dir),
    }
    root = _git(package_dir, "rev-parse", "--show-toplevel")
    if root:
        out["git_commit"] = _git(Path(root), "rev-parse", "HEAD")
        status = _git(Path(root), "status", "--porcelain")
        out["git_dirty"] = None if status is None else bool(status)
    return out


def host_info() -> dict[str, Any]:
    """Host name, platform, CPU count and the CUDA device (None without one)."""
    cuda = None
    try:
        import torch

        if torch.cuda.is_available():
            cuda = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover
        pass
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": cuda,
    }


def input_files(paths: Sequence[Path], max_bytes: int = HASH_FILES_MAX_BYTES) -> list[dict]:
    """Path, size and sha256 of each input file (sha256 None above ``max_bytes`` in total)."""
    total = sum(p.stat().st_size for p in paths)
    return [
        {
            "path": str(p),
            "bytes": p.stat().st_size,
            "sha256": sha256_file(p) if total <= max_bytes else None,
        }
        for p in paths
    ]


def config_files(paths: Sequence[str | Path]) -> list[dict[str, str]]:
    """Path and sha256 of each config file."""
    return [{"path": str(p), "sha256": sha256_file(p)} for p in paths]


def new_lineage(
    config_paths: Sequence[str | Path],
    overrides: Mapping[str, Any] | None = None,
    command: Sequence[str] | None = None,
    started: str | None = None,
) -> dict[str, Any]:
    """The parts of a lineage known before anything runs.

    Args:
        config_paths: YAML configs of the run.
        overrides: ``--set`` overrides (dotted keys).
        command: The command line (default ``sys.argv``).
        started: Start time (default now).
    """
    argv = list(command if command is not None else sys.argv)
    if argv and Path(argv[0]).name in ("twotower", "train.py", "export.py"):
        argv[0] = Path(argv[0]).name  # the console script, not its install path
    return {
        "lineage_version": LINEAGE_VERSION,
        "run_id": uuid.uuid4().hex[:12],
        "command": shlex.join(argv),
        "cwd": os.getcwd(),
        "host": host_info(),
        "started": started or now_iso(),
        "config": {
            "files": config_files(config_paths),
            "overrides": {str(k): str(v) for k, v in (overrides or {}).items()},
        },
        "code": code_version(),
        "versions": package_versions(),
    }


def for_manifest(lineage: Mapping[str, Any]) -> dict[str, Any]:
    """The lineage as the artifact manifest holds it (without the run-only fields)."""
    return {k: v for k, v in lineage.items() if k not in RUN_ONLY_FIELDS}


def write_lineage(path: str | Path, lineage: Mapping[str, Any]) -> Path:
    """Write a lineage record as pretty JSON (``path`` may be a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / LINEAGE_FILE
    path.write_text(json.dumps(lineage, indent=2, default=str) + "\n")
    return path


def read_lineage(path: str | Path) -> dict[str, Any]:
    """The lineage of a run folder, a ``lineage.json`` file or an artifact folder.

    Raises:
        FileNotFoundError: None of these holds a lineage.
    """
    path = Path(path)
    candidates = [path] if path.is_file() else [path / LINEAGE_FILE, path / "manifest.json"]
    for c in candidates:
        if c.is_file():
            doc = json.loads(c.read_text())
            if c.name == "manifest.json":
                if "lineage" not in doc:
                    break
                return dict(doc["lineage"])
            return dict(doc)
    raise FileNotFoundError(f"{path}: no lineage.json (nor an artifact manifest with a lineage)")
