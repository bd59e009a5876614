"""Streaming training from Parquet: every target once per epoch, held-out listeners, errors, fit.

The data set is the synthetic generator's "tiny" preset (planted taste clusters, skips,
sessions), written sorted by user and time to three Parquet files with small, uneven row
groups, so that chunk, batch, row-group, file and shard boundaries all fall inside listeners'
sequences.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from twotower.data.schema import DataError
from twotower.data.stream_module import (
    TRAIN,
    VALID,
    StreamingSessionDataModule,
    holdout_roles,
)
from twotower.data.synthetic import generate, make_config
from twotower.ids import HashVocab, Vocab

REPO = Path(__file__).resolve().parents[1]
FILES = (("part-0.parquet", 97), ("part-1.parquet", 250), ("sub/part-2.parquet", 1000))
WINDOW = 6


def _plays(**overrides: int) -> pd.DataFrame:
    inter, _, _ = generate(make_config("tiny", **overrides))
    cols = ["user_id", "track_id", "timestamp", "skipped", "context_type"]
    return inter[cols].reset_index(drop=True)


def write_plays(root: Path, plays: pd.DataFrame) -> Path:
    """Plays split into three files (the last one in a sub-folder), small row groups."""
    cuts = np.linspace(0, len(plays), len(FILES) + 1).astype(int)
    for (name, rg), a, b in zip(FILES, cuts[:-1], cuts[1:], strict=True):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(plays.iloc[a:b], preserve_index=False)
        pq.write_table(table, root / name, row_group_size=rg)
    return root


@pytest.fixture(scope="module")
def plays() -> pd.DataFrame:
    return _plays()


@pytest.fixture(scope="module")
def plays_dir(tmp_path_factory, plays) -> Path:
    return write_plays(tmp_path_factory.mktemp("plays"), plays)


def expected_targets(plays: pd.DataFrame, roles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows that must be training targets, and the row of their previous positive (context)."""
    train_pos = (roles == TRAIN) & ~plays["skipped"].to_numpy()
    rows = np.flatnonzero(train_pos)
    users = plays["user_id"].to_numpy()[rows]
    first = np.r_[True, users[1:] != users[:-1]]
    prev = np.r_[-1, rows[:-1]]
    return rows[~first], prev[~first]


def _module(path: Path, **kw) -> StreamingSessionDataModule:
    args = dict(
        path=str(path),
        window=WINDOW,
        batch_rows=300,
        chunk_rows=128,
        val_fraction=0.1,
        test_fraction=0.05,
        max_eval_queries=500,
        shuffle=False,
    )
    args.update(kw)
    return StreamingSessionDataModule(**args)


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_target_once_across_two_ranks_and_two_workers(plays, plays_dir, shuffle) -> None:
    """2 DDP ranks x 2 loader worker processes: each training target exactly once, in order.

    Also: every window item is the track of its row, the item before a target is the previous
    positive play of the same listener (the context survives chunk, block, file and shard
    cuts), and both ranks run the same number of batches.
    """
    dm = _module(plays_dir, num_workers=2, shuffle=shuffle)
    vocab = dm.data.item_vocab
    roles = holdout_roles(plays["user_id"], 0.1, 0.05)
    want, want_prev = expected_targets(plays, roles)
    assert dm.data.stats["train_targets"] == len(want)
    assert dm.data.stats["rows"] == len(plays)
    got, got_prev, batches = [], [], []
    track_idx = vocab.lookup(plays["track_id"])
    for rank in (0, 1):
        ds = dm.train_dataset(rank, 2)
        ds.emit_rows = True
        ds.set_epoch(1)
        n = 0
        for b in DataLoader(ds, batch_size=None, num_workers=2):
            items, rows = b["items"].numpy(), b["rows"].numpy()  # [B, L+1]
            assert items.shape[1] == WINDOW + 1
            real = rows >= 0
            np.testing.assert_array_equal(items[real], track_idx[rows[real]])
            tgt = real[:, 1:] & real[:, :-1]  # a target: an item after another item
            got.append(rows[:, 1:][tgt])
            got_prev.append(rows[:, :-1][tgt])
            n += 1
        assert n == len(ds)
        batches.append(n)
    assert batches[0] == batches[1]
    got, got_prev = np.concatenate(got), np.concatenate(got_prev)
    order = np.argsort(got)
    assert len(got) == len(want)  # no target lost or duplicated ...
    np.testing.assert_array_equal(got[order], want)  # ... every one exactly once
    np.testing.assert_array_equal(got_prev[order], want_prev)  # with its true predecessor


