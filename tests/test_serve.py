"""HTTP service: endpoints, validation, limits, metrics, listeners, review routes, batching.

Most tests run against a fake retriever with a planted rule ("the next track is the one after
the last known track"), so exact answers can be asserted; ``test_real_artifact_*`` serve a real
tiny export and check the service answers what ``Retriever`` answers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from twotower.serve.app import create_app  # noqa: E402
from twotower.serve.catalogue import Catalogue  # noqa: E402
from twotower.serve.metrics import Metrics  # noqa: E402

N_TRACKS = 30


def _title(i: int) -> str:
    return "Blue Monday" if i == 7 else f"Song {i}"


def _artist(i: int) -> str:
    return "New Order" if i == 12 else f"Artist {i % 5}"


@dataclass
class FakeRec:
    ids: list[str]
    titles: list[str]
    artists: list[str]
    scores: list[float]
    unknown: list[str] = field(default_factory=list)


class FakeRetriever:
    """Scores track j by closeness to ``last + step`` (step +1 for "base", -1 for "other")."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.ids = [f"t{i}" for i in range(N_TRACKS)]
        self.calls: list[dict] = []
        self.batch_calls: list[int] = []  # size of every recommend_batch call

    def _rank(self, centre: int, k: int, skip: set[str]) -> FakeRec:
        order = sorted(range(N_TRACKS), key=lambda j: (abs(j - centre), j))
        picked = [j for j in order if self.ids[j] not in skip][:k]
        return FakeRec(
            ids=[self.ids[j] for j in picked],
            titles=[_title(j) for j in picked],
            artists=[_artist(j) for j in picked],
            scores=[1.0 - abs(j - centre) / N_TRACKS for j in picked],
        )

    def recommend(self, history, k=10, exclude=None, context=None) -> FakeRec:
        self.calls.append(
            {"history": list(history), "k": k, "exclude": exclude, "context": context}
        )
        known = [h for h in history if h in self.ids]
        unknown = [h for h in history if h not in self.ids]
        if not known:
            raise ValueError("no known track in history")
        skip = set(known) if exclude == "history" else set(exclude or [])
        rec = self._rank(self.ids.index(known[-1]) + self.step, k, skip)
        rec.unknown = unknown
        return rec

    def recommend_batch(self, histories, k=10, exclude=None, contexts=None) -> list[FakeRec]:
        self.batch_calls.append(len(histories))
        if any(POISON in h for h in histories):
            raise ValueError(f"history holds {POISON}")
        contexts = contexts or [None] * len(histories)
        if exclude is None or isinstance(exclude, str):
            exclude = [exclude] * len(histories)
        return [
            self.recommend(h, k, e, c) for h, e, c in zip(histories, exclude, contexts, strict=True)
        ]

    def similar_tracks(self, track_id, k=10) -> FakeRec:
        return self._rank(self.ids.index(track_id), k, {track_id})


POISON = "t13"  # a known track the fake refuses (ValueError): one failing request


class PoisonRetriever(FakeRetriever):
    def recommend(self, history, k=10, exclude=None, context=None) -> FakeRec:
        if POISON in history:
            raise ValueError(f"history holds {POISON}")
        return super().recommend(history, k, exclude, context)


PLAYS = {20: 50, 3: 40, 11: 30}  # training plays: t20, t3, t11 most played, then catalogue order


