"""Synthetic listening sessions with planted structure, deterministic by seed.

The generator plants a structure that a good model must recover, and that tests can check:

* **Clusters are genres.** Every artist belongs to one cluster (genre); every track to one artist.
  Clusters sit on a ring so that each has two neighbours.
* **Popularity is a power law** inside each cluster (Zipf exponent ``zipf``), with a random
  order of tracks so that popularity is not tied to the id.
* **Users have 1..``max_tastes`` tastes** (distinct clusters).
* **Sessions pick one taste and stay in it**: the first track is drawn from the cluster by
  popularity; every next track is by the same artist with probability ``p_same_artist``, from a
  neighbouring cluster with probability ``p_drift`` (a short excursion), else from the session's
  cluster by popularity.
* **Skips**: a play is skipped with probability ``skip_rate`` when its cluster is one of the
  user's tastes, ``skip_rate_off`` otherwise.
* **Time**: plays are 3-4 minutes apart inside a session (a skipped play lasts 10-40 s), and
  sessions of one user are separated by at least ``min_gap_hours`` plus an exponential gap
  (mean ``mean_gap_hours``), so a 30-minute inactivity sessionizer recovers every session
  exactly. Hour of day follows from the timestamp (UTC); each session has a context type.
* **Scrobble-log options** (all off by default; the ``scrobble`` preset turns them on):
  ``p_album_next`` continues with the artist's next track in album order (artist runs);
  ``p_repeat`` re-plays a track of the listener's own earlier sessions (a non-skipped play,
  uniform over the history, or towards recent plays with ``repeat_recency`` > 1, so favourites
  — tracks played often — come back most); ``activity_shape`` makes listeners unequally active
  (gamma-Poisson sessions); ``span_days`` spreads every listener's sessions over that many days
  (months of history for a forward-in-time split; every listener active from start to end).
* **Track metadata**: title ``"Track N"``, artist ``"Artist M"``, album, genres ``"genre-C"``
  (sometimes also the next genre on the ring), a year that depends on the cluster, and audio
  features ``f_*`` drawn around a per-cluster centroid.

Generation is vectorised: the only Python loop runs over session positions (at most 50), so 20M
plays take seconds, not minutes. Re-plays are resolved after the walk by index arithmetic on the
listener's earlier rows (pointer jumping through re-plays of re-plays). :func:`load` is the
``synthetic`` format of the loader registry; :func:`ground_truth` returns the planted clusters
and tastes for tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from twotower.data.report import DataReport
from twotower.data.schema import (
    INTERACTION_COLUMNS,
    INTERACTION_DTYPES,
    DataError,
    LoadResult,
    conform_tracks,
)

CONTEXT_TYPES: tuple[str, ...] = (
    "user_collection",
    "editorial_playlist",
    "personalized_playlist",
    "radio",
    "catalog",
    "charts",
)
CONTEXT_PROBS: tuple[float, ...] = (0.35, 0.2, 0.2, 0.1, 0.1, 0.05)
AUDIO_FEATURES: tuple[str, ...] = ("f_energy", "f_valence", "f_danceability", "f_acousticness")
MAX_SESSION_LENGTH = 50
SKIPPED_REASON = "skipped play (kept as signal, not a positive)"


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic generator.

    Attributes:
        n_users: Listeners (ignored when ``n_plays`` is set).
        n_clusters: Taste clusters (= genres), on a ring.
        artists_per_cluster: Artists per cluster.
        tracks_per_artist: Tracks per artist.
        tracks_per_album: Tracks per album (albums never span artists).
        sessions_per_user: Mean sessions per user (1 + Poisson).
        session_length: Mean session length (geometric, capped at ``max_session_length``).
        max_session_length: Cap on the session length (at most 50).
        zipf: Zipf exponent of popularity within a cluster.
        p_same_artist: Probability that the next track is by the same artist.
        p_drift: Probability that the next track comes from a neighbouring cluster.
        p_album_next: Probability that the next track is the artist's next one in album order
            (after the last track, the artist's first): artist runs that follow albums.
        max_tastes: Users have 1..``max_tastes`` tastes (uniform), at most ``n_clusters``.
        skip_rate: Skip probability of a track in one of the user's tastes.
        skip_rate_off: Skip probability of a track outside the user's tastes.
        p_second_genre: Probability that a track also carries the next genre on the ring.
        p_missing_metadata: Share of tracks left out of the tracks table (ids only in logs).
        min_gap_hours: Minimum inactivity between two sessions of a user.
        mean_gap_hours: Mean of the exponential part of the gap between sessions.
        start_date: ISO date of the earliest possible play (UTC).
        n_plays: Target number of plays; when set, ``n_users`` is derived from it
            (the result is within a few percent of the target).
        p_repeat: Probability that a play starts re-playing the listener's history: a
            non-skipped play of its earlier sessions (kept as drawn when there is none). The
            next play goes on with the plays that followed it with probability
            ``p_same_artist + p_album_next``, else starts afresh from the session's cluster.
            Re-plays are skipped at ``skip_rate``.
        repeat_recency: Shape of the re-played position in the history: 1 is uniform over
            the earlier plays, larger values lean towards recent plays (density ``x^(r-1)``).
        activity_shape: Gamma shape of per-listener activity (sessions are 1 + Poisson with a
            gamma-distributed mean, same average); None gives every listener the same mean.
        span_days: Spread each listener's sessions over this many days from ``start_date``
            (idle time cut at uniform random points, gaps still at least ``min_gap_hours``);
            None chains sessions with ``mean_gap_hours`` gaps after a start in the first 14 days.
        seed: Random seed: equal seeds give identical data.
    """

    n_users: int = 3000
    n_clusters: int = 10
    artists_per_cluster: int = 25
    tracks_per_artist: int = 20
    tracks_per_album: int = 10
    sessions_per_user: float = 10.0
    session_length: float = 10.0
    max_session_length: int = 50
    zipf: float = 1.0
    p_same_artist: float = 0.3
    p_drift: float = 0.05
    max_tastes: int = 3
    skip_rate: float = 0.1
    skip_rate_off: float = 0.5
    p_second_genre: float = 0.3
    p_missing_metadata: float = 0.0
    min_gap_hours: float = 1.0
    mean_gap_hours: float = 30.0
    start_date: str = "2023-01-01"
    n_plays: int | None = None
    p_album_next: float = 0.0
    p_repeat: float = 0.0
    repeat_recency: float = 1.0
    activity_shape: float | None = None
    span_days: float | None = None
    seed: int = 0

    @property
    def n_tracks(self) -> int:
        """Catalogue size."""
        return self.n_clusters * self.artists_per_cluster * self.tracks_per_artist

    @property
    def mean_length(self) -> float:
        """Expected session length after the cap."""
        m = max(self.session_length, 1.0)
        return m * (1.0 - (1.0 - 1.0 / m) ** self.max_session_length)

    def users_for_plays(self) -> int:
        """Number of users: ``n_users``, or derived from ``n_plays`` when that is set."""
        if self.n_plays is None:
            return self.n_users
        return max(1, round(self.n_plays / (self.sessions_per_user * self.mean_length)))

    @property
    def history_dependent(self) -> bool:
        """Whether the next play depends on more than the previous one (album order, re-plays)."""
        return self.p_album_next > 0 or self.p_repeat > 0

    def validate(self) -> None:
        """Raise :class:`DataError` on impossible settings."""
        if not 1 <= self.max_session_length <= MAX_SESSION_LENGTH:
            raise DataError(f"synthetic: max_session_length must be in 1..{MAX_SESSION_LENGTH}")
        if min(self.n_users, self.n_clusters, self.artists_per_cluster) < 1:
            raise DataError("synthetic: n_users, n_clusters, artists_per_cluster must be >= 1")
        if min(self.tracks_per_artist, self.tracks_per_album) < 1:
            raise DataError("synthetic: tracks_per_artist and tracks_per_album must be >= 1")
        if self.sessions_per_user < 1 or self.session_length < 1:
            raise DataError("synthetic: sessions_per_user and session_length must be >= 1")
        if not 1 <= self.max_tastes <= self.n_clusters:
            raise DataError("synthetic: max_tastes must be in 1..n_clusters")
        probs = (self.p_same_artist, self.p_drift, self.p_album_next, self.p_repeat)
        probs += (self.skip_rate, self.skip_rate_off)
        steps = self.p_same_artist + self.p_drift + self.p_album_next
        if any(not 0.0 <= p <= 1.0 for p in probs) or steps > 1:
            raise DataError(
                "synthetic: probabilities must be in [0, 1] (same_artist+drift+album_next <= 1)"
            )
        if self.repeat_recency <= 0:
            raise DataError("synthetic: repeat_recency must be > 0")
        if self.activity_shape is not None and self.activity_shape <= 0:
            raise DataError("synthetic: activity_shape must be > 0 (or null)")
        if self.span_days is not None and self.span_days <= 0:
            raise DataError("synthetic: span_days must be > 0 (or null)")
        if self.n_plays is not None and self.n_plays < 1:
            raise DataError("synthetic: n_plays must be >= 1")