def test_vocab_counts_and_held_out_listeners(plays, plays_dir) -> None:
    dm = _module(plays_dir)
    d = dm.data
    roles = holdout_roles(plays["user_id"], 0.1, 0.05)
    train = plays[roles == TRAIN]
    assert d.item_vocab == Vocab.build(train["track_id"])  # exact, training rows only
    pos = train[~train["skipped"]]["track_id"].value_counts()
    np.testing.assert_array_equal(d.item_counts[d.item_vocab.lookup(pos.index)], pos.to_numpy())
    assert d.item_counts.sum() == pos.sum()
    # held-out listeners: 10% / 5% of them, none in training
    users = plays["user_id"].drop_duplicates()
    share = (holdout_roles(users, 0.1, 0.05) == VALID).mean()
    assert 0.05 < share < 0.15
    # validation query = last positive play of a held-out listener, history = earlier ones
    va = d.valid
    held = plays[(roles == VALID) & ~plays["skipped"].to_numpy()]
    last = held.groupby("user_id", sort=False)["track_id"].agg(list)
    assert len(va) == int((last.map(len) >= 2).sum())
    examples = {
        tuple(d.item_vocab.lookup(pd.Series(t[-WINDOW - 1 :]))) for t in last if len(t) >= 2
    }
    hist = [
        tuple(va.history[va.offsets[i] : va.offsets[i + 1]]) + (int(va.targets[i]),)
        for i in range(len(va))
    ]
    assert set(hist) == examples


def test_hashed_vocabulary_and_reservoir_cap(plays, plays_dir) -> None:
    dm = _module(plays_dir, num_buckets=4096, max_eval_queries=7)
    d = dm.data
    assert d.num_items == 4098 and len(d.valid) == 7 and len(d.test) == 7
    hv = HashVocab(4096)
    roles = holdout_roles(plays["user_id"], 0.1, 0.05)
    pos = plays[(roles == TRAIN) & ~plays["skipped"].to_numpy()]
    np.testing.assert_array_equal(
        d.item_counts, np.bincount(hv.lookup(pos["track_id"]), minlength=4098)
    )
    assert d.item_vocab.ids[:2] == ["bucket#0", "bucket#1"]


def test_separate_validation_file(tmp_path, plays) -> None:
    """``val_path``: queries from another file, nothing held out of the training file."""
    users = plays["user_id"].drop_duplicates().to_numpy()
    is_val = plays["user_id"].isin(users[:30]).to_numpy()
    train_dir = write_plays(tmp_path / "train", plays[~is_val].reset_index(drop=True))
    val_file = tmp_path / "valid.parquet"
    plays[is_val].to_parquet(val_file, index=False)
    d = _module(train_dir, val_path=str(val_file)).data
    assert d.stats["rows"] == d.stats["train_rows"] == int((~is_val).sum())
    held = plays[is_val & ~plays["skipped"].to_numpy()]
    last = held.groupby("user_id", sort=False)["track_id"].agg(list)
    assert len(d.valid) == len(d.test) == int((last.map(len) >= 2).sum())
    want = sorted(d.item_vocab.lookup(pd.Series([t[-1] for t in last if len(t) >= 2])))
    assert sorted(d.valid.targets.tolist()) == [int(x) for x in want]


def test_order_and_column_errors_name_file_and_row(tmp_path, plays) -> None:
    bad = plays.copy()
    bad.loc[40, "timestamp"] = int(bad.loc[39, "timestamp"]) - 10  # same user, back in time
    assert bad.loc[40, "user_id"] == bad.loc[39, "user_id"]
    path = write_plays(tmp_path / "back", bad)
    with pytest.raises(DataError, match=r"part-0.parquet: row 40: timestamp .* earlier"):
        _ = _module(path).data
    mixed = pd.concat([plays.iloc[:30], plays.iloc[60:90], plays.iloc[30:60]], ignore_index=True)
    path = write_plays(tmp_path / "mixed", pd.concat([mixed, plays.iloc[90:]], ignore_index=True))
    with pytest.raises(DataError, match=r"row \d+: user .* appears again"):
        _ = _module(path).data
    path = write_plays(tmp_path / "nouser", plays.drop(columns="user_id"))
    with pytest.raises(DataError, match=r"missing column\(s\) \['user_id'\]"):
        _module(path)
    with pytest.raises(DataError, match="sequence_by='session' needs a 'timestamp'"):
        path = write_plays(tmp_path / "nots", plays.drop(columns="timestamp"))
        _module(path, sequence_by="session")


