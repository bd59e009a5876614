"""``twotower evaluate``: the model and the baselines on one split, one metric code, one table.

Every row of the table is scored against the full catalogue by :mod:`twotower.metrics` on the
same queries (the validation or test :class:`~twotower.data.prepared.EvalSet`), with the same
seen-item filtering, so rows are comparable and a paired bootstrap of their difference is valid.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from twotower.data.prepared import EvalSet, PreparedData
from twotower.metrics import (
    MAX_CHUNK_ELEMENTS,
    bootstrap_cis,
    coverage_at_k,
    mean_popularity,
    paired_diff,
    per_query_metrics,
    rank_and_topk_from_scores,
)
from twotower.query import spec_of

log = logging.getLogger("twotower")

#: Metric used for the paired comparison of the model against the best baseline.
PAIRED_METRIC = "ndcg@10"


class Scorer(Protocol):
    """Anything that scores the whole catalogue for queries of an EvalSet (model or baseline)."""

    name: str
    num_items: int
    fit_seconds: float

    def score(self, eval_set: EvalSet, rows: slice) -> Tensor:
        """Scores ``[b, V]`` for queries ``rows`` of ``eval_set``."""
        ...


# ------------------------------------------------------------------------------ the model
class EmbeddingScorer:
    """Scores = query vectors @ item vectors, for a trained two-tower module.

    Item vectors are computed once; query vectors per chunk from the left-padded last
    ``max_len`` history items (plus user, hour and context when the module uses them), built
    by the query contract (:mod:`twotower.query`).

    Args:
        module: A ``TwoTowerModule``: ``query_tower(QueryBatch)`` and
            ``item_embeddings()`` (or an ``item_tower`` with an ``id_embedding``).
        name: Row name in the table.
        device: Where to run (None: CUDA when available, else CPU).
        fit_seconds: Training wall time, for the table (0 when unknown).
    """

    def __init__(
        self,
        module: Any,
        name: str = "two-tower",
        device: str | torch.device | None = None,
        fit_seconds: float = 0.0,
    ) -> None:
        self.name = name
        self.fit_seconds = fit_seconds
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.module = module.to(self.device).eval()
        self.query_tower = module.query_tower
        self.item_emb = self._item_embeddings()  # [V, d]
        self.num_items = int(self.item_emb.shape[0])
        self.spec = spec_of(self.query_tower)

    @torch.no_grad()
    def _item_embeddings(self, batch: int = 65536) -> Tensor:
        if hasattr(self.module, "item_embeddings"):
            return self.module.item_embeddings().float()  # [V, d]
        tower = self.module.item_tower
        num_items = int(tower.id_embedding.num_embeddings)
        parts = [
            tower(torch.arange(s, min(s + batch, num_items), device=self.device)).float()
            for s in range(0, num_items, batch)
        ]
        return torch.cat(parts)  # [V, d]

    @torch.no_grad()
    def query_embeddings(self, eval_set: EvalSet, rows: slice) -> Tensor:
        """Query vectors ``[b, d]`` of queries ``rows``."""
        query = self.spec.build_from(eval_set, rows).to(self.device)
        return self.query_tower(query).float()  # [b, d]

    def score(self, eval_set: EvalSet, rows: slice) -> Tensor:
        """Dot products of the chunk's query vectors with every item vector, ``[b, V]``."""
        return self.query_embeddings(eval_set, rows) @ self.item_emb.T  # [b, V]


# ------------------------------------------------------------------------------- the table
@dataclass
class EvalRow:
    """One model or baseline in an :class:`EvalTable`.

    Attributes:
        name: Row label.
        kind: ``"model"``, ``"baseline"`` or ``"peer"`` (a number measured elsewhere).
        metrics: Metric -> ``(mean, lo, hi)`` (95% bootstrap interval; NaN bounds for peers).
        coverage: Share of the catalogue in at least one top-``cutoff`` list.
        mean_popularity: Mean training count of the top-``cutoff`` items.
        fit_seconds: Training (or fit + tuning) wall time, NaN when unknown.
        params: Hyper-parameters worth showing.
        per_query: Per-query metric values (not serialised; for paired comparisons).
        ranks: 0-based target rank per query (not serialised; for Recall@K curves).
    """

    name: str
    kind: str
    metrics: dict[str, tuple[float, float, float]]
    coverage: float = float("nan")
    mean_popularity: float = float("nan")
    fit_seconds: float = float("nan")
    params: dict[str, Any] = field(default_factory=dict)
    per_query: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    ranks: np.ndarray | None = field(default=None, repr=False)


