"""The one logging setup of every command: our messages shown, third-party noise hidden.

At the default verbosity the ``twotower`` logger prints INFO and above; FAISS's loader
("Could not load library with AVX512 support ... ModuleNotFoundError"), Lightning's info
messages (device banners, the "💡 Tip" advertisements for litlogger/litmodels, "Seed set to")
only warnings and above; and the known-harmless Python warnings (torch's ``LeafSpec``
deprecation raised inside Lightning, jsonargparse's ``skip_none`` one raised by LightningCLI,
LightningCLI's "args parameter" warning for arguments we pass on purpose) are ignored.
``-v`` shows all of it; ``-vv`` adds DEBUG.
"""

from __future__ import annotations

import logging
import warnings

#: Loggers of libraries whose INFO messages are noise at the default verbosity.
NOISY_LOGGERS = ("faiss", "pytorch_lightning", "lightning_fabric", "lightning", "torch")
#: ``(message regex, category)`` of Python warnings hidden at the default verbosity.
QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r".*isinstance\(treespec, LeafSpec\)", FutureWarning),
    (r"LightningCLI's args parameter", UserWarning),
    (r"skip_none parameter was deprecated", Warning),  # jsonargparse, from Lightning's code
    # TrainingBatches gives every worker its own shard and knows the exact batch count
    (r"Your `IterableDataset` has `__len__` defined", UserWarning),
    # under DDP the module gathers every rank's ranks before it logs an epoch metric
    (r"It is recommended to use `self.log\(", Warning),
)


class _QuietLibraries(logging.Filter):
    """Drops records below WARNING from the :data:`NOISY_LOGGERS` (and their children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(record.name == n or record.name.startswith(n + ".") for n in NOISY_LOGGERS)


def setup_logging(verbose: int = 0) -> None:
    """Configure logging and warnings for a command line run.

    Call before importing FAISS or Lightning (they log while being imported).

    Args:
        verbose: 0: our INFO messages, third-party warnings only; 1 (``-v``): third-party INFO
            messages and every warning as well; 2 (``-vv``): DEBUG.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    for h in root.handlers:
        # a library imported later (the pipeline imports Lightning lazily) sets its logger's
        # level to INFO again; the handler's filter keeps its INFO messages out all the same
        for f in [f for f in h.filters if isinstance(f, _QuietLibraries)]:
            h.removeFilter(f)
        if not verbose:
            h.addFilter(_QuietLibraries())
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    logging.getLogger("twotower").setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.NOTSET if verbose else logging.WARNING)
        # Lightning gives its logger a handler of its own when the root had none at import
        logger.propagate = True
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
    for message, category in QUIET_WARNINGS:
        if verbose:
            warnings.filterwarnings("default", message=message, category=category)
        else:
            warnings.filterwarnings("ignore", message=message, category=category)
