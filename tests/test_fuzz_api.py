"""Fuzzing the HTTP API: bad input gets a 4xx, never a 500 or a hang.

A real service (``create_app`` over two tiny exports with held-out listeners, so the review
panel is on) receives hypothesis-generated requests: random JSON bodies (and raw bytes) for
every POST, random path and query values for every GET, random methods on every route, and
well-formed requests whose answers are checked. Strings come from ``TEXT``, which mixes
ordinary text with lone surrogates (sent as JSON escapes such as ``\\ud800``), control
characters and NUL; ``test_fuzz_every_string_field`` puts such strings into every string field
of every endpoint (JSON bodies, paths and queries, the latter as invalid UTF-8
percent-escapes). Each request must finish within ``MAX_SECONDS`` and every JSON answer must be
valid UTF-8. ``test_keep_alive_survives_bad_requests`` drives a real uvicorn on 127.0.0.1 over
one keep-alive connection. When ``schemathesis`` is installed it also generates requests from
the service's OpenAPI schema. Every test prints how many requests it sent; the budget (about
900 requests) keeps the module around 30 s on two cores.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from twotower.export import write_artifact  # noqa: E402
from twotower.serve.app import create_app  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden"
MAX_SECONDS = 5.0
KNOWN = [f"g{i:02d}" for i in range(24)]
LISTENERS = ["L0", "L1", "M0"]
ALLOWED = {200, *range(400, 500)}  # any 4xx for bad input; never 5xx
FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    sys.path.insert(0, str(GOLDEN))
    from make_golden import planted_parts

    root = tmp_path_factory.mktemp("fuzz")
    paths = []
    for name, seed in (("a", 0), ("b", 1)):
        parts = planted_parts(seed=seed)
        parts.pop("cluster")
        holdout = pd.DataFrame(
            {
                "query_id": LISTENERS,
                "history": [KNOWN[:3], KNOWN[6:9], KNOWN[:3]],
                "target": [KNOWN[3], KNOWN[9], KNOWN[23]],
                "hour": [-1, 5, 7],
                "context_type": [None, "radio", "radio"],
            }
        )
        paths.append(write_artifact(root / name, index="Flat", holdout=holdout, **parts))
    app = create_app(paths[0], paths[1], root / "reviews.sqlite", review_sample=3, review_k=5)
    return TestClient(app, raise_server_exceptions=False)


class Tally:
    """Statuses of the requests sent by one test (printed at the end)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.statuses: Counter[int] = Counter()
        self.slowest = 0.0

    def send(self, client: TestClient, method: str, url: str, **kwargs) -> object:
        t0 = time.perf_counter()
        r = client.request(method, url, **kwargs)
        seconds = time.perf_counter() - t0
        self.slowest = max(self.slowest, seconds)
        self.statuses[r.status_code] += 1
        assert seconds < MAX_SECONDS, f"{method} {url} took {seconds:.1f}s"
        assert r.status_code < 500, f"{method} {url} {kwargs} -> {r.status_code}: {r.text[:300]}"
        assert r.status_code in ALLOWED, f"{method} {url} -> {r.status_code}: {r.text[:300]}"
        if method != "HEAD" and r.headers.get("content-type", "").startswith("application/json"):
            json.loads(r.content.decode("utf-8"))  # the answer is valid UTF-8 JSON
        return r

    def report(self, minimum: int) -> None:
        n = sum(self.statuses.values())
        print(
            f"\n{self.name}: {n} requests, statuses {dict(sorted(self.statuses.items()))}, "
            f"slowest {self.slowest * 1000:.0f} ms"
        )
        assert n >= minimum, f"only {n} fuzz requests ran"


JSON_HEADERS = {"content-type": "application/json"}


#: characters that broke or could break a service: lone surrogates (JSON escapes of them are
#: valid JSON), NUL and other controls, separators, BOM, bidi override, a non-BMP emoji
NASTY = ["\ud800", "\udfff", "\udbff", "\x00", "\x1b", "\x7f", "\x85", "\n", "\t", "\u2028",
         "\ufeff", "\u202e", "\U0001f3a7", "\\", '"', "é"]  # fmt: skip


