"""One data path: a log prepared once, trained in memory or streamed from its Parquet blocks.

The tiny synthetic preset (planted taste clusters) is prepared into blocks of a few hundred
plays, so that blocks, shuffle buffers, rank x worker shards and mid-epoch skips are all
exercised on data that trains in seconds.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from twotower.data.datamodule import TwoTowerDataModule
from twotower.data.prepared import PLAY_COLUMNS, PreparedData
from twotower.data.schema import DataError
from twotower.data.train_batches import TrainingBatches, TrainLoader
from twotower.data.windows import build_windows

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
BLOCK_ROWS = 400
DM = {"options": {"preset": "tiny"}, "batch_size": 32, "window": 20, "block_rows": BLOCK_ROWS}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("prepared"))


def _dm(cache: str, **kw) -> TwoTowerDataModule:
    return TwoTowerDataModule(**{**DM, "cache_dir": cache, **kw})


def _rows(batch: dict[str, torch.Tensor]) -> list[tuple]:
    """Each window of a batch as a hashable row (items and user)."""
    items = batch["items"].numpy()
    users = batch["users"].numpy()
    return [(*items[i].tolist(), int(users[i])) for i in range(len(users))]


def _epoch(batches: TrainingBatches, epoch: int, num_workers: int = 0) -> list[dict]:
    loader = TrainLoader(batches, epoch_fn=lambda: epoch, num_workers=num_workers)
    return list(loader)


def _same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def _all_windows(data: PreparedData, window: int = 20) -> Counter:
    w = build_windows(data.train, window)
    return Counter(_rows({k: torch.from_numpy(v) for k, v in w.items()}))


# ------------------------------------------------------------------------ one split, one order
def test_small_and_streamed_share_split_vocabulary_and_batches(cache):
    small, streamed = _dm(cache, streaming=False), _dm(cache, streaming=True)
    a, b = small.data, streamed.data
    assert b.train_sequences is None and all(blk.file is not None for blk in b.blocks)
    assert a.fingerprint == b.fingerprint and list(a.item_vocab.ids) == list(b.item_vocab.ids)
    assert len(a.blocks) == len(b.blocks) > 8  # several blocks, cut at the same sequences
    for name in ("valid", "test"):
        np.testing.assert_array_equal(getattr(a, name).targets, getattr(b, name).targets)
        np.testing.assert_array_equal(getattr(a, name).history, getattr(b, name).history)
    np.testing.assert_array_equal(a.item_counts, b.item_counts)
    for ba, bb in zip(a.blocks, b.blocks, strict=True):
        np.testing.assert_array_equal(a.block(ba).items, b.block(bb).items)
    small.setup("fit")
    streamed.setup("fit")
    for epoch in (0, 1):  # one buffer holds every block: the same global shuffle
        _same_batches(_epoch(small._train, epoch), _epoch(streamed._train, epoch))
    assert _rows(_epoch(small._train, 0)[0]) != _rows(_epoch(small._train, 1)[0])


def test_in_memory_and_streamed_give_the_same_batches_over_several_buffers(cache):
    small = _dm(cache, streaming=False, shuffle_blocks=3)
    streamed = _dm(cache, streaming=True, shuffle_blocks=3)
    small.setup("fit")
    streamed.setup("fit")
    assert len(small.data.blocks) > 3 * 3  # several buffers
    _same_batches(_epoch(small._train, 2), _epoch(streamed._train, 2))


def test_auto_holds_one_buffer_in_memory_and_streams_more(cache):
    rows = _dm(cache, streaming=True).data.train_rows
    one_buffer = -(-rows // BLOCK_ROWS) + 1
    assert not _dm(cache, shuffle_blocks=one_buffer).streamed  # streaming: auto (default)
    assert _dm(cache, shuffle_blocks=2).streamed
    assert not _dm(cache, cache_dir=None, shuffle_blocks=2).streamed  # nothing on disk
    with pytest.raises(ValueError, match="data.streaming: expected true, false or auto"):
        _dm(cache, streaming="sometimes")


def test_streamed_buffers_see_every_window_once_per_epoch(cache):
    dm = _dm(cache, streaming=True, shuffle_blocks=2)
    dm.setup("fit")
    want = _all_windows(dm.data)
    batches = _epoch(dm._train, 0)
    got = Counter(r for b in batches for r in _rows(b))
    assert got == want
    assert all(len(b["users"]) == 32 for b in batches[:-1])  # short remainders carried over
    assert len(batches) == len(dm._train) == -(-sum(want.values()) // 32)


@pytest.mark.parametrize("world_size,num_workers", [(1, 2), (2, 1), (2, 2)])
def test_rank_and_worker_shards_split_the_blocks(cache, world_size, num_workers):
    dm = _dm(cache, streaming=True, shuffle_blocks=2)
    want = _all_windows(dm.data)
    per_rank = []
    for rank in range(world_size):
        ds = dm.train_batches(rank, world_size)
        per_rank.append(_epoch(ds, 0, num_workers=num_workers))
        assert ds.by_block()  # each shard reads only its blocks
    assert len({len(r) for r in per_rank}) == 1  # every rank runs the same number of steps
    got = Counter(r for batches in per_rank for b in batches for r in _rows(b))
    assert not got - want  # nothing twice, nothing invented
    dropped = sum((want - got).values())
    assert dropped < 2 * BLOCK_ROWS  # the larger rank's last batches, at most
    assert sum(got.values()) > 0.8 * sum(want.values())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_skips_exactly_the_served_batches(cache, num_workers):
    dm = _dm(cache, streaming=True, shuffle_blocks=2)
    dm.setup("fit")
    full = _epoch(dm._train, 1, num_workers)
    loader = TrainLoader(dm._train, epoch_fn=lambda: 1, num_workers=num_workers)
    loader.load_state_dict({"batches": 7})
    rest = list(loader)
    _same_batches(rest, full[7:])
    assert loader.state_dict() == {"batches": 0}  # the epoch is complete


def test_same_seed_same_metrics_in_memory_and_streamed(cache, tmp_path, monkeypatch):
    from twotower.train import fit

    monkeypatch.chdir(tmp_path)
    base = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 10, "data.cache_dir": cache}
    base |= {"data.block_rows": BLOCK_ROWS}
    metrics = []
    for streaming in (False, True):
        trainer, _, dm = fit([TINY], {**base, "data.streaming": streaming})
        assert (dm.data.train_sequences is None) == streaming
        metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if "val/" in k})
    assert metrics[0] == metrics[1] and metrics[0]["val/ndcg@10"] > 0


# ---------------------------------------------------------------- another engine's prepared data
def _write_like_an_engine(data: PreparedData, folder: Path, rows_per_group: int) -> None:
    """The prepared layout written with plain pyarrow (as a Spark or Ray job would)."""
    (folder / "plays").mkdir(parents=True)
    tr = data.train
    seq = np.repeat(np.arange(len(tr)), tr.lengths)
    table = pa.table(
        {
            "seq": seq,
            "user": tr.users[seq],
            "item": tr.items,
            "hour": tr.hours,
            "context": tr.contexts,
            "positive": tr.positive,
            "timestamp": tr.timestamps,
        }
    )
    # row groups end at sequence boundaries: cut at the first sequence start past each limit
    starts = tr.offsets[:-1]
    cuts = sorted(
        {int(starts[np.searchsorted(starts, c)]) for c in range(0, len(seq), rows_per_group)}
    )
    cuts = [*cuts, len(seq)]
    with pq.ParquetWriter(folder / "plays" / "part-0.parquet", table.schema) as w:
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            w.write_table(table.slice(lo, hi - lo))
    items = data.tracks.copy()
    items["count"] = data.item_counts
    items["artist_idx"] = data.features.artist
    items["album_idx"] = data.features.album
    items["year_bucket"] = data.features.year
    for j in range(data.features.genres.shape[1]):
        items[f"genre_{j}"] = data.features.genres[:, j]
    for j, name in enumerate(data.features.audio_names):
        items[name] = data.features.audio[:, j]
    items.to_parquet(folder / "items.parquet", index=False)
    for name in ("valid", "test"):
        es = getattr(data, name)
        cols = {"targets": es.targets, "users": es.users, "hours": es.hours}
        cols["contexts"] = es.contexts
        cols["history"] = pa.LargeListArray.from_arrays(es.offsets, es.history)
        cols["seen"] = pa.LargeListArray.from_arrays(es.seen_offsets, es.seen)
        pq.write_table(pa.table(cols), folder / f"{name}.parquet")
    header = {
        "format": 4,
        "fingerprint": "written-by-another-engine",
        "params": {"split": "leave_last_out", "filter_seen": data.params["filter_seen"]},
        "vocabs": {
            "user": list(data.user_vocab.ids),
            "context": list(data.context_vocab.ids),
            "artist": list(data.features.artist_vocab.ids),
            "album": list(data.features.album_vocab.ids),
            "genre": list(data.features.genre_vocab.ids),
        },
        "audio_names": data.features.audio_names,
        "report": {},
    }
    (folder / "header.json").write_text(json.dumps(header))


def test_a_folder_written_with_plain_pyarrow_trains_like_our_own(cache, tmp_path, monkeypatch):
    from twotower.train import fit

    ours = _dm(cache).data
    folder = tmp_path / "engine"
    _write_like_an_engine(ours, folder, rows_per_group=BLOCK_ROWS)
    theirs = PreparedData.load(folder)
    assert len(theirs.blocks) > 8
    for name in ("items", "offsets", "users", "positive", "timestamps"):
        np.testing.assert_array_equal(getattr(theirs.train, name), getattr(ours.train, name))
    np.testing.assert_array_equal(theirs.valid.targets, ours.valid.targets)
    assert theirs.features.sizes() == ours.features.sizes()

    monkeypatch.chdir(tmp_path)
    base = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 10}
    trainer, _, dm = fit([TINY], {**base, "data.prepared": str(folder), "data.streaming": True})
    assert dm.data.fingerprint == "written-by-another-engine"
    ndcg = float(trainer.callback_metrics["val/ndcg@10"])
    pop = _popularity_ndcg(ours)
    assert ndcg > pop  # the planted structure is learnt from the engine's files


def _popularity_ndcg(data: PreparedData) -> float:
    from twotower.baselines import MostPopular
    from twotower.metrics import metrics_from_ranks, rank_from_scores

    pop = MostPopular().fit(data)
    ranks = rank_from_scores(lambda r: pop.score(data.valid, r), data.valid.targets, None)
    return float(metrics_from_ranks(ranks, (10,))["ndcg@10"])


def test_a_sequence_split_across_row_groups_is_refused_with_its_place(cache, tmp_path):
    ours = _dm(cache).data
    folder = tmp_path / "bad"
    _write_like_an_engine(ours, folder, rows_per_group=BLOCK_ROWS)
    shard = folder / "plays" / "part-0.parquet"
    t = pq.read_table(shard)
    pq.write_table(t, shard, row_group_size=333)  # cuts fall inside sequences
    with pytest.raises(DataError, match=r"part-0.parquet: row group 1 starts at seq"):
        _ = TwoTowerDataModule(prepared=str(folder)).data
    t = t.drop_columns(["positive"])
    pq.write_table(t, shard)
    with pytest.raises(DataError, match=r"missing column\(s\) \['positive'\]"):
        _ = TwoTowerDataModule(prepared=str(folder)).data
    assert "positive" in PLAY_COLUMNS


def test_streaming_without_a_folder_is_a_clear_error():
    with pytest.raises(DataError, match="data.cache_dir"):
        _ = TwoTowerDataModule(**{**DM, "cache_dir": None, "streaming": True}).data


# ---------------------------------------------------------------------- every command, streamed
@pytest.mark.slow
def test_every_command_on_a_streamed_run(cache, tmp_path, monkeypatch):
    """pipeline (train, evaluate with baselines, export with listener vectors, samples) and
    compare on a model trained from the streamed blocks."""
    from twotower.compare import compare_runs
    from twotower.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    over = {
        "trainer.max_epochs": 1,
        "data.cache_dir": cache,
        "data.block_rows": BLOCK_ROWS,
        "data.streaming": True,
    }
    res = run_pipeline(
        [TINY], out="streamed", overrides=over, baselines=["popular"], sample=2, bootstrap=50
    )
    run = tmp_path / "streamed"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics
    assert (run / "artifacts" / "user_embeddings.npy").is_file()
    assert res.samples
    report = compare_runs(run, run, bootstrap=50)
    assert report is not None


def test_a_model_of_a_prepared_folder_has_no_raw_logs_to_profile():
    """drift and compare fall back to the raw-data config; a prepared folder has none, and
    the defaults (the synthetic preset) must not silently stand in for it."""
    from types import SimpleNamespace

    from twotower.compare import data_config_of

    side = SimpleNamespace(source="runs/x", data_config={"prepared": "/data/prep", "format": "x"})
    with pytest.raises(ValueError, match=r"prepared folder \(data.prepared=/data/prep\)"):
        data_config_of(side)


@pytest.mark.parametrize("sequence_by", ["user", "session"])
def test_listener_vectors_read_the_blocks_without_loading_the_plays(cache, sequence_by):
    """``export --users`` builds each listener's latest plays block by block: the same as from
    memory, with a listener's sessions spread over several blocks too, and the plays of a
    streamed dataset are never loaded whole."""
    from twotower.export import _latest_user_histories, _latest_user_plays

    small = _dm(cache, streaming=False, sequence_by=sequence_by).data
    streamed = _dm(cache, streaming=True, sequence_by=sequence_by).data
    assert len(streamed.blocks) > 8
    hist_a, has_a = _latest_user_histories(small, 20)
    hist_b, has_b = _latest_user_histories(streamed, 20)
    np.testing.assert_array_equal(hist_a, hist_b)
    np.testing.assert_array_equal(has_a, has_b)
    assert has_a.mean() > 0.9
    plays_a, plays_b = _latest_user_plays(small, 20), _latest_user_plays(streamed, 20)
    assert plays_a.keys() == plays_b.keys()
    for k in plays_a:
        np.testing.assert_array_equal(plays_a[k], plays_b[k])
    assert streamed.train_sequences is None
    # the reference: one block of every training sequence (no cut between blocks)
    import dataclasses

    from twotower.data.prepared import Block

    whole = [Block(0, len(small.train.items), seq_start=0, seq_stop=len(small.train))]
    one = dataclasses.replace(small, blocks=whole)
    np.testing.assert_array_equal(_latest_user_histories(one, 20)[0], hist_a)
    for k, v in _latest_user_plays(one, 20).items():
        np.testing.assert_array_equal(v, plays_a[k])


# ---------------------------------------------------------------------------------- DDP, for real
@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--data.streaming", "true", "--data.block_rows", "400", "--data.shuffle_blocks", "2"],
        [],  # in memory, one block: every rank reads it and keeps every other batch
    ],
    ids=["streamed-blocks-by-rank", "in-memory-batches-by-rank"],
)
def test_two_cpu_ranks_train_the_same_steps_and_finish(tmp_path, extra):
    """``train.py fit`` on 2 DDP ranks (gloo, CPU): no rank waits forever for another (a
    rank-0-only callback once called a collective and hung every multi-device run at the start),
    and every rank runs the planned number of steps."""
    import subprocess
    import sys

    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(TINY)]
    cmd += ["--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"]
    cmd += ["--trainer.max_epochs", "2", "--data.cache_dir", str(tmp_path / "cache"), *extra]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "training done: best val/ndcg@10" in res.stdout
    last = tmp_path / "runs" / "twotower" / "version_0" / "checkpoints" / "last.ckpt"
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    flags = dict(zip(extra[::2], extra[1::2], strict=True))
    dm = TwoTowerDataModule(
        options={"preset": "tiny"},
        batch_size=32,
        window=20,
        cache_dir=str(tmp_path / "cache"),
        streaming=flags.get("--data.streaming", "auto") == "true" or "auto",
        block_rows=int(flags.get("--data.block_rows", 262_144)),
        shuffle_blocks=int(flags.get("--data.shuffle_blocks", 16)),
    )
    ranks = dm.train_batches(0, 2)
    assert ranks.by_block() == bool(extra)
    assert step == sum(ranks.rank_batches(e) for e in range(2)) > 0
