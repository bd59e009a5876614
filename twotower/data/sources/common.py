"""Shared parsing and validation helpers of every loader.

Reading a delimited file goes through :func:`read_table`, which

1. reads the bytes and checks the encoding (a non-UTF-8 byte in a UTF-8 file is an error that
   names the file, line and byte offset and suggests the ``encoding`` option),
2. indexes the records with numpy (line of every record, field count of every record, blank
   lines, stray carriage returns), so a truncated or overlong line is reported with its file line,
3. parses the good records with pyarrow's CSV reader (optimistically typed: numeric columns are
   parsed as numbers at once and re-read as text only when that fails, to locate the bad value).

Every later check (:func:`int_column`, :func:`timestamp_column`, ...) is vectorised and reports
the *first* offending row with its 1-based file line (the header counts as line 1).
"""

from __future__ import annotations

import codecs
import csv
import io
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
from pandas.api import types as pdt

from twotower.data.report import DataReport
from twotower.data.schema import (
    INTERACTION_COLUMNS,
    DataError,
    LoadResult,
    conform_interactions,
    conform_tracks,
)

Kind = Literal["int", "float"]
BadLines = Literal["error", "drop"]

# Timestamps beyond this (year 3000) are almost surely milliseconds read as seconds.
MAX_TIMESTAMP_S = 32_503_680_000
UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
DUPLICATE_ROW = "duplicate row"
SKIPPED_PLAY = "skipped play (kept as signal, not a positive)"
_CHUNK = 1 << 26  # bytes per numpy pass when indexing records (bounds temporary memory)
_INT_RE = r"\s*[+-]?\d{1,18}\s*"
_NUM_RE = r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*"

# ---------------------------------------------------------------------------------------------
# encodings


_fallback_hits = threading.local()


def _latin1_fallback(err: UnicodeError) -> tuple[str, int]:
    """Codec error handler: decode bytes that are not valid UTF-8 as latin-1."""
    assert isinstance(err, UnicodeDecodeError)
    hits = getattr(_fallback_hits, "positions", None)
    if hits is not None:
        hits.append(err.start)
    return bytes(err.object[err.start : err.end]).decode("latin-1"), err.end


codecs.register_error("twotower-latin1", _latin1_fallback)


def _line_and_column(data: bytes, pos: int) -> tuple[int, int]:
    """1-based line and 1-based byte column of byte offset ``pos``."""
    line = data.count(b"\n", 0, pos) + 1
    col = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
    return line, col


def _first_invalid_utf8(data: bytes) -> UnicodeDecodeError | None:
    """The first UTF-8 decoding error of ``data`` (decoded in newline-aligned chunks)."""
    if data.isascii():
        return None
    view = memoryview(data)
    start = 0
    while start < len(data):
        end = min(len(data), start + _CHUNK)
        if end < len(data):
            nl = data.rfind(b"\n", start, end)
            end = nl + 1 if nl >= start else end
        try:
            codecs.utf_8_decode(view[start:end], "strict", True)
        except UnicodeDecodeError as e:
            return UnicodeDecodeError(e.encoding, data, start + e.start, start + e.end, e.reason)
        start = end
    return None