def write_fake_artifact(path: Path, step: int, holdout: bool = True, plays: bool = True) -> Path:
    path.mkdir(parents=True)
    manifest = {
        "format_version": 1,
        "created": "2024-01-02T03:04:05Z",
        "package_version": "0.1.0",
        "dim": 8,
        "index": {"factory": "Flat", "search_params": {}, "metric": "ip"},
        "fake_step": step,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    items = pd.DataFrame(
        {
            "track_id": [f"t{i}" for i in range(N_TRACKS)],
            "title": [_title(i) for i in range(N_TRACKS)],
            "artist": [_artist(i) for i in range(N_TRACKS)],
            "plays": [PLAYS.get(i, 1) for i in range(N_TRACKS)],
        }
    )
    if not plays:
        items = items.drop(columns="plays")
    items.to_parquet(path / "items.parquet")
    if holdout:
        pd.DataFrame(
            {
                "query_id": [f"u{i}" for i in range(6)],
                "history": [[f"t{i}", f"t{i + 1}", f"t{i + 2}"] for i in range(6)],
                # u0..u2 really played the next track (a hit for "base"), u3..u5 something else
                "target": [f"t{i + 3}" if i < 3 else "t29" for i in range(6)],
                "hour": [8, -1, 12, 13, 14, 15],
            }
        ).to_parquet(path / "holdout.parquet")
    return path


def fake_loader(path: Path) -> FakeRetriever:
    return FakeRetriever(json.loads((path / "manifest.json").read_text())["fake_step"])


@pytest.fixture
def art(tmp_path: Path) -> Path:
    return write_fake_artifact(tmp_path / "base", step=1)


@pytest.fixture
def client(art: Path) -> TestClient:
    return TestClient(create_app(art, loader=fake_loader))


@pytest.fixture
def review_client(tmp_path: Path, art: Path) -> TestClient:
    other = write_fake_artifact(tmp_path / "other", step=-1, holdout=False)
    app = create_app(art, other, tmp_path / "reviews.sqlite", loader=fake_loader, review_k=4)
    return TestClient(app)


# -- recommend ---------------------------------------------------------------------------------


def test_recommend_follows_planted_rule(client: TestClient) -> None:
    r = client.post("/recommend", json={"history": ["t3", "t4"], "k": 3, "exclude_history": True})
    assert r.status_code == 200, r.text
    body = r.json()
    # next after t4 is t5; then t6 (t4 and t3 excluded as history)
    assert [t["track_id"] for t in body["items"]] == ["t5", "t6", "t7"]
    assert body["items"][2]["title"] == "Blue Monday"
    assert body["items"][0]["score"] == pytest.approx(1.0)
    assert body["unknown"] == []


def test_recommend_passes_context_and_exclusion(client: TestClient) -> None:
    r = client.post(
        "/recommend",
        json={"history": ["t3", "t4"], "k": 2, "context": {"hour": 9}, "exclude_history": False},
    )
    assert r.status_code == 200
    assert [t["track_id"] for t in r.json()["items"]] == ["t5", "t4"]  # t4 allowed back
    call = client.app.state.model.retriever.calls[-1]
    assert call["context"] == {"hour": 9} and call["exclude"] is None


def test_recommend_exclusion_defaults_to_the_artifacts_choice(tmp_path: Path) -> None:
    for filter_seen, expected in ((False, ["t5", "t4"]), (True, ["t5", "t6"])):
        art = write_fake_artifact(tmp_path / str(filter_seen), step=1)
        manifest = json.loads((art / "manifest.json").read_text())
        manifest["data"] = {"filter_seen": filter_seen}
        (art / "manifest.json").write_text(json.dumps(manifest))
        c = TestClient(create_app(art, loader=fake_loader))
        r = c.post("/recommend", json={"history": ["t3", "t4"], "k": 2})
        assert [t["track_id"] for t in r.json()["items"]] == expected
        assert c.get("/listeners/u0").json()["history_excluded"] is filter_seen


def test_recommend_partially_unknown_is_reported(client: TestClient) -> None:
    r = client.post("/recommend", json={"history": ["nope", "t10", "zzz"], "k": 1})
    assert r.status_code == 200
    assert r.json()["unknown"] == ["nope", "zzz"]
    assert r.json()["items"][0]["track_id"] == "t11"


def _ids(r) -> list[str]:
    return [t["track_id"] for t in r.json()["items"]]


def test_cold_start_empty_history_is_popular_with_note(client: TestClient) -> None:
    r = client.post("/recommend", json={"history": [], "k": 4})
    assert r.status_code == 200, r.text
    assert _ids(r) == ["t20", "t3", "t11", "t0"]  # most played, then catalogue order
    assert r.json()["notes"] == ["empty history: popular tracks"]
    assert r.json()["unknown"] == []
    total = sum(PLAYS.values()) + N_TRACKS - len(PLAYS)
    assert r.json()["items"][0]["score"] == pytest.approx(50 / total)  # share of plays
    assert client.app.state.model.retriever.calls == []  # no model query for nothing


def test_cold_start_all_unknown_is_popular_with_note_and_unknown(client: TestClient) -> None:
    r = client.post("/recommend", json={"history": ["nope", "zzz", "nope"], "k": 3})
    assert r.status_code == 200, r.text
    assert _ids(r) == ["t20", "t3", "t11"]
    assert r.json()["unknown"] == ["nope", "zzz"]
    assert r.json()["notes"] == ["no known track in history: popular tracks"]
    r = client.post(
        "/recommend", json={"history": ["nope"], "k": 2, "context": {"context_type": "radio"}}
    )
    assert r.json()["notes"] == [
        "no known track in history: popular tracks",
        "the context is not used for popular tracks",
    ]


def test_cold_start_without_play_counts_says_so(tmp_path: Path) -> None:
    class Defaults(FakeRetriever):
        def recommend(self, history, k=10, exclude=None, context=None) -> FakeRec:
            if not history:
                return self._rank(0, k, set())  # the model's answer to "no history"
            return super().recommend(history, k, exclude, context)

    art = write_fake_artifact(tmp_path / "a", step=1, plays=False)
    c = TestClient(create_app(art, loader=lambda p: Defaults(1)))
    r = c.post("/recommend", json={"history": ["nope"], "k": 2})
    assert r.status_code == 200 and _ids(r) == ["t0", "t1"]
    assert r.json()["unknown"] == ["nope"]
    assert r.json()["notes"] == [
        "no known track in history: the model's default tracks (this export records no play counts)"
    ]
    assert (
        c.post("/recommend", json={"history": [], "k": 2})
        .json()["notes"][0]
        .startswith("empty history: the model's default tracks")
    )


@pytest.mark.parametrize(
    "body,field",
    [
        ({"history": ["t1"], "k": True}, "k"),
        ({"history": ["t1"], "k": "5"}, "k"),
        ({"history": ["t1"], "k": 5.0}, "k"),
        ({"history": ["t1"], "context": {"hour": "9"}}, "hour"),
        ({"history": ["t1"], "context": {"hour": True}}, "hour"),
        ({"history": ["t1"], "exclude_history": "yes"}, "exclude_history"),
        ({"history": ["t1"], "exclude_history": 1}, "exclude_history"),
        ({"history": [1]}, "history.0"),
        ({"history": ["t1"], "context": {"user": 7}}, "user"),
        ({"history": ["t1"], "context": {"context_type": False}}, "context_type"),
    ],
)
def test_recommend_types_are_strict(client: TestClient, body: dict, field: str) -> None:
    r = client.post("/recommend", json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"]
    assert client.app.state.model.retriever.calls == []


SURROGATE_BODIES = [
    ("/recommend", {"history": ["\ud800"]}, "history.0"),
    ("/recommend", {"history": ["t1", "a\udfffb"]}, "history.1"),
    ("/recommend", {"history": ["t1"], "context": {"context_type": "\ud800"}}, "context_type"),
    ("/recommend", {"history": ["t1"], "context": {"user": "x\udc00"}}, "context.user"),
    ("/recommend", {"history": ["t1"], "k": 0, "context": {"user": "\ud800"}}, "body.k"),
    (
        "/review/rate",
        {"reviewer": "\ud800", "item": "u0", "list": "A", "position": 0, "rating": "wtf"},
        "reviewer",
    ),  # fmt: skip
    (
        "/review/rate",
        {"reviewer": "ann", "item": "\ud800", "list": "A", "position": 0, "rating": "wtf"},
        "item",
    ),  # fmt: skip
    (
        "/review/rate",
        {"reviewer": "ann", "item": "u0", "list": "\ud800", "position": 0, "rating": "wtf"},
        "list",
    ),  # fmt: skip
    (
        "/review/rate",
        {"reviewer": "ann", "item": "u0", "list": "A", "position": 0, "rating": "\udbff"},
        "rating",
    ),  # fmt: skip
    ("/review/rate", {"\ud800": 1}, "body"),
]


@pytest.mark.parametrize("url,body,field", SURROGATE_BODIES)
def test_lone_surrogates_are_422_with_a_readable_message(
    review_client: TestClient, url: str, body: dict, field: str
) -> None:
    raw = json.dumps(body).encode()  # ASCII JSON: the surrogate goes as the escape \\ud800
    assert b"\\ud" in raw
    r = review_client.post(url, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    r.content.decode("utf-8")  # valid UTF-8 JSON
    assert field in r.json()["message"], r.json()
    assert review_client.get("/review/report").json()["ratings"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"history": ["t1"], "k": 0},
        {"history": ["t1"], "k": 201},
        {"history": ["t1"] * 501, "k": 5},
        {"history": ["t1"], "k": 5, "context": {"hour": 24}},
        {"history": ["t1"], "k": 5, "surprise": 1},
        {"history": [""], "k": 5},
        {"k": 5},
    ],
)
def test_recommend_validation(client: TestClient, body: dict) -> None:
    assert client.post("/recommend", json=body).status_code == 422


def test_limits_at_the_edge_are_accepted(client: TestClient) -> None:
    r = client.post("/recommend", json={"history": ["t1"] * 500, "k": 200})
    assert r.status_code == 200
    ids = [t["track_id"] for t in r.json()["items"]]
    assert len(ids) == N_TRACKS and ids[:3] == ["t2", "t1", "t3"]


def test_body_too_large_is_413(client: TestClient) -> None:
    big = json.dumps({"history": ["x" * 200] * 400, "k": 5})  # ~ 82 KB
    r = client.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunks():  # no Content-Length: the limit must hold for streamed bodies too
        for _ in range(100):
            yield b" " * 1024

    r = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_malformed_json_is_422(client: TestClient) -> None:
    r = client.post(
        "/recommend", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422


# -- similar, search, health, docs -------------------------------------------------------------


def test_similar(client: TestClient) -> None:
    r = client.get("/similar/t10", params={"k": 2})
    assert r.status_code == 200
    assert [t["track_id"] for t in r.json()["items"]] == ["t9", "t11"]
    r = client.get("/similar/nope")
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    assert client.get("/similar/t1", params={"k": 0}).status_code == 422


def test_search_ranks_exact_id_then_title_prefix() -> None:
    cat = Catalogue(
        pd.DataFrame(
            {
                "track_id": ["a1", "blue", "b2", "c3"],
                "title": ["Into the Blue", "x", "Blue Monday", None],
                "artist": ["Moby", "y", "New Order", "BLUES band"],
            }
        )
    )
    assert [t.track_id for t in cat.search("BLUE", 10)] == ["blue", "b2", "a1", "c3"]
    assert [t.track_id for t in cat.search("blue", 2)] == ["blue", "b2"]
    assert cat.search("   ", 10) == [] and cat.search("zzz", 10) == []
    assert cat.track("c3").title == "" and cat.track("missing").artist == ""


def test_search_endpoint(client: TestClient) -> None:
    r = client.get("/tracks/search", params={"q": "new order"})
    assert [t["track_id"] for t in r.json()] == ["t12"]
    r = client.get("/tracks/search", params={"q": "song 1", "limit": 3})
    assert [t["track_id"] for t in r.json()] == ["t1", "t10", "t11"]
    assert client.get("/tracks/search", params={"q": ""}).status_code == 422
    assert client.get("/tracks/search", params={"q": "a", "limit": 51}).status_code == 422
    assert client.get("/tracks/search", params={"q": "x" * 101}).status_code == 422


def test_healthz(client: TestClient) -> None:
    h = client.get("/healthz").json()
    assert h["status"] == "ok"
    assert h["format_version"] == 1 and h["catalogue_size"] == N_TRACKS
    assert h["index"]["factory"] == "Flat" and h["created"].startswith("2024-01-02")
    assert h["heldout_listeners"] == 6


def test_openapi_offline_docs_and_security_headers(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/recommend", "/similar/{track_id}", "/tracks/search", "/healthz", "/metrics"} <= set(
        spec["paths"]
    )
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/recommend" in docs.text
    assert "cdn" not in docs.text.lower() and "http" not in docs.text.replace("/openapi", "")
    assert client.get("/redoc").status_code == 404
    assert "default-src 'self'" in docs.headers["content-security-policy"]


def test_pages_are_offline(client: TestClient) -> None:
    for path in ("/", "/static/app.js", "/static/style.css"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", r.text), f"{path} links out"
    assert "search" in client.get("/").text
    # review page without --compare explains how to enable it
    r = client.get("/review")
    assert r.status_code == 404 and "--compare" in r.text
    assert client.get("/review/items").status_code == 404


def test_no_endpoint_reads_a_path(client: TestClient) -> None:
    assert client.get("/static/../manifest.json").status_code == 404
    assert client.get("/static/%2e%2e/app.py").status_code == 404


# -- metrics -----------------------------------------------------------------------------------


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name + "{"):
            continue
        body = line[len(name) + 1 : line.rindex("}")]
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', body))
        if got == labels:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in metrics")


def test_metrics_exposition(client: TestClient) -> None:
    for _ in range(3):
        client.post("/recommend", json={"history": ["t1"], "k": 2})
    client.post("/recommend", json={"history": ["t1"], "k": 0})
    client.get("/similar/t3")
    client.get("/similar/t4")
    client.get("/no/such/route")
    text = client.get("/metrics").text
    base = "twotower_http_requests_total"
    assert _metric(text, base, route="/recommend", method="POST", status="200") == 3
    assert _metric(text, base, route="/recommend", method="POST", status="422") == 1
    # the route template, not the raw path: bounded label cardinality
    assert _metric(text, base, route="/similar/{track_id}", method="GET", status="200") == 2
    assert _metric(text, base, route="<unmatched>", method="GET", status="404") == 1
    hist = "twotower_http_request_duration_seconds"
    assert _metric(text, hist + "_count", route="/recommend", method="POST") == 4
    inf = _metric(text, hist + "_bucket", route="/recommend", method="POST", le="+Inf")
    assert inf == 4
    buckets = [
        _metric(text, hist + "_bucket", route="/recommend", method="POST", le=f"{le:g}")
        for le in Metrics.BUCKETS
    ]
    assert buckets == sorted(buckets) and buckets[-1] <= inf  # cumulative
    assert "# TYPE twotower_http_request_duration_seconds histogram" in text
    assert re.search(r"^twotower_catalogue_size 30$", text, re.M)


def test_metrics_label_escaping() -> None:
    m = Metrics()
    m.observe('a"b\\c\nd', "GET", 200, 0.002)
    text = m.render()
    assert 'route="a\\"b\\\\c\\nd"' in text
    assert (
        _metric(
            text,
            "twotower_http_request_duration_seconds_bucket",
            route='a\\"b\\\\c\\nd',
            method="GET",
            le="0.001",
        )
        == 0
    )
    assert (
        _metric(
            text,
            "twotower_http_request_duration_seconds_bucket",
            route='a\\"b\\\\c\\nd',
            method="GET",
            le="0.0025",
        )
        == 1
    )


# -- listeners ---------------------------------------------------------------------------------


def test_listeners(client: TestClient) -> None:
    body = client.get("/listeners", params={"limit": 2, "offset": 1}).json()
    assert body["total"] == 6
    assert [x["id"] for x in body["listeners"]] == ["u1", "u2"]
    assert body["listeners"][0]["target"]["track_id"] == "t4"
    hit = client.get("/listeners/u0", params={"k": 3}).json()
    assert [t["track_id"] for t in hit["history"]] == ["t0", "t1", "t2"]
    assert hit["target"]["track_id"] == "t3" and hit["target_rank"] == 0
    assert hit["context"] == {"hour": 8}
    miss = client.get("/listeners/u4").json()
    assert miss["target"]["track_id"] == "t29" and miss["target_rank"] is None
    assert client.get("/listeners/u1").json()["context"] is None  # hour -1 = unknown
    assert client.get("/listeners/nobody").status_code == 404


def test_listeners_duplicate_ids_and_user_context(tmp_path: Path) -> None:
    art = write_fake_artifact(tmp_path / "a", step=1, holdout=False)
    pd.DataFrame(
        {"query_id": ["x", "x", "y"], "history": [["t1"], ["t2"], ["t3"]], "target": ["t2"] * 3}
    ).to_parquet(art / "holdout.parquet")

    class UserModel(FakeRetriever):
        config = {"num_users": 5}  # a model with listener embeddings gets the listener id

    app = create_app(art, loader=lambda p: UserModel(1))
    c = TestClient(app)
    assert [x["id"] for x in c.get("/listeners").json()["listeners"]] == ["x", "x#2", "y"]
    body = c.get("/listeners/x%232").json()
    assert [t["track_id"] for t in body["history"]] == ["t2"]
    assert app.state.model.retriever.calls[-1]["context"] == {"user": "x"}


def test_listeners_absent_degrades(tmp_path: Path) -> None:
    art = write_fake_artifact(tmp_path / "a", step=1, holdout=False)
    c = TestClient(create_app(art, loader=fake_loader))
    body = c.get("/listeners").json()
    assert body["total"] == 0 and "no held-out listeners" in body["message"]
    r = c.get("/listeners/u0")
    assert r.status_code == 404 and "no held-out listeners" in r.json()["detail"]


def test_missing_artifact_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="artifact folder not found"):
        create_app(tmp_path / "nope", loader=fake_loader)


# -- review routes -----------------------------------------------------------------------------


def test_review_needs_reviews_file_and_holdout(tmp_path: Path, art: Path) -> None:
    other = write_fake_artifact(tmp_path / "o", step=-1, holdout=False)
    with pytest.raises(ValueError, match="--reviews"):
        create_app(art, other, None, loader=fake_loader)
    bare = write_fake_artifact(tmp_path / "b", step=1, holdout=False)
    with pytest.raises(ValueError, match="held-out"):
        create_app(bare, other, tmp_path / "r.sqlite", loader=fake_loader)


def test_review_lists_are_blind_and_stable(review_client: TestClient) -> None:
    items = review_client.get("/review/items").json()
    assert items["k"] == 4 and len(items["items"]) == 6
    sides = set()
    for it in items["items"]:
        body = review_client.get(f"/review/items/{it['id']}").json()
        assert set(body["lists"]) == {"A", "B"}
        assert "model" not in json.dumps(body["lists"]) and "score" not in json.dumps(body)
        hist_last = int(body["history"][-1]["track_id"][1:])
        a0 = int(body["lists"]["A"][0]["track_id"][1:])
        sides.add("base" if a0 == hist_last + 1 else "other")
        again = review_client.get(f"/review/items/{it['id']}").json()
        assert again["lists"] == body["lists"]  # the hidden assignment is stored, not redrawn
    assert sides == {"base", "other"}  # both orders occur across six items (seeded draw)


def test_review_rate_upserts_and_report(review_client: TestClient) -> None:
    item = review_client.get("/review/items").json()["items"][0]["id"]
    lists = review_client.get(f"/review/items/{item}").json()["lists"]
    for pos in range(4):
        r = review_client.post(
            "/review/rate",
            json={"reviewer": " ann ", "item": item, "list": "A", "position": pos, "rating": "wtf"},
        )
        assert r.status_code == 200, r.text
        review_client.post(
            "/review/rate",
            json={"reviewer": "ann", "item": item, "list": "B", "position": pos, "rating": "good"},
        )
    # re-rating replaces
    review_client.post(
        "/review/rate",
        json={"reviewer": "ann", "item": item, "list": "A", "position": 0, "rating": "okay"},
    )
    body = review_client.get(f"/review/items/{item}", params={"reviewer": "ann"}).json()
    assert body["ratings"]["A:0"] == "okay" and body["ratings"]["A:1"] == "wtf"
    assert (
        review_client.get("/review/items", params={"reviewer": "ann"}).json()["items"][0]["rated"]
        == 8
    )
    report = review_client.get("/review/report").json()
    assert report["ratings"] == 8 and report["reviewers"] == 1
    by_model = {m["model"]: m for m in report["models"]}
    assert sorted(m["wtf"] for m in by_model.values()) == [0, 3]
    (diff,) = report["paired"]
    assert diff["units"] == 1 and abs(diff["mean_diff"]) == pytest.approx(0.75)
    # the stored track is the one shown at that position
    store = review_client.app.state.panel.store
    row = [r for r in store.ratings() if r.list == "B" and r.position == 2][0]
    assert row.track_id == lists["B"][2]["track_id"]
    csv_text = review_client.get("/review/report.csv").text
    assert csv_text.splitlines()[0].startswith("kind,model,versus")
    assert len(review_client.get("/review/ratings.csv").text.splitlines()) == 9


@pytest.mark.parametrize(
    "body,status",
    [
        ({"reviewer": "", "item": "u0", "list": "A", "position": 0, "rating": "wtf"}, 422),
        ({"reviewer": "a", "item": "u0", "list": "C", "position": 0, "rating": "wtf"}, 422),
        ({"reviewer": "a", "item": "u0", "list": "A", "position": 0, "rating": "meh"}, 422),
        ({"reviewer": "a", "item": "u0", "list": "A", "position": 4, "rating": "wtf"}, 422),
        ({"reviewer": "a", "item": "nobody", "list": "A", "position": 0, "rating": "wtf"}, 404),
        ({"reviewer": "a", "item": "u0", "list": "A", "position": "0", "rating": "wtf"}, 422),
        ({"reviewer": "a", "item": "u0", "list": "A", "position": True, "rating": "wtf"}, 422),
        ({"reviewer": "a", "item": "u0", "list": "A", "position": 0.0, "rating": "wtf"}, 422),
        ({"reviewer": 5, "item": "u0", "list": "A", "position": 0, "rating": "wtf"}, 422),
        ({"reviewer": "   ", "item": "u0", "list": "A", "position": 0, "rating": "wtf"}, 422),
    ],
)
def test_review_rate_validation(review_client: TestClient, body: dict, status: int) -> None:
    assert review_client.post("/review/rate", json=body).status_code == status
    assert review_client.get("/review/report").json()["ratings"] == 0


@pytest.mark.parametrize(
    "name", ["a\x00b", "ann\n", "\tann", "an\x1b[31mn", "a\x7f", "a\x85", "\r"]
)
def test_reviewer_names_with_control_characters_are_422(
    review_client: TestClient, name: str
) -> None:
    body = {"reviewer": name, "item": "u0", "list": "A", "position": 0, "rating": "wtf"}
    r = review_client.post("/review/rate", json=body)
    assert r.status_code == 422, r.text
    assert "control character" in r.json()["message"] and "reviewer" in r.json()["message"]
    r = review_client.get("/review/items", params={"reviewer": name})
    assert r.status_code == 422 and "control character" in r.json()["message"]
    assert review_client.get("/review/report").json()["ratings"] == 0
    ok = {**body, "reviewer": "Zoë 🎧 O'Brien"}  # any printable name is fine
    assert review_client.post("/review/rate", json=ok).status_code == 200


# -- a real artifact (twotower.export.write_artifact + Retriever) --------------------------------

GOLDEN = Path(__file__).resolve().parent / "golden"


def _make_golden():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_real_artifacts(root: Path) -> dict:
    """Two real exports of planted models (4 clusters x 6 tracks) with held-out listeners.

    Listener ``L{c}`` played three tracks of cluster ``c`` and then a fourth one (a planted
    hit); ``M{c}`` played the same three and then a track of another cluster.
    """
    from twotower.export import write_artifact

    mg = _make_golden()
    out: dict = {}
    for name, seed in (("a", 0), ("b", 1)):
        parts = mg.planted_parts(seed=seed)
        cluster = parts.pop("cluster")
        ids = parts["vocab"]["tracks"]
        records = []
        for c in range(4):
            hist = [ids[6 * c + i] for i in range(3)]
            records.append(
                {
                    "query_id": f"L{c}",
                    "history": hist,
                    "target": ids[6 * c + 3],
                    "hour": -1,
                    "context_type": None,
                }
            )
            records.append(
                {
                    "query_id": f"M{c}",
                    "history": hist,
                    "target": ids[6 * ((c + 1) % 4) + 5],
                    "hour": 7,
                    "context_type": "radio",
                }
            )
        holdout = pd.DataFrame(records)
        path = write_artifact(root / name, index="Flat", holdout=holdout, **parts)
        out[name] = path
        out[f"{name}_vectors"] = parts["item_emb"]
        out["cluster"] = {t: int(c) for t, c in zip(ids, cluster, strict=True)}
    return out


@pytest.fixture(scope="session")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_real_artifacts(tmp_path_factory.mktemp("real"))


@pytest.fixture
def real_client(real: dict) -> TestClient:
    return TestClient(create_app(real["a"]))


def _numpy_top(vectors, history_rows: list[int], k: int, exclude: list[int]) -> list[str]:
    import numpy as np

    q = vectors[history_rows].mean(0)
    q = q / np.linalg.norm(q)
    scores = vectors @ q
    scores[exclude] = -np.inf
    return [f"g{r:02d}" for r in np.argsort(-scores, kind="stable")[:k]]


def test_real_artifact_recommend(real: dict, real_client: TestClient) -> None:
    from twotower.retrieve import Retriever

    body = {"history": ["g00", "g01"], "k": 5, "exclude_history": True}
    r = real_client.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    ids = [t["track_id"] for t in got["items"]]
    # an answer computed independently with numpy, and the planted structure
    assert ids == _numpy_top(real["a_vectors"], [0, 1], 5, exclude=[0, 1])
    assert {real["cluster"][t] for t in ids[:4]} == {0}
    assert got["items"][0]["artist"] == "Artist A"
    assert got["items"][0]["title"] == f"Golden track {int(ids[0][1:])}"
    ref = Retriever.load(real["a"]).recommend(["g00", "g01"], k=5, exclude="history")
    assert ids == ref.ids
    assert [t["score"] for t in got["items"]] == pytest.approx(ref.scores, abs=1e-6)
    # unknown ids are reported, the known ones still steer the query
    r = real_client.post("/recommend", json={"history": ["nope", "g06"], "k": 3})
    assert r.json()["unknown"] == ["nope"]
    assert {real["cluster"][t["track_id"]] for t in r.json()["items"]} == {1}
    r = real_client.post("/recommend", json={"history": ["nope"], "k": 3})
    assert r.status_code == 200 and r.json()["unknown"] == ["nope"]
    assert _ids(r) == ["g00", "g01", "g02"]  # the golden export's most played tracks
    assert r.json()["notes"] == ["no known track in history: popular tracks"]
    # context the model does not use is accepted and noted, not silently dropped
    r = real_client.post("/recommend", json={"history": ["g06"], "k": 3, "context": {"hour": 3}})
    assert r.status_code == 200 and "hour" in " ".join(r.json()["notes"])


def test_real_artifact_similar_search_health(real: dict, real_client: TestClient) -> None:
    r = real_client.get("/similar/g06", params={"k": 3})
    ids = [t["track_id"] for t in r.json()["items"]]
    assert ids == _numpy_top(real["a_vectors"], [6], 3, exclude=[6])
    assert {real["cluster"][t] for t in ids} == {1}
    assert real_client.get("/similar/nope").status_code == 404
    found = real_client.get("/tracks/search", params={"q": "artist b", "limit": 50}).json()
    assert sorted(t["track_id"] for t in found) == [f"g{i:02d}" for i in range(6, 12)]
    h = real_client.get("/healthz").json()
    assert h["format_version"] == "1.0" and h["catalogue_size"] == 24
    assert h["index"]["factory"] == "Flat" and h["index"]["ann_recall"] == 1.0
    assert h["created"] and h["heldout_listeners"] == 8


def test_real_artifact_listeners(real: dict, real_client: TestClient) -> None:
    from twotower.retrieve import Retriever

    ref = Retriever.load(real["a"])
    body = real_client.get("/listeners").json()
    assert body["total"] == 8 and body["listeners"][0]["id"] == "L0"
    for c in range(4):
        hit = real_client.get(f"/listeners/L{c}").json()
        rec = ref.recommend([t["track_id"] for t in hit["history"]], k=10)
        assert [t["track_id"] for t in hit["recommendations"]] == rec.ids
        assert hit["target"]["track_id"] in rec.ids  # the planted hit
        assert hit["target_rank"] == rec.ids.index(hit["target"]["track_id"])
        miss = real_client.get(f"/listeners/M{c}").json()
        assert miss["context"] == {"hour": 7, "context_type": "radio"}
        rank = miss["target_rank"]
        assert rank is None or miss["recommendations"][rank] == miss["target"]


def test_real_artifact_review_pair(real: dict, tmp_path: Path) -> None:
    from twotower.retrieve import Retriever

    app = create_app(real["a"], real["b"], tmp_path / "r.sqlite", review_k=5, review_sample=8)
    c = TestClient(app)
    panel = app.state.panel
    refs = {m.label: Retriever.load(m.path) for m in panel.models}
    shown_a = set()
    for it in c.get("/review/items").json()["items"]:
        body = c.get(f"/review/items/{it['id']}").json()
        side = panel.assignment(it["id"])
        shown_a.add(side["A"])
        hist = [t["track_id"] for t in body["history"]]
        for name in ("A", "B"):
            want = refs[side[name]].recommend(hist, k=5, exclude="history").ids
            assert [t["track_id"] for t in body["lists"][name]] == want
        c.post(
            "/review/rate",
            json={"reviewer": "r", "item": it["id"], "list": "A", "position": 0, "rating": "wtf"},
        )
    assert shown_a == {m.label for m in panel.models}  # both models appear as "A"
    rows = panel.store.ratings()
    assert len(rows) == 8
    assert all(r.model == panel.assignment(r.item)["A"] for r in rows)
    report = c.get("/review/report").json()
    assert sum(m["wtf"] for m in report["models"]) == 8


def test_real_artifact_corrupt_is_refused(real: dict, tmp_path: Path) -> None:
    import shutil

    from twotower.export import ArtifactError

    bad = tmp_path / "bad"
    shutil.copytree(real["a"], bad)
    data = bytearray((bad / "items.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "items.parquet").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="items.parquet"):
        create_app(bad)


def test_review_concurrent_http_ratings(tmp_path: Path, art: Path) -> None:
    import threading

    other = write_fake_artifact(tmp_path / "other", step=-1, holdout=False)
    app = create_app(art, other, tmp_path / "r.sqlite", loader=fake_loader, review_k=4)
    items = [it["id"] for it in TestClient(app).get("/review/items").json()["items"]]
    codes: list[int] = []

    def reviewer(name: str) -> None:
        c = TestClient(app)
        for item in items:
            for lst in ("A", "B"):
                for pos in range(4):
                    for rating in ("okay", "wtf"):  # the second replaces the first
                        body = {"reviewer": name, "item": item, "list": lst, "position": pos,
                                "rating": rating}  # fmt: skip
                        codes.append(c.post("/review/rate", json=body).status_code)

    threads = [threading.Thread(target=reviewer, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(codes) == {200} and len(codes) == 4 * len(items) * 16
    rows = app.state.panel.store.ratings()
    assert len(rows) == 4 * len(items) * 8 and {r.rating for r in rows} == {"wtf"}


# -- dynamic batching --------------------------------------------------------------------------


def test_batcher_answers_each_job_its_own_result_and_batches_under_concurrency() -> None:
    import asyncio
    import time

    from twotower.serve.batcher import Batcher

    calls: list[list[int]] = []

    def square(jobs: list[int]) -> list[int]:
        calls.append(list(jobs))
        time.sleep(0.005)  # a forward pass: the others queue meanwhile
        return [j * j for j in jobs]

    b = Batcher(square, window_s=0.002, max_batch=16)

    async def main() -> list[int]:
        return await asyncio.gather(*(b.submit(j) for j in range(100)))

    assert asyncio.run(main()) == [j * j for j in range(100)]
    assert sorted(j for c in calls for j in c) == list(range(100))  # each job exactly once
    assert len(calls) < 20 and max(len(c) for c in calls) == 16  # batches formed, capped
    assert b.stats.jobs == 100 and b.stats.batches == len(calls) and b.stats.largest == 16
    b.close()


def test_batcher_lone_request_does_not_wait_for_the_window() -> None:
    import asyncio
    import time

    from twotower.serve.batcher import Batcher

    b = Batcher(lambda jobs: jobs, window_s=0.2, max_batch=64)  # a window far above a request

    async def one_by_one() -> list[float]:
        out = []
        for j in range(20):
            t0 = time.perf_counter()
            assert await b.submit(j) == j
            out.append(time.perf_counter() - t0)
        return out

    waits = asyncio.run(one_by_one())
    assert sorted(waits)[len(waits) // 2] < 0.05, waits  # median far below the 200 ms window
    assert b.stats.largest == 1
    b.close()


def test_batcher_error_in_one_job_leaves_the_others_their_answers() -> None:
    import asyncio

    from twotower.serve.batcher import Batcher

    def run(jobs: list[int]) -> list[int]:
        if 13 in jobs:
            raise ValueError("13 is refused")
        return [-j for j in jobs]

    b = Batcher(run, window_s=0.001, max_batch=64)

    async def main() -> list:
        return await asyncio.gather(*(b.submit(j) for j in range(30)), return_exceptions=True)

    out = asyncio.run(main())
    assert isinstance(out[13], ValueError) and "13" in str(out[13])
    assert [o for i, o in enumerate(out) if i != 13] == [-j for j in range(30) if j != 13]
    b.close()
    assert asyncio.run(b.submit(1)) == -1  # an app started again keeps batching
    b.close()


async def _concurrent_posts(app, bodies: list[dict]) -> list:
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        import asyncio

        return await asyncio.gather(*(http.post("/recommend", json=b) for b in bodies))


def _bodies(n: int, prefix: str, n_tracks: int) -> list[dict]:
    import random

    rng = random.Random(0)
    return [
        {
            "history": [f"{prefix}{rng.randrange(n_tracks):02d}" for _ in range(rng.randint(1, 6))],
            "k": rng.choice([1, 3, 5, 10]),
            "exclude_history": rng.random() < 0.5,
        }
        for _ in range(n)
    ]


def test_batched_http_answers_equal_unbatched_with_fewer_forwards(real: dict) -> None:
    import asyncio

    from twotower.retrieve import Retriever

    app = create_app(real["a"], batch_window_ms=2, max_batch=64)
    retriever = app.state.model.retriever
    forwards: list[int] = []
    retriever.query_tower.register_forward_hook(
        lambda m, args, kwargs_or_out, *rest: forwards.append(1)
    )
    bodies = _bodies(48, "g", 24)  # mixed exclusion: per-query exclude lists
    same = [{**b, "exclude_history": True} for b in _bodies(16, "g", 24)]  # one rule for all
    responses = asyncio.run(_concurrent_posts(app, bodies))
    responses += asyncio.run(_concurrent_posts(app, same))
    bodies += same
    ref = Retriever.load(real["a"])
    for body, r in zip(bodies, responses, strict=True):
        assert r.status_code == 200, r.text
        want = ref.recommend(
            body["history"], k=body["k"], exclude="history" if body["exclude_history"] else None
        )
        got = r.json()["items"]
        assert [t["track_id"] for t in got] == want.ids
        assert [t["score"] for t in got] == pytest.approx(want.scores, abs=1e-5)
    stats = app.state.batcher.stats
    assert stats.jobs == 64 and stats.largest > 1  # batches formed under concurrency
    assert len(forwards) == stats.batches < 64  # one query-tower forward per batch
    assert stats.failed_batches == 0
    app.state.batcher.close()


def test_batched_http_one_failing_request_does_not_break_the_others(art: Path) -> None:
    import asyncio

    app = create_app(art, loader=lambda p: PoisonRetriever(1), batch_window_ms=2, max_batch=64)
    bodies = [{"history": [f"t{i}"], "k": 2} for i in range(20)]
    responses = asyncio.run(_concurrent_posts(app, bodies))
    for i, r in enumerate(responses):
        if i == 13:
            assert r.status_code == 422 and POISON in r.json()["detail"]
        else:
            assert r.status_code == 200, r.text
            assert [t["track_id"] for t in r.json()["items"]][0] == f"t{i + 1}"
    fake = app.state.model.retriever
    assert max(fake.batch_calls) > 1  # the poison sat in a batch, which was then retried alone
    stats = app.state.batcher.stats
    assert stats.failed_batches == 1 and stats.largest > 1
    app.state.batcher.close()


def test_batching_off_answers_in_the_thread_pool(art: Path) -> None:
    app = create_app(art, loader=fake_loader, max_batch=1)
    c = TestClient(app)
    r = c.post("/recommend", json={"history": ["t3"], "k": 2, "exclude_history": True})
    assert [t["track_id"] for t in r.json()["items"]] == ["t4", "t5"]
    assert app.state.batcher is None and c.get("/healthz").json()["batching"] is None
    assert app.state.model.retriever.batch_calls == []


def test_workers_app_factory_reads_its_options(art: Path, monkeypatch) -> None:
    from twotower.serve import app as app_module

    monkeypatch.setenv(
        app_module.ENV_CONFIG,
        json.dumps({"artifacts": str(art), "batch_window_ms": 0.5, "max_batch": 8}),
    )
    monkeypatch.setattr(app_module, "load_model", lambda p, loader=None: _load_fake(p))
    app = app_module.app_from_env()
    assert TestClient(app).get("/healthz").json()["batching"] == {"window_ms": 0.5, "max_batch": 8}
    monkeypatch.delenv(app_module.ENV_CONFIG)
    with pytest.raises(RuntimeError, match="TWOTOWER_SERVE_CONFIG"):
        app_module.app_from_env()


def _load_fake(path):
    from twotower.serve.catalogue import load_model

    return load_model(path, fake_loader)


def test_serve_cli_flags() -> None:
    from twotower.cli import build_parser

    args = build_parser().parse_args(
        [
            "serve",
            "--artifacts",
            "x",
            "--batch-window-ms",
            "2",
            "--max-batch",
            "32",
            "--workers",
            "3",
        ]
    )
    assert (args.batch_window_ms, args.max_batch, args.workers) == (2.0, 32, 3)
    args = build_parser().parse_args(["serve", "--artifacts", "x"])
    assert (args.batch_window_ms, args.max_batch, args.workers) == (2.0, 64, 1)


def test_real_artifact_unreadable_index_names_the_file(real: dict, tmp_path: Path) -> None:
    import hashlib
    import shutil

    from twotower.export import ArtifactError
    from twotower.retrieve import Retriever

    bad = tmp_path / "bad"
    shutil.copytree(real["a"], bad)
    junk = b"not a faiss index" * 10
    (bad / "index.faiss").write_bytes(junk)
    with pytest.raises(ArtifactError, match="index.faiss"):  # the checksum catches it first
        create_app(bad)
    manifest = json.loads((bad / "manifest.json").read_text())  # a consistent manifest
    manifest["files"]["index.faiss"] = {
        "bytes": len(junk),
        "sha256": hashlib.sha256(junk).hexdigest(),
    }
    (bad / "manifest.json").write_text(json.dumps(manifest))
    for load in (lambda: create_app(bad), lambda: Retriever.load(bad, verify=False)):
        with pytest.raises(ArtifactError) as info:
            load()
        msg = str(info.value)
        assert "index.faiss" in msg and "unreadable FAISS index" in msg
        assert "manifest" not in msg
