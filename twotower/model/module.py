"""The LightningModule: both towers, the retrieval loss, full-catalogue validation, logging.

What only observes a run (training clock, throughput, embedding histograms, the hparams
view, the projector) is in :mod:`twotower.model.callbacks`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from twotower.model.loss import RetrievalLoss, resolve_full_softmax
from twotower.model.towers import ItemTower, QueryTower
from twotower.query import CLOCK_FIELDS, QueryBatch

VAL_KS = (10, 20)
MONITOR = "val/ndcg@10"


class TwoTowerModule(pl.LightningModule):
    """Two-tower retrieval model trained on sequences (a query at every position).

    The first block of arguments is the model config; the ``num_*``/``max_genres`` sizes come
    from the data (linked from :class:`~twotower.data.datamodule.TwoTowerDataModule` by the CLI)
    and are saved in the checkpoint, so :meth:`load_from_checkpoint` needs no data.

    Args:
        dim: Size of query and item vectors.
        id_dim: Item-id embedding size (encoder width).
        encoder: ``mean`` | ``gru`` | ``transformer``.
        num_layers: Encoder layers.
        num_heads: Attention heads.
        dropout: Dropout in the query tower.
        max_len: Longest history (the CLI links it to ``data.window``).
        use_user: Add a user-id embedding to the query.
        use_context: Add hour of day and context type of the request to the query.
        use_item_features: Use the side features (artist, album, genres, year, audio) in the
            item tower; False = id embedding only.
        item_features: Which side features to use when ``use_item_features`` (names from
            ``artist``, ``album``, ``genres``, ``year``, ``audio``); None = all. E.g. HetRec's
            items are artists, so its ``artist`` feature only repeats the item id.
        query_hidden: Hidden width of the query tower's output MLP (0 = one linear layer).
        item_hidden: Hidden width of the item tower's output MLP (0 = one linear layer).
        item_dropout: Dropout in the item tower's MLP.
        ffn_mult: Transformer feed-forward width as a multiple of ``id_dim``.
        recency_bias: Learned ALiBi-style recency bias in the transformer's attention.
        item_bias: A learned per-item bias (popularity) folded into the dot product: the last
            of the ``dim`` coordinates is 1 in the query and the bias in the item vector, the
            other ``dim - 1`` are L2-normalised, so exports and indexes serve it as is.
        play_signals: Read the per-play signals (skipped flag, gap since the previous play,
            position in the session, the request's gap); linked from ``data.play_signals``,
            whose windows then hold skipped plays as inputs.
        play_clock: Also read the hour of day and weekday (UTC) of every play (needs
            ``play_signals``); linked from ``data.play_clock``, whose windows carry them.
        signal_dropout: Share of training windows whose gaps (and clock) are hidden
            (unknown), so a history without timestamps still gets a trained answer.
        temperature: Softmax temperature (initial value when learned).
        learn_temperature: Learn the temperature (clamped to [0.01, 1]).
        num_negatives: Uniformly sampled extra negatives per step (sampled softmax).
        logq: logQ correction of the sampled softmax.
        full_softmax: Score the whole catalogue in the loss (small catalogues).
        mask_seen: Remove each position's earlier window items (except its target) from its
            loss candidates: ``auto`` (when the data filters seen items, i.e. evaluation never
            ranks them), ``on`` or ``off``.
        dense_targets: Dense all-action auxiliary term: each position also predicts the
            ``k`` items after its target (full softmax only; 0 = off).
        dense_weight: Weight of that term relative to the next-item loss.
        objective: ``next_item`` (a query at every window position predicts the next item) or
            ``bag`` for unordered data (user-artist counts): each step holds out a random
            ``bag_holdout`` share of every training row's items, queries with the mean of the
            rest (``encoder: mean``) and scores the held-out items by a full softmax over the
            catalogue with the query's own items masked out (see :meth:`bag_loss`).
        bag_holdout: Share of a row's items held out as targets per step (``bag`` only).
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay of matrices (not of biases, norms, temperature).
        warmup_steps: Linear warm-up steps.
        lr_schedule: ``constant`` or ``cosine`` (decay to 0 over the run) after warm-up.
        compile: ``torch.compile`` the query encoder for training.
        projector_items: Most popular items written to the TensorBoard projector at the end of
            fit (0 = off); read by :class:`~twotower.model.callbacks.EmbeddingProjector`.
        num_items: Item vocabulary size (data).
        num_users: User vocabulary size (data).
        num_contexts: Context-type vocabulary size (data).
        num_artists: Artist vocabulary size (data, 0 = none).
        num_albums: Album vocabulary size (data, 0 = none).
        num_genres: Genre vocabulary size (data, 0 = none).
        num_year_buckets: Year buckets (data, 0 = none).
        num_audio: Numeric audio features (data, 0 = none).
        max_genres: Genres per item in the feature table (data).
    """

    def __init__(
        self,
        dim: int = 64,
        id_dim: int = 64,
        encoder: str = "transformer",
        num_layers: int = 2,
        num_heads: int = 2,
        dropout: float = 0.2,
        max_len: int = 50,
        use_user: bool = False,
        use_context: bool = False,
        use_item_features: bool = True,
        item_features: list[str] | None = None,
        query_hidden: int = 0,
        item_hidden: int = 0,
        item_dropout: float = 0.0,
        ffn_mult: int = 4,
        recency_bias: bool = False,
        item_bias: bool = False,
        play_signals: bool = False,
        play_clock: bool = False,
        signal_dropout: float = 0.1,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        num_negatives: int = 0,
        logq: bool = True,
        full_softmax: bool = False,
        mask_seen: str = "auto",
        dense_targets: int = 0,
        dense_weight: float = 0.0,
        objective: str = "next_item",
        bag_holdout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        compile: bool = False,
        projector_items: int = 500,
        num_items: int = 3,
        num_users: int = 0,
        num_contexts: int = 0,
        num_artists: int = 0,
        num_albums: int = 0,
        num_genres: int = 0,
        num_year_buckets: int = 0,
        num_audio: int = 0,
        max_genres: int = 1,
    ) -> None:
        super().__init__()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if mask_seen not in ("auto", "on", "off"):
            raise ValueError(f"mask_seen must be 'auto', 'on' or 'off', got {mask_seen!r}")
        if objective not in ("next_item", "bag"):
            raise ValueError(f"objective must be 'next_item' or 'bag', got {objective!r}")
        if objective == "bag" and (encoder != "mean" or not 0.0 < bag_holdout < 1.0):
            raise ValueError(
                f"objective='bag' needs encoder='mean' and 0 < bag_holdout < 1, got "
                f"encoder={encoder!r}, bag_holdout={bag_holdout}"
            )
        self.save_hyperparameters()
        self.query_tower = QueryTower(
            num_items=num_items,
            dim=dim,
            id_dim=id_dim,
            encoder=encoder,
            max_len=max_len,
            num_layers=num_layers,
            num_heads=num_heads,
            dropout=dropout,
            num_users=num_users if use_user else 0,
            num_contexts=num_contexts if use_context else 0,
            use_hour=use_context,
            mlp_hidden=query_hidden,
            ffn_mult=ffn_mult,
            recency_bias=recency_bias,
            item_bias=item_bias,
            play_signals=play_signals,
            play_clock=play_clock,
        )
        names = ("artist", "album", "genres", "year", "audio")
        unknown = set(item_features or ()) - set(names)
        if unknown:
            raise ValueError(f"item_features: unknown {sorted(unknown)}, choose from {names}")
        use = {
            n: use_item_features and (item_features is None or n in item_features) for n in names
        }
        self.item_tower = ItemTower(
            self.query_tower.item_embedding,
            dim=dim,
            num_artists=num_artists if use["artist"] else 0,
            num_albums=num_albums if use["album"] else 0,
            num_genres=num_genres if use["genres"] else 0,
            num_year_buckets=num_year_buckets if use["year"] else 0,
            num_audio=num_audio if use["audio"] else 0,
            hidden=item_hidden,
            dropout=item_dropout,
            max_genres=max_genres,
            bias=item_bias,
        )
        self.loss_fn = RetrievalLoss(
            num_items,
            temperature=temperature,
            learn_temperature=learn_temperature,
            num_negatives=num_negatives,
            logq=logq,
            # as many negatives as tracks cannot be a sample: the full softmax, with a warning
            full_softmax=resolve_full_softmax(num_items, num_negatives, full_softmax),
        )
        self._sequence_fn = self.query_tower.forward_sequence
        self._val_ranks: list[Tensor] = []
        self._val_item_emb: Tensor | None = None
        self._examples = 0  # predicted positions of the last step (the Throughput callback)
        self.train_seconds = 0.0  # kept by the TrainTimer callback, restored from checkpoints
        self.data_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        """Fill feature buffers and logQ counts from the datamodule (when there is one)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "data"):
            return
        data = dm.data
        if data.num_items != self.hparams.num_items:
            raise ValueError(
                f"the model was built for {self.hparams.num_items} items but the data has "
                f"{data.num_items}: link model sizes to the datamodule (train.py does)"
            )
        if bool(getattr(dm, "play_signals", False)) != bool(self.hparams.play_signals):
            raise ValueError(
                f"model.play_signals={self.hparams.play_signals} but data.play_signals="
                f"{getattr(dm, 'play_signals', False)}: set data.play_signals (train.py links it)"
            )
        if bool(getattr(dm, "play_clock", False)) != bool(self.hparams.get("play_clock", False)):
            raise ValueError(
                f"model.play_clock={self.hparams.get('play_clock', False)} but data.play_clock="
                f"{getattr(dm, 'play_clock', False)}: set data.play_clock (train.py links it)"
            )
        window = getattr(dm, "window", self.hparams.max_len)
        if window > self.hparams.max_len:
            raise ValueError(f"data.window={window} > model.max_len={self.hparams.max_len}")
        self.item_tower.set_features(data.features)
        self.loss_fn.set_counts(data.item_counts)
        self.data_info = {
            "item_vocab": list(data.item_vocab.ids),
            "user_vocab": list(data.user_vocab.ids),
            "context_vocab": list(data.context_vocab.ids),
            "fingerprint": str(data.fingerprint),
            "filter_seen": bool(data.params.get("filter_seen", False)),
        }
        if self.hparams.compile and stage == "fit":
            # dynamic: batches are trimmed to their longest window, so lengths vary
            self._sequence_fn = torch.compile(self.query_tower.forward_sequence, dynamic=True)

    @property
    def mask_seen(self) -> bool:
        """Whether earlier window items leave each position's loss.

        ``on``, or ``auto`` on data that filters seen items (known from :attr:`data_info` once
        the data is set up or a checkpoint is read).
        """
        mode = self.hparams.mask_seen
        return mode == "on" or (mode == "auto" and bool(self.data_info.get("filter_seen")))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store vocabularies, data fingerprint and training time (all plain types).

        The :class:`~twotower.model.callbacks.TrainTimer` callback has already stored the
        running ``train_seconds``; without it the module's own figure is stored.
        """
        checkpoint["twotower"] = dict(self.data_info)
        checkpoint.setdefault("train_seconds", float(self.train_seconds))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` stored."""
        self.data_info = dict(checkpoint.get("twotower") or {})
        self.train_seconds = float(checkpoint.get("train_seconds") or 0.0)

    # ------------------------------------------------------------------ forward
    def forward(self, query: QueryBatch | Tensor) -> Tensor:
        """Query vectors ``[B, dim]`` of a :class:`~twotower.query.QueryBatch` (or history)."""
        return self.query_tower(query)

    @torch.no_grad()
    def item_embeddings(self, chunk: int = 65536) -> Tensor:
        """Vectors of every item index ``[V, dim]`` (rows 0/1 are pad/OOV)."""
        n = self.hparams.num_items
        ids = torch.arange(n, device=self.device)
        return torch.cat([self.item_tower(ids[s : s + chunk]) for s in range(0, n, chunk)])

    # ------------------------------------------------------------------ training
    def _negatives(self) -> Tensor | None:
        neg = self.loss_fn.sample_negatives()
        if neg is None:
            return None
        neg = neg.to(self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(neg, src=0)  # the same sampled candidates on every rank
        return neg

    def sequence_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """Loss of a batch of windows and its number of examples (predicted positions).

        Args:
            batch: ``items``, ``hours``, ``contexts`` ``[B, L+1]`` and ``users`` ``[B]``.
        """
        items = batch["items"]  # [B, L+1]
        # Drop the padding columns the whole batch shares (left padding: a prefix); the
        # towers are padding-invariant, so this changes nothing but the cost.
        first = int((items != 0).any(dim=0).long().argmax())
        cols = {k: v[:, first:] for k, v in batch.items() if v.dim() == 2}  # [B, L'+1] each
        items = cols["items"]
        inputs, targets = items[:, :-1], items[:, 1:]  # [B, L'], [B, L']
        # each position's context is the one of the event it predicts
        query = QueryBatch(inputs, batch["users"], cols["hours"][:, 1:], cols["contexts"][:, 1:])
        valid = (inputs != 0) & (targets > 1)  # [B, L'] a history and a known target
        if "skips" in cols:  # per-play signals: every play is an input, a skipped one no target
            skips, gaps = cols["skips"], cols["gaps"]  # [B, L'+1]
            valid &= skips[:, 1:] == 0
            clock = [cols[k] for k in CLOCK_FIELDS if k in cols]  # [B, L'+1] each, -1 unknown
            if self.training and self.hparams.get("signal_dropout", 0.0) > 0:
                # some rows lose their times (gaps and clock), so the "unknown" (no timestamps)
                # inputs are trained
                drop = torch.rand(gaps.shape[0], 1, device=gaps.device)
                kept = drop >= self.hparams.signal_dropout  # [B, 1]
                gaps = gaps * kept.long()  # [B, L'+1]
                clock = [c.masked_fill(~kept, -1) for c in clock]  # [B, L'+1] each
            query.skips, query.gaps, query.request_gaps = skips[:, :-1], gaps[:, :-1], gaps[:, 1:]
            if clock:  # the clock of each input play (not of the predicted one)
                query.play_hours, query.play_weekdays = (c[:, :-1] for c in clock)
            items = items.masked_fill(skips == 1, 0)  # skipped plays are no (later) targets
        queries = self._sequence_fn(query)  # [B, L', dim]
        exclude = seen_pairs(inputs, valid) if self.mask_seen else None
        k = int(self.hparams.get("dense_targets", 0))
        aux = later_items(items, k)[valid] if k > 0 else None  # [N, k]
        loss = self.loss_fn(
            queries[valid],
            targets[valid],
            self.item_tower,
            self._negatives(),
            exclude,
            aux,
            float(self.hparams.get("dense_weight", 0.0)),
        )
        return loss, int(valid.sum())

    def bag_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """Held-out-items loss of unordered data (``objective: bag``) and its example count.

        Every row's real items (``items``, order ignored) are split at random: a share
        ``bag_holdout`` become targets, the rest form the query (their mean, see
        :meth:`QueryTower.forward_bag`). Every target is scored by a softmax over the whole
        catalogue, with pad/OOV and the query's own items removed (evaluation filters seen
        items, so they are never competitors there). Rows without an input or a target add
        nothing.

        Args:
            batch: ``items [B, L+1]`` (0 = pad) and ``users [B]``.

        Returns:
            ``(mean negative log-likelihood of the targets, number of targets)``.
        """
        items = batch["items"]  # [B, L+1]
        real = items > 1  # [B, L+1] (pad and OOV are never inputs or targets)
        held = (torch.rand(items.shape, device=items.device) < self.hparams.bag_holdout) & real
        keep = real & ~held  # [B, L+1]
        held = held & keep.any(dim=1, keepdim=True)  # a target needs a non-empty query
        query_emb = self.query_tower.forward_bag(items, keep, batch["users"])  # [B, dim]
        item_emb = self.item_tower(torch.arange(self.hparams.num_items, device=items.device))
        scores = (query_emb @ item_emb.T).float() / self.loss_fn.temperature  # [B, V]
        masked = torch.zeros_like(scores, dtype=torch.bool)  # [B, V]
        masked[:, :2] = True
        masked.scatter_(1, torch.where(keep, items, 0), True)
        log_p = scores.masked_fill(masked, float("-inf")).log_softmax(dim=-1)  # [B, V]
        target_log_p = log_p.gather(1, items).masked_fill(~held, 0.0)  # [B, L+1]
        n = int(held.sum())
        return -target_log_p.sum() / max(n, 1), n

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Sequence-wise step: a query at every input position predicts the next item."""
        if self.hparams.get("objective", "next_item") == "bag":
            loss, n = self.bag_loss(batch)
        else:
            loss, n = self.sequence_loss(batch)
        self._examples = n
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/temperature", self.loss_fn.temperature.detach(), batch_size=n)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed the step's randomness (dropout, sampled negatives).

        The seed depends only on ``(seed_everything, global step, rank)``, so a run resumed
        from a checkpoint continues exactly as an uninterrupted run.
        """
        base = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed((base * 1_000_003 + self.global_step) * 1009 + self.global_rank)

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        """Item vectors of the whole catalogue, computed once per validation."""
        self._val_item_emb = self.item_embeddings().float()
        self._val_ranks = []

    on_test_epoch_start = on_validation_epoch_start

    def _ranks(self, batch: dict[str, Tensor]) -> Tensor:
        from twotower.metrics import rank_of_targets

        query_emb = self.query_tower(QueryBatch.from_mapping(batch)).float()  # [b, dim]
        exclude = None
        if "seen_values" in batch:
            exclude = (batch["seen_values"].cpu().numpy(), batch["seen_offsets"].cpu().numpy())
        assert self._val_item_emb is not None
        return rank_of_targets(query_emb, self._val_item_emb, batch["targets"], exclude)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Full-catalogue ranks of the targets."""
        self._val_ranks.append(self._ranks(batch))

    test_step = validation_step

    def _epoch_metrics(self, prefix: str) -> dict[str, float]:
        from twotower.metrics import metrics_from_ranks

        ranks = torch.cat(self._val_ranks) if self._val_ranks else torch.zeros(0, dtype=torch.long)
        if self.trainer.world_size > 1:
            ranks = self.all_gather(ranks).reshape(-1)
        metrics = metrics_from_ranks(ranks.cpu(), VAL_KS)
        self._val_ranks = []
        self._val_item_emb = None
        keep = [f"{m}@{k}" for k in VAL_KS for m in ("recall", "ndcg", "mrr", "hr")]
        return {f"{prefix}/{k}": metrics[k] for k in keep}

    def on_validation_epoch_end(self) -> None:
        """Log recall/ndcg/mrr/hr@10,20 (``hp/*`` and histograms: the callbacks)."""
        metrics = self._epoch_metrics("val")
        ndcg = metrics.pop(MONITOR)
        self.log_dict(metrics)
        self.log(MONITOR, ndcg, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        """Log the test metrics."""
        self.log_dict(self._epoch_metrics("test"))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        """AdamW (decay on matrices only) with linear warm-up, then constant or cosine."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "norm" not in name else no_decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )
        warmup = max(int(self.hparams.warmup_steps), 0)
        cosine = self.hparams.lr_schedule == "cosine"
        total = int(self.trainer.estimated_stepping_batches) if cosine else 0

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if cosine and total > warmup:
                progress = min((step - warmup) / (total - warmup), 1.0)
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def later_items(items: Tensor, k: int) -> Tensor:
    """The ``k`` items after each position's target (0 past the window's end).

    Args:
        items: A window ``[B, L+1]``: position ``t`` has input ``items[:, t]`` and target
            ``items[:, t+1]``.
        k: Items to take after the target.

    Returns:
        ``[B, L, k]``: entry ``[b, t, j]`` is ``items[b, t + 2 + j]``.
    """
    length = items.shape[1] - 1
    later = F.pad(items[:, 2:], (0, k))  # [B, L-1+k]
    return torch.stack([later[:, j : j + length] for j in range(k)], dim=-1)  # [B, L, k]


def seen_pairs(inputs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``(query index, item id)`` of every earlier window item of every query position.

    Position ``t`` of row ``b`` has seen ``inputs[b, :t+1]``; queries are the ``valid``
    positions in row-major order (as ``queries[valid]`` flattens them). Pad and OOV are left out.

    Args:
        inputs: Left-padded input items ``[B, L]``.
        valid: Positions that are queries ``[B, L]``.

    Returns:
        ``(rows [P], items [P])`` for :class:`~twotower.model.loss.RetrievalLoss`'s ``exclude``.
    """
    length = inputs.shape[1]
    ar = torch.arange(length, device=inputs.device)
    upto = ar.unsqueeze(0) <= ar.unsqueeze(1)  # [L(t), L(s)] s <= t
    query_index = valid.flatten().long().cumsum(0).view_as(valid) - 1  # [B, L]
    item = inputs.unsqueeze(1).expand(-1, length, -1)  # [B, L(t), L(s)]
    keep = upto.unsqueeze(0) & valid.unsqueeze(2) & (item > 1)  # [B, L(t), L(s)]
    rows = query_index.unsqueeze(2).expand_as(item)[keep]  # [P]
    return rows, item[keep]