def to_utf8(data: bytes, path: Path, encoding: str, report: DataReport | None = None) -> bytes:
    """Return ``data`` as UTF-8 bytes, checking or converting its encoding.

    Args:
        data: Raw file content.
        path: File name, for messages.
        encoding: ``"utf-8"`` (strict: a bad byte is a :class:`DataError` naming the line and
            byte offset), ``"auto"`` (UTF-8; bytes that are not valid UTF-8 are read as latin-1
            and the affected lines are counted in ``report``), or any Python codec name
            (``"latin-1"``, ``"cp1252"``, ...), converted to UTF-8.
        report: Where ``"auto"`` counts lines read through the latin-1 fallback.

    Raises:
        DataError: Bytes that the encoding cannot decode.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    enc = encoding.lower().replace("_", "-")
    if enc in ("utf-8", "utf8"):
        err = _first_invalid_utf8(data)
        if err is not None:
            line, col = _line_and_column(data, err.start)
            raise DataError(
                f"{path}, line {line}: byte 0x{data[err.start]:02x} at byte offset {err.start} "
                f"(byte {col} of the line) is not valid UTF-8; pass the file's encoding, e.g. "
                "encoding='latin-1', or encoding='auto' to read stray bytes as latin-1"
            )
        return data
    if enc == "auto":
        if _first_invalid_utf8(data) is None:
            return data
        _fallback_hits.positions = []
        try:
            text = data.decode("utf-8", errors="twotower-latin1")
            positions = np.asarray(_fallback_hits.positions, dtype=np.int64)
        finally:
            _fallback_hits.positions = None
        if report is not None:
            nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
            n_lines = len(np.unique(np.searchsorted(nl, positions)))
            report.count(f"lines of {path.name} with non-UTF-8 bytes read as latin-1", n_lines)
        return text.encode("utf-8")
    try:
        return data.decode(encoding).encode("utf-8")
    except LookupError as e:
        raise DataError(f"{path}: unknown encoding {encoding!r}") from e
    except UnicodeDecodeError as e:
        line, col = _line_and_column(data, e.start)
        raise DataError(
            f"{path}, line {line}: byte 0x{data[e.start]:02x} at byte offset {e.start} "
            f"(byte {col} of the line) is not valid {encoding}; pass the file's encoding"
        ) from e


# ---------------------------------------------------------------------------------------------
# files


def read_bytes(path: Path) -> bytes:
    """The content of ``path``; a missing file is a :class:`DataError`."""
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except IsADirectoryError as e:
        raise DataError(f"{path}: expected a file, found a folder") from e


def find_files(path: str | Path | None, patterns: Sequence[str], what: str) -> list[Path]:
    """Files under ``path`` matching any of ``patterns`` (recursively), or ``path`` itself.

    Args:
        path: A file or a folder.
        patterns: Glob patterns tried in the folder, e.g. ``("log_*.csv",)``.
        what: What the files are, for the error message.

    Raises:
        DataError: Missing path, or a folder without matching files.
    """
    if path is None:
        raise DataError(f"no path given; expected {what}")
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise DataError(f"{p}: no such file or folder (expected {what})")
    found: set[Path] = set()
    for pattern in patterns:
        found.update(f for f in p.rglob(pattern) if f.is_file() and not f.name.startswith("."))
    if not found:
        listing = sorted(f.name for f in p.iterdir())[:20]
        raise DataError(
            f"{p}: no files matching {list(patterns)} (expected {what}); folder holds {listing}"
        )
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# record index


@dataclass
class _Records:
    """Byte layout of the records of a file."""

    starts: np.ndarray  # [R] byte offset where each record starts
    ends: np.ndarray  # [R] byte offset after each record's text (before \r\n)
    full_ends: np.ndarray  # [R] byte offset after the record's line terminator
    lines: np.ndarray  # [R] 1-based file line of the record's start
    nfields: np.ndarray  # [R] field count


def _index_records(data: bytes, sep: int, quoted: bool, path: Path) -> _Records:
    r"""Find the records of ``data`` and count their fields, vectorised.

    Unquoted files: every ``\\n`` ends a record. Quoted files (CSV quoting): a ``\\n`` ends a
    record only when an even number of ``"`` precede it, and only separators outside quotes count.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    n = len(arr)
    nl_parts, q_parts = [], []
    for a in range(0, n, _CHUNK):
        sub = arr[a : a + _CHUNK]
        nl_parts.append(np.flatnonzero(sub == 10) + a)
        if quoted:
            q_parts.append(np.flatnonzero(sub == 34) + a)
    nl = np.concatenate(nl_parts) if nl_parts else np.zeros(0, np.int64)
    if quoted:
        quotes = np.concatenate(q_parts) if q_parts else np.zeros(0, np.int64)
        boundary = (np.searchsorted(quotes, nl) % 2) == 0
        if len(quotes) % 2:
            last = quotes[-1]
            raise DataError(
                f"{path}, line {_line_and_column(data, int(last))[0]}: unbalanced quote "
                "(a '\"' that is never closed); quote fields as in CSV (generic formats can "
                "also be read with quoting=False)"
            )
    else:
        quotes = np.zeros(0, np.int64)
        boundary = np.ones(len(nl), dtype=bool)
    bnl = nl[boundary]  # newlines that end a record
    nl_index = np.flatnonzero(boundary)  # their index among all newlines
    starts = np.concatenate([[0], bnl + 1]).astype(np.int64)
    full_ends = np.concatenate([bnl + 1, [n]]).astype(np.int64)
    lines = np.concatenate([[1], nl_index + 2]).astype(np.int64)
    if starts[-1] >= n:  # data ends with a newline: no record after it
        starts, full_ends, lines = starts[:-1], full_ends[:-1], lines[:-1]
    ends = full_ends.copy()
    has_nl = (ends > starts) & (arr[np.maximum(ends - 1, 0)] == 10)
    ends[has_nl] -= 1
    has_cr = (ends > starts) & (arr[np.maximum(ends - 1, 0)] == 13)
    ends[has_cr] -= 1

    # a lone \r (not before \n) would end a line for the CSV parser but not for us: refuse it
    cr = np.flatnonzero(arr == 13) if b"\r" in data else np.zeros(0, np.int64)
    if len(cr):
        nxt = np.where(cr + 1 < n, arr[np.minimum(cr + 1, n - 1)], 10)
        lone = cr[nxt != 10]
        if quoted and len(lone):
            lone = lone[(np.searchsorted(quotes, lone) % 2) == 0]
        if len(lone):
            line, col = _line_and_column(data, int(lone[0]))
            raise DataError(
                f"{path}, line {line}: carriage return (\\r) inside the line at byte {col}; "
                "lines must end with \\n or \\r\\n"
            )

    # separators per record, a chunk of records at a time (bounded temporary memory)
    nfields = np.ones(len(starts), dtype=np.int64)
    rec = 0
    while rec < len(starts):
        r1 = max(rec + 1, int(np.searchsorted(starts, starts[rec] + _CHUNK, side="left")))
        lo, hi = int(starts[rec]), int(full_ends[r1 - 1])
        seps = np.flatnonzero(arr[lo:hi] == sep) + lo
        if quoted and len(seps):
            seps = seps[(np.searchsorted(quotes, seps) % 2) == 0]
        nfields[rec:r1] += np.searchsorted(seps, full_ends[rec:r1]) - np.searchsorted(
            seps, starts[rec:r1]
        )
        rec = r1
    return _Records(starts, ends, full_ends, lines, nfields)