def TEXT(max_size: int = 20, min_size: int = 0) -> st.SearchStrategy[str]:  # noqa: N802
    """Strings: ordinary ones, and ones made of (or salted with) ``NASTY`` characters."""
    chars = st.sampled_from(NASTY) | st.characters(exclude_categories=())
    return st.text(max_size=max_size, min_size=min_size) | st.text(
        chars, min_size=max(1, min_size), max_size=max(1, min(max_size, 12))
    )


def _dumps(body: object) -> bytes:
    """JSON as a careless client sends it (NaN and Infinity literals included)."""
    return json.dumps(body, allow_nan=True).encode()


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT(20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
TRACK = st.sampled_from(KNOWN) | TEXT(300) | JSON
CONTEXT = (
    st.fixed_dictionaries(
        {},
        optional={
            "hour": st.integers(-5, 30) | JSON,
            "context_type": st.sampled_from(["radio", "charts"]) | TEXT(80) | JSON,
            "user": TEXT(300) | JSON,
            "extra": JSON,
        },
    )
    | JSON
)
RECOMMEND_BODY = (
    st.fixed_dictionaries(  # nearly valid: known and unknown ids, k around its limits
        {
            "history": st.lists(st.sampled_from([*KNOWN, "nope", ""]), max_size=8),
            "k": st.integers(-1, 202),
        },
        optional={"exclude_history": st.booleans(), "context": CONTEXT},
    )
    | st.fixed_dictionaries(
        {},
        optional={
            "history": st.lists(TRACK, max_size=10) | JSON,
            "k": st.integers(-10, 10**12) | JSON,
            "context": CONTEXT,
            "exclude_history": st.booleans() | st.none() | JSON,
            "surprise": JSON,
        },
    )
    | JSON
)
RATE_BODY = (
    st.fixed_dictionaries(  # nearly valid: every field present, some values out of range
        {
            "reviewer": TEXT(10, min_size=1),
            "item": st.sampled_from([*LISTENERS, "nobody"]),
            "list": st.sampled_from(["A", "B", "C"]),
            "position": st.integers(-1, 8),
            "rating": st.sampled_from(["good", "okay", "wtf", "meh"]),
        }
    )
    | st.fixed_dictionaries(
        {},
        optional={
            "reviewer": TEXT(80) | JSON,
            "item": st.sampled_from(LISTENERS) | TEXT(300) | JSON,
            "list": st.sampled_from(["A", "B"]) | JSON,
            "position": st.integers(-3, 300) | JSON,
            "rating": st.sampled_from(["good", "okay", "wtf"]) | JSON,
        },
    )
    | JSON
)
SEGMENT = st.sampled_from(KNOWN + LISTENERS) | TEXT(300, min_size=1)
QUERY = st.dictionaries(
    st.sampled_from(["k", "q", "limit", "offset", "reviewer", "x"]),
    TEXT(40) | st.integers(-(10**20), 10**20).map(str),
    max_size=4,
)


def _quote(text: str) -> str:
    """Percent-escape any string, lone surrogates included (as the invalid UTF-8 they'd be)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def _url(route: str, segment: str, query: dict[str, str]) -> str:
    url = route.format(_quote(segment))
    if query:
        url += "?" + "&".join(f"{_quote(k)}={_quote(v)}" for k, v in query.items())
    return url


@FUZZ
@given(body=RECOMMEND_BODY)
def test_fuzz_recommend_bodies(client, body) -> None:
    tally = _tally("POST /recommend (JSON)")
    tally.send(client, "POST", "/recommend", content=_dumps(body), headers=JSON_HEADERS)


@FUZZ
@given(raw=st.binary(max_size=400), ctype=st.sampled_from(["application/json", "text/plain", ""]))
def test_fuzz_recommend_raw_bytes(client, raw, ctype) -> None:
    tally = _tally("POST /recommend (bytes)")
    headers = {"content-type": ctype} if ctype else {}
    tally.send(client, "POST", "/recommend", content=raw, headers=headers)


@FUZZ
@given(body=RATE_BODY)
def test_fuzz_review_rate(client, body) -> None:
    _tally("POST /review/rate").send(
        client, "POST", "/review/rate", content=_dumps(body), headers=JSON_HEADERS
    )


@FUZZ
@given(
    route=st.sampled_from(
        [
            "/similar/{}",
            "/listeners/{}",
            "/review/items/{}",
            "/tracks/search",
            "/listeners",
            "/review/items",
            "/healthz",
            "/metrics",
            "/review/report",
            "/review/report.csv",
            "/review/ratings.csv",
            "/{}",
            "/static/{}",
        ]
    ),
    segment=SEGMENT,
    query=QUERY,
    method=st.sampled_from(["GET", "GET", "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
)
def test_fuzz_paths_queries_methods(client, route, segment, query, method) -> None:
    _tally("paths/queries/methods").send(client, method, _url(route, segment, query))


VALID_RECOMMEND = {"history": ["g00", "g01"], "k": 3, "context": {"context_type": "radio"}}
VALID_RATE = {"reviewer": "ann", "item": "L0", "list": "A", "position": 0, "rating": "okay"}
#: every string field of every JSON body: (url, valid body, path to the field)
BODY_FIELDS = [
    ("/recommend", VALID_RECOMMEND, ("history", 0)),
    ("/recommend", VALID_RECOMMEND, ("history", 1)),
    ("/recommend", VALID_RECOMMEND, ("context", "context_type")),
    ("/recommend", VALID_RECOMMEND, ("context", "user")),
    ("/review/rate", VALID_RATE, ("reviewer",)),
    ("/review/rate", VALID_RATE, ("item",)),
    ("/review/rate", VALID_RATE, ("list",)),
    ("/review/rate", VALID_RATE, ("rating",)),
]
#: every string parameter of every GET: (route with {} for the segment, fixed query, name)
QUERY_FIELDS = [
    ("/similar/{}", {}, None),
    ("/listeners/{}", {}, None),
    ("/review/items/{}", {}, None),
    ("/review/items/{}", {"reviewer": "ann"}, None),
    ("/tracks/search", {}, "q"),
    ("/review/items", {}, "reviewer"),
    ("/review/items/L0", {}, "reviewer"),
]


def _with(body: dict, path: tuple, value: object) -> dict:
    out = json.loads(json.dumps(body))
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@FUZZ
@given(
    where=st.sampled_from(BODY_FIELDS + QUERY_FIELDS),
    text=TEXT(40, min_size=1),
)
def test_fuzz_every_string_field(client, where, text) -> None:
    tally = _tally("every string field")
    if where[0] in ("/recommend", "/review/rate"):
        url, body, path = where
        r = tally.send(
            client, "POST", url, content=_dumps(_with(body, path, text)), headers=JSON_HEADERS
        )
        bad_unicode = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        control = path == ("reviewer",) and any(c < " " or "\x7f" <= c <= "\x9f" for c in text)
        if bad_unicode or control:
            assert r.status_code == 422, (url, path, repr(text), r.text[:300])
        if r.status_code == 422:
            assert r.json()["message"], r.text  # a readable one-line reason
    else:
        route, query, name = where
        query = dict(query)
        if name is None:
            segment = text
        else:
            segment, query[name] = "", text
        tally.send(client, "GET", _url(route, segment or "x", query))


@FUZZ
@given(
    history=st.lists(st.sampled_from(KNOWN), min_size=1, max_size=12),
    k=st.integers(1, 200),
    exclude=st.booleans(),
    hour=st.none() | st.integers(0, 23),
)
def test_fuzz_valid_recommend_requests_succeed(client, history, k, exclude, hour) -> None:
    body = {"history": history, "k": k, "exclude_history": exclude}
    if hour is not None:
        body["context"] = {"hour": hour, "context_type": "radio"}
    r = _tally("POST /recommend (valid)").send(client, "POST", "/recommend", json=body)
    assert r.status_code == 200, r.text
    ids = [t["track_id"] for t in r.json()["items"]]
    expected = min(k, 24 - (len(set(history)) if exclude else 0))
    assert len(ids) == expected and len(set(ids)) == len(ids)
    if exclude:
        assert not set(ids) & set(history)


def test_oversized_body_is_413(client) -> None:
    r = _tally("oversized").send(
        client,
        "POST",
        "/recommend",
        content=b"[" + b"1," * 40_000 + b"1]",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413


# ------------------------------------------------------------------------------ schemathesis
try:
    import schemathesis
except ImportError:  # optional: pip install schemathesis
    schemathesis = None

if schemathesis is not None:

    @pytest.fixture(scope="module")
    def api_schema(client):
        return schemathesis.openapi.from_asgi("/openapi.json", client.app)

    schema = schemathesis.pytest.from_fixture("api_schema")

    @schema.parametrize()
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    def test_schemathesis_openapi_no_server_errors(case) -> None:
        t0 = time.perf_counter()
        response = case.call()
        tally = _tally("schemathesis")
        tally.statuses[response.status_code] += 1
        tally.slowest = max(tally.slowest, time.perf_counter() - t0)
        assert time.perf_counter() - t0 < MAX_SECONDS
        assert response.status_code < 500, (case.method, case.path, response.text[:300])

else:

    def test_schemathesis_openapi_no_server_errors() -> None:
        pytest.skip("schemathesis is not installed (optional; hypothesis fuzzing above ran)")


_TALLIES: dict[str, Tally] = {}


def _tally(name: str) -> Tally:
    return _TALLIES.setdefault(name, Tally(name))


def test_zz_fuzz_budget_report() -> None:
    """Print (and check) how many requests the fuzz tests above sent (runs last in the file)."""
    if len(_TALLIES) < 6:
        pytest.skip("run with the whole module to count the fuzz cases")
    total = 0
    for tally in _TALLIES.values():
        tally.report(minimum=1)
        total += sum(tally.statuses.values())
    print(
        f"fuzz total: {total} requests, no 5xx, slowest "
        f"{max(t.slowest for t in _TALLIES.values()) * 1000:.0f} ms"
    )
    assert total >= 300


# ------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def live_url(client):
    """The fuzzed app under a real uvicorn on 127.0.0.1 (a free port), in a thread."""
    import socket
    import threading

    uvicorn = pytest.importorskip("uvicorn")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(client.app, log_level="warning", lifespan="off", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_keep_alive_survives_bad_requests(live_url) -> None:
    """Bad bodies (lone surrogates, NUL, strict types) get 422 and the connection lives on."""
    import httpx

    bad = [
        b'{"history": ["\\ud800"], "k": 3}',
        b'{"history": ["g00"], "k": 3, "context": {"context_type": "\\udfff"}}',
        b'{"history": ["g00"], "k": 3, "context": {"user": "a\\u0000b"}, "x": "\\ud800"}',
        b'{"history": ["g00"], "k": true}',
        b'{"history": ["g00"], "k": 3, "context": {"hour": "9"}}',
        b'{"history": ["g00"], "k": ',
    ]
    rate = b'{"reviewer": "a\\u0000b", "item": "L0", "list": "A", "position": 0, "rating": "wtf"}'
    ports = set()
    with httpx.Client(base_url=live_url, timeout=10) as http:
        for body in [*bad, rate]:
            url = "/review/rate" if body is rate else "/recommend"
            r = http.post(url, content=body, headers=JSON_HEADERS)
            assert r.status_code == 422, (body, r.status_code, r.text[:300])
            assert r.json()["message"]
            ports.add(r.extensions["network_stream"].get_extra_info("client_addr")[1])
            ok = http.post("/recommend", json={"history": ["g00"], "k": 2})
            assert ok.status_code == 200 and len(ok.json()["items"]) == 2
            ports.add(ok.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert len(ports) == 1, f"the keep-alive connection was replaced: local ports {ports}"
