"""The artifact folder writer (from a checkpoint or raw parts); reader: :mod:`twotower.artifact`.

Layout (``FORMAT_VERSION`` 1.x; see DESIGN.md "Artifact folder")::

    manifest.json        format version, created, package version, QueryTower class + args,
                         dim, metric, index factory + search params + measured ANN recall@10,
                         data fingerprint and split, run metrics, sha256 + size of every file
    index.faiss          item vectors; row i = items.parquet row i = item index i + 2
    items.parquet        track_id, title, artist, plays (training play count)
    item_embeddings.npy  the same vectors, float32 or float16
    user_embeddings.npy  optional: latest query vector of every known listener (users.parquet)
    users.parquet        optional: row -> user_id
    vocab.json           {"tracks": {id: index}, "users": {...}, "contexts": {...}} (0 pad, 1 OOV)
                         (hashed vocabulary, format 1.1: manifest ``item_vocab`` holds
                         ``HashVocab.to_dict()``; one row per bucket, its most played raw id
                         as track_id, all its raw training ids in items.parquet ``raw_ids``)
    query_tower.pt       QueryTower state dict (torch.load(weights_only=True))
    query_tower.onnx     optional; checked against torch with onnxruntime at export time
    holdout.parquet      held-out test examples (query_id, history, target, hour, context_type)
                         for demo and review pages

Writes are atomic: everything goes to a hidden temporary folder beside ``out`` (manifest last),
files and folder are fsynced, then the folder is renamed into place. An existing export at
``out`` stays intact until the new one is complete (it is renamed aside, the new one renamed in,
then the old one deleted). A crash leaves at most a hidden ``.NAME.tmp-*`` folder without a
manifest, which no reader accepts.

This module imports neither Lightning nor the model at import time: the Retriever reads
artifacts through :func:`verify_artifact` without them.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from twotower import __version__
from twotower.artifact import (  # noqa: F401  (the reader side is re-exported here)
    FORMAT_MAJOR,
    FORMAT_VERSION,
    HASHED_FORMAT_VERSION,
    HOLDOUT_FILE,
    MANIFEST,
    ONNX_FILE,
    QUERY_TOWER_FILE,
    REQUIRED_FILES,
    TUNE_QUERIES,
    ArtifactError,
    load_query_tower,
    read_manifest,
    sha256_file,
    tower_class,
    verify_artifact,
)
from twotower.index import (
    build_index,
    get_search_params,
    save_index,
    search_param_name,
    tune_index,
)
from twotower.model.ensemble import bias_columns
from twotower.onnx_export import ONNX_TOLERANCE, export_onnx  # noqa: F401
from twotower.query import (
    CLOCK_FIELDS,
    FIELDS,
    QueryBatch,
    QuerySpec,
    left_pad_last,
    play_clock,
)

log = logging.getLogger("twotower")


# ---------------------------------------------------------------------------------- writing
@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success move it to ``out`` atomically.

    An existing ``out`` must be an artifact (holds ``manifest.json``) or empty. On Linux the
    new folder and ``out`` are swapped in one atomic ``renameat2(RENAME_EXCHANGE)``, so ``out``
    always holds a complete export, even under SIGKILL; elsewhere ``out`` is renamed aside, the
    new folder renamed in, then the old one deleted. On any error the temporary folder is
    removed and ``out`` is untouched.

    Raises:
        ArtifactError: ``out`` exists and is neither empty nor an artifact folder, or the disk
            filled up while writing (the previous export is unchanged).
    """
    out = Path(out)
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())
    ):
        raise ArtifactError(f"refusing to replace {out}: it exists and is not an artifact folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the artifact from a serving user
        yield tmp
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if out.exists() and _exchange(tmp, out):
            _fsync(out.parent)
            (tmp / MANIFEST).unlink()  # tmp now holds the previous export: invalidate, delete
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        _fsync(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise ArtifactError(
                f"could not write the export {out}: {e} (disk full?); "
                f"the previous export at {out}, if any, is unchanged"
            ) from e
        raise


def _disk_full(e: BaseException) -> bool:
    """An out-of-space error (OSError, or FAISS's RuntimeError that quotes strerror)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    text = str(e) if isinstance(e, RuntimeError) else ""
    return "No space left on device" in text or "File too large" in text


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where that is unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_artifact(
    out: str | Path,
    *,
    query_tower: nn.Module,
    item_emb: np.ndarray | torch.Tensor,
    items: pd.DataFrame,
    vocab: dict[str, list[str]],
    index: str = "auto",
    metric: str = "ip",
    tune_queries: np.ndarray | torch.Tensor | None = None,
    target_recall: float = 0.95,
    dtype: str = "float32",
    user_emb: np.ndarray | None = None,
    onnx: bool = False,
    history_len: int | None = None,
    holdout: pd.DataFrame | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Build the index and write a complete artifact folder atomically.

    Args:
        out: Destination folder (replaced atomically when it holds an older export).
        query_tower: A query tower with a JSON-serialisable ``config`` property
            (``type(tower)(**tower.config)`` rebuilds it).
        item_emb: Vectors of the real tracks ``[N, d]`` (row i = item index i + 2).
        items: ``[N]`` rows: track_id (= ``vocab["tracks"][i]``), title, artist, optional plays.
        vocab: Raw ids in index order without pad/OOV: ``tracks`` (N), ``users``, ``contexts``.
        index: ``"auto"`` or a FAISS factory string (see :func:`twotower.index.build_index`).
        metric: ``"ip"`` or ``"l2"``.
        tune_queries: Representative query vectors ``[Q, d]`` for tuning the ANN index and
            measuring its recall@10; None uses up to 2,000 item vectors as proxy queries.
        target_recall: Recall@10 vs exact that tuning aims for.
        dtype: ``"float32"`` or ``"float16"`` for ``item_embeddings.npy`` (the index always
            holds float32 vectors).
        user_emb: Optional ``[U, d]`` query vectors of ``vocab["users"]`` (row order).
        onnx: Also write ``query_tower.onnx`` and check it against torch (fails above 1e-4).
        history_len: Events of history the query tower was trained/evaluated with (default its
            ``max_len``); the Retriever truncates histories to it.
        holdout: Optional held-out examples for ``holdout.parquet``.
        extra: More manifest entries (data, metrics, checkpoint, ...).

    Returns:
        The artifact folder.
    """
    out = Path(out)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    emb = np.ascontiguousarray(
        item_emb.detach().cpu().float().numpy() if isinstance(item_emb, torch.Tensor) else item_emb,
        dtype=np.float32,
    )
    tracks = [str(t) for t in vocab["tracks"]]
    if emb.ndim != 2 or emb.shape[0] != len(tracks) or len(items) != len(tracks):
        raise ValueError(
            f"item_emb {emb.shape}, items ({len(items)} rows) and vocab['tracks'] "
            f"({len(tracks)}) must all have one row per real track"
        )
    if items["track_id"].astype(str).tolist() != tracks:
        raise ValueError("items.track_id must equal vocab['tracks'] row for row")
    config = dict(query_tower.config)
    cls = f"{type(query_tower).__module__}.{type(query_tower).__qualname__}"
    dim = emb.shape[1]
    if int(config.get("dim", dim)) != dim:
        raise ValueError(
            f"the query tower makes {config.get('dim')}-d vectors but item_emb is {dim}-d"
        )
    if bias_columns(config) and metric != "ip":
        raise ValueError(
            f"metric={metric!r}: an item_bias model scores by inner product (coordinates "
            f"{bias_columns(config)} are item biases, not positions); export it with metric='ip'"
        )
    history_len = int(history_len or config.get("max_len", 50))

    t0 = time.perf_counter()
    faiss_index = build_index(emb, index, metric)
    build_s = time.perf_counter() - t0
    if tune_queries is None:
        rng = np.random.default_rng(0)
        tune_queries = emb[np.sort(rng.choice(len(emb), min(len(emb), 2000), replace=False))]
        tuned_on = "item vectors (no validation queries given)"
    else:
        tuned_on = "validation queries"
    tune_queries = np.ascontiguousarray(
        tune_queries.detach().cpu().float().numpy()
        if isinstance(tune_queries, torch.Tensor)
        else tune_queries,
        dtype=np.float32,
    )[:TUNE_QUERIES]
    tuned = tune_index(faiss_index, emb, tune_queries, 10, target_recall, metric)
    tune_s = time.perf_counter() - t0 - build_s
    log.info(
        "index %s (%d vectors, dim %d) built in %.1fs, tuned %s",
        _factory_of(index, emb),
        faiss_index.ntotal,
        faiss_index.d,
        build_s,
        tuned,
    )

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
        # the query contract: every input's name, dtype, shape, padding and "unknown" value
        "query_tower": {
            "class": cls,
            "args": config,
            **QuerySpec.from_config(config, history_len).describe(),  # history_len too
        },
        "dim": dim,
        "metric": metric,
        "num_items": len(tracks),
        "item_dtype": dtype,
        "index": {
            "file": "index.faiss",
            "spec": index,
            "factory": _factory_of(index, emb),
            "metric": metric,
            "ntotal": int(faiss_index.ntotal),
            "search_params": get_search_params(faiss_index),
            "tuned_param": search_param_name(faiss_index),
            "ann_recall": float(tuned["recall_at_10"]),
            "recall_k": 10,
            "target_recall": target_recall,
            "tuned_on": tuned_on,
            "tune_queries": len(tune_queries),
            "build_seconds": round(build_s, 3),
            "tune_seconds": round(tune_s, 3),
        },
    }
    with atomic_folder(out) as tmp:
        save_index(faiss_index, tmp / "index.faiss")
        items.reset_index(drop=True).to_parquet(tmp / "items.parquet", index=False)
        np.save(tmp / "item_embeddings.npy", emb.astype(dtype), allow_pickle=False)
        vocab_json = {
            "tracks": {t: i + 2 for i, t in enumerate(tracks)},
            "users": {str(u): i + 2 for i, u in enumerate(vocab.get("users", []))},
            "contexts": {str(c): i + 2 for i, c in enumerate(vocab.get("contexts", []))},
        }
        (tmp / "vocab.json").write_text(json.dumps(vocab_json))
        state = {k: v.detach().cpu().contiguous() for k, v in query_tower.state_dict().items()}
        torch.save(state, tmp / QUERY_TOWER_FILE)
        if user_emb is not None:
            users = [str(u) for u in vocab.get("users", [])]
            if user_emb.shape != (len(users), dim):
                raise ValueError(f"user_emb {user_emb.shape} != ({len(users)}, {dim})")
            np.save(tmp / "user_embeddings.npy", user_emb.astype(dtype), allow_pickle=False)
            pd.DataFrame({"user_id": pd.Series(users, dtype="string")}).to_parquet(
                tmp / "users.parquet", index=False
            )
            manifest["users"] = {"count": len(users), "file": "user_embeddings.npy"}
        if holdout is not None:
            holdout.to_parquet(tmp / HOLDOUT_FILE, index=False)
        if onnx:
            manifest["onnx"] = export_onnx(query_tower, tmp / ONNX_FILE, history_len)
        manifest.update(extra or {})
        # the version follows what is written: hashed vocabularies (their hash descriptions,
        # a raw_ids column) are format 1.1, whoever calls the writer
        hashed = any(
            (manifest.get(key) or {}).get("kind") == "hash" for key in ("item_vocab", "user_vocab")
        )
        if hashed or "raw_ids" in items.columns:
            manifest["format_version"] = HASHED_FORMAT_VERSION
        manifest["files"] = {
            f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
            for f in sorted(tmp.iterdir())
        }
        # the manifest is what makes a folder look like an export: write it whole or not at
        # all (a kill in the middle of write_text left a truncated manifest.json in scratch)
        part = tmp / f"{MANIFEST}.part"
        part.write_text(json.dumps(manifest, indent=1, default=_json_default))
        os.replace(part, tmp / MANIFEST)
    return out


def _factory_of(spec: str, emb: np.ndarray) -> str:
    from twotower.index import auto_spec

    return auto_spec(*emb.shape) if spec == "auto" else spec


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


# ---------------------------------------------------------------------------------- checkpoint
def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def load_checkpoint_dict(checkpoint: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint with ``weights_only=True`` (never unpickling objects).

    Raises:
        FileNotFoundError: No such file.
        ArtifactError: The checkpoint holds objects that weights-only loading refuses.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError variants
        raise ArtifactError(f"{path}: cannot be loaded with weights_only=True ({e})") from e


def _training_checkpoint(path: str) -> dict[str, Any]:
    """A training checkpoint read with ``weights_only=True``, checked for its twotower keys."""
    ckpt = load_checkpoint_dict(path)
    for key in ("state_dict", "hyper_parameters", "datamodule_hyper_parameters"):
        if key not in ckpt:
            raise ArtifactError(f"{path}: no {key!r}: not a twotower training checkpoint")
    return ckpt


def _module_of(ckpt: dict[str, Any]) -> nn.Module:
    """The ``TwoTowerModule`` of a training checkpoint's dict, data info restored."""
    from twotower.model.module import TwoTowerModule

    module = TwoTowerModule(**_init_kwargs(TwoTowerModule, ckpt["hyper_parameters"]))
    module.load_state_dict(ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)
    return module


def _checkpoint_metrics(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Monitor, best and last score of the checkpoint callback (empty when absent)."""
    for key, state in (ckpt.get("callbacks") or {}).items():
        if "ModelCheckpoint" in str(key) and isinstance(state, dict) and state.get("monitor"):

            def num(x: Any) -> float | None:
                return None if x is None else float(x)

            return {
                "monitor": state["monitor"],
                "best": num(state.get("best_model_score")),
                "last": num(state.get("current_score")),
            }
    return {}


@torch.no_grad()
def _query_vectors(
    tower: nn.Module, query: QueryBatch, device: torch.device, batch_size: int
) -> np.ndarray:
    """Query vectors ``[Q, dim]`` of a :class:`~twotower.query.QueryBatch`, in batches."""
    out = [
        tower(query[s : s + batch_size].to(device)).float().cpu().numpy()  # [b, dim]
        for s in range(0, len(query), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, int(tower.config["dim"])), np.float32)


def _latest_training_rows(
    data: Any, window: int, columns: Callable[[Any], tuple[dict[str, np.ndarray], np.ndarray]]
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The latest ``window`` kept training rows of every user, read block by block.

    A streamed dataset is never held whole: each block (whole sequences) keeps only its last
    ``window`` rows per user, and a user whose sequences span blocks is cut again later.

    Returns:
        The columns of the kept rows, their user index and their time (``[R]`` each), in the
        blocks' order.
    """
    parts: list[dict[str, np.ndarray]] = []
    users, times = [], []
    for b in data.blocks:
        seqs = data.block(b)
        cols, keep = columns(seqs)
        user_of = np.repeat(seqs.users, seqs.lengths)  # [n]
        rows = np.flatnonzero(keep & (user_of >= 2) & (cols["history"] >= 2))
        order = rows[np.lexsort((seqs.timestamps[rows], user_of[rows]))]  # by user, then time
        u = user_of[order]
        last = np.append(np.flatnonzero(u[1:] != u[:-1]), len(u) - 1)  # last row of each user
        to_end = np.repeat(last, np.diff(np.append(-1, last))) - np.arange(len(u))
        sel = order[to_end < window]
        parts.append({k: v[sel] for k, v in cols.items()})
        users.append(user_of[sel])
        times.append(seqs.timestamps[sel])
    keys = parts[0].keys() if parts else ()
    cols = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    return (
        cols,
        np.concatenate(users or [np.zeros(0, np.int64)]),
        np.concatenate(times or [np.zeros(0, np.int64)]),
    )


def _latest_per_user(
    data: Any,
    window: int,
    columns: Callable[[Any], tuple[dict[str, np.ndarray], np.ndarray]],
    test: dict[str, np.ndarray] | None = None,
    test_offsets: np.ndarray | None = None,
    target: dict[str, np.ndarray] | None = None,
    fill: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Latest ``window`` values of per-play columns for every user index ``2..U-1``.

    A user's latest plays are their test example's plays plus its target (the most recent
    example) when they have one, else the kept rows of their training sequences in time order.
    Plays of ids unknown to the model (``history`` below 2) are left out with their columns.

    Args:
        data: Prepared data (training blocks, ``test`` evaluation set).
        window: Plays kept per user (the most recent).
        columns: For the sequences of one block: per-row columns ``[n]`` (``history`` among
            them) and the rows to use ``[n]`` (e.g. positives only).
        test: Per test-history-play columns ``[M]`` (same keys), None: no test override.
        test_offsets: Query offsets into ``test`` ``[Q+1]``.
        target: Per test query ``[Q]``: the target's value of each column, appended as the
            latest play when the target is known.
        fill: Padding value per column (default 0).

    Returns:
        Each column left-padded to ``[U-2, window]`` int64.
    """
    fill = fill or {}
    train, user_of, times = _latest_training_rows(data, window, columns)  # [R] each
    order = np.lexsort((times, user_of))  # by user, then time
    counts = np.bincount(user_of[order], minlength=data.num_users)  # [U]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = {
        k: left_pad_last(v[order].astype(np.int64), offsets, window, fill.get(k, 0))
        for k, v in train.items()
    }  # [U, window] each
    te = data.test
    if len(te) and test is not None and test_offsets is not None and target is not None:
        has_target = te.targets >= 2  # [Q]
        q_of = np.repeat(np.arange(len(te)), np.diff(test_offsets))  # [M]
        q_all = np.concatenate([q_of, np.flatnonzero(has_target)])
        vals = {
            k: np.concatenate([v, target[k][has_target]]).astype(np.int64) for k, v in test.items()
        }  # [M + targets] each
        pos = np.concatenate([np.arange(len(q_of)), np.full(has_target.sum(), len(q_of))])
        real = vals["history"] >= 2
        order = np.flatnonzero(real)[np.lexsort((pos[real], q_all[real]))]  # by query, position
        t_off = np.concatenate([[0], np.cumsum(np.bincount(q_all[real], minlength=len(te)))])
        last_row = {int(u): q for q, u in enumerate(te.users) if u >= 2}  # latest example wins
        users = np.fromiter(last_row.keys(), dtype=np.int64, count=len(last_row))
        latest = np.fromiter(last_row.values(), dtype=np.int64, count=len(last_row))
        for k, v in vals.items():
            out[k][users] = left_pad_last(v[order], t_off, window, fill.get(k, 0))[latest]
    return {k: v[2:] for k, v in out.items()}


def _latest_user_histories(data: Any, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Latest ``window`` positive events of every user index ``2..U-1``: ``[U-2, window]``.

    See :func:`_latest_per_user` (the positive plays and the history column only). Returns the
    left-padded histories and a mask of users that have any event.
    """
    te = data.test
    hist = _latest_per_user(
        data,
        window,
        lambda seqs: ({"history": seqs.items}, seqs.positive.astype(bool)),
        {"history": te.history},
        te.offsets,
        {"history": te.targets},
    )["history"]
    return hist, (hist != 0).any(axis=1)


def _latest_user_plays(data: Any, window: int) -> dict[str, np.ndarray]:
    """Latest ``window`` plays of every user index ``2..U-1`` with their per-play signals.

    For towers that read the per-play signals: every play (skipped ones marked), the gap
    bucket of each as in training (``Sequences.play_gaps`` over each training sequence; the
    evaluation sets' ``plays_gaps``, the target's being the test ``request_gaps``) and the hour
    of day and weekday of each (:func:`twotower.query.play_clock` of its time); see
    :func:`_latest_per_user`.

    Returns:
        ``history``, ``skips``, ``gaps``, ``play_hours``, ``play_weekdays``: ``[U-2, window]``
        int64, left-padded with 0 (the clock with -1, unknown).
    """
    te = data.test

    def train(seqs: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
        cols = {
            "history": seqs.items,
            "skips": ~seqs.positive.astype(bool),
            "gaps": seqs.play_gaps(),  # as the training windows read them (whole sequences)
            **dict(zip(CLOCK_FIELDS, play_clock(seqs.timestamps), strict=True)),
        }
        return cols, np.ones(len(seqs.items), dtype=bool)  # every play

    fill = {f.name: f.unknown for f in FIELDS if f.name in CLOCK_FIELDS}  # -1: unknown
    if te.plays is None:  # an evaluation set without plays: training plays only
        return _latest_per_user(data, window, train, fill=fill)
    test = {"history": te.plays, "skips": te.plays_skipped, "gaps": te.plays_gaps}
    target = {"history": te.targets, "skips": np.zeros(len(te)), "gaps": te.request_gaps}
    if te.plays_timestamps is not None and te.target_timestamps is not None:
        test.update(zip(CLOCK_FIELDS, play_clock(te.plays_timestamps), strict=True))
        target.update(zip(CLOCK_FIELDS, play_clock(te.target_timestamps), strict=True))
    else:  # an evaluation set without play times: the clock unknown
        test.update({k: np.full(len(te.plays), fill[k]) for k in CLOCK_FIELDS})
        target.update({k: np.full(len(te), fill[k]) for k in CLOCK_FIELDS})
    return _latest_per_user(data, window, train, test, te.plays_offsets, target, fill)


def _holdout_frame(
    data: Any, window: int, limit: int, track_ids: list[str]
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Up to ``limit`` test examples with raw ids (cold targets and OOV history items left out).

    ``track_ids``: the id of every item index ``2..`` (raw ids, or bucket labels when hashed).
    """
    te = data.test
    ids = np.asarray(track_ids, dtype=object)
    users = np.asarray(["", "", *data.user_vocab.ids], dtype=object)
    contexts = np.asarray(["", "", *data.context_vocab.ids], dtype=object)
    rows = np.flatnonzero(te.targets >= 2)
    cold = int(len(te) - len(rows))
    rows = rows[:limit]
    records = []
    for q in rows:
        h = te.history[te.offsets[q] : te.offsets[q + 1]]
        h = h[h >= 2][-window:]
        u = int(te.users[q])
        records.append(
            {
                "query_id": str(users[u]) if u >= 2 else f"test-{q}",
                "history": [str(x) for x in ids[h - 2]],
                "target": str(ids[te.targets[q] - 2]),
                "hour": int(te.hours[q]),
                "context_type": str(contexts[te.contexts[q]]) if te.contexts[q] >= 2 else None,
            }
        )
    frame = pd.DataFrame(records, columns=["query_id", "history", "target", "hour", "context_type"])
    return frame, {"rows": len(frame), "test_examples": len(te), "cold_targets_left_out": cold}


def _init_kwargs(cls: type, hparams: dict[str, Any]) -> dict[str, Any]:
    """The saved hyper-parameters that ``cls.__init__`` accepts (LightningCLI adds private ones)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in dict(hparams).items() if k in params and k != "self"}


def _hashed_catalogue(data: Any, raw_ids: bool) -> tuple[pd.DataFrame, list[str], dict[str, Any]]:
    """Items table, track id per item index ``2..`` and manifest ``item_vocab`` of hashed ids.

    One row per bucket; with ``raw_ids`` each bucket is named by its most played raw training
    id and lists all of them in ``raw_ids`` (the prepared data's catalogue); without it (or for
    a bucket no training track hashed into) the id is the label ``bucket#i`` (item index
    ``i + 2``).
    """
    counts = np.asarray(data.item_counts[2:], dtype=np.int64)
    hashed = data.item_vocab.vocab  # a BucketIds: the caller checked
    labels = [str(t) for t in data.item_vocab.ids]  # bucket#i
    ids = list(labels)
    raw = [[] for _ in labels]
    cat = data.catalogue if raw_ids else None
    if cat is not None and len(cat):
        rows = cat["index"].to_numpy() - 2
        for r, t in zip(rows.tolist(), cat["track_id"].tolist(), strict=True):
            raw[r].append(str(t))
        for r in np.unique(rows).tolist():
            ids[r] = raw[r][0]  # most training plays first
    if len(set(ids)) != len(ids):
        raise ArtifactError(
            "a raw track id equals a bucket label 'bucket#i': cannot name every bucket "
            "uniquely (export with raw_ids=False)"
        )
    items = pd.DataFrame(
        {
            "track_id": pd.Series(ids, dtype="string"),
            "plays": counts,
            "raw_ids": pd.Series(raw, dtype=object),
        }
    )
    entry = {
        **hashed.to_dict(),
        "raw_ids": cat is not None,
        "distinct_training_tracks": int(len(cat)) if cat is not None else None,
        "occupied_buckets": int(sum(1 for r in raw if r)) if cat is not None else None,
    }
    return items, ids, entry


def export_checkpoint(
    checkpoint: str | Sequence[str],
    out: str,
    index: str = "auto",
    users: bool = False,
    dtype: str = "float32",
    onnx: bool = False,
    batch_size: int = 8192,
    device: str = "auto",
    holdout: int = 5000,
    progress: bool = True,
    lineage: dict[str, Any] | None = None,
    raw_ids: bool = True,
) -> Path:
    """Export a trained checkpoint as an artifact folder (see the module docstring).

    The data are rebuilt (from the preprocessing cache) with the checkpoint's
    ``datamodule_hyper_parameters`` for display metadata, validation queries (index tuning),
    held-out examples and user histories; their fingerprint must match the training run's.

    A checkpoint trained with the ``StreamingSessionDataModule`` is recognised (see
    :func:`is_streaming_checkpoint`): that module's setup pass (bounded memory) rebuilds the
    vocabulary, counts and validation queries instead; a hashed vocabulary exports one index
    row per bucket (see :func:`_streaming_catalogue`, manifest format 1.1).

    Several checkpoints (e.g. seeds of one config, on the same data) export as **one** ensemble
    model (:mod:`twotower.model.ensemble`): concatenated item vectors in one index and an
    :class:`~twotower.model.ensemble.EnsembleQueryTower`, scoring the mean of the members'
    logits. Streamed checkpoints export alone.

    Args:
        checkpoint: Lightning checkpoint of a ``TwoTowerModule`` trained with a
            ``TwoTowerDataModule`` or a ``StreamingSessionDataModule``; or a list of them
            (an ensemble; same data, same query inputs).
        out: Artifact folder (replaced atomically).
        index: ``"auto"``, ``"Flat"``, ``"HNSW32"``, ``"IVF4096,PQ32"``, ... (FAISS factory).
        users: Also write ``user_embeddings.npy`` / ``users.parquet``.
        dtype: ``"float32"`` or ``"float16"`` for the stored embeddings.
        onnx: Also write ``query_tower.onnx`` (checked against torch).
        batch_size: Items / queries per forward pass.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        holdout: Test examples written to ``holdout.parquet`` (0 = none).
        progress: Show a progress bar while embedding the catalogue.
        lineage: Provenance record (see :mod:`twotower.lineage`) stored as
            ``manifest["lineage"]``, so a served index traces to its data, config and code.
        raw_ids: Streamed, hashed vocabulary: collect the raw track ids of every bucket (one
            more pass over the data; memory per distinct training track) so that results
            carry real track ids; False names buckets ``bucket#i``.

    Returns:
        The artifact folder.
    """
    from tqdm.auto import tqdm

    from twotower.data.datamodule import TwoTowerDataModule
    from twotower.model.module import TwoTowerModule

    members = [str(checkpoint)] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    if not members:
        raise ValueError("export_checkpoint: no checkpoint given")
    checkpoint = members[0]
    ckpt = _training_checkpoint(checkpoint)
    hp = _init_kwargs(TwoTowerModule, ckpt["hyper_parameters"])
    dm_cls = TwoTowerDataModule
    dm_hp = _init_kwargs(dm_cls, ckpt["datamodule_hyper_parameters"])
    module = _module_of(ckpt)
    dev = resolve_device(device)
    module.to(dev).eval()
    dm = dm_cls(**dm_hp)
    data = dm.data
    trained_fp = module.data_info.get("fingerprint")
    if trained_fp and trained_fp != data.fingerprint:
        raise ArtifactError(
            f"{checkpoint}: the data changed since training (fingerprint {data.fingerprint[:12]} "
            f"!= {trained_fp[:12]}); export needs the training data"
        )
    if data.num_items != module.hparams.num_items:
        raise ArtifactError(
            f"{checkpoint}: model has {module.hparams.num_items} items, data {data.num_items}"
        )
    item_towers = [module.item_tower]
    member_info: list[dict[str, Any]] = []
    tower: nn.Module = module.query_tower
    if len(members) > 1:
        from twotower.model.ensemble import EnsembleModel, check_members

        modules = [module]
        for path in members[1:]:
            m = _module_of(_training_checkpoint(path))
            modules.append(m.to(dev).eval())
        try:
            check_members(members, modules)
            ensemble = EnsembleModel(modules)
        except ValueError as e:
            raise ArtifactError(f"cannot ensemble {members}: {e}") from e
        tower = ensemble.query_tower.to(dev).eval()
        item_towers = list(ensemble.item_towers)
        weights = ensemble.query_tower.config["weights"]
        for path, m, w in zip(members, modules, weights, strict=True):
            member_info.append(
                {
                    "file": str(Path(path).resolve()),
                    "sha256": sha256_file(path),
                    "temperature": float(m.loss_fn.temperature),
                    "weight": w,
                }  # fmt: skip
            )
    window = int(min(dm.window, tower.config["max_len"]))

    n = data.num_items
    chunks = []
    with torch.no_grad(), tqdm(total=n - 2, desc="item embeddings", disable=not progress) as bar:
        for s in range(2, n, batch_size):
            ids = torch.arange(s, min(s + batch_size, n), device=dev)  # [b]
            parts = [t(ids).float().cpu().numpy() for t in item_towers]  # [b, dim_k] each
            chunks.append(np.concatenate(parts, axis=1))  # [b, dim]
            bar.update(len(ids))
    item_emb = np.concatenate(chunks)

    va = data.valid
    keep = np.flatnonzero(np.diff(va.offsets) > 0)[:TUNE_QUERIES]
    spec = QuerySpec.from_config(tower.config, window)
    valid_q = _query_vectors(tower, spec.build_from(va)[torch.from_numpy(keep)], dev, batch_size)

    user_emb = None
    if users:
        if data.num_users <= 2:
            raise ValueError(f"{checkpoint}: --users, but the data has no listener ids")
        uids = np.arange(2, data.num_users)
        plays = spec.play_signals and (not len(data.test) or data.test.plays is not None)
        if plays:  # every play with its signals, as the tower was trained
            latest = _latest_user_plays(data, window)  # [U, window] each, left-padded
        else:
            uh, _ = _latest_user_histories(data, window)  # [U, window] left-padded
            latest = {"history": uh}
        real = latest["history"] != 0
        has_events = real.any(axis=1)
        offsets = np.concatenate([[0], np.cumsum(real.sum(axis=1))])
        per_play = ("skips", "gaps", *CLOCK_FIELDS)
        signals = {k: latest[k][real] for k in per_play if k in latest}
        # latest history, context unknown (request gap too)
        user_q = spec.build(latest["history"][real], offsets, users=uids, **signals)
        user_emb = _query_vectors(tower, user_q, dev, batch_size)
        if not has_events.all():
            log.warning(
                "%d listeners have no positive event: history-less query", (~has_events).sum()
            )

    vocab_entry: dict[str, Any] = {"kind": "exact"}
    if getattr(data.item_vocab, "vocab", None) is not None:  # hashed: one row per bucket
        items, track_ids, vocab_entry = _hashed_catalogue(data, raw_ids)
    else:
        track_ids = list(data.item_vocab.ids)
        tracks = data.tracks.iloc[2:].reset_index(drop=True)
        items = pd.DataFrame(
            {
                "track_id": pd.Series(data.item_vocab.ids, dtype="string"),
                "title": tracks["title"].astype("string") if "title" in tracks else pd.NA,
                "artist": tracks["artist"].astype("string") if "artist" in tracks else pd.NA,
                "plays": data.item_counts[2:].astype(np.int64),
            }
        )
    split = data.params.get("split", dm.config.split)
    holdout_df, holdout_info = (None, None)
    if holdout > 0 and len(data.test):
        holdout_df, holdout_info = _holdout_frame(data, window, holdout, track_ids)
    extra = {
        "data": {
            "fingerprint": data.fingerprint,
            "split": split,
            "filter_seen": bool(data.params.get("filter_seen", False)),
            "params": data.params,
            "datamodule": dm_hp,
            "datamodule_class": f"{dm_cls.__module__}.{dm_cls.__qualname__}",
        },
        "metrics": _checkpoint_metrics(ckpt),
        "checkpoint": {
            "file": str(Path(checkpoint).resolve()),
            "sha256": member_info[0]["sha256"] if member_info else sha256_file(checkpoint),
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            "train_seconds": ckpt.get("train_seconds"),
        },
        "model": hp,
    }
    if member_info:
        extra["ensemble"] = member_info
    if holdout_info is not None:
        extra["holdout"] = holdout_info
    if lineage is not None:
        extra["lineage"] = lineage
    extra["item_vocab"] = vocab_entry
    user_hash = getattr(data.user_vocab, "vocab", None)
    if user_hash is not None:
        extra["user_vocab"] = user_hash.to_dict()
    return write_artifact(
        out,
        query_tower=tower.cpu(),
        item_emb=item_emb,
        items=items,
        vocab={
            "tracks": track_ids,
            "users": data.user_vocab.ids,
            "contexts": data.context_vocab.ids,
        },
        index=index,
        tune_queries=valid_q if len(valid_q) else None,
        dtype=dtype,
        user_emb=user_emb,
        onnx=onnx,
        history_len=window,
        holdout=holdout_df,
        extra=extra,
    )