@dataclass
class EvalTable:
    """Rows = model and baselines; columns = metrics with 95% intervals, coverage, popularity, time.

    Attributes:
        split: ``"valid"`` or ``"test"``.
        ks: Cut-offs.
        filter_seen: Whether already-seen items were removed from the rankings.
        num_queries: Queries evaluated (cold targets included as misses).
        num_items: Catalogue size (real items, reserved indices excluded).
        cold_targets: Queries whose target never occurs in training (a miss for every row).
        cutoff: List length of the coverage and popularity columns.
        rows: The rows.
        paired: First model row minus best baseline on :data:`PAIRED_METRIC`: ``{"model",
            "baseline", "metric", "diff", "lo", "hi"}``, or None without a model and a baseline.
        paired_all: The same comparison for every model row, in row order (``paired`` first).
        bootstrap: Resamples used for the intervals.
        dataset: Free-text dataset label.
    """

    split: str
    ks: tuple[int, ...]
    filter_seen: bool
    num_queries: int
    num_items: int
    cold_targets: int
    cutoff: int
    rows: list[EvalRow]
    paired: dict[str, Any] | None = None
    paired_all: list[dict[str, Any]] = field(default_factory=list)
    bootstrap: int = 1000
    dataset: str = ""

    def row(self, name: str) -> EvalRow:
        """The row called ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    def columns(self) -> list[str]:
        """Metric columns shown in the table (all are in the JSON)."""
        cols = []
        for k in self.ks:
            cols += [f"recall@{k}", f"ndcg@{k}"]
        cols.append(f"mrr@{self.ks[-1]}")
        return cols

    def to_markdown(self, columns: Sequence[str] | None = None) -> str:
        """Padded Markdown table (readable as plain text), the paired difference below it."""
        cols = list(columns or self.columns())
        head = ["model", *cols, f"coverage@{self.cutoff}", f"mean pop@{self.cutoff}", "fit s"]
        body = []
        for r in self.rows:
            cells = [r.name if r.kind != "peer" else f"{r.name} (peer)"]
            for c in cols:
                cells.append(_fmt_ci(*r.metrics[c]) if c in r.metrics else "")
            cells.append(_fmt_num(r.coverage, 3))
            cells.append(_fmt_num(r.mean_popularity, 1))
            cells.append(_fmt_num(r.fit_seconds, 1))
            body.append(cells)
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        lines = [
            "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        ]
        for cells in body:
            lines.append(
                "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
            )
        seen = "seen items filtered" if self.filter_seen else "seen items kept"
        lines.append("")
        lines.append(
            f"{self.dataset + ': ' if self.dataset else ''}split={self.split}, "
            f"{self.num_queries:,} queries ({self.cold_targets:,} cold targets counted as misses), "
            f"{self.num_items:,} items ranked in full, {seen}; recall@K = HR@K (one target per "
            f"query); 95% bootstrap intervals over queries ({self.bootstrap} resamples)."
        )
        for p in self.paired_all:
            lines.append(
                f"Paired difference {p['model']} - {p['baseline']} on {p['metric']}: "
                f"{p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (per-query arrays left out)."""
        return {
            "split": self.split,
            "dataset": self.dataset,
            "ks": list(self.ks),
            "filter_seen": self.filter_seen,
            "num_queries": self.num_queries,
            "num_items": self.num_items,
            "cold_targets": self.cold_targets,
            "cutoff": self.cutoff,
            "bootstrap": self.bootstrap,
            "rows": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "metrics": {
                        m: {"mean": v[0], "lo": v[1], "hi": v[2]} for m, v in r.metrics.items()
                    },
                    f"coverage@{self.cutoff}": r.coverage,
                    f"mean_popularity@{self.cutoff}": r.mean_popularity,
                    "fit_seconds": r.fit_seconds,
                    "params": r.params,
                }
                for r in self.rows
            ],
            "paired": self.paired,
            "paired_all": self.paired_all,
        }

    def to_json(self) -> str:
        """Pretty JSON (NaN written as null)."""
        return json.dumps(_nan_to_none(self.to_dict()), indent=2)


