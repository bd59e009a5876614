"""Property tests: malformed rows never crash a loader nor vanish silently.

Every loader gets its fixture with random damage (garbage lines, wrong field counts, bad
timestamps, empty ids, invalid bytes, stray quotes and carriage returns). The outcome must be
either a ``DataError`` whose message names the file and a line, row or column, or a result in
which ``rows_kept + sum(dropped) == rows_read`` and the canonical dtypes hold. Any other
exception fails the test.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from fixtures import (
    GENERIC_COLUMNS,
    GENERIC_TRACK_COLUMNS,
    LASTFM_FILE,
    write_generic_csv,
    write_hetrec,
    write_lastfm1k,
    write_ml1m,
    write_ml100k,
    write_ml_latest,
    write_mssd,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twotower.data.schema import INTERACTION_COLUMNS, INTERACTION_DTYPES, DataError
from twotower.data.sources import load_source

# fixture -> (writer, format, files that may be damaged, loader arguments)
CASES = {
    "ml100k": (write_ml100k, "movielens", ["u.data", "u.item", "u.genre"], {}),
    "ml1m": (write_ml1m, "movielens", ["ratings.dat", "movies.dat"], {}),
    "ml_latest": (write_ml_latest, "movielens", ["ratings.csv", "movies.csv"], {}),
    "mssd": (write_mssd, "mssd", ["log_mini.csv", "tf_mini.csv"], {}),
    "lastfm": (write_lastfm1k, "lastfm", [LASTFM_FILE], {}),
    "hetrec": (
        write_hetrec,
        "hetrec-lastfm",
        ["user_artists.dat", "user_taggedartists.dat", "artists.dat", "tags.dat"],
        {},
    ),
    "csv": (write_generic_csv, "csv", ["plays.csv", "tracks.csv"], {}),
}

NASTY = [
    b"",
    b" ",
    b"-1",
    b"-881250949",
    b"1e400",
    b"nan",
    b"inf",
    b"NULL",
    b"9" * 25,
    b"2009-13-45T99:00:00Z",
    b"1.5",
    b"true",
    b'"',
    b'"a,b"',
    b"::",
    b"\t",
    b",",
    b"|",
    b"\xff\xfe",
    b"\xe9",
    b"\x00",
    b"\r",
    b"1970-01-01",
    b"abc",
]
GARBAGE_BYTES = st.binary(max_size=30) | st.lists(
    st.sampled_from([b"a", b"1", b"9", b":", b"\t", b",", b"|", b'"', b" ", b"-", b"\xe9", b"x"]),
    max_size=20,
).map(b"".join)


@st.composite
def damage(draw: st.DrawFn, n_files: int) -> list[tuple]:
    """A list of (operation, file index, line fraction, field fraction, payload)."""
    ops = st.tuples(
        st.sampled_from(["insert", "replace_field", "truncate", "delete", "duplicate", "byte"]),
        st.integers(0, n_files - 1),
        st.floats(0, 1, allow_nan=False),
        st.floats(0, 1, allow_nan=False),
        st.sampled_from(NASTY) | GARBAGE_BYTES,
    )
    return draw(st.lists(ops, min_size=1, max_size=4))


SEPARATORS = [b"::", b"\t", b",", b"|"]


def _apply(data: bytes, op: str, where: float, field: float, payload: bytes) -> bytes:
    lines = data.split(b"\n")
    i = min(int(where * len(lines)), len(lines) - 1)
    line = lines[i]
    if op == "insert":
        lines.insert(i, payload)
    elif op == "delete" and len(lines) > 1:
        del lines[i]
    elif op == "duplicate":
        lines.insert(i, line)
    elif op == "truncate":
        lines[i] = line[: int(field * len(line))]
    elif op == "byte" and line:
        k = min(int(field * len(line)), len(line) - 1)
        lines[i] = line[:k] + (payload[:1] or b"\xff") + line[k + 1 :]
    elif op == "replace_field":
        sep = next((s for s in SEPARATORS if s in line), None)
        if sep is None:
            lines[i] = payload
        else:
            parts = line.rstrip(b"\r").split(sep)
            k = min(int(field * len(parts)), len(parts) - 1)
            parts[k] = payload
            lines[i] = sep.join(parts) + (b"\r" if line.endswith(b"\r") else b"")
    return b"\n".join(lines)


def _check(case: str, ops: list[tuple]) -> None:
    writer, fmt, names, kwargs = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        folder = writer(Path(tmp))
        for op, fi, where, field, payload in ops:
            f = folder / names[fi]
            f.write_bytes(_apply(f.read_bytes(), op, where, field, payload))
        path, columns, options = str(folder), None, dict(kwargs)
        if case == "csv":
            path, columns = str(folder / "plays.csv"), GENERIC_COLUMNS
            options.update(tracks_path=str(folder / "tracks.csv"))
            options.update(track_columns=GENERIC_TRACK_COLUMNS)
        try:
            res = load_source(fmt, path, columns, **options)
        except DataError as e:
            msg = str(e)
            assert tmp in msg, f"error does not name the file: {msg}"
            assert re.search(r"line \d+|row \d+|column '", msg), f"no line/column: {msg}"
            return
        r = res.report
        assert r.rows_kept == len(res.interactions)
        assert r.rows_kept + sum(r.dropped.values()) == r.rows_read
        df = res.interactions
        assert tuple(df.columns) == INTERACTION_COLUMNS
        assert {c: str(df[c].dtype) for c in df.columns} == INTERACTION_DTYPES
        assert df["track_id"].notna().all()
        ts = df["timestamp"].dropna()
        assert (ts >= 0).all()


FUZZ = settings(
    max_examples=35,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_files_error_clearly_or_account_for_every_row(case):
    n_files = len(CASES[case][2])

    @FUZZ
    @given(ops=damage(n_files))
    def run(ops: list[tuple]) -> None:
        _check(case, ops)

    run()


@pytest.mark.parametrize("case", sorted(CASES))
def test_undamaged_fixture_loads(case):
    _check(case, [("delete", 0, 2.0, 0.0, b"")])  # deleting the trailing empty "line" only