PRESETS: dict[str, SyntheticConfig] = {
    # Tests: 300 users, 500 tracks, ~14k plays, generated in milliseconds.
    "tiny": SyntheticConfig(
        n_users=300,
        n_clusters=5,
        artists_per_cluster=10,
        tracks_per_artist=10,
        sessions_per_user=6.0,
        session_length=8.0,
    ),
    # The default config: 3,000 users, 5,000 tracks, ~300k plays (about a minute of training
    # for a small model on a 2-core CPU).
    "default": SyntheticConfig(),
    # Shaped like a Last.fm-1K scrobble log, for forward-in-time evaluation: ~350 listeners of
    # unequal activity over ~6 months, ~250k plays, a 240k-track long tail (most played tracks
    # are played once or twice), artist runs in album order, re-plays of the listener's own
    # history, skips.
    "scrobble": SyntheticConfig(
        n_users=350,
        n_clusters=20,
        artists_per_cluster=400,
        tracks_per_artist=30,
        tracks_per_album=10,
        sessions_per_user=60.0,
        session_length=12.0,
        zipf=0.9,
        p_same_artist=0.15,
        p_album_next=0.5,
        p_drift=0.05,
        p_repeat=0.15,
        repeat_recency=2.0,
        activity_shape=2.0,
        span_days=182.0,
    ),
}


