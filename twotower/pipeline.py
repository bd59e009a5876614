"""``twotower pipeline``: data report -> train -> evaluate with baselines -> export -> samples.

One command, one run folder with a record of everything::

    runs/<name>/
      config.yaml          resolved training config (what LightningCLI parsed)
      data_report.txt/json the data report (rows read, kept, dropped by reason, split sizes)
      lineage.json         input files + fingerprint, config, code version, package versions,
                           seed, command line, host, start/end times, stage timings
      metrics.md/json      test-split table: the model and the baselines with 95% intervals
      tensorboard/         TensorBoard logs of the training run
      checkpoints/         best (by val/ndcg@10) and last checkpoints
      artifacts/           the export (FAISS index, query tower + query_tower.onnx, listener
                           vectors user_embeddings.npy + users.parquet, manifest with the
                           same lineage; --no-onnx / --no-users leave them out)
      samples.md           a few held-out listeners: history tail, top-10, the true next track
      pipeline.log         the progress log

``metrics.json`` holds only what data, config and seed determine (wall times live in
``lineage.json``), so two CPU runs with the same seed give byte-identical files. Preprocessing is
cached by :func:`twotower.data.pipeline.prepare_data`; a re-run with unchanged inputs reuses it
(``PipelineResult.cache_hit`` and the log line ``data: reusing cached preprocessing``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from twotower import lineage as lin
from twotower.config import CONFIG_SECTIONS, normalize_overrides, parse_config  # noqa: F401

log = logging.getLogger("twotower")
STAGES = ("data", "train", "evaluate", "export", "samples")
#: Files and folders the pipeline writes; only a folder holding these is replaced by a re-run.
RUN_FILES = (
    "config.yaml",
    "data_report.txt",
    "data_report.json",
    "lineage.json",
    "metrics.md",
    "metrics.json",
    "samples.md",
    "pipeline.log",
    "tensorboard",
    "checkpoints",
    "artifacts",
)


@dataclass
class Sample:
    """Recommendations for one held-out listener.

    Attributes:
        query_id: Listener id (or ``test-N`` for sessions without a listener).
        history: ``(track_id, title, artist)`` of the last events before the target.
        history_length: Events in the full history.
        target: ``(track_id, title, artist)`` of the true next track.
        recs: ``(track_id, title, artist, score)`` of the top-k, best first.
        hit_rank: 1-based position of the true next track in the list, None when absent.
    """

    query_id: str
    history: list[tuple[str, str, str]]
    history_length: int
    target: tuple[str, str, str]
    recs: list[tuple[str, str, str, float]]
    hit_rank: int | None

    def to_markdown(self) -> str:
        """A heading, the history tail and the list with the true next track marked."""

        def name(t: tuple[str, ...]) -> str:
            title = t[1] or t[0]
            return f"{title} ({t[2]})" if t[2] else title

        lines = [f"### listener {self.query_id}", ""]
        tail = "; ".join(name(h) for h in self.history)
        lines.append(
            f"History (last {len(self.history)} of {self.history_length}, oldest first): {tail}"
        )
        lines += ["", "| # | track | title | artist | score | |", "|---|---|---|---|---|---|"]
        for r, (tid, title, artist, score) in enumerate(self.recs, 1):
            mark = "**<- true next**" if tid == self.target[0] else ""
            lines.append(f"| {r} | {tid} | {title} | {artist} | {score:.3f} | {mark} |")
        where = (
            f"at position {self.hit_rank}" if self.hit_rank else f"not in the top {len(self.recs)}"
        )
        lines += ["", f"True next track: {name(self.target)} [{self.target[0]}], {where}.", ""]
        return "\n".join(lines)


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced.

    Attributes:
        run_dir: The run folder (absolute).
        metrics: Contents of ``metrics.json`` (the test-split table, no wall times).
        table: The evaluation table (with per-query values, for paired comparisons).
        checkpoint: The checkpoint that was evaluated and exported (best by validation).
        artifacts: The artifact folder.
        lineage: Contents of ``lineage.json``.
        cache_path: Folder of the cached preprocessing (None when caching is off).
        cache_hit: Whether the preprocessing was read from the cache.
        samples: Recommendations for a few held-out listeners.
        stage_seconds: Wall time per stage.
    """

    run_dir: Path
    metrics: dict[str, Any]
    table: Any
    checkpoint: Path
    artifacts: Path
    lineage: dict[str, Any]
    cache_path: Path | None
    cache_hit: bool
    samples: list[Sample] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------ helpers
