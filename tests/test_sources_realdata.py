"""Loaders on the real datasets in ``../shared/data`` (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from twotower.data.schema import INTERACTION_COLUMNS
from twotower.data.sources import load_source

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.realdata


def _folder(name: str) -> Path:
    p = DATA / name
    if not p.is_dir():
        pytest.skip(f"real data {p} not found (never committed; see shared/data/README.md)")
    return p


def test_ml100k_real():
    res = load_source("movielens", str(_folder("ml-100k")))
    r, df = res.report, res.interactions
    assert (r.rows_read, r.rows_kept, r.users, r.tracks) == (100_000, 100_000, 943, 1_682)
    assert r.dropped == {}
    # 1997-09-20 03:05:10 .. 1998-04-22 23:10:38 UTC, as u.info and the README say
    assert (r.time_min, r.time_max) == (874_724_710, 893_286_638)
    assert tuple(df.columns) == INTERACTION_COLUMNS
    first = df.iloc[0]
    assert (first.user_id, first.track_id, first.timestamp, first.weight) == (
        "196",
        "242",
        881250949,
        3.0,
    )
    assert sorted(df["weight"].unique().tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    tracks = res.tracks.set_index("track_id")
    assert len(tracks) == 1_682
    assert tracks.loc["543", "title"] == "Misérables, Les (1995)"  # latin-1 in u.item
    assert tracks.loc["1", "genres"] == "Animation|Children's|Comedy"
    assert tracks.loc["1", "year"] == 1995
    assert tracks.loc["267", "title"] == "unknown"  # the one movie without a date
    assert r.counted["lines of u.item with non-UTF-8 bytes read as latin-1"] > 0
    # min_rating keeps exactly the ratings >= 4
    high = load_source("movielens", str(_folder("ml-100k")), min_rating=4)
    n_high = int((df["weight"] >= 4).sum())
    assert high.report.rows_kept == n_high
    assert high.report.dropped == {"rating below min_rating": 100_000 - n_high}


def test_hetrec_real():
    res = load_source("hetrec-lastfm", str(_folder("hetrec2011-lastfm-2k")))
    r, df = res.report, res.interactions
    assert not res.ordered
    assert (r.rows_read, r.rows_kept, r.users, r.tracks) == (92_834, 92_834, 1_892, 17_632)
    assert len(res.tracks) == 17_632
    pair = df[(df.user_id == "2") & (df.track_id == "51")].iloc[0]
    assert pair.weight == 13_883.0
    # user 2 tagged artist 52 first on 2009-04-01
    assert df[(df.user_id == "2") & (df.track_id == "52")].timestamp.iloc[0] == 1_238_544_000
    dated = int(df["timestamp"].notna().sum())
    assert 20_000 < dated < 21_000  # only pairs the user also tagged have a date
    assert r.counted["user-artist pair without a tag date (timestamp <NA>)"] == 92_834 - dated
    # 5 bogus pre-2002 tag dates are ignored; the latest tag date is 2011-05-09
    assert r.time_max == 1_304_899_200 and r.time_min >= 1_104_537_600  # >= 2005-01-01
    assert r.counted["lines of tags.dat with non-UTF-8 bytes read as latin-1"] == 8
    tracks = res.tracks.set_index("track_id")
    assert tracks.loc["1", "title"] == tracks.loc["1", "artist"] == "MALICE MIZER"
    assert tracks.loc["1686", "title"] == '"Weird Al" Yankovic'  # quotes kept verbatim
    assert tracks["genres"].notna().sum() > 10_000
    assert all(len(g.split("|")) <= 3 for g in tracks["genres"].dropna())
    assert (df["weight"].min(), df["weight"].max()) == (1.0, 352_698.0)  # play counts
