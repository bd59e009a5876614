"""Per-play signals (skipped marks, gaps, the request gap, each play's hour and weekday) carried
to every serving consumer.

Towers built directly show that a play-signal tower really reads each field and a plain one
ignores them (and that only a clock tower reads the play clock). Training windows and
evaluation sets are checked against known timestamps. One tiny model with ``data.play_signals``
and ``data.play_clock`` is trained once (1 epoch) and exported (Flat, listener vectors, ONNX);
on it: the manifest's description, ONNX parity from the manifest alone (gaps bucketed by the
client from ``gap_edges_seconds``, the clock from the manifest's formulas), the README's
onnxruntime-only example, listener vectors from
each user's latest plays, the Retriever's gaps / skips / request gap and its OOV rule, the HTTP
API with and without times and marks (batched too), strict 422s and a small fuzz, the
``twotower recommend`` CLI, and the demo page in headless Chromium (the skip mark reaches the
request).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures import fit_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twotower.data.prepared import Sequences
from twotower.data.splits import build_eval_set
from twotower.data.windows import build_windows
from twotower.export import export_checkpoint, write_artifact
from twotower.model.towers import QueryTower
from twotower.query import (
    CLOCK_FORMULAS,
    GAP_EDGES,
    GAP_FIRST,
    NUM_GAPS,
    QueryBatch,
    QuerySpec,
    gap_buckets,
    play_clock,
)
from twotower.retrieve import NO_SIGNALS_NOTE, Retriever

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

# the headless Chromium fixture and helpers of the browser tests (they skip with the reason)
from test_browser import _ids, _serve, _wait, driver  # noqa: E402, F401

from twotower.serve.app import RecommendJob, _run_jobs, create_app  # noqa: E402

V = 40  # item vocabulary incl. pad and OOV
T0 = 1_700_000_000  # a unix time


def _tower(
    play_signals: bool, encoder: str = "transformer", seed: int = 0, play_clock: bool = False
) -> QueryTower:
    torch.manual_seed(seed)
    return QueryTower(
        V, dim=8, id_dim=8, encoder=encoder, max_len=6, num_layers=1, num_heads=2,
        dropout=0.0, play_signals=play_signals, play_clock=play_clock,
    ).eval()  # fmt: skip


def _q(
    tower: QueryTower, skips=None, gaps=None, request_gaps=None, play_hours=None, play_weekdays=None
) -> torch.Tensor:
    h = torch.tensor([[0, 5, 6, 7]])
    as_t = lambda v: None if v is None else torch.tensor(v)  # noqa: E731
    batch = QueryBatch(
        h, skips=as_t(skips), gaps=as_t(gaps), request_gaps=as_t(request_gaps),
        play_hours=as_t(play_hours), play_weekdays=as_t(play_weekdays),
    )  # fmt: skip
    with torch.no_grad():
        return tower(batch)


# ------------------------------------------------------------------------------ the towers
@pytest.mark.parametrize("encoder", ["transformer", "gru", "mean"])
def test_skip_gap_and_request_gap_change_a_play_signal_query_only(encoder: str) -> None:
    play, plain = _tower(True, encoder), _tower(False, encoder)
    base = dict(skips=[[0, 0, 0, 0]], gaps=[[0, 0, 3, 3]], request_gaps=[3])
    variants = [
        dict(base, skips=[[0, 0, 1, 0]]),  # one play marked skipped
        dict(base, skips=[[0, 0, 0, 1]]),  # the latest one
        dict(base, gaps=[[0, 0, 3, 9]]),  # a long gap before the last play (new session)
        dict(base, gaps=[[0, GAP_FIRST, 3, 3]]),  # the first play known as the first
        dict(base, request_gaps=[NUM_GAPS - 1]),  # the request a month later
    ]
    ref_play, ref_plain = _q(play, **base), _q(plain, **base)
    for v in variants:
        assert (_q(play, **v) - ref_play).abs().max() > 1e-4, v  # the field is read
        torch.testing.assert_close(_q(plain, **v), ref_plain)  # and ignored without signals
    torch.testing.assert_close(_q(plain), ref_plain)  # no signals at all: same as unknown ones
    # None (not given) is "unknown" for a play-signal tower: the same as explicit zeros
    zeros = dict(skips=[[0] * 4], gaps=[[0] * 4], request_gaps=[0])
    torch.testing.assert_close(_q(play), _q(play, **zeros))


def test_mean_encoder_with_play_signals_is_padding_invariant() -> None:
    tower = _tower(True, "mean")
    h, s, g = [5, 6, 7], [0, 1, 0], [0, 3, 4]
    with torch.no_grad():
        short = tower(
            QueryBatch(torch.tensor([h]), skips=torch.tensor([s]), gaps=torch.tensor([g]))
        )
        pad = [0, 0, 0]
        long = tower(
            QueryBatch(
                torch.tensor([pad + h]), skips=torch.tensor([pad + s]), gaps=torch.tensor([pad + g])
            )
        )
    torch.testing.assert_close(short, long)


@pytest.mark.parametrize("encoder", ["transformer", "gru", "mean"])
def test_play_hour_and_weekday_change_a_clock_query_only(encoder: str) -> None:
    clock, play = _tower(True, encoder, play_clock=True), _tower(True, encoder)
    base = dict(
        skips=[[0] * 4], gaps=[[0, 0, 3, 3]], request_gaps=[3],
        play_hours=[[-1, 8, 9, 9]], play_weekdays=[[-1, 2, 2, 2]],
    )  # fmt: skip
    variants = [
        dict(base, play_hours=[[-1, 8, 9, 21]]),  # the latest play in the evening
        dict(base, play_hours=[[-1, 3, 9, 9]]),  # an earlier one at night
        dict(base, play_weekdays=[[-1, 2, 2, 5]]),  # the latest play on a Saturday
        dict(base, play_hours=[[-1, -1, -1, -1]], play_weekdays=[[-1, -1, -1, -1]]),  # no times
    ]
    ref_clock, ref_play = _q(clock, **base), _q(play, **base)
    for v in variants:
        assert (_q(clock, **v) - ref_clock).abs().max() > 1e-4, v  # the clock is read
        torch.testing.assert_close(_q(play, **v), ref_play)  # and ignored without play_clock
    # None (not given) is "unknown" (-1) for a clock tower; padding values are never read
    unknown = dict(base, play_hours=[[-1] * 4], play_weekdays=[[-1] * 4])
    torch.testing.assert_close(_q(clock, **dict(base, play_hours=None, play_weekdays=None)),
                               _q(clock, **unknown))  # fmt: skip
    padded = dict(base, play_hours=[[17, 8, 9, 9]], play_weekdays=[[6, 2, 2, 2]])
    torch.testing.assert_close(_q(clock, **padded), ref_clock)
    # the clock tower still reads skips and gaps
    assert (_q(clock, **dict(base, skips=[[0, 0, 0, 1]])) - ref_clock).abs().max() > 1e-4


def test_play_clock_needs_play_signals_and_leaves_other_towers_unchanged() -> None:
    with pytest.raises(ValueError, match="play_clock needs play_signals"):
        QueryTower(V, dim=8, id_dim=8, play_clock=True)
    play = _tower(True)
    # a play-signal tower (a checkpoint or export from before the clock): same config, same
    # state dict keys, same inputs, so it rebuilds and loads exactly as before
    assert "play_clock" not in play.config
    assert not any("play_hour" in k or "play_weekday" in k for k in play.state_dict())
    rebuilt = QueryTower(**play.config)
    rebuilt.load_state_dict(play.state_dict())  # strict
    assert QuerySpec.from_config(play.config).input_names == [
        "history", "skips", "gaps", "request_gaps"
    ]  # fmt: skip
    clock = _tower(True, play_clock=True)
    assert clock.config["play_clock"] is True
    assert QuerySpec.from_config(clock.config).input_names[-2:] == ["play_hours", "play_weekdays"]


def test_play_clock_helper_matches_the_calendar() -> None:
    import datetime as dt

    ts = np.array([0, T0, T0 + 5 * 3600 + 59, 1_712_451_600, -1])  # 1970 Thu, ..., unknown
    hours, weekdays = play_clock(ts)
    for t, h, w in zip(ts[:-1], hours[:-1], weekdays[:-1], strict=True):
        when = dt.datetime.fromtimestamp(int(t), dt.timezone.utc)
        assert (h, w) == (when.hour, when.weekday())  # UTC, Monday = 0
    assert hours[-1] == -1 and weekdays[-1] == -1
    # the manifest's formulas are the helper
    for name, got in zip(("play_hours", "play_weekdays"), (hours, weekdays), strict=True):
        formula = eval(CLOCK_FORMULAS[name], {"ts": ts[:-1]})  # noqa: S307 - our constant
        np.testing.assert_array_equal(formula, got[:-1])


def _clock_of(t: int) -> tuple[int, int]:
    hours, weekdays = play_clock(np.array([t]))
    return int(hours[0]), int(weekdays[0])


def test_windows_and_eval_sets_hold_each_plays_clock() -> None:
    # one sequence of 5 plays (the third skipped, the fourth without a time)
    ts = np.array([T0, T0 + 3600 * 5, T0 + 86400, -1, T0 + 86400 * 3 + 60])
    items = np.array([5, 6, 7, 8, 9])
    positive = np.array([1, 1, 0, 1, 1], dtype=bool)
    seqs = Sequences(
        items=items, offsets=np.array([0, 5]), users=np.array([2]),
        hours=np.full(5, 23, np.int8),  # an hour column in local time: not the play clock
        contexts=np.zeros(5, np.int64), positive=positive, timestamps=ts,
    )  # fmt: skip
    want = [_clock_of(t) if t >= 0 else (-1, -1) for t in ts]
    w = build_windows(seqs, window=6, play_signals=True, clock=True)
    assert w["items"].tolist() == [[0, 0, 5, 6, 7, 8, 9]]
    assert w["play_hours"].tolist() == [[-1, -1, *(h for h, _ in want)]]  # -1 at padding
    assert w["play_weekdays"].tolist() == [[-1, -1, *(d for _, d in want)]]
    assert want[0] != want[1] and want[0][1] != want[2][1]  # the data really varies
    assert "play_hours" not in build_windows(seqs, window=6, play_signals=True)
    # evaluation sets: every play before the target keeps its time; the clock comes from it
    es = build_eval_set(
        np.array([4]), np.zeros(5, np.int64), positive, items, np.full(5, 2),
        seqs.hours, seqs.contexts, 10, ts,
    )  # fmt: skip
    assert es.plays.tolist() == [5, 6, 7, 8] and es.plays_timestamps.tolist() == ts[:4].tolist()
    assert es.target_timestamps.tolist() == [ts[4]]
    from twotower.data.eval_dataset import EvalDataset

    batch = EvalDataset(es, 6, False, play_signals=True, play_clock=True)[0]
    assert batch["history"].tolist() == [[0, 0, 5, 6, 7, 8]]
    assert batch["play_hours"].tolist() == [[-1, -1, *(h for h, _ in want[:4])]]
    assert batch["play_weekdays"].tolist() == [[-1, -1, *(d for _, d in want[:4])]]
    assert "play_hours" not in EvalDataset(es, 6, False, play_signals=True)[0]


def test_training_feeds_the_clock_of_each_input_play() -> None:
    """sequence_loss gives position t the clock of play t (not of the predicted one), and
    signal_dropout hides a row's clock together with its gaps."""
    from twotower.model.module import TwoTowerModule

    module = TwoTowerModule(
        num_items=12, dim=8, id_dim=8, encoder="mean", play_signals=True, play_clock=True,
        num_negatives=0, signal_dropout=0.0,
    )  # fmt: skip
    seen = []
    tower_fn = module._sequence_fn
    module._sequence_fn = lambda q: seen.append(q) or tower_fn(q)
    batch = {
        "items": torch.tensor([[0, 5, 6, 7], [2, 3, 4, 5]]),
        "hours": torch.full((2, 4), -1), "contexts": torch.zeros(2, 4, dtype=torch.long),
        "users": torch.zeros(2, dtype=torch.long), "skips": torch.zeros(2, 4, dtype=torch.long),
        "gaps": torch.tensor([[0, 1, 3, 3], [1, 3, 3, 3]]),
        "play_hours": torch.tensor([[-1, 8, 9, 10], [1, 2, 3, 4]]),
        "play_weekdays": torch.tensor([[-1, 0, 1, 2], [3, 4, 5, 6]]),
    }  # fmt: skip
    module.train()
    module.sequence_loss(batch)
    assert seen[-1].play_hours.tolist() == [[-1, 8, 9], [1, 2, 3]]
    assert seen[-1].play_weekdays.tolist() == [[-1, 0, 1], [3, 4, 5]]
    module.hparams.signal_dropout = 1.0  # every row loses its times
    module.sequence_loss(batch)
    assert (seen[-1].play_hours == -1).all() and (seen[-1].play_weekdays == -1).all()
    assert (seen[-1].gaps == 0).all()


