"""Review storage: upserts, hidden assignments, concurrency, statistics, the CLI report."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from twotower.cli import main as cli_main
from twotower.serve.reviews import (
    Rating,
    ReviewStore,
    build_report,
    check_reviewer,
    pair_key,
    ratings_csv,
    wilson_interval,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path):
    with ReviewStore(tmp_path / "sub" / "r.sqlite") as s:
        yield s


def test_wal_mode_and_schema(store: ReviewStore) -> None:
    con = sqlite3.connect(store.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"ratings", "assignments"} <= tables
    con.close()


def test_rate_upserts_never_duplicates(store: ReviewStore) -> None:
    store.rate("ann", "u1", "A", 0, "t5", "m1", "good")
    store.rate("ann", "u1", "A", 0, "t5", "m1", "wtf")  # re-rating replaces
    store.rate("ann", "u1", "A", 1, "t6", "m1", "okay")
    store.rate("bob", "u1", "A", 0, "t5", "m1", "good")  # another reviewer: another row
    rows = store.ratings()
    assert [(r.reviewer, r.position, r.rating) for r in rows] == [
        ("ann", 0, "wtf"),
        ("ann", 1, "okay"),
        ("bob", 0, "good"),
    ]
    assert [r.rating for r in store.ratings(reviewer="ann", item="u1")] == ["wtf", "okay"]
    assert store.ratings(item="u2") == []


@pytest.mark.parametrize(
    "args,match",
    [
        (("  ", "u1", "A", 0, "t", "m", "good"), "reviewer"),
        (("a", "u1", "C", 0, "t", "m", "good"), "list"),
        (("a", "u1", "A", 0, "t", "m", "bad"), "rating"),
        (("a", "u1", "A", -1, "t", "m", "good"), "position"),
        (("a\x00b", "u1", "A", 0, "t", "m", "good"), "control character U\\+0000 at position 1"),
        (("ann\n", "u1", "A", 0, "t", "m", "good"), "control character U\\+000A"),
        (("\x1b[2Jann", "u1", "A", 0, "t", "m", "good"), "control character U\\+001B"),
        (("a\x85", "u1", "A", 0, "t", "m", "good"), "control character U\\+0085"),  # C1
        (("a\ud800", "u1", "A", 0, "t", "m", "good"), "lone surrogate U\\+D800"),
    ],
)
def test_rate_rejects_bad_values(store: ReviewStore, args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        store.rate(*args)
    assert store.ratings() == []


def test_check_reviewer_strips_and_keeps_printable_names() -> None:
    assert check_reviewer("  Zoë 🎧 O'Brien ") == "Zoë 🎧 O'Brien"
    assert check_reviewer("李 小龙") == "李 小龙"
    with pytest.raises(ValueError, match="empty"):
        check_reviewer(" \u3000 ")  # ideographic space: whitespace, stripped


def test_assignment_is_seeded_stored_and_order_free(tmp_path: Path) -> None:
    items = [f"u{i}" for i in range(40)]
    with ReviewStore(tmp_path / "a.sqlite") as s1, ReviewStore(tmp_path / "b.sqlite") as s2:
        s1.assign(items, "m1", "m2", seed=7)
        s2.assign(items, "m2", "m1", seed=7)  # argument order does not matter
        a1 = [s1.assignment(i, "m1", "m2")["A"] for i in items]
        a2 = [s2.assignment(i, "m2", "m1")["A"] for i in items]
        assert a1 == a2
        assert 10 < a1.count("m1") < 30  # both sides occur: random per item
        for i in items:
            assert set(s1.assignment(i, "m1", "m2").values()) == {"m1", "m2"}
        # a later draw with another seed never changes a stored assignment
        s1.assign(items, "m1", "m2", seed=8)
        assert [s1.assignment(i, "m1", "m2")["A"] for i in items] == a1
        with pytest.raises(KeyError):
            s1.assignment("u0", "m1", "m3")
        with pytest.raises(ValueError, match="different labels"):
            s1.assign(items, "m1", "m1", seed=0)
    with ReviewStore(tmp_path / "c.sqlite") as s3:
        s3.assign(items, "m1", "m2", seed=8)
        assert [s3.assignment(i, "m1", "m2")["A"] for i in items] != a1
    assert pair_key("x", "y") == pair_key("y", "x")


def test_concurrent_threads_no_lost_or_duplicated(store: ReviewStore) -> None:
    n_threads, n_pos = 8, 25
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for pos in range(n_pos):
                store.rate(f"r{t}", "u1", "A", pos, f"t{pos}", "m1", "okay")
                store.rate(f"r{t}", "u1", "A", pos, f"t{pos}", "m1", "wtf" if pos % 2 else "good")
                store.rate("shared", "u1", "B", 0, "t0", "m2", "okay")  # everybody, same key
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    rows = store.ratings()
    assert len(rows) == n_threads * n_pos + 1
    for r in rows:
        if r.reviewer != "shared":
            assert r.rating == ("wtf" if r.position % 2 else "good")


def test_concurrent_processes_no_lost_or_duplicated(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    ReviewStore(path).close()
    script = textwrap.dedent(
        """
        import sys
        from twotower.serve.reviews import ReviewStore
        path, me = sys.argv[1], sys.argv[2]
        s = ReviewStore(path)
        for pos in range(60):
            s.rate(me, "u1", "A", pos, f"t{pos}", "m1", "okay")
            s.rate(me, "u1", "A", pos, f"t{pos}", "m1", "wtf")
            s.rate("shared", "u9", "B", pos % 3, "t0", "m2", "good")
        s.close()
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), f"p{i}"], cwd=REPO)
        for i in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    with ReviewStore(path) as s:
        rows = s.ratings()
    assert len(rows) == 4 * 60 + 3
    assert all(r.rating == "wtf" for r in rows if r.reviewer != "shared")
    assert {(r.reviewer, r.position) for r in rows if r.reviewer != "shared"} == {
        (f"p{i}", pos) for i in range(4) for pos in range(60)
    }


