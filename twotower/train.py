"""Training entry point: a small ``LightningCLI`` and the typed :func:`fit` that tests call.

``python train.py fit --config configs/default.yaml [--trainer.max_epochs 3] ...``

Defaults: CUDA with ``bf16-mixed`` (and TF32 matmuls) when available, else CPU fp32 and
deterministic algorithms; ``seed_everything: 0``; TensorBoard logs under ``runs/`` (or
``--trainer.default_root_dir``), with the checkpoints beside them and one summary line at the end;
ModelCheckpoint on ``val/ndcg@10`` (max, plus ``last.ckpt``), EarlyStopping on the same metric,
LR monitor. The resolved config is saved next to the logs (``config.yaml``). Data-derived model
sizes are linked from the datamodule, and ``model.max_len`` from ``data.window``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import CheckpointIO, TorchCheckpointIO
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from twotower.data.datamodule import TwoTowerDataModule
from twotower.model.module import MONITOR, TwoTowerModule

#: Model constructor arguments that come from the data.
DATA_SIZES = (
    "num_items",
    "num_users",
    "num_contexts",
    "num_artists",
    "num_albums",
    "num_genres",
    "num_year_buckets",
    "num_audio",
    "max_genres",
)


#: The DataModule a config gets when it does not name one (``data.class_path``).
DEFAULT_DATAMODULE = "twotower.data.datamodule.TwoTowerDataModule"
#: The DataModules whose options ``train.py fit --help`` lists.
HELP_DATAMODULES = (DEFAULT_DATAMODULE,)
#: The TensorBoard logger's default folder; ``--trainer.default_root_dir`` replaces it.
DEFAULT_LOG_DIR = "runs"


def _sizes(dm: TwoTowerDataModule) -> dict[str, int]:
    return dm.model_sizes()


def _size_getter(name: str) -> Any:
    def get(dm: TwoTowerDataModule) -> int:
        return int(_sizes(dm)[name])

    get.__name__ = f"data_{name}"
    return get


def trainer_defaults() -> dict[str, Any]:
    """Device-dependent trainer defaults (CUDA: bf16-mixed; CPU: fp32, deterministic).

    The callbacks are :func:`twotower.model.callbacks.default_callbacks` (training clock,
    throughput, embedding histograms, hparams view, projector).
    """
    from twotower.model.callbacks import default_callbacks

    cuda = torch.cuda.is_available()
    return {
        "accelerator": "auto",
        "devices": "auto",
        "precision": "bf16-mixed" if cuda else "32-true",
        "deterministic": not cuda,
        "max_epochs": 20,
        "logger": {
            "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
            "init_args": {
                "save_dir": DEFAULT_LOG_DIR,
                "name": "twotower",
                "default_hp_metric": False,
            },
        },
        "callbacks": default_callbacks(),
    }


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically and read without pickle.

    Lightning's default writer truncates ``last.ckpt`` and then writes it, so a kill or a full
    disk during saving leaves a corrupt "last" checkpoint. Here the checkpoint goes to a hidden
    ``.NAME.<random>.tmp`` file in the same folder, is fsynced, and replaces ``NAME`` with
    ``os.replace``: the previous file stays intact until the new one is complete. Reading
    defaults to ``weights_only=True`` whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, rename)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            full = _disk_full_error(e)
            if full is not None:
                raise OSError(
                    full.errno,
                    f"could not write checkpoint {path}: {full.strerror} (disk full?); "
                    f"the previous {path.name}, if any, is unchanged",
                ) from e
            raise
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read a checkpoint; ``weights_only`` defaults to True (never unpickle objects)."""
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(
            path, weights_only=True if weights_only is None else weights_only, **kwargs
        )