def test_data_play_clock_needs_play_signals() -> None:
    from twotower.data.datamodule import TwoTowerDataModule

    with pytest.raises(ValueError, match="play_clock needs data.play_signals"):
        TwoTowerDataModule(format="synthetic", play_clock=True)


# -------------------------------------------------------------- a hand-built artifact
def _hand_artifact(root: Path, play_signals: bool, play_clock: bool = False) -> Path:
    tower = _tower(play_signals, play_clock=play_clock)
    n = V - 2
    ids = [f"t{i}" for i in range(n)]
    emb = torch.nn.functional.normalize(
        torch.randn(n, 8, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    items = pd.DataFrame({"track_id": pd.Series(ids, dtype="string")})
    return write_artifact(
        root, query_tower=tower, item_emb=emb.numpy(), items=items,
        vocab={"tracks": ids, "users": [], "contexts": []}, index="Flat",
    )  # fmt: skip


@pytest.fixture(scope="module")
def hand(tmp_path_factory) -> dict[str, Retriever]:
    root = tmp_path_factory.mktemp("hand")
    return {
        "play": Retriever.load(_hand_artifact(root / "play", True)),
        "plain": Retriever.load(_hand_artifact(root / "plain", False)),
        "clock": Retriever.load(_hand_artifact(root / "clock", True, play_clock=True)),
    }


def test_retriever_gaps_skips_and_request_gap(hand) -> None:
    r = hand["play"]
    hist = ["t3", "nope", "t5", "t7", "t9"]
    ts = [T0, T0 + 30, T0 + 400, None, T0 + 4000]
    marks = [False, True, True, False, False]
    q, unknown, notes, known = r._query_inputs([hist], [None], [ts], [marks], [T0 + 4000 + 7200])
    assert unknown == [["nope"]] and notes == [[]]
    assert q.history.tolist() == [[5, 7, 9, 11]]  # row + 2; "nope" left out
    # gaps over the history as sent: the first play unknown (not GAP_FIRST), "nope" 30 s after
    # t3, t5 370 s after "nope" (its real neighbour, not t3), t7 and t9 next to an unknown time
    assert q.gaps.tolist() == [[0, int(gap_buckets(np.array([370]))[0]), 0, 0]]
    assert q.skips.tolist() == [[0, 1, 0, 0]]  # the skip mark of "nope" left with it
    assert q.request_gaps.tolist() == [2 + sum(e <= 7200 for e in GAP_EDGES)]  # 2 h
    # the same batch through THE builder gives the same vectors
    built = r.spec.build(
        np.array([5, 7, 9, 11]), np.array([0, 4]), skips=np.array([0, 1, 0, 0]),
        gaps=q.gaps[0].numpy(), request_gaps=q.request_gaps.numpy(),
    )  # fmt: skip
    with torch.no_grad():
        want = r.query_tower(built).numpy()
    got = r.query_embeddings([hist], timestamps=[ts], skipped=[marks], at=T0 + 4000 + 7200)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # no times: every gap and the request gap unknown; at alone cannot make a request gap
    q, *_ = r._query_inputs([hist], [None], [None], [marks], [T0])
    assert q.gaps.tolist() == [[0, 0, 0, 0]] and q.request_gaps.tolist() == [0]
    # at defaults to now when the history has times
    q, *_ = r._query_inputs([["t3"]], [None], [[int(time.time()) - 7200]], None, None)
    assert q.request_gaps.tolist() == [2 + sum(e <= 7200 for e in GAP_EDGES)]
    q, *_ = r._query_inputs([["t3"]], [None], None, None, None)
    assert q.request_gaps.tolist() == [0] and q.gaps.tolist() == [[0]]


def test_skip_mark_and_times_change_the_answer_of_a_play_signal_model_only(hand) -> None:
    hist = ["t3", "t5", "t7"]
    ts = [T0, T0 + 200, T0 + 90_000]
    for name, changes in (("play", True), ("plain", False)):
        r = hand[name]
        bare = r.recommend(hist, k=38)
        marked = r.recommend(hist, k=38, skipped=[False, False, True])
        timed = r.recommend(hist, k=38, timestamps=ts, at=T0 + 90_100)
        for other in (marked, timed):
            differ = not np.allclose(bare.scores, other.scores, atol=1e-6)
            assert differ is changes, name
            assert (NO_SIGNALS_NOTE in other.notes) is not changes
        assert bare.notes == []
    # a plain model: the very same answer as before the signals existed
    plain = hand["plain"]
    a, b = (
        plain.recommend(hist, k=10),
        plain.recommend(hist, k=10, timestamps=ts, skipped=[1 > 0] * 3),
    )
    assert a.ids == b.ids and a.scores == b.scores
    # exclude="history" leaves skipped tracks out too
    rec = hand["play"].recommend(hist, k=37, exclude="history", skipped=[True, False, False])
    assert not set(rec.ids) & set(hist)


def test_retriever_play_clock_from_times(hand) -> None:
    r = hand["clock"]
    hist = ["t3", "nope", "t5", "t7", "t9"]
    ts = [T0, T0 + 30, T0 + 400, None, T0 + 4000]
    q, unknown, notes, _ = r._query_inputs([hist], [None], [ts], None, [T0 + 9000])
    assert unknown == [["nope"]] and notes == [[]]
    want = [_clock_of(t) for t in (T0, T0 + 400)] + [(-1, -1), _clock_of(T0 + 4000)]
    assert q.play_hours.tolist() == [[h for h, _ in want]]  # "nope" left out with its clock
    assert q.play_weekdays.tolist() == [[d for _, d in want]]
    # the same batch through THE builder gives the same vectors
    built = r.spec.build(
        np.array([5, 7, 9, 11]), np.array([0, 4]), skips=np.zeros(4, np.int64),
        gaps=q.gaps[0].numpy(), request_gaps=q.request_gaps.numpy(),
        play_hours=q.play_hours[0].numpy(), play_weekdays=q.play_weekdays[0].numpy(),
    )  # fmt: skip
    with torch.no_grad():
        want_emb = r.query_tower(built).numpy()
    got = r.query_embeddings([hist], timestamps=[ts], at=T0 + 9000)
    np.testing.assert_allclose(got, want_emb, atol=1e-6)
    # without times: the clock unknown, and the model still answers
    q, *_ = r._query_inputs([hist], [None], None, None, None)
    assert q.play_hours.tolist() == [[-1] * 4] and q.play_weekdays.tolist() == [[-1] * 4]
    rec = r.recommend(hist, k=5)
    assert len(rec.ids) == 5 and rec.unknown == ["nope"]
    # a play-signal model without the clock gets none
    q, *_ = hand["play"]._query_inputs([hist], [None], [ts], None, None)
    assert q.play_hours is None and q.play_weekdays is None


def test_play_times_shifted_by_days_change_a_clock_model_only(hand) -> None:
    """Whole days later: the same gaps and hours, another weekday (and hours: 7 h later)."""
    hist = ["t3", "t5", "t7"]
    ts = [T0, T0 + 200, T0 + 90_000]
    for shift in (86400, 7 * 3600):
        later = [t + shift for t in ts]
        for name, changes in (("clock", True), ("play", False), ("plain", False)):
            r = hand[name]
            a = r.recommend(hist, k=38, timestamps=ts, at=ts[-1] + 100)
            b = r.recommend(hist, k=38, timestamps=later, at=later[-1] + 100)
            assert (not np.allclose(a.scores, b.scores, atol=1e-6)) is changes, (name, shift)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"timestamps": [T0, T0 - 1]}, "oldest first"),
        ({"timestamps": [T0]}, "1 timestamps for 2"),
        ({"timestamps": [T0, True]}, "unix seconds"),
        ({"timestamps": [T0, 1.5]}, "unix seconds"),
        ({"timestamps": [T0, -3]}, "unix seconds"),
        ({"skipped": [True]}, "1 skipped marks for 2"),
        ({"skipped": [True, "yes"]}, "booleans"),
        ({"timestamps": [T0, T0 + 9], "at": T0}, "earlier than the last play"),
        ({"at": 1.0}, "unix seconds"),
    ],
)
def test_retriever_refuses_bad_signals(hand, kwargs: dict, match: str) -> None:
    for r in hand.values():  # validated whether or not the model reads them
        with pytest.raises(ValueError, match=match):
            r.recommend(["t3", "t5"], k=3, **kwargs)


