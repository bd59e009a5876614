"""Artifact format: its constants, the error type, and the reader side.

:func:`read_manifest` refuses newer major versions, :func:`verify_artifact` checks every listed
file's SHA-256, :func:`load_query_tower` rebuilds the standalone query tower with
``torch.load(weights_only=True)``. The writer is :mod:`twotower.export`, which documents the
folder layout.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twotower import __version__

FORMAT_VERSION = "1.0"
FORMAT_MAJOR = 1
#: Written by exports of a hashed item vocabulary: 1.1 adds ``item_vocab`` (and ``user_vocab``)
#: hash descriptions to the manifest and a ``raw_ids`` column to ``items.parquet``. A 1.0
#: reader still serves them safely: it looks ids up in ``vocab.json``, which maps every
#: bucket's most played raw id (others are reported unknown, never mis-mapped).
HASHED_FORMAT_VERSION = "1.1"
MANIFEST = "manifest.json"
REQUIRED_FILES = ("index.faiss", "items.parquet", "item_embeddings.npy", "vocab.json")
QUERY_TOWER_FILE = "query_tower.pt"
ONNX_FILE = "query_tower.onnx"
HOLDOUT_FILE = "holdout.parquet"
TUNE_QUERIES = 10_000  # validation queries used to tune and measure the ANN index
ALLOWED_TOWER_PREFIX = "twotower."


class ArtifactError(ValueError):
    """An artifact folder is missing, corrupt, or from a newer format: the message says which."""


# ---------------------------------------------------------------------------------- reading
def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` of an artifact folder and check its format version.

    Args:
        path: The artifact folder.

    Returns:
        The manifest.

    Raises:
        ArtifactError: No folder or manifest, unreadable JSON, or a newer major format version.
    """
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: artifact folder not found")
    if not file.is_file():
        raise ArtifactError(f"{file}: missing; {path} is not a complete twotower export")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{file}: unreadable manifest ({e})") from e
    version = str(manifest.get("format_version", "")) if isinstance(manifest, dict) else ""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise ArtifactError(f"{file}: no valid format_version (got {version!r})") from None
    if major > FORMAT_MAJOR:
        raise ArtifactError(
            f"{file}: artifact format {version} is newer than this twotower {__version__} can "
            f"read (format {FORMAT_VERSION}); upgrade twotower or re-export with this version"
        )
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{file}: no 'files' table of checksums")
    return manifest


def verify_artifact(path: str | Path) -> dict[str, Any]:
    """Check the format version, then the size and sha256 of every file listed in the manifest.

    Args:
        path: The artifact folder.

    Returns:
        The manifest.

    Raises:
        ArtifactError: Naming the first missing, truncated or modified file.
    """
    path = Path(path)
    manifest = read_manifest(path)
    files: dict[str, dict[str, Any]] = manifest["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise ArtifactError(f"{path / MANIFEST}: lists no {name}")
    for name, info in files.items():
        f = path / name
        if Path(name).name != name:
            raise ArtifactError(f"{path / MANIFEST}: file name {name!r} is not a plain name")
        if not f.is_file():
            raise ArtifactError(f"{f}: missing (listed in the manifest)")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise ArtifactError(f"{f}: {size} bytes, the manifest says {info.get('bytes')}")
        if sha256_file(f) != info.get("sha256"):
            raise ArtifactError(f"{f}: checksum mismatch (the file was modified or corrupted)")
    return manifest


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tower_class(manifest: dict[str, Any]) -> type[nn.Module]:
    """The query tower class named in the manifest (only classes of this package)."""
    name = str(manifest["query_tower"]["class"])
    module, _, cls = name.rpartition(".")
    if not name.startswith(ALLOWED_TOWER_PREFIX) or not module:
        raise ArtifactError(f"query tower class {name!r} is not a twotower class")
    return getattr(importlib.import_module(module), cls)


def load_query_tower(path: str | Path, manifest: dict[str, Any] | None = None) -> nn.Module:
    """The standalone query tower of an artifact (eval mode; no Lightning involved).

    Args:
        path: The artifact folder.
        manifest: Its manifest (read, unverified, when None).
    """
    path = Path(path)
    manifest = manifest or read_manifest(path)
    tower = tower_class(manifest)(**manifest["query_tower"]["args"])
    try:
        state = torch.load(path / QUERY_TOWER_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (refused objects), RuntimeError (damaged zip)
        raise ArtifactError(
            f"{path / QUERY_TOWER_FILE}: cannot be loaded with weights_only=True ({e})"
        ) from e
    tower.load_state_dict(state)
    return tower.eval()
