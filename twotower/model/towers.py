"""The two towers as plain ``nn.Module``s (no Lightning): usable standalone by export and serving.

* :class:`QueryTower` encodes a left-padded listening history (plus optional user and context)
  into an L2-normalised query vector. It owns the item-id embedding table.
* :class:`ItemTower` encodes item ids (id embedding shared with the query tower + side features
  stored as buffers) into L2-normalised item vectors of the same size.

Padding convention: histories are **left-padded** with item index 0; index 1 is OOV.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower.model.encoders import ENCODERS, CausalSelfAttentionBlock  # noqa: F401
from twotower.query import (
    GAP_FIRST,
    NUM_GAPS,
    NUM_HOURS,
    NUM_WEEKDAYS,
    SESSION_BREAK,
    SKIPPED,
    UNKNOWN_HOUR,
    QueryBatch,
)

MAX_SESSION_POSITION = 32  # positions in a session past this share one embedding

# parameter names the encoders kept on the tower before they were modules (old state dicts)
_ENCODER_PARAMS = frozenset({"position_embedding", "blocks", "final_norm", "recency_slope", "gru"})


def _hour_index(hours: Tensor) -> Tensor:
    """Hour of day ``-1..23`` -> embedding index ``0..24`` (0 = unknown)."""
    return (hours.long() + 1).clamp(0, NUM_HOURS)


def _weekday_index(weekdays: Tensor) -> Tensor:
    """Weekday ``-1..6`` (Monday = 0) -> embedding index ``0..7`` (0 = unknown)."""
    return (weekdays.long() + 1).clamp(0, NUM_WEEKDAYS)


def _head(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Module:
    """Projection to the output size: one linear layer (``hidden=0``) or a 2-layer MLP."""
    if hidden <= 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


class QueryTower(nn.Module):
    """History (+ user, hour, context) -> L2-normalised query vector.

    Args:
        num_items: Item vocabulary size including pad (0) and OOV (1).
        dim: Output size (shared with the item tower).
        id_dim: Item-id embedding size (also the encoder width).
        encoder: ``"mean"`` (causal running mean), ``"gru"`` or ``"transformer"`` (causal, pre-LN,
            learned positions).
        max_len: Longest history the encoder sees (older events are cut off).
        num_layers: Transformer blocks or GRU layers.
        num_heads: Attention heads (transformer).
        dropout: Dropout in the encoder and the head.
        num_users: User vocabulary size; 0 disables the user embedding.
        num_contexts: Context-type vocabulary size; 0 disables it.
        use_hour: Add an hour-of-day embedding of the request (the target event).
        mlp_hidden: Hidden width of the output MLP; 0 = a single linear projection.
        ffn_mult: Transformer feed-forward width as a multiple of ``id_dim``.
        recency_bias: Transformer only: add ``-slope_h * (i - j)`` to the attention logit of
            query ``i`` and key ``j`` (ALiBi), with a learned slope per head (initialised at
            ALiBi's geometric slopes), so every position can weight recent events up whatever
            its absolute position.
        item_bias: Reserve the last of the ``dim`` coordinates for a constant 1 (the head
            outputs ``dim - 1`` normalised coordinates), matching an :class:`ItemTower` built
            with ``bias=True``: the dot product becomes ``cos(q, e) + b_item``, a learned
            per-item bias (popularity) that any inner-product index serves unchanged.
        play_signals: Read the per-play signals of the history (skipped flag, gap since the
            previous play, and the position in the session derived from the gaps, each an
            embedding added to the play's item embedding) and the request's gap (an embedding
            beside the encoder state). Off: those inputs are ignored.
        play_clock: Also read the hour of day and weekday (UTC) of every play, each an
            embedding added to the play's (learned "unknown" rows for plays without a time).
            Needs ``play_signals``; off: ``play_hours`` / ``play_weekdays`` are ignored.
    """

    def __init__(
        self,
        num_items: int,
        dim: int = 64,
        id_dim: int = 64,
        encoder: str = "transformer",
        max_len: int = 50,
        num_layers: int = 2,
        num_heads: int = 2,
        dropout: float = 0.1,
        num_users: int = 0,
        num_contexts: int = 0,
        use_hour: bool = False,
        mlp_hidden: int = 0,
        ffn_mult: int = 4,
        recency_bias: bool = False,
        item_bias: bool = False,
        play_signals: bool = False,
        play_clock: bool = False,
    ) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {tuple(ENCODERS)}, got {encoder!r}")
        if num_items < 3:
            raise ValueError(f"num_items={num_items}: need pad, OOV and at least one item")
        self._config: dict[str, Any] = {
            "num_items": int(num_items),
            "dim": int(dim),
            "id_dim": int(id_dim),
            "encoder": str(encoder),
            "max_len": int(max_len),
            "num_layers": int(num_layers),
            "num_heads": int(num_heads),
            "dropout": float(dropout),
            "num_users": int(num_users),
            "num_contexts": int(num_contexts),
            "use_hour": bool(use_hour),
            "mlp_hidden": int(mlp_hidden),
            "ffn_mult": int(ffn_mult),
            "recency_bias": bool(recency_bias),
        }
        if item_bias:  # only when on: configs of older exports stay valid as they are
            if dim < 2:
                raise ValueError(f"item_bias needs dim >= 2 (one is the bias), got {dim}")
            self._config["item_bias"] = True
        if play_signals:  # likewise only when on
            self._config["play_signals"] = True
        if play_clock:  # likewise: towers without it keep their config and state dict
            if not play_signals:
                raise ValueError("play_clock needs play_signals (the clock is a per-play signal)")
            self._config["play_clock"] = True
        self.item_bias = bool(item_bias)
        self.play_signals = bool(play_signals)
        self.play_clock = bool(play_clock)
        self.encoder = encoder
        self.max_len = max_len
        self.id_dim = id_dim
        self.item_embedding = nn.Embedding(num_items, id_dim, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=id_dim**-0.5)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.input_dropout = nn.Dropout(dropout)
        self.sequence_encoder = ENCODERS[encoder](
            id_dim=id_dim,
            dropout=dropout,
            max_len=max_len,
            num_layers=num_layers,
            num_heads=num_heads,
            ffn_mult=ffn_mult,
            recency_bias=recency_bias,
        )
        in_dim = id_dim
        self.user_embedding = None
        if num_users > 0:
            self.user_embedding = nn.Embedding(num_users, id_dim, padding_idx=0)
            in_dim += id_dim
        self.hour_embedding = None
        if use_hour:
            self.hour_embedding = nn.Embedding(NUM_HOURS + 1, id_dim, padding_idx=0)
            in_dim += id_dim
        self.context_embedding = None
        if num_contexts > 0:
            self.context_embedding = nn.Embedding(num_contexts, id_dim, padding_idx=0)
            in_dim += id_dim
        self.skip_embedding = self.gap_embedding = self.position_in_session = None
        self.request_gap_embedding = None
        if play_signals:
            self.skip_embedding = nn.Embedding(2, id_dim)
            self.gap_embedding = nn.Embedding(NUM_GAPS, id_dim)
            self.position_in_session = nn.Embedding(MAX_SESSION_POSITION + 1, id_dim)
            for table in (self.skip_embedding, self.gap_embedding, self.position_in_session):
                nn.init.normal_(table.weight, std=0.02)
            self.request_gap_embedding = nn.Embedding(NUM_GAPS, id_dim)
            in_dim += id_dim
        self.play_hour_embedding = self.play_weekday_embedding = None
        if play_clock:  # index 0 = unknown (no time), learned like the unknown gap
            self.play_hour_embedding = nn.Embedding(NUM_HOURS + 1, id_dim)
            self.play_weekday_embedding = nn.Embedding(NUM_WEEKDAYS + 1, id_dim)
            for table in (self.play_hour_embedding, self.play_weekday_embedding):
                nn.init.normal_(table.weight, std=0.02)
        self.head = _head(in_dim, mlp_hidden, dim - 1 if item_bias else dim, dropout)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable): ``QueryTower(**tower.config)`` rebuilds it."""
        return dict(self._config)

    @property
    def recency_slope(self) -> nn.Parameter | None:
        """The transformer's learned log recency slopes ``[H]`` (None without them)."""
        return getattr(self.sequence_encoder, "recency_slope", None)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kw: Any) -> None:
        # checkpoints and exports before the encoders became modules kept the encoder's
        # parameters on the tower itself (``blocks.0...``, ``gru...``): move them
        for key in [k for k in state_dict if k.startswith(prefix)]:
            name = key[len(prefix) :]
            if name.split(".")[0] in _ENCODER_PARAMS:
                state_dict[f"{prefix}sequence_encoder.{name}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)

    # ------------------------------------------------------------------ sequence encoders
    def encode(self, items: Tensor, query: QueryBatch | None = None) -> Tensor:
        """Causal encoder states: position ``t`` summarises events ``<= t``.

        Args:
            items: Left-padded item indices ``[B, L]`` (0 = pad).
            query: The batch whose per-play signals go with ``items`` (read with
                ``play_signals``; None: unknown).

        Returns:
            ``[B, L, id_dim]``; zeros at pad positions (never used as queries).
        """
        real = items != 0  # [B, L]
        x = self.item_embedding(items)  # [B, L, id_dim]
        if self.play_signals:
            x = x + self._play_embedding(items, query)
        states = self.sequence_encoder(x, real)  # [B, L, id_dim]
        return states * real.unsqueeze(-1).to(states.dtype)

    def _play_embedding(self, items: Tensor, query: QueryBatch | None) -> Tensor:
        """Skip + gap + session-position (+ clock) embeddings of every play ``[B, L, id_dim]``."""
        assert self.skip_embedding is not None and self.gap_embedding is not None
        assert self.position_in_session is not None
        real = items != 0  # [B, L]
        skips = None if query is None else query.skips
        gaps = None if query is None else query.gaps
        skipped = torch.zeros_like(items) if skips is None else (skips == SKIPPED).long()
        gaps = torch.zeros_like(items) if gaps is None else gaps.long()
        gaps = gaps * real.long()  # [B, L] unknown at padding
        # position in the session: plays since the latest session start (a gap of 30 minutes
        # or more, or no earlier play) at or before each play; unknown without gaps
        start = ((gaps == GAP_FIRST) | (gaps >= SESSION_BREAK)).long()  # [B, L]
        segment = torch.cumsum(start, dim=1)  # [B, L]
        length = items.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        same = (segment.unsqueeze(2) == segment.unsqueeze(1)) & causal  # [B, L, L]
        position = same.long().sum(dim=2).clamp(max=MAX_SESSION_POSITION)  # [B, L] 1-based
        known = (segment > 0) & (gaps > 0)  # [B, L]
        position = position * known.long()  # [B, L] 0 = unknown
        out = self.skip_embedding(skipped) + self.gap_embedding(gaps)  # [B, L, id_dim]
        out = out + self.position_in_session(position)  # [B, L, id_dim]
        if self.play_hour_embedding is not None and self.play_weekday_embedding is not None:
            hours = None if query is None else query.play_hours
            weekdays = None if query is None else query.play_weekdays
            unknown = torch.full_like(items, -1)  # [B, L]
            hours = unknown if hours is None else hours  # [B, L] -1 unknown
            weekdays = unknown if weekdays is None else weekdays  # [B, L] -1 unknown
            out = out + self.play_hour_embedding(_hour_index(hours))  # [B, L, id_dim]
            out = out + self.play_weekday_embedding(_weekday_index(weekdays))  # [B, L, id_dim]
        # nothing at padding: a mean encoder sums every position, so padding must add zero
        return out * real.unsqueeze(-1).to(out.dtype)

    # ------------------------------------------------------------------ queries
    def _combine(self, states: Tensor, query: QueryBatch) -> Tensor:
        """Concatenate encoder states ``[..., id_dim]`` with side inputs, project, normalise."""
        parts = [states]
        lead = states.shape[:-1]
        if self.user_embedding is not None:
            users = query.users
            if users is None:
                users = torch.zeros(lead[0], dtype=torch.long, device=states.device)
            u = self.user_embedding(users)  # [B, id_dim]
            parts.append(u.view(lead[0], *([1] * (len(lead) - 1)), -1).expand(*lead, -1))
        if self.hour_embedding is not None:
            h = query.hours
            h = torch.full(lead, UNKNOWN_HOUR, device=states.device) if h is None else h
            parts.append(self.hour_embedding(_hour_index(h).expand(lead)))
        if self.context_embedding is not None:
            c = query.contexts
            c = torch.zeros(lead, dtype=torch.long, device=states.device) if c is None else c
            parts.append(self.context_embedding(c.expand(lead)))
        if self.request_gap_embedding is not None:
            g = query.request_gaps
            g = torch.zeros(lead, dtype=torch.long, device=states.device) if g is None else g
            parts.append(self.request_gap_embedding(g.long().expand(lead)))
        x = torch.cat(parts, dim=-1) if len(parts) > 1 else states
        query_emb = F.normalize(self.head(x), dim=-1)  # [..., dim or dim - 1]
        if self.item_bias:
            query_emb = F.pad(query_emb, (0, 1), value=1.0)  # [..., dim]: times the item bias
        return query_emb

    def forward_sequence(self, query: QueryBatch | Tensor) -> Tensor:
        """A query at every position (training): position ``t`` sees events ``<= t`` only.

        Args:
            query: History ``[B, L]`` with the listener ``[B]`` and, per position, the hour
                and context type of the event it predicts (``[B, L]``); or a bare history.

        Returns:
            L2-normalised queries ``[B, L, dim]``.
        """
        query = QueryBatch.of(query)
        return self._combine(self.encode(query.history, query), query)

    def forward(self, query: QueryBatch | Tensor) -> Tensor:
        """The query for the next item after the last event of each history.

        Args:
            query: The :class:`~twotower.query.QueryBatch` (history ``[B, L]``, longer than
                ``max_len``: the most recent ``max_len`` are used), or a bare history tensor
                with every context unknown.

        Returns:
            L2-normalised queries ``[B, dim]``.
        """
        query = QueryBatch.of(query)
        history = query.history
        if history.shape[1] > self.max_len:
            query = query.with_history(history[:, -self.max_len :])
            history = query.history
        if history.shape[1] == 0:
            history = torch.zeros(history.shape[0], 1, dtype=torch.long, device=history.device)
            query = QueryBatch(
                history, query.users, query.hours, query.contexts, request_gaps=query.request_gaps
            )
        states = self.encode(history, query)[:, -1]  # [B, id_dim]
        return self._combine(states, query)

    # ------------------------------------------------------------------ unordered data (bags)
    def forward_bag(self, items: Tensor, keep: Tensor, users: Tensor | None = None) -> Tensor:
        """The query of a bag of items (no order): the mean of the kept items' embeddings.

        For unordered data (e.g. user-artist play counts). Only the ``mean`` encoder has a bag
        form, and it equals what :meth:`forward` computes for the whole history (the running
        mean at the last position), so a model trained on bags serves unchanged.

        Args:
            items: Item indices ``[B, L]`` in any order (0 = pad).
            keep: Which items form the query ``[B, L]`` (the others are left out, e.g. the
                held-out targets of the bag).
            users: User indices ``[B]`` or None.

        Returns:
            L2-normalised queries ``[B, dim]``; a row that keeps nothing gets the query of an
            empty history.

        Raises:
            ValueError: The encoder is not ``mean``.
        """
        if self.encoder != "mean":
            raise ValueError(f"forward_bag needs encoder='mean', got {self.encoder!r}")
        keep = keep & (items != 0)  # [B, L]
        x = self.input_dropout(self.item_embedding(items))  # [B, L, id_dim]
        total = (x * keep.unsqueeze(-1).to(x.dtype)).sum(dim=1)  # [B, id_dim]
        count = keep.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)  # [B, 1]
        return self._combine(total / count, QueryBatch(items, users=users))


class ItemTower(nn.Module):
    """Item ids -> L2-normalised item vectors from the shared id embedding and side features.

    Side features live in buffers indexed by item (``artist [V]``, ``album [V]``, ``genres
    [V, G]``, ``year [V]``, ``audio [V, F]``), filled by :meth:`set_features`, so ``forward``
    takes only ids and the features travel with the state dict.

    Args:
        id_embedding: The item-id embedding (owned by the :class:`QueryTower`).
        dim: Output size.
        num_artists: Artist vocabulary size (0 disables).
        num_albums: Album vocabulary size (0 disables).
        num_genres: Genre vocabulary size (0 disables).
        num_year_buckets: Year buckets (0 disables).
        num_audio: Numeric audio features per item (0 disables).
        hidden: Hidden width of the output MLP; 0 = a single linear projection.
        dropout: Dropout in the MLP.
        max_genres: Genres per item ``G`` (the buffer width; resized by :meth:`set_features`).
        feature_dim: Embedding size of each side feature (default ``id_dim // 2``).
        bias: Learned per-item bias as the last of the ``dim`` coordinates (the other
            ``dim - 1`` are L2-normalised); pair with a ``QueryTower(item_bias=True)``.
    """

    def __init__(
        self,
        id_embedding: nn.Embedding,
        dim: int = 64,
        num_artists: int = 0,
        num_albums: int = 0,
        num_genres: int = 0,
        num_year_buckets: int = 0,
        num_audio: int = 0,
        hidden: int = 0,
        dropout: float = 0.0,
        max_genres: int = 1,
        feature_dim: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.id_embedding = id_embedding
        num_items, id_dim = id_embedding.weight.shape
        fd = feature_dim or max(id_dim // 2, 1)
        in_dim = id_dim
        emb = nn.Embedding
        self.artist_embedding = emb(num_artists, fd, padding_idx=0) if num_artists else None
        self.album_embedding = emb(num_albums, fd, padding_idx=0) if num_albums else None
        self.genre_embedding = (
            nn.EmbeddingBag(num_genres, fd, mode="mean", padding_idx=0) if num_genres else None
        )
        self.year_embedding = emb(num_year_buckets, fd, padding_idx=0) if num_year_buckets else None
        self.audio_projection = nn.Linear(num_audio, fd) if num_audio else None
        for m in (
            self.artist_embedding,
            self.album_embedding,
            self.genre_embedding,
            self.year_embedding,
            self.audio_projection,
        ):
            if m is not None:
                in_dim += fd
        self.register_buffer("artist", torch.zeros(num_items, dtype=torch.long))
        self.register_buffer("album", torch.zeros(num_items, dtype=torch.long))
        self.register_buffer("genres", torch.zeros(num_items, max(max_genres, 1), dtype=torch.long))
        self.register_buffer("year", torch.zeros(num_items, dtype=torch.long))
        self.register_buffer("audio", torch.zeros(num_items, max(num_audio, 0)))
        self.head = _head(in_dim, hidden, dim - 1 if bias else dim, dropout)
        self.bias: nn.Parameter | None = None  # [V], 1-D: a bias, never weight-decayed
        if bias:
            if dim < 2:
                raise ValueError(f"bias needs dim >= 2 (one coordinate is the bias), got {dim}")
            self.bias = nn.Parameter(torch.zeros(num_items))

    @property
    def has_side_features(self) -> bool:
        """Whether any side feature is enabled."""
        return any(
            m is not None
            for m in (
                self.artist_embedding,
                self.album_embedding,
                self.genre_embedding,
                self.year_embedding,
                self.audio_projection,
            )
        )

    def set_features(self, features: Any) -> None:
        """Fill the feature buffers from an :class:`~twotower.data.prepared.ItemFeatures`.

        Raises:
            ValueError: The feature tables do not have one row per item, or hold indices beyond
                the sizes this tower was built with.
        """
        n = self.id_embedding.num_embeddings
        checks = (
            ("artist", self.artist_embedding, features.artist),
            ("album", self.album_embedding, features.album),
            ("genres", self.genre_embedding, features.genres),
            ("year", self.year_embedding, features.year),
        )
        for name, emb, arr in checks:
            arr = np.asarray(arr)
            if arr.shape[0] != n:
                raise ValueError(f"item feature {name!r} has {arr.shape[0]} rows, expected {n}")
            if emb is not None and arr.size and int(arr.max()) >= emb.num_embeddings:
                raise ValueError(
                    f"item feature {name!r} holds index {int(arr.max())} >= table size "
                    f"{emb.num_embeddings}"
                )
        audio = np.asarray(features.audio, dtype=np.float32).reshape(n, -1)
        proj = self.audio_projection
        if proj is not None and audio.shape[1] != proj.in_features:
            raise ValueError(f"{audio.shape[1]} audio features, tower built for {proj.in_features}")
        genres = np.asarray(features.genres, dtype=np.int64).reshape(n, -1)
        if genres.shape[1] == 0:
            genres = np.zeros((n, 1), dtype=np.int64)
        dev = self.artist.device
        self.artist = torch.as_tensor(np.asarray(features.artist, dtype=np.int64), device=dev)
        self.album = torch.as_tensor(np.asarray(features.album, dtype=np.int64), device=dev)
        self.genres = torch.as_tensor(genres, device=dev)
        self.year = torch.as_tensor(np.asarray(features.year, dtype=np.int64), device=dev)
        self.audio = torch.as_tensor(audio, device=dev)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kw: Any) -> None:
        # Feature tables may differ in width from the constructor's guess: adopt the stored one.
        for name in ("genres", "audio"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.artist.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)

    def forward(self, ids: Tensor) -> Tensor:
        """Item vectors.

        Args:
            ids: Item indices ``[N]`` (any shape ``[...]`` works).

        Returns:
            ``[N, dim]``: L2-normalised, or with ``bias`` the first ``dim - 1`` coordinates
            L2-normalised and the item's bias last.
        """
        shape = ids.shape
        ids = ids.reshape(-1)
        parts = [self.id_embedding(ids)]  # [N, id_dim]
        if self.artist_embedding is not None:
            parts.append(self.artist_embedding(self.artist[ids]))  # [N, fd]
        if self.album_embedding is not None:
            parts.append(self.album_embedding(self.album[ids]))  # [N, fd]
        if self.genre_embedding is not None:
            parts.append(self.genre_embedding(self.genres[ids]))  # [N, fd]
        if self.year_embedding is not None:
            parts.append(self.year_embedding(self.year[ids]))  # [N, fd]
        if self.audio_projection is not None:
            parts.append(self.audio_projection(self.audio[ids]))  # [N, fd]
        x = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        item_emb = F.normalize(self.head(x), dim=-1)  # [N, dim or dim - 1]
        if self.bias is not None:
            bias = self.bias[ids].to(item_emb.dtype).unsqueeze(-1)  # [N, 1]
            item_emb = torch.cat([item_emb, bias], dim=-1)  # [N, dim]
        return item_emb.reshape(*shape, -1)
