"""The model: towers (plain ``nn.Module``s), the retrieval loss and the LightningModule.

Importing this package does not import Lightning; :class:`TwoTowerModule` is loaded on first
use, so export and serving can load a :class:`QueryTower` with torch alone.
"""

from __future__ import annotations

from typing import Any

from twotower.model.loss import RetrievalLoss
from twotower.model.towers import ItemTower, QueryTower

__all__ = ["ItemTower", "QueryTower", "RetrievalLoss", "TwoTowerModule"]


def __getattr__(name: str) -> Any:
    if name == "TwoTowerModule":
        from twotower.model.module import TwoTowerModule

        return TwoTowerModule
    raise AttributeError(name)
