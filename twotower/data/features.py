"""Item side features aligned with the item vocabulary (built from the training part only)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from twotower.data.prepared import ItemFeatures
from twotower.data.report import DataReport
from twotower.data.schema import FEATURE_PREFIX
from twotower.ids import OOV_TOKEN, PAD_TOKEN, Vocab

MAX_GENRES = 8
YEAR_BASE = 1900
YEAR_BUCKET = 5
NO_METADATA_REASON = "track without metadata"
DUPLICATE_TRACK_REASON = "duplicate track metadata row (first kept)"


def year_bucket(year: np.ndarray) -> np.ndarray:
    """0 for unknown (<= 0), else ``1 + (year - 1900) // 5`` (years before 1900 -> 1)."""
    year = np.asarray(year, dtype=np.int64)
    return np.where(year > 0, 1 + np.maximum(year - YEAR_BASE, 0) // YEAR_BUCKET, 0)


def _aligned(tracks: pd.DataFrame, item_vocab: Vocab, report: DataReport | None) -> pd.DataFrame:
    """One metadata row per vocabulary index ``2..V-1`` (missing tracks as <NA> rows)."""
    dup = tracks["track_id"].duplicated(keep="first").to_numpy()
    if dup.any():
        if report is not None:
            report.count(DUPLICATE_TRACK_REASON, int(dup.sum()))
        tracks = tracks[~dup]
    index = pd.Index(tracks["track_id"].astype(str).to_numpy(dtype=object))
    missing = index.get_indexer(item_vocab.ids) < 0
    if report is not None:
        report.count(NO_METADATA_REASON, int(missing.sum()))
    meta = tracks.drop(columns="track_id").set_axis(index).reindex(item_vocab.ids)
    meta = meta.reset_index(drop=True)
    meta.insert(0, "track_id", pd.Series(item_vocab.ids, dtype="string"))
    return meta


def _genre_matrix(genres: pd.Series) -> tuple[np.ndarray, Vocab]:
    """``[n, G]`` genre indices (0 padded, G <= 8) and the genre vocabulary."""
    n = len(genres)
    split = genres.astype("string").str.split("|").explode()
    row = split.index.to_numpy()
    names = split.astype("string").str.strip()
    valid = (names.notna() & (names != "")).to_numpy()
    row, names = row[valid], names[valid]
    vocab = Vocab.build(names.to_numpy(dtype=object))
    if len(row) == 0:
        return np.zeros((n, 0), dtype=np.int64), vocab
    idx = vocab.lookup(names.to_numpy(dtype=object))
    # Position of each genre inside its row; duplicates of a row keep their first slot.
    slot = pd.Series(row).groupby(row).cumcount().to_numpy()
    keep = slot < MAX_GENRES
    width = int(min(slot.max() + 1, MAX_GENRES))
    mat = np.zeros((n, width), dtype=np.int64)
    mat[row[keep], slot[keep]] = idx[keep]
    return mat, vocab


def build_item_features(
    tracks: pd.DataFrame, item_vocab: Vocab, report: DataReport | None = None
) -> tuple[ItemFeatures, pd.DataFrame]:
    """Side features and the display table, row ``i`` = item index ``i``.

    Args:
        tracks: Canonical tracks table (track_id, title, artist, album, genres, year, ``f_*``).
        item_vocab: The training item vocabulary; features and standardisation statistics use
            only its tracks.
        report: Receives counts of tracks without metadata and duplicate metadata rows.

    Returns:
        The :class:`ItemFeatures` (rows 0 pad and 1 OOV all zeros; artist/album/genre indices
        into vocabularies built from the training tracks; genres split on ``|``, padded to the
        largest genre count, at most 8; year bucket; ``f_*`` features standardised over the
        training tracks with NaN -> 0) and a display table with columns track_id, title, artist
        (rows 0/1 are ``<pad>``/``<oov>``).
    """
    meta = _aligned(tracks.reset_index(drop=True), item_vocab, report)
    n = len(item_vocab)

    def pad(values: np.ndarray) -> np.ndarray:
        out = np.zeros((n, *values.shape[1:]), dtype=values.dtype)
        out[2:] = values
        return out

    artist_raw = meta["artist"].to_numpy(dtype=object, na_value=None)
    album_key = (meta["artist"].fillna("") + "\x1f" + meta["album"]).to_numpy(
        dtype=object, na_value=None
    )
    album_raw = meta["album"].to_numpy(dtype=object, na_value=None)
    album_key = np.where(pd.isna(album_raw), None, album_key)
    artist_vocab = Vocab.build(pd.Series(artist_raw, dtype="object"))
    album_vocab = Vocab.build(pd.Series(album_key, dtype="object"))
    artist = artist_vocab.lookup(pd.Series(artist_raw, dtype="object"))
    album = album_vocab.lookup(pd.Series(album_key, dtype="object"))
    genres, genre_vocab = _genre_matrix(meta["genres"])
    year = year_bucket(meta["year"].to_numpy(dtype=np.int64, na_value=0))
    audio_names = sorted(c for c in meta.columns if c.startswith(FEATURE_PREFIX))
    if audio_names:
        raw = meta[audio_names].to_numpy(dtype=np.float64, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(raw, axis=0) if len(raw) else np.zeros(len(audio_names))
            std = np.nanstd(raw, axis=0) if len(raw) else np.ones(len(audio_names))
        mean = np.nan_to_num(mean)
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        audio = np.nan_to_num((raw - mean) / std).astype(np.float32)
    else:
        audio = np.zeros((len(meta), 0), dtype=np.float32)
    features = ItemFeatures(
        artist=pad(artist),
        album=pad(album),
        genres=pad(genres),
        year=pad(year),
        audio=pad(audio),
        artist_vocab=artist_vocab,
        album_vocab=album_vocab,
        genre_vocab=genre_vocab,
        audio_names=audio_names,
    )
    display = pd.DataFrame(
        {
            "track_id": pd.Series([PAD_TOKEN, OOV_TOKEN, *item_vocab.ids], dtype="string"),
            "title": pd.concat(
                [pd.Series([pd.NA, pd.NA], dtype="string"), meta["title"].astype("string")],
                ignore_index=True,
            ),
            "artist": pd.concat(
                [pd.Series([pd.NA, pd.NA], dtype="string"), meta["artist"].astype("string")],
                ignore_index=True,
            ),
        }
    )
    return features, display
