"""Training windows of next-item sequences, shared by the in-memory and streaming DataModules.

Every training sequence (positive events only) is cut, from its end backwards, into windows of
``window + 1`` items, left-padded with 0; input position ``t`` predicts item ``t + 1``. With
the per-play signals, windows hold every play (skipped ones too, marked in ``skips``: an input,
never a target) and the gap bucket of each play since the previous one; with the clock, also
the hour of day and weekday of each play (:func:`twotower.query.play_clock`).
"""

from __future__ import annotations

import numpy as np

from twotower.data.prepared import Sequences
from twotower.query import UNKNOWN_HOUR, UNKNOWN_WEEKDAY, play_clock


def windows_per_sequence(n: np.ndarray, window: int, stride: int = 0) -> np.ndarray:
    """Training windows of sequences with ``n`` usable plays each: ``ceil((n - 1) / stride)``."""
    stride = stride or window
    return np.where(n >= 2, (n - 2) // stride + 1, 0)


def build_windows(
    seqs: Sequences,
    window: int,
    stride: int = 0,
    play_signals: bool = False,
    clock: bool = False,
) -> dict[str, np.ndarray]:
    """Training windows of the positive events of every sequence (vectorised).

    Windows end at the last event, then every ``stride`` events backwards. ``stride = window``
    (or 0) cuts non-overlapping windows; a smaller stride overlaps them, so a target is seen
    behind ``window / stride`` different amounts of context (augmentation).

    Args:
        seqs: Training sequences.
        window: ``L``: inputs per window (each window holds ``L + 1`` items).
        stride: Events between the ends of consecutive windows, ``1..L`` (0 = ``L``).
        play_signals: Windows of every play, with ``skips`` and ``gaps``.
        clock: Also ``play_hours`` and ``play_weekdays`` (with ``play_signals``).

    Returns:
        ``items [W, L+1]`` int64 (0 = pad), ``hours [W, L+1]`` int64 (-1 unknown),
        ``contexts [W, L+1]`` int64, ``users [W]`` int64; with ``play_signals`` also
        ``skips [W, L+1]`` (1 skipped) and ``gaps [W, L+1]`` (gap buckets, 0 at padding);
        with ``clock`` also ``play_hours`` and ``play_weekdays [W, L+1]`` (UTC hour 0..23 and
        weekday 0..6, Monday = 0, of each play; -1 unknown and at padding).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    stride = stride or window
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in 1..{window} (0 = window), got {stride}")
    num_seq = len(seqs)
    seq_of = np.repeat(np.arange(num_seq), seqs.lengths)
    keep = np.ones(len(seqs.items), dtype=bool) if play_signals else seqs.positive.astype(bool)
    items, hours, contexts = seqs.items[keep], seqs.hours[keep], seqs.contexts[keep]
    seq_of = seq_of[keep]
    n = np.bincount(seq_of, minlength=num_seq)  # positives per sequence
    starts = np.cumsum(n) - n
    per_seq = windows_per_sequence(n, window, stride)  # [S]
    w_seq = np.repeat(np.arange(num_seq), per_seq)  # [W]
    k = np.arange(len(w_seq)) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)  # 0 = latest
    end = n[w_seq] - 1 - k * stride  # [W] position of the last target in its sequence
    rel = end[:, None] - window + np.arange(window + 1)[None, :]  # [W, L+1]
    real = rel >= 0
    src = starts[w_seq][:, None] + np.maximum(rel, 0)  # [W, L+1]
    out = {
        "items": np.where(real, items[src], 0).astype(np.int64),
        "hours": np.where(real, hours[src], -1).astype(np.int64),
        "contexts": np.where(real, contexts[src], 0).astype(np.int64),
        "users": seqs.users[w_seq].astype(np.int64),
    }
    if play_signals:
        gaps = seqs.play_gaps()  # [N]
        out["skips"] = np.where(real, ~seqs.positive[src], False).astype(np.int64)
        out["gaps"] = np.where(real, gaps[src], 0).astype(np.int64)
        if clock:
            p_hours, p_weekdays = play_clock(seqs.timestamps)  # [N] each, -1 unknown
            out["play_hours"] = np.where(real, p_hours[src], UNKNOWN_HOUR)  # [W, L+1]
            out["play_weekdays"] = np.where(real, p_weekdays[src], UNKNOWN_WEEKDAY)  # [W, L+1]
    return out
