"""MovieLens ratings (GroupLens): the 100K, 1M/10M (``::``) and newer CSV layouts.

The layout is detected from the folder:

* ``u.data`` (100K): tab-separated ``user, item, rating, timestamp`` without a header;
  ``u.item`` is ``|``-separated latin-1 with 19 genre flags (names from ``u.genre``).
* ``ratings.dat`` (1M, 10M): ``UserID::MovieID::Rating::Timestamp``;
  ``movies.dat`` is ``MovieID::Title (Year)::Genre1|Genre2`` (latin-1 in 1M).
* ``ratings.csv`` (ml-latest, 20M, 25M): header ``userId,movieId,rating,timestamp``;
  ``movies.csv`` has ``movieId,title,genres`` with CSV quoting.

Every rating becomes one interaction with ``weight = rating``; ratings below ``min_rating`` are
dropped with the reason "rating below min_rating". Demographics (``u.user``, ``users.dat``),
tags and links are not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twotower.data.report import DataReport
from twotower.data.schema import DataError, LoadResult
from twotower.data.sources.common import (
    BadLines,
    Table,
    check_options,
    drop_duplicates,
    empty_mask,
    finish,
    float_column,
    ids_as_text,
    int_column,
    join_flags,
    read_table,
    split_title_year,
    text_column,
    timestamp_column,
)

# u.item's genre flags, in order, when u.genre is absent.
GENRES_100K: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
RATING_KINDS: dict[str, Any] = {
    "user_id": "int",
    "item_id": "int",
    "rating": "float",
    "timestamp": "int",
}
CSV_RATING_COLUMNS = ("userId", "movieId", "rating", "timestamp")
BELOW_MIN_RATING = "rating below min_rating"
NO_METADATA = "rating of a movie without metadata"
LAYOUT_FILES = {"100k": "u.data", "dat": "ratings.dat", "csv": "ratings.csv"}
OPTIONS = ("min_rating", "encoding", "bad_lines")


def detect_layout(path: str | Path | None) -> tuple[str, Path]:
    """Return ``(layout, folder)`` with layout ``"100k"``, ``"dat"`` or ``"csv"``.

    Args:
        path: The dataset folder, its ratings file, or a folder holding exactly one dataset
            folder (e.g. where the zip was extracted).

    Raises:
        DataError: No known ratings file, or several.
    """
    if path is None:
        raise DataError("movielens: no path given; expected the dataset folder")
    p = Path(path)
    if p.is_file():
        for layout, name in LAYOUT_FILES.items():
            if p.name == name:
                return layout, p.parent
        raise DataError(
            f"{p}: not a MovieLens ratings file; expected one of {sorted(LAYOUT_FILES.values())}"
        )
    if not p.is_dir():
        raise DataError(f"{p}: no such file or folder (expected a MovieLens folder)")
    found = [(lay, p) for lay, name in LAYOUT_FILES.items() if (p / name).is_file()]
    if not found:
        subs = [d for d in sorted(p.iterdir()) if d.is_dir()]
        found = [(lay, d) for d in subs for lay, n in LAYOUT_FILES.items() if (d / n).is_file()]
    if len(found) == 1:
        return found[0]
    names = sorted(LAYOUT_FILES.values())
    if not found:
        raise DataError(
            f"{p}: no MovieLens ratings file found; expected one of {names} in the folder "
            f"(found {sorted(f.name for f in p.iterdir())[:20]})"
        )
    raise DataError(f"{p}: several MovieLens layouts found {found}; point at one folder")


def _source_name(layout: str, folder: Path) -> str:
    if layout == "100k":
        return "movielens-100k"
    if layout == "dat":
        return "movielens-10m" if "10m" in folder.name.lower() else "movielens-1m"
    return "movielens-latest"


def _read_ratings(
    layout: str, folder: Path, encoding: str, bad_lines: BadLines, report: DataReport
) -> Table:
    f = folder / LAYOUT_FILES[layout]
    if layout == "csv":
        t = read_table(
            f,
            sep=",",
            header=True,
            kinds=dict(zip(CSV_RATING_COLUMNS, RATING_KINDS.values(), strict=True)),
            encoding=encoding,
            bad_lines=bad_lines,
            report=report,
            required=CSV_RATING_COLUMNS,
        )
        t.df = t.df[list(CSV_RATING_COLUMNS)]
        t.df.columns = list(RATING_COLUMNS)
        return t
    sep = "\t" if layout == "100k" else "::"
    return read_table(
        f,
        sep=sep,
        names=RATING_COLUMNS,
        kinds=RATING_KINDS,
        encoding=encoding,
        bad_lines=bad_lines,
        report=report,
    )


def load(
    path: str | None,
    columns: dict[str, str] | None = None,
    **options: Any,
) -> LoadResult:
    """Load a MovieLens folder (layout detected from its files).

    Args:
        path: Dataset folder (``ml-100k/``, ``ml-1m/``, ``ml-latest-small/``, ...) or its
            ratings file.
        columns: Not used (MovieLens has fixed columns); must be None.
        **options: ``min_rating`` (float, default 0: ratings below it are dropped),
            ``encoding`` (default: ``"utf-8"`` for ratings and ``"auto"`` for movie titles,
            i.e. UTF-8 with latin-1 for stray bytes), ``bad_lines`` (``"error"`` or ``"drop"``
            lines with the wrong field count).

    Returns:
        Interactions with ``weight = rating`` and ``ordered=True``; tracks with title, genres
        and year.

    Raises:
        DataError: Missing files, malformed lines, bad ids, ratings or timestamps.
    """
    check_options("movielens", options, OPTIONS)
    if columns:
        raise DataError("movielens: the columns are fixed; do not pass a column mapping")
    try:
        min_rating = float(options.get("min_rating", 0.0))
    except (TypeError, ValueError) as e:
        raise DataError(
            f"movielens: min_rating must be a number, got {options['min_rating']!r}"
        ) from e
    encoding = options.get("encoding")
    bad_lines: BadLines = options.get("bad_lines", "error")
    layout, folder = detect_layout(path)
    report = DataReport()
    t = _read_ratings(layout, folder, encoding or "utf-8", bad_lines, report)
    report.rows_read = len(t) + report.rows_dropped
    files = [t.path]

    user = int_column(t, "user_id", min_value=0, what="an integer user id")
    item = int_column(t, "item_id", min_value=0, what="an integer movie id")
    rating = float_column(t, "rating", what="a numeric rating")
    ts = timestamp_column(t, "timestamp", unit="s")
    df = pd.DataFrame({"user": user, "item": item, "rating": rating, "ts": ts})
    if min_rating > 0:
        low = df["rating"].to_numpy() < min_rating
        report.drop(BELOW_MIN_RATING, int(low.sum()))
        df = df[~low].reset_index(drop=True)
    df = drop_duplicates(df, report)

    tracks, movie_files = _read_movies(layout, folder, encoding, report)
    files += movie_files
    if len(tracks):
        known = np.isin(df["item"].to_numpy(), tracks["item"].to_numpy())
        report.count(NO_METADATA, int((~known).sum()))
        tracks = tracks.drop(columns="item")
    for extra in ("u.user", "users.dat", "tags.dat", "tags.csv", "links.csv"):
        if (folder / extra).is_file():
            report.notes.append(f"{extra} is not used")

    interactions = pd.DataFrame(
        {
            "user_id": ids_as_text(df["user"]),
            "track_id": ids_as_text(df["item"]),
            "timestamp": df["ts"],
            "weight": df["rating"].astype("float32"),
        }
    )
    return finish(interactions, tracks, report, source=_source_name(layout, folder), files=files)


def _genre_names(folder: Path, encoding: str, report: DataReport) -> tuple[list[str], list[Path]]:
    f = folder / "u.genre"
    if not f.is_file():
        return list(GENRES_100K), []
    t = read_table(f, sep="|", names=["genre", "genre_id"], encoding=encoding, report=report)
    gid = int_column(t, "genre_id", min_value=0, what="an integer genre id")
    names = text_column(t, "genre")
    if len(gid) != len(GENRES_100K) or sorted(gid.tolist()) != list(range(len(GENRES_100K))):
        raise DataError(
            f"{f}, line 1: expected {len(GENRES_100K)} genres with ids 0..{len(GENRES_100K) - 1}, "
            f"found ids {sorted(gid.tolist())}"
        )
    order = np.argsort(gid)
    return [str(x) for x in names.to_numpy()[order]], [f]


def _dedupe_movies(tracks: pd.DataFrame, f: Path, report: DataReport) -> pd.DataFrame:
    dup = tracks["item"].duplicated(keep="first").to_numpy()
    if dup.any():
        report.notes.append(f"{f.name}: {int(dup.sum())} repeated movie id(s), first kept")
        tracks = tracks[~dup].reset_index(drop=True)
    return tracks


def _read_movies(
    layout: str, folder: Path, encoding: str | None, report: DataReport
) -> tuple[pd.DataFrame, list[Path]]:
    """Tracks table (plus an integer ``item`` column) and the files read."""
    enc = encoding or "auto"
    if layout == "100k":
        f = folder / "u.item"
        if not f.is_file():
            report.notes.append("u.item not found: movies without metadata")
            return pd.DataFrame(), []
        genres, gfiles = _genre_names(folder, enc, report)
        names = ["item", "title", "release_date", "video_release_date", "url"]
        flag_cols = [f"g{i}" for i in range(len(genres))]
        t = read_table(f, sep="|", names=names + flag_cols, encoding=enc, report=report)
        item = int_column(t, "item", min_value=0, what="an integer movie id")
        flags = np.stack([int_column(t, c, min_value=0, max_value=1) for c in flag_cols], 1)
        title = text_column(t, "title")
        release = text_column(t, "release_date")
        release_year = pd.to_numeric(
            release.str.extract(r"(\d{4})\s*$", expand=False), errors="coerce"
        ).astype("Int16")
        year = split_title_year(title).fillna(release_year)  # the film's year, as in ml-1m
        tracks = pd.DataFrame(
            {
                "item": item,
                "track_id": ids_as_text(item),
                "title": title.where(~empty_mask(title), None),
                "genres": join_flags(flags.astype(bool), genres),
                "year": year,
            }
        )
        return _dedupe_movies(tracks, f, report), [f, *gfiles]
    if layout == "dat":
        f = folder / "movies.dat"
        if not f.is_file():
            report.notes.append("movies.dat not found: movies without metadata")
            return pd.DataFrame(), []
        t = read_table(f, sep="::", names=["item", "title", "genres"], encoding=enc, report=report)
    else:
        f = folder / "movies.csv"
        if not f.is_file():
            report.notes.append("movies.csv not found: movies without metadata")
            return pd.DataFrame(), []
        t = read_table(
            f,
            sep=",",
            header=True,
            quoted=True,
            encoding=enc,
            report=report,
            required=["movieId", "title", "genres"],
        )
        t.df = t.df.rename(columns={"movieId": "item"})
    item = int_column(t, "item", min_value=0, what="an integer movie id")
    title = text_column(t, "title")
    genres = text_column(t, "genres")
    genres = genres.where(~empty_mask(genres) & (genres != "(no genres listed)"), None)
    tracks = pd.DataFrame(
        {
            "item": item,
            "track_id": ids_as_text(item),
            "title": title.where(~empty_mask(title), None),
            "genres": genres,
            "year": split_title_year(title),
        }
    )
    return _dedupe_movies(tracks, f, report), [f]