def _fmt_ci(mean: float, lo: float, hi: float) -> str:
    if np.isnan(mean):
        return ""
    if np.isnan(lo):
        return f"{mean:.4f}"
    return f"{mean:.4f} [{lo:.4f}, {hi:.4f}]"


def _fmt_num(x: float, digits: int) -> str:
    return "" if x is None or np.isnan(x) else f"{x:.{digits}f}"


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and np.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nan_to_none(v) for v in x]
    return x


# ----------------------------------------------------------------------------- evaluation
def score_row(
    scorer: Scorer,
    eval_set: EvalSet,
    item_counts: np.ndarray,
    ks: Sequence[int],
    filter_seen: bool,
    kind: str,
    cutoff: int,
    chunk_size: int = 1024,
) -> EvalRow:
    """Ranks, per-query metrics, coverage and popularity of one scorer (intervals added later)."""
    start = time.perf_counter()
    exclude = (eval_set.seen, eval_set.seen_offsets) if filter_seen else None
    ranks, topk = rank_and_topk_from_scores(
        lambda rows: scorer.score(eval_set, rows),
        eval_set.targets,
        exclude=exclude,
        k=cutoff,
        chunk_size=min(chunk_size, max(1, MAX_CHUNK_ELEMENTS // max(scorer.num_items, 1))),
    )
    assert topk is not None
    per_query = per_query_metrics(ranks, ks)
    log.info(
        "scored %s on %d queries in %.1fs", scorer.name, len(eval_set), time.perf_counter() - start
    )
    params = scorer.params() if hasattr(scorer, "params") else {}
    return EvalRow(
        name=scorer.name,
        kind=kind,
        metrics={},
        coverage=coverage_at_k(topk, scorer.num_items),
        mean_popularity=mean_popularity(topk, item_counts),
        fit_seconds=float(getattr(scorer, "fit_seconds", float("nan"))),
        params=params,
        per_query=per_query,
        ranks=ranks.numpy(),
    )


def evaluate_scorers(
    scorers: Sequence[tuple[Scorer, str]],
    data: PreparedData,
    split: str = "test",
    ks: Sequence[int] = (10, 20, 50),
    filter_seen: bool | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    dataset: str = "",
    cutoff: int | None = None,
) -> EvalTable:
    """Score every ``(scorer, kind)`` on the same split and build the table.

    Args:
        scorers: ``(scorer, kind)`` pairs, kind ``"model"`` or ``"baseline"``.
        data: Prepared data (its ``item_counts`` give the popularity column).
        split: ``"valid"`` or ``"test"``.
        ks: Cut-offs.
        filter_seen: Remove already-seen items (None: ``data.params["filter_seen"]``).
        bootstrap: Resamples for the 95% intervals (same query resamples for every row).
        seed: Bootstrap seed.
        dataset: Label for the table.
        cutoff: List length of the coverage and popularity columns (default 10 when 10 is
            among ``ks``, else the smallest cut-off).
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"cut-offs must be positive integers, got {ks}")
    if filter_seen is None:
        filter_seen = bool(data.params.get("filter_seen", False))
    eval_set: EvalSet = getattr(data, split)
    if len(eval_set) == 0:
        raise ValueError(f"the {split} split has no queries; nothing to evaluate")
    if cutoff is None:
        cutoff = 10 if 10 in ks else ks[0]
    rows = [
        score_row(s, eval_set, data.item_counts, ks, filter_seen, kind, cutoff)
        for s, kind in scorers
    ]
    for r in rows:
        # same seed -> the same resampled queries for every row
        r.metrics = bootstrap_cis(r.per_query, n=bootstrap, seed=seed)
    table = EvalTable(
        split=split,
        ks=ks,
        filter_seen=filter_seen,
        num_queries=len(eval_set),
        num_items=data.num_items - 2,
        cold_targets=int(np.isin(eval_set.targets, (0, 1)).sum()),
        cutoff=cutoff,
        rows=rows,
        bootstrap=bootstrap,
        dataset=dataset,
    )
    table.paired_all = paired_vs_best_baseline(table, bootstrap=bootstrap, seed=seed)
    table.paired = table.paired_all[0] if table.paired_all else None
    return table


def paired_vs_best_baseline(
    table: EvalTable, metric: str | None = None, bootstrap: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Paired bootstrap of (each model row) - (best baseline row) on ``metric``, in row order.

    Args:
        table: A table whose rows still hold their per-query values.
        metric: Default :data:`PAIRED_METRIC`, or NDCG at the first cut-off when 10 is absent.
        bootstrap: Resamples.
        seed: Seed.
    """
    metric = metric or (PAIRED_METRIC if 10 in table.ks else f"ndcg@{table.ks[0]}")
    models = [r for r in table.rows if r.kind == "model" and metric in r.per_query]
    bases = [r for r in table.rows if r.kind == "baseline" and metric in r.per_query]
    if not models or not bases:
        return []
    best = max(bases, key=lambda r: float(r.per_query[metric].mean()))
    out = []
    for model in models:
        diff, lo, hi = paired_diff(
            model.per_query[metric], best.per_query[metric], n=bootstrap, seed=seed
        )
        out.append(
            {
                "model": model.name,
                "baseline": best.name,
                "metric": metric,
                "diff": diff,
                "lo": lo,
                "hi": hi,
            }  # fmt: skip
        )
    return out


def evaluate_model(
    module: Any,
    data: PreparedData,
    split: str = "test",
    ks: Sequence[int] = (10, 20, 50),
    filter_seen: bool | None = None,
    baselines: bool | Sequence[str] = False,
    bootstrap: int = 1000,
    seed: int = 0,
    fit_seconds: float = float("nan"),
    name: str = "two-tower",
    dataset: str = "",
) -> EvalTable:
    """The model (and optionally the baselines, fitted on ``data.train``) on one split.

    Args:
        module: A ``TwoTowerModule`` (wrapped in :class:`EmbeddingScorer`) or any object with
            ``name``, ``num_items`` and ``score(eval_set, rows)`` (a :class:`Scorer`); None
            evaluates the baselines alone.
        data: Prepared data.
        split: ``"valid"`` or ``"test"``.
        ks: Cut-offs.
        filter_seen: Remove already-seen items (None: the data config's choice).
        baselines: True for all of :data:`~twotower.baselines.BASELINES` (ALS skipped with a
            warning when ``implicit`` is missing), or a list of names.
        bootstrap: Resamples for the intervals.
        seed: Bootstrap seed.
        fit_seconds: Model training wall time for the table.
        name: Model row name.
        dataset: Label for the table.
    """
    if filter_seen is None:
        filter_seen = bool(data.params.get("filter_seen", False))
    scorers: list[tuple[Scorer, str]] = []
    if module is not None:
        if hasattr(module, "score") and hasattr(module, "num_items"):
            scorer = module
        else:
            if np.isnan(fit_seconds) and getattr(module, "train_seconds", 0.0):
                fit_seconds = float(module.train_seconds)
            scorer = EmbeddingScorer(module, name=name, fit_seconds=fit_seconds)
        if scorer.num_items != data.num_items:
            raise ValueError(
                f"the model scores {scorer.num_items} items but the data's vocabulary has "
                f"{data.num_items}: checkpoint and data do not match"
            )
        scorers.append((scorer, "model"))
    if baselines:
        from twotower.baselines import BASELINES, fit_baselines

        names = BASELINES if baselines is True else tuple(baselines)
        for b in fit_baselines(data, names, filter_seen=filter_seen):
            scorers.append((b, "baseline"))
    if not scorers:
        raise ValueError("nothing to evaluate: no model and no baselines")
    return evaluate_scorers(
        scorers, data, split, ks, filter_seen, bootstrap=bootstrap, seed=seed, dataset=dataset
    )


def evaluate_checkpoint(
    checkpoint_path: str | Path | Sequence[str | Path],
    split: str = "test",
    ks: Sequence[int] = (10, 20, 50),
    filter_seen: bool | None = None,
    baselines: bool | Sequence[str] = False,
    bootstrap: int = 1000,
    seed: int = 0,
    data_args: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> EvalTable:
    """Rebuild the data module and the model from a Lightning checkpoint and evaluate them.

    ``data_args`` maps the checkpoint's DataModule arguments to the ones to evaluate on
    (``twotower evaluate --data.path P``: the same data moved elsewhere).

    The checkpoint is read with ``weights_only=True`` (no pickle); its
    ``datamodule_hyper_parameters`` rebuild the :class:`TwoTowerDataModule`, whose cached
    :class:`PreparedData` gives the split. Several checkpoints (same data) are evaluated as one
    ensemble model (:class:`~twotower.model.ensemble.EnsembleModel`, as ``export.py`` would
    serve them); the data come from the first.

    Raises:
        FileNotFoundError: No such checkpoint.
        ValueError: The checkpoint lacks the data-module hyper-parameters.
    """
    from twotower.data.datamodule import TwoTowerDataModule
    from twotower.model.module import TwoTowerModule

    paths = (
        [Path(checkpoint_path)]
        if isinstance(checkpoint_path, (str, Path))
        else [Path(p) for p in checkpoint_path]
    )
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
    path = paths[0]
    from twotower.export import load_checkpoint_dict

    ckpt = load_checkpoint_dict(path)  # weights_only=True; refusals become ArtifactError
    dm_hparams = ckpt.get("datamodule_hyper_parameters")
    if not dm_hparams:
        raise ValueError(
            f"{path}: no 'datamodule_hyper_parameters' (was it written by twotower's train.py?)"
        )
    dm_args = _init_kwargs(TwoTowerDataModule, dict(dm_hparams))
    if data_args is not None:
        dm_args = data_args(dm_args)
    datamodule = TwoTowerDataModule(**dm_args)
    data = datamodule.data if getattr(datamodule, "data", None) is not None else None
    if data is None:
        datamodule.prepare_data()
        datamodule.setup("fit")
        data = datamodule.data
    modules = [
        TwoTowerModule.load_from_checkpoint(p, map_location="cpu", weights_only=True) for p in paths
    ]
    module: Any = modules[0]
    fit_seconds = float(ckpt.get("train_seconds", float("nan")) or float("nan"))
    if len(modules) > 1:
        from twotower.model.ensemble import EnsembleModel, check_members

        check_members(paths, modules)
        module = EnsembleModel(modules)
        fit_seconds = sum(float(m.train_seconds) for m in modules)
    return evaluate_model(
        module,
        data,
        split=split,
        ks=ks,
        filter_seen=filter_seen,
        baselines=baselines,
        bootstrap=bootstrap,
        seed=seed,
        fit_seconds=fit_seconds,
        dataset=str(data.report.source or ""),
        name="two-tower" if len(modules) == 1 else f"two-tower ensemble of {len(modules)}",
    )


def _init_kwargs(cls: type, hparams: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``hparams`` that ``cls.__init__`` accepts.

    LightningCLI adds private keys such as ``_instantiator`` to the saved hyper-parameters.
    """
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in hparams.items() if not k.startswith("_")}
    return {k: v for k, v in hparams.items() if k in params and k != "self"}


def parse_ks(text: str) -> tuple[int, ...]:
    """``"10,20,50"`` -> ``(10, 20, 50)`` with a clear error for anything else."""
    try:
        ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ValueError(f"--ks expects comma-separated positive integers, got {text!r}") from e
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks expects comma-separated positive integers, got {text!r}")
    return ks


def evaluate_main(args: argparse.Namespace) -> int:
    """What ``twotower evaluate`` runs: print the table, optionally write JSON.

    Config options (``--config``, ``--data.KEY``) change the checkpoint's data options, read
    as ``train.py`` reads them (:func:`twotower.config.parse_on_data`).
    """
    filter_seen = {"auto": None, "yes": True, "no": False}[args.filter_seen]
    config_args = getattr(args, "config_args", None)
    data_args = None
    if config_args is not None and config_args.given:
        from twotower.config import data_section, parse_on_data, warn_unused

        warn_unused(config_args, "evaluate")

        def data_args(ckpt_args: dict[str, Any]) -> dict[str, Any]:
            ns = parse_on_data(ckpt_args, config_args.files, config_args.overrides)
            return data_section(ns)[1]

    table = evaluate_checkpoint(
        args.checkpoint,
        split=args.split,
        ks=parse_ks(args.ks),
        filter_seen=filter_seen,
        baselines=bool(args.baselines),
        bootstrap=int(args.bootstrap),
        data_args=data_args,
    )
    print(table.to_markdown())
    if args.json:
        Path(args.json).write_text(table.to_json())
    return 0


# ----------------------------------------------------------------- split-wide recommendations
def write_split_recommendations(
    retriever: Any, out: str | Path, k: int = 10, split: str = "test"
) -> int:
    """Top-``k`` of every query of a split (rebuilt from the export's data) to Parquet.

    Batch evaluation over an artifact: ``retriever`` is a :class:`twotower.retrieve.Retriever`.

    Columns: query (row of the split), user_id, target, rank, track_id, score.

    Returns:
        The number of queries.

    Raises:
        ArtifactError: The export does not record its data, or the data changed since.
    """
    from twotower.artifact import ArtifactError
    from twotower.data.datamodule import datamodule_from_hparams

    data_info = retriever.manifest.get("data") or {}
    dm_hp = data_info.get("datamodule")
    if not dm_hp:
        raise ArtifactError(f"{retriever.path}: the manifest records no data configuration")
    on_disk = dm_hp.get("prepared") or dm_hp.get("cache_dir", ".cache/twotower")
    data = datamodule_from_hparams({**dm_hp, "streaming": bool(on_disk)}).data  # cases only
    if data.fingerprint != data_info.get("fingerprint"):
        raise ArtifactError(
            f"{retriever.path}: the data changed since export (fingerprint "
            f"{data.fingerprint[:12]} != {str(data_info.get('fingerprint'))[:12]})"
        )
    ev = getattr(data, split)
    query = retriever.spec.build_from(ev)  # the query contract, as the service builds it
    users = np.asarray(["", "", *data.user_vocab.ids], dtype=object)
    targets = np.asarray(["<pad>", "<oov>", *data.item_vocab.ids], dtype=object)
    query_of, ranks, rows_all, scores_all = [], [], [], []
    for s in range(0, len(query), 4096):
        with torch.inference_mode():
            q = retriever.query_tower(query[s : s + 4096]).float().numpy()  # [b, d]
        excl = [np.zeros(0, dtype=np.int64)] * len(q)
        if retriever.filter_seen:
            excl = [
                ev.seen[ev.seen_offsets[i] : ev.seen_offsets[i + 1]] - 2
                for i in range(s, s + len(q))
            ]
        for j, (rows, scores) in enumerate(retriever._search(q, k, excl)):
            query_of.append(np.full(len(rows), s + j, dtype=np.int64))
            ranks.append(np.arange(1, len(rows) + 1, dtype=np.int64))
            rows_all.append(rows)
            scores_all.append(scores)
    query = np.concatenate(query_of) if query_of else np.zeros(0, np.int64)
    rows = np.concatenate(rows_all) if rows_all else np.zeros(0, np.int64)
    table = pd.DataFrame(
        {
            "query": query,
            "user_id": pd.Series(users[ev.users[query]], dtype="string"),
            "target": pd.Series(targets[ev.targets[query]], dtype="string"),
            "rank": np.concatenate(ranks) if ranks else np.zeros(0, np.int64),
            "track_id": pd.Series(retriever.ids[rows], dtype="string"),
            "score": np.concatenate(scores_all).astype(np.float32)
            if scores_all
            else np.zeros(0, np.float32),
        }
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out, index=False)
    return len(ev)  # queries (the table has up to k rows each)


def split_out_main(args: argparse.Namespace) -> int:
    """``twotower recommend --split-out FILE``: every test query's top-k of an artifact."""
    from twotower.artifact import ArtifactError
    from twotower.retrieve import Retriever

    try:
        n = write_split_recommendations(Retriever.load(args.artifacts), args.split_out, k=args.k)
    except ArtifactError as e:
        print(f"twotower recommend: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote top-{args.k} of {n} test queries to {args.split_out}")
    return 0
