"""Fault tolerance: kills during training, checkpointing and export; corrupt inputs; full disks.

The kill tests run the victim in a child process and kill it for real (SIGKILL, or SIGXFSZ from
a file-size limit in the middle of a ``write``), then check what a reader finds on disk.
Training runs use ``configs/tiny.yaml`` cut to 12 batches per epoch, 2 epochs, a checkpoint every
4 steps; the CPU run is deterministic, so a resumed run must match an uninterrupted one exactly
(``RESUME_TOL``, measured difference 0.0).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twotower import export as export_mod
from twotower.export import (
    ArtifactError,
    read_manifest,
    sha256_file,
    write_artifact,
)
from twotower.retrieve import Retriever

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
GOLDEN = REPO / "tests" / "golden"
RUN = {
    "trainer.max_epochs": 2,
    "trainer.limit_train_batches": 12,
    "checkpoint.every_n_train_steps": 4,
}
STEPS = 24  # 2 epochs x 12 batches
KILL_AT = 17  # epoch 1, batch 5: the newest checkpoint is step 16 (epoch 1, 4 batches in)
RESUME_TOL = 1e-6  # stated tolerance; measured: identical metrics (difference 0.0)
SUBPROCESS_TIMEOUT = 600

# The victim: train.py with a hook that kills the process at a chosen point.
KILLER = r"""
import glob, os, resource, signal, sys
from twotower.model.module import TwoTowerModule

kill_after = int(os.environ.get("TT_KILL_AFTER_STEP", "0"))
fsize_at = int(os.environ.get("TT_FSIZE_AT_STEP", "0"))
end, start = TwoTowerModule.on_train_batch_end, TwoTowerModule.on_train_batch_start

def on_train_batch_start(self, batch, batch_idx):
    start(self, batch, batch_idx)
    if fsize_at and self.global_step == fsize_at - 1:
        # the checkpoint of this step will be cut off in the middle of a write: the kernel
        # sends SIGXFSZ (default action: terminate) when a file passes the size limit
        last = glob.glob("**/last.ckpt", recursive=True)[0]
        limit = os.path.getsize(last) // 2
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        print("FSIZE", limit, flush=True)

def on_train_batch_end(self, outputs, batch, batch_idx):
    end(self, outputs, batch, batch_idx)  # callbacks (the checkpoint) have run by now
    if kill_after and self.global_step >= kill_after:
        os.kill(os.getpid(), signal.SIGKILL)

