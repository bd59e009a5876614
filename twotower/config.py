"""One way to read configs, for every command: the training CLI's own parser.

``python train.py fit``, ``twotower data-report``, ``pipeline``, ``evaluate``, ``compare`` and
``drift`` all read ``--config FILE`` (repeatable, later files win) and dotted overrides such as
``--data.path P``, ``--model.dim 128`` or ``--trainer.default_root_dir D`` with the parser that
``LightningCLI`` builds for :class:`~twotower.train.TwoTowerCLI` (jsonargparse). The data
options are therefore validated against the typed ``__init__`` of the DataModule the config
names (``data.class_path``, default :class:`~twotower.data.datamodule.TwoTowerDataModule`), the
model options against :class:`~twotower.model.module.TwoTowerModule`, the trainer options
against ``Trainer``; an unknown key is refused with a message that names it (and the file it
is in).

``--set KEY=VALUE`` stays as an alias of ``--KEY=VALUE`` for old command lines; a key without
a section (``--set path=...``) is a data option.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from twotower.data.pipeline import DataConfig
from twotower.data.schema import DataError

if TYPE_CHECKING:
    from jsonargparse import Namespace
    from pytorch_lightning.cli import LightningArgumentParser

#: Top-level sections of a training config (``--<section>.<key>`` on a command line).
CONFIG_SECTIONS = (
    "trainer",
    "model",
    "data",
    "checkpoint",
    "early_stopping",
    "lr_monitor",
    "seed_everything",
    "optimizer",
    "lr_scheduler",
)
#: The command-line options that alias ``--config``.
CONFIG_FLAGS = ("--config", "--data-config")
#: The DataModule a config gets when it does not name one.
DEFAULT_DATAMODULE = "twotower.data.datamodule.TwoTowerDataModule"
_DATA_FIELDS = tuple(f.name for f in fields(DataConfig))


class ConfigError(ValueError):
    """A config that does not parse: unknown key, wrong type, unreadable file."""


@dataclass
class ConfigArgs:
    """The config part of a command line.

    Attributes:
        files: ``--config`` values in order: paths, or YAML/JSON text.
        overrides: Dotted key -> value (a string is read as YAML by the parser, other values
            are written as JSON first).
    """

    files: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def given(self) -> bool:
        """Whether the command line had any config option."""
        return bool(self.files or self.overrides)


def _is_config_key(key: str) -> bool:
    return key.split(".", 1)[0] in CONFIG_SECTIONS


def _set_key(key: str) -> str:
    """``--set`` keys: a key without a config section is a data option."""
    key = key.strip()
    return key if _is_config_key(key) else f"data.{key}"


def split_argv(argv: Sequence[str]) -> tuple[ConfigArgs, list[str]]:
    """Take the config options out of a command line; the rest is the command's own options.

    Config options: ``--config F`` (or ``--data-config F``), ``--<section>.<key> V`` or
    ``--<section>.<key>=V`` for every section of :data:`CONFIG_SECTIONS`, ``--seed_everything
    V``, and the alias ``--set KEY=VALUE``.

    Raises:
        ConfigError: An option without its value, or ``--set`` without ``=``.
    """
    out = ConfigArgs()
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        tok = args[i]
        name, eq, inline = tok.partition("=")
        key = name[2:] if name.startswith("--") else ""
        is_config = (
            name in CONFIG_FLAGS
            or name == "--set"
            or key == "seed_everything"
            or ("." in key and _is_config_key(key))
        )
        if not is_config or tok == "--":
            rest.append(tok)
            i += 1
            continue
        if eq:
            value = inline
            i += 1
        elif i + 1 < len(args):
            value = args[i + 1]
            i += 2
        else:
            raise ConfigError(f"{name} expects a value")
        if name in CONFIG_FLAGS:
            out.files.append(value)
        elif name == "--set":
            k, has_eq, v = value.partition("=")
            if not has_eq:
                raise ConfigError(f"--set expects KEY=VALUE, got {value!r}")
            out.overrides[_set_key(k)] = v
        else:
            out.overrides[key] = value
    return out, rest


def normalize_overrides(overrides: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """Overrides in any accepted form -> dotted key -> value.

    Accepts a mapping (``{"trainer.max_epochs": 2, "path": "..."}``), ``KEY=VALUE`` strings
    (the ``--set`` form) or command-line tokens (``["--data.path", "P", "--model.dim=8"]``).
    A key without a config section is a data option.

    Raises:
        ConfigError: A string that is neither ``KEY=VALUE`` nor a config option.
    """
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return {_set_key(str(k)): v for k, v in overrides.items()}
    items = list(overrides)
    if any(str(t).startswith("--") for t in items):
        parsed, rest = split_argv([str(t) for t in items])
        if rest or parsed.files:
            raise ConfigError(
                f"not config overrides: {' '.join(rest or parsed.files)} (expected "
                f"--<section>.<key>=VALUE, sections: {', '.join(CONFIG_SECTIONS)})"
            )
        return parsed.overrides
    out: dict[str, Any] = {}
    for item in items:
        k, has_eq, v = str(item).partition("=")
        if not has_eq:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        out[_set_key(k)] = v
    return out


def override_arg(key: str, value: Any) -> str:
    """``--key=value`` with non-string values written as JSON (``None`` -> ``null``)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool) or value is None or isinstance(value, (dict, list, tuple)):
        text = json.dumps(value)
    else:
        text = str(value)
    return f"--{key}={text}"


