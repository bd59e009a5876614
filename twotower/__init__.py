"""twotower: two-tower retrieval for music, from listening sessions to a FAISS index."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "Retriever"]


def __getattr__(name: str):  # lazy: importing the package must not pull in torch/faiss
    if name == "Retriever":
        from twotower.retrieve import Retriever

        return Retriever
    raise AttributeError(name)
