"""The MovieLens downloader against a local HTTP server (never the real network)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from twotower.data import download
from twotower.data.download import DownloadError, download_movielens


def _zip(folder: Path, name: str = "ml-tiny", members: dict[str, str] | None = None) -> Path:
    members = members or {f"{name}/u.data": "1\t10\t4\t881250949\n", f"{name}/README": "hi\n"}
    z = folder / f"{name}.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for arc, text in members.items():
            zf.writestr(arc, text)
    return z


@pytest.fixture
def server(tmp_path):
    """Serve ``tmp_path / 'www'`` on 127.0.0.1 at a random port; yields the base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_download_verifies_sha256_and_extracts(server, tmp_path):
    root, base = server
    z = _zip(root)
    dest = tmp_path / "data"
    out = download_movielens(
        "ml-tiny", dest, url=f"{base}/ml-tiny.zip", sha256=_sha(z), progress=False
    )
    assert out == dest / "ml-tiny"
    assert (out / "u.data").read_text() == "1\t10\t4\t881250949\n"
    assert (dest / "ml-tiny.zip.sha256").read_text().split()[0] == _sha(z)
    assert sorted(p.name for p in dest.iterdir()) == ["ml-tiny", "ml-tiny.zip.sha256"]
    # already there: no second download (the server is not asked again)
    (root / "ml-tiny.zip").unlink()
    assert download_movielens("ml-tiny", dest, url=f"{base}/ml-tiny.zip", sha256="0" * 64) == out


def test_sha256_mismatch_removes_partial_file(server, tmp_path):
    root, base = server
    _zip(root)
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match="SHA-256 mismatch: expected 0000"):
        download_movielens(
            "ml-tiny", dest, url=f"{base}/ml-tiny.zip", sha256="0" * 64, progress=False
        )
    assert list(dest.iterdir()) == []  # no partial archive, no half-extracted folder


def test_known_archive_checked_against_published_md5(server, tmp_path, monkeypatch):
    root, base = server
    z = _zip(root)
    monkeypatch.setattr(download, "BASE_URL", base)
    monkeypatch.setitem(download.MOVIELENS_MD5, "ml-tiny", hashlib.md5(z.read_bytes()).hexdigest())
    out = download_movielens("ml-tiny", tmp_path / "a", progress=False)
    assert (out / "README").read_text() == "hi\n"
    monkeypatch.setitem(download.MOVIELENS_MD5, "ml-tiny", "f" * 32)
    with pytest.raises(DownloadError, match="MD5 mismatch"):
        download_movielens("ml-tiny", tmp_path / "b", progress=False)
    assert list((tmp_path / "b").iterdir()) == []


def test_connection_refused_says_offline_and_where(tmp_path):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "data"
    url = f"http://127.0.0.1:{port}/ml-1m.zip"
    with pytest.raises(DownloadError) as err:
        download_movielens("ml-1m", dest, url=url, sha256="0" * 64, timeout=5, progress=False)
    msg = str(err.value)
    assert "offline?" in msg and url in msg and str(dest / "ml-1m") in msg
    assert list(dest.iterdir()) == []


def test_http_404_is_a_clear_error(server, tmp_path):
    _, base = server
    with pytest.raises(DownloadError, match="could not download .*HTTP 404.*offline\\?"):
        download_movielens(
            "ml-x", tmp_path, url=f"{base}/missing.zip", sha256="0" * 64, progress=False
        )


def test_unknown_name_and_missing_checksum_are_refused(tmp_path):
    with pytest.raises(DownloadError, match="unknown MovieLens archive 'ml-2m'"):
        download_movielens("ml-2m", tmp_path)
    with pytest.raises(DownloadError, match="no published checksum.*pass sha256="):
        download_movielens("ml-latest-small", tmp_path)
    assert download.MOVIELENS_MD5["ml-100k"] == "0e33842e24a9c977be4e0107933c0723"


def test_zip_slip_and_bad_zip_are_refused(server, tmp_path):
    root, base = server
    z = _zip(root, "evil", {"../../escape.txt": "x"})
    with pytest.raises(DownloadError, match="unsafe path"):
        download_movielens(
            "evil", tmp_path / "d", url=f"{base}/evil.zip", sha256=_sha(z), progress=False
        )
    assert not (tmp_path / "escape.txt").exists()
    (root / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DownloadError, match="not a valid zip"):
        download_movielens(
            "junk",
            tmp_path / "e",
            url=f"{base}/junk.zip",
            sha256=_sha(root / "junk.zip"),
            progress=False,
        )
    assert list((tmp_path / "e").iterdir()) == []


def test_flat_archive_and_renamed_top_folder(server, tmp_path):
    root, base = server
    flat = _zip(root, "flat", {"ratings.dat": "1::1::5::1\n"})
    out = download_movielens(
        "flat", tmp_path, url=f"{base}/flat.zip", sha256=_sha(flat), progress=False
    )
    assert (out / "ratings.dat").is_file()
    # ml-10m's zip holds "ml-10M100K/": the folder is still named after the archive
    odd = _zip(root, "ml-10m", {"ml-10M100K/ratings.dat": "1::1::5::1\n"})
    out = download_movielens(
        "ml-10m", tmp_path, url=f"{base}/ml-10m.zip", sha256=_sha(odd), progress=False
    )
    assert out == tmp_path / "ml-10m" and (out / "ratings.dat").is_file()