def config_argv(files: Sequence[str | Path], overrides: Mapping[str, Any]) -> list[str]:
    """The parser's command line for ``files`` and ``overrides``."""
    args: list[str] = []
    for f in files:
        args += ["--config", str(f)]
    return args + [override_arg(k, v) for k, v in overrides.items()]


@functools.cache
def config_parser() -> LightningArgumentParser:
    """The parser of ``python train.py fit`` without its subcommand and trainer-method options.

    Built by :class:`~twotower.train.TwoTowerCLI` itself (same sections, defaults and links),
    without parsing a command line or instantiating anything. Raises instead of exiting.
    """
    from twotower.train import TwoTowerCLI

    class _ParserOnly(TwoTowerCLI):
        """A TwoTowerCLI that stops once its parser exists."""

        def parse_arguments(self, parser: Any, args: Any) -> None:
            self.config = {}

        def _parse_ckpt_path(self) -> None:
            return None

        def _set_seed(self) -> None:
            return None

        def _add_instantiators(self) -> None:
            return None

        def before_instantiate_classes(self) -> None:
            return None

        def instantiate_classes(self) -> None:
            return None

    return _ParserOnly(run=False, args=[], parser_kwargs={"exit_on_error": False}).parser


def parse_config(
    files: Sequence[str | Path] = (),
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> Namespace:
    """Parse configs and overrides exactly as the training CLI would (nothing instantiated).

    Args:
        files: YAML files (or YAML/JSON text), later ones override earlier ones.
        overrides: See :func:`normalize_overrides`.

    Returns:
        The parsed, validated config (a jsonargparse ``Namespace``; ``data`` holds
        ``class_path`` and ``init_args``).

    Raises:
        FileNotFoundError: A config file does not exist.
        ConfigError: Unknown key (named, with the file it is in) or a wrong value.
    """
    for f in files:
        text = str(f)
        if (
            text.endswith((".yaml", ".yml", ".json"))
            and "\n" not in text
            and not Path(text).exists()
        ):
            raise FileNotFoundError(f"config not found: {text}")
    over = normalize_overrides(overrides)
    argv = config_argv(files, over)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parser = config_parser()
    try:
        ns = parser.parse_args(argv)
    except (Exception, SystemExit) as e:  # jsonargparse raises ArgumentError (or exits)
        raise ConfigError(_clear_message(str(e), [str(f) for f in files], over)) from None
    if ns.get("data") is None:
        raise ConfigError("the config has no data section")
    return ns


# ----------------------------------------------------------------------------- error messages
_PATTERNS = (
    re.compile(r"Parser key \"(?P<sec>[\w.]+)\".*?Option '(?P<opt>[\w.]+)' is not accepted", re.S),
    re.compile(r"Option '(?P<opt>[\w.]+)' is not accepted"),
    re.compile(r"Group '(?P<sec>[\w.]+)' does not accept option '(?P<opt>[\w.]+)'"),
    re.compile(r"Key \"(?P<opt>[\w.]+)\" is not expected"),
    re.compile(r"unrecognized arguments: --(?P<opt>[\w.-]+)"),
)


def _unknown_key(message: str) -> str | None:
    for pattern in _PATTERNS:
        m = pattern.search(message)
        if m:
            sec = m.groupdict().get("sec")
            opt = m.group("opt").split("=")[0]
            return f"{sec}.{opt}" if sec else opt
    return None


def _file_with_key(files: Sequence[str], key: str) -> str | None:
    """The last config file that sets ``key`` (``data.x`` also as ``data.init_args.x``)."""
    parts = key.split(".")
    for f in reversed(files):
        try:
            doc = yaml.safe_load(Path(f).read_text())
        except (OSError, yaml.YAMLError):
            continue
        for path in (parts, parts[:1] + ["init_args"] + parts[1:]):
            node: Any = doc
            for part in path:
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            if node is not _MISSING:
                return f
    return None


_MISSING = object()


def _accepted(section: str, class_path: str | None = None) -> list[str]:
    """The keys a section accepts (for the error message)."""
    if section == "data":
        import importlib
        import inspect

        module, _, name = (class_path or DEFAULT_DATAMODULE).rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    prefix = section + "."
    keys = {
        a.dest[len(prefix) :].split(".")[0]
        for a in config_parser()._actions
        if getattr(a, "dest", "").startswith(prefix)
    }
    return sorted(keys)


def _where(key: str, files: Sequence[str], overrides: Mapping[str, Any]) -> str:
    """``command line`` when an override sets ``key``, else the config file that does."""
    if key in overrides or key.replace(".", ".init_args.", 1) in overrides:
        return "command line"
    return _file_with_key(files, key) or "command line"


def _clear_message(message: str, files: Sequence[str], overrides: Mapping[str, Any]) -> str:
    key = _unknown_key(message)
    if key is None:
        found = re.findall(r'Parser key "([\w.]+)":\s*(.*)', message)
        if not found:
            first = " ".join(line.strip() for line in message.strip().splitlines()[:6])
            return f"invalid config: {first}"
        name, text = found[-1]
        if len(found) > 1 and not name.startswith(found[0][0] + "."):
            name = f"{found[0][0]}.{name}"
        where = _where(name, files, overrides)
        return f"{where}: invalid value of {name!r}: {text.strip()}"
    key = key.replace(".init_args.", ".")
    where = _where(key, files, overrides)
    section = key.rsplit(".", 1)[0] if "." in key else ""
    if section not in CONFIG_SECTIONS:
        return f"{where}: unknown key {key!r}; sections: {', '.join(CONFIG_SECTIONS)}"
    m = re.search(r"class_path '([\w.]+)'", message)
    class_path = m.group(1) if m else None
    try:
        names = _accepted(section, class_path)
    except Exception:  # noqa: BLE001 - the list of keys is only a hint
        names = []
    owner = (class_path or DEFAULT_DATAMODULE).rsplit(".", 1)[-1] if section == "data" else ""
    what = f"{owner} takes" if owner else f"keys of {section!r}:"
    return f"{where}: unknown key {key!r}" + (f"; {what} {', '.join(names)}" if names else "")


# ----------------------------------------------------------------------------- the data section
def data_section(ns: Namespace) -> tuple[str, dict[str, Any]]:
    """The DataModule class path and its keyword arguments of a parsed config."""
    data = ns.get("data")
    if data is None:
        return DEFAULT_DATAMODULE, {}
    if hasattr(data, "as_dict"):
        data = data.as_dict()
    init = data.get("init_args") or {}
    if hasattr(init, "as_dict"):
        init = init.as_dict()
    return str(data.get("class_path") or DEFAULT_DATAMODULE), dict(init)


def data_config(ns: Namespace) -> DataConfig:
    """The preprocessing options (:class:`DataConfig`) of a parsed config's data section.

    The DataModule-only keys (batch sizes, window, workers, the streaming module's chunks)
    are dropped: they shape batches, not the prepared data.

    Raises:
        DataError: A value that the DataConfig refuses (e.g. ``split: random``).
    """
    _, init = data_section(ns)
    return DataConfig(**{k: v for k, v in init.items() if k in _DATA_FIELDS})


def load_data_config(
    files: Sequence[str | Path] = (),
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> DataConfig:
    """The :class:`DataConfig` of configs plus overrides (see :func:`parse_config`)."""
    return data_config(parse_config(files, overrides))


def parse_on_data(
    base: DataConfig | Mapping[str, Any],
    files: Sequence[str | Path] = (),
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    class_path: str = DEFAULT_DATAMODULE,
) -> Namespace:
    """:func:`parse_config` starting from known data options instead of the defaults.

    For the commands whose data come from a checkpoint or an artifact (evaluate, compare,
    drift): ``base`` is read first, as if it were the first config file, so ``files`` and
    ``overrides`` change only the keys they name.

    Args:
        base: A DataConfig or DataModule keyword arguments.
        files: Configs read after ``base``.
        overrides: See :func:`normalize_overrides`.
        class_path: The DataModule ``base`` belongs to.
    """
    values = asdict(base) if isinstance(base, DataConfig) else dict(base)
    doc = {"data": {"class_path": class_path, "init_args": values}}
    return parse_config([json.dumps(doc, default=str), *[str(f) for f in files]], overrides)


def data_config_with(
    base: DataConfig | Mapping[str, Any],
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    files: Sequence[str | Path] = (),
) -> DataConfig:
    """``base`` (a DataConfig or DataModule keyword arguments) changed by configs and overrides.

    The values go through the same parser as a config file, so the overrides are validated
    and typed the same way (see :func:`parse_on_data`).
    """
    return data_config(parse_on_data(base, files, overrides))


def warn_unused(args: ConfigArgs, command: str, used: Sequence[str] = ("data",)) -> None:
    """Say on stderr which command-line config keys ``command`` does not use."""
    unused = [k for k in args.overrides if k.split(".", 1)[0] not in used]
    if unused:
        print(
            f"twotower {command}: note: only the {'/'.join(used)} section is used here; "
            f"{', '.join(unused)} validated but not used",
            file=sys.stderr,
        )


__all__ = [
    "CONFIG_SECTIONS",
    "ConfigArgs",
    "ConfigError",
    "DataError",
    "config_parser",
    "data_config",
    "data_config_with",
    "data_section",
    "load_data_config",
    "normalize_overrides",
    "parse_config",
    "parse_on_data",
    "split_argv",
]