def _disk_full_error(e: BaseException | None) -> OSError | None:
    """The out-of-space OSError behind ``e`` (torch's zip writer re-raises it as RuntimeError)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def logs_under_root_dir(config: Any) -> None:
    """Make ``--trainer.default_root_dir D`` move the default logs and checkpoints under ``D``.

    The checkpoints go to ``<log dir>/checkpoints``. Lightning uses ``default_root_dir`` only
    when there is no logger, and the default logger writes to :data:`DEFAULT_LOG_DIR`: without
    this, ``--trainer.default_root_dir`` would be silently ignored. A logger ``save_dir`` set
    to anything else is kept.

    Args:
        config: The parsed config of the subcommand (changed in place).
    """
    root = config.get("trainer.default_root_dir")
    logger = config.get("trainer.logger")
    init = logger.get("init_args") if hasattr(logger, "get") else None
    if not root or init is None or "TensorBoardLogger" not in str(logger.get("class_path", "")):
        return
    if init.get("save_dir") == DEFAULT_LOG_DIR:
        init["save_dir"] = str(root)


def resolve_last_checkpoint(config: Any) -> None:
    """Make ``--ckpt_path last`` resume the newest run's ``last.ckpt``, in that run's folder.

    Lightning looks for ``last.ckpt`` only in the checkpoint folder of the *new* run, which
    the versioned TensorBoard logger makes a fresh ``version_N``: a resumed run would silently
    start from scratch. When the checkpoint folder is not fixed (``checkpoint.dirpath``) and the
    logger version is not given, this points ``ckpt_path`` at the newest
    ``<save_dir>/<name>/version_*/checkpoints/last*.ckpt`` and reuses that version, so logs
    and checkpoints continue where they stopped. Nothing found: left as is (Lightning warns
    and starts from scratch).

    Args:
        config: The parsed config of the subcommand (changed in place).
    """
    if config.get("ckpt_path") != "last" or config.get("checkpoint.dirpath"):
        return
    logger = config.get("trainer.logger")
    init = logger.get("init_args") if hasattr(logger, "get") else None
    if init is None or "TensorBoardLogger" not in str(logger.get("class_path", "")):
        return
    if init.get("version") is not None:
        return
    root = Path(init.get("save_dir") or "lightning_logs") / str(init.get("name") or "")
    found = [p for p in root.glob("version_*/checkpoints/last*.ckpt") if p.is_file()]
    if not found:
        return
    last = max(found, key=lambda p: p.stat().st_mtime)
    version = last.parent.parent.name
    m = re.fullmatch(r"version_(\d+)", version)
    init["version"] = int(m.group(1)) if m else version
    config["ckpt_path"] = str(last)


class TwoTowerCLI(LightningCLI):
    """``LightningCLI(TwoTowerModule, <a DataModule>)`` with the callbacks and links.

    The DataModule is :class:`TwoTowerDataModule` (flat ``data:`` keys) unless a config names
    another one with ``data: {class_path: ..., init_args: {...}}``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("trainer_defaults", trainer_defaults())
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(TwoTowerModule, pl.LightningDataModule, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Callbacks (configurable as ``checkpoint.*``, ``early_stopping.*``) and links."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": MONITOR,
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch}-ndcg{val/ndcg@10:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults(
            {
                "early_stopping.monitor": MONITOR,
                "early_stopping.mode": "max",
                "early_stopping.patience": 5,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.set_defaults({"data": {"class_path": DEFAULT_DATAMODULE}})
        # subclass mode shows only ``--data CONFIG | CLASS_PATH``: list the options themselves
        add_data_options_help(parser)
        parser.link_arguments("data.init_args.window", "model.max_len", apply_on="parse")
        parser.link_arguments("data.init_args.play_signals", "model.play_signals", apply_on="parse")
        parser.link_arguments("data.init_args.play_clock", "model.play_clock", apply_on="parse")
        for name in DATA_SIZES:
            parser.link_arguments(
                "data", f"model.{name}", compute_fn=_size_getter(name), apply_on="instantiate"
            )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> pl.Trainer:
        """Drop the callbacks that cannot work in this configuration.

        No LR monitor without a logger, no checkpoint without checkpointing, no early stopping
        without validation.
        """
        if config.get("limit_val_batches") == 0:
            callbacks = [c for c in callbacks if not isinstance(c, EarlyStopping)]
        if config.get("logger") is False:
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        plugins = config.get("plugins")
        plugins = (
            [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        )
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        from twotower.run_summary import RunSummary

        if not any(isinstance(c, RunSummary) for c in callbacks):
            callbacks = [*callbacks, RunSummary()]
        return super()._instantiate_trainer({**config, "plugins": plugins}, callbacks)

    def before_instantiate_classes(self) -> None:
        """TF32/bf16-friendly matmuls on CUDA; logs under ``default_root_dir``; resume."""
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")
        logs_under_root_dir(self.config[self.subcommand] if self.subcommand else self.config)
        if self.subcommand == "fit":
            resolve_last_checkpoint(self.config[self.subcommand])


def add_data_options_help(parser: LightningArgumentParser) -> None:
    """List every DataModule's ``--data.*`` options in ``--help`` (:data:`HELP_DATAMODULES`).

    LightningCLI's subclass mode shows only ``--data CONFIG | CLASS_PATH``. Each DataModule
    gets a help section with its options, types, defaults and documentation; the entries are
    for reading only (parsing goes through ``data`` as before).
    """
    import argparse
    import importlib
    import inspect

    for path in HELP_DATAMODULES:
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        default = " (the default)" if path == DEFAULT_DATAMODULE else ""
        group = parser.add_argument_group(
            f"Data options of {name}{default}",
            f"--data.KEY VALUE with data.class_path {path}",
        )
        docs = _arg_docs(inspect.getdoc(cls) or "")
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            kind = p.annotation if isinstance(p.annotation, str) else str(p.annotation)
            required = p.default is p.empty
            text = f"{docs.get(p.name, '')} (type: {kind}{', required' if required else ''})"
            action = argparse.Action(
                [f"--data.{p.name}"],
                dest=argparse.SUPPRESS,
                default=argparse.SUPPRESS if required else p.default,
                metavar=p.name.upper(),
                help=text.strip(),
            )
            group._group_actions.append(action)  # shown in --help, never parsed


def _arg_docs(doc: str) -> dict[str, str]:
    """``name -> description`` of the ``Args:`` section of a Google-style docstring."""
    out: dict[str, str] = {}
    in_args, name = False, None
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            in_args = True
            continue
        if not in_args:
            continue
        if line and not line.startswith(" "):
            break
        m = re.match(r"^ {4}(\w+)(?: \(.*\))?: (.*)$", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2).strip()
        elif name and line.startswith(" " * 8):
            out[name] += " " + line.strip()
    return out


def _arg(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list, tuple)):
        text = json.dumps(value)
    else:
        text = str(value)
    return f"--{key}={text}"


def cli_args(
    config_paths: Sequence[str | Path] = (),
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    ckpt_path: str | Path | None = None,
    subcommand: str = "fit",
) -> list[str]:
    """The command line equivalent of :func:`fit`'s arguments."""
    args = [subcommand]
    for p in config_paths:
        args += ["--config", str(p)]
    if isinstance(overrides, Mapping):
        args += [_arg(k, v) for k, v in overrides.items()]
    elif overrides:
        args += list(overrides)
    if ckpt_path is not None:
        args.append(f"--ckpt_path={ckpt_path}")
    return args


def fit(
    config_paths: Sequence[str | Path] = (),
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    ckpt_path: str | Path | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> tuple[pl.Trainer, TwoTowerModule, TwoTowerDataModule]:
    """Train as ``python train.py fit --config ...`` would.

    Args:
        config_paths: YAML configs, later ones override earlier ones.
        overrides: Dotted keys -> values (``{"trainer.max_epochs": 2, "model.dim": 32}``) or
            raw ``--key=value`` strings.
        ckpt_path: Resume from this checkpoint (``last.ckpt`` after an interruption).
        callbacks: Extra callback objects (benchmarks, tests).

    Returns:
        The trainer, the trained module and the datamodule.
    """
    defaults = trainer_defaults()
    if callbacks:
        defaults["callbacks"] = list(callbacks)
    # ``args`` is deliberate here, so LightningCLI's "args and sys.argv" warning is noise
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter", category=UserWarning)
    cli = TwoTowerCLI(args=cli_args(config_paths, overrides, ckpt_path), trainer_defaults=defaults)
    return cli.trainer, cli.model, cli.datamodule


def main(argv: list[str] | None = None) -> None:
    """``python train.py <fit|validate|test> --config ... [-v]``.

    ``-v``/``--verbose`` (anywhere) shows the third-party messages that are hidden otherwise
    (see :func:`twotower.log_setup.setup_logging`).
    """
    from twotower.log_setup import setup_logging

    args = list(sys.argv[1:] if argv is None else argv)
    verbose = sum(a in ("-v", "--verbose") for a in args)
    setup_logging(verbose)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter", category=UserWarning)
    try:
        TwoTowerCLI(args=[a for a in args if a not in ("-v", "--verbose")])
    except Exception as e:  # data that cannot train: one line naming the option (-v: traceback)
        err = _data_error(e)
        if err is None or verbose:
            raise
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _data_error(e: BaseException | None) -> BaseException | None:
    """The :class:`DataError` that caused ``e`` (jsonargparse wraps it in a ValueError), if any."""
    from twotower.data.schema import DataError

    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, DataError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
