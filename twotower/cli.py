"""The ``twotower`` console script: thin argument parsing around one typed function each."""

from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", required=True, help="YAML config (repeatable)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a data option, e.g. --set path=../shared/data/ml-100k (repeatable)",
    )


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.removeprefix("data.")] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="twotower", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data-report", help="load, validate, sessionize and split; print the report")
    _add_config_args(p)
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

    p = sub.add_parser("recommend", help="next tracks for a listening history")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--history", default="", help="comma-separated track ids, oldest first")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--split-out", help="batch mode: write top-k of every test user to Parquet")

    p = sub.add_parser("similar", help="tracks most similar to one track")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--track", required=True)
    p.add_argument("-k", type=int, default=10)

    p = sub.add_parser("serve", help="HTTP service with the demo page")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--compare", help="second artifact folder for the review panel")
    p.add_argument("--reviews", default="reviews.sqlite", help="SQLite file for review ratings")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=1.0,
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
    p.add_argument("--config", action="append", required=True, help="YAML config (repeatable)")
    p.add_argument("--out", help="run folder (default runs/<config name>)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. trainer.max_epochs=3, model.encoder=mean, "
        "data.path=../shared/data/ml-100k (a key without a section is a data option)",
    )
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
    p.add_argument("--data-config", action="append", help="config giving the split (repeatable)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a data option of --data-config",
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
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a data option of the new batch, e.g. options.seed=3",
    )
    p.add_argument("--log-dir", help="also write the numbers as TensorBoard scalars here")
    p.add_argument("--step", type=int, default=0, help="TensorBoard step (e.g. the batch date)")
    p.add_argument("--md", help="write the report as Markdown")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--no-metric", action="store_true", help="skip the model metric")
    from twotower.drift import add_threshold_args

    add_threshold_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    from twotower.data.schema import DataError

    try:
        return _dispatch(args)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"twotower {args.command}: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data-report":
        from twotower.data.pipeline import data_report, load_data_config

        cfg = load_data_config(args.config, _overrides(args.set))
        report = data_report(cfg)
        print(report.format())
        if args.json:
            from pathlib import Path

            Path(args.json).write_text(report.to_json())
        return 0
    if args.command == "evaluate":
        from twotower.evaluate import evaluate_main

        return evaluate_main(args)
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
