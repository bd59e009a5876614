"""How far below the Bayes ceiling are the models? The synthetic default's test split, scored
by the generator's own next-play law.

    python bench/synthetic_ceiling.py
    python bench/synthetic_ceiling.py --checkpoint runs/.../best-....ckpt   # add a model row

The synthetic data is drawn from a known law (``twotower.data.synthetic.next_play_law``): the
next play is by the previous track's artist, from the session's cluster or a neighbour, by
popularity, and skipped more often off the listener's tastes. Scoring every test query with that
law is the best any model can do on average (the ceiling). Two ceilings:

* **with sessions**: knows where the current session began (its first play fixes the session's
  cluster) and the previous play even when it was skipped;
* **without session boundaries**: what a model over the user's stream of plays without time gaps
  could know at best: the previous play of the stream and the cluster most frequent among the
  last 5 plays;
* **the model's view**: listened plays only, no boundaries, as the training windows and the
  evaluation histories hold them (skipped plays are dropped): the previous *listened* play and
  the majority cluster of the last 5 listened plays, plugged into the same law (not the exact
  posterior over the dropped skips, so a close approximation of that ceiling, not a bound).

Both are evaluated with the project's metric code on the same split as ``bench/quality.py``,
beside the tuned co-occurrence baseline (and a checkpoint when given), with every row's paired
difference to the best baseline (co-occurrence).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twotower.baselines import fit_baselines  # noqa: E402
from twotower.config import load_data_config  # noqa: E402
from twotower.data.pipeline import DataConfig, prepare_data  # noqa: E402
from twotower.data.prepared import EvalSet, PreparedData  # noqa: E402
from twotower.data.synthetic import (  # noqa: E402
    generate,
    make_config,
    next_play_law,
    play_states,
)
from twotower.evaluate import EvalTable, evaluate_scorers  # noqa: E402

RECENT = 5  # plays whose majority cluster stands in for the session's (no boundaries)


class TableScorer:
    """A precomputed score matrix as a scorer (``score(eval_set, rows)``)."""

    def __init__(self, name: str, scores: np.ndarray) -> None:
        self.name = name
        self.scores = scores  # [Q, V]
        self.num_items = scores.shape[1]
        self.fit_seconds = 0.0

    def params(self) -> dict:
        return {}

    def score(self, eval_set: EvalSet, rows: slice) -> Tensor:
        return torch.from_numpy(self.scores[rows])  # [b, V]


def ceiling_scores(data: PreparedData, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Law scores of the test queries, ``[Q, V]`` per ceiling (see the module docstring).

    The test target of a user is their last listened (not skipped) play (leave-last-out).
    """
    plays, _, truth = generate(make_config(**(cfg.options or {})))
    st = play_states(plays, truth, cfg.session_gap_minutes)
    users = np.asarray(["", ""] + list(data.user_vocab.ids), dtype=object)
    items = ["", ""] + list(data.item_vocab.ids)
    track_num = {t: i for i, t in enumerate(truth.track_ids)}
    item_track = np.array([track_num.get(t, -1) for t in items])  # [V] track number or -1
    known = item_track >= 0
    user_num = {u: i for i, u in enumerate(truth.user_ids)}
    starts = np.r_[0, np.flatnonzero(np.diff(st["user"])) + 1]
    ends = np.r_[starts[1:], len(st["user"])]
    test = data.test
    out = {
        name: np.zeros((len(test), len(items)), dtype=np.float32)
        for name in ("with sessions", "no session boundaries", "the model's view")
    }
    for q in range(len(test)):
        u = user_num[users[test.users[q]]]
        lo, hi = starts[u], ends[u]
        t = lo + int(np.flatnonzero(~st["skipped"][lo:hi])[-1])  # the held-out play
        if test.targets[q] > 1 and item_track[test.targets[q]] != st["track"][t]:
            raise RuntimeError(f"query {q}: split target differs from the user's last play")
        law = next_play_law(truth, u, int(st["prev"][t]), int(st["home"][t]))
        out["with sessions"][q, known] = law[item_track[known]]
        listened = st["track"][lo:t][~st["skipped"][lo:t]]
        for name, before in (
            ("no session boundaries", st["track"][lo:t]),
            ("the model's view", listened),
        ):
            recent = before[-RECENT:]
            prev = int(before[-1]) if len(before) else -1
            home = int(np.bincount(truth.track_cluster[recent]).argmax()) if len(recent) else 0
            law = next_play_law(truth, u, prev, home)
            out[name][q, known] = law[item_track[known]]
    return out


def run(checkpoint: str | None, bootstrap: int) -> EvalTable:
    """Evaluate the ceilings, co-occurrence (tuned on validation) and an optional checkpoint."""
    config = str(REPO / "configs" / "default.yaml")
    cfg = load_data_config([config], {})
    data = prepare_data(cfg)
    scorers = [
        (TableScorer(f"ceiling, {name}", scores), "model")
        for name, scores in ceiling_scores(data, cfg).items()
    ]
    if checkpoint:
        from twotower.evaluate import EmbeddingScorer
        from twotower.model.module import TwoTowerModule

        module = TwoTowerModule.load_from_checkpoint(
            checkpoint, map_location="cpu", weights_only=True
        ).eval()
        scorers.append((EmbeddingScorer(module, name="two-tower (checkpoint)"), "model"))
    scorers += [(b, "baseline") for b in fit_baselines(data, ["popular", "cooccurrence"], False)]
    return evaluate_scorers(scorers, data, "test", (10, 20), False, bootstrap, dataset="synthetic")


def main(argv: list[str] | None = None) -> int:
    """Print the table and every model row's paired NDCG@10 difference to co-occurrence."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a TwoTowerModule checkpoint to add")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)
    table = run(args.checkpoint, args.bootstrap)
    print(table.to_markdown())  # with every model row's paired difference to co-occurrence
    return 0


if __name__ == "__main__":
    sys.exit(main())