# ------------------------------------------------------------------ a trained model
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Tiny synthetic run with play signals and the play clock (1 epoch), exported with users
    and ONNX."""
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("play")
    ckpt = fit_tiny(root, "run", **{"data.play_signals": True, "data.play_clock": True})
    art = export_checkpoint(
        ckpt, str(root / "art"), index="Flat", users=True, onnx=True, progress=False
    )
    return {"art": art, "retriever": Retriever.load(art)}


def _data(manifest: dict):
    from twotower.data.pipeline import DataConfig, prepare_data

    hp = manifest["data"]["datamodule"]
    fields = DataConfig.__dataclass_fields__
    return prepare_data(DataConfig(**{k: v for k, v in hp.items() if k in fields}))


def test_manifest_describes_the_play_inputs_and_onnx_takes_them(trained) -> None:
    manifest = json.loads((trained["art"] / "manifest.json").read_text())
    desc = manifest["query_tower"]
    names = [i["name"] for i in desc["inputs"]]
    # tiny: no user/hour/context
    assert names == ["history", "skips", "gaps", "request_gaps", "play_hours", "play_weekdays"]
    assert manifest["onnx"]["inputs"] == names and manifest["query_tower"]["args"]["play_signals"]
    assert manifest["query_tower"]["args"]["play_clock"]  # linked from data.play_clock
    assert desc["gap_edges_seconds"] == list(GAP_EDGES)
    assert "skipped ones included" in desc["history_holds"]
    assert trained["retriever"].spec.play_signals and trained["retriever"].spec.play_clock
    # the clock inputs: shape, unknown value, and how to compute them
    clock = {i["name"]: i for i in desc["inputs"][-2:]}
    for name in ("play_hours", "play_weekdays"):
        assert clock[name]["shape"] == ["batch", "length"] and clock[name]["unknown"] == -1
        assert clock[name]["dtype"] == "int64" and "UTC" in clock[name]["meaning"]
        assert desc["play_clock"][name] == CLOCK_FORMULAS[name]
    assert (
        desc["play_clock"]["timezone"] == "UTC"
        and "Monday = 0" in clock["play_weekdays"]["meaning"]
    )


def _client_feeds(
    desc: dict, plays: list[list[tuple[int, int, bool]]], at: list[int], length: int
) -> dict:
    """ONNX inputs as a client knowing only the manifest builds them: (item, ts, skipped)."""
    edges = np.asarray(desc["gap_edges_seconds"])
    b = len(plays)
    feeds = {}
    for spec in desc["inputs"]:
        shape = [b if a == "batch" else length for a in spec["shape"]]
        feeds[spec["name"]] = np.full(shape, spec["unknown"], dtype=spec["dtype"])
    for r, row in enumerate(plays):
        n = len(row)
        assert desc["inputs"][0]["padding"] == "left"
        feeds["history"][r, length - n :] = [p[0] for p in row]
        feeds["skips"][r, length - n :] = [int(p[2]) for p in row]
        # gap: 2 + the number of edges the time since the previous play reaches; the first
        # play of a client's history: unknown (the manifest's unknown value)
        gaps = [0] + [2 + int((edges <= row[i][1] - row[i - 1][1]).sum()) for i in range(1, n)]
        feeds["gaps"][r, length - n :] = gaps
        feeds["request_gaps"][r] = 2 + int((edges <= at[r] - row[-1][1]).sum())
        # the clock of each play, from the manifest's formulas (the padding keeps "unknown")
        ts = np.array([p[1] for p in row], dtype=np.int64)
        for name, formula in desc["play_clock"].items():
            if name in feeds:
                feeds[name][r, length - n :] = eval(formula, {"ts": ts})  # noqa: S307
    return feeds


def test_onnx_parity_from_the_manifest_alone(trained) -> None:
    """onnxruntime, fed from the manifest's description, matches the torch tower and the
    Retriever's own raw-id path (which pads only to the batch's longest history)."""
    import onnxruntime as ort

    art, r = trained["art"], trained["retriever"]
    manifest = json.loads((art / "manifest.json").read_text())
    desc = manifest["query_tower"]
    session = ort.InferenceSession(str(art / manifest["onnx"]["file"]))
    assert [i.name for i in session.get_inputs()] == [i["name"] for i in desc["inputs"]]
    rng = np.random.default_rng(0)
    plays, at = [], []
    for n in (1, 3, 7, desc["history_len"]):
        ts = T0 + np.cumsum(rng.choice([20, 200, 2000, 90_000], n))
        rows = rng.integers(0, len(r), n)
        plays.append(
            [(int(i) + 2, int(t), bool(rng.random() < 0.4)) for i, t in zip(rows, ts, strict=True)]
        )
        at.append(int(ts[-1]) + int(rng.choice([5, 4000, 200_000])))
    for length in (desc["history_len"], 8):  # the length axis is free for every per-play input
        sub = [p[-length:] for p in plays]
        feeds = _client_feeds(desc, sub, at, length)
        got = session.run([desc["output"]["name"]], feeds)[0]
        with torch.no_grad():
            want = r.query_tower(QueryBatch(**{k: torch.from_numpy(v) for k, v in feeds.items()}))
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
        if length == desc["history_len"]:
            ids = [[str(r.ids[p[0] - 2]) for p in row] for row in sub]
            mine = r.query_embeddings(
                ids, timestamps=[[p[1] for p in row] for row in sub],
                skipped=[[p[2] for p in row] for row in sub], at=at,
            )  # fmt: skip
            np.testing.assert_allclose(mine, got, atol=1e-5)
    # the skip marks matter in the exported graph as well, and so does the clock
    flipped = dict(feeds, skips=1 - feeds["skips"])
    assert np.abs(session.run(None, flipped)[0] - got).max() > 1e-4
    real = feeds["history"] != 0
    for name, period in (("play_hours", 24), ("play_weekdays", 7)):
        moved = dict(feeds, **{name: np.where(real, (feeds[name] + 3) % period, -1)})
        assert np.abs(session.run(None, moved)[0] - got).max() > 1e-4, name
        with torch.no_grad():
            want = r.query_tower(QueryBatch(**{k: torch.from_numpy(v) for k, v in moved.items()}))
        np.testing.assert_allclose(session.run(None, moved)[0], want.numpy(), atol=1e-5)


def test_listener_vectors_use_the_latest_plays_with_their_signals(trained) -> None:
    art, r = trained["art"], trained["retriever"]
    manifest = json.loads((art / "manifest.json").read_text())
    data = _data(manifest)
    te = data.test
    user_emb = np.load(art / "user_embeddings.npy")
    users = pd.read_parquet(art / "users.parquet") if (art / "users.parquet").exists() else None
    assert user_emb.shape[0] == data.num_users - 2 and (
        users is None or len(users) == len(user_emb)
    )
    last = {int(u): q for q, u in enumerate(te.users) if u >= 2}
    checked = 0
    for u, q in list(last.items())[:5]:
        lo, hi = te.plays_offsets[q], te.plays_offsets[q + 1]
        vals = np.concatenate([te.plays[lo:hi], [te.targets[q]]])
        skips = np.concatenate([te.plays_skipped[lo:hi], [0]])
        gaps = np.concatenate([te.plays_gaps[lo:hi], [te.request_gaps[q]]])
        times = np.concatenate([te.plays_timestamps[lo:hi], [te.target_timestamps[q]]])
        keep = vals >= 2  # OOV plays left out with their signals
        hours, weekdays = play_clock(times[keep])
        assert (hours >= 0).all()  # synthetic plays all have a time
        q_built = r.spec.build(
            vals[keep], np.array([0, keep.sum()]), skips=skips[keep], gaps=gaps[keep],
            play_hours=hours, play_weekdays=weekdays,
        )  # fmt: skip
        with torch.no_grad():
            want = r.query_tower(q_built).numpy()[0]
            no_clock = r.query_tower(replace(q_built, play_hours=None, play_weekdays=None))
        np.testing.assert_allclose(user_emb[u - 2], want, atol=1e-5)
        assert np.abs(no_clock.numpy()[0] - want).max() > 1e-4  # the clock was used
        # and not what positives only, without signals, would give
        pos = vals[keep][skips[keep] == 0]
        with torch.no_grad():
            plain = r.query_tower(r.spec.build(pos, np.array([0, len(pos)]))).numpy()[0]
        assert np.abs(plain - want).max() > 1e-4
        checked += 1
    assert checked == 5


def test_readme_onnx_example_with_play_times(trained, capsys) -> None:
    """The README's onnxruntime-only example on a clock model: the play times become the clock."""
    import re

    art, r = trained["art"], trained["retriever"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(
        r"<!-- onnx-example -->\n```python\n(.*?)```\n<!-- /onnx-example -->", readme, re.S
    )
    assert block, "README lost its ONNX example"
    ids = [str(x) for x in r.ids[[3, 40, 41]]]
    times = [T0, T0 + 7 * 3600, T0 + 3 * 86400]
    want_clock = play_clock(np.array(times))
    code = block.group(1).replace('"runs/default/artifacts"', repr(str(art)))
    code = code.replace('["t1781", "t1789"]', repr([ids[0], "no-such-track", *ids[1:]]))
    for with_times in (True, False):
        sent = [times[0], T0 + 60, *times[1:]] if with_times else None
        scope: dict = {}
        run = compile(code.replace("[1700000000, 1700000600]", repr(sent)), "README.md", "exec")
        exec(run, scope)  # noqa: S102 - our own documentation
        values = np.array([r.track_rows[t] + 2 for t in ids])
        clock = dict(zip(("play_hours", "play_weekdays"), want_clock, strict=True))
        built = r.spec.build(values, np.array([0, 3]), **(clock if with_times else {}))
        assert (built.play_hours is not None) is with_times
        with torch.no_grad():
            want = r.query_tower(built).numpy()  # skips, gaps, request gap: unknown
        np.testing.assert_allclose(scope["query_emb"], want, atol=1e-5)
        assert capsys.readouterr().out.strip()


def test_http_with_and_without_times_and_marks(trained) -> None:
    r = trained["retriever"]
    client = TestClient(create_app(trained["art"]))
    ids = [str(x) for x in r.ids[[3, 40, 41, 7]]]
    ts = [T0, T0 + 190, T0 + 400, T0 + 7000]
    marks = [False, True, False, False]
    body = {
        "history": [
            ids[0],  # a plain id: no time, not skipped
            {"track": ids[1], "ts": ts[1], "skipped": True},
            {"track": ids[2], "ts": ts[2]},
            {"track": ids[3], "ts": ts[3], "skipped": False},
        ],
        "at": T0 + 9000,
        "k": 5,
    }
    got = client.post("/recommend", json=body)
    assert got.status_code == 200, got.text
    want = r.recommend(ids, k=5, timestamps=[None, *ts[1:]], skipped=marks, at=T0 + 9000)
    assert [t["track_id"] for t in got.json()["items"]] == want.ids
    np.testing.assert_allclose([t["score"] for t in got.json()["items"]], want.scores, atol=1e-5)
    # the documented default: ids alone answer, as the Retriever does without signals
    bare = client.post("/recommend", json={"history": ids, "k": 5})
    assert (
        bare.status_code == 200
        and [t["track_id"] for t in bare.json()["items"]] == r.recommend(ids, k=5).ids
    )
    assert bare.json()["notes"] == []
    assert [t["score"] for t in bare.json()["items"]] != [t["score"] for t in got.json()["items"]]
    # the same plays a day and 5 hours later: gaps unchanged, the clock moved
    shift = 86400 + 5 * 3600
    later = json.loads(json.dumps(body))
    for entry in later["history"][1:]:
        entry["ts"] += shift
    later["at"] += shift
    moved = client.post("/recommend", json=later)
    assert moved.status_code == 200, moved.text
    want = r.recommend(ids, k=5, timestamps=[None, *(t + shift for t in ts[1:])], skipped=marks,
                       at=T0 + 9000 + shift)  # fmt: skip
    assert [t["track_id"] for t in moved.json()["items"]] == want.ids
    assert [t["score"] for t in moved.json()["items"]] != [t["score"] for t in got.json()["items"]]
    # all plays unknown: the cold-start answer, signals or not
    cold = client.post(
        "/recommend", json={"history": [{"track": "nope", "ts": T0, "skipped": True}]}
    )
    assert cold.status_code == 200 and cold.json()["unknown"] == ["nope"]


def test_batched_jobs_carry_their_own_signals(trained) -> None:
    """One recommend_batch call for mixed jobs gives each the answer it gets alone."""
    from twotower.serve.catalogue import load_model

    r = trained["retriever"]
    model = load_model(trained["art"], lambda p: r)
    ids = [str(x) for x in r.ids[[3, 40, 41]]]
    jobs = [
        RecommendJob(ids, 4, False, None),
        RecommendJob(
            ids, 4, False, None, [T0, T0 + 60, T0 + 4000], [False, True, False], T0 + 5000
        ),
        RecommendJob(ids, 3, True, None, None, [True, False, False], None),
        RecommendJob(ids[:2], 4, False, None, [T0, T0 + 100_000], None, None),
    ]
    together = _run_jobs(model, jobs)
    alone = [_run_jobs(model, [j])[0] for j in jobs]
    for a, b in zip(together, alone, strict=True):
        assert [t.track_id for t in a.items] == [t.track_id for t in b.items]
    assert [t.track_id for t in together[0].items] != [t.track_id for t in together[1].items] or (
        together[0].items[0].score != together[1].items[0].score
    )


@pytest.mark.parametrize(
    "body,field",
    [
        ({"history": [{"track": "t1", "ts": "5"}]}, "history.0.play.ts"),
        ({"history": [{"track": "t1", "ts": 1.0}]}, "history.0.play.ts"),
        ({"history": [{"track": "t1", "ts": True}]}, "history.0.play.ts"),
        ({"history": [{"track": "t1", "ts": -1}]}, "history.0.play.ts"),
        ({"history": [{"track": "t1", "ts": 2**41}]}, "history.0.play.ts"),  # milliseconds
        ({"history": ["t1", {"track": "t2", "skipped": 1}]}, "history.1.play.skipped"),
        ({"history": [{"track": "t1", "skipped": "yes"}]}, "history.0.play.skipped"),
        ({"history": [{"track": 5}]}, "history.0.play.track"),
        ({"history": [{"track": ""}]}, "history.0.play.track"),
        ({"history": [{"ts": 5}]}, "history.0.play.track"),
        ({"history": [{"track": "t1", "when": 5}]}, "history.0.play.when"),
        ({"history": [{"track": "\ud800"}]}, "history.0.play.track"),
        ({"history": [["t1"]]}, "history.0"),
        (
            {"history": [{"track": "t1", "ts": T0}, "t2", {"track": "t3", "ts": T0 - 1}]},
            "history.2.ts",
        ),
        ({"history": [{"track": "t1", "ts": T0}], "at": T0 - 1}, "at"),
        ({"history": ["t1"], "at": "now"}, "at"),
        ({"history": ["t1"], "at": 1.5}, "at"),
        ({"history": ["t1"], "at": False}, "at"),
    ],
)
def test_play_fields_are_strict(trained, body: dict, field: str) -> None:
    client = TestClient(create_app(trained["art"]), raise_server_exceptions=False)
    raw = json.dumps(body).encode()
    r = client.post("/recommend", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in r.json()["message"], r.json()["message"]


@pytest.fixture(scope="module")
def fuzz_client(trained) -> TestClient:
    return TestClient(create_app(trained["art"]), raise_server_exceptions=False)


ANY = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6)
PLAY = st.fixed_dictionaries(
    {},
    optional={
        "track": st.sampled_from([f"t{i}" for i in range(8)] + ["nope", ""]) | ANY,
        "ts": st.integers(-10, 2**41) | st.integers(T0, T0 + 10**6) | ANY,
        "skipped": st.booleans() | ANY,
        "extra": ANY,
    },
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    history=st.lists(PLAY | st.sampled_from(["t1", "t2", "nope"]) | ANY, max_size=6),
    at=st.none() | st.integers(-5, 2**41) | st.integers(T0, T0 + 10**6) | ANY,
    k=st.integers(0, 12),
)
def test_fuzz_play_fields_never_5xx(fuzz_client, history, at, k) -> None:
    body = {"history": history, "k": k}
    if at is not None:
        body["at"] = at
    r = fuzz_client.post(
        "/recommend", content=json.dumps(body, allow_nan=True).encode(),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code == 422:
        assert r.json()["message"]


def test_cli_history_json_takes_plays(trained, capsys) -> None:
    from twotower.cli import main

    r = trained["retriever"]
    ids = [str(x) for x in r.ids[[3, 40]]]
    plays = [{"track": ids[0], "ts": T0}, {"track": ids[1], "ts": T0 + 100, "skipped": True}]
    argv = ["recommend", "--artifacts", str(trained["art"]), "-k", "3"]
    assert main([*argv, "--history-json", json.dumps(plays)]) == 0
    out = capsys.readouterr().out
    want = r.recommend(ids, k=3, timestamps=[T0, T0 + 100], skipped=[False, True])
    assert [line.split()[1] for line in out.strip().splitlines()[1:]] == want.ids
    for bad in ([{"track": ids[0], "ts": "x"}], [{"track": ids[0], "skip": True}], [{"ts": 1}]):
        assert main([*argv, "--history-json", json.dumps(bad)]) == 2
        assert "--history-json[0]" in capsys.readouterr().err


# ------------------------------------------------------------------ the demo page
@pytest.mark.slow
def test_demo_page_sends_the_skip_mark_and_play_times(trained, driver) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    calls: list[dict] = []

    class Recording(Retriever):
        def recommend_batch(self, histories, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
            calls.append({"histories": histories, **kwargs})
            return super().recommend_batch(histories, *args, **kwargs)

    r = trained["retriever"]
    track = str(r.ids[5])
    with _serve(create_app(trained["art"], loader=Recording.load)) as url:
        drv = driver
        drv.get(url + "/")
        _wait(drv, lambda d: "tracks" in d.find_element(By.ID, "health").text)
        drv.find_element(By.ID, "search").send_keys(track)
        _wait(drv, lambda d: track in _ids(d, "#search-results li"))
        drv.find_element(By.CSS_SELECTOR, f'#search-results li[data-track-id="{track}"]').click()
        _wait(drv, lambda d: len(_ids(d, "#recs li")) == 10)
        first = calls[-1]
        assert first["histories"] == [[track]] and first.get("skipped") == [None]
        (added,) = first["timestamps"][0]  # the time the play was added, in unix seconds
        assert abs(added - time.time()) < 120 and first["at"][0] >= added
        drv.find_element(By.CSS_SELECTOR, "#session li .skip").click()
        _wait(drv, lambda d: calls[-1].get("skipped") == [[True]])
        assert calls[-1]["timestamps"] == [[added]]
        assert drv.find_elements(By.CSS_SELECTOR, "#session li.skipped")
        want = r.recommend(
            [track],
            k=10,
            exclude="history",
            timestamps=[added],
            skipped=[True],
            at=calls[-1]["at"][0],
        ).ids
        _wait(drv, lambda d: _ids(d, "#recs li") == want)


def test_an_ensemble_of_play_signal_towers_reads_the_signals() -> None:
    """The ensemble's config repeats play_signals / play_clock, so its QuerySpec (what the
    export, ONNX and the Retriever build inputs from) asks for the per-play inputs."""
    from twotower.model.ensemble import EnsembleQueryTower
    from twotower.query import QuerySpec

    members = [_tower(True, seed=s, play_clock=True) for s in (0, 1)]
    ens = EnsembleQueryTower([m.config for m in members]).eval()
    spec = QuerySpec.from_config(ens.config)
    assert spec.play_signals and spec.play_clock
    plain = EnsembleQueryTower([_tower(False).config]).eval()
    assert not QuerySpec.from_config(plain.config).play_signals
    h = torch.tensor([[5, 6, 7]])
    with torch.no_grad():  # the members really read the skip marks through the ensemble
        a = ens(QueryBatch(h, skips=torch.tensor([[0, 0, 0]]), gaps=torch.tensor([[1, 3, 3]])))
        b = ens(QueryBatch(h, skips=torch.tensor([[0, 1, 0]]), gaps=torch.tensor([[1, 3, 3]])))
    assert not torch.allclose(a, b)
