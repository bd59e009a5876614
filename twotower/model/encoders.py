"""Sequence encoders of the query tower: modules behind one interface.

Each encoder maps item-id embeddings of a left-padded window and the mask of its real events
to causal states: position ``t`` summarises events ``<= t``. :data:`ENCODERS` names them for
configs (``model.encoder``); :class:`~twotower.model.towers.QueryTower` builds one by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SequenceEncoder(nn.Module):
    """The interface: ``forward(x [B, L, d], real [B, L]) -> states [B, L, d]`` (causal)."""

    def forward(self, x: Tensor, real: Tensor) -> Tensor:  # pragma: no cover - interface
        """Causal states of the embedded window ``x`` (``real``: which positions hold events)."""
        raise NotImplementedError


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + MHA(LN(x))`` then ``x + FFN(LN(x))``.

    Args:
        d: Model width.
        num_heads: Attention heads (``d`` must be divisible by it).
        dropout: Dropout on the residual branches (none on the attention weights: on CPU it
            forces the slow attention path and costs more than it helps).
        ffn_mult: Feed-forward width as a multiple of ``d``.
    """

    def __init__(self, d: int, num_heads: int, dropout: float, ffn_mult: int = 4) -> None:
        super().__init__()
        if d % num_heads:
            raise ValueError(f"id_dim={d} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * d, d)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: Inputs ``[B, L, d]``.
            allowed: Boolean attention mask ``[B, 1, L, L]``, True where query ``i`` may attend
                to key ``j``; or an additive float mask ``[B, H, L, L]`` (``-inf`` = blocked).

        Returns:
            ``[B, L, d]``.
        """
        b, length, d = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).view(b, length, 3, self.num_heads, d // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, d/H]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # [B, H, L, d/H]
        att = att.transpose(1, 2).reshape(b, length, d)  # [B, L, d]
        x = x + self.drop(self.proj(att))
        return x + self.drop(self.ffn(self.ln2(x)))


class MeanEncoder(SequenceEncoder):
    """Causal running mean of the embeddings of real events.

    Args:
        id_dim: Width (unused: no parameters).
        dropout: Input dropout.
    """

    def __init__(self, id_dim: int, dropout: float, **_: object) -> None:
        super().__init__()
        self.input_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """Running mean ``[B, L, d]``."""
        x = self.input_dropout(x)
        total = x.cumsum(dim=1)  # [B, L, id_dim]
        count = real.to(x.dtype).cumsum(dim=1).clamp(min=1).unsqueeze(-1)  # [B, L, 1]
        return total / count


class GRUEncoder(SequenceEncoder):
    """A GRU over the real events (moved to the front so padding never enters the state).

    Args:
        id_dim: Width.
        dropout: Input dropout (and between GRU layers).
        num_layers: GRU layers.
    """

    def __init__(self, id_dim: int, dropout: float, num_layers: int = 1, **_: object) -> None:
        super().__init__()
        self.input_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(
            id_dim,
            id_dim,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """GRU states ``[B, L, d]`` at the positions of the input."""
        x = self.input_dropout(x)
        # Move the real events to the front (right padding) so the GRU state at each real
        # position has seen real events only; then move the outputs back.
        length = x.shape[1]
        pad = (~real).sum(dim=1, keepdim=True)  # [B, 1]
        ar = torch.arange(length, device=x.device).unsqueeze(0)  # [1, L]
        to_front = ((ar + pad) % length).unsqueeze(-1).expand(-1, -1, x.shape[2])  # [B, L, d]
        out, _ = self.gru(x.gather(1, to_front))  # [B, L, id_dim]
        back = ((ar - pad) % length).unsqueeze(-1).expand(-1, -1, out.shape[2])  # [B, L, d]
        return out.gather(1, back)


class TransformerEncoder(SequenceEncoder):
    """Causal pre-LN transformer with learned positions and an optional ALiBi recency bias.

    Args:
        id_dim: Width.
        dropout: Input and residual dropout.
        max_len: Longest window (positions).
        num_layers: Blocks.
        num_heads: Attention heads.
        ffn_mult: Feed-forward width as a multiple of ``id_dim``.
        recency_bias: Add ``-slope_h * (i - j)`` to the attention logit of query ``i`` and key
            ``j``, with a learned slope per head (initialised at ALiBi's geometric slopes).
    """

    def __init__(
        self,
        id_dim: int,
        dropout: float,
        max_len: int = 50,
        num_layers: int = 1,
        num_heads: int = 2,
        ffn_mult: int = 4,
        recency_bias: bool = False,
        **_: object,
    ) -> None:
        super().__init__()
        self.id_dim = id_dim
        self.max_len = max_len
        self.input_dropout = nn.Dropout(dropout)
        self.position_embedding = nn.Embedding(max_len, id_dim)
        nn.init.normal_(self.position_embedding.weight, std=id_dim**-0.5)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(id_dim, num_heads, dropout, ffn_mult)
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(id_dim)
        self.recency_slope = None
        if recency_bias:
            slopes = [2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)]
            self.recency_slope = nn.Parameter(torch.log(torch.tensor(slopes)))  # [H] log

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """Transformer states ``[B, L, d]``."""
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} > max_len {self.max_len}")
        # Position 0 = first real event of the window: independent of the amount of padding.
        positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, L]
        x = x * math.sqrt(self.id_dim) + self.position_embedding(positions)  # [B, L, id_dim]
        x = self.input_dropout(x) * real.unsqueeze(-1).to(x.dtype)
        ar = torch.arange(length, device=x.device)
        causal = ar.unsqueeze(1) >= ar.unsqueeze(0)  # [L, L] (no tril/eye: ONNX-friendly)
        eye = ar.unsqueeze(1) == ar.unsqueeze(0)  # [L, L]
        # Query i attends to real keys j <= i; a pad query attends to itself only (no NaN rows).
        allowed = (causal & real.unsqueeze(1)) | eye  # [B, L, L]
        mask: Tensor = allowed.unsqueeze(1)  # [B, 1, L, L]
        if self.recency_slope is not None:
            age = (ar.unsqueeze(1) - ar.unsqueeze(0)).clamp(min=0).to(x.dtype)  # [L, L] i - j
            bias = -self.recency_slope.exp().to(x.dtype).view(-1, 1, 1) * age  # [H, L, L]
            mask = bias.unsqueeze(0).masked_fill(~mask, float("-inf"))  # [B, H, L, L]
        for block in self.blocks:
            x = block(x, mask)  # [B, L, id_dim]
        return self.final_norm(x)


ENCODERS: dict[str, type[SequenceEncoder]] = {
    "mean": MeanEncoder,
    "gru": GRUEncoder,
    "transformer": TransformerEncoder,
}
