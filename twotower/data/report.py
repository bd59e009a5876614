"""The data report: what was read, kept and dropped (by reason), and the shape of the data.

Nothing is dropped silently: every loader and every preprocessing step that removes rows calls
:meth:`DataReport.drop` with a reason, and the report prints them all.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

MIN_EVAL_QUERIES = 100  # fewer validation / test queries than this: the report warns


def _fmt_time(ts: int | None) -> str:
    if ts is None:
        return "n/a"
    return datetime.fromtimestamp(int(ts), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class DataReport:
    """Counts that describe one load + preprocessing run.

    Attributes:
        source: Format name.
        files: Input files.
        rows_read: Data rows parsed from the files (header lines excluded).
        rows_kept: Interactions that reached the split.
        dropped: Rows removed, by reason (e.g. ``"duplicate row": 12``).
        counted: Rows kept but worth knowing about, by reason (e.g. ``"skipped play (kept as
            signal, not a positive)"``, ``"track without metadata"``).
        users: Distinct listeners after preprocessing (0 when the source has none).
        tracks: Distinct tracks after preprocessing.
        sessions: Distinct sessions (or sequences) after preprocessing.
        time_min: Earliest timestamp (unix seconds) or None.
        time_max: Latest timestamp (unix seconds) or None.
        session_length: Quantiles of the session length (``{"p50": ..}``).
        popularity: Popularity distribution (share of plays on the top 1% tracks, Gini, ...).
        split: Rows / examples per split part (``valid`` / ``test``: evaluation cases).
        protocol: The evaluation protocol: ``split`` kind, ``sequence_by``, ``description``
            and, for the time-based splits, the resolved ``val_cutoff`` / ``test_cutoff`` (ISO,
            UTC) and where they came from (``cutoffs_from``).
        notes: Free-text remarks (e.g. "no play order: item side and counts only").
    """

    source: str = ""
    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    counted: dict[str, int] = field(default_factory=dict)
    users: int = 0
    tracks: int = 0
    sessions: int = 0
    time_min: int | None = None
    time_max: int | None = None
    session_length: dict[str, float] = field(default_factory=dict)
    popularity: dict[str, float] = field(default_factory=dict)
    split: dict[str, int] = field(default_factory=dict)
    protocol: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, count: int) -> None:
        """Record ``count`` rows removed for ``reason`` (no-op for zero)."""
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(count)

    def count(self, reason: str, count: int) -> None:
        """Record ``count`` rows kept but flagged for ``reason`` (no-op for zero)."""
        if count:
            self.counted[reason] = self.counted.get(reason, 0) + int(count)

    @property
    def rows_dropped(self) -> int:
        """Total rows dropped over all reasons."""
        return sum(self.dropped.values())

    def warnings(self) -> list[str]:
        """Problems worth a loud line: too few validation or test queries to measure anything.

        With fewer than :data:`MIN_EVAL_QUERIES` test (or validation) queries a metric moves by
        1/n per query, so differences between runs are noise; e.g. a single listener with
        ``sequence_by: user`` gives one test case.
        """
        if self.protocol.get("split") == "next_in_session":  # one case per session
            advice = "use more data (listeners, a longer log) or earlier cut-offs"
        else:
            advice = "use more data, sequence_by: session, or other cut-offs"
        out = []
        for part, name in (("test", "test"), ("valid", "validation")):
            n = self.split.get(part)
            if n == 0:  # not noise but nothing: training (validation) or evaluate (test) stops
                use = "training has nothing to select on" if part == "valid" else "nothing to test"
                out.append(f"no {name} queries: {use}; {advice}")
            elif n is not None and n < MIN_EVAL_QUERIES:
                out.append(
                    f"only {n:,} {name} queries (fewer than {MIN_EVAL_QUERIES}): its metrics are "
                    f"noise; {advice}"
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (with the :meth:`warnings`, recomputed on load)."""
        return {**asdict(self), "warnings": self.warnings()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataReport:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: v for k, v in d.items() if k != "warnings"})

    def to_json(self) -> str:
        """Pretty JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def format(self) -> str:
        """Human-readable multi-line report."""
        lines = [f"Data report: {self.source}"]
        for f in self.files:
            lines.append(f"  file            {f}")
        lines.append(f"  rows read       {self.rows_read:,}")
        lines.append(f"  rows kept       {self.rows_kept:,}")
        lines.append(f"  rows dropped    {self.rows_dropped:,}")
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"    - {reason}: {n:,}")
        if self.counted:
            lines.append("  kept, flagged:")
            for reason, n in sorted(self.counted.items()):
                lines.append(f"    - {reason}: {n:,}")
        lines.append(f"  users           {self.users:,}")
        lines.append(f"  tracks          {self.tracks:,}")
        lines.append(f"  sessions        {self.sessions:,}")
        lines.append(f"  time range      {_fmt_time(self.time_min)} .. {_fmt_time(self.time_max)}")
        if self.session_length:
            q = "  ".join(f"{k}={v:g}" for k, v in self.session_length.items())
            lines.append(f"  session length  {q}")
        if self.popularity:
            q = "  ".join(f"{k}={v:.3g}" for k, v in self.popularity.items())
            lines.append(f"  popularity      {q}")
        if self.protocol:
            pr = self.protocol
            lines.append(f"  protocol        {pr.get('split', '?')}: {pr.get('description', '')}")
            if "val_cutoff" in pr:
                lines.append(
                    f"  cut-offs        validation from {pr['val_cutoff']}, test from "
                    f"{pr.get('test_cutoff', '?')} ({pr.get('cutoffs_from', '')})"
                )
        if self.split:
            q = "  ".join(f"{k}={v:,}" for k, v in self.split.items())
            lines.append(f"  split           {q}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        for warning in self.warnings():
            lines.append(f"  WARNING: {warning}")
        return "\n".join(lines)
