"""FAISS indexes over item embeddings: build, tune, verify, save and load.

Every retriever here answers the same protocol, ``search(query_emb [Q, d], k) -> (scores [Q, k],
ids [Q, k])`` (higher score = better for the inner-product metric; ids are index rows, -1 where an
approximate index found fewer than ``k`` neighbours): :class:`ExactSearch` (brute force over a
numpy or torch matrix) and any ``faiss.Index``. Row ``i`` of an index is row ``i`` of the
artifact's ``items.parquet``, i.e. a real track: the reserved vocabulary rows 0 (pad) and 1 (OOV)
are never indexed (item index = row + 2).

``auto`` index choice by catalogue size ``V`` (see :func:`auto_spec`):

* ``V < 50,000``: ``Flat`` (exact; scanning 50k x 64 floats takes well under a millisecond),
* ``V <= 5,000,000``: ``HNSW32`` (graph, ~``V * (4 d + 256)`` bytes, sub-millisecond queries),
* beyond: ``IVF{4 sqrt(V)},PQ{d/2},RFlat`` (see :func:`ivfpq_spec`): IVF-PQ finds
  ``k_factor * k`` candidates (:data:`REFINE_K_FACTOR` = 4) from ``d/2``-byte codes and
  ``RFlat`` re-scores them exactly with the float32 vectors, which it keeps in RAM. Memory is
  about ``V * (4 d + d/2 + 8)`` bytes (codes, ids, raw vectors): 2.8 GiB at 10M tracks of
  ``d = 64``, of which 2.4 GiB are the raw vectors; still less than HNSW32 (~4.8 GiB there).

PQ codes alone are lossy: their recall@10 against exact search is capped by the code size
whatever ``nprobe`` is (0.71 at 10M tracks on clustered vectors in ``bench/scale_bench.py``,
about 0.8 on the test vectors); re-scoring 40-50 candidates exactly brought it to 0.94-0.97
there. When RAM matters more than recall, pass the plain ``"IVF4096,PQ32"`` (40 B per track).
``tune_index`` raises ``nprobe`` of the refined index like any IVF index; ``k_factor`` is
stored with the index (and in the manifest's search parameters) and can be changed with
:func:`set_search_param`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import faiss
import numpy as np
import torch

FLAT_MAX = 50_000
HNSW_MAX = 5_000_000
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# efSearch / nprobe values tried by tune_index, in order (capped by nlist for IVF).
EF_SEARCH_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
NPROBE_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048)
REFINE_K_FACTOR = 4  # ",RFlat" indexes re-rank k_factor * k PQ candidates exactly
TRAIN_POINTS_PER_CENTROID = 64
EXACT_CHUNK_BYTES = 1 << 28  # score matrix budget of one ExactSearch matmul (256 MiB)
MIN_TRAIN_POINTS = 20_000


@runtime_checkable
class Searcher(Protocol):
    """Anything that answers nearest-neighbour queries (ExactSearch or a faiss.Index)."""

    def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` scores ``[Q, k]`` and row ids ``[Q, k]`` of each query."""
        ...


