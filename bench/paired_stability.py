"""How stable is a paired interval? Resample it with more draws and other bootstrap seeds.

    python bench/paired_stability.py --checkpoint A.ckpt B.ckpt C.ckpt --baseline cooccurrence

Evaluates the checkpoints (several = one ensemble model, as ``twotower evaluate`` and
``export.py`` treat them) and the baseline (tuned on validation, as in ``bench/quality.py``) on
the test split, then prints the paired NDCG@10 difference with ``--resamples`` bootstrap draws
for each of ``--seeds`` bootstrap seeds, and the normal-approximation z of the mean difference.
An interval whose lower bound sits near zero in ``bench/quality.py`` is read through this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twotower.evaluate import evaluate_checkpoint  # noqa: E402
from twotower.metrics import paired_diff  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Print one line per bootstrap seed and the z of the paired mean difference."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", nargs="+", required=True)
    ap.add_argument("--baseline", default="cooccurrence")
    ap.add_argument("--metric", default="ndcg@10")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args(argv)
    k = int(args.metric.split("@")[1])
    table = evaluate_checkpoint(
        args.checkpoint, split="test", ks=(k,), baselines=[args.baseline], bootstrap=100
    )
    model, base = table.rows[0], table.row(args.baseline)
    diff = model.per_query[args.metric] - base.per_query[args.metric]  # [Q]
    print(f"{model.name} - {base.name}, {args.metric}, {len(diff):,} test queries")
    for seed in range(args.seeds):
        d, lo, hi = paired_diff(
            model.per_query[args.metric], base.per_query[args.metric], n=args.resamples, seed=seed
        )
        draws = f"{args.resamples:,} resamples"
        print(f"  bootstrap seed {seed}, {draws}: {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    print(f"  mean {diff.mean():+.4f}, standard error {se:.4f}, z {diff.mean() / se:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
