"""Loaders on tiny fixture files: exact values, and clear errors for bad input."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from fixtures import (
    GENERIC_COLUMNS,
    GENERIC_EXPECTED,
    GENERIC_TRACK_COLUMNS,
    HETREC_EXPECTED,
    LASTFM_EXPECTED,
    LASTFM_FILE,
    ML1M_EXPECTED,
    ML100K_EXPECTED,
    ML_LATEST_EXPECTED,
    MSSD_EXPECTED,
    MSSD_LOG_HEADER,
    write_generic_csv,
    write_hetrec,
    write_lastfm1k,
    write_ml1m,
    write_ml100k,
    write_ml_latest,
    write_mssd,
)

from twotower.data.schema import INTERACTION_COLUMNS, INTERACTION_DTYPES, DataError, LoadResult
from twotower.data.sources import FORMATS, load_source
from twotower.data.sources.common import read_table


def _check_contract(res: LoadResult) -> None:
    df = res.interactions
    assert tuple(df.columns) == INTERACTION_COLUMNS
    for col, dtype in INTERACTION_DTYPES.items():
        assert str(df[col].dtype) == dtype, col
    assert df["track_id"].notna().all()
    r = res.report
    assert r.rows_kept == len(df)
    assert r.rows_kept + r.rows_dropped == r.rows_read
    assert r.files == res.files and r.source == res.source


def _track(res: LoadResult, track_id: str) -> pd.Series:
    rows = res.tracks[res.tracks["track_id"] == track_id]
    assert len(rows) == 1, track_id
    return rows.iloc[0]


# ------------------------------------------------------------------------------ MovieLens
def test_ml100k_fixture(tmp_path):
    res = load_source("movielens", str(write_ml100k(tmp_path)))
    _check_contract(res)
    e, r = ML100K_EXPECTED, res.report
    assert res.source == "movielens-100k" and res.ordered
    assert (r.rows_read, r.rows_kept, r.users, r.tracks) == (
        e["rows_read"],
        e["rows_kept"],
        e["users"],
        e["tracks"],
    )
    assert r.dropped == {"duplicate row": 1}
    assert (r.time_min, r.time_max) == (e["time_min"], e["time_max"])
    first = res.interactions.iloc[0]
    assert (first.user_id, first.track_id, first.timestamp, first.weight) == (
        "1",
        "10",
        881250949,
        4.0,
    )
    assert _track(res, "20").title == e["title_20"]  # latin-1 byte 0xe9 decoded
    assert _track(res, "10").genres == e["genres_10"]
    assert _track(res, "20").genres == e["genres_20"]
    assert _track(res, "10").year == e["year_10"]
    assert _track(res, "30").year == e["year_30"]
    assert _track(res, "30").genres == "unknown"
    assert "u.user is not used" in r.notes


def test_ml1m_fixture_and_min_rating(tmp_path):
    folder = write_ml1m(tmp_path)
    res = load_source("movielens", str(folder))
    _check_contract(res)
    e = ML1M_EXPECTED
    assert res.source == "movielens-1m"
    assert (res.report.rows_read, res.report.users, res.report.tracks) == (
        e["rows_read"],
        e["users"],
        e["tracks"],
    )
    assert res.interactions["weight"].iloc[0] == e["weight_first"]
    assert _track(res, "2").title == e["title_2"]
    assert _track(res, "1").genres == e["genres_1"]
    assert _track(res, "3").year == e["year_3"]
    # the ratings file itself is accepted as path too
    high = load_source("movielens", str(folder / "ratings.dat"), min_rating=4)
    assert len(high.interactions) == e["rows_min_rating_4"]
    assert high.report.dropped == {"rating below min_rating": 3}
    assert (high.interactions["weight"] >= 4).all()


def test_ml_latest_fixture(tmp_path):
    res = load_source("movielens", str(write_ml_latest(tmp_path)))
    _check_contract(res)
    e = ML_LATEST_EXPECTED
    assert res.source == "movielens-latest"
    assert res.interactions["weight"].iloc[1] == e["weight_second"]
    assert _track(res, "11").title == e["title_11"]  # quoted, with a comma
    assert _track(res, "11").genres == e["genres_11"]
    assert pd.isna(_track(res, "99").genres)  # "(no genres listed)"
    assert _track(res, "99").title == 'Amélie "Le Fabuleux" (2001)'
    assert _track(res, "99").year == 2001


def test_movielens_detects_layout_in_parent_folder(tmp_path):
    write_ml1m(tmp_path)
    assert load_source("movielens", str(tmp_path)).source == "movielens-1m"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no MovieLens ratings file"):
        load_source("movielens", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no such file or folder"):
        load_source("movielens", str(tmp_path / "missing"))


def test_ml100k_without_u_genre_uses_fixed_names(tmp_path):
    folder = write_ml100k(tmp_path)
    (folder / "u.genre").unlink()
    assert _track(load_source("movielens", str(folder)), "20").genres == "Drama|Musical"


# ------------------------------------------------------------------------------ MSSD
def test_mssd_fixture(tmp_path):
    folder = write_mssd(tmp_path)
    res = load_source("mssd", str(folder))
    _check_contract(res)
    e, df = MSSD_EXPECTED, res.interactions
    assert res.report.rows_read == e["rows_read"] and res.report.sessions == e["sessions"]
    assert df["user_id"].isna().all()
    assert df["skipped"].tolist() == e["skipped"]
    assert df["position"].tolist() == e["positions"]
    assert df["hour"].tolist() == e["hours"]
    assert df["context_type"].tolist()[3:] == ["user_collection", "radio"]
    assert df["timestamp"].tolist() == [e["timestamp_s1"]] * 3 + [e["timestamp_s2"]] * 2
    assert res.report.counted["skipped play (kept as signal, not a positive)"] == 2
    assert _track(res, "t_a").f_mode == e["mode_t_a"]
    assert _track(res, "t_b").f_mode == e["mode_t_b"]
    assert _track(res, "t_a").year == e["year_t_a"]
    assert "f_release_year" not in res.tracks.columns
    assert res.tracks["f_acoustic_vector_7"].dtype == np.float32
    assert _track(res, "t_c").f_duration == pytest.approx(150.25)
    skip2 = load_source("mssd", str(folder / "log_mini.csv"), skip_column="skip_2")
    assert skip2.interactions["skipped"].tolist() == e["skipped_skip_2"]
    assert len(skip2.tracks) == 3  # sibling tf_*.csv found from the log file


def test_mssd_bad_boolean_and_hour(tmp_path):
    folder = write_mssd(tmp_path)
    log = folder / "log_mini.csv"
    lines = log.read_text().splitlines()
    lines[2] = lines[2].replace(",false,16,", ",maybe,16,")  # hist_user_behavior_is_shuffle
    lines[2] = lines[2].replace("false,0,0,0,0", "nope,0,0,0,0")
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"log_mini.csv, line 3, column 'not_skipped'.*'nope'"):
        load_source("mssd", str(folder))
    bad = tmp_path / "c"
    bad.mkdir()
    row = lines[1].replace(",16,", ",25,")  # hour_of_day 25
    (bad / "log_x.csv").write_text(MSSD_LOG_HEADER + "\n" + row + "\n")
    with pytest.raises(DataError, match=r"line 2, column 'hour_of_day'.*<= 23, got 25"):
        load_source("mssd", str(bad))


# ------------------------------------------------------------------------------ Last.fm-1K
def test_lastfm_fixture(tmp_path):
    folder = write_lastfm1k(tmp_path)
    res = load_source("lastfm", str(folder))
    _check_contract(res)
    e, df = LASTFM_EXPECTED, res.interactions
    assert (res.report.rows_read, res.report.rows_kept) == (e["rows_read"], e["rows_kept"])
    assert res.report.dropped == {"no track MBID and no track name": 1, "duplicate row": 1}
    assert res.report.counted["track keyed by artist + title (no track MBID)"] == 3
    u1 = df[df["user_id"] == "user_000001"]
    # the second-newest row of the file (20:46:40Z) is the user's first play
    assert u1["timestamp"].tolist() == e["user1_timestamps"]
    assert u1["track_id"].tolist() == e["user1_tracks"]
    u2 = df[df["user_id"] == "user_000002"]
    assert u2["track_id"].tolist() == e["user2_tracks"]
    assert (np.diff(u2["timestamp"].to_numpy(dtype=np.int64)) >= 0).all()
    t = _track(res, "name:Sigur Rós - Hoppípolla")
    assert (t.title, t.artist) == ("Hoppípolla", "Sigur Rós")
    assert _track(res, 'name:"Weird Al" Yankovic - Amish Paradise').artist == '"Weird Al" Yankovic'
    assert any("userid-profile.tsv" in n for n in res.report.notes)
    # the file itself works as path
    assert len(load_source("lastfm", str(folder / LASTFM_FILE)).interactions) == e["rows_kept"]


def test_lastfm_non_utf8_names_the_line_and_suggests_encoding(tmp_path):
    folder = write_lastfm1k(tmp_path)
    f = folder / LASTFM_FILE
    lines = f.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"Amish", b"Am\xe9ish")
    f.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError) as err:
        load_source("lastfm", str(folder))
    msg = str(err.value)
    assert LASTFM_FILE in msg and "line 4" in msg and "byte offset" in msg
    assert "encoding=" in msg and "0xe9" in msg
    res = load_source("lastfm", str(folder), encoding="latin-1")
    assert "Améish Paradise" in set(res.tracks["title"])
    assert "Sigur RÃ³s" in set(res.tracks["artist"])  # UTF-8 read as latin-1, as asked
    auto = load_source("lastfm", str(folder), encoding="auto")  # UTF-8, stray bytes latin-1
    assert {"Améish Paradise", "Hoppípolla"} <= set(auto.tracks["title"])
    assert auto.report.counted[f"lines of {LASTFM_FILE} with non-UTF-8 bytes read as latin-1"] == 1


def test_lastfm_bad_timestamp(tmp_path):
    folder = write_lastfm1k(tmp_path)
    f = folder / LASTFM_FILE
    f.write_text(f.read_text().replace("2009-06-01T12:00:01Z", "2009-13-45T99:00:01Z"))
    with pytest.raises(DataError, match=r"line 6, column 'timestamp'.*2009-13-45T99:00:01Z"):
        load_source("lastfm", str(folder))


# ------------------------------------------------------------------------------ HetRec
def test_hetrec_fixture(tmp_path):
    res = load_source("hetrec-lastfm", str(write_hetrec(tmp_path)))
    _check_contract(res)
    e, df = HETREC_EXPECTED, res.interactions
    assert not res.ordered and res.source == "hetrec-lastfm-2k"
    assert (res.report.rows_read, res.report.users, res.report.tracks) == (
        e["rows_read"],
        e["users"],
        e["tracks"],
    )
    row = df[(df.user_id == "2") & (df.track_id == "51")].iloc[0]
    assert row.weight == e["weight_2_51"] and pd.isna(row.timestamp)
    row = df[(df.user_id == "2") & (df.track_id == "52")].iloc[0]
    assert row.timestamp == e["timestamp_2_52"]
    assert _track(res, "52").genres == e["genres_52"]  # latin-1 "français" decoded
    assert _track(res, "53").title == _track(res, "53").artist == e["title_53"]
    assert any(n.startswith("no play order") for n in res.report.notes)
    assert res.report.counted["user-artist pair without a tag date (timestamp <NA>)"] == 3


def test_hetrec_repeated_pair_is_summed_and_counted(tmp_path):
    folder = write_hetrec(tmp_path)
    f = folder / "user_artists.dat"
    f.write_bytes(f.read_bytes() + b"2\t51\t17\r\n2\t51\t17\r\n")
    res = load_source("hetrec-lastfm", str(folder))
    assert res.report.dropped == {
        "duplicate row": 1,
        "repeated user-artist pair (play counts summed)": 1,
    }
    w = res.interactions[(res.interactions.user_id == "2") & (res.interactions.track_id == "51")]
    assert w["weight"].tolist() == [13883.0 + 17.0]


# ------------------------------------------------------------------------------ generic
def test_generic_csv_with_mapping_and_tracks(tmp_path):
    folder = write_generic_csv(tmp_path)
    res = load_source(
        "csv",
        str(folder / "plays.csv"),
        GENERIC_COLUMNS,
        tracks_path=str(folder / "tracks.csv"),
        track_columns=GENERIC_TRACK_COLUMNS,
    )
    _check_contract(res)
    e = GENERIC_EXPECTED
    assert (res.report.rows_read, res.report.rows_kept) == (e["rows_read"], e["rows_kept"])
    assert res.report.dropped == {"empty track_id": 1, "duplicate row": 1}
    assert res.interactions["timestamp"].tolist() == e["timestamps"]
    assert res.interactions["track_id"].tolist() == e["tracks"]
    assert res.interactions["weight"].tolist() == [2.0, 1.0, 3.0]
    assert _track(res, "s1").title == "Song, One"
    assert _track(res, "s1").f_tempo == pytest.approx(120.5)
    assert np.isnan(_track(res, "s2").f_tempo)
    # the folder works too: the metadata file inside it is not read as plays
    again = load_source(
        "csv",
        str(folder),
        GENERIC_COLUMNS,
        tracks_path=str(folder / "tracks.csv"),
        track_columns=GENERIC_TRACK_COLUMNS,
    )
    assert again.files == res.files


def test_generic_on_empty_error(tmp_path):
    folder = write_generic_csv(tmp_path)
    with pytest.raises(DataError, match=r"plays.csv, line 4, column 'song': empty value"):
        load_source("csv", str(folder / "plays.csv"), GENERIC_COLUMNS, on_empty="error")


def test_generic_tsv_iso_times_and_folder(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    (d / "a.tsv").write_text(
        "user\ttrack\twhen\tskip\thour\n"
        "u1\tt1\t2021-03-04T05:06:07Z\ttrue\t5\n"
        "u1\tt2\t2021-03-04 06:06:07+01:00\tFALSE\t\n"
    )
    (d / "b.tsv").write_text("user\ttrack\twhen\tskip\thour\nu2\tt1\t2021-03-05\t0\t23\n")
    cols = {
        "user_id": "user",
        "track_id": "track",
        "timestamp": "when",
        "skipped": "skip",
        "hour": "hour",
    }
    res = load_source("tsv", str(d), cols)
    _check_contract(res)
    base = 1614834367  # 2021-03-04T05:06:07Z
    assert res.interactions["timestamp"].tolist() == [base, base, 1614902400]
    assert res.interactions["skipped"].tolist() == [True, False, False]
    assert res.interactions["hour"].tolist()[0] == 5 and pd.isna(res.interactions["hour"][1])
    assert len(res.files) == 2


def test_generic_milliseconds(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("user_id,track_id,timestamp\nu,t,1600000000123\nu,t2,1600000001999\n")
    with pytest.raises(DataError, match=r"line 2, column 'timestamp'.*timestamp_unit='ms'"):
        load_source("csv", str(f))
    res = load_source("csv", str(f), timestamp_unit="ms")
    assert res.interactions["timestamp"].tolist() == [1600000000, 1600000001]


def test_generic_session_and_position_without_timestamp(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("sid,pos,track_id\ns1,1,a\ns1,2,b\ns2,1,a\n")
    res = load_source(
        "csv", str(f), {"session_id": "sid", "position": "pos", "track_id": "track_id"}
    )
    assert res.interactions["timestamp"].isna().all()
    assert res.interactions["position"].tolist() == [1, 2, 1]
    with pytest.raises(DataError, match=r"no timestamp column"):
        load_source("csv", str(f), {"session_id": "sid", "track_id": "track_id"})


def test_generic_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "plays.parquet"
    ts = pd.to_datetime(["2020-01-01T00:00:00Z", "2020-01-01T00:01:00Z"], utc=True)
    pq.write_table(
        pa.table({"u": [1, 2], "song": ["a", "b"], "t": pa.array(ts), "w": [1.5, 2.0]}), f
    )
    tf = tmp_path / "tracks.parquet"
    pq.write_table(
        pa.table({"track_id": ["a", "b"], "genres": [["rock", "pop"], []], "year": [1999, None]}),
        tf,
    )
    res = load_source(
        "parquet",
        str(f),
        {"user_id": "u", "track_id": "song", "timestamp": "t", "weight": "w"},
        tracks_path=str(tf),
    )
    _check_contract(res)
    assert res.interactions["user_id"].tolist() == ["1", "2"]
    assert res.interactions["timestamp"].tolist() == [1577836800, 1577836860]
    assert _track(res, "a").genres == "rock|pop" and _track(res, "a").year == 1999
    assert pd.isna(_track(res, "b").year)
    with pytest.raises(DataError, match=r"missing column\(s\) \['nope'\]"):
        load_source("parquet", str(f), {"track_id": "nope", "timestamp": "t"})
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet"):
        load_source("parquet", str(tmp_path / "bad.parquet"))


# ------------------------------------------------------------------------------ validation
def test_missing_column_names_expected_and_found(tmp_path):
    folder = write_generic_csv(tmp_path)
    with pytest.raises(DataError) as err:
        load_source("csv", str(folder / "plays.csv"), {"track_id": "track", "timestamp": "ts"})
    msg = str(err.value)
    assert "plays.csv" in msg and "['track']" in msg and "'uid', 'song', 'ts'" in msg


def test_misnamed_movielens_csv_header(tmp_path):
    folder = write_ml_latest(tmp_path)
    f = folder / "ratings.csv"
    f.write_text(f.read_text().replace("userId", "user"))
    with pytest.raises(DataError, match=r"ratings.csv, line 1: missing column\(s\) \['userId'\]"):
        load_source("movielens", str(folder))


def test_wrong_type_names_file_line_column_and_value(tmp_path):
    folder = write_ml100k(tmp_path)
    f = folder / "u.data"
    lines = f.read_text().splitlines()
    lines[2] = "2\t10\tfive\t881251000"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"u.data, line 3, column 'rating': .* got 'five'"):
        load_source("movielens", str(folder))


def test_line_numbers_count_header_and_blank_lines(tmp_path):
    folder = write_ml_latest(tmp_path)
    f = folder / "ratings.csv"
    lines = f.read_text().splitlines()
    lines.insert(2, "")  # blank line 3
    lines[4] = "1,99,5.0,yesterday"  # file line 5
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ratings.csv, line 5, column 'timestamp'.*'yesterday'"):
        load_source("movielens", str(folder))


def test_truncated_line_names_file_and_line(tmp_path):
    folder = write_ml1m(tmp_path)
    f = folder / "ratings.dat"
    lines = f.read_text().splitlines()
    lines[1] = "1::2::3"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_source("movielens", str(folder))
    msg = str(err.value)
    assert "ratings.dat, line 2" in msg and "expected 4 fields" in msg and "found 3" in msg
    res = load_source("movielens", str(folder), bad_lines="drop")
    assert res.report.dropped == {"wrong field count (expected 4)": 1}
    assert res.report.rows_read == 6 and res.report.rows_kept == 5


def test_empty_file(tmp_path):
    folder = write_ml100k(tmp_path)
    (folder / "u.data").write_text("")
    with pytest.raises(DataError, match=r"u.data, line 1: empty file"):
        load_source("movielens", str(folder))
    f = tmp_path / "h.csv"
    f.write_text("user_id,track_id,timestamp\n")
    with pytest.raises(DataError, match=r"h.csv, line 2: no data lines after the header"):
        load_source("csv", str(f))


def test_negative_and_unparsable_timestamps(tmp_path):
    folder = write_ml100k(tmp_path)
    f = folder / "u.data"
    f.write_text(f.read_text().replace("881251100", "-881251100"))
    with pytest.raises(DataError, match=r"u.data, line 4, column 'timestamp'.*'-881251100'"):
        load_source("movielens", str(folder))
    f.write_text(f.read_text().replace("-881251100", "8812511x0"))
    with pytest.raises(DataError, match=r"u.data, line 4, column 'timestamp'.*'8812511x0'"):
        load_source("movielens", str(folder))


def test_crlf_and_stray_carriage_return(tmp_path):
    f = tmp_path / "p.csv"
    f.write_bytes(b"user_id,track_id,timestamp\r\nu,a,1\r\nu,b,2\r\n")
    assert load_source("csv", str(f)).interactions["track_id"].tolist() == ["a", "b"]
    f.write_bytes(b"user_id,track_id,timestamp\nu,a,1\nu,b\r,2\n")
    with pytest.raises(DataError, match=r"p.csv, line 3: carriage return"):
        load_source("csv", str(f))


def test_unknown_options_and_formats(tmp_path):
    folder = write_ml100k(tmp_path)
    with pytest.raises(DataError, match=r"unknown option\(s\) \['min_ratin'\]"):
        load_source("movielens", str(folder), min_ratin=4)
    with pytest.raises(DataError, match="unknown data format"):
        load_source("nope", str(folder))
    (tmp_path / "p.csv").write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match=r"p.csv: unknown canonical column\(s\) \['trackid'\]"):
        load_source("csv", str(tmp_path), {"trackid": "x"})


def test_every_registered_loader_importable():
    import importlib

    for fmt, target in FORMATS.items():
        if fmt == "synthetic":
            continue
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), fmt


# ------------------------------------------------------------------------------ read_table
def test_read_table_quoted_newlines_and_lines(tmp_path):
    f = tmp_path / "q.csv"
    f.write_text('a,b\n1,"x,\ny"\n\n2,"say ""hi"""\n')
    t = read_table(f, sep=",", header=True, quoted=True)
    assert t.df.values.tolist() == [["1", "x,\ny"], ["2", 'say "hi"']]
    assert t.lines.tolist() == [2, 5]
    f.write_text('a,b\n1,"x\n2,3\n')
    with pytest.raises(DataError, match=r"q.csv, line 2: unbalanced quote"):
        read_table(f, sep=",", header=True, quoted=True)


def test_read_table_typed_fast_path_falls_back(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text("1\t2.5\n3\t4\n")
    t = read_table(f, sep="\t", names=["a", "b"], kinds={"a": "int", "b": "float"})
    assert str(t.df["a"].dtype) == "int64" and t.df["b"].tolist() == [2.5, 4.0]
    f.write_text("1\t2.5\nx\t4\n")
    t = read_table(f, sep="\t", names=["a", "b"], kinds={"a": "int", "b": "float"})
    assert t.df["a"].tolist() == ["1", "x"]  # text: the caller's check reports line 2
    assert re.search("line 2", t.where(1, "a"))