def test_fit_one_epoch_hashed_learns_planted_structure(tmp_path) -> None:
    """``train.fit`` with configs/streaming.yaml: one epoch, hashed ids, ~48k planted plays.

    Every training target is seen exactly once (counted by a callback), the loss falls, and
    validation recall@10 on held-out listeners beats the most-popular list.
    """
    import pytorch_lightning as pl

    from twotower.train import fit

    class Count(pl.Callback):
        def __init__(self) -> None:
            self.targets = 0
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            items = batch["items"]
            self.targets += int(((items[:, :-1] != 0) & (items[:, 1:] > 1)).sum())
            self.losses.append(float(outputs["loss"]))

    plays_dir = write_plays(tmp_path / "plays", _plays(n_users=1000))
    count = Count()
    trainer, model, dm = fit(
        [REPO / "configs" / "streaming.yaml"],
        {
            "data.path": str(plays_dir),
            "data.num_buckets": 2048,
            "data.batch_rows": 512,
            "data.window": 20,
            "data.val_fraction": 0.1,
            "data.test_fraction": 0.0,
            "trainer.max_epochs": 1,
            "trainer.default_root_dir": str(tmp_path),
            "trainer.logger": False,
            "trainer.enable_checkpointing": False,
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "model.dim": 32,
            "model.id_dim": 32,
            "model.num_layers": 1,
            "model.num_negatives": 64,
            "model.lr": 0.01,
        },
        callbacks=[count],
    )
    assert type(dm).__name__ == "StreamingSessionDataModule"
    assert count.targets == dm.data.stats["train_targets"] > 0  # each target once
    k = max(len(count.losses) // 5, 1)
    assert np.mean(count.losses[-k:]) < np.mean(count.losses[:k]) - 0.3  # the loss fell
    recall = float(trainer.callback_metrics["val/recall@10"])
    va = dm.data.valid
    counts = dm.data.item_counts.astype(float)
    counts[:2] = -1
    top = np.argsort(-counts, kind="stable")[:10]
    pop_recall = float(np.isin(va.targets, top).mean())
    assert recall > pop_recall + 0.05, (recall, pop_recall)
    with torch.no_grad():
        assert torch.isfinite(model.item_embeddings()).all()


def ddp_child(tmp_path: Path, plays_dir: Path) -> None:
    """Body of the DDP test, run in a fresh process (see the test)."""
    import json

    import pytorch_lightning as pl

    from twotower.train import fit

    out = tmp_path / "counts"
    out.mkdir()

    class Count(pl.Callback):
        def __init__(self) -> None:
            self.targets = 0
            self.steps = 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            items = batch["items"]
            self.targets += int(((items[:, :-1] != 0) & (items[:, 1:] > 1)).sum())
            self.steps += 1

        def on_train_end(self, trainer, module) -> None:
            doc = {"targets": self.targets, "steps": self.steps}
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(doc))

    trainer, _, dm = fit(
        [REPO / "configs" / "streaming.yaml"],
        {
            "data.path": str(plays_dir),
            "data.num_buckets": 1024,
            "data.batch_rows": 400,
            "data.window": 10,
            "data.val_fraction": 0.1,
            "data.test_fraction": 0.0,
            "trainer.accelerator": "cpu",
            "trainer.devices": 2,
            "trainer.strategy": "ddp_fork",
            "trainer.max_epochs": 1,
            "trainer.default_root_dir": str(tmp_path),
            "trainer.logger": False,
            "trainer.enable_checkpointing": False,
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "model.dim": 16,
            "model.id_dim": 16,
            "model.num_layers": 1,
            "model.num_negatives": 32,
        },
        callbacks=[Count()],
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert sum(r["targets"] for r in ranks) == dm.data.stats["train_targets"]
    assert 0.0 <= float(trainer.callback_metrics["val/recall@10"]) <= 1.0


def test_real_ddp_two_ranks_train_every_target_once(tmp_path, plays_dir) -> None:
    """Lightning DDP on 2 CPU processes (gloo, forked): every rank runs the same number of steps
    (no hang) and together they train on every target exactly once; validation all-gathers.

    Forking a process whose OpenMP pool already ran (any earlier test's matmuls) can deadlock the
    child, so the fit runs in a fresh single-threaded interpreter with a time limit.
    """
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from test_stream_module import ddp_child; ddp_child(Path(sys.argv[2]), Path(sys.argv[3]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path), str(plays_dir)]
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_fingerprint_covers_the_data_not_the_loader_settings(plays_dir) -> None:
    """Export compares fingerprints: loader settings (and LightningCLI's private keys) may
    differ between training and export; what shapes the data may not."""
    base = _module(plays_dir).data.fingerprint
    loader = _module(plays_dir, batch_rows=77, chunk_rows=64, num_workers=2, shuffle=True)
    loader.hparams["_class_path"] = "twotower.data.stream_module.StreamingSessionDataModule"
    assert loader.data.fingerprint == base
    assert _module(plays_dir, val_fraction=0.2).data.fingerprint != base
    assert _module(plays_dir, num_buckets=64).data.fingerprint != base