def split_overrides(
    overrides: Mapping[str, Any] | Sequence[str] | None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Overrides -> (training overrides with dotted keys, data overrides for the report).

    Accepts what :func:`twotower.config.normalize_overrides` does: a mapping, ``KEY=VALUE``
    strings (``--set``) or ``--key=value`` tokens. Keys whose first part is not a config
    section (:data:`CONFIG_SECTIONS`) are data options.

    Raises:
        ValueError: A ``KEY=VALUE`` string without ``=``.
    """
    fit_over: dict[str, str] = {}
    data_over: dict[str, str] = {}
    for key, value in normalize_overrides(overrides).items():
        text = value if isinstance(value, str) else json.dumps(value)
        fit_over[key] = text
        if key.startswith("data."):
            data_over[key.removeprefix("data.")] = text
    return fit_over, data_over


def _prepare_run_dir(out: Path) -> None:
    """Create ``out``; a previous pipeline run there is replaced, anything else refused."""
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out}: exists and is not a folder")
        names = {p.name for p in out.iterdir()}
        if names and not (out / lin.LINEAGE_FILE).exists() and names - set(RUN_FILES):
            raise ValueError(
                f"--out {out}: folder exists and is not a pipeline run folder (no lineage.json); "
                "choose another --out"
            )
        if names:
            log.warning("replacing the previous run in %s", out)
        for name in RUN_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Copy the ``twotower`` log (INFO and above) into ``path`` while the block runs."""
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("twotower")
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()


class _Stages:
    """Numbered progress lines and wall time per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        i = STAGES.index(name) + 1
        log.info("[%d/%d] %s: %s", i, len(STAGES), name, what)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        log.info("[%d/%d] %s done in %.1f s", i, len(STAGES), name, self.seconds[name])


def metrics_document(table: Any) -> dict[str, Any]:
    """``metrics.json``: the table as JSON without wall-clock fields (reproducible exactly)."""
    doc = json.loads(table.to_json())
    for row in doc["rows"]:
        row.pop("fit_seconds", None)
    return doc


def _seeds(resolved: dict[str, Any]) -> dict[str, Any]:
    data = resolved.get("data") or {}
    if isinstance(data, dict) and "init_args" in data:
        data = data["init_args"] or {}
    return {"seed_everything": resolved.get("seed_everything"), "data.seed": data.get("seed")}


# ------------------------------------------------------------------------------ samples
def sample_recommendations(artifacts: str | Path, n: int = 5, k: int = 10) -> list[Sample]:
    """Top-``k`` for ``n`` held-out listeners of an artifact (evenly spaced, deterministic).

    Uses ``holdout.parquet`` (test examples with raw ids) and the served path
    (:class:`~twotower.retrieve.Retriever`), excluding the history when the data filters seen
    items.
    """
    from twotower.export import HOLDOUT_FILE
    from twotower.retrieve import Retriever

    artifacts = Path(artifacts)
    if n <= 0 or not (artifacts / HOLDOUT_FILE).is_file():
        return []
    holdout = pd.read_parquet(artifacts / HOLDOUT_FILE)
    if holdout.empty:
        return []
    retriever = Retriever.load(artifacts)
    rows = np.unique(np.linspace(0, len(holdout) - 1, min(n, len(holdout))).round().astype(int))
    exclude = "history" if retriever.filter_seen else None
    meta = {
        t: (t, ti, a)
        for t, ti, a in zip(retriever.ids, retriever.titles, retriever.artists, strict=True)
    }
    out = []
    for i in rows:
        r = holdout.iloc[int(i)]
        history = [str(h) for h in r["history"]]
        context: dict[str, Any] = {}
        if int(r["hour"]) >= 0:
            context["hour"] = int(r["hour"])
        if isinstance(r["context_type"], str) and r["context_type"] in retriever.context_index:
            context["context_type"] = r["context_type"]
        if str(r["query_id"]) in retriever.user_index:
            context["user"] = str(r["query_id"])
        rec = retriever.recommend(history, k=k, exclude=exclude, context=context or None)
        target = str(r["target"])
        hit = next((j + 1 for j, t in enumerate(rec.ids) if t == target), None)
        out.append(
            Sample(
                query_id=str(r["query_id"]),
                history=[meta.get(h, (h, "", "")) for h in history[-5:]],
                history_length=len(history),
                target=meta.get(target, (target, "", "")),
                recs=list(zip(rec.ids, rec.titles, rec.artists, rec.scores, strict=True)),
                hit_rank=hit,
            )
        )
    return out


def samples_markdown(samples: Sequence[Sample], k: int = 10) -> str:
    """``samples.md``: every sample, with the hit count on top."""
    hits = sum(s.hit_rank is not None for s in samples)
    head = [
        "# Sample recommendations for held-out listeners",
        "",
        f"{len(samples)} test examples (evenly spaced over the split); the true next track is "
        f"in the top {k} for {hits} of them.",
        "",
    ]
    return "\n".join(head + [s.to_markdown() for s in samples])


# ------------------------------------------------------------------------------ the pipeline
def run_pipeline(
    config_paths: Sequence[str | Path],
    out: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    baselines: bool | Sequence[str] = True,
    index: str = "auto",
    sample: int = 5,
    ks: Sequence[int] = (10, 20, 50),
    bootstrap: int = 1000,
    onnx: bool | None = None,
    users: bool = True,
    command: Sequence[str] | None = None,
) -> PipelineResult:
    """Data report -> train -> evaluate (with baselines, test split) -> export -> samples.

    Args:
        config_paths: Training configs (later files override earlier ones).
        out: Run folder (default ``runs/<name of the last config>``); a previous pipeline run
            there is replaced, any other non-empty folder refused.
        overrides: ``{"trainer.max_epochs": 1, "data.path": ...}`` or ``["key=value", ...]``;
            keys without a config section are data options.
        baselines: True for every baseline, False for none, or a list of names.
        index: FAISS index of the export (``auto``, ``Flat``, ``HNSW32``, ...).
        sample: Held-out listeners shown in ``samples.md`` (0: none).
        ks: Cut-offs of the metrics table.
        bootstrap: Resamples of the 95% intervals.
        onnx: Export the query tower as ONNX (``query_tower.onnx``, checked against torch):
            None (default) when ``onnx`` and ``onnxruntime`` are installed (the ``onnx``
            extra; a warning otherwise), True always (an error without them), False never.
        users: Export every listener's latest query vector (``user_embeddings.npy`` +
            ``users.parquet``); skipped with a log line when the data has no listener ids.
        command: Command line for the lineage (default ``sys.argv``).

    Returns:
        The run's metrics, paths, lineage and samples.

    Raises:
        DataError: Bad input data or data options.
        ValueError: ``out`` is a folder that is not a pipeline run.
    """
    if not config_paths:
        raise ValueError("run_pipeline needs at least one config")
    for p in config_paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"config not found: {p}")
    fit_over, data_over = split_overrides(overrides)
    parse_config([str(p) for p in config_paths], fit_over)  # unknown keys fail here, not later
    root = fit_over.pop("trainer.default_root_dir", None)
    if root is not None and out is not None and Path(root).resolve() != Path(out).resolve():
        raise ValueError(f"--trainer.default_root_dir {root} and --out {out} differ; give one")
    out = out if out is not None else root
    run = (Path(out) if out is not None else Path("runs") / Path(config_paths[-1]).stem).resolve()
    train_over = train_overrides(run, fit_over)
    _prepare_run_dir(run)
    lineage = lin.new_lineage(config_paths, fit_over, command)
    lineage["run_dir"] = str(run)
    stages = _Stages()
    with _log_to(run / "pipeline.log"):
        log.info("pipeline: run folder %s (run id %s)", run, lineage["run_id"])
        result = _run(
            run,
            config_paths,
            train_over,
            data_over,
            lineage,
            stages,
            baselines,
            index,
            sample,
            ks,
            bootstrap,
            onnx,
            users,
        )
        lineage["finished"] = lin.now_iso()
        lineage["stages"] = stages.seconds
        lin.write_lineage(run / lin.LINEAGE_FILE, lineage)
        total = sum(stages.seconds.values())
        log.info(
            "pipeline: done in %.1f s (%s); results in %s",
            total,
            ", ".join(f"{k} {v:.1f} s" for k, v in stages.seconds.items()),
            run,
        )
    result.stage_seconds = dict(stages.seconds)
    return result


def _run(
    run: Path,
    config_paths: Sequence[str | Path],
    train_over: dict[str, Any],
    data_over: dict[str, str],
    lineage: dict[str, Any],
    stages: _Stages,
    baselines: bool | Sequence[str],
    index: str,
    sample: int,
    ks: Sequence[int],
    bootstrap: int,
    onnx: bool | None,
    users: bool,
) -> PipelineResult:
    from twotower.config import load_data_config
    from twotower.data.pipeline import _input_files, cache_path, prepare_data

    paths = [str(p) for p in config_paths]
    # 1. data
    with stages.stage("data", "load, validate, sessionize, split (cached)"):
        cfg = load_data_config(paths, data_over)
        folder = cache_path(cfg)
        cache_hit = folder is not None and folder.is_dir()
        data = prepare_data(cfg, log_report=False)  # printed below
        if cache_hit:
            log.info("data: reusing cached preprocessing at %s", folder)
        elif folder is not None:
            log.info("data: preprocessed and cached at %s", folder)
        report = data.report
        (run / "data_report.txt").write_text(report.format() + "\n")
        (run / "data_report.json").write_text(report.to_json() + "\n")
        print(report.format())
        lineage["data"] = {
            "format": cfg.format,
            "path": cfg.path,
            "options": cfg.options,
            "source": report.source,
            "fingerprint": data.fingerprint,
            "cache": str(folder) if folder is not None else None,
            "cache_hit": cache_hit,
            "files": lin.input_files(_input_files(cfg)),
        }

    # 2. train
    with stages.stage("train", "fit the two-tower model"):
        from twotower.model.callbacks import HP_TEST_METRICS, default_callbacks
        from twotower.train import fit

        # the hparams view also declares the test figures, written after evaluation
        callbacks = default_callbacks(extra_hp_metrics=tuple(HP_TEST_METRICS))
        trainer, module, dm = fit(paths, train_over, callbacks=callbacks)
        if dm.data.fingerprint != data.fingerprint:
            raise ValueError(
                "the training data differ from the data report's (fingerprint "
                f"{dm.data.fingerprint[:12]} != {data.fingerprint[:12]}): check --set data.*"
            )
        resolved = _copy_config(run, trainer)
        lineage["config"]["resolved"] = "config.yaml" if resolved else None
        if resolved:
            lineage["config"]["resolved_sha256"] = lin.sha256_file(run / "config.yaml")
            lineage["seed"] = _seeds(yaml.safe_load((run / "config.yaml").read_text()) or {})
        checkpoint = _best_checkpoint(run, trainer)
        lineage["checkpoint"] = {
            "path": Path(os.path.relpath(checkpoint, run)).as_posix(),
            "sha256": lin.sha256_file(checkpoint),
        }
        train_seconds = float(module.train_seconds)

    # 3. evaluate
    with stages.stage("evaluate", "model and baselines on the test split"):
        from twotower.evaluate import evaluate_model
        from twotower.model.module import TwoTowerModule

        best = TwoTowerModule.load_from_checkpoint(
            checkpoint, map_location="cpu", weights_only=True
        )
        table = evaluate_model(
            best,
            dm.data,
            split="test",
            ks=ks,
            baselines=baselines,
            bootstrap=bootstrap,
            seed=0,
            fit_seconds=train_seconds,
            dataset=str(dm.data.report.source or ""),
        )
        metrics = metrics_document(table)
        (run / "metrics.md").write_text(table.to_markdown() + "\n")
        (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(table.to_markdown())
        _log_test_hp_metrics(trainer, metrics)

    # 4. export
    with stages.stage("export", f"FAISS index ({index}) + query tower -> artifacts/"):
        from twotower.export import export_checkpoint

        artifacts = export_checkpoint(
            str(checkpoint),
            str(run / "artifacts"),
            index=index,
            onnx=_want_onnx(onnx),
            users=_want_users(users, dm.data),
            progress=False,
            lineage=lin.for_manifest(lineage),
        )

    # 5. samples
    with stages.stage("samples", f"top-10 for {sample} held-out listeners"):
        samples = sample_recommendations(artifacts, n=sample)
        text = samples_markdown(samples)
        (run / "samples.md").write_text(text)
        if samples:
            print(text)

    return PipelineResult(
        run_dir=run,
        metrics=metrics,
        table=table,
        checkpoint=checkpoint,
        artifacts=Path(artifacts),
        lineage=lineage,
        cache_path=folder,
        cache_hit=cache_hit,
        samples=samples,
    )


def _log_test_hp_metrics(trainer: Any, metrics: Mapping[str, Any]) -> None:
    """Write the model's test figures as ``hp/test_*`` scalars beside the training logs.

    The hparams view of TensorBoard then shows them next to the final validation figures
    (the names were declared by :class:`~twotower.model.callbacks.HparamsMetrics`).
    """
    from twotower.model.callbacks import HP_TEST_METRICS, write_hp_metrics

    log_dir = getattr(trainer, "log_dir", None)
    rows = [r for r in metrics.get("rows", []) if r.get("name") == "two-tower"]
    if not log_dir or not rows:
        return
    values = {}
    for tag, key in HP_TEST_METRICS.items():
        cell = rows[0].get("metrics", {}).get(key)
        value = cell.get("mean") if isinstance(cell, Mapping) else cell
        if isinstance(value, (int, float)):
            values[tag] = float(value)
    write_hp_metrics(log_dir, values, step=int(trainer.global_step))


def _want_onnx(onnx: bool | None) -> bool:
    """Whether to export ONNX: None = when onnx and onnxruntime are importable."""
    if onnx is not None:
        return bool(onnx)
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        log.warning(
            "export: %s not installed, so no query_tower.onnx (pip install -e '.[onnx]', "
            "or --no-onnx to silence this)",
            " and ".join(missing),
        )
        return False
    return True


def _want_users(users: bool, data: Any) -> bool:
    """Whether to export listener vectors: asked for, and the data has listener ids."""
    if users and int(getattr(data, "num_users", 0)) <= 2:
        log.info("export: the data has no listener ids, so no user_embeddings.npy")
        return False
    return bool(users)


def train_overrides(run: Path, fit_over: Mapping[str, str]) -> dict[str, Any]:
    """``fit`` overrides: TensorBoard logs and checkpoints inside the run folder, then ``--set``.

    Raises:
        ValueError: ``--set`` tries to move the logs or checkpoints out of the run folder.
    """
    logger = {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {
            "save_dir": str(run),
            "name": "tensorboard",
            "version": "",
            "default_hp_metric": False,
        },
    }
    over: dict[str, Any] = {
        "trainer.default_root_dir": str(run),
        "trainer.logger": logger,
        "checkpoint.dirpath": str(run / "checkpoints"),
    }
    for key in over:
        if any(k == key or k.startswith(key + ".") for k in fit_over):
            raise ValueError(f"--set {key}: the pipeline sets it (logs and checkpoints in --out)")
    over.update(fit_over)
    return over


def _copy_config(run: Path, trainer: Any) -> bool:
    """Copy the resolved config that LightningCLI saved beside the logs to ``config.yaml``."""
    src = Path(trainer.log_dir or run) / "config.yaml"
    if not src.is_file():
        log.warning("no resolved config at %s", src)
        return False
    if src.resolve() != (run / "config.yaml").resolve():
        shutil.copyfile(src, run / "config.yaml")
    return True


def _best_checkpoint(run: Path, trainer: Any) -> Path:
    """The best checkpoint by the monitored metric; else the last; else one saved now."""
    cb = getattr(trainer, "checkpoint_callback", None)
    for attr in ("best_model_path", "last_model_path"):
        path = getattr(cb, attr, "") if cb is not None else ""
        if path and Path(path).is_file():
            return Path(path)
    path = run / "checkpoints" / "final.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    log.info("no checkpoint callback: saved %s", path)
    return path


def pipeline_main(args: Any) -> int:
    """What ``twotower pipeline`` runs (config files and overrides in ``args.config_args``)."""
    if logging.getLogger("twotower").getEffectiveLevel() > logging.INFO:
        logging.getLogger("twotower").setLevel(logging.INFO)
    config_args = getattr(args, "config_args", None)
    if config_args is None or not config_args.files:
        raise ValueError("--config is required")
    baselines: bool | list[str] = not args.no_baselines
    if args.baselines:
        baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    ks = tuple(int(k) for k in args.ks.split(",") if k.strip())
    result = run_pipeline(
        config_args.files,
        out=args.out,
        overrides=config_args.overrides,
        baselines=baselines,
        index=args.index,
        sample=args.sample,
        ks=ks,
        bootstrap=args.bootstrap,
        onnx=False if getattr(args, "no_onnx", False) else (True if args.onnx else None),
        users=not getattr(args, "no_users", False),
    )
    print(f"run folder: {result.run_dir}")
    return 0
