"""Generic interaction logs: CSV, TSV or Parquet with a column mapping.

``columns`` maps canonical names to the file's names, e.g. ``{"user_id": "uid", "track_id":
"song", "timestamp": "ts"}``; without it, file columns that already carry canonical names are
used. ``track_id`` is required, and ``timestamp`` unless both ``session_id`` and ``position``
are given. Unmapped file columns are ignored.

Values: ids are text (surrounding spaces stripped); ``timestamp`` is seconds since 1970
(``timestamp_unit``: ``s``, ``ms``, ``us``, ``ns``), or ISO-8601 date-times (naive = UTC), or a
Parquet timestamp column; ``weight`` a number; ``skipped`` true/false/1/0/yes/no; ``hour`` 0..23;
``position`` an integer.

Empty values: rows with an empty ``track_id``, ``user_id`` or ``session_id`` (when mapped), or an
empty ``timestamp`` while the order depends on it, are dropped and counted by reason (logs
exported from production systems do contain them); ``on_empty="error"`` refuses them instead.
Empty ``position``, ``hour`` or ``context_type`` become <NA>; an empty ``weight`` or ``skipped``
is an error.

A track metadata file can be given with ``tracks_path`` (CSV, TSV or Parquet by extension) and
mapped with ``track_columns`` (``track_id``, ``title``, ``artist``, ``album``, ``genres``
(``|``-joined text, or a Parquet list), ``year``, and ``f_<name>`` numeric features; empty
feature values become NaN and are noted in the report).

Other options: ``encoding`` (default ``"utf-8"``; ``"auto"`` reads stray non-UTF-8 bytes as
latin-1), ``bad_lines`` (``"error"`` or ``"drop"`` lines with the wrong field count),
``quoting`` (default True: CSV quoting with ``"``; False for files whose fields contain bare
quotes), ``sep`` (another one-character separator, e.g. ``";"``). A folder is read file by file
(``*.csv`` / ``*.tsv`` / ``*.parquet``, also ``.gz`` for text), in name order.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twotower.data.report import DataReport
from twotower.data.schema import (
    FEATURE_PREFIX,
    INTERACTION_COLUMNS,
    TRACK_COLUMNS,
    DataError,
    LoadResult,
)
from twotower.data.sources.common import (
    Table,
    bool_column,
    check_options,
    concat,
    drop_duplicates,
    empty_mask,
    find_files,
    finish,
    float_column,
    handle_empty,
    int_column,
    option_bool,
    read_bytes,
    read_table,
    text_column,
    timestamp_column,
)

OPTIONS = (
    "timestamp_unit",
    "tracks_path",
    "track_columns",
    "encoding",
    "bad_lines",
    "on_empty",
    "quoting",
    "sep",
)
ID_COLUMNS = ("user_id", "track_id", "session_id")
KINDS: dict[str, Any] = {"position": "int", "hour": "int", "weight": "float"}


def load_csv(path: str | None, columns: dict[str, str] | None = None, **options: Any) -> LoadResult:
    """Load comma-separated logs (a file or a folder of ``*.csv``); see the module doc."""
    return _load_text(path, columns, "csv", options.pop("sep", ","), options)


def load_tsv(path: str | None, columns: dict[str, str] | None = None, **options: Any) -> LoadResult:
    """Load tab-separated logs (a file or a folder of ``*.tsv``); see the module doc."""
    return _load_text(path, columns, "tsv", options.pop("sep", "\t"), options)


def load_parquet(
    path: str | None, columns: dict[str, str] | None = None, **options: Any
) -> LoadResult:
    """Load Parquet logs (a file or a folder of ``*.parquet``); see the module doc."""
    check_options("parquet", options, OPTIONS)
    files = _log_files(path, ("*.parquet", "*.pq"), "Parquet interaction files", options)
    report = DataReport()
    frames = []
    for f in files:
        t = _parquet_table(f, columns, INTERACTION_COLUMNS)
        report.rows_read += len(t)
        frames.append(_interactions(t, columns, options, report))
    return _result(frames, files, report, options, "parquet")


# ---------------------------------------------------------------------------------------------


def _log_files(
    path: str | None, patterns: tuple[str, ...], what: str, options: dict[str, Any]
) -> list[Path]:
    """Interaction files under ``path``, leaving out the track metadata file."""
    files = find_files(path, patterns, what)
    meta = options.get("tracks_path")
    if meta and len(files) > 1:
        files = [f for f in files if f.resolve() != Path(meta).resolve()]
    return files


def _mapping(
    columns: dict[str, str] | None, found: list[str], canonical: tuple[str, ...], where: Path
) -> dict[str, str]:
    """Canonical -> file column; identity for canonical names present when not given."""
    if columns is None:
        mapping = {c: c for c in canonical if c in found}
        if canonical is TRACK_COLUMNS:
            mapping.update({c: c for c in found if c.startswith(FEATURE_PREFIX)})
        return mapping
    unknown = [
        k
        for k in columns
        if k not in canonical and not (canonical is TRACK_COLUMNS and k.startswith(FEATURE_PREFIX))
    ]
    if unknown:
        raise DataError(
            f"{where}: unknown canonical column(s) {unknown} in the column mapping; expected "
            f"any of {list(canonical)}"
        )
    return dict(columns)


def _check_required(mapping: dict[str, str], t: Table) -> None:
    expected = [f"{k} -> {v!r}" for k, v in mapping.items()]
    where = f"{t.path}, line 1" if t.lines is not None else f"{t.path} (Parquet schema)"
    missing = sorted({v for v in mapping.values() if v not in t.df.columns})
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; the mapping expects {expected}, "
            f"the file has columns {list(t.df.columns)}"
        )
    if "track_id" not in mapping:
        raise DataError(
            f"{where}: no track_id column; map one with columns={{'track_id': "
            f"'<name>'}} (the file has columns {list(t.df.columns)})"
        )
    if "timestamp" not in mapping and not {"session_id", "position"} <= set(mapping):
        raise DataError(
            f"{where}: no timestamp column (needed unless session_id and position are "
            f"given); map one with columns={{'timestamp': '<name>'}} (the file has columns "
            f"{list(t.df.columns)})"
        )


def _load_text(
    path: str | None,
    columns: dict[str, str] | None,
    fmt: str,
    sep: str,
    options: dict[str, Any],
) -> LoadResult:
    check_options(fmt, options, OPTIONS)
    patterns = (f"*.{fmt}", f"*.{fmt}.gz") + (("*.txt",) if fmt == "tsv" else ())
    files = _log_files(path, patterns, f"{fmt.upper()} interaction files", options)
    report = DataReport()
    frames = []
    for f in files:
        before = report.rows_dropped
        kinds = {columns.get(k, k) if columns else k: v for k, v in KINDS.items()}
        t = read_table(
            f,
            sep=sep,
            header=True,
            kinds=kinds,
            encoding=options.get("encoding") or "utf-8",
            quoted=option_bool(options.get("quoting", True), "quoting"),
            bad_lines=options.get("bad_lines", "error"),
            report=report,
            data=_maybe_gunzip(f),
        )
        report.rows_read += len(t) + report.rows_dropped - before
        frames.append(_interactions(t, columns, options, report))
    return _result(frames, files, report, options, fmt)


def _maybe_gunzip(f: Path) -> bytes:
    data = read_bytes(f)
    if f.suffix == ".gz":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{f}: not a valid gzip file ({e})") from e
    return data


def _interactions(
    t: Table, columns: dict[str, str] | None, options: dict[str, Any], report: DataReport
) -> pd.DataFrame:
    """Validate one file's rows and return them with canonical columns."""
    mapping = _mapping(columns, list(t.df.columns), INTERACTION_COLUMNS, t.path)
    _check_required(mapping, t)
    on_empty = options.get("on_empty", "drop")
    t.df = t.df[list(dict.fromkeys(mapping.values()))]
    for canon in ID_COLUMNS:
        if canon in mapping:
            t = handle_empty(t, mapping[canon], report, on_empty, reason=f"empty {canon}")
    ordered_by_position = {"session_id", "position"} <= set(mapping)
    if "timestamp" in mapping and not ordered_by_position:
        t = handle_empty(t, mapping["timestamp"], report, on_empty, reason="empty timestamp")
    out: dict[str, Any] = {}
    for canon in ID_COLUMNS:
        if canon in mapping:
            out[canon] = text_column(t, mapping[canon])
    if "timestamp" in mapping:
        col, unit = mapping["timestamp"], options.get("timestamp_unit", "s")
        out["timestamp"] = _optional(t, col, "Int64", lambda s: timestamp_column(s, col, unit))
    if "position" in mapping:
        col = mapping["position"]
        out["position"] = _optional(t, col, "Int64", lambda s: int_column(s, col, min_value=0))
    if "hour" in mapping:
        col = mapping["hour"]
        out["hour"] = _optional(
            t, col, "Int8", lambda s: int_column(s, col, min_value=0, max_value=23, what="an hour")
        )
    if "weight" in mapping:
        out["weight"] = float_column(t, mapping["weight"], what="a weight").astype(np.float32)
    if "skipped" in mapping:
        out["skipped"] = bool_column(t, mapping["skipped"])
    if "context_type" in mapping:
        ctx = text_column(t, mapping["context_type"])
        out["context_type"] = ctx.where(ctx != "", None)
    return pd.DataFrame(out)


