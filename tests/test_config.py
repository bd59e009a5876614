"""One config system (issue 13), the recommend/search CLI and quiet logs (issue 17).

Every command that reads training configs takes ``--config FILE`` and dotted keys exactly as
``python train.py fit`` does; unknown keys are refused by name; ``--trainer.default_root_dir``
moves the checkpoints; training ends with one summary line; default output has no third-party
noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_pipeline_run import tiny_run

from twotower import pipeline as run_mod
from twotower.cli import main
from twotower.config import (
    ConfigError,
    data_config,
    data_config_with,
    data_section,
    load_data_config,
    parse_config,
    split_argv,
)
from twotower.data.pipeline import DataConfig
from twotower.retrieve import Recommendations

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
GOLDEN = REPO / "tests" / "golden" / "artifact"
NOISE = (
    "AVX512",
    "Could not load library",
    "ModuleNotFoundError",
    "💡",
    "litlogger",
    "litmodels",
    "LeafSpec",
    "args parameter",
    "skip_none",
    "swigfaiss",
    "Swig Object",
)


# ------------------------------------------------------------------------------ parsing
def test_split_argv_takes_the_config_options_out():
    cfg, rest = split_argv(
        ["drift", "--reference", "R", "--data", "new.parquet", "--config", "a.yaml",
         "--data.path", "P", "--model.dim=128", "--set", "kcore=3", "--data-config", "b.yaml",
         "--seed_everything", "1", "-k", "5"]
    )  # fmt: skip
    assert rest == ["drift", "--reference", "R", "--data", "new.parquet", "-k", "5"]
    assert cfg.files == ["a.yaml", "b.yaml"]
    assert cfg.overrides == {
        "data.path": "P",
        "model.dim": "128",
        "data.kcore": "3",
        "seed_everything": "1",
    }
    with pytest.raises(ConfigError, match="expects a value"):
        split_argv(["data-report", "--data.path"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        split_argv(["data-report", "--set", "kcore"])


def test_data_options_are_typed_by_the_datamodule_signature(tmp_path):
    ns = parse_config([TINY], {"data.max_history": "5", "model.dim": 128, "path": "/x"})
    assert ns.model.dim == 128
    cls, init = data_section(ns)
    assert cls == "twotower.data.datamodule.TwoTowerDataModule"
    assert init["max_history"] == 5 and init["window"] == 20 and init["path"] == "/x"
    cfg = data_config(ns)
    assert cfg.options == {"preset": "tiny"} and cfg.max_history == 5
    # a dotted key into a mapping merges; YAML booleans and dates are read as train.py does
    f = tmp_path / "t.yaml"
    f.write_text("data:\n  filter_seen: no\n  split: time\n  val_cutoff: 2020-01-01\n"
                 "  test_cutoff: 2020-02-01\n")  # fmt: skip
    cfg = load_data_config([TINY, f], ["--data.options.n_users=7"])
    assert cfg.options == {"preset": "tiny", "n_users": 7}
    assert cfg.filter_seen == "off" and cfg.val_cutoff == "2020-01-01"
    # a base config (checkpoint / artifact data) changed by one key
    moved = data_config_with(
        DataConfig(format="movielens", path="/a", max_history=9), {"path": "/b"}
    )
    assert (moved.format, moved.path, moved.max_history) == ("movielens", "/b", 9)


def test_drift_batch_from_the_reference_data_and_data_keys():
    from twotower.drift import new_batch_config

    ref = DataConfig(format="movielens", path="/old", options={"min_rating": 4}, cache_dir=None)
    cfg = new_batch_config(None, ref, overrides=["--data.path=/new", "--data.max_history=7"])
    assert (cfg.format, cfg.path, cfg.options, cfg.max_history) == (
        "movielens", "/new", {"min_rating": 4}, 7
    )  # fmt: skip
    assert new_batch_config("/logs", ref, overrides={"options.min_rating": 3}).options == {
        "min_rating": 3
    }
    with pytest.raises(ValueError, match="--data.path"):
        new_batch_config(None, ref)


def test_unknown_keys_are_refused_by_name_and_place(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sesion_gap: 3\n")
    with pytest.raises(ConfigError, match=r"'data.sesion_gap'; TwoTowerDataModule takes"):
        parse_config([bad])
    with pytest.raises(ConfigError, match=r"command line: unknown key 'model.dimm'; keys of"):
        parse_config([TINY], {"model.dimm": 3})
    top = tmp_path / "top.yaml"
    top.write_text("modle:\n  dim: 3\n")
    with pytest.raises(ConfigError, match=r"top.yaml: unknown key 'modle.dim'; sections"):
        parse_config([top])
    # an option of the former streaming DataModule is named as unknown, with what exists
    with pytest.raises(ConfigError, match="unknown key 'data.chunk_rows'; TwoTowerDataModule"):
        parse_config([REPO / "configs" / "streaming.yaml"], {"data.chunk_rows": 8})
    with pytest.raises(ConfigError, match=r"command line: invalid value of 'data.max_history'"):
        parse_config([TINY], {"data.max_history": "many"})
    with pytest.raises(FileNotFoundError):
        parse_config([tmp_path / "missing.yaml"])


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_parses(config):
    """Every section of every shipped config parses as train.py parses it."""
    ns = parse_config([REPO / "configs" / config])
    cls, init = data_section(ns)
    assert cls.startswith("twotower.data.") and init
    assert data_config(ns).format


# ------------------------------------------------------------------------------ commands
def test_data_report_takes_data_path_and_model_keys(tmp_path, capsys):
    fixtures = pytest.importorskip("fixtures")
    path = fixtures.write_ml100k(tmp_path / "ml")
    argv = ["data-report", "--config", str(REPO / "configs" / "movielens-100k.yaml"),
            "--data.path", str(path), "--data.cache_dir", "null", "--model.dim", "128"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "Data report: " in out and "model.dim validated but not used" in err
    assert main([*argv, "--data.pth", "x"]) == 2
    assert "unknown key 'data.pth'" in capsys.readouterr().err


def test_pipeline_routes_config_keys_and_honours_default_root_dir(tmp_path, monkeypatch, capsys):
    seen = {}

    class Stop(Exception):
        pass

    def fake_run(run, config_paths, train_over, data_over, *rest):
        seen.update(run=run, paths=config_paths, train=train_over, data=data_over)
        raise Stop

    monkeypatch.setattr(run_mod, "_run", fake_run)
    root = tmp_path / "root"
    with pytest.raises(Stop):
        main(["pipeline", "--config", str(TINY), "--data.path", "/d", "--model.dim", "128",
              "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root)])  # fmt: skip
    assert seen["run"] == root.resolve()  # the run folder is the default_root_dir
    assert seen["train"]["model.dim"] == "128" and seen["train"]["data.path"] == "/d"
    assert seen["train"]["checkpoint.dirpath"] == str(root.resolve() / "checkpoints")
    assert seen["data"] == {"path": "/d"}
    out = tmp_path / "never"
    assert main(["pipeline", "--config", str(TINY), "--out", str(out), "--model.dimm", "1"]) == 2
    assert "unknown key 'model.dimm'" in capsys.readouterr().err
    assert not out.exists()  # refused before anything is written


@pytest.mark.slow
def test_evaluate_drift_compare_take_config_keys(tmp_path_factory, capsys):
    run = tiny_run(tmp_path_factory)
    cache = str(tmp_path_factory.mktemp("cfg-cache"))
    ckpt = sorted((run / "checkpoints").glob("best*.ckpt"))[0]
    keys = ["--config", str(TINY), "--data.cache_dir", cache, "--model.dim", "128"]
    assert main(["evaluate", "--checkpoint", str(ckpt), "--bootstrap", "20", *keys]) == 0
    out, err = capsys.readouterr()
    assert "two-tower" in out and "model.dim validated but not used" in err
    rc = main(["drift", "--reference", str(run), "--no-metric", *keys,
               "--data.options.seed", "3"])  # fmt: skip
    assert rc in (0, 3)
    assert "synthetic" in capsys.readouterr().out
    assert main(["compare", str(run), str(run), "--bootstrap", "20", *keys]) == 0
    assert "queries from --data-config" in capsys.readouterr().out
    for cmd in (
        ["evaluate", "--checkpoint", str(ckpt)],
        ["drift", "--reference", str(run)],
        ["compare", str(run), str(run)],
    ):
        assert main([*cmd, "--config", str(TINY), "--data.nope", "1"]) == 2
        assert "unknown key 'data.nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_honours_default_root_dir_and_ends_with_a_summary(tmp_path, monkeypatch, capsys):
    from twotower.train import main as train_main

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    train_main(
        ["fit", "--config", str(TINY), "--trainer.max_epochs", "2",
         "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
         "--model.projector_items", "0", "--data.cache_dir", str(tmp_path / "cache"),
         "--trainer.default_root_dir", str(root)]
    )  # fmt: skip
    ckpts = list(root.rglob("*.ckpt"))
    assert ckpts and not (tmp_path / "runs").exists()
    out = capsys.readouterr().out
    start = next(line for line in out.splitlines() if line.startswith("training on "))
    assert f"checkpoints -> {root}" in start and f"logs -> {root}" in start
    last = [line for line in out.splitlines() if line.startswith("training done:")]
    assert len(last) == 1
    line = last[0]
    assert "best val/ndcg@10 0." in line and " at epoch " in line
    best = line.split("checkpoint ", 1)[1].split(";")[0]
    assert Path(best).is_file() and Path(best).is_relative_to(root)
    assert f"tensorboard --logdir {root}" in line


def test_fit_help_lists_the_data_options(capsys):
    from twotower.train import main as train_main

    with pytest.raises(SystemExit):
        train_main(["fit", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--data.path",
        "--data.window_stride",
        "--data.max_history",
        "--data.num_buckets",
        "--data.streaming",
        "--data.prepared",
        "--data.shuffle_blocks",
    ):
        assert option in text


# ------------------------------------------------------------------------------ recommend/search
class _FakeRetriever:
    filter_seen = False

    def __init__(self) -> None:
        self.history: list[str] | None = None

    def recommend(self, history, k=10, exclude=None):
        self.history = list(history)
        return Recommendations(["x"], ["t"], ["a"], [0.5], unknown=list(history))


def test_ids_with_commas_round_trip_through_recommend(tmp_path, monkeypatch, capsys):
    from twotower import retrieve

    fake = _FakeRetriever()
    monkeypatch.setattr(retrieve.Retriever, "load", classmethod(lambda cls, path: fake))
    ids = ["Artist, The:Song, Part 1", "plain"]
    (tmp_path / "h.txt").write_text("\n".join(ids) + "\n\n")
    for argv in (
        ["--track", ids[0], "--track", ids[1]],
        ["--history-file", str(tmp_path / "h.txt")],
        ["--history-json", json.dumps(ids)],
        ["--track", ids[0], "--history", "plain"],
    ):
        assert main(["recommend", "--artifacts", str(tmp_path), *argv]) == 0
        assert fake.history == ids
        assert json.dumps(ids) in capsys.readouterr().err  # the unknown ids, unambiguous
    assert main(["recommend", "--artifacts", str(tmp_path), "--history-json", "{}"]) == 2


def test_tables_are_as_wide_as_their_ids():
    mbid = "1b022e01-4da6-387b-8658-8678046e4cef"
    key = "name:a very long artist name:and an even longer track title"
    rec = Recommendations([mbid, key, "g1"], ["A", "B" * 80, "C"], ["x", "y", "z"], [0.9, 0.5, 0.1])
    lines = rec.format().splitlines()
    assert mbid in lines[1] and key in lines[2]  # never cut
    assert len({line.rindex(".") for line in lines[1:]}) == 1  # the score column lines up
    assert "…" in lines[2] and "B" * 80 not in lines[2]  # long titles are cut


def test_search_finds_ids_by_title_and_artist(capsys):
    assert main(["search", "--artifacts", str(GOLDEN), "golden", "track", "1", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["track_id", "title", "artist"]
    assert lines[1].split()[0] == "g01" and len(lines) == 4
    assert main(["search", "--artifacts", str(GOLDEN), "artist", "b"]) == 0
    assert "g06" in capsys.readouterr().out
    assert main(["search", "--artifacts", str(GOLDEN), "no such thing"]) == 1


# ------------------------------------------------------------------------------ quiet logs
def _run(*argv: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": ""}
    p = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.mark.slow
def test_default_output_has_no_third_party_noise(tmp_path):
    out = _run(
        "train.py", "fit", "--config", str(TINY), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1", "--model.projector_items", "0",
        "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path),
    )  # fmt: skip
    assert "training done:" in out
    ckpt = next(tmp_path.rglob("last.ckpt"))
    art = tmp_path / "art"
    out += _run("export.py", "--checkpoint", str(ckpt), "--out", str(art), "--holdout", "10")
    assert "index Flat (" in out  # the index is described, not printed as a SWIG proxy
    track = str(pd.read_parquet(art / "items.parquet")["track_id"].iloc[0])
    out += _run("-m", "twotower.cli", "similar", "--artifacts", str(art), "--track", track)
    for noise in NOISE:
        assert noise not in out, noise
    verbose = _run("-m", "twotower.cli", "-v", "similar", "--artifacts", str(art), "--track", track)
    assert "faiss" in verbose.lower() and "Loading faiss" in verbose


def test_setup_logging_quiets_and_verbose_restores():
    import logging
    import warnings

    from twotower.log_setup import setup_logging

    with warnings.catch_warnings():
        setup_logging(0)
        assert logging.getLogger("faiss.loader").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("pytorch_lightning").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("twotower").getEffectiveLevel() == logging.INFO
        setup_logging(1)
        assert logging.getLogger("faiss.loader").getEffectiveLevel() <= logging.INFO
    setup_logging(0)


def test_quiet_logs_survive_a_library_that_resets_its_level():
    """The pipeline imports Lightning after setup_logging, and that import sets its logger to
    INFO again ("Seed set to 0", "GPU available", the litlogger tip were printed)."""
    import io
    import logging

    from twotower.log_setup import setup_logging

    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        setup_logging(0)
        logging.getLogger("pytorch_lightning").setLevel(logging.INFO)  # as the late import does
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("GPU available: False")
        logging.getLogger("lightning_fabric.utilities.seed").info("Seed set to 0")
        logging.getLogger("pytorch_lightning").warning("a real warning")
        logging.getLogger("twotower").info("our message")
        out = stream.getvalue()
        assert "GPU available" not in out and "Seed set" not in out
        assert "a real warning" in out and "our message" in out
        setup_logging(1)
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("GPU again")
        assert "GPU again" in stream.getvalue()
    finally:
        root.removeHandler(handler)
        setup_logging(0)
