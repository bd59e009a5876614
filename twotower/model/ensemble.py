"""Several trained two-tower models served as one: concatenated vectors, one inner product.

For members ``k`` with query vectors ``q_k``, item vectors ``e_k`` and softmax temperatures
``tau_k``, the ensemble scores ``sum_k w_k * q_k . e_k`` with ``w_k = (1 / tau_k) / sum_j (1 /
tau_j)``: the mean of the members' logits, up to one scale that does not change a ranking. That
sum is a single dot product of ``[w_1 q_1, ..., w_K q_K]`` and ``[e_1, ..., e_K]``, so an
ensemble is still a two-tower model: :class:`EnsembleQueryTower` is an ordinary query tower
(config, state dict, ONNX) and the item vectors of the members are concatenated into one index.

Members must share the catalogue (same item vocabulary) and the query inputs (history length,
users, hour, context); seeds, sizes and training switches may differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from twotower.model.towers import QueryTower
from twotower.query import QueryBatch

# Keys of every member's config that the ensemble repeats at the top level of its own config,
# where the export, the ONNX writer and the Retriever read them for any query tower.
SHARED_KEYS = (
    "num_items", "max_len", "num_users", "num_contexts", "use_hour", "play_signals", "play_clock"
)  # fmt: skip


def temperature_weights(temperatures: Sequence[float]) -> list[float]:
    """Member weights ``(1 / tau_k) / sum_j (1 / tau_j)``: the mean of the members' logits."""
    if not temperatures or any(not float(t) > 0 for t in temperatures):
        raise ValueError(f"temperatures must be positive, got {list(temperatures)}")
    inverse = [1.0 / float(t) for t in temperatures]
    return [x / sum(inverse) for x in inverse]


def bias_columns(config: dict[str, Any]) -> list[int]:
    """Columns of a query tower's vectors that carry an item bias (``item_bias`` members).

    Works for a plain :class:`QueryTower` config (its last column when ``item_bias``) and for an
    :class:`EnsembleQueryTower` config (one column per biased member).
    """
    members = config.get("members")
    if members is None:
        return [int(config["dim"]) - 1] if config.get("item_bias") else []
    columns, offset = [], 0
    for member in members:
        offset += int(member["dim"])
        if member.get("item_bias"):
            columns.append(offset - 1)
    return columns


class EnsembleQueryTower(nn.Module):
    """Query towers of several models -> one weighted, concatenated query vector.

    Args:
        members: Each member's :class:`QueryTower` config (``tower.config``).
        weights: One weight per member (default: equal); see :func:`temperature_weights`.
        **shared: The derived top-level keys of :attr:`config` (``dim`` and
            :data:`SHARED_KEYS`), accepted so that ``EnsembleQueryTower(**tower.config)``
            rebuilds the tower; they must agree with the members.

    Raises:
        ValueError: No members, members with different catalogues or query inputs, a weight
            count that does not match, or a derived key that disagrees with the members.
    """

    def __init__(
        self,
        members: list[dict[str, Any]],
        weights: list[float] | None = None,
        **shared: Any,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        weights = [1.0 / len(members)] * len(members) if weights is None else list(weights)
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} weights for {len(members)} members")
        first = members[0]
        for i, m in enumerate(members[1:], start=1):
            for key in SHARED_KEYS:
                if m.get(key, 0) != first.get(key, 0):
                    raise ValueError(
                        f"ensemble member {i} has {key}={m.get(key)!r}, member 0 "
                        f"{first.get(key)!r}: members must share the catalogue and query inputs"
                    )
        self.members = nn.ModuleList(QueryTower(**m) for m in members)
        self.weights = [float(w) for w in weights]
        self.register_buffer(
            "scale", torch.tensor(self.weights, dtype=torch.float32), persistent=False
        )
        self.max_len = int(first["max_len"])
        self._config: dict[str, Any] = {
            "members": [dict(t.config) for t in self.members],
            "weights": self.weights,
            "dim": sum(int(m["dim"]) for m in members),
            **{k: first.get(k, 0) for k in SHARED_KEYS},
        }
        unknown = set(shared) - set(self._config)
        if unknown:
            raise ValueError(f"unknown ensemble config keys {sorted(unknown)}")
        for key, value in shared.items():
            if value != self._config[key]:
                raise ValueError(
                    f"ensemble config says {key}={value!r}, its members give {self._config[key]!r}"
                )

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable), derived keys included."""
        return {**self._config, "members": [dict(m) for m in self._config["members"]]}

    def forward(self, query: QueryBatch | Tensor) -> Tensor:
        """Weighted member queries side by side, ``[B, sum of member dims]``.

        Args:
            query: The :class:`~twotower.query.QueryBatch` (or a bare ``[B, L]`` history).
        """
        query = QueryBatch.of(query)
        parts = [
            member(query) * self.scale[k]  # [B, dim_k]
            for k, member in enumerate(self.members)
        ]
        return torch.cat(parts, dim=-1)  # [B, dim]


def check_members(paths: Sequence[Any], modules: Sequence[nn.Module]) -> None:
    """Raise unless every module was trained on the first one's data.

    Compares the track vocabulary and the data fingerprint each module keeps in ``data_info``
    (restored from its checkpoint), so evaluation and export accept the same ensembles.

    Raises:
        ValueError: A member was trained on other data, naming its checkpoint.
    """
    first = modules[0].data_info
    for path, m in zip(paths[1:], modules[1:], strict=True):
        info = m.data_info
        same_fp = not (info.get("fingerprint") and first.get("fingerprint")) or (
            info["fingerprint"] == first["fingerprint"]
        )
        if info.get("item_vocab") != first.get("item_vocab") or not same_fp:
            raise ValueError(
                f"{path}: trained on other data than {paths[0]}; ensemble members must share "
                "the data and its track vocabulary"
            )


class EnsembleModel(nn.Module):
    """Trained ``TwoTowerModule``s as one model for evaluation and export.

    Exposes what :class:`~twotower.evaluate.EmbeddingScorer` and the export use: a
    ``query_tower`` (an :class:`EnsembleQueryTower` holding the members' trained query towers)
    and ``item_embeddings()``.

    Args:
        modules: Trained modules on the same item vocabulary.

    Raises:
        ValueError: The members have different item counts or query inputs (see also
            :func:`check_members` for their data).
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        if not modules:
            raise ValueError("an ensemble needs at least one model")
        temperatures = [float(m.loss_fn.temperature) for m in modules]
        self.query_tower = EnsembleQueryTower(
            [m.query_tower.config for m in modules], temperature_weights(temperatures)
        )
        for tower, m in zip(self.query_tower.members, modules, strict=True):
            tower.load_state_dict(m.query_tower.state_dict())
        self.item_towers = nn.ModuleList(m.item_tower for m in modules)
        # every member has this many items: the query tower checked num_items above
        self.hparams = {"num_items": int(modules[0].hparams.num_items), "members": len(modules)}

    @torch.no_grad()
    def item_embeddings(self, chunk: int = 65536) -> Tensor:
        """Concatenated member item vectors ``[V, dim]`` (row 0 pad, row 1 OOV)."""
        n = int(self.hparams["num_items"])
        device = next(self.item_towers[0].parameters()).device
        ids = torch.arange(n, device=device)
        return torch.cat(
            [
                torch.cat([t(ids[s : s + chunk]) for s in range(0, n, chunk)])  # [V, dim_k]
                for t in self.item_towers
            ],
            dim=-1,
        )