TwoTowerModule.on_train_batch_start = on_train_batch_start
TwoTowerModule.on_train_batch_end = on_train_batch_end
from twotower.train import main
main(sys.argv[1:])
"""


def _cli(overrides: dict) -> list[str]:
    from twotower.train import cli_args

    return cli_args([TINY], overrides)


def _metrics(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def _run_victim(workdir: Path, overrides: dict, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", KILLER, *_cli(overrides)],
        cwd=workdir,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


# streamed from the prepared Parquet blocks, several blocks, two blocks per shuffle buffer
STREAMED = {"data.streaming": True, "data.block_rows": 400, "data.shuffle_blocks": 2}


def _straight(tmp_path_factory, cache_dir: Path, extra: dict) -> dict[str, float]:
    from twotower.train import fit

    work = tmp_path_factory.mktemp("straight")
    old = os.getcwd()
    os.chdir(work)
    try:
        trainer, _, _ = fit([TINY], {**RUN, **extra, "data.cache_dir": str(cache_dir)})
    finally:
        os.chdir(old)
    assert trainer.global_step == STEPS
    return _metrics(trainer)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir) -> dict[str, float]:
    """Metrics of the uninterrupted run."""
    return _straight(tmp_path_factory, cache_dir, {})


@pytest.fixture(scope="module")
def straight_streamed(tmp_path_factory, cache_dir) -> dict[str, float]:
    """Metrics of the uninterrupted streamed run."""
    return _straight(tmp_path_factory, cache_dir, STREAMED)


def _resume(
    work: Path, cache_dir: Path, monkeypatch, extra: dict | None = None
) -> tuple[object, dict[str, float]]:
    from twotower.train import fit

    monkeypatch.chdir(work)
    overrides = {**RUN, **(extra or {}), "data.cache_dir": str(cache_dir)}
    trainer, _, _ = fit([TINY], overrides, ckpt_path="last")
    return trainer, _metrics(trainer)


def _assert_same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert abs(a[k] - b[k]) <= RESUME_TOL, (k, a[k], b[k])


# ------------------------------------------------------------------------------ training kills
@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_sigkill_mid_epoch_then_resume_last_matches_straight_run(
    tmp_path, cache_dir, streamed, request, monkeypatch
) -> None:
    extra = STREAMED if streamed else {}
    expected = request.getfixturevalue("straight_streamed" if streamed else "straight")
    res = _run_victim(
        tmp_path,
        {**RUN, **extra, "data.cache_dir": str(cache_dir)},
        TT_KILL_AFTER_STEP=str(KILL_AT),
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    last = tmp_path / "runs" / "twotower" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert (ckpt["global_step"], ckpt["epoch"]) == (16, 1)  # mid-epoch: 4 of 12 batches done
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"batches": 4}]

    trainer, metrics = _resume(tmp_path, cache_dir, monkeypatch, extra)
    assert trainer.global_step == STEPS and trainer.current_epoch == 2
    # resumed in place: the run's own folder, not a fresh version_1 that starts from scratch
    assert sorted(p.name for p in (tmp_path / "runs" / "twotower").iterdir()) == ["version_0"]
    _assert_same(metrics, expected)
    if streamed:  # the streamed run is its own: another order than the in-memory one
        assert trainer.datamodule.data.train_sequences is None  # plays never loaded whole
        assert len(trainer.datamodule.data.blocks) > 2


@pytest.mark.slow
def test_kill_while_writing_checkpoint_keeps_last_intact(
    tmp_path, cache_dir, straight, monkeypatch
) -> None:
    """The process dies (SIGXFSZ) half-way through writing the step-20 checkpoint.

    (Lightning defers step checkpoints until the monitored validation metric exists, so the
    first mid-epoch saves are in epoch 1: steps 16 and 20.)
    """
    res = _run_victim(tmp_path, {**RUN, "data.cache_dir": str(cache_dir)}, TT_FSIZE_AT_STEP="20")
    assert res.returncode == -signal.SIGXFSZ, res.stdout[-2000:] + res.stderr[-3000:]
    limit = int(res.stdout.split("FSIZE")[1].split()[0])
    folder = tmp_path / "runs" / "twotower" / "version_0" / "checkpoints"
    partial = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(partial) == 1 and partial[0].stat().st_size == limit  # cut mid-write
    ckpt = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 16  # the previous checkpoint, complete
    trainer, metrics = _resume(tmp_path, cache_dir, monkeypatch)
    assert trainer.global_step == STEPS
    _assert_same(metrics, straight)


def _small_checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "global_step": int(value)}


def test_checkpoint_write_failure_keeps_previous(tmp_path, monkeypatch) -> None:
    """Disk full in the middle of ``torch.save``: a clear error, the old last.ckpt intact."""
    from twotower.train import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_small_checkpoint(1.0), path)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint .*last.ckpt.*unchanged"):
        io.save_checkpoint(_small_checkpoint(2.0), path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left
    assert io.load_checkpoint(path)["global_step"] == 1
    io.save_checkpoint(_small_checkpoint(3.0), path)  # and the next save works
    assert io.load_checkpoint(path)["global_step"] == 3


# ------------------------------------------------------------------------------ export kills
ZYGOTE = r"""
import json, os, random, signal, sys, time, shutil
sys.path.insert(0, sys.argv[1])
from make_golden import planted_parts
from twotower import export as export_mod
from twotower.export import ArtifactError, read_manifest, verify_artifact, write_artifact

out, mode, seed = sys.argv[2], sys.argv[3], int(sys.argv[4])
parent, name = os.path.dirname(out), os.path.basename(out)
rng = random.Random(seed)
TARGETS = {"os.rename": (os, "rename"), "os.replace": (os, "replace"),
           "shutil.rmtree": (shutil, "rmtree"), "fsync": (os, "fsync")}
