"""The ``twotower`` console script: thin argument parsing around one typed function each.

The commands that read training configs (data-report, pipeline, evaluate, compare, drift)
take them as ``python train.py fit`` does: ``--config FILE`` (repeatable) and any dotted key
(``--data.path P``, ``--model.dim 128``, ``--trainer.default_root_dir D``), read and validated
by :mod:`twotower.config`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: The commands whose command line may hold training-config options.
CONFIG_COMMANDS = ("data-report", "pipeline", "evaluate", "compare", "drift")
VERBOSE_HELP = "show third-party messages (FAISS, Lightning) hidden by default; -vv: debug"
CONFIG_EPILOG = (
    "Config options, as in `python train.py fit`: --config FILE (repeatable, later files win) "
    "and any key of a config section: --data.KEY V, --model.KEY V, --trainer.KEY V, "
    "--checkpoint.KEY V, ... (see `python train.py fit --help`). Unknown keys are refused. "
    "--set KEY=VALUE is an alias of --KEY=VALUE (a key without a section is a data option)."
)


def _add_config_help(p: argparse.ArgumentParser, what: str) -> None:
    """Document the config options (:func:`main` takes them out before argparse runs)."""
    p.add_argument("--config", action="append", metavar="FILE", help=what)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="alias of --KEY=VALUE")
    p.epilog = CONFIG_EPILOG


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="twotower", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data-report", help="load, validate, sessionize and split; print the report")
    _add_config_help(p, "training config (repeatable); its data section is read")
    p.add_argument("--json", help="also write the report as JSON to this file")

    p = sub.add_parser("evaluate", help="metrics table on the test split (with --baselines)")
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        help="Lightning checkpoint; several evaluate as one ensemble model (as export.py serves)",
    )
    p.add_argument("--baselines", action="store_true", help="also evaluate the baselines")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("-k", "--ks", default="10,20,50", help="comma-separated cut-offs")
    p.add_argument(
        "--filter-seen",
        choices=["auto", "yes", "no"],
        default="auto",
        help="drop already-seen tracks from rankings (auto: the data config's choice)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument("--json", help="also write the table as JSON")
    _add_config_help(
        p,
        "evaluate on this config's data instead of the checkpoint's (--data.KEY alone "
        "changes one option of the checkpoint's data)",
    )

    p = sub.add_parser("recommend", help="next tracks for a listening history")
    p.add_argument("--artifacts", required=True)
    p.add_argument(
        "--track",
        dest="tracks",
        action="append",
        default=[],
        metavar="ID",
        help="one track id of the history (repeatable, oldest first; ids may contain commas)",
    )
    p.add_argument("--history-file", help="file with one track id per line, oldest first")
    p.add_argument("--history-json", help='JSON list of track ids, e.g. \'["a,b", "c"]\'')
    p.add_argument(
        "--history",
        default="",
        help="comma-separated track ids, oldest first (only for ids without commas)",
    )
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--split-out", help="batch mode: write top-k of every test user to Parquet")

    p = sub.add_parser("similar", help="tracks most similar to one track")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--track", required=True)
    p.add_argument("-k", type=int, default=10)

    p = sub.add_parser("search", help="find track ids by title, artist or id (substring)")
    p.add_argument("--artifacts", required=True)
    p.add_argument("query", nargs="+", metavar="QUERY", help="words to look for (joined by spaces)")
    p.add_argument("-k", type=int, default=20, help="most matches to print")

    p = sub.add_parser("serve", help="HTTP service with the demo page")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--compare", help="second artifact folder for the review panel")
    p.add_argument("--reviews", default="reviews.sqlite", help="SQLite file for review ratings")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=2.0,
        help="how long concurrent /recommend requests wait to share one batch (a lone one: 0)",
    )
    p.add_argument(
        "--max-batch", type=int, default=64, help="most requests per batch (1: no batching)"
    )
    p.add_argument("--workers", type=int, default=1, help="server processes (uvicorn workers)")

    p = sub.add_parser("review-report", help="WTF share per model from the review panel's ratings")
    p.add_argument("--reviews", required=True, help="SQLite file written by `twotower serve`")
    p.add_argument("--csv", help="also write the report as CSV")
    p.add_argument("--ratings-csv", help="also write every rating (model revealed) as CSV")
    p.add_argument("--json", help="also write the report as JSON")
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples for the paired CI")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "pipeline", help="data report -> train -> evaluate -> export -> samples, one run folder"
    )
    _add_config_help(p, "training config (repeatable, required)")
    p.add_argument("--out", help="run folder (default runs/<config name>)")
    p.add_argument("--no-baselines", action="store_true", help="evaluate the model alone")
    p.add_argument("--baselines", help="comma-separated baselines (default: all)")
    p.add_argument("--index", default="auto", help="FAISS index of the export (auto, Flat, ...)")
    p.add_argument("--sample", type=int, default=5, help="held-out listeners in samples.md")
    p.add_argument("-k", "--ks", default="10,20,50", help="comma-separated cut-offs")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="require the ONNX query tower (default: exported when onnx/onnxruntime are installed)",
    )
    p.add_argument("--no-onnx", action="store_true", help="do not export query_tower.onnx")
    p.add_argument(
        "--no-users", action="store_true", help="do not export listener embeddings (users.parquet)"
    )

    p = sub.add_parser("compare", help="old vs new model on the same held-out queries")
    p.add_argument("run_a", metavar="RUN_A", help="run folder, checkpoint or artifact folder")
    p.add_argument("run_b", metavar="RUN_B", help="run folder, checkpoint or artifact folder")
    _add_config_help(
        p,
        "config whose data give the queries (repeatable; --data-config is an alias; "
        "--data.KEY alone changes one option of A's data)",
    )
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("-k", "--ks", default="10,20,50", help="comma-separated cut-offs")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument("--md", help="write the report as Markdown")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--png", help="write Recall@K curves (K = 1..100) as PNG")

    p = sub.add_parser("drift", help="compare a new batch of logs with the training data")
    p.add_argument("--reference", required=True, help="run folder or artifact folder")
    p.add_argument("--data", help="new logs: a file/folder, or a YAML config with a data section")
    p.add_argument("--format", help="format of --data (default: the reference's)")
    _add_config_help(
        p,
        "config whose data section is the new batch (--data.KEY alone changes one option of "
        "the reference's data, e.g. --data.options.seed 3)",
    )
    p.add_argument("--log-dir", help="also write the numbers as TensorBoard scalars here")
    p.add_argument("--step", type=int, default=0, help="TensorBoard step (e.g. the batch date)")
    p.add_argument("--md", help="write the report as Markdown")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--no-metric", action="store_true", help="skip the model metric")
    from twotower.drift import add_threshold_args

    add_threshold_args(p)
    for p in sub.choices.values():
        p.allow_abbrev = False  # ``--data`` must never be read as a prefix of ``--data.path``
        p.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    config_args = None
    if command in CONFIG_COMMANDS:
        from twotower.config import ConfigError, split_argv

        try:
            config_args, argv = split_argv(argv)
        except ConfigError as e:
            print(f"twotower {command}: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    from twotower.log_setup import setup_logging

    setup_logging(int(getattr(args, "verbose", 0) or 0))
    if config_args is not None:
        args.config_args = config_args
        args.config = config_args.files
    from twotower.data.schema import DataError

    try:
        return _dispatch(args)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"twotower {args.command}: error: {e}", file=sys.stderr)
        return 2


def search_main(args: argparse.Namespace) -> int:
    """``twotower search``: the service's track search (title, artist, id) on the command line."""
    import pandas as pd

    from twotower.serve.catalogue import Catalogue
    from twotower.table import format_table

    items = Path(args.artifacts) / "items.parquet"
    if not items.is_file():
        raise FileNotFoundError(f"{args.artifacts}: no items.parquet (not an artifact folder)")
    query = " ".join(args.query)
    hits = Catalogue(pd.read_parquet(items)).search(query, int(args.k))
    if not hits:
        print(f"no track matches {query!r}", file=sys.stderr)
        return 1
    rows = [(t.track_id, t.title, t.artist) for t in hits]
    print(format_table(("track_id", "title", "artist"), rows, max_width=(None, 48, 32)))
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data-report":
        from twotower.config import load_data_config, warn_unused
        from twotower.data.pipeline import data_report

        warn_unused(args.config_args, "data-report")
        cfg = load_data_config(args.config_args.files, args.config_args.overrides)
        report = data_report(cfg)  # printed here, not logged as well
        print(report.format())
        if args.json:
            Path(args.json).write_text(report.to_json())
        return 0
    if args.command == "search":
        return search_main(args)
    if args.command == "evaluate":
        from twotower.evaluate import evaluate_main

        return evaluate_main(args)
    if args.command == "recommend" and getattr(args, "split_out", None):
        from twotower.evaluate import split_out_main  # batch evaluation, not serving

        return split_out_main(args)
    if args.command in ("recommend", "similar"):
        from twotower.retrieve import cli_main

        return cli_main(args)
    if args.command == "serve":
        from twotower.serve.app import serve_main

        return serve_main(args)
    if args.command == "review-report":
        from twotower.serve.reviews import report_main

        return report_main(args)
    if args.command == "pipeline":
        from twotower.pipeline import pipeline_main

        return pipeline_main(args)
    if args.command == "compare":
        from twotower.compare import compare_main

        return compare_main(args)
    if args.command == "drift":
        from twotower.drift import drift_main

        return drift_main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
