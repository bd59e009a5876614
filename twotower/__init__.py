"""twotower: two-tower retrieval for music, from listening sessions to a FAISS index.

The package root holds only the version, so every module may import it without an import
running back up; the Retriever lives in :mod:`twotower.retrieve`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