def _optional(t: Table, col: str, dtype: str, convert: Any) -> pd.Series:
    """Convert the non-empty values of ``col``; empty ones become <NA>."""
    empty = empty_mask(t.df[col])
    result = pd.Series(pd.NA, index=range(len(t)), dtype=dtype)
    if (~empty).any():
        values = convert(t.take(~empty))
        result[~empty] = values
    return result


def _result(
    frames: list[pd.DataFrame],
    files: list[Path],
    report: DataReport,
    options: dict[str, Any],
    fmt: str,
) -> LoadResult:
    interactions = drop_duplicates(concat(frames), report)
    tracks = pd.DataFrame({"track_id": pd.Series([], dtype="string")})
    all_files = list(files)
    tracks_path = options.get("tracks_path")
    if tracks_path:
        tracks, tfile = _read_tracks(Path(tracks_path), options, report)
        all_files.append(tfile)
        known = interactions["track_id"].isin(tracks["track_id"]).to_numpy()
        report.count("track without metadata", int((~known).sum()))
    return finish(interactions, tracks, report, source=fmt, files=all_files, ordered=True)


# ---------------------------------------------------------------------------------------------
# track metadata


def _parquet_table(f: Path, columns: dict[str, str] | None, canonical: tuple[str, ...]) -> Table:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(f)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{f}: not a readable Parquet file ({e})") from e
    mapping = _mapping(columns, list(schema.names), canonical, f)
    wanted = [c for c in dict.fromkeys(mapping.values()) if c in schema.names]
    try:
        table = pq.read_table(f, columns=wanted)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{f}: could not read Parquet columns {wanted} ({e})") from e
    for name in table.column_names:  # list<string> genres -> "a|b"
        typ = table.schema.field(name).type
        if pa.types.is_list(typ) or pa.types.is_large_list(typ):
            joined = pc.binary_join(table[name].cast(pa.list_(pa.string())), "|")
            table = table.set_column(table.column_names.index(name), name, joined)
    # columns the mapping names but the file lacks are reported by the caller's check
    return Table(f, table.to_pandas().reset_index(drop=True), None)


