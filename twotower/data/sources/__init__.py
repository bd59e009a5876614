"""One loader per input format, all returning a :class:`~twotower.data.schema.LoadResult`.

Loaders are imported lazily by name so that adding a format never slows the others down.
"""

from __future__ import annotations

import importlib
from typing import Any

from twotower.data.schema import DataError, LoadResult

# format name -> "module:function"; each function has the signature
#   load(path: str | None, columns: dict[str, str] | None = None, **options) -> LoadResult
FORMATS: dict[str, str] = {
    "synthetic": "twotower.data.synthetic:load",
    "csv": "twotower.data.sources.generic:load_csv",
    "tsv": "twotower.data.sources.generic:load_tsv",
    "parquet": "twotower.data.sources.generic:load_parquet",
    "movielens": "twotower.data.sources.movielens:load",
    "mssd": "twotower.data.sources.mssd:load",
    "lastfm": "twotower.data.sources.lastfm:load",
    "hetrec-lastfm": "twotower.data.sources.hetrec:load",
}


def load_source(
    fmt: str, path: str | None, columns: dict[str, str] | None = None, **options: Any
) -> LoadResult:
    """Load ``path`` in format ``fmt``.

    Args:
        fmt: One of :data:`FORMATS`.
        path: File or folder (None only for ``synthetic``).
        columns: Canonical column -> column name in the file (generic formats).
        **options: Format-specific options (see each loader).

    Raises:
        DataError: Unknown format or bad input (the message names file, line or column).
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {sorted(FORMATS)}")
    module, func = FORMATS[fmt].split(":")
    loader = getattr(importlib.import_module(module), func)
    return loader(path, columns=columns, **options)