for attr in ("_exchange", "rename_exchange", "_rename_exchange"):
    if hasattr(export_mod, attr):
        TARGETS["exchange"] = (export_mod, attr)

def write(gen, kill):
    if kill is not None:
        obj, attr = TARGETS[kill[0]]
        real, count = getattr(obj, attr), [0]
        def wrapped(*a, **kw):
            r = real(*a, **kw)
            count[0] += 1
            if count[0] == kill[1]:
                os.kill(os.getpid(), signal.SIGKILL)  # right after the call took effect
            return r
        setattr(obj, attr, wrapped)
    parts = planted_parts(seed=gen % 2)
    parts.pop("cluster")
    write_artifact(out, index="Flat", extra={"generation": gen}, **parts)

def spawn(gen, kill=None):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            write(gen, kill)
            code = 0
        finally:
            os._exit(code)
    return pid

def state():
    s = {"out_ok": False, "generation": None, "leftovers": []}
    try:
        s["generation"] = verify_artifact(out).get("generation")
        s["out_ok"] = True
    except ArtifactError as e:
        s["error"] = str(e)
    for entry in sorted(os.listdir(parent)):
        if entry != name:
            p = os.path.join(parent, entry)
            try:
                verify_artifact(p)
                valid = True
            except ArtifactError:
                valid = False
            s["leftovers"].append([entry, valid, os.path.exists(os.path.join(p, "manifest.json"))])
    return s

def report(**kw):
    print(json.dumps(kw), flush=True)

t0 = time.perf_counter()
_, status = os.waitpid(spawn(0), 0)
assert status == 0, status
duration = time.perf_counter() - t0
done, gen = 0, 0
if mode == "random":
    for _ in range(int(sys.argv[5])):
        gen += 1
        pid = spawn(gen)
        time.sleep(rng.uniform(0, 1.3 * duration))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
        completed = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        st = state()
        report(kill="random", gen=gen, prev=done, completed=completed, **st)
        # a kill after the commit's swap but before exit leaves the new export live: what
        # counts as "previous" for the next attempt is what the path really holds
        done = st["generation"] if st["generation"] is not None else done
else:
    for target in TARGETS:
        k = 1
        while True:
            gen += 1
            _, status = os.waitpid(spawn(gen, (target, k)), 0)
            completed = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            st = state()
            report(kill=f"{target}#{k}", gen=gen, prev=done, completed=completed,
                   killed=killed, **st)
            done = st["generation"] if st["generation"] is not None else done
            if not killed:
                break
            k += 1