# ---------------------------------------------------------------------------------------------
# tables


@dataclass
class Table:
    """Parsed rows of one file with the file line of every row.

    Attributes:
        path: The file.
        df: One row per data record; columns as in the file (text unless parsed as numbers).
        lines: ``[N]`` 1-based file line of every row, or None when rows have no lines
            (Parquet: messages then name the 1-based row).
    """

    path: Path
    df: pd.DataFrame
    lines: np.ndarray | None

    def __len__(self) -> int:
        return len(self.df)

    def where(self, i: int, column: str | None = None) -> str:
        """``"file, line N, column 'c'"`` for row ``i``."""
        loc = f"line {int(self.lines[i])}" if self.lines is not None else f"row {i + 1}"
        col = f", column {column!r}" if column is not None else ""
        return f"{self.path}, {loc}{col}"

    def error(self, i: int, column: str | None, message: str) -> DataError:
        """A :class:`DataError` located at row ``i``."""
        return DataError(f"{self.where(i, column)}: {message}")

    def take(self, keep: np.ndarray) -> Table:
        """The rows where ``keep`` is True."""
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return self
        lines = self.lines[keep] if self.lines is not None else None
        return Table(self.path, self.df[keep].reset_index(drop=True), lines)

    def require(self, columns: Iterable[str], expected: Sequence[str] | None = None) -> None:
        """Raise when any of ``columns`` is missing, naming expected and found columns."""
        missing = [c for c in columns if c not in self.df.columns]
        if missing:
            exp = list(expected) if expected is not None else list(columns)
            raise DataError(
                f"{self.path}, line 1: missing column(s) {missing}; expected columns {exp}, "
                f"found {list(self.df.columns)}"
            )


def _split_header(text: str, sep: str, quoted: bool, where: str) -> list[str]:
    if quoted:
        try:
            fields = next(csv.reader(io.StringIO(text, newline=""), delimiter=sep), [])
        except csv.Error as e:
            raise DataError(f"{where}: could not parse the header line ({e})") from e
    else:
        fields = text.split(sep)
    return [f.strip().lstrip("\ufeff") for f in fields]


def _body(data: bytes, rec: _Records, keep: np.ndarray) -> bytes:
    """The bytes of the kept records (runs of consecutive records are sliced at once)."""
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        return b""
    breaks = np.flatnonzero(np.diff(idx) != 1)
    run_first = np.concatenate([[idx[0]], idx[breaks + 1]])
    run_last = np.concatenate([idx[breaks], [idx[-1]]])
    parts = [
        data[int(rec.starts[f]) : int(rec.full_ends[la])]
        for f, la in zip(run_first, run_last, strict=True)
    ]
    out = parts[0] if len(parts) == 1 else b"".join(parts)
    if not out.endswith(b"\n"):
        out += b"\n"
    return out