def as_float32(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy copy/view of ``x`` (what FAISS requires)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class ExactSearch:
    """Brute-force search over a matrix of item vectors (numpy or torch, any device).

    Args:
        item_emb: Item vectors ``[V, d]``.
        metric: ``"ip"`` (inner product, higher is better) or ``"l2"`` (scores are negated
            squared distances, so higher is still better).
        chunk_size: Most queries scored per matmul; fewer when ``chunk_size * V`` scores would
            exceed :data:`EXACT_CHUNK_BYTES`.
    """

    def __init__(
        self, item_emb: np.ndarray | torch.Tensor, metric: str = "ip", chunk_size: int = 1024
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        if isinstance(item_emb, np.ndarray):
            item_emb = torch.from_numpy(as_float32(item_emb))
        self.item_emb = item_emb.detach().float()  # [V, d]
        self.metric = metric
        self.chunk_size = chunk_size

    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return int(self.item_emb.shape[0])

    @property
    def d(self) -> int:
        """Vector dimension."""
        return int(self.item_emb.shape[1])

    @torch.no_grad()
    def search(self, query_emb: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` (ties broken towards the lower row id).

        Args:
            query_emb: Queries ``[Q, d]``.
            k: Neighbours per query (capped at the catalogue size; missing columns are -1).

        Returns:
            Scores ``[Q, k]`` float32 and row ids ``[Q, k]`` int64.
        """
        q = torch.as_tensor(as_float32(query_emb), device=self.item_emb.device)  # [Q, d]
        if q.ndim != 2 or q.shape[1] != self.d:
            raise ValueError(f"queries must be [Q, {self.d}], got {tuple(q.shape)}")
        kk = min(k, self.ntotal)
        scores_out = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        ids_out = np.full((q.shape[0], k), -1, dtype=np.int64)
        if self.metric == "l2":
            item_sq = (self.item_emb**2).sum(1)  # [V]
        chunk = max(1, min(self.chunk_size, EXACT_CHUNK_BYTES // (4 * max(self.ntotal, 1))))
        for start in range(0, q.shape[0], chunk):
            qc = q[start : start + chunk]  # [b, d]
            scores = qc @ self.item_emb.T  # [b, V]
            if self.metric == "l2":
                scores = 2 * scores - item_sq - (qc**2).sum(1, keepdim=True)  # [b, V]
            top_scores, top_ids = torch.topk(scores, kk, dim=1, sorted=True)  # [b, kk]
            scores_out[start : start + len(qc), :kk] = top_scores.cpu().numpy()
            ids_out[start : start + len(qc), :kk] = top_ids.cpu().numpy()
        if self.metric == "l2":
            scores_out = -scores_out  # report squared distances like FAISS
            scores_out[ids_out < 0] = np.inf
        return scores_out, ids_out


def ivfpq_spec(num_items: int, dim: int, refine: bool = True) -> str:
    """``IVF{nlist},PQ{m}[,RFlat]`` for ``num_items`` vectors of size ``dim``.

    ``nlist`` is the power of two nearest ``4 sqrt(V)``; ``m = d/2`` one-byte sub-quantisers
    (``d`` when ``d`` is odd); ``refine`` appends ``,RFlat`` (exact re-scoring of the
    ``k_factor * k`` PQ candidates with the raw vectors, held in RAM).
    """
    nlist = 1 << round(math.log2(4 * math.sqrt(num_items)))
    m = dim // 2 if dim % 2 == 0 else dim
    return f"IVF{nlist},PQ{m}" + (",RFlat" if refine else "")


def auto_spec(num_items: int, dim: int) -> str:
    """The FAISS factory string ``build_index(spec="auto")`` uses for this catalogue size.

    ``Flat`` below :data:`FLAT_MAX` items, ``HNSW32`` up to :data:`HNSW_MAX`, beyond that the
    refined IVF-PQ of :func:`ivfpq_spec` (see the module docstring for memory and recall).
    """
    if num_items < FLAT_MAX:
        return "Flat"
    if num_items <= HNSW_MAX:
        return "HNSW32"
    return ivfpq_spec(num_items, dim, refine=True)


def build_index(
    item_emb: np.ndarray | torch.Tensor,
    spec: str = "auto",
    metric: str = "ip",
    seed: int = 0,
    ef_construction: int = 80,
) -> faiss.Index:
    """Build a FAISS index over ``item_emb`` (row ``i`` of the index = row ``i`` of the input).

    Args:
        item_emb: Item vectors ``[V, d]`` (real tracks only: no pad/OOV rows).
        spec: ``"auto"`` (see :func:`auto_spec`) or any FAISS factory string (``"Flat"``,
            ``"HNSW32"``, ``"IVF1024,Flat"``, ``"IVF4096,PQ32"``, ...). Indexes that need
            training (IVF, PQ) are trained on a random sample of at most
            ``max(64 * nlist, 20000)`` vectors.
        metric: ``"ip"`` (inner product: cosine for L2-normalised vectors) or ``"l2"``.
        seed: Seed of the training sample and of k-means.
        ef_construction: HNSW graph build breadth (ignored by other index types).

    Returns:
        The populated index (``ntotal == V``), with default search parameters: call
        :func:`tune_index` or :func:`set_search_param` before serving approximate ones.
    """
    x = as_float32(item_emb)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"item_emb must be a non-empty [V, d] matrix, got shape {x.shape}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    num_items, dim = x.shape
    factory = auto_spec(num_items, dim) if spec == "auto" else spec
    try:
        index = faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS index spec {factory!r} for dim {dim}: {e}") from e
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = ef_construction
    _disable_polysemous(index)
    refine = faiss.downcast_index(index)
    if isinstance(refine, faiss.IndexRefine):
        refine.k_factor = REFINE_K_FACTOR
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        nlist = ivf.nlist if ivf is not None else 256
        if ivf is not None and nlist > num_items:
            raise ValueError(
                f"index spec {factory!r} asks for {nlist} IVF lists but there are only "
                f"{num_items} items; use fewer lists (e.g. IVF{max(1, int(4 * num_items**0.5))})"
            )
        n_train = min(num_items, max(TRAIN_POINTS_PER_CENTROID * nlist, MIN_TRAIN_POINTS))
        rng = np.random.default_rng(seed)
        sample = x if n_train == num_items else x[np.sort(rng.choice(num_items, n_train, False))]
        if ivf is not None:
            ivf.cp.seed = seed
        index.train(sample)
    index.add(x)
    return index


def _disable_polysemous(index: faiss.Index) -> None:
    """Skip polysemous training of PQ codes (10x slower training, unused by our searches)."""
    node = faiss.downcast_index(index)
    for _ in range(4):
        if hasattr(node, "do_polysemous_training"):
            node.do_polysemous_training = False
        inner = getattr(node, "base_index", None) or getattr(node, "index", None)
        if inner is None:
            return
        node = faiss.downcast_index(inner)


def _hnsw_of(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW part of ``index`` (possibly under a refine/pre-transform wrapper), or None."""
    index = faiss.downcast_index(index)
    for _ in range(4):
        if isinstance(index, faiss.IndexHNSW):
            return index
        inner = getattr(index, "base_index", None) or getattr(index, "index", None)
        if inner is None:
            return None
        index = faiss.downcast_index(inner)
    return None


def search_param_name(index: faiss.Index | ExactSearch) -> str | None:
    """The speed/recall knob of ``index``: ``"nprobe"`` (IVF), ``"efSearch"`` (HNSW) or None."""
    if isinstance(index, ExactSearch):
        return None
    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    if _hnsw_of(index) is not None:
        return "efSearch"
    return None


def set_search_param(index: faiss.Index, name: str, value: int) -> None:
    """Set a search-time parameter (``nprobe``, ``efSearch``, ``k_factor``) wherever it lives."""
    if name == "k_factor":
        top = faiss.downcast_index(index)
        if not isinstance(top, faiss.IndexRefine):
            raise ValueError(f"k_factor needs a refined index (',RFlat'), not {type(top).__name__}")
        top.k_factor = float(value)
        return
    if name == "efSearch":
        hnsw = _hnsw_of(index)
        if hnsw is None:
            raise ValueError(f"index {type(index).__name__} has no HNSW part for efSearch")
        hnsw.hnsw.efSearch = int(value)
        return
    try:
        faiss.ParameterSpace().set_index_parameter(index, name, int(value))
    except RuntimeError as e:
        raise ValueError(f"cannot set {name}={value} on {type(index).__name__}: {e}") from e


def get_search_params(index: faiss.Index) -> dict[str, int]:
    """Current search parameters of ``index`` (empty for exact indexes)."""
    name = search_param_name(index)
    params: dict[str, int] = {}
    if name == "nprobe":
        params["nprobe"] = int(faiss.extract_index_ivf(index).nprobe)
    elif name == "efSearch":
        params["efSearch"] = int(_hnsw_of(index).hnsw.efSearch)
    top = faiss.downcast_index(index) if not isinstance(index, ExactSearch) else None
    if isinstance(top, faiss.IndexRefine):
        params["k_factor"] = int(top.k_factor)
    return params


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean share of the exact top-``k`` rows that the approximate top-``k`` also returns."""
    a, e = approx_ids[:, :k], exact_ids[:, :k]
    hits = (a[:, :, None] == e[:, None, :]) & (e[:, None, :] >= 0)  # [Q, k, k]
    valid = (e >= 0).sum(1)  # [Q]
    return float((hits.any(1).sum(1) / np.maximum(valid, 1)).mean())


def tune_index(
    index: faiss.Index | ExactSearch,
    item_emb: np.ndarray | torch.Tensor,
    query_emb: np.ndarray | torch.Tensor,
    k: int = 10,
    target_recall: float = 0.95,
    metric: str = "ip",
) -> dict[str, str | int | float | None]:
    """Raise ``nprobe`` / ``efSearch`` until recall@k against exact search reaches the target.

    The smallest value of the grid (:data:`NPROBE_GRID`, :data:`EF_SEARCH_GRID`) that reaches
    ``target_recall`` on ``query_emb`` is left set on ``index``; when none does, the largest one
    is kept (and the returned recall says so). Exhaustive indexes (``ExactSearch``, ``Flat``)
    return recall 1.0 without searching.

    Args:
        index: A FAISS index built over ``item_emb`` (or an ExactSearch).
        item_emb: The indexed vectors ``[V, d]`` (for the exact ground truth).
        query_emb: Representative queries ``[Q, d]`` (e.g. validation queries).
        k: Cut-off of the recall.
        target_recall: Recall@k to reach.
        metric: The index metric.

    Returns:
        ``{"param": "nprobe" | "efSearch" | None, "value": int | None,
        "recall_at_10": float}`` (the key names ``recall_at_{k}``).
    """
    key = f"recall_at_{k}"
    if isinstance(index, ExactSearch) or isinstance(faiss.downcast_index(index), faiss.IndexFlat):
        return {"param": None, "value": None, key: 1.0}  # exhaustive: exact by construction
    q = as_float32(query_emb)
    _, exact_ids = ExactSearch(item_emb, metric).search(q, k)
    name = search_param_name(index)
    if name is None:
        _, ids = index.search(q, k)
        return {"param": None, "value": None, key: recall_at_k(ids, exact_ids, k)}
    if name == "nprobe":
        nlist = faiss.extract_index_ivf(index).nlist
        grid = [v for v in NPROBE_GRID if v < nlist] + [nlist]
    else:
        grid = list(EF_SEARCH_GRID)
        grid = [v for v in grid if v >= k] or [k]
    recall = 0.0
    value = grid[-1]
    for value in grid:
        set_search_param(index, name, value)
        _, ids = index.search(q, k)
        recall = recall_at_k(ids, exact_ids, k)
        if recall >= target_recall:
            break
    return {"param": name, "value": int(value), key: recall}


def check_index(index: faiss.Index, num_items: int, dim: int) -> None:
    """Raise ValueError unless ``index`` holds ``num_items`` vectors of size ``dim``."""
    if index.ntotal != num_items or index.d != dim:
        raise ValueError(
            f"index holds {index.ntotal} vectors of dim {index.d}; "
            f"expected {num_items} of dim {dim}"
        )


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write ``index`` to ``path`` (FAISS binary format, no pickle)."""
    faiss.write_index(index, str(path))


def load_index(path: str | Path, mmap: bool = False) -> faiss.Index:
    """Read an index written by :func:`save_index` (``mmap`` maps it instead of reading)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no FAISS index file")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise ValueError(f"{path}: not a readable FAISS index ({e})") from e