report(end=True, duration=duration)
"""


def _kill_exports(tmp_path: Path, mode: str, n: int = 0) -> list[dict]:
    out = tmp_path / "exports" / "art"
    out.parent.mkdir()
    res = subprocess.run(
        [sys.executable, "-c", ZYGOTE, str(GOLDEN), str(out), mode, "0", str(n)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert rows and rows[-1].get("end")
    return rows[:-1]


def _check_export_invariants(rows: list[dict]) -> None:
    for r in rows:
        # the path always holds a complete, verified export: the previous one or the new one
        assert r["out_ok"], r
        assert r["generation"] in (r["prev"], r["gen"]), r
        if r["completed"]:
            assert r["generation"] == r["gen"], r
        # anything else is hidden scratch space named after the export; whatever carries a
        # manifest there is complete and verifies (a half-written folder never looks valid)
        for entry, valid, has_manifest in r["leftovers"]:
            assert entry.startswith(".art."), r
            assert valid or not has_manifest, r


@pytest.mark.slow
def test_export_killed_after_every_commit_step(tmp_path) -> None:
    """SIGKILL right after each rename / fsync / delete of the commit: the path stays valid."""
    rows = _kill_exports(tmp_path, "steps")
    assert sum(r["killed"] for r in rows) >= 5
    _check_export_invariants(rows)


@pytest.mark.slow
def test_export_killed_at_random_times(tmp_path) -> None:
    rows = _kill_exports(tmp_path, "random", n=12)
    print(f"{sum(not r['completed'] for r in rows)} of {len(rows)} exports killed mid-way")
    _check_export_invariants(rows)


def test_export_disk_full_is_a_clear_error_and_keeps_previous(tmp_path, monkeypatch) -> None:
    sys.path.insert(0, str(GOLDEN))
    from make_golden import planted_parts

    parts = planted_parts()
    parts.pop("cluster")
    out = tmp_path / "art"
    write_artifact(out, index="Flat", **parts)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_mod.np, "save", full)
    with pytest.raises(ArtifactError, match=r"disk full.*previous export .* is unchanged"):
        write_artifact(out, index="Flat", **parts)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ------------------------------------------------------------------------------ real full disk
@pytest.fixture
def tiny_fs(tmp_path):
    """A 192 KiB tmpfs (needs root / CAP_SYS_ADMIN; skipped otherwise)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.strip() or res.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_disk_full_export_and_checkpoint(tiny_fs) -> None:
    sys.path.insert(0, str(GOLDEN))
    from make_golden import planted_parts

    from twotower.train import AtomicCheckpointIO

    small = planted_parts()
    small.pop("cluster")
    out = tiny_fs / "art"
    write_artifact(out, index="Flat", **small)
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    big = planted_parts(n_clusters=4, per_cluster=2000, dim=8)  # ~1 MB of files: does not fit
    big.pop("cluster")
    with pytest.raises((ArtifactError, RuntimeError), match=r"No space left on device"):
        write_artifact(out, index="Flat", **big)
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["art"]
    Retriever.load(out)

    io = AtomicCheckpointIO()
    ckpt = tiny_fs / "last.ckpt"
    io.save_checkpoint(_small_checkpoint(1.0), ckpt)
    huge = {"state_dict": {"w": torch.zeros(256, 256)}, "global_step": 2}  # 256 KiB
    with pytest.raises(OSError, match=r"could not write checkpoint .*No space left"):
        io.save_checkpoint(huge, ckpt)
    assert io.load_checkpoint(ckpt)["global_step"] == 1
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["art", "last.ckpt"]


# ------------------------------------------------------------------------------ bad artifacts
@pytest.fixture
def golden_copy(tmp_path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(GOLDEN / "artifact", art)
    return art


def _rewrite_manifest(art: Path, change) -> None:
    """Apply ``change`` to the manifest and re-sign every file (as a careless writer would)."""
    manifest = json.loads((art / "manifest.json").read_text())
    change(manifest)
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        for f in art.iterdir():
            if f.name in manifest["files"] and isinstance(manifest["files"][f.name], dict):
                manifest["files"][f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    (art / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "name", ["index.faiss", "items.parquet", "item_embeddings.npy", "vocab.json", "query_tower.pt"]
)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_artifact_refused_everywhere(golden_copy, name, damage, capsys) -> None:
    from twotower.cli import main
    from twotower.serve.app import create_app

    f = golden_copy / name
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 3] ^= 0x5A
        f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=name):
        Retriever.load(golden_copy)
    with pytest.raises(ArtifactError, match=name):
        create_app(golden_copy)
    assert main(["similar", "--artifacts", str(golden_copy), "--track", "g00"]) == 2
    assert name in capsys.readouterr().err


def test_newer_format_refused_by_service_and_cli(golden_copy, capsys) -> None:
    from twotower.cli import main
    from twotower.serve.app import create_app

    _rewrite_manifest(golden_copy, lambda m: m.update(format_version="2.0"))
    with pytest.raises(ArtifactError, match=r"format 2.0 is newer"):
        create_app(golden_copy)
    assert main(["recommend", "--artifacts", str(golden_copy), "--history", "g00"]) == 2
    assert "newer" in capsys.readouterr().err


def test_index_dimension_must_match_the_query_tower(golden_copy) -> None:
    import faiss

    # an index of the right size but 4-dimensional vectors (the tower and manifest say 8)
    index = faiss.IndexFlatIP(4)
    index.add(np.random.default_rng(0).normal(size=(24, 4)).astype(np.float32))
    faiss.write_index(index, str(golden_copy / "index.faiss"))
    _rewrite_manifest(golden_copy, lambda m: None)
    with pytest.raises(ArtifactError, match=r"index.faiss: index holds 24 vectors of dim 4"):
        Retriever.load(golden_copy)


