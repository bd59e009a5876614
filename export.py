"""Export a trained checkpoint as an artifact folder (FAISS index + query tower + manifest).

``python export.py --checkpoint CKPT [CKPT ...] --out DIR [--index auto|Flat|HNSW32|"IVF4096,PQ32"]
[--users] [--dtype float16] [--onnx]``. Thin wrapper around
:func:`twotower.export.export_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``export.py``."""
    p = argparse.ArgumentParser(prog="export.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        help="Lightning checkpoint (.ckpt); several (e.g. seeds of one config) export as one "
        "ensemble model: concatenated vectors, the mean of the members' logits",
    )
    p.add_argument("--out", required=True, help="artifact folder (replaced atomically)")
    p.add_argument(
        "--index",
        default="auto",
        help='auto (by catalogue size), Flat, HNSW32, "IVF4096,PQ32" or any FAISS factory string',
    )
    p.add_argument("--users", action="store_true", help="also export listener embeddings")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--onnx", action="store_true", help="also export the query tower as ONNX")
    p.add_argument("--batch-size", type=int, default=8192, help="items per forward pass")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--holdout", type=int, default=5000, help="test examples in holdout.parquet")
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="show third-party messages (FAISS, Lightning) hidden by default; -vv: debug",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, export, print where the artifact went."""
    args = build_parser().parse_args(argv)
    from twotower.log_setup import setup_logging

    setup_logging(args.verbose)
    from twotower.export import export_checkpoint, read_manifest

    try:
        out = export_checkpoint(
            args.checkpoint,
            args.out,
            index=args.index,
            users=args.users,
            dtype=args.dtype,
            onnx=args.onnx,
            batch_size=args.batch_size,
            device=args.device,
            holdout=args.holdout,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    index = read_manifest(out)["index"]
    print(
        f"exported {index['ntotal']} tracks to {out} (index {index['factory']}, "
        f"params {index['search_params']}, recall@10 vs exact {index['ann_recall']:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
