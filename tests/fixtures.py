"""Tiny files in the exact layouts of every supported dataset, and tiny training runs, for tests.

Import from a test module in ``tests/`` as ``from fixtures import write_ml100k`` (pytest puts
``tests/`` on ``sys.path``). Every ``write_*`` function takes a folder (created if missing),
writes the dataset there and returns the path to hand to the loader. The ``*_EXPECTED``
dictionaries give the values the loaders must produce, computed by hand from the rows below.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

GENRES = (
    "unknown|0\nAction|1\nAdventure|2\nAnimation|3\nChildren's|4\nComedy|5\nCrime|6\n"
    "Documentary|7\nDrama|8\nFantasy|9\nFilm-Noir|10\nHorror|11\nMusical|12\nMystery|13\n"
    "Romance|14\nSci-Fi|15\nThriller|16\nWar|17\nWestern|18\n\n"
)


def _flags(*on: int) -> str:
    return "|".join("1" if g in on else "0" for g in range(19))


def _mkdir(folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ------------------------------------------------------------------------------ MovieLens 100K
ML100K_EXPECTED = {
    "rows_read": 7,
    "rows_kept": 6,  # one exact duplicate
    "users": 3,
    "tracks": 3,
    "time_min": 881250949,
    "time_max": 881252000,
    # movie 20: latin-1 title, genres Drama|Musical, year from the title
    "title_20": "Misérables, Les (1995)",
    "genres_10": "Animation|Children's|Comedy",
    "genres_20": "Drama|Musical",
    "year_10": 1995,
    "year_30": 1997,  # no year in the title: taken from the release date
}


def write_ml100k(folder: Path) -> Path:
    """``ml-100k/`` with ``u.data``, latin-1 ``u.item``, ``u.genre`` and ``u.user``."""
    d = _mkdir(Path(folder) / "ml-100k")
    (d / "u.data").write_text(
        "1\t10\t4\t881250949\n"
        "1\t20\t3\t881250950\n"
        "2\t10\t5\t881251000\n"
        "2\t30\t1\t881251100\n"
        "3\t20\t2\t881252000\n"
        "1\t10\t4\t881250949\n"  # exact duplicate of line 1
        "3\t30\t5\t881251500\n"
    )
    items = (
        f"10|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story|"
        f"{_flags(3, 4, 5)}\n"
        f"20|Misérables, Les (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Mis%E9r|"
        f"{_flags(8, 12)}\n"
        f"30|Untitled|14-Mar-1997||http://us.imdb.com/Title?Untitled|{_flags(0)}\n"
    )
    (d / "u.item").write_bytes(items.encode("latin-1"))
    (d / "u.genre").write_text(GENRES)
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n")
    return d


# ------------------------------------------------------------------------------ MovieLens 1M
ML1M_EXPECTED = {
    "rows_read": 6,
    "rows_kept": 6,
    "users": 2,
    "tracks": 3,
    "title_2": "Misérables, Les (1995)",
    "genres_1": "Animation|Children's|Comedy",
    "year_3": 1968,
    "weight_first": 5.0,
    "rows_min_rating_4": 3,  # ratings >= 4
}


def write_ml1m(folder: Path) -> Path:
    """``ml-1m/`` with ``ratings.dat``, latin-1 ``movies.dat`` (``::``) and ``users.dat``."""
    d = _mkdir(Path(folder) / "ml-1m")
    (d / "ratings.dat").write_text(
        "1::1::5::978300760\n"
        "1::2::3::978302109\n"
        "1::3::3::978301968\n"
        "2::1::4::978298413\n"
        "2::3::2::978299026\n"
        "2::2::4::978299200\n"
    )
    movies = (
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Misérables, Les (1995)::Drama|Musical\n"
        "3::2001: A Space Odyssey (1968)::Drama|Mystery|Sci-Fi|Thriller\n"
    )
    (d / "movies.dat").write_bytes(movies.encode("latin-1"))
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    return d


# ------------------------------------------------------------------------------ ml-latest CSV
ML_LATEST_EXPECTED = {
    "rows_read": 5,
    "rows_kept": 5,
    "users": 2,
    "tracks": 3,
    "title_11": "American President, The (1995)",
    "genres_11": "Comedy|Drama|Romance",
    "genres_99": None,  # "(no genres listed)"
    "weight_second": 3.5,
}


def write_ml_latest(folder: Path) -> Path:
    """``ml-latest-small/`` with ``ratings.csv`` and quoted ``movies.csv`` (UTF-8)."""
    d = _mkdir(Path(folder) / "ml-latest-small")
    (d / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,1,4.0,964982703\n"
        "1,11,3.5,964981247\n"
        "1,99,5.0,964982224\n"
        "2,11,0.5,1445714835\n"
        "2,1,2.0,1445714836\n"
    )
    (d / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        '99,"Amélie ""Le Fabuleux"" (2001) ",(no genres listed)\n',
        encoding="utf-8",
    )
    return d


# ------------------------------------------------------------------------------ Spotify MSSD
MSSD_LOG_HEADER = (
    "session_id,session_position,session_length,track_id_clean,skip_1,skip_2,skip_3,not_skipped,"
    "context_switch,no_pause_before_play,short_pause_before_play,long_pause_before_play,"
    "hist_user_behavior_n_seekfwd,hist_user_behavior_n_seekback,hist_user_behavior_is_shuffle,"
    "hour_of_day,date,premium,context_type,hist_user_behavior_reason_start,"
    "hist_user_behavior_reason_end"
)
TF_HEADER = (
    "track_id,duration,release_year,us_popularity_estimate,acousticness,beat_strength,"
    "bounciness,danceability,dyn_range_mean,energy,flatness,instrumentalness,key,liveness,"
    "loudness,mechanism,mode,organism,speechiness,tempo,time_signature,valence,"
    + ",".join(f"acoustic_vector_{i}" for i in range(8))
)
MSSD_EXPECTED = {
    "rows_read": 5,
    "rows_kept": 5,
    "sessions": 2,
    "tracks": 3,
    "skipped": [False, True, False, True, False],  # not not_skipped, file order
    "skipped_skip_2": [False, True, False, False, False],
    "timestamp_s1": 1531699200,  # 2018-07-16 00:00 UTC
    "timestamp_s2": 1531785600,  # 2018-07-17
    "hours": [16, 16, 16, 9, 9],
    "positions": [1, 2, 3, 1, 2],
    "mode_t_a": 1.0,  # major
    "mode_t_b": 0.0,  # minor
    "year_t_a": 1950,
}


def _log_row(
    sid: str,
    pos: int,
    n: int,
    track: str,
    skip2: bool,
    not_skipped: bool,
    hour: int,
    date: str,
    ctx: str,
) -> str:
    b = {True: "true", False: "false"}
    return (
        f"{sid},{pos},{n},{track},{b[not not_skipped]},{b[skip2]},{b[not not_skipped]},"
        f"{b[not_skipped]},0,0,0,0,0,0,false,{hour},{date},true,{ctx},fwdbtn,trackdone"
    )


def write_mssd(folder: Path) -> Path:
    """``mssd/`` with ``log_mini.csv`` (two sessions) and ``tf_mini.csv`` (three tracks)."""
    d = _mkdir(Path(folder) / "mssd")
    s1, s2 = "0_00006f66-33e5-4de7-a324-2d18e439fc1e", "0_00007c1a-7b3b-47bd-8a7e-5b1d4c9a2b11"
    rows = [
        _log_row(s1, 1, 3, "t_a", False, True, 16, "2018-07-16", "editorial_playlist"),
        _log_row(s1, 2, 3, "t_b", True, False, 16, "2018-07-16", "editorial_playlist"),
        _log_row(s1, 3, 3, "t_c", False, True, 16, "2018-07-16", "editorial_playlist"),
        _log_row(s2, 1, 2, "t_b", False, False, 9, "2018-07-17", "user_collection"),
        _log_row(s2, 2, 2, "t_a", False, True, 9, "2018-07-17", "radio"),
    ]
    (d / "log_mini.csv").write_text(MSSD_LOG_HEADER + "\n" + "\n".join(rows) + "\n")
    vec = ",".join(f"0.{i}" for i in range(8))
    tf = [
        f"t_a,180.5,1950,99.5,0.5,0.4,0.3,0.2,8.1,0.9,0.1,0.0,1,0.2,-7.5,0.3,major,0.2,0.04,"
        f"120.0,4,0.5,{vec}",
        f"t_b,200.0,2018,97.1,0.1,0.6,0.6,0.7,9.2,0.8,0.2,0.1,5,0.1,-5.0,0.6,minor,0.1,0.05,"
        f"98.2,3,0.3,{vec}",
        f"t_c,150.25,1999,98.0,0.2,0.5,0.5,0.5,7.7,0.7,0.3,0.2,7,0.3,-6.0,0.4,major,0.3,0.06,"
        f"140.0,4,0.7,{vec}",
    ]
    (d / "tf_mini.csv").write_text(TF_HEADER + "\n" + "\n".join(tf) + "\n")
    return d


# ------------------------------------------------------------------------------ Last.fm-1K
LASTFM_FILE = "userid-timestamp-artid-artname-traid-traname.tsv"
LASTFM_EXPECTED = {
    "rows_read": 8,
    "rows_kept": 6,  # one row without MBID and name, one exact duplicate
    "users": 2,
    # user_000001 in chronological order (the file is newest first)
    "user1_timestamps": [1241470000, 1241478537],  # 2009-05-04T20:46:40Z, 2009-05-04T23:08:57Z
    "user1_tracks": ["name:Sigur Rós - Hoppípolla", "f7c1f8f8-b935-45ed-8fc8-7def69d92a10"],
    "user2_tracks": [
        "f7c1f8f8-b935-45ed-8fc8-7def69d92a10",
        "a1b2c3d4-0000-4000-8000-000000000001",
        "name:Sigur Rós - Hoppípolla",
        'name:"Weird Al" Yankovic - Amish Paradise',
    ],
    "keyed_by_name": 3,
}


def write_lastfm1k(folder: Path) -> Path:
    """``lastfm-dataset-1K/`` with the plays TSV (newest first) and ``userid-profile.tsv``."""
    d = _mkdir(Path(folder) / "lastfm-dataset-1K")
    sigur = "f6f2326f-6b25-4170-b89d-e235b25508e8"
    rows = [
        # user_000001, newest first
        f"user_000001\t2009-05-04T23:08:57Z\t{sigur}\tSigur Rós\t"
        "f7c1f8f8-b935-45ed-8fc8-7def69d92a10\tStarálfur",
        f"user_000001\t2009-05-04T20:46:40Z\t{sigur}\tSigur Rós\t\tHoppípolla",
        "user_000001\t2009-05-04T20:00:00Z\t\t\t\t",  # no MBID, no names: dropped
        # user_000002, newest first
        'user_000002\t2009-06-01T12:00:03Z\t\t"Weird Al" Yankovic\t\tAmish Paradise',
        f"user_000002\t2009-06-01T12:00:02Z\t{sigur}\tSigur Rós\t\tHoppípolla",
        "user_000002\t2009-06-01T12:00:01Z\t\tSomeone\ta1b2c3d4-0000-4000-8000-000000000001\tX",
        "user_000002\t2009-06-01T12:00:00Z\t\tSigur Ros\tf7c1f8f8-b935-45ed-8fc8-7def69d92a10\tS",
        "user_000002\t2009-06-01T12:00:00Z\t\tSigur Ros\tf7c1f8f8-b935-45ed-8fc8-7def69d92a10\tS",
    ]
    (d / LASTFM_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
    (d / "userid-profile.tsv").write_text(
        "#id\tgender\tage\tcountry\tregistered\nuser_000001\tm\t\tJapan\tAug 13, 2006\n"
    )
    return d


def write_lastfm1k_log(
    folder: Path,
    n_listeners: int,
    *,
    sessions_per_user: float = 60.0,
    span_days: float = 182.0,
    p_no_track_mbid: float = 0.03,
    p_double: float = 0.02,
    seed: int = 0,
) -> Path:
    """A realistic Last.fm-1K plays file from the synthetic ``scrobble`` preset.

    Same layout as the real ``userid-timestamp-artid-artname-traid-traname.tsv``: listeners
    ``user_000001``.., newest play first within each listener, ISO ``...Z`` timestamps, artist
    MBID and name, track MBID and name. MBIDs are UUID5s of the synthetic ids (stable across
    runs). Skipped plays are dropped (Last.fm only scrobbles played tracks); a share of the
    tracks has no track MBID (as ~3% of the real rows) and a share of the plays is scrobbled
    twice a few seconds apart (double scrobbles, removed by ``dedupe_consecutive``).

    Args:
        folder: Created if missing; the file goes to ``folder / lastfm-dataset-1K``.
        n_listeners: Listeners in the file (1 = one listener's file).
        sessions_per_user: Mean sessions per listener (the preset has 60, ~12 plays each).
        span_days: Days of history from 2009-01-01.
        p_no_track_mbid: Share of tracks written without a track MBID.
        p_double: Share of plays scrobbled twice.
        seed: Generator seed.

    Returns:
        The path of the TSV file.
    """
    import uuid

    import numpy as np
    import pandas as pd

    from twotower.data.synthetic import generate, make_config

    cfg = make_config(
        "scrobble",
        n_users=n_listeners,
        sessions_per_user=sessions_per_user,
        span_days=span_days,
        start_date="2009-01-01",
        seed=seed,
    )
    plays, tracks, _ = generate(cfg)
    plays = plays[~plays["skipped"].to_numpy()]  # Last.fm has no skips
    rng = np.random.default_rng(seed)
    double = rng.random(len(plays)) < p_double
    again = plays[double].copy()
    again["timestamp"] = again["timestamp"] + rng.integers(1, 30, size=len(again))
    plays = pd.concat([plays, again]).sort_values(["user_id", "timestamp"], kind="stable")
    meta = tracks.set_index("track_id")
    used = plays["track_id"].unique()
    no_mbid = set(used[rng.random(len(used)) < p_no_track_mbid])

    def mbid(kind: str, key: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"twotower-lastfm-{kind}/{key}"))

    track_mbid = {t: "" if t in no_mbid else mbid("track", t) for t in used}
    artist = meta["artist"].reindex(used).to_dict()
    title = meta["title"].reindex(used).to_dict()
    artist_mbid = {a: mbid("artist", a) for a in set(artist.values())}
    user = {u: f"user_{int(u[1:]) + 1:06d}" for u in plays["user_id"].unique()}
    stamp = pd.to_datetime(plays["timestamp"].to_numpy(), unit="s", utc=True)
    iso = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = [
        f"{user[u]}\t{ts}\t{artist_mbid[artist[t]]}\t{artist[t]}\t{track_mbid[t]}\t{title[t]}"
        for u, t, ts in zip(plays["user_id"], plays["track_id"], iso, strict=True)
    ]
    # listeners in id order, each newest first (the file reversed within a listener)
    order = np.lexsort((-np.arange(len(rows)), plays["user_id"].map(user).to_numpy()))
    d = _mkdir(Path(folder) / "lastfm-dataset-1K")
    f = d / LASTFM_FILE
    f.write_text("\n".join(rows[i] for i in order) + "\n", encoding="utf-8")
    return f


# ------------------------------------------------------------------------------ HetRec 2K
HETREC_EXPECTED = {
    "rows_read": 5,
    "rows_kept": 5,
    "users": 2,
    "tracks": 3,
    "weight_2_51": 13883.0,
    "timestamp_2_52": 1238544000,  # first tag 2009-04-01 (a 1956 tag is ignored)
    "genres_52": "rock|electronic|français",  # top tags by count, ties by tag id
    "title_53": "Mötley Crüe",
}


def write_hetrec(folder: Path) -> Path:
    """``hetrec2011-lastfm-2k/`` with CRLF line endings, as distributed."""
    d = _mkdir(Path(folder) / "hetrec2011-lastfm-2k")

    def crlf(name: str, lines: list[str], encoding: str = "utf-8") -> None:
        (d / name).write_bytes(("\r\n".join(lines) + "\r\n").encode(encoding))

    crlf(
        "user_artists.dat",
        [
            "userID\tartistID\tweight",
            "2\t51\t13883",
            "2\t52\t11690",
            "2\t53\t11351",
            "3\t51\t5",
            "3\t53\t7",
        ],
    )
    # artists.dat is LF-terminated UTF-8 upstream, the other files CRLF
    (d / "artists.dat").write_text(
        "id\tname\turl\tpictureURL\n"
        "51\tDuran Duran\thttp://www.last.fm/music/Duran+Duran\thttp://x/1.jpg\n"
        "52\tMorcheeba\thttp://www.last.fm/music/Morcheeba\thttp://x/2.jpg\n"
        "53\tMötley Crüe\thttp://www.last.fm/music/M%C3%B6tley+Cr%C3%BCe\t\n",
        encoding="utf-8",
    )
    crlf(
        "tags.dat",
        ["tagID\ttagValue", "1\trock", "2\telectronic", "3\tfrançais", "4\tpop"],
        encoding="latin-1",
    )
    crlf(
        "user_taggedartists.dat",
        [
            "userID\tartistID\ttagID\tday\tmonth\tyear",
            "2\t52\t1\t1\t4\t2009",
            "2\t52\t2\t1\t5\t2009",
            "3\t52\t1\t1\t1\t1956",
            "3\t52\t3\t1\t6\t2010",
            "2\t52\t4\t1\t6\t2010",
            "3\t52\t2\t1\t7\t2010",
            "3\t51\t4\t1\t2\t2008",
        ],
    )
    crlf("user_friends.dat", ["userID\tfriendID", "2\t3", "3\t2"])
    return d


# ------------------------------------------------------------------------------ generic CSV
GENERIC_COLUMNS = {"user_id": "uid", "track_id": "song", "timestamp": "ts", "weight": "plays"}
GENERIC_TRACK_COLUMNS = {"track_id": "id", "title": "name", "artist": "by", "f_tempo": "bpm"}
GENERIC_EXPECTED = {
    "rows_read": 5,
    "rows_kept": 3,  # one empty song id, one duplicate
    "timestamps": [1600000000, 1600000060, 1600003600],
    "tracks": ["s1", "s2", "s1"],
}


def write_generic_csv(folder: Path) -> Path:
    """``plays.csv`` (uid, song, ts in seconds, plays, extra) and quoted ``tracks.csv``."""
    d = _mkdir(Path(folder) / "generic")
    (d / "plays.csv").write_text(
        "uid,song,ts,plays,extra\n"
        "u1,s1,1600000000,2,x\n"
        "u1,s2,1600000060,1,y\n"
        "u1,,1600000100,1,z\n"  # empty song: dropped with reason
        "u2,s1,1600003600,3,\n"
        "u2,s1,1600003600,3,\n"  # duplicate
    )
    (d / "tracks.csv").write_text(
        'id,name,by,bpm\ns1,"Song, One",Artist A,120.5\ns2,Song Two,Artist B,\n'
    )
    return d


WRITERS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "ml100k": (write_ml100k, "movielens"),
    "ml1m": (write_ml1m, "movielens"),
    "ml_latest": (write_ml_latest, "movielens"),
    "mssd": (write_mssd, "mssd"),
    "lastfm1k": (write_lastfm1k, "lastfm"),
    "hetrec": (write_hetrec, "hetrec-lastfm"),
}
"""Fixture name -> (writer, format name for ``load_source``)."""


# ------------------------------------------------------------------------ tiny training runs
def fit_tiny(root: Path, name: str, **overrides: object) -> str:
    """Train ``configs/tiny.yaml`` for 1 epoch under ``root / name`` (cache in ``root / cache``,
    no projector); returns the last checkpoint. ``overrides`` are dotted fit keys."""
    from twotower.train import fit

    folder = root / name
    trainer, _, _ = fit(
        [Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"],
        {
            "trainer.max_epochs": 1,
            "trainer.default_root_dir": str(folder),
            "trainer.logger.init_args.save_dir": str(folder / "runs"),
            "data.cache_dir": str(root / "cache"),
            "model.projector_items": 0,
            **overrides,
        },
    )
    return trainer.checkpoint_callback.last_model_path