def _parse(
    body: bytes, sep: str, k: int, quoted: bool, longest: int, types: dict[str, Any]
) -> pd.DataFrame:
    """Parse the (already validated) records with pyarrow: text, or numbers where typed."""
    names = [str(i) for i in range(k)]
    column_types = {n: types.get(n, pa.string()) for n in names}
    table = pa_csv.read_csv(
        io.BytesIO(body),
        read_options=pa_csv.ReadOptions(
            column_names=names, block_size=max(1 << 22, 4 * longest), use_threads=True
        ),
        parse_options=pa_csv.ParseOptions(
            delimiter=sep,
            quote_char='"' if quoted else False,
            double_quote=True,
            escape_char=False,
            newlines_in_values=quoted,
            ignore_empty_lines=False,
        ),
        convert_options=pa_csv.ConvertOptions(
            column_types=column_types,
            null_values=[],
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    return table.to_pandas()


def read_table(
    path: Path,
    *,
    sep: str,
    names: Sequence[str] | None = None,
    header: bool = False,
    kinds: dict[str, Kind] | None = None,
    encoding: str = "utf-8",
    quoted: bool = False,
    bad_lines: BadLines = "error",
    report: DataReport | None = None,
    data: bytes | None = None,
    required: Sequence[str] = (),
) -> Table:
    r"""Read one delimited text file into a :class:`Table`.

    Args:
        path: The file.
        sep: Field separator (one character, or ``"::"`` for MovieLens ``.dat`` files).
        names: Column names of a file without a header (its field count is ``len(names)``).
        header: The first non-blank line holds the column names.
        kinds: Columns to parse as ``"int"`` or ``"float"`` (fast path; on any failure the
            file is re-read as text and the caller's checks locate the bad value).
        encoding: See :func:`to_utf8`.
        quoted: Fields may be quoted as in CSV (``"a,b"``, ``""`` for a quote); otherwise
            quotes are ordinary characters.
        bad_lines: ``"error"``: a line with the wrong number of fields is a
            :class:`DataError`; ``"drop"``: such lines are dropped and counted in ``report``.
        report: Counts dropped bad lines and latin-1 fallbacks (the caller sets ``rows_read``).
        data: The file content when already in memory.
        required: Columns the header must have (checked before any data line).

    Returns:
        The table; ``len(table)`` is the number of data rows read (blank lines excluded,
        dropped bad lines excluded).

    Raises:
        DataError: Empty file, bad encoding, wrong field count, unbalanced quotes, stray ``\\r``.
    """
    if data is None:
        data = read_bytes(path)
    data = to_utf8(data, path, encoding, report)
    if len(sep) == 2 and sep[0] == sep[1]:
        token = sep.encode()
        unit = b"\x1f"
        if unit in data:
            raise DataError(
                f"{path}, line {_line_and_column(data, data.index(unit))[0]}: "
                "unexpected control byte 0x1f"
            )
        data = data.replace(token, unit)
        sep_char = "\x1f"
    elif len(sep) == 1:
        sep_char = sep
    else:
        raise ValueError(f"unsupported separator {sep!r}")
    shown_sep = {"\t": "tab", "\x1f": repr(sep)}.get(sep_char, repr(sep_char))

    rec = _index_records(data, ord(sep_char), quoted, path)
    nonblank = rec.ends > rec.starts
    if not nonblank.any():
        exp = f"a header line with columns {list(names)}" if header and names else "data lines"
        raise DataError(f"{path}, line 1: empty file (expected {exp})")
    keep = nonblank.copy()
    if header:
        h = int(np.flatnonzero(nonblank)[0])
        text = data[int(rec.starts[h]) : int(rec.ends[h])].decode("utf-8")
        cols = _split_header(text, sep_char, quoted, f"{path}, line {int(rec.lines[h])}")
        if len(set(cols)) != len(cols):
            dup = sorted({c for c in cols if cols.count(c) > 1})
            raise DataError(f"{path}, line {int(rec.lines[h])}: duplicate column name(s) {dup}")
        missing = [c for c in required if c not in cols]
        if missing:
            raise DataError(
                f"{path}, line {int(rec.lines[h])}: missing column(s) {missing}; expected "
                f"columns {list(required)}, found {cols}"
            )
        keep[h] = False
        if not keep.any():
            raise DataError(f"{path}, line {int(rec.lines[h]) + 1}: no data lines after the header")
    else:
        assert names is not None, "names are required without a header"
        cols = list(names)
    k = len(cols)

    bad = keep & (rec.nfields != k)
    if bad.any():
        if bad_lines == "error":
            i = int(np.flatnonzero(bad)[0])
            s, e = int(rec.starts[i]), int(rec.ends[i])
            preview = data[s : min(e, s + 120)].decode("utf-8", "replace").replace("\x1f", sep)
            hint = ""
            if quoted and b'"' in data[s:e]:
                hint = " (a '\"' inside a field? read with quoting off)"
            raise DataError(
                f"{path}, line {int(rec.lines[i])}: expected {k} field{'s' * (k != 1)} "
                f"({', '.join(cols)}) separated by {shown_sep}, found {int(rec.nfields[i])}"
                f"{hint}: {preview!r}"
            )
        if report is not None:
            report.drop(f"wrong field count (expected {k})", int(bad.sum()))
        keep &= ~bad
    n_rows = int(keep.sum())
    lines = rec.lines[keep]
    if n_rows == 0:
        df = pd.DataFrame({c: pd.Series([], dtype="str") for c in cols})
        return Table(path, df, lines)
    body = data[int(rec.starts[0]) :] if keep.all() else _body(data, rec, keep)

    longest = int((rec.full_ends - rec.starts).max())
    types: dict[str, Any] = {}
    for c, kind in (kinds or {}).items():
        if c in cols:
            types[str(cols.index(c))] = pa.int64() if kind == "int" else pa.float64()
    df = None
    if types:
        try:
            df = _parse(body, sep_char, k, quoted, longest, types)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            df = None  # a value that is not a number: re-read as text, checks locate it
    if df is None:
        try:
            df = _parse(body, sep_char, k, quoted, longest, {})
        except (pa.ArrowException, ValueError) as e:
            raise DataError(f"{path}, line {int(lines[0])}..: could not parse: {e}") from e
    if len(df) != n_rows:
        raise DataError(
            f"{path}, line {int(lines[0])}..: parsed {len(df)} rows but the file has {n_rows} "
            "data lines (stray quotes or line breaks inside fields?)"
        )
    df.columns = cols
    return Table(path, df, lines)


# ---------------------------------------------------------------------------------------------
# column checks (vectorised; the first bad row is reported)


def _is_text(s: pd.Series) -> bool:
    return pdt.is_string_dtype(s.dtype) or pdt.is_object_dtype(s.dtype)


def empty_mask(s: pd.Series) -> np.ndarray:
    """True where a value is missing, empty or whitespace only."""
    na = np.array(s.isna(), dtype=bool)
    if _is_text(s):
        txt = s.astype("str")
        na |= (txt.str.strip() == "").fillna(True).to_numpy(dtype=bool)
    elif pdt.is_float_dtype(s.dtype):
        na |= ~np.isfinite(s.to_numpy(dtype=np.float64, na_value=np.nan))
    return na


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _show(v: Any) -> str:
    """A value as it appeared in the file, quoted and shortened."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    r = repr(v if isinstance(v, str) else str(v))
    return r if len(r) <= 80 else r[:77] + "..."


def text_column(t: Table, col: str, *, strip: bool = True) -> pd.Series:
    """Column ``col`` as a nullable ``string`` Series (ints rendered without decimals)."""
    s = t.df[col]
    if pdt.is_integer_dtype(s.dtype) or pdt.is_bool_dtype(s.dtype):
        return s.astype("string")
    if pdt.is_float_dtype(s.dtype):
        f = s.to_numpy(dtype=np.float64, na_value=np.nan)
        integral = np.isfinite(f) & (np.floor(f) == f)
        out = s.astype("string")
        if integral.any():
            out[integral] = pd.Series(f[integral].astype(np.int64)).astype("string").to_numpy()
        return out
    out = s.astype("string")
    return out.str.strip() if strip else out


def int_column(
    t: Table,
    col: str,
    *,
    min_value: int | None = None,
    max_value: int | None = None,
    what: str = "an integer",
) -> np.ndarray:
    """Column ``col`` as ``int64``; a non-integer or out-of-range value is a DataError."""
    s = t.df[col]
    if pdt.is_integer_dtype(s.dtype) and not s.hasnans:
        vals = s.to_numpy(dtype=np.int64)
    elif pdt.is_bool_dtype(s.dtype):
        raise t.error(0, col, f"expected {what}, got a boolean column")
    elif pdt.is_numeric_dtype(s.dtype):
        f = s.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(f) | (np.floor(f) != f) | (np.abs(f) > 2**62)
        if bad.any():
            i = _first(bad)
            raise t.error(i, col, f"expected {what}, got {_show(s.iloc[i])}")
        vals = f.astype(np.int64)
    else:
        txt = s.astype("str")
        ok = txt.str.fullmatch(_INT_RE).fillna(False).to_numpy(dtype=bool)
        if not ok.all():
            i = _first(~ok)
            raise t.error(i, col, f"expected {what}, got {_show(s.iloc[i])}")
        vals = txt.str.strip().astype("int64").to_numpy()
    if min_value is not None and (vals < min_value).any():
        i = _first(vals < min_value)
        raise t.error(i, col, f"expected {what} >= {min_value}, got {int(vals[i])}")
    if max_value is not None and (vals > max_value).any():
        i = _first(vals > max_value)
        raise t.error(i, col, f"expected {what} <= {max_value}, got {int(vals[i])}")
    return vals


def float_column(t: Table, col: str, *, what: str = "a number") -> np.ndarray:
    """Column ``col`` as finite ``float64``; anything else is a DataError."""
    s = t.df[col]
    if pdt.is_bool_dtype(s.dtype):
        return s.to_numpy(dtype=np.float64)
    if pdt.is_numeric_dtype(s.dtype):
        vals = s.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        txt = s.astype("str")
        ok = txt.str.fullmatch(_NUM_RE).fillna(False).to_numpy(dtype=bool)
        if not ok.all():
            i = _first(~ok)
            raise t.error(i, col, f"expected {what}, got {_show(s.iloc[i])}")
        vals = txt.str.strip().astype("float64").to_numpy()
    bad = ~np.isfinite(vals)
    if bad.any():
        i = _first(bad)
        raise t.error(i, col, f"expected {what} (finite), got {_show(s.iloc[i])}")
    return vals


_TRUE = ("true", "1", "t", "yes", "y")
_FALSE = ("false", "0", "f", "no", "n")


def bool_column(t: Table, col: str) -> np.ndarray:
    """Column ``col`` as bool from true/false, 1/0, yes/no (any case)."""
    s = t.df[col]
    if pdt.is_bool_dtype(s.dtype) and not s.hasnans:
        return s.to_numpy(dtype=bool)
    if pdt.is_numeric_dtype(s.dtype):
        f = s.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isin(f, (0.0, 1.0))
        if bad.any():
            i = _first(bad)
            raise t.error(i, col, f"expected true/false, got {_show(s.iloc[i])}")
        return f == 1.0
    low = s.astype("str").str.strip().str.lower()
    is_true = low.isin(_TRUE).to_numpy(dtype=bool)
    is_false = low.isin(_FALSE).to_numpy(dtype=bool)
    bad = ~(is_true | is_false)
    if bad.any():
        i = _first(bad)
        raise t.error(i, col, f"expected true/false, got {_show(s.iloc[i])}")
    return is_true


def _check_range(t: Table, col: str, secs: np.ndarray, raw: pd.Series, unit: str) -> None:
    neg = secs < 0
    if neg.any():
        i = _first(neg)
        raise t.error(
            i, col, f"expected a timestamp at or after 1970-01-01, got {_show(raw.iloc[i])}"
        )
    big = secs > MAX_TIMESTAMP_S
    if big.any():
        i = _first(big)
        hint = " (milliseconds? pass timestamp_unit='ms')" if unit == "s" else ""
        raise t.error(i, col, f"timestamp {_show(raw.iloc[i])} is after the year 3000{hint}")


def datetime_to_seconds(dt: pd.Series) -> np.ndarray:
    """Datetime Series (naive = UTC) to int64 unix seconds (floor)."""
    if isinstance(dt.dtype, pd.DatetimeTZDtype):
        dt = dt.dt.tz_convert("UTC").dt.tz_localize(None)
    ns = dt.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    return np.floor_divide(ns, 1_000_000_000)


def timestamp_column(t: Table, col: str, unit: str = "s") -> np.ndarray:
    """Column ``col`` as int64 unix seconds.

    Accepted: integers or decimals in ``unit`` (``s``, ``ms``, ``us``, ``ns``) since the epoch,
    ISO-8601 date-times (``2009-05-04T23:08:57Z``, ``2009-05-04 23:08:57``; naive = UTC), or a
    datetime column (Parquet). Negative, unparsable or absurdly large values are DataErrors.
    """
    if unit not in UNIT_PER_SECOND:
        raise DataError(
            f"{t.path}: unknown timestamp_unit {unit!r}; expected one of {list(UNIT_PER_SECOND)}"
        )
    s = t.df[col]
    per = UNIT_PER_SECOND[unit]
    if pdt.is_datetime64_any_dtype(s.dtype):
        bad = s.isna().to_numpy(dtype=bool)
        if bad.any():
            raise t.error(_first(bad), col, "expected a date-time, got a missing value")
        secs = datetime_to_seconds(s)
    elif pdt.is_integer_dtype(s.dtype) and not s.hasnans:
        secs = np.floor_divide(s.to_numpy(dtype=np.int64), per)
    elif pdt.is_numeric_dtype(s.dtype) and not pdt.is_bool_dtype(s.dtype):
        f = s.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(f)
        if bad.any():
            i = _first(bad)
            raise t.error(i, col, f"expected a timestamp, got {_show(s.iloc[i])}")
        secs = np.floor(f / per).astype(np.int64)
    else:
        txt = s.astype("str").str.strip()
        is_int = txt.str.fullmatch(r"[+-]?\d{1,18}").fillna(False).to_numpy(dtype=bool)
        if is_int.all():
            secs = np.floor_divide(txt.astype("int64").to_numpy(), per)
        else:
            is_num = txt.str.fullmatch(_NUM_RE).fillna(False).to_numpy(dtype=bool)
            if is_num.all():
                f = txt.astype("float64").to_numpy()
                if not np.isfinite(f).all():
                    i = _first(~np.isfinite(f))
                    raise t.error(i, col, f"expected a timestamp, got {_show(s.iloc[i])}")
                secs = np.floor(f / per).astype(np.int64)
            elif 2 * int(is_num.sum()) >= len(is_num):
                i = _first(~is_num)
                raise t.error(
                    i,
                    col,
                    f"expected a timestamp ({unit} since 1970-01-01, or an ISO-8601 date-time), "
                    f"got {_show(s.iloc[i])}",
                )
            else:
                secs = iso_seconds(t, col, txt)
    _check_range(t, col, secs, s, unit)
    return secs


def iso_seconds(t: Table, col: str, txt: pd.Series, *, fmt: str = "ISO8601") -> np.ndarray:
    """ISO-8601 (or ``fmt``) date-time strings to int64 unix seconds; naive times are UTC."""
    try:
        dt = pd.to_datetime(txt, format=fmt, utc=True, errors="coerce")
    except (ValueError, OverflowError) as e:  # pragma: no cover - errors="coerce" guards this
        raise DataError(f"{t.where(0, col)}: could not parse date-times: {e}") from e
    bad = dt.isna().to_numpy(dtype=bool)
    if bad.any():
        i = _first(bad)
        shown = "ISO-8601 date-time" if fmt == "ISO8601" else f"date-time as {fmt}"
        raise t.error(i, col, f"expected an {shown}, got {_show(txt.iloc[i])}")
    return datetime_to_seconds(dt)


# ---------------------------------------------------------------------------------------------
# rows and results


def drop_rows(t: Table, mask: np.ndarray, reason: str, report: DataReport) -> Table:
    """Drop the rows where ``mask`` is True, counting them under ``reason``."""
    mask = np.asarray(mask, dtype=bool)
    report.drop(reason, int(mask.sum()))
    return t.take(~mask)


def handle_empty(
    t: Table, col: str, report: DataReport, on_empty: str = "drop", reason: str | None = None
) -> Table:
    """Drop (``on_empty="drop"``, counted) or refuse (``"error"``) rows whose ``col`` is empty."""
    if on_empty not in ("drop", "error"):
        raise DataError(f"{t.path}: on_empty must be 'drop' or 'error', got {on_empty!r}")
    empty = empty_mask(t.df[col])
    if not empty.any():
        return t
    if on_empty == "error":
        raise t.error(_first(empty), col, "empty value (expected an id)")
    return drop_rows(t, empty, reason or f"empty {col}", report)


def drop_duplicates(
    df: pd.DataFrame, report: DataReport, subset: Sequence[str] | None = None
) -> pd.DataFrame:
    """Keep the first of exactly repeated rows; the others are dropped as "duplicate row"."""
    if len(df) == 0:
        return df
    dup = df.duplicated(subset=list(subset) if subset is not None else None, keep="first")
    n = int(dup.sum())
    if n:
        report.drop(DUPLICATE_ROW, n)
        df = df[~dup.to_numpy()].reset_index(drop=True)
    return df


def ids_as_text(values: np.ndarray | pd.Series) -> pd.Series:
    """Integer ids (or anything) as a ``string`` Series."""
    return pd.Series(values).astype("string")


def check_options(fmt: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    """Refuse unknown options (a typo would otherwise be ignored silently)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(
            f"format {fmt!r}: unknown option(s) {unknown}; expected any of {sorted(allowed)}"
        )


def option_bool(value: Any, name: str) -> bool:
    """A boolean option that may arrive as text from a config override (``"false"``)."""
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise DataError(f"option {name}: expected true or false, got {value!r}")


def finish(
    interactions: pd.DataFrame,
    tracks: pd.DataFrame,
    report: DataReport,
    *,
    source: str,
    files: Sequence[Path],
    ordered: bool = True,
) -> LoadResult:
    """Conform both tables, fill the report's totals and check that no row went missing.

    Args:
        interactions: Canonical-named columns (missing ones are filled by
            :func:`~twotower.data.schema.conform_interactions`).
        tracks: Canonical track columns plus ``f_*`` features.
        report: With ``rows_read`` set and every drop recorded.
        source: Format name for the report.
        files: Input files.
        ordered: Whether the source has a play order.
    """
    inter = conform_interactions(interactions)
    trk = conform_tracks(tracks)
    report.source = source
    report.files = [str(f) for f in files]
    report.rows_kept = len(inter)
    if report.rows_kept + report.rows_dropped != report.rows_read:
        raise AssertionError(
            f"{source}: row accounting broken: kept {report.rows_kept} + dropped "
            f"{report.rows_dropped} != read {report.rows_read}"
        )
    report.users = int(inter["user_id"].nunique())
    report.tracks = int(inter["track_id"].nunique())
    report.sessions = int(inter["session_id"].nunique())
    ts = inter["timestamp"]
    if ts.notna().any():
        report.time_min = int(ts.min())
        report.time_max = int(ts.max())
    return LoadResult(
        interactions=inter,
        tracks=trk,
        report=report,
        ordered=ordered,
        source=source,
        files=[str(f) for f in files],
    )


def concat(
    frames: list[pd.DataFrame], columns: Sequence[str] = INTERACTION_COLUMNS
) -> pd.DataFrame:
    """Concatenate per-file frames (an empty list gives an empty frame with ``columns``)."""
    frames = [f for f in frames if len(f.columns)]
    if not frames:
        return pd.DataFrame({c: [] for c in columns})
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def split_title_year(title: pd.Series) -> pd.Series:
    """The year in a trailing ``(1995)`` of a title, as nullable Int16."""
    year = title.str.extract(r"\((\d{4})\)\s*$", expand=False)
    return pd.to_numeric(year, errors="coerce").astype("Int16")


def join_flags(flags: np.ndarray, names: Sequence[str]) -> pd.Series:
    """``'|'``-joined names of the set flags of every row (``[N, G]`` bool) or <NA>."""
    n = flags.shape[0]
    out = pd.Series([""] * n, dtype="str")
    for g, name in enumerate(names):  # one vectorised step per genre, not per row
        out = out + np.where(flags[:, g], name + "|", "")
    out = out.str.rstrip("|")
    return out.where(out != "", None).astype("string")


__all__ = [
    "DUPLICATE_ROW",
    "SKIPPED_PLAY",
    "Table",
    "bool_column",
    "check_options",
    "option_bool",
    "concat",
    "drop_duplicates",
    "drop_rows",
    "empty_mask",
    "find_files",
    "finish",
    "float_column",
    "handle_empty",
    "ids_as_text",
    "int_column",
    "iso_seconds",
    "join_flags",
    "read_bytes",
    "read_table",
    "split_title_year",
    "text_column",
    "timestamp_column",
    "to_utf8",
]
