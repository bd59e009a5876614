"""The one-command pipeline on the tiny preset: run folder, reproducibility, cache, lineage.

Two runs of the same config and seed (CPU) into two folders are the shared fixture; the compare
and drift tests reuse the first one through :func:`tiny_run` (one training per session).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from twotower import lineage as lin
from twotower.cli import main
from twotower.export import verify_artifact
from twotower.pipeline import RUN_FILES, STAGES, run_pipeline, split_overrides

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
BASELINES = ("popular",)


def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder shared by every test module of the session (runs and the data cache)."""
    path = tmp_path_factory.getbasetemp() / "pipeline-runs"
    path.mkdir(exist_ok=True)
    return path


def tiny_overrides(base: Path) -> dict[str, object]:
    """One epoch of the tiny config, with the data cache inside ``base``."""
    return {"trainer.max_epochs": 1, "data.cache_dir": str(base / "cache")}


def run_tiny(base: Path, name: str):
    """Run the pipeline on the tiny config into ``base / name`` (given as a relative path)."""
    old = os.getcwd()
    os.chdir(base)
    try:
        return run_pipeline(
            [TINY],
            out=name,
            overrides=tiny_overrides(base),
            baselines=BASELINES,
            sample=3,
            bootstrap=200,
            command=["twotower", "pipeline", "--config", str(TINY)],
        )
    finally:
        os.chdir(old)


def tiny_run(tmp_path_factory: pytest.TempPathFactory, name: str = "tiny-a") -> Path:
    """A finished tiny run folder, trained once per session whichever module asks first."""
    base = runs_dir(tmp_path_factory)
    if not (base / name / lin.LINEAGE_FILE).is_file():
        run_tiny(base, name)
    return base / name


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = runs_dir(tmp_path_factory)
    first = None
    if not (base / "tiny-a" / lin.LINEAGE_FILE).is_file():
        first = run_tiny(base, "tiny-a")
    second = run_tiny(base, "tiny-b")
    return base, first, second


# ------------------------------------------------------------------------------ units
def test_split_overrides_routes_keys_by_section():
    fit_over, data_over = split_overrides(
        ["trainer.max_epochs=3", "model.encoder=mean", "data.path=x", "kcore=5", "options.n=2"]
    )
    assert fit_over == {
        "trainer.max_epochs": "3",
        "model.encoder": "mean",
        "data.path": "x",
        "data.kcore": "5",
        "data.options.n": "2",
    }
    assert data_over == {"path": "x", "kcore": "5", "options.n": "2"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        split_overrides(["trainer.max_epochs"])


def test_cli_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc = main(["pipeline", "--config", str(TINY), "--out", str(out)])
    assert rc == 2
    assert "not a pipeline run folder" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_refuses_overriding_the_run_folder_layout(tmp_path, capsys):
    rc = main(
        ["pipeline", "--config", str(TINY), "--out", str(tmp_path / "r"), "--set",
         "checkpoint.dirpath=/elsewhere", "--set", f"data.cache_dir={tmp_path / 'c'}"]
    )  # fmt: skip
    assert rc == 2
    assert "checkpoint.dirpath" in capsys.readouterr().err


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_run_folder_holds_every_record(two_runs):
    base, _, second = two_runs
    run = base / "tiny-b"
    assert second.run_dir == run.resolve()  # given as a relative --out
    for name in RUN_FILES:
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "checkpoints").glob("*.ckpt"))
    assert second.checkpoint.parent == (run / "checkpoints").resolve()
    # the data report and the metrics table
    report = json.loads((run / "data_report.json").read_text())
    assert report["source"] == "synthetic:tiny" and report["users"] == 300
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_queries"] == 300
    rows = {r["name"]: r for r in metrics["rows"]}
    assert set(rows) == {"two-tower", "popular"}
    # planted structure: the sequence model beats popularity on the tiny preset
    model, pop = rows["two-tower"]["metrics"], rows["popular"]["metrics"]
    assert model["ndcg@10"]["mean"] > 1.5 * pop["ndcg@10"]["mean"]
    assert "fit_seconds" not in rows["two-tower"]  # wall times live in lineage.json
    assert "two-tower" in (run / "metrics.md").read_text()
    # progress log with per-stage timings
    log_text = (run / "pipeline.log").read_text()
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/{len(STAGES)}] {stage} done in" in log_text
    assert set(second.stage_seconds) == set(STAGES)


@pytest.mark.slow
def test_same_seed_reproduces_metrics_exactly_and_reuses_the_cache(two_runs):
    base, first, second = two_runs
    a = (base / "tiny-a" / "metrics.json").read_bytes()
    b = (base / "tiny-b" / "metrics.json").read_bytes()
    assert a == b
    assert json.loads(a)["rows"][0]["metrics"]["ndcg@10"]["mean"] > 0
    # the second run reused the first run's preprocessing
    assert second.cache_hit
    assert second.cache_path is not None and second.cache_path.parent == base / "cache"
    if first is not None:
        assert not first.cache_hit and first.cache_path == second.cache_path
    assert "data: reusing cached preprocessing" in (second.run_dir / "pipeline.log").read_text()
    assert second.lineage["data"]["cache_hit"] is True


@pytest.mark.slow
def test_lineage_traces_artifact_to_data_config_and_code(two_runs):
    import torch

    _, _, second = two_runs
    run = second.run_dir
    lineage = json.loads((run / "lineage.json").read_text())
    manifest = verify_artifact(run / "artifacts")
    # the served index carries the same lineage (minus what is only known at the end)
    assert manifest["lineage"] == lin.for_manifest(lineage)
    assert manifest["lineage"]["run_id"] == lineage["run_id"]
    assert lineage["data"]["fingerprint"] == manifest["data"]["fingerprint"]
    assert lineage["config"]["files"][0]["sha256"] == lin.sha256_file(TINY)
    assert lineage["config"]["resolved_sha256"] == lin.sha256_file(run / "config.yaml")
    assert lineage["config"]["overrides"]["trainer.max_epochs"] == "1"
    assert lineage["seed"] == {"seed_everything": 0, "data.seed": 0}
    assert lineage["checkpoint"]["sha256"] == lin.sha256_file(run / lineage["checkpoint"]["path"])
    assert lineage["command"] == f"twotower pipeline --config {TINY}"
    assert lineage["versions"]["torch"] == torch.__version__
    assert lineage["code"]["package_version"]
    assert len(lineage["code"]["source_sha256"]) == 64
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    if head.returncode == 0:
        assert lineage["code"]["git_commit"] == head.stdout.decode().strip()
        assert isinstance(lineage["code"]["git_dirty"], bool)
    assert lineage["started"] <= lineage["finished"]
    assert set(lineage["stages"]) == set(STAGES)
    assert lin.read_lineage(run) == lineage
    assert lin.read_lineage(run / "artifacts") == manifest["lineage"]


@pytest.mark.slow
def test_samples_show_history_top10_and_the_true_next_track(two_runs):
    _, _, second = two_runs
    assert len(second.samples) == 3
    text = (second.run_dir / "samples.md").read_text()
    for s in second.samples:
        assert len(s.recs) == 10
        assert f"### listener {s.query_id}" in text
        assert all(h[1].startswith("Track ") for h in s.history)  # titles, not bare ids
        ids = [r[0] for r in s.recs]
        assert s.hit_rank == (ids.index(s.target[0]) + 1 if s.target[0] in ids else None)
    hits = sum(s.hit_rank is not None for s in second.samples)
    assert text.count("**<- true next**") == hits
    assert f"in the top 10 for {hits} of them" in text