def _read_tracks(f: Path, options: dict[str, Any], report: DataReport) -> tuple[pd.DataFrame, Path]:
    columns = options.get("track_columns")
    if f.suffix in (".parquet", ".pq"):
        t = _parquet_table(f, columns, TRACK_COLUMNS)
    else:
        sep = "\t" if f.suffix in (".tsv", ".tab") else ","
        t = read_table(
            f,
            sep=sep,
            header=True,
            encoding=options.get("encoding") or "utf-8",
            quoted=option_bool(options.get("quoting", True), "quoting"),
            report=report,
            data=_maybe_gunzip(f),
        )
    mapping = _mapping(columns, list(t.df.columns), TRACK_COLUMNS, f)
    missing = sorted({v for v in mapping.values() if v not in t.df.columns})
    if missing or "track_id" not in mapping:
        raise DataError(
            f"{f}, line 1: track metadata needs a track_id column and the mapped columns "
            f"{mapping}; missing {missing or ['track_id']}; the file has {list(t.df.columns)}"
        )
    empty = empty_mask(t.df[mapping["track_id"]])
    if empty.any():
        raise t.error(int(np.flatnonzero(empty)[0]), mapping["track_id"], "empty track id")
    out: dict[str, Any] = {}
    for canon, col in mapping.items():
        if canon == "year":
            out[canon] = _optional(
                t, col, "Int16", lambda s, c=col: int_column(s, c, min_value=0, max_value=9999)
            )
        elif canon.startswith(FEATURE_PREFIX):
            fill = empty_mask(t.df[col])
            values = np.full(len(t), np.nan, dtype=np.float32)
            if (~fill).any():
                values[~fill] = float_column(t.take(~fill), col)
            if fill.any():
                report.notes.append(f"{f.name}: {int(fill.sum())} empty value(s) of {col} (NaN)")
            out[canon] = values
        else:
            s = text_column(t, col)
            out[canon] = s.where(s != "", None) if canon != "track_id" else s
    tracks = pd.DataFrame(out)
    dup = tracks["track_id"].duplicated().to_numpy()
    if dup.any():
        report.notes.append(f"{f.name}: {int(dup.sum())} repeated track id(s), first kept")
        tracks = tracks[~dup].reset_index(drop=True)
    return tracks, f
