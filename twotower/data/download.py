"""Download and unpack the public MovieLens archives from GroupLens.

What is verified: when ``sha256`` is given, the archive's SHA-256 must match it. Otherwise,
for the archives whose content never changes (``ml-100k``, ``ml-1m``, ``ml-10m``, ``ml-20m``,
``ml-25m``), the archive's MD5 must match the published value below (the checksum GroupLens
publishes beside ``ml-25m.zip``, and the one data libraries such as torchtext pin). The
``ml-latest*`` archives are regenerated from time to time and have no fixed checksum: pass
``sha256`` for them (or for any custom ``url``), otherwise the download is refused. The SHA-256
of every downloaded archive is printed and written to ``<dest>/<name>.zip.sha256`` so it can be
pinned.

The archive is streamed to a temporary file beside the destination (with a progress bar),
verified, extracted into a temporary folder and renamed into place, so an interrupted download
never leaves a half-extracted dataset. Nothing is downloaded when the folder already exists.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from twotower.data.schema import DataError

BASE_URL = "https://files.grouplens.org/datasets/movielens"
# name -> published MD5 of the zip (None: the archive changes over time, no fixed checksum)
MOVIELENS_MD5: dict[str, str | None] = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-10m": "ce571fd55effeba0271552578f2648bd",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
    "ml-latest-small": None,
    "ml-latest": None,
}
_BLOCK = 1 << 20


class DownloadError(DataError):
    """A download that failed, was refused, or did not match its checksum."""


def _progress(total: int | None, name: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        enabled = False
    if not enabled:

        class _Null:
            def update(self, n: int) -> None:
                pass

            def close(self) -> None:
                pass

        return _Null()
    return tqdm(total=total, unit="B", unit_scale=True, desc=name, file=sys.stderr)


def _fetch(url: str, target: Path, name: str, timeout: float, progress: bool) -> tuple[str, str]:
    """Stream ``url`` to ``target``; return (sha256, md5) hex digests."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        bar = _progress(int(length) if length else None, name, progress)
        try:
            with open(target, "wb") as out:
                while True:
                    block = resp.read(_BLOCK)
                    if not block:
                        break
                    out.write(block)
                    sha.update(block)
                    md5.update(block)
                    bar.update(len(block))
        finally:
            bar.close()
    return sha.hexdigest(), md5.hexdigest()


def _safe_extract(archive: Path, into: Path) -> None:
    """Extract ``archive`` into ``into``, refusing absolute paths and ``..`` (zip slip)."""
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            p = Path(member)
            if p.is_absolute() or ".." in p.parts:
                raise DownloadError(f"{archive}: unsafe path {member!r} in the archive")
        zf.extractall(into)


def download_movielens(
    name: str,
    dest: str | Path,
    url: str | None = None,
    sha256: str | None = None,
    *,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download a MovieLens archive and unpack it to ``dest / name``.

    Args:
        name: ``ml-100k``, ``ml-1m``, ``ml-10m``, ``ml-20m``, ``ml-25m``, ``ml-latest-small``,
            ``ml-latest``, or any name when ``url`` is given.
        dest: Folder that receives ``<name>/`` (created if missing).
        url: Archive URL (default: the official GroupLens URL of ``name``).
        sha256: Expected SHA-256 of the archive (required when no published checksum is known).
        timeout: Seconds to wait for the server.
        progress: Show a progress bar on stderr.

    Returns:
        The dataset folder ``dest / name``.

    Raises:
        DownloadError: Unknown name, no checksum to verify against, network failure (with the
            manual-download hint), checksum mismatch (the partial file is removed), bad archive.
    """
    dest = Path(dest)
    final = dest / name
    if final.is_dir() and any(final.iterdir()):
        return final
    if url is None:
        if name not in MOVIELENS_MD5:
            raise DownloadError(
                f"unknown MovieLens archive {name!r}; expected one of {sorted(MOVIELENS_MD5)} "
                "(or pass url= and sha256=)"
            )
        url = f"{BASE_URL}/{name}.zip"
        md5 = MOVIELENS_MD5[name]
    else:
        md5 = None
    if sha256 is None and md5 is None:
        raise DownloadError(
            f"{name}: no published checksum is known for {url}; pass sha256= (the SHA-256 of "
            "the zip, e.g. from `sha256sum` of a copy you trust) so the download can be verified"
        )
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}-", suffix=".zip.part", dir=dest)
    os.close(fd)
    archive = Path(tmp_name)
    manual = f"offline? download {url} manually and unzip it to {final}"
    try:
        try:
            got_sha, got_md5 = _fetch(url, archive, name, timeout, progress)
        except (
            urllib.error.URLError,
            http.client.HTTPException,
            ConnectionError,
            TimeoutError,
        ) as e:
            if isinstance(e, urllib.error.HTTPError):
                reason = f"HTTP {e.code} {e.reason}"
            else:
                reason = getattr(e, "reason", e)
            raise DownloadError(f"could not download {url} ({reason}); {manual}") from e
        if sha256 is not None and got_sha != sha256.lower():
            raise DownloadError(
                f"{url}: SHA-256 mismatch: expected {sha256.lower()}, got {got_sha}; the partial "
                "download was removed (corrupted transfer or a changed archive)"
            )
        if sha256 is None and md5 is not None and got_md5 != md5:
            raise DownloadError(
                f"{url}: MD5 mismatch: expected the published {md5}, got {got_md5}; the "
                "partial download was removed"
            )
        print(f"{name}.zip sha256 {got_sha}", file=sys.stderr)
        _extract_into_place(archive, dest, final, name)
        (dest / f"{name}.zip.sha256").write_text(f"{got_sha}  {name}.zip\n")
    finally:
        archive.unlink(missing_ok=True)
    return final


def _extract_into_place(archive: Path, dest: Path, final: Path, name: str) -> None:
    """Extract to a temporary folder, then rename the dataset folder to ``final``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest))
    try:
        try:
            _safe_extract(archive, tmp)
        except zipfile.BadZipFile as e:
            raise DownloadError(f"{archive}: not a valid zip archive ({e})") from e
        entries = [p for p in tmp.iterdir() if not p.name.startswith("__MACOSX")]
        # GroupLens zips hold one top folder (ml-10m's is called ml-10M100K): use its content
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        if final.exists():
            shutil.rmtree(final)  # an empty leftover folder
        if root is tmp:
            tmp.rename(final)
            tmp = None  # type: ignore[assignment]
        else:
            root.rename(final)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
