"""``twotower drift``: has the world changed since the model was trained? A data monitor.

Compares a new batch of logs with the reference run's data (what the model was trained on) and
with the model itself. Both sides are loaded and sessionized the same way (the reference's
loader and inactivity gap), then:

================== ===========================================================================
check              statistic
================== ===========================================================================
new-track share    plays of tracks outside the model's vocabulary / all plays of the batch
user overlap       share of the batch's distinct listeners that the model knows
popularity shift   Spearman rank correlation of positive play counts over tracks played in
                   both; top-100 turnover = share of the batch's 100 most played tracks that
                   are not among the reference's 100 most played
session length     Jensen-Shannon divergence (base 2: 0 identical, 1 disjoint) of the
                   session-length histograms (log-spaced bins 1, 2, 3, 4, 5-6, 7-8, 9-12, ...);
                   the two-sample Kolmogorov-Smirnov statistic is reported beside it
hour of day        Jensen-Shannon divergence (base 2) of the 24-bin hour-of-day histograms
model metric       Recall@10 of the model on the last positive event of every sequence of the
                   batch (history = the events before it), and its relative drop from the same
                   measure on the reference data
================== ===========================================================================

A threshold per check (:class:`DriftThresholds`, ``--max-new-track-share 0.2`` ...) turns the
report into an alert: :func:`drift_main` exits with :data:`EXIT_DRIFT` (3) when one is crossed,
so a scheduler can act on it. With ``--log-dir`` the numbers are also TensorBoard scalars
(``drift/<name>``), one step per batch.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("twotower")

EXIT_DRIFT = 3
#: Upper edges (exclusive) of the session-length bins; the last bin is open.
SESSION_BINS = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 257)
TOP_N = 100
METRIC_K = 10


@dataclass
class DriftThresholds:
    """Alert thresholds (None switches a check off).

    Attributes:
        max_new_track_share: Highest share of plays on tracks the model does not know.
        min_user_overlap: Lowest share of the batch's listeners that the model knows.
        min_popularity_spearman: Lowest rank correlation of track popularity.
        max_top100_turnover: Highest share of the batch's top-100 tracks new to the top 100.
        max_session_length_jsd: Highest JS divergence of the session-length distributions.
        max_hour_jsd: Highest JS divergence of the hour-of-day distributions.
        max_metric_drop: Highest relative drop of the model's Recall@10 (0.3 = 30% lower on
            the batch than on the reference data).
    """

    max_new_track_share: float | None = 0.2
    min_user_overlap: float | None = None
    min_popularity_spearman: float | None = 0.5
    max_top100_turnover: float | None = 0.5
    max_session_length_jsd: float | None = 0.05
    max_hour_jsd: float | None = 0.05
    max_metric_drop: float | None = 0.3


#: check name -> (threshold field, statistic), in report order.
CHECKS: dict[str, tuple[str, str]] = {
    "new_track_share": (
        "max_new_track_share",
        "plays of tracks outside the model's vocabulary / all plays",
    ),
    "user_overlap": ("min_user_overlap", "share of the batch's listeners the model knows"),
    "popularity_spearman": (
        "min_popularity_spearman",
        "Spearman rank correlation of play counts over tracks played in both",
    ),
    "top100_turnover": (
        "max_top100_turnover",
        "share of the batch's 100 most played tracks not in the reference's top 100",
    ),
    "session_length_jsd": (
        "max_session_length_jsd",
        "Jensen-Shannon divergence (base 2) of session-length histograms (log bins)",
    ),
    "hour_jsd": ("max_hour_jsd", "Jensen-Shannon divergence (base 2) of hour-of-day histograms"),
    "metric_drop": (
        "max_metric_drop",
        f"relative drop of Recall@{METRIC_K} (last event per sequence), batch vs reference",
    ),
}


# ------------------------------------------------------------------------------ statistics
def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint) of two histograms.

    Args:
        p: Counts or probabilities.
        q: Counts or probabilities over the same bins.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two ECDFs."""
    a, b = np.sort(np.asarray(a)), np.sort(np.asarray(b))
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    grid = np.union1d(a, b)
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN below 3 pairs or no spread."""
    if len(a) < 3:
        return float("nan")
    ra = pd.Series(a).rank(method="average").to_numpy()
    rb = pd.Series(b).rank(method="average").to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def top_n(counts: pd.Series, n: int = TOP_N) -> set[str]:
    """The ``n`` most played ids (ties broken by id, so the set is deterministic)."""
    frame = pd.DataFrame({"id": counts.index.astype(str), "n": counts.to_numpy()})
    frame = frame[frame["n"] > 0].sort_values(["n", "id"], ascending=[False, True], kind="stable")
    return set(frame["id"].head(n))


def session_histogram(lengths: np.ndarray) -> np.ndarray:
    """Counts of session lengths in :data:`SESSION_BINS` (the last bin is open-ended)."""
    edges = np.asarray(SESSION_BINS)
    idx = np.searchsorted(edges, np.asarray(lengths), side="right") - 1
    return np.bincount(np.clip(idx, 0, len(edges) - 1), minlength=len(edges))


# ------------------------------------------------------------------------------ profiles
@dataclass
class DataProfile:
    """What drift compares about one batch of logs.

    Attributes:
        label: Where the data came from.
        plays: Rows (plays or ratings).
        track_plays: Raw track id -> plays (all rows).
        track_positives: Raw track id -> positive plays (skips excluded).
        users: Distinct raw listener ids (None when the logs have no listener ids).
        session_lengths: Events per session ``[S]``.
        hour_counts: Plays per hour of day ``[24]`` (unknown hours left out).
        queries: Last positive event of every sequence with its history (None without any).
        time_range: ``(first, last)`` unix seconds, or None.
    """

    label: str
    plays: int
    track_plays: pd.Series
    track_positives: pd.Series
    users: pd.Index | None
    session_lengths: np.ndarray
    hour_counts: np.ndarray
    queries: Any = None
    time_range: tuple[int, int] | None = None

    def summary(self) -> dict[str, Any]:
        """Counts for the report."""
        return {
            "plays": self.plays,
            "tracks": int(len(self.track_plays)),
            "listeners": None if self.users is None else int(len(self.users)),
            "sessions": int(len(self.session_lengths)),
            "mean_session_length": float(np.mean(self.session_lengths))
            if len(self.session_lengths)
            else None,
            "queries": 0 if self.queries is None else len(self.queries),
        }


def _last_event_queries(
    ev: Any, by_user: bool, max_history: int, max_queries: int, label: str
) -> Any:
    """Raw-id queries: the last positive event of every sequence with >= 2 positives."""
    from twotower.compare import PAD_ID, RawQueries

    pos = np.flatnonzero(ev.positive)
    if len(pos) == 0:
        return None
    seq = (ev.user if by_user else ev.session)[pos]
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    ends = np.r_[starts[1:], len(pos)]
    ok = (ends - starts) >= 2
    starts, ends = starts[ok], ends[ok]
    if len(starts) == 0:
        return None
    if len(starts) > max_queries:
        pick = np.unique(np.linspace(0, len(starts) - 1, max_queries).round().astype(np.int64))
        starts, ends = starts[pick], ends[pick]
    tracks = np.asarray(ev.track_ids, dtype=object)[ev.track[pos]]
    target = ends - 1
    lo = np.maximum(starts, target - max_history)
    lens = target - lo
    idx = np.repeat(lo, lens) + np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    seen_vals, seen_off = [], [0]
    for s, t in zip(starts, target, strict=True):
        u = pd.unique(tracks[s:t])
        seen_vals.append(u)
        seen_off.append(seen_off[-1] + len(u))
    rows = pos[target]
    users = np.asarray(ev.user_ids, dtype=object)
    contexts = np.asarray(ev.context_ids, dtype=object)
    return RawQueries(
        history=tracks[idx],
        offsets=np.r_[0, np.cumsum(lens)].astype(np.int64),
        targets=tracks[target],
        users=np.where(ev.user[rows] >= 0, users[np.maximum(ev.user[rows], 0)], PAD_ID)
        if len(users)
        else np.full(len(rows), PAD_ID, dtype=object),
        hours=np.asarray(ev.hour[rows], dtype=np.int64),
        contexts=np.where(ev.context[rows] >= 0, contexts[np.maximum(ev.context[rows], 0)], PAD_ID)
        if len(contexts)
        else np.full(len(rows), PAD_ID, dtype=object),
        seen=np.concatenate(seen_vals) if seen_vals else np.zeros(0, dtype=object),
        seen_offsets=np.asarray(seen_off, dtype=np.int64),
        label=f"last event per {'listener' if by_user else 'session'} of {label}",
    )


def profile_data(
    cfg: Any,
    label: str = "",
    sequence_by: str = "auto",
    max_history: int = 200,
    max_queries: int = 5000,
) -> DataProfile:
    """Load and sessionize the data of a :class:`~twotower.data.pipeline.DataConfig`, profile it.

    Args:
        cfg: The data configuration (its loader, path, options and inactivity gap).
        label: Name in the report (default: the path or format).
        sequence_by: ``user``, ``session`` or ``auto`` for the metric's queries.
        max_history: History events per query.
        max_queries: At most this many queries (evenly spaced, deterministic).

    Raises:
        DataError: Bad or empty input.
    """
    from twotower.data.schema import DataError
    from twotower.data.sessions import events_from_frame, sessionize_events
    from twotower.data.sources import load_source

    label = label or str(cfg.path or cfg.format)
    res = load_source(cfg.format, cfg.path, cfg.columns, **(cfg.options or {}))
    if len(res.interactions) == 0:
        raise DataError(f"{label}: no interactions")
    ev = events_from_frame(res.interactions)
    ev = sessionize_events(ev, cfg.session_gap_minutes, random_order=not res.ordered, seed=cfg.seed)
    track_ids = np.asarray(ev.track_ids, dtype=object).astype(str)
    plays = np.bincount(ev.track, minlength=len(track_ids))
    positives = np.bincount(ev.track[ev.positive], minlength=len(track_ids))
    has_users = bool(len(ev)) and bool((ev.user >= 0).all())
    users = None
    if has_users:
        users = pd.Index(np.asarray(ev.user_ids, dtype=object)[np.unique(ev.user)].astype(str))
    hours = ev.hour[ev.hour >= 0].astype(np.int64)
    by_user = has_users and sequence_by != "session"
    known = ev.timestamp[ev.timestamp >= 0]
    queries = _last_event_queries(ev, by_user, max_history, max_queries, label)
    return DataProfile(
        label=label,
        plays=len(ev),
        track_plays=pd.Series(plays, index=track_ids),
        track_positives=pd.Series(positives, index=track_ids),
        users=users,
        session_lengths=np.bincount(ev.session).astype(np.int64),
        hour_counts=np.bincount(hours, minlength=24)[:24],
        queries=queries,
        time_range=(int(known.min()), int(known.max())) if len(known) else None,
    )


# ------------------------------------------------------------------------------ the report
@dataclass
class DriftReport:
    """The drift checks of a new batch against a reference run.

    Attributes:
        reference: The reference run or artifact folder.
        new: The new batch.
        values: Check name -> value (None when it cannot be computed), see :data:`CHECKS`.
        thresholds: The thresholds applied.
        crossed: Names of the checks whose threshold was crossed.
        details: Counts of both sides, KS statistic, metric values, notes.
    """

    reference: str
    new: str
    values: dict[str, float | None]
    thresholds: DriftThresholds
    crossed: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def alert(self) -> bool:
        """Whether any threshold was crossed."""
        return bool(self.crossed)

    def to_markdown(self) -> str:
        """A table of the checks (value, threshold, status, statistic) and the counts."""
        ref, new = self.details.get("reference", {}), self.details.get("new", {})
        lines = [
            f"Reference: `{self.reference}` ({_counts(ref)})  ",
            f"New batch: `{self.new}` ({_counts(new)})",
            "",
            "| check | value | threshold | status | statistic |",
            "|---|---|---|---|---|",
        ]
        for name, (thr_name, stat) in CHECKS.items():
            value = self.values.get(name)
            thr = getattr(self.thresholds, thr_name)
            bound = "" if thr is None else f"{'<=' if thr_name.startswith('max') else '>='} {thr}"
            if value is None:
                status = "n/a"
            elif name in self.crossed:
                status = "**CROSSED**"
            else:
                status = "ok" if thr is not None else "-"
            shown = "n/a" if value is None else f"{value:.3f}"
            lines.append(f"| {name} | {shown} | {bound} | {status} | {stat} |")
        ks = self.details.get("session_length_ks")
        if ks is not None:
            lines.append("")
            lines.append(
                f"Session length: mean {_f(ref.get('mean_session_length'))} -> "
                f"{_f(new.get('mean_session_length'))}, KS statistic {ks:.3f}."
            )
        m = self.details.get("metric")
        if m:
            lines.append(
                f"Model Recall@{METRIC_K}: {_f(m['reference_recall'])} on the reference data's "
                f"last events ({m['reference_queries']:,} queries) -> {_f(m['new_recall'])} on the "
                f"batch ({m['new_queries']:,}); NDCG@{METRIC_K} {_f(m['reference_ndcg'])} -> "
                f"{_f(m['new_ndcg'])}; targets unknown to the model: {m['new_missing_targets']:,}."
            )
        lines += [f"Note: {n}" for n in self.details.get("notes", [])]
        lines.append("")
        if self.crossed:
            lines.append(
                f"**Drift alert**: {len(self.crossed)} threshold(s) crossed: "
                + ", ".join(self.crossed)
            )
        else:
            lines.append("No threshold crossed.")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return _clean(
            {
                "reference": self.reference,
                "new": self.new,
                "values": self.values,
                "statistics": {k: v[1] for k, v in CHECKS.items()},
                "thresholds": asdict(self.thresholds),
                "crossed": self.crossed,
                "alert": self.alert,
                "details": self.details,
            }
        )

    def to_json(self) -> str:
        """Pretty JSON (NaN as null)."""
        return json.dumps(self.to_dict(), indent=2)

    def scalars(self) -> dict[str, float]:
        """Every number worth plotting over time (``drift/<name>``)."""
        out = {k: float(v) for k, v in self.values.items() if v is not None}
        if self.details.get("session_length_ks") is not None:
            out["session_length_ks"] = float(self.details["session_length_ks"])
        m = self.details.get("metric") or {}
        for key in ("new_recall", "new_ndcg", "reference_recall"):
            if m.get(key) is not None:
                out[f"{key.replace('new_', 'batch_')}@{METRIC_K}"] = float(m[key])
        out["alert"] = float(self.alert)
        out["thresholds_crossed"] = float(len(self.crossed))
        return out

    def write_tensorboard(self, log_dir: str | Path, step: int = 0) -> Path:
        """Write :meth:`scalars` as TensorBoard scalars ``drift/<name>`` at ``step``."""
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir))
        try:
            for name, value in self.scalars().items():
                writer.add_scalar(f"drift/{name}", value, global_step=step)
            writer.add_text("drift/report", self.to_markdown(), global_step=step)
        finally:
            writer.close()
        return Path(log_dir)


def _f(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"


def _counts(d: dict[str, Any]) -> str:
    parts = [f"{d.get('plays', 0):,} plays", f"{d.get('tracks', 0):,} tracks"]
    if d.get("listeners") is not None:
        parts.append(f"{d['listeners']:,} listeners")
    parts.append(f"{d.get('sessions', 0):,} sessions")
    return ", ".join(parts)


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _clean(x.item())
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def drift_values(
    ref: DataProfile, new: DataProfile, track_vocab: pd.Index, user_vocab: pd.Index | None
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """The data checks of :data:`CHECKS` (all but the model metric) and extra details."""
    values: dict[str, float | None] = {}
    known = new.track_plays.index.isin(track_vocab)
    values["new_track_share"] = float(new.track_plays[~known].sum() / max(new.plays, 1))
    details: dict[str, Any] = {"new_tracks": int((~known & (new.track_plays > 0)).sum())}
    if new.users is not None and user_vocab is not None and len(user_vocab):
        values["user_overlap"] = float(new.users.isin(user_vocab).mean())
    else:
        values["user_overlap"] = None
    shared = ref.track_positives.index.intersection(new.track_positives.index)
    a = ref.track_positives.reindex(shared).to_numpy()
    b = new.track_positives.reindex(shared).to_numpy()
    both = (a > 0) & (b > 0)
    values["popularity_spearman"] = _none_if_nan(spearman(a[both], b[both]))
    details["popularity_tracks"] = int(both.sum())
    top_ref, top_new = top_n(ref.track_positives), top_n(new.track_positives)
    values["top100_turnover"] = (
        float(len(top_new - top_ref) / len(top_new)) if top_new and top_ref else None
    )
    values["session_length_jsd"] = _none_if_nan(
        js_divergence(
            session_histogram(ref.session_lengths), session_histogram(new.session_lengths)
        )
    )
    details["session_length_ks"] = _none_if_nan(
        ks_statistic(ref.session_lengths, new.session_lengths)
    )
    values["hour_jsd"] = _none_if_nan(js_divergence(ref.hour_counts, new.hour_counts))
    return values, details


def check_thresholds(values: dict[str, float | None], thresholds: DriftThresholds) -> list[str]:
    """Names of the checks whose value is beyond its threshold (None values never cross)."""
    crossed = []
    for name, (thr_name, _) in CHECKS.items():
        value, thr = values.get(name), getattr(thresholds, thr_name)
        if value is None or thr is None:
            continue
        if (thr_name.startswith("max") and value > thr) or (
            thr_name.startswith("min") and value < thr
        ):
            crossed.append(name)
    return crossed


def _artifact_dir(reference: str | Path) -> Path:
    path = Path(reference)
    if (path / "manifest.json").is_file():
        return path
    if (path / "artifacts" / "manifest.json").is_file():
        return path / "artifacts"
    raise FileNotFoundError(
        f"--reference {path}: not a pipeline run folder (artifacts/) nor an artifact folder"
    )


def new_batch_config(
    new: Any, reference_cfg: Any, fmt: str | None = None, overrides: dict[str, Any] | None = None
) -> Any:
    """The :class:`~twotower.data.pipeline.DataConfig` of the new batch.

    Args:
        new: A DataConfig, a YAML config (``.yaml``/``.yml``, its data section), a file or
            folder of logs, or None (only with ``fmt="synthetic"``).
        reference_cfg: The reference's data config: format, column mapping, options and
            session gap carry over to a plain path unless ``fmt`` names another format.
        fmt: Format of ``new`` (default: the reference's).
        overrides: Data option overrides (``{"options.seed": 3}``, ``["--data.path=P"]``; see
            :func:`twotower.config.normalize_overrides`).
    """
    from twotower.config import data_config_with, load_data_config, normalize_overrides
    from twotower.data.pipeline import DataConfig

    overrides = normalize_overrides(overrides)
    if isinstance(new, DataConfig):
        return data_config_with(new, overrides) if overrides else new
    if new is not None and str(new).endswith((".yaml", ".yml")):
        return load_data_config([str(new)], overrides)
    values = asdict(reference_cfg)
    if fmt and fmt != reference_cfg.format:
        values.update(format=fmt, columns=None, options=None)
    if new is None and values["format"] != "synthetic" and "data.path" not in overrides:
        raise ValueError("--data (or --data.path) is required unless --format synthetic")
    values["path"] = None if new is None else str(new)
    return data_config_with(values, overrides)


def _model_metric(side: Any, queries: Any, filter_seen: bool) -> dict[str, Any]:
    from twotower.compare import score_queries
    from twotower.metrics import metrics_from_ranks

    queries.filter_seen = filter_seen
    res = score_queries(side, queries, k=METRIC_K)
    m = metrics_from_ranks(res.ranks, [METRIC_K])
    return {
        "recall": m[f"recall@{METRIC_K}"],
        "ndcg": m[f"ndcg@{METRIC_K}"],
        "queries": len(queries),
        "missing_targets": res.missing_targets,
    }


def drift_report(
    reference_run: str | Path,
    new: Any,
    thresholds: DriftThresholds | None = None,
    fmt: str | None = None,
    overrides: dict[str, Any] | None = None,
    metric: bool = True,
    max_queries: int = 5000,
) -> DriftReport:
    """Compare a new batch of logs with the reference run's data and model.

    Args:
        reference_run: Pipeline run folder or artifact folder (its manifest records the
            training data's configuration and holds the model).
        new: The new batch: a DataConfig, a YAML config, or a file/folder of logs.
        thresholds: Alert thresholds (default :class:`DriftThresholds`).
        fmt: Format of a plain path (default: the reference's).
        overrides: Data option overrides of the new batch.
        metric: Also measure the model on the batch's last events.
        max_queries: Queries per side for the metric.

    Raises:
        FileNotFoundError: The reference is neither a run folder nor an artifact folder.
        DataError: Unreadable or empty new logs.
    """
    from twotower.compare import data_config_of, side_from_artifact

    thresholds = thresholds or DriftThresholds()
    artifacts = _artifact_dir(reference_run)
    side = side_from_artifact(artifacts)
    manifest_data = json.loads((artifacts / "manifest.json").read_text()).get("data") or {}
    params = manifest_data.get("params") or {}
    ref_cfg = data_config_of(side)
    new_cfg = new_batch_config(new, ref_cfg, fmt, overrides)
    sequence_by = str(params.get("sequence_by", "auto"))
    max_history = int(ref_cfg.max_history)
    log.info("drift: profiling the reference data (%s)", ref_cfg.path or ref_cfg.format)
    ref = profile_data(ref_cfg, "reference", sequence_by, max_history, max_queries)
    options = json.dumps(new_cfg.options or {}, default=str)
    new_label = str(new_cfg.path or f"{new_cfg.format} {options}")
    log.info("drift: profiling the new batch (%s)", new_label)
    batch = profile_data(new_cfg, new_label, sequence_by, max_history, max_queries)
    values, details = drift_values(ref, batch, side.track_index, side.user_index)
    details["reference"] = ref.summary()
    details["new"] = batch.summary()
    details["notes"] = []
    values["metric_drop"] = None
    if metric and batch.queries is not None and ref.queries is not None:
        filter_seen = bool(manifest_data.get("filter_seen", False))
        m_ref = _model_metric(side, ref.queries, filter_seen)
        m_new = _model_metric(side, batch.queries, filter_seen)
        details["metric"] = {
            "reference_recall": m_ref["recall"],
            "reference_ndcg": m_ref["ndcg"],
            "reference_queries": m_ref["queries"],
            "new_recall": m_new["recall"],
            "new_ndcg": m_new["ndcg"],
            "new_queries": m_new["queries"],
            "new_missing_targets": m_new["missing_targets"],
        }
        if m_ref["recall"] > 0:
            values["metric_drop"] = float(1.0 - m_new["recall"] / m_ref["recall"])
    elif metric:
        details["notes"].append("the batch has no sequence with two positive events: no metric")
    crossed = check_thresholds(values, thresholds)
    return DriftReport(
        reference=str(reference_run),
        new=new_label,
        values=values,
        thresholds=thresholds,
        crossed=crossed,
        details=details,
    )


# ------------------------------------------------------------------------------ CLI
def _threshold(text: str) -> float | None:
    if text.lower() in ("off", "none", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None


def add_threshold_args(parser: argparse.ArgumentParser) -> None:
    """``--max-new-track-share 0.2`` ... for every field of :class:`DriftThresholds`."""
    defaults = DriftThresholds()
    for f in fields(DriftThresholds):
        default = getattr(defaults, f.name)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=_threshold,
            default=default,
            metavar="X|off",
            help=f"alert threshold (default {default if default is not None else 'off'})",
        )


def drift_main(args: argparse.Namespace) -> int:
    """What ``twotower drift`` runs: print the report; exit 3 when a threshold is crossed."""
    from twotower.config import ConfigArgs, load_data_config, warn_unused

    thresholds = DriftThresholds(**{f.name: getattr(args, f.name) for f in fields(DriftThresholds)})
    config_args = getattr(args, "config_args", None) or ConfigArgs()
    warn_unused(config_args, "drift")
    new, overrides = args.data, dict(config_args.overrides)
    if config_args.files:
        if args.data:
            raise ValueError("give the new batch as --data or as --config, not both")
        new, overrides = load_data_config(config_args.files, overrides), {}
    report = drift_report(
        args.reference,
        new,
        thresholds=thresholds,
        fmt=args.format,
        overrides=overrides,
        metric=not args.no_metric,
    )
    text = report.to_markdown()
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n")
    if args.log_dir:
        report.write_tensorboard(args.log_dir, step=args.step)
    return EXIT_DRIFT if report.alert else 0