def test_wilson_interval_hand_values() -> None:
    low, high = wilson_interval(3, 10)
    assert (low, high) == pytest.approx((0.1078, 0.6032), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == pytest.approx(1.0)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def _r(reviewer: str, item: str, lst: str, pos: int, model: str, rating: str) -> Rating:
    return Rating(reviewer, item, lst, pos, "t", model, rating, "2024-01-01T00:00:00Z")


def test_report_per_model_and_paired_difference() -> None:
    rows = []
    # 4 (reviewer, item) units; model "new" has 1 WTF of 2 in each, "old" 0 of 2 in each
    for reviewer in ("ann", "bob"):
        for item in ("u1", "u2"):
            rows += [
                _r(reviewer, item, "A", 0, "new", "wtf"),
                _r(reviewer, item, "A", 1, "new", "good"),
                _r(reviewer, item, "B", 0, "old", "okay"),
                _r(reviewer, item, "B", 1, "old", "good"),
            ]
    rows.append(_r("cat", "u3", "A", 0, "old", "wtf"))  # unpaired: counts per model only
    report = build_report(rows, bootstrap=500, seed=1)
    by = {m.model: m for m in report.models}
    assert (by["new"].n, by["new"].wtf, by["new"].good) == (8, 4, 4)
    assert by["new"].wtf_share == 0.5
    assert (by["old"].n, by["old"].wtf, by["old"].okay) == (9, 1, 4)
    assert (by["new"].wtf_low, by["new"].wtf_high) == pytest.approx(wilson_interval(4, 8))
    (d,) = report.paired
    assert (d.model_a, d.model_b, d.units) == ("new", "old", 4)
    assert d.mean_diff == pytest.approx(-0.5)
    assert d.low == pytest.approx(-0.5) and d.high == pytest.approx(-0.5)  # no spread
    assert report.reviewers == 3 and report.items == 3 and report.ratings == 17
    text = report.format()
    assert "| new | 8 | 4 | 0 | 4 | 50.0% |" in text and "old minus new | 4 | -50.0%" in text
    csv_lines = report.to_csv().splitlines()
    assert csv_lines[1].startswith("model,new,,8,4,0,4,0.500000,")
    assert csv_lines[3].startswith("paired_diff,old,new,4,,,,-0.500000,")
    assert ratings_csv(rows[:1]).splitlines()[1] == "ann,u1,A,0,t,new,wtf,2024-01-01T00:00:00Z"


def test_report_bootstrap_interval_covers_mean() -> None:
    rows = []
    for i in range(30):
        rows.append(_r("ann", f"u{i}", "A", 0, "m1", "wtf" if i % 3 == 0 else "good"))
        rows.append(_r("ann", f"u{i}", "B", 0, "m2", "good"))
    (d,) = build_report(rows, bootstrap=1000, seed=0).paired
    assert d.mean_diff == pytest.approx(-10 / 30)
    assert d.low < d.mean_diff < d.high < 0  # m2 clearly fewer WTFs
    empty = build_report([])
    assert empty.models == [] and empty.paired == [] and empty.to_dict()["ratings"] == 0


def test_cli_review_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.sqlite"
    with ReviewStore(path) as s:
        s.rate("ann", "u1", "A", 0, "t1", "m1", "wtf")
        s.rate("ann", "u1", "B", 0, "t2", "m2", "good")
    out_csv, out_json = tmp_path / "r.csv", tmp_path / "r.json"
    assert (
        cli_main(
            [
                "review-report",
                "--reviews",
                str(path),
                "--csv",
                str(out_csv),
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| m1 | 1 | 0 | 0 | 1 | 100.0% |" in printed
    assert out_csv.read_text().startswith("kind,model")
    assert '"paired"' in out_json.read_text()
    assert cli_main(["review-report", "--reviews", str(tmp_path / "missing.sqlite")]) == 2
    assert "no such review file" in capsys.readouterr().err
