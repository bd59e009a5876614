"""Quality benchmark: the two-tower model vs the baselines, same split, same metric code.

    python bench/quality.py                          # every dataset below
    python bench/quality.py --datasets ml-100k --bootstrap 1000
    python bench/quality.py --datasets ml-100k --seeds 3     # adds the 3-seed ensemble row
    python bench/quality.py --datasets synthetic --quick   # smoke run (tiny preset, 1 epoch)

Datasets (one shipped config each, trained once, as a user runs it): ``synthetic``
(``configs/default.yaml``, the README's main job, printed beside the generator's Bayes ceiling),
``scrobble`` (``configs/synthetic-scrobble.yaml``), ``ml-100k``, ``hetrec``.

For each dataset: train the model with ``twotower.train.fit`` (its config), reload the best
checkpoint (validation NDCG@10), fit and tune every baseline on the same training part (tuning on
validation only), evaluate all of them on the test split against the full catalogue, and print a
Markdown table (HR@10, NDCG@10 with 95% bootstrap intervals over users/sessions, coverage,
mean popularity, fit time) with the paired difference model - best baseline. Writes
``bench/out/recall_at_k_<dataset>.png`` (Recall@K, K = 1..100, one line per model) and
``bench/out/quality_<dataset>.json``.

Protocols: ML-100K leave-last-out per user by timestamp, seen items filtered; HetRec Last.fm-2K
has no play order: a seeded random per-user holdout (the last of a random order), seen filtered;
synthetic "default" preset leave-last-out per user, seen kept (re-listening is normal);
synthetic "scrobble" preset: the next track of the current session given the listener's whole
earlier history, forward in time (``split: next_in_session``), seen kept. The last block is the
summary table: per dataset the model, the best tuned baseline and the paired NDCG@10 difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "bench" / "out"

# Peers measured on this machine on the same ML-100K split (leave-last-out, full catalogue,
# seen filtered): (HR@10, NDCG@10).
ML100K_PEERS: list[tuple[str, float, float]] = [
    ("popularity (peer)", 0.085, 0.044),
    ("co-occurrence (peer)", 0.128, 0.069),
    ("implicit ALS (peer)", 0.138, 0.069),
    ("RecBole SASRec (peer)", 0.137, 0.062),
    ("RecBole GRU4Rec (peer)", 0.127, 0.065),
]
# Published ML-1M anchors (a different, larger dataset: context, not comparable rows):
# (NDCG@10, HR@10).
ML1M_PUBLISHED: list[tuple[str, float, float]] = [
    ("SASRec, full softmax", 0.182, 0.315),
    ("HSTU-large", 0.189, 0.329),
    ("GRU4Rec", 0.165, 0.281),
]


@dataclass
class Dataset:
    """One benchmark dataset: configs and overrides for ``fit``, and how it is described."""

    name: str
    configs: list[str]
    overrides: dict[str, Any]
    protocol: str
    needs: Path | None = None
    peers: list[tuple[str, float, float]] = field(default_factory=list)
    seeds: int = 1  # > 1: also train seeds 1.. and report their ensemble (one two-tower model)
    ceiling: bool = False  # add the generator's Bayes ceiling rows (synthetic default preset)


def datasets(quick: bool) -> dict[str, Dataset]:
    """The benchmark datasets, one shipped config each (``quick``: tiny data, one epoch).

    Every row is one model trained by a shipped config as a user would run it; no
    benchmark-only overrides (``--seeds N`` adds an ensemble row on request).
    """
    epochs = {"trainer.max_epochs": 1} if quick else {}
    cfg = REPO / "configs"
    forward = (
        "the next track of the current session given the listener's whole earlier history "
        "(one seeded position per session), forward in time, full catalogue, seen items kept"
    )
    return {
        "ml-100k": Dataset(
            name="ml-100k",
            configs=[str(cfg / "movielens-100k.yaml")],
            overrides={"data.path": str(SHARED / "ml-100k"), **epochs},
            protocol="leave-last-out per user (by timestamp), full catalogue, seen items filtered",
            needs=SHARED / "ml-100k",
            peers=ML100K_PEERS,
        ),
        "hetrec": Dataset(
            name="hetrec-lastfm-2k",
            # a bag-of-artists model (mean query, held-out-artists full softmax): no play order
            configs=[str(cfg / "hetrec-lastfm-2k.yaml")],
            overrides={"data.path": str(SHARED / "hetrec2011-lastfm-2k"), **epochs},
            protocol=(
                "no play order in the data: seeded random per-user holdout (last two of a random "
                "order -> valid/test), full catalogue (artists), seen items filtered"
            ),
            needs=SHARED / "hetrec2011-lastfm-2k",
        ),
        "synthetic": Dataset(
            name="synthetic-tiny" if quick else "synthetic-default (the main job)",
            configs=[str(cfg / ("tiny.yaml" if quick else "default.yaml"))],
            overrides=epochs,
            protocol="leave-last-out per user, full catalogue, seen items kept (re-listening)",
            ceiling=not quick,
        ),
        "scrobble": Dataset(
            name="synthetic-scrobble",
            configs=[str(cfg / "synthetic-scrobble.yaml")],
            overrides=epochs,
            protocol=forward,
        ),
    }


def run_dataset(ds: Dataset, bootstrap: int, extra: dict[str, Any], baselines: list[str]) -> Any:
    """Train, reload the best checkpoint, fit baselines, evaluate; returns the EvalTable.

    With ``ds.seeds > 1`` the config is trained once per seed (``seed_everything`` 0, 1, ...)
    and the first row is the ensemble of the best checkpoints (one two-tower model with
    concatenated vectors, as ``export.py --checkpoint A B C`` serves it); seed 0 alone follows.
    """
    from twotower.baselines import fit_baselines
    from twotower.evaluate import EmbeddingScorer, evaluate_scorers
    from twotower.model.ensemble import EnsembleModel
    from twotower.model.module import TwoTowerModule
    from twotower.train import fit

    sys.argv = sys.argv[:1]  # LightningCLI inside fit() must not see this script's arguments
    modules, walls, bests, epochs = [], [], [], []
    for seed in range(ds.seeds):
        over = {**ds.overrides, **extra, **({"seed_everything": seed} if ds.seeds > 1 else {})}
        start = time.perf_counter()
        trainer, module, dm = fit(ds.configs, over)
        walls.append(time.perf_counter() - start)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:
            module = TwoTowerModule.load_from_checkpoint(
                best, map_location="cpu", weights_only=True
            )
        modules.append(module.eval())
        bests.append(best)
        epochs.append(int(trainer.current_epoch))
    wall = walls[0]
    data = dm.data
    model = EmbeddingScorer(modules[0], name="two-tower (ours)", fit_seconds=wall)
    rows: list[tuple[Any, str]] = [(model, "model")]
    if len(modules) > 1:
        ensemble = EmbeddingScorer(
            EnsembleModel(modules),
            name=f"two-tower, ensemble of {len(modules)} seeds (ours)",
            fit_seconds=sum(walls),
        )
        rows.insert(0, (ensemble, "model"))  # the headline row (table.paired) comes first
    filter_seen = bool(data.params.get("filter_seen", False))
    if ds.ceiling:  # the generator's own next-play law: the best any model can do
        rows.append((ceiling_scorer(ds, extra), "model"))
    fitted = fit_baselines(data, baselines, filter_seen=filter_seen)
    scorers = [*rows, *[(b, "baseline") for b in fitted]]
    table = evaluate_scorers(
        scorers, data, "test", (1, 5, 10, 20, 50, 100), filter_seen, bootstrap, dataset=ds.name
    )
    table.extra = {  # type: ignore[attr-defined]
        "best_checkpoint": bests[0],
        "best_checkpoints": bests,
        "epochs": epochs[0],
        "epochs_per_seed": epochs,
        "train_wall_s": wall,
        "train_wall_s_per_seed": walls,
        "model_hparams": {
            k: v for k, v in dict(modules[0].hparams).items() if not k.startswith("_")
        },
        "protocol": ds.protocol,
        "report": data.report.format(),
    }
    return table


def ceiling_scorer(ds: Dataset, extra: dict[str, Any]) -> Any:
    """The Bayes ceiling "with sessions" of ``bench/synthetic_ceiling.py`` as a scorer row."""
    sys.path.insert(0, str(REPO / "bench"))
    from synthetic_ceiling import TableScorer, ceiling_scores

    from twotower.config import load_data_config
    from twotower.data.pipeline import prepare_data

    cfg = load_data_config(ds.configs, {**ds.overrides, **extra})
    scores = ceiling_scores(prepare_data(cfg), cfg)["with sessions"]  # [Q, V]
    return TableScorer("Bayes ceiling, with sessions (reference)", scores)


def summary(results: list[tuple[Dataset, Any]]) -> str:
    """One line per dataset: the model, the best tuned baseline, the paired NDCG@10 difference."""
    lines = [
        "### Summary: single model, shipped config, test split",
        "",
        "| data | two-tower NDCG@10 | best tuned baseline | paired NDCG@10 difference [95% CI] |",
        "|---|---|---|---|",
    ]
    for ds, table in results:
        # the single model's row, also when --seeds N puts an ensemble row first
        p = next((q for q in table.paired_all if q["model"] == "two-tower (ours)"), None)
        rows = {r.name: r for r in table.rows}
        if p is None:
            continue
        model = rows[p["model"]].metrics["ndcg@10"][0]
        base = rows[p["baseline"]].metrics["ndcg@10"][0]
        verdict = "ahead" if p["lo"] > 0 else ("behind" if p["hi"] < 0 else "level")
        lines.append(
            f"| {ds.name} | {model:.4f} | {p['baseline']} {base:.4f} | "
            f"{p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]: {verdict} |"
        )
    return "\n".join(lines)


def markdown(table: Any, ds: Dataset) -> str:
    """The benchmark table of one dataset (HR@10, NDCG@10 with intervals) plus the peer rows."""
    lines = [f"### {ds.name}", "", f"Protocol: {ds.protocol}.", ""]
    lines.append("| model | HR@10 | NDCG@10 | coverage@10 | mean pop@10 | fit/train s |")
    lines.append("|---|---|---|---|---|---|")
    for r in table.rows:
        hr, nd = r.metrics["hr@10"], r.metrics["ndcg@10"]
        lines.append(
            f"| {r.name} | {hr[0]:.4f} [{hr[1]:.4f}, {hr[2]:.4f}] | "
            f"{nd[0]:.4f} [{nd[1]:.4f}, {nd[2]:.4f}] | {r.coverage:.3f} | "
            f"{r.mean_popularity:.1f} | {r.fit_seconds:.1f} |"
        )
    for name, hr, nd in ds.peers:
        lines.append(f"| *{name}* | *{hr:.3f}* | *{nd:.3f}* | | | |")
    lines.append("")
    ex = getattr(table, "extra", {})
    lines.append(
        f"{table.num_queries:,} test queries ({table.cold_targets:,} cold targets counted as "
        f"misses), {table.num_items:,} items ranked in full; 95% bootstrap intervals over "
        f"queries ({table.bootstrap} resamples); model trained {ex.get('epochs', '?')} epoch(s), "
        f"best checkpoint by validation NDCG@10."
    )
    for p in table.paired_all:  # every model row against the best baseline
        lines.append(
            f"Paired difference {p['model']} - {p['baseline']} (best baseline) on "
            f"{p['metric'].upper()}: {p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]."
        )
    if ds.peers:
        lines.append("Rows in *italics*: peers measured on this machine on the same split.")
    params = "; ".join(
        f"{r.name}: {json.dumps(r.params)}" for r in table.rows if r.kind == "baseline"
    )
    lines.append(f"Baseline parameters (tuned on validation): {params}.")
    return "\n".join(lines)


def published_block() -> str:
    """Published ML-1M numbers, as context only."""
    lines = [
        "### Published anchors (MovieLens-1M, not this data; context only)",
        "",
        "| model | NDCG@10 | HR@10 |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {nd:.3f} | {hr:.3f} |" for n, nd, hr in ML1M_PUBLISHED]
    return "\n".join(lines)


def plot_recall(table: Any, path: Path, title: str) -> None:
    """Recall@K for K = 1..100, one line per row (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = np.arange(1, 101)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in table.rows:
        curve = (r.ranks[:, None] < ks[None, :]).mean(axis=0)
        ax.plot(ks, curve, label=r.name, lw=2 if r.kind == "model" else 1.2)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (= HR@K)")
    ax.set_title(f"{title}: full-catalogue Recall@K, test split")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints Markdown, writes plots and JSON under ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--datasets", default="synthetic,scrobble,ml-100k,hetrec")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--baselines", default="popular,transitions,cooccurrence,als")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 1 epoch")
    ap.add_argument(
        "--seeds", type=int, default=None,
        help="training seeds per dataset (default: the dataset's own); > 1 adds the ensemble row",
    )  # fmt: skip
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="extra fit override for every dataset, e.g. --set trainer.max_epochs=5",
    )  # fmt: skip
    args = ap.parse_args(argv)
    extra: dict[str, Any] = {}
    for pair in args.set:
        k, v = pair.split("=", 1)
        extra[k] = v
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = datasets(args.quick)
    blocks = []
    results: list[tuple[Dataset, Any]] = []
    for key in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if key not in specs:
            print(f"unknown dataset {key!r}; choose from {sorted(specs)}", file=sys.stderr)
            return 2
        ds = specs[key]
        if args.seeds is not None:
            ds.seeds = max(1, args.seeds)
        if ds.needs is not None and not ds.needs.exists():
            blocks.append(f"### {ds.name}\n\nskipped: {ds.needs} not found")
            continue
        table = run_dataset(ds, args.bootstrap, extra, args.baselines.split(","))
        plot_recall(table, out / f"recall_at_k_{key}.png", ds.name)
        payload = {**table.to_dict(), "extra": getattr(table, "extra", {})}
        (out / f"quality_{key}.json").write_text(table.to_json())
        (out / f"quality_{key}_extra.json").write_text(json.dumps(payload["extra"], indent=1))
        results.append((ds, table))
        block = markdown(table, ds)
        blocks.append(block)
        print(block, flush=True)
        print(flush=True)
    blocks.append(summary(results))
    print(blocks[-1], flush=True)
    if any(k.strip() == "ml-100k" for k in args.datasets.split(",")):
        blocks.append(published_block())
        print(blocks[-1])
    (out / "quality.md").write_text("\n\n".join(blocks) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
