"""The data contract shared by every loader: canonical columns, dtypes and the load result.

Every source (MovieLens, MSSD, Last.fm, generic CSV/Parquet, synthetic) returns a
:class:`LoadResult` whose ``interactions`` and ``tracks`` tables use exactly these columns, so
everything downstream (sessions, vocabularies, splits) is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from twotower.data.report import DataReport

# Interactions: one row per play or rating.
#   user_id      string, <NA> when the source has no listeners (MSSD sessions)
#   track_id     string, never missing
#   timestamp    int64 unix seconds, <NA> only when session_id + position give the order
#   session_id   string or <NA> (derived later by an inactivity gap)
#   position     Int64 or <NA>: order within a session
#   weight       float32 play strength / rating (1.0 when unknown)
#   skipped      bool: a skipped play is a signal, not a positive
#   hour         Int8 hour of day 0..23 or <NA>
#   context_type string or <NA> (MSSD: editorial_playlist, radio, ...)
INTERACTION_COLUMNS: tuple[str, ...] = (
    "user_id",
    "track_id",
    "timestamp",
    "session_id",
    "position",
    "weight",
    "skipped",
    "hour",
    "context_type",
)
INTERACTION_DTYPES: dict[str, str] = {
    "user_id": "string",
    "track_id": "string",
    "timestamp": "Int64",
    "session_id": "string",
    "position": "Int64",
    "weight": "float32",
    "skipped": "bool",
    "hour": "Int8",
    "context_type": "string",
}

# Tracks: one row per track; everything beyond track_id optional (<NA> when unknown).
#   genres is a '|'-joined string; numeric audio features are float32 columns named "f_<name>".
TRACK_COLUMNS: tuple[str, ...] = ("track_id", "title", "artist", "album", "genres", "year")
TRACK_DTYPES: dict[str, str] = {
    "track_id": "string",
    "title": "string",
    "artist": "string",
    "album": "string",
    "genres": "string",
    "year": "Int16",
}
FEATURE_PREFIX = "f_"


class DataError(ValueError):
    """Bad input: the message names the file, line or column and what was expected."""


@dataclass
class LoadResult:
    """What every loader returns.

    Attributes:
        interactions: Table with :data:`INTERACTION_COLUMNS` (see :func:`conform_interactions`).
        tracks: Table with :data:`TRACK_COLUMNS` plus optional ``f_*`` numeric features.
        report: Rows read, kept and dropped by reason while loading.
        ordered: False when the source has no play order (HetRec Last.fm-2K): such data
            serves the item side and count-based baselines, not sequence training.
        source: Short name of the format, e.g. ``"movielens-100k"``.
        files: Input files, for the cache fingerprint and the data report.
    """

    interactions: pd.DataFrame
    tracks: pd.DataFrame
    report: DataReport
    ordered: bool = True
    source: str = ""
    files: list[str] = field(default_factory=list)


def empty_tracks() -> pd.DataFrame:
    """A tracks table with the canonical columns and no rows."""
    return conform_tracks(pd.DataFrame({c: [] for c in TRACK_COLUMNS}))


def conform_interactions(df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with every canonical column present, in order, with canonical dtypes.

    Missing optional columns are filled: ``weight`` 1.0, ``skipped`` False, others <NA>.
    Extra columns are dropped.
    """
    n = len(df)
    out = {}
    for col in INTERACTION_COLUMNS:
        dtype = INTERACTION_DTYPES[col]
        if col in df.columns:
            out[col] = df[col].astype(dtype) if str(df[col].dtype) != dtype else df[col]
        elif col == "weight":
            out[col] = pd.Series(1.0, index=df.index, dtype=dtype)
        elif col == "skipped":
            out[col] = pd.Series(False, index=df.index, dtype=dtype)
        else:
            out[col] = pd.Series(pd.NA, index=df.index, dtype=dtype)
    res = pd.DataFrame(out, index=df.index)
    assert len(res) == n
    return res.reset_index(drop=True)


def conform_tracks(df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with the canonical track columns (``f_*`` features kept as float32)."""
    out = {}
    for col in TRACK_COLUMNS:
        dtype = TRACK_DTYPES[col]
        if col in df.columns:
            out[col] = df[col].astype(dtype)
        else:
            out[col] = pd.Series(pd.NA, index=df.index, dtype=dtype)
    for col in df.columns:
        if col.startswith(FEATURE_PREFIX):
            out[col] = df[col].astype("float32")
    return pd.DataFrame(out, index=df.index).reset_index(drop=True)
