r"""Softmax retrieval loss: in-batch + mixed uniform negatives, logQ correction, DDP gathering.

Let a query :math:`u` with positive item :math:`p` and scores :math:`s_j = \langle u, v_j\rangle /
\tau` (both vectors L2-normalised, temperature :math:`\tau`). The full softmax loss is
:math:`-s_p + \log Z`, :math:`Z = \sum_{j \ge 2} e^{s_j}` over the whole catalogue (indices 0/1,
pad and OOV, are never candidates). The sampled version replaces :math:`Z` by an estimate built
from two candidate sources:

**In-batch candidates** ``C``: the distinct positive items of the *global* batch (all ranks
under DDP). The batch's :math:`B` positives are (approximately) independent draws from the
training item distribution :math:`p_j = n_j / \sum_k n_k` (``n`` = training counts), so item
:math:`j` is in ``C`` with probability

.. math:: q^{in}_j = 1 - (1 - p_j)^B \quad (\approx B p_j \text{ for rare items}).

Weighting every member of ``C`` by :math:`1/q^{in}_j` makes :math:`\sum_{j\in C} e^{s_j}/q^{in}_j`
an unbiased (Horvitz-Thompson) estimate of :math:`Z`. Deduplication means a positive never meets
a copy of itself among these candidates.

**Sampled candidates** ``S``: ``num_negatives`` = :math:`M` items drawn uniformly with
replacement from the :math:`V-2` real items, shared by all queries (and all ranks). Each draw
stands for :math:`(V-2)/M` items, i.e. its expected count is :math:`q^{s} = M/(V-2)` and
:math:`\sum_{m} e^{s_{j_m}}/q^{s}` is again an unbiased estimate of :math:`Z`. A sampled item
equal to the query's own positive is an *accidental hit* and is masked (logit :math:`-\infty`).

**logQ correction**: every candidate logit becomes :math:`s_j - \log q_j` with the :math:`q` of
its source (the positive keeps its in-batch correction too). The softmax denominator is then the
sum of the two estimates, about :math:`2Z`; the constant :math:`\log 2` does not change any
gradient. Without logQ (``logq=False``) popular items are over-represented among the negatives
and get pushed down (popularity bias). Items never seen in training are treated as count 1.

**Full softmax** (``full_softmax=True``) scores every catalogue item: exact, no sampling, no
correction; viable for catalogues of a few ten thousand items. A configured ``num_negatives``
at or above the catalogue size (:math:`M \ge V-2`) means it: :func:`resolve_full_softmax`
(called when the model builds its loss) switches to it with a logged warning, since sampling
would compute at least as many logits and still miss items (about 37% of the catalogue at
:math:`M = V-2`: draws are with replacement). :class:`RetrievalLoss` itself takes
``num_negatives`` as given.

**Seen-item exclusion** (``exclude``): when the data filters already-seen items (explicit
ratings: a user rates a movie once), the target of a position is never one of the items before
it, and evaluation removes them from the ranking anyway. Pushing them down in training wastes
capacity on a contrast the evaluation never makes (and punishes exactly the items most similar
to the history), so the caller may pass ``(query, item)`` pairs whose logits are set to
:math:`-\infty` in every candidate source (full softmax, in-batch, sampled). A pair whose item is
the query's own positive is ignored: the positive is always scored.

**Dense all-action auxiliary term** (``aux_ids``, full softmax only): a query also predicts
later items of its sequence (the next ``k`` after its target), each with the query's own softmax
over the catalogue: ``aux_weight * sum_j -log softmax(s)[a_j] / k`` is added per query. It
rewards a query that ranks the whole near future well, not only the very next item, which
matters when the order inside a burst of events is arbitrary (many ratings share a timestamp).
An auxiliary item that the query's exclusions mask (a repeat of a seen item) is skipped.

**DDP**: each rank embeds its local distinct positives; ids and embeddings are all-gathered
(embeddings with gradient, :func:`torch.distributed.nn.functional.all_gather`) and deduplicated
in sorted-id order, so the candidate set is the same as one process with the whole batch. Each
rank returns ``local_sum * world_size / global_count``: DDP's gradient averaging then yields the
gradient of the global mean, so 2 ranks x B equals 1 rank x 2B.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

ItemFn = Callable[[Tensor], Tensor]
log = logging.getLogger("twotower")


def resolve_full_softmax(num_items: int, num_negatives: int, full_softmax: bool = False) -> bool:
    """Whether the loss scores the whole catalogue: asked for, or ``num_negatives`` too large.

    ``num_negatives`` at or above the catalogue size (``num_items - 2`` real items) cannot be a
    sample of it: the full softmax is exact and costs no more logits, so it is used instead and
    a warning says so.

    Args:
        num_items: Item vocabulary size including pad (0) and OOV (1).
        num_negatives: Requested uniformly sampled negatives per step.
        full_softmax: Full softmax requested in the config.

    Returns:
        True for the full softmax.
    """
    if full_softmax:
        return True
    catalogue = num_items - 2
    if num_negatives > 0 and 0 < catalogue <= num_negatives:
        log.warning(
            "num_negatives=%d is at or above the catalogue size (%d items): using the full "
            "softmax over all %d items instead of sampling",
            num_negatives,
            catalogue,
            catalogue,
        )
        return True
    return False


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class RetrievalLoss(nn.Module):
    """Sampled (or full) softmax over item candidates; see the module docstring for the maths.

    Args:
        num_items: Item vocabulary size including pad (0) and OOV (1).
        temperature: Initial (or fixed) temperature tau.
        learn_temperature: Learn log(tau), clamped to
            ``[min_temperature, max_temperature]``.
        num_negatives: Uniformly sampled extra candidates ``M`` per step (0 = in-batch only).
            Taken as given here (any ``M`` samples correctly); a model resolves a ``M`` at or
            above the catalogue size to the full softmax with :func:`resolve_full_softmax`.
        logq: Subtract log q from every sampled-softmax logit.
        full_softmax: Score the whole catalogue instead of sampling.
        min_temperature: Lower clamp of a learned temperature.
        max_temperature: Upper clamp of a learned temperature.
    """

    def __init__(
        self,
        num_items: int,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        num_negatives: int = 0,
        logq: bool = True,
        full_softmax: bool = False,
        min_temperature: float = 0.01,
        max_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not min_temperature <= temperature <= max_temperature:
            raise ValueError(
                f"temperature {temperature} outside [{min_temperature}, {max_temperature}]"
            )
        self.num_items = num_items
        self.num_negatives = num_negatives
        self.logq = logq
        self.full_softmax = full_softmax
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature
        log_t = torch.tensor(float(np.log(temperature)))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.register_buffer("item_counts", torch.zeros(num_items, dtype=torch.float64))

    @property
    def temperature(self) -> Tensor:
        """Current temperature (clamped), a scalar tensor."""
        return self.log_temperature.exp().clamp(self.min_temperature, self.max_temperature)

    def set_counts(self, counts: np.ndarray | Tensor) -> None:
        """Set the training frequency of every item (``[V]``) used by the logQ correction."""
        c = torch.as_tensor(np.asarray(counts), dtype=torch.float64).reshape(-1)
        if c.shape[0] != self.num_items:
            raise ValueError(f"item_counts has {c.shape[0]} entries, expected {self.num_items}")
        self.item_counts.copy_(c)

    def sample_negatives(self, generator: torch.Generator | None = None) -> Tensor | None:
        """``num_negatives`` item indices drawn uniformly from ``2..V-1`` (CPU), or None.

        Under DDP every rank must use the same draws: sample from a generator seeded alike on
        every rank, or broadcast from rank 0 (what :class:`TwoTowerModule` does).
        """
        if self.num_negatives <= 0 or self.full_softmax:
            return None
        return torch.randint(2, self.num_items, (self.num_negatives,), generator=generator)

    def log_q_in_batch(self, ids: Tensor, batch_positives: int) -> Tensor:
        """``log q_in(j) = log(1 - (1 - p_j)^B)`` for candidate ids ``[C]`` (``B`` positives)."""
        counts = self.item_counts.clamp(min=1.0)
        total = self.item_counts.sum().clamp(min=1.0)
        p = counts[ids] / total  # [C]
        return torch.log(-torch.expm1(batch_positives * torch.log1p(-p.clamp(max=1 - 1e-12))))

    def log_q_sampled(self) -> float:
        """``log q_s = log(M / (V - 2))`` for every sampled candidate."""
        return float(np.log(self.num_negatives / (self.num_items - 2)))

    def forward(
        self,
        query_emb: Tensor,
        pos_ids: Tensor,
        item_fn: ItemFn,
        neg_ids: Tensor | None = None,
        exclude: tuple[Tensor, Tensor] | None = None,
        aux_ids: Tensor | None = None,
        aux_weight: float = 0.0,
    ) -> Tensor:
        """The loss of one (local) batch.

        Args:
            query_emb: Queries ``[N, d]`` (only positions with a positive target).
            pos_ids: Positive item of every query ``[N]`` (never 0).
            item_fn: Maps item ids ``[K]`` to item embeddings ``[K, d]`` (the item tower).
            neg_ids: Uniformly sampled candidates ``[M]``, identical on every rank, or None.
            exclude: ``(query index [P], item id [P])`` pairs removed from the candidates of
                that query (already-seen items), or None.
            aux_ids: Later items each query should also rank high ``[N, k]`` (values < 2 are
                ignored), full softmax only; or None.
            aux_weight: Weight of the auxiliary term.

        Returns:
            Scalar loss; the mean over the global batch once DDP averages gradients.
        """
        logits, labels, n_global = self.logits(query_emb, pos_ids, item_fn, neg_ids, exclude)
        if aux_ids is None or aux_weight == 0.0 or aux_ids.shape[1] == 0:
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        else:
            if not self.full_softmax:
                raise ValueError("auxiliary (dense) targets need full_softmax=True")
            log_p = logits.log_softmax(dim=1)  # [N, V]
            loss_sum = -log_p.gather(1, labels.unsqueeze(1)).sum()
            aux_lp = log_p.gather(1, aux_ids.clamp(min=0))  # [N, k]
            use = (aux_ids > 1) & torch.isfinite(aux_lp)  # [N, k]
            aux_sum = -torch.where(use, aux_lp, torch.zeros_like(aux_lp)).sum()
            loss_sum = loss_sum + aux_weight * aux_sum / aux_ids.shape[1]
        return loss_sum * (_world() / max(n_global, 1))

    def logits(
        self,
        query_emb: Tensor,
        pos_ids: Tensor,
        item_fn: ItemFn,
        neg_ids: Tensor | None = None,
        exclude: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, int]:
        """Corrected candidate logits (what the cross-entropy sees).

        Args:
            query_emb: Queries ``[N, d]``.
            pos_ids: Positive item per query ``[N]``.
            item_fn: Item ids ``[K]`` -> embeddings ``[K, d]``.
            neg_ids: Sampled candidates ``[M]`` or None.
            exclude: ``(query index [P], item id [P])`` pairs masked to ``-inf`` (never the
                query's own positive), or None.

        Returns:
            ``(logits [N, K] float32, labels [N], global number of queries)``. Columns: the whole
            catalogue (full softmax), else the sorted distinct in-batch positives followed by the
            ``M`` sampled items.
        """
        world = _world()
        n_local = torch.tensor([pos_ids.numel()], device=pos_ids.device)
        if world > 1:
            dist.all_reduce(n_local)
        n_global = int(n_local.item())
        inv_t = 1.0 / self.temperature
        if self.full_softmax:
            all_ids = torch.arange(self.num_items, device=pos_ids.device)
            item_emb = item_fn(all_ids)  # [V, d]
            logits = (query_emb @ item_emb.T).float() * inv_t  # [N, V]
            reserved = all_ids < 2  # [V] pad and OOV are never candidates
            logits = logits.masked_fill(reserved.unsqueeze(0), float("-inf"))
            if exclude is not None:
                rows, cols = _exclusions(exclude, pos_ids)
                logits = logits.index_put((rows, cols), logits.new_tensor(float("-inf")))
            return logits, pos_ids, n_global
        cand_ids, cand_emb = self._in_batch_candidates(pos_ids, item_fn, world)
        logits = (query_emb @ cand_emb.T).float() * inv_t  # [N, C]
        if self.logq:
            logits = logits - self.log_q_in_batch(cand_ids, n_global).float()
        labels = torch.searchsorted(cand_ids, pos_ids)  # [N]
        if neg_ids is not None and neg_ids.numel():
            neg_ids = neg_ids.to(pos_ids.device)
            neg_emb = item_fn(neg_ids)  # [M, d]
            neg_logits = (query_emb @ neg_emb.T).float() * inv_t  # [N, M]
            if self.logq:
                neg_logits = neg_logits - self.log_q_sampled()
            hit = pos_ids.unsqueeze(1) == neg_ids.unsqueeze(0)  # [N, M] accidental hits
            neg_logits = neg_logits.masked_fill(hit, float("-inf"))
            logits = torch.cat([logits, neg_logits], dim=1)  # [N, C + M]
            cand_ids = torch.cat([cand_ids, neg_ids])  # [C + M]
        if exclude is not None:
            logits = _mask_pairs(logits, cand_ids, _exclusions(exclude, pos_ids), self.num_items)
        return logits, labels, n_global

    def _in_batch_candidates(
        self, pos_ids: Tensor, item_fn: ItemFn, world: int
    ) -> tuple[Tensor, Tensor]:
        """Sorted distinct positive ids of the global batch ``[C]`` and their embeddings."""
        local_ids = torch.unique(pos_ids)  # [U] sorted
        local_emb = item_fn(local_ids)  # [U, d]
        if world == 1:
            return local_ids, local_emb
        import torch.distributed.nn.functional as dist_fn

        size = torch.tensor([local_ids.numel()], device=pos_ids.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        longest = int(max(int(s.item()) for s in sizes))
        pad = longest - local_ids.numel()
        ids_p = F.pad(local_ids, (0, pad), value=-1)  # [Umax]
        emb_p = F.pad(local_emb, (0, 0, 0, pad))  # [Umax, d]
        all_ids = [torch.empty_like(ids_p) for _ in range(world)]
        dist.all_gather(all_ids, ids_p)
        ids = torch.cat(all_ids)  # [W * Umax]
        emb = torch.cat(dist_fn.all_gather(emb_p))  # [W * Umax, d], with gradient
        keep = ids >= 0
        ids, emb = ids[keep], emb[keep]
        cand_ids, inverse = torch.unique(ids, return_inverse=True)  # [C], [K]
        order = torch.arange(ids.numel(), device=ids.device)
        first = torch.full_like(cand_ids, ids.numel()).scatter_reduce(
            0, inverse, order, reduce="amin"
        )  # [C] first occurrence of every distinct id
        return cand_ids, emb[first]


def _exclusions(exclude: tuple[Tensor, Tensor], pos_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The ``(query, item)`` pairs to mask, without those naming the query's own positive."""
    rows, items = exclude[0].to(pos_ids.device).long(), exclude[1].to(pos_ids.device).long()
    keep = items != pos_ids[rows]  # [P]
    return rows[keep], items[keep]


def _mask_pairs(logits: Tensor, col_ids: Tensor, pairs: tuple[Tensor, Tensor], v: int) -> Tensor:
    """Set ``logits[n, m]`` to ``-inf`` where ``(n, col_ids[m])`` is one of ``pairs``.

    Args:
        logits: ``[N, K]``.
        col_ids: Item id of every column ``[K]`` (repeats allowed: all copies are masked).
        pairs: ``(query index [P], item id [P])``.
        v: Item vocabulary size (builds a unique key ``n * v + item``).
    """
    rows, items = pairs
    if rows.numel() == 0:
        return logits
    keys = torch.unique(rows * v + items)  # [P'] sorted
    n = logits.shape[0]
    cand = torch.arange(n, device=logits.device).unsqueeze(1) * v + col_ids.unsqueeze(0)  # [N, K]
    pos = torch.searchsorted(keys, cand).clamp(max=keys.numel() - 1)  # [N, K]
    hit = keys[pos] == cand  # [N, K]
    return logits.masked_fill(hit, float("-inf"))