def make_config(preset: str = "default", **overrides: Any) -> SyntheticConfig:
    """A preset with fields overridden.

    Args:
        preset: A key of :data:`PRESETS`.
        **overrides: :class:`SyntheticConfig` field values.

    Raises:
        DataError: Unknown preset or field, or impossible values.
    """
    if preset not in PRESETS:
        raise DataError(f"synthetic: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    names = {f.name for f in fields(SyntheticConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise DataError(f"synthetic: unknown option(s) {unknown}; expected some of {sorted(names)}")
    cfg = replace(PRESETS[preset], **overrides)
    cfg.validate()
    return cfg


@dataclass
class SyntheticTruth:
    """The planted structure, for tests that check a model recovers it.

    Attributes:
        track_ids: Raw track id per track number, ``[T]``.
        track_cluster: Cluster (genre) per track number, ``[T]`` int64.
        track_artist: Artist per track number, ``[T]`` int64.
        track_weight: Within-cluster popularity weight per track, ``[T]`` float64 (sums to 1
            per cluster).
        user_ids: Raw user id per user number, ``[U]``.
        user_tastes: Clusters of each user, ``[U, max_tastes]`` int64 padded with -1.
        config: The generator settings.
    """

    track_ids: np.ndarray
    track_cluster: np.ndarray
    track_artist: np.ndarray
    track_weight: np.ndarray
    user_ids: np.ndarray
    user_tastes: np.ndarray
    config: SyntheticConfig = field(default_factory=SyntheticConfig)

    def cluster_of(self, track_ids: Any) -> np.ndarray:
        """Cluster of raw track ids (-1 for ids that are not synthetic tracks)."""
        index = pd.Index(self.track_ids)
        pos = index.get_indexer(pd.Series(track_ids, dtype="string").to_numpy())
        return np.where(pos < 0, -1, self.track_cluster[np.maximum(pos, 0)])

    def tastes_of(self, user_ids: Any) -> list[set[int]]:
        """Taste clusters of raw user ids (empty set for unknown ids)."""
        index = pd.Index(self.user_ids)
        pos = index.get_indexer(pd.Series(user_ids, dtype="string").to_numpy())
        return [set() if p < 0 else {int(c) for c in self.user_tastes[p] if c >= 0} for p in pos]


# ---------------------------------------------------------------------------------- helpers
def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent streams for the catalogue, the users and the sessions."""
    ss = np.random.SeedSequence(seed)
    cat, usr, ses = ss.spawn(3)
    return np.random.default_rng(cat), np.random.default_rng(usr), np.random.default_rng(ses)


def _string_ids(names: list[str], codes: np.ndarray) -> pd.Series:
    """``names[code]`` for every code, built through a dictionary (fast for 20M rows)."""
    dictionary = pa.array(names, type=pa.string())
    arr = pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32, copy=False)), dictionary)
    return pd.Series(pd.arrays.ArrowStringArray(arr.cast(pa.string())), dtype="string")


def _block_cdf(weights: np.ndarray, block: int) -> np.ndarray:
    """Cumulative distribution per contiguous block, shifted by the block number.

    ``searchsorted(cdf, b + u)`` with ``u ~ U[0, 1)`` then samples a position inside block
    ``b`` proportionally to ``weights`` — for every row at once.
    """
    w = weights.reshape(-1, block)
    cdf = np.cumsum(w, axis=1) / w.sum(axis=1, keepdims=True)
    cdf[:, -1] = 1.0
    return (cdf + np.arange(w.shape[0])[:, None]).ravel()


def _sample_block(
    cdf: np.ndarray, blocks: np.ndarray, block: int, rng: np.random.Generator
) -> np.ndarray:
    """One draw per row from block ``blocks[i]`` of a :func:`_block_cdf`."""
    u = rng.random(len(blocks))
    idx = np.searchsorted(cdf, blocks + u, side="right")
    return np.clip(idx, blocks * block, (blocks + 1) * block - 1)


def _catalogue(cfg: SyntheticConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Track -> artist, cluster, popularity weight."""
    per_cluster = cfg.artists_per_cluster * cfg.tracks_per_artist
    track = np.arange(cfg.n_tracks)
    artist = track // cfg.tracks_per_artist
    cluster = artist // cfg.artists_per_cluster
    # Popularity rank inside the cluster: a random permutation per cluster (vectorised).
    rank = np.argsort(rng.random((cfg.n_clusters, per_cluster)), axis=1).argsort(axis=1).ravel()
    weight = 1.0 / (rank + 1.0) ** cfg.zipf
    weight = weight / np.repeat(weight.reshape(cfg.n_clusters, -1).sum(axis=1), per_cluster)
    return {"artist": artist, "cluster": cluster, "weight": weight}


def _users(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Tastes ``[U, max_tastes]`` (distinct clusters, padded with -1)."""
    n_users = cfg.users_for_plays()
    n_tastes = rng.integers(1, cfg.max_tastes + 1, size=n_users)
    order = np.argsort(rng.random((n_users, cfg.n_clusters)), axis=1)[:, : cfg.max_tastes]
    return np.where(np.arange(cfg.max_tastes)[None, :] < n_tastes[:, None], order, -1)


def ground_truth(preset: str = "default", **overrides: Any) -> SyntheticTruth:
    """The planted structure of ``load(preset=preset, **overrides)`` (same seed, same data)."""
    cfg = make_config(preset, **overrides)
    return _truth(cfg)


def _truth(cfg: SyntheticConfig) -> SyntheticTruth:
    rng_cat, rng_usr, _ = _rngs(cfg.seed)
    cat = _catalogue(cfg, rng_cat)
    tastes = _users(cfg, rng_usr)
    return SyntheticTruth(
        track_ids=np.array([f"t{i}" for i in range(cfg.n_tracks)]),
        track_cluster=cat["cluster"],
        track_artist=cat["artist"],
        track_weight=cat["weight"],
        user_ids=np.array([f"u{i}" for i in range(len(tastes))]),
        user_tastes=tastes,
        config=cfg,
    )


# ---------------------------------------------------------------------------------- generation
def generate(cfg: SyntheticConfig) -> tuple[pd.DataFrame, pd.DataFrame, SyntheticTruth]:
    """Generate interactions (canonical columns), tracks and the ground truth.

    Rows come ordered by user, then time. ``session_id`` is left empty: the pipeline recovers
    sessions by the inactivity gap.
    """
    cfg.validate()
    rng_cat, rng_usr, rng = _rngs(cfg.seed)
    cat = _catalogue(cfg, rng_cat)
    tastes = _users(cfg, rng_usr)
    n_users = len(tastes)
    n_tastes = (tastes >= 0).sum(axis=1)
    per_cluster = cfg.artists_per_cluster * cfg.tracks_per_artist
    cluster_cdf = _block_cdf(cat["weight"], per_cluster)
    artist_cdf = _block_cdf(cat["weight"], cfg.tracks_per_artist)
    t_cluster, t_artist = cat["cluster"], cat["artist"]

    # Sessions, ordered by user.
    if cfg.activity_shape is None:
        n_sess = 1 + rng.poisson(cfg.sessions_per_user - 1.0, size=n_users)
    else:
        shape = cfg.activity_shape
        activity = rng.gamma(shape, 1.0 / shape, size=n_users)  # mean 1
        n_sess = 1 + rng.poisson((cfg.sessions_per_user - 1.0) * activity)
    s_user = np.repeat(np.arange(n_users), n_sess)  # [S]
    n_s = len(s_user)
    pick = (rng.random(n_s) * n_tastes[s_user]).astype(np.int64)
    s_cluster = tastes[s_user, pick]  # [S]
    s_len = np.minimum(rng.geometric(1.0 / cfg.session_length, size=n_s), cfg.max_session_length)
    s_off = np.zeros(n_s + 1, dtype=np.int64)
    np.cumsum(s_len, out=s_off[1:])
    n_rows = int(s_off[-1])

    # The walk: one vectorised step per position. Per row: track, skip, time since the start
    # of the session (3-4 min per play, 10-40 s when skipped; skips likelier off-taste).
    track = np.empty(n_rows, dtype=np.int32)
    skipped = np.empty(n_rows, dtype=bool)
    within = np.empty(n_rows, dtype=np.int32)
    cur = np.empty(n_s, dtype=np.int64)
    # Re-plays of the listener's history: 1 starts a re-played stretch, 2 goes on with it.
    replay = np.zeros(n_rows, dtype=np.int8)
    fresh = np.zeros(n_s, dtype=bool)  # [S] the previous play was a re-play
    clock = np.zeros(n_s, dtype=np.int64)  # [S] seconds since the session started
    active = np.arange(n_s)
    for p in range(cfg.max_session_length):
        if p > 0:
            active = active[s_len[active] > p]
        if len(active) == 0:
            break
        home = s_cluster[active]
        go_on = np.zeros(len(active), dtype=bool)  # the run goes on with a re-played stretch
        if p == 0:
            nxt = _sample_block(cluster_cdf, home, per_cluster, rng)
        else:
            r = rng.random(len(active))
            same = r < cfg.p_same_artist
            drift = (r >= cfg.p_same_artist) & (r < cfg.p_same_artist + cfg.p_drift)
            if cfg.history_dependent:
                album = (r >= cfg.p_same_artist + cfg.p_drift) & (
                    r < cfg.p_same_artist + cfg.p_drift + cfg.p_album_next
                )
                # After a re-play the run goes on in the re-played stretch (same artist or
                # album order), else it starts afresh from the session's cluster.
                after_replay = fresh[active]
                go_on = after_replay & (same | album)
                same &= ~after_replay
                album &= ~after_replay
            step = np.where(rng.random(len(active)) < 0.5, -1, 1)
            src = np.where(drift, (home + step) % cfg.n_clusters, home)
            nxt = _sample_block(cluster_cdf, src, per_cluster, rng)
            if same.any():
                prev_artist = t_artist[cur[active[same]]]
                nxt[same] = _sample_block(artist_cdf, prev_artist, cfg.tracks_per_artist, rng)
            # Few immediate repeats: redraw once from the cluster, or take another track
            # of the same artist.
            prev = cur[active]
            rep = (nxt == prev) & ~same
            if rep.any():
                nxt[rep] = _sample_block(cluster_cdf, src[rep], per_cluster, rng)
            rep = (nxt == prev) & same
            if rep.any() and cfg.tracks_per_artist > 1:
                shift = rng.integers(1, cfg.tracks_per_artist, size=int(rep.sum()))
                base = t_artist[prev[rep]] * cfg.tracks_per_artist
                nxt[rep] = base + (prev[rep] - base + shift) % cfg.tracks_per_artist
            if cfg.history_dependent and album.any():
                base = t_artist[prev[album]] * cfg.tracks_per_artist
                nxt[album] = base + (prev[album] - base + 1) % cfg.tracks_per_artist
        on_taste = (tastes[s_user[active]] == t_cluster[nxt][:, None]).any(axis=1)
        if cfg.p_repeat > 0:
            again = rng.random(len(active)) < cfg.p_repeat
            code = np.where(go_on, 2, np.where(again, 1, 0))
            on_taste |= code > 0  # re-plays are skipped like tracks of the listener's tastes
            replay[s_off[active] + p] = code
            fresh[active] = code > 0
        skip = rng.random(len(active)) < np.where(on_taste, cfg.skip_rate, cfg.skip_rate_off)
        dur = np.where(
            skip, rng.integers(10, 41, size=len(active)), rng.integers(180, 241, size=len(active))
        )
        rows = s_off[active] + p
        cur[active] = nxt
        track[rows] = nxt
        skipped[rows] = skip
        within[rows] = clock[active]
        clock[active] += dur

    if cfg.p_repeat > 0:
        track = _resolve_replays(track, replay, skipped, s_off, s_len, n_sess, cfg, rng)

    first = np.zeros(n_s, dtype=bool)
    first[np.cumsum(n_sess)[:-1]] = True
    first[0] = True
    start0 = int(pd.Timestamp(cfg.start_date, tz="UTC").timestamp())
    if cfg.span_days is None:
        # Sessions of a user follow each other after min_gap + exponential hours of inactivity.
        gap = 3600.0 * (cfg.min_gap_hours + rng.exponential(cfg.mean_gap_hours, size=n_s))
        step = np.zeros(n_s, dtype=np.int64)
        step[1:] = gap[1:].astype(np.int64) + clock[:-1]
        step[first] = 0
        scs = np.cumsum(step)
        user_start = start0 + rng.integers(0, 14 * 86400, size=n_users)
        s_start = user_start[s_user] + scs - scs[np.flatnonzero(first)][s_user]  # [S]
    else:
        s_start = start0 + _spread_sessions(clock, first, s_user, n_users, cfg, rng)
    ts = np.repeat(s_start, s_len)  # [N]
    ts += within
    del within
    ctx_code = rng.choice(len(CONTEXT_TYPES), size=n_s, p=np.asarray(CONTEXT_PROBS))

    user_id = _string_ids([f"u{i}" for i in range(n_users)], np.repeat(s_user, s_len))
    track_id = _string_ids([f"t{i}" for i in range(cfg.n_tracks)], track)
    del track
    context = _string_ids(list(CONTEXT_TYPES), np.repeat(ctx_code, s_len))
    hour = ((ts // 3600) % 24).astype(np.int8)
    interactions = pd.DataFrame(
        {
            "user_id": user_id,
            "track_id": track_id,
            "timestamp": pd.arrays.IntegerArray(ts, np.zeros(n_rows, dtype=bool)),
            "session_id": pd.Series(
                pd.arrays.ArrowStringArray(pa.nulls(n_rows, pa.string())), dtype="string"
            ),
            "position": pd.arrays.IntegerArray(
                np.zeros(n_rows, dtype=np.int64), np.ones(n_rows, dtype=bool)
            ),
            "weight": np.ones(n_rows, dtype=np.float32),
            "skipped": skipped,
            "hour": pd.arrays.IntegerArray(hour, np.zeros(n_rows, dtype=bool)),
            "context_type": context,
        },
        copy=False,
    )
    assert tuple(interactions.columns) == INTERACTION_COLUMNS
    assert interactions.dtypes.astype(str).to_dict() == INTERACTION_DTYPES
    tracks = _tracks_table(cfg, cat, rng_cat)
    truth = SyntheticTruth(
        track_ids=np.array([f"t{i}" for i in range(cfg.n_tracks)]),
        track_cluster=t_cluster,
        track_artist=t_artist,
        track_weight=cat["weight"],
        user_ids=np.array([f"u{i}" for i in range(n_users)]),
        user_tastes=tastes,
        config=cfg,
    )
    return interactions, tracks, truth


def _spread_sessions(
    clock: np.ndarray,
    first: np.ndarray,
    s_user: np.ndarray,
    n_users: int,
    cfg: SyntheticConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Session starts (seconds after ``start_date``) spread over ``span_days`` per listener.

    Each listener's idle time (the span less its sessions and the ``min_gap_hours`` between
    them) is cut at uniform random points (normalised exponential spacings, one before the
    first session and one after the last), so every listener is active from about the start to
    about the end of the span and no session ends after it (unless the sessions alone are
    longer than the span).

    Args:
        clock: ``[S]`` session durations in seconds.
        first: ``[S]`` the session is its listener's first.
        s_user: ``[S]`` listener of each session (sessions ordered by listener).
        n_users: Number of listeners.
        cfg: The generator settings (``span_days`` set).
        rng: The sessions' random stream.

    Returns:
        ``[S]`` int64 start offsets.
    """
    assert cfg.span_days is not None
    n_s = len(clock)
    fixed = np.zeros(n_s, dtype=np.int64)  # minimum gap after the previous session
    fixed[1:] = int(3600 * cfg.min_gap_hours) + clock[:-1]
    fixed[first] = 0
    last = np.ones(n_s, dtype=bool)
    last[:-1] = first[1:]
    busy = np.bincount(s_user, weights=fixed + np.where(last, clock, 0), minlength=n_users)
    free = np.maximum(cfg.span_days * 86400.0 - busy, 0.0)  # [U] idle seconds to share out
    spacing = rng.exponential(1.0, size=n_s)  # before each session
    tail = rng.exponential(1.0, size=n_users)  # after the last one
    share = spacing / (np.bincount(s_user, weights=spacing, minlength=n_users) + tail)[s_user]
    step = fixed + (share * free[s_user]).astype(np.int64)
    scs = np.cumsum(step)
    head = np.flatnonzero(first)
    return scs - scs[head][s_user] + step[head][s_user]


def _resolve_replays(
    track: np.ndarray,
    replay: np.ndarray,
    skipped: np.ndarray,
    s_off: np.ndarray,
    s_len: np.ndarray,
    n_sess: np.ndarray,
    cfg: SyntheticConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Give every re-play row the track of an earlier play of the same listener.

    A re-played stretch starts at one of the listener's non-skipped plays of *earlier sessions*,
    at relative position ``u^(1/repeat_recency)`` in that history (uniform for 1; towards the
    newest above 1), so often-played tracks come back most; the rows that go on with it copy the
    plays that followed the source. Rows are ordered by user, then time, so the ``k``-th such
    play is found by index arithmetic on the cumulative count of non-skipped rows. A source may
    be a re-play itself: pointer jumping follows the chains (sources are always earlier rows).
    Stretches without an earlier play keep the walk's tracks.

    Args:
        track: ``[N]`` walk tracks, ordered by user, then time.
        replay: ``[N]`` 1 where a re-played stretch starts, 2 where it goes on, else 0.
        skipped: ``[N]`` skip marks.
        s_off: ``[S + 1]`` first row of each session (and the end).
        s_len: ``[S]`` session lengths.
        n_sess: ``[U]`` sessions per user.
        cfg: The generator settings.
        rng: The sessions' random stream.

    Returns:
        ``[N]`` tracks with re-plays filled in.
    """
    row_session = np.repeat(np.arange(len(s_len)), s_len)  # [N]
    user_first = np.zeros(len(n_sess) + 1, dtype=np.int64)
    np.cumsum(n_sess, out=user_first[1:])
    s_user_row0 = s_off[np.repeat(user_first[:-1], n_sess)]  # [S] first row of the session's user
    kept = ~skipped
    cum = np.zeros(len(track) + 1, dtype=np.int64)
    np.cumsum(kept, out=cum[1:])
    kept_rows = np.flatnonzero(kept)
    rows = np.flatnonzero(replay == 1)
    sess = row_session[rows]
    before = cum[s_user_row0[sess]]  # kept rows of earlier users
    n_hist = cum[s_off[sess]] - before  # kept plays of the listener's earlier sessions
    u = rng.random(len(rows)) ** (1.0 / cfg.repeat_recency)
    k = np.minimum((u * n_hist).astype(np.int64), np.maximum(n_hist - 1, 0))
    has = n_hist > 0
    source = np.arange(len(track))
    source[rows[has]] = kept_rows[before[has] + k[has]]
    # A stretch goes on with the rows after its source (still earlier rows of the listener).
    idx = np.arange(len(track))
    start = np.maximum.accumulate(np.where(replay == 1, idx, 0))  # [N] latest stretch start
    cont = np.flatnonzero(replay == 2)
    cont = cont[source[start[cont]] != start[cont]]
    source[cont] = source[start[cont]] + (cont - start[cont])
    while True:  # pointer jumping: sources are earlier rows, so chains end in O(log) rounds
        hop = source[source]
        if np.array_equal(hop, source):
            break
        source = hop
    return track[source]


def _tracks_table(
    cfg: SyntheticConfig, cat: dict[str, np.ndarray], rng: np.random.Generator
) -> pd.DataFrame:
    """Metadata: titles, artists, albums, genres, year and audio features per cluster."""
    n = cfg.n_tracks
    track = np.arange(n)
    cluster, artist = cat["cluster"], cat["artist"]
    album = artist * 10_000 + (track % cfg.tracks_per_artist) // cfg.tracks_per_album
    genre = np.array([f"genre-{c}" for c in range(cfg.n_clusters)], dtype=object)
    two = genre[cluster] + "|" + genre[(cluster + 1) % cfg.n_clusters]
    second = rng.random(n) < cfg.p_second_genre
    genres = np.where(second & (cfg.n_clusters > 1), two, genre[cluster])
    era = 1960 + cluster * (60.0 / max(cfg.n_clusters, 1))
    year = np.clip(np.round(era + rng.normal(0.0, 5.0, n)), 1950, 2024).astype(np.int16)
    centroid = rng.normal(0.0, 1.0, (cfg.n_clusters, len(AUDIO_FEATURES)))
    audio = centroid[cluster] + rng.normal(0.0, 0.5, (n, len(AUDIO_FEATURES)))
    df = pd.DataFrame(
        {
            "track_id": [f"t{i}" for i in track],
            "title": [f"Track {i}" for i in track],
            "artist": [f"Artist {a}" for a in artist],
            "album": [f"Album {a // 10_000}-{a % 10_000}" for a in album],
            "genres": genres,
            "year": year,
        }
    )
    for j, name in enumerate(AUDIO_FEATURES):
        df[name] = audio[:, j].astype(np.float32)
    if cfg.p_missing_metadata > 0:
        df = df[rng.random(n) >= cfg.p_missing_metadata]
    return conform_tracks(df)


def load(
    path: str | None = None,
    columns: dict[str, str] | None = None,
    preset: str = "default",
    **overrides: Any,
) -> LoadResult:
    """The ``synthetic`` format: generate a dataset instead of reading one.

    Args:
        path: Must be None (there is no file).
        columns: Must be None or empty (the columns are canonical already).
        preset: ``"tiny"`` (tests), ``"default"`` or ``"scrobble"`` (a Last.fm-1K-like log).
        **overrides: :class:`SyntheticConfig` fields, e.g. ``n_plays=20_000_000, seed=3``.

    Raises:
        DataError: A path or column mapping was given, or an unknown option.
    """
    if path is not None:
        raise DataError(f"synthetic: takes no path (got {path!r}); set data.path to null")
    if columns:
        raise DataError("synthetic: takes no column mapping (columns are canonical)")
    cfg = make_config(preset, **overrides)
    interactions, tracks, _ = generate(cfg)
    report = DataReport(source=f"synthetic:{preset}", files=[], rows_read=len(interactions))
    report.count(SKIPPED_REASON, int(interactions["skipped"].sum()))
    params = {k: v for k, v in asdict(cfg).items() if v != asdict(PRESETS[preset])[k]}
    report.notes.append(f"synthetic preset {preset!r}, overrides {params or 'none'}")
    return LoadResult(
        interactions=interactions, tracks=tracks, report=report, source="synthetic", files=[]
    )


def expected_plays(cfg: SyntheticConfig) -> int:
    """Expected number of plays for ``cfg`` (before randomness)."""
    return math.ceil(cfg.users_for_plays() * cfg.sessions_per_user * cfg.mean_length)


def next_play_law(truth: SyntheticTruth, user: int, prev: int, home: int) -> np.ndarray:
    """The generator's own probability of each track being the next *listened* play.

    The Bayes-optimal scores for next-track prediction on synthetic data (a ceiling for any
    model): ``P(next = t | previous play, session cluster) * P(not skipped | t, user)``, with the
    generator's same-artist step, drift, cluster draw and repeat redraws, exactly as
    :func:`generate` samples them.

    Args:
        truth: The planted structure (:func:`ground_truth`).
        user: User number (row of ``truth.user_tastes``).
        prev: Track number of the session's previous play (skipped or not); -1 when the next
            play opens the session (then its cluster is one of the user's tastes, uniformly).
        home: The session's cluster (that of its first play); ignored when ``prev`` is -1.

    Returns:
        ``[T]`` float64, unnormalised (the skip factor removes mass).

    Raises:
        DataError: The settings make the next play history-dependent (``p_album_next`` or
            ``p_repeat`` above 0, as in the ``scrobble`` preset).
    """
    cfg = truth.config
    if cfg.history_dependent:
        raise DataError(
            "next_play_law: not supported with p_album_next or p_repeat (e.g. the 'scrobble' "
            "preset): the next play then depends on the listener's history, not only on the "
            "previous play and the session's cluster"
        )
    cl, artist, w = truth.track_cluster, truth.track_artist, truth.track_weight
    tastes = [int(c) for c in truth.user_tastes[user] if c >= 0]
    if prev < 0:
        law = sum(np.where(cl == c, w, 0.0) for c in tastes) / len(tastes)
    else:
        n_c = cfg.n_clusters
        step = 1.0 - cfg.p_same_artist - cfg.p_drift
        neighbours = [(home - 1) % n_c, (home + 1) % n_c] if n_c > 1 else [home]
        shares = [(home, step)] + [(c, cfg.p_drift / len(neighbours)) for c in neighbours]
        law = np.zeros(len(cl))
        for c, share in shares:
            draw = np.where(cl == c, w, 0.0)  # [T]
            # a draw equal to the previous track is redrawn once from the same cluster
            again = draw[prev]
            law += share * draw * (1.0 + again)
            law[prev] -= share * draw[prev] * (1.0 + again) - share * again * again
        # same artist, by popularity inside the artist; a repeat moves to another of its tracks
        mine = artist == artist[prev]
        within = np.where(mine, w, 0.0) / w[mine].sum()  # [T]
        n_t = int(mine.sum())
        if n_t > 1:
            within = within + np.where(mine, within[prev] / (n_t - 1), 0.0)
            within[prev] = 0.0
        law += cfg.p_same_artist * within
    on_taste = np.isin(cl, tastes)
    return law * np.where(on_taste, 1.0 - cfg.skip_rate, 1.0 - cfg.skip_rate_off)


def play_states(
    interactions: pd.DataFrame, truth: SyntheticTruth, gap_minutes: float = 30.0
) -> dict[str, np.ndarray]:
    """Per generated play: the inputs of :func:`next_play_law` that produced it.

    Args:
        interactions: :func:`generate`'s plays (ordered by user, then time).
        truth: Its planted structure.
        gap_minutes: The data's session gap (``data.session_gap_minutes``).

    Returns:
        ``user``, ``track``, ``prev`` (-1 when the play opens its session), ``home`` (cluster of
        the session's first play) as ``[N]`` int64 arrays, and ``skipped`` ``[N]`` bool.
        Sessions are cut by the pipeline's own sessionizer (the generator keeps sessions at
        least ``min_gap_hours`` apart, so any gap below that recovers them exactly).
    """
    from twotower.data.sessions import events_from_frame, sessionize_events

    user = pd.Index(truth.user_ids).get_indexer(interactions["user_id"].astype(str).to_numpy())
    track = pd.Index(truth.track_ids).get_indexer(interactions["track_id"].astype(str).to_numpy())
    if (user < 0).any() or (track < 0).any():
        raise ValueError("play_states: plays whose user or track is not in the ground truth")
    ev = sessionize_events(events_from_frame(interactions), gap_minutes)
    session = np.empty(len(interactions), dtype=np.int64)
    session[ev.row] = ev.session  # [N] in the rows' own order
    opens = np.ones(len(session), dtype=bool)
    opens[1:] = session[1:] != session[:-1]
    first = np.maximum.accumulate(np.where(opens, np.arange(len(session)), 0))  # [N]
    prev = np.where(opens, -1, np.roll(track, 1)).astype(np.int64)
    return {
        "user": user.astype(np.int64),
        "track": track.astype(np.int64),
        "prev": prev,
        "home": truth.track_cluster[track[first]].astype(np.int64),
        "skipped": interactions["skipped"].to_numpy(bool),
    }