def test_query_tower_dimension_must_match_the_index(golden_copy) -> None:
    """A query tower that outputs 16-d vectors for an 8-d index: refused at load, not at query."""
    from twotower.model.towers import QueryTower

    m = read_manifest(golden_copy)
    args = {**m["query_tower"]["args"], "dim": 16}
    torch.save(QueryTower(**args).state_dict(), golden_copy / "query_tower.pt")
    _rewrite_manifest(golden_copy, lambda m: m["query_tower"]["args"].update(dim=16))
    with pytest.raises(ArtifactError, match=r"query tower .*16.*index .*8|dim"):
        Retriever.load(golden_copy)


def test_writer_refuses_a_tower_that_does_not_match_the_items(tmp_path) -> None:
    sys.path.insert(0, str(GOLDEN))
    from make_golden import planted_parts, planted_tower

    parts = planted_parts()
    parts.pop("cluster")
    parts["query_tower"] = planted_tower(np.zeros((24, 16), np.float32))  # 16-d queries
    with pytest.raises(ValueError, match=r"16.*8|8.*16"):
        write_artifact(tmp_path / "art", index="Flat", **parts)
    assert not (tmp_path / "art").exists()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_KEYS = ["num_items", "dim", "query_tower", "index", "files", "format_version", "metric", "data"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.sampled_from(_KEYS), value=_JSON, delete=st.booleans())
def test_fuzzed_manifest_gives_only_artifact_errors(golden_copy, key, value, delete) -> None:
    """The manifest is the one file no checksum covers: any damage to it is a clean refusal."""
    original = (golden_copy / "manifest.json").read_text()
    try:

        def change(m: dict) -> None:
            if delete:
                m.pop(key, None)
            else:
                m[key] = value

        _rewrite_manifest(golden_copy, change)
        try:
            Retriever.load(golden_copy)
        except ArtifactError:
            pass
    finally:
        (golden_copy / "manifest.json").write_text(original)


# ------------------------------------------------------------------------------ data cache
@pytest.fixture
def tiny_cfg(tmp_path):
    from twotower.data.pipeline import DataConfig

    return DataConfig(format="synthetic", options={"preset": "tiny"}, cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize(
    "victim",
    ["plays/part-00000.parquet", "items.parquet", "valid.parquet", "test.parquet", "header.json"],
)
def test_truncated_cache_file_is_detected_and_rebuilt(tiny_cfg, victim, caplog) -> None:
    from twotower.data.pipeline import cache_path, prepare_data

    first = prepare_data(tiny_cfg)
    folder = cache_path(tiny_cfg)
    f = folder / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="twotower"):
        again = prepare_data(tiny_cfg)
    assert "unusable, rebuilding" in caplog.text
    np.testing.assert_array_equal(again.train.items, first.train.items)
    assert again.item_vocab == first.item_vocab
    caplog.clear()
    with caplog.at_level("INFO", logger="twotower"):
        prepare_data(tiny_cfg)  # the rebuilt cache is whole again
    assert "prepared data found" in caplog.text


def test_disk_full_while_caching_keeps_other_results(tiny_cfg, monkeypatch) -> None:
    import dataclasses

    from twotower.data import prepared as prepared_mod
    from twotower.data.pipeline import cache_path, prepare_data

    prepare_data(tiny_cfg)
    kept = cache_path(tiny_cfg)
    before = {p: p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    other = dataclasses.replace(tiny_cfg, seed=1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepared_mod.pq, "ParquetWriter", full)
    with pytest.raises(OSError, match="No space left"):
        prepare_data(other)
    monkeypatch.undo()
    assert not cache_path(other).exists()
    assert [p.name for p in kept.parent.iterdir()] == [kept.name]  # no half-written folder
    assert {p: p.read_bytes() for p in kept.rglob("*") if p.is_file()} == before
