r"""HTTP service: recommendations, similar tracks, search, listeners, metrics, review panel.

``create_app`` builds the FastAPI application from an artifact folder (and optionally a second
one for the side-by-side review panel); ``serve_main`` runs it with uvicorn for ``twotower
serve``. No endpoint takes a file path from the request: every file is fixed at start-up.

Unknown track ids in a history are listed in ``unknown``. Cold start is one documented answer:
an empty history, or one without any known id, gets 200 with the most played tracks of
training and a note saying why (``"empty history: popular tracks"``, ``"no known track in
history: popular tracks"``); an export without play counts answers the model's default list
and says so instead.

Input is strict: JSON numbers and booleans are not taken from strings or from each other
(``"k": true`` and ``"hour": "9"`` are 422), every string must be valid Unicode (a lone
surrogate escape such as ``"\ud800"`` is 422, naming the field), and reviewer names must not
hold control characters. Every 422 carries FastAPI's ``detail`` list and a one-line
``message``.

Concurrent ``POST /recommend`` requests are combined by a :class:`~twotower.serve.batcher.
Batcher` into one ``Retriever.recommend_batch`` call (one query-tower forward, one index
search); a request alone is answered at once (see that module for when batches flush).
``twotower serve --workers N`` runs N processes (uvicorn workers over :func:`app_from_env`).

**Per-play signals.** A history entry is a track id or a play ``{"track": id, "ts": unix
seconds, "skipped": bool}`` (``ts`` and ``skipped`` optional; the two forms mix), and the
request may say when it is made (``at``, unix seconds). Play times must be oldest first and
``at`` no earlier than the last play (else 422, naming the field). A model trained with play
signals reads them (and a model trained with the play clock the hour of day and weekday, UTC,
of each play's ``ts``); without times every gap and clock is unknown and ``at`` defaults to the
server's clock when some play has a time (see :mod:`twotower.retrieve`); a plain id is a play
that was not skipped. A model without play signals answers as if only the ids were sent, with
a note.

Tracks of the history are left out of the answer when the request says ``exclude_history``;
without it the artifact decides (``filter_seen`` of the run's data config, as in evaluation),
which is also what the listener view uses, so its hits match the evaluation protocol. The demo
page and the review panel always leave the history out.

FastAPI's Swagger UI loads from a CDN, so ``/docs`` is a small offline page rendered from
``/openapi.json`` instead. ``/review/report`` reveals which model is which: share it after
reviewing, not with reviewers.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import ipaddress
import json
import math
import os
import random
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from twotower.retrieve import NO_SIGNALS_NOTE
from twotower.serve.batcher import Batcher
from twotower.serve.catalogue import (
    HOLDOUT_FILE,
    Holdout,
    LoadedModel,
    RetrieverLike,
    ScoredTrack,
    Track,
    load_model,
)
from twotower.serve.metrics import Metrics, ServiceMiddleware
from twotower.serve.reviews import RATINGS, ReviewStore, build_report, check_reviewer, ratings_csv

STATIC = Path(__file__).parent / "static"
MAX_K = 200
MAX_HISTORY = 500
MAX_BODY_BYTES = 64 * 1024
MAX_SEARCH = 50
MAX_TS = 2**40  # unix seconds: anything later is a unit mistake (milliseconds), not a time
BATCH_WINDOW_MS = 2.0
MAX_BATCH = 64
ENV_CONFIG = "TWOTOWER_SERVE_CONFIG"


def _valid_unicode(value: str) -> str:
    r"""Refuse lone UTF-16 surrogates (JSON ``"\ud800"``): not text, and no UTF-8 for them."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"lone surrogate U+{ord(value[e.start]):04X} at position {e.start}: "
                "not valid Unicode (send the character itself or a surrogate pair)"
            ) from None
    return value


def _valid_reviewer(value: str | None) -> str | None:
    return None if value is None else check_reviewer(value)


Text = Annotated[str, AfterValidator(_valid_unicode)]
TrackId = Annotated[
    str, StringConstraints(min_length=1, max_length=256), AfterValidator(_valid_unicode)
]
Reviewer = Annotated[str, StringConstraints(max_length=64), AfterValidator(check_reviewer)]


# -- request / response models -------------------------------------------------------------------


class Context(BaseModel):
    """Optional listening context of the request."""

    model_config = ConfigDict(extra="forbid", strict=True)
    hour: int | None = Field(None, ge=0, le=23, description="hour of day, 0-23 (a JSON integer)")
    context_type: Text | None = Field(
        None, max_length=64, description="e.g. radio, editorial_playlist"
    )
    user: Text | None = Field(
        None, max_length=256, description="listener id, for models with user embeddings"
    )


class Play(BaseModel):
    """One play of the history with its per-play signals."""

    model_config = ConfigDict(extra="forbid", strict=True)
    track: TrackId = Field(..., description="track id")
    ts: int | None = Field(
        None,
        ge=0,
        le=MAX_TS,
        description="when it was played, unix seconds (a JSON integer); also gives the play's "
        "hour of day and weekday (UTC) to a model that reads them",
    )
    skipped: bool | None = Field(None, description="the listener skipped it (default false)")


def _entry_kind(value: Any) -> str:
    """Which form a history entry takes: an object is a play, anything else an id."""
    return "play" if isinstance(value, dict | Play) else "id"


HistoryEntry = Annotated[
    Annotated[TrackId, Tag("id")] | Annotated[Play, Tag("play")],
    Discriminator(_entry_kind),
]


class RecommendRequest(BaseModel):
    """Body of ``POST /recommend`` (strict: no strings for numbers, no booleans for integers)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    history: list[HistoryEntry] = Field(
        ...,
        max_length=MAX_HISTORY,
        description="oldest first: track ids, or plays {track, ts, skipped} (ts and skipped "
        "optional; forms may mix); empty or all unknown: popular tracks and a note",
    )
    at: int | None = Field(
        None,
        ge=0,
        le=MAX_TS,
        description="when the request is made, unix seconds; null: now when a play has a time",
    )
    k: int = Field(10, ge=1, le=MAX_K, description="a JSON integer")
    context: Context | None = None
    exclude_history: bool | None = Field(
        None,
        description="never recommend a track of the history; null: the artifact's choice "
        "(its data config's filter_seen, as in evaluation)",
    )

    @field_validator("history")
    @classmethod
    def _oldest_first(cls, history: list[str | Play]) -> list[str | Play]:
        last: tuple[int, int] | None = None  # (position, time) of the latest timed play
        for i, entry in enumerate(history):
            ts = entry.ts if isinstance(entry, Play) else None
            if ts is None:
                continue
            if last is not None and ts < last[1]:
                raise ValueError(
                    f"history.{i}.ts ({ts}) is earlier than history.{last[0]}.ts ({last[1]}): "
                    "plays must be oldest first"
                )
            last = (i, ts)
        return history

    @model_validator(mode="after")
    def _at_after_last_play(self) -> RecommendRequest:
        times = self.timestamps()
        if self.at is not None and times and times[-1] is not None and self.at < times[-1]:
            raise ValueError(
                f"at ({self.at}) is earlier than the last play, history.{len(times) - 1}.ts "
                f"({times[-1]})"
            )
        return self

    def track_ids(self) -> list[str]:
        """The history's track ids, oldest first."""
        return [e.track if isinstance(e, Play) else e for e in self.history]

    def timestamps(self) -> list[int | None] | None:
        """Play time per history entry (None where unknown), or None when no play has one."""
        ts = [e.ts if isinstance(e, Play) else None for e in self.history]
        return ts if any(t is not None for t in ts) else None

    def skipped(self) -> list[bool] | None:
        """Skipped mark per history entry, or None when none is marked."""
        marks = [bool(e.skipped) if isinstance(e, Play) else False for e in self.history]
        return marks if any(marks) else None


class RecommendResponse(BaseModel):
    """Answer of ``POST /recommend`` and ``GET /similar/{track_id}``."""

    items: list[ScoredTrack]
    unknown: list[str] = Field(default_factory=list, description="history ids not in vocabulary")
    notes: list[str] = Field(
        default_factory=list,
        description="inputs the model could not use (context, user), and why a cold-start "
        "answer is the popular tracks",
    )


class RateRequest(BaseModel):
    """Body of ``POST /review/rate``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    reviewer: Reviewer = Field(..., description="no control characters; surrounding spaces dropped")
    item: TrackId
    list: Literal["A", "B"]
    position: int = Field(..., ge=0, le=MAX_K)
    rating: Literal["good", "okay", "wtf"]


# -- artifact side -------------------------------------------------------------------------------


# -- helpers ------------------------------------------------------------------


def _field(rec: Any, name: str) -> Any:
    if isinstance(rec, dict):
        return rec.get(name)
    return getattr(rec, name, None)


def _as_response(rec: Any, k: int | None = None) -> RecommendResponse:
    """Turn a Retriever result (object or mapping) into the response model (its first ``k``)."""
    ids = list(_field(rec, "ids") or [])
    titles = list(_field(rec, "titles") or [""] * len(ids))
    artists = list(_field(rec, "artists") or [""] * len(ids))
    scores = list(_field(rec, "scores") if _field(rec, "scores") is not None else [])
    items = [
        ScoredTrack(track_id=str(i), title=_s(t), artist=_s(a), score=float(s))
        for i, t, a, s in zip(ids, titles, artists, scores, strict=True)
    ][:k]
    return RecommendResponse(
        items=items,
        unknown=[str(u) for u in _field(rec, "unknown") or []],
        notes=[str(n) for n in _field(rec, "notes") or []],
    )


def _s(x: Any) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else str(x)


# -- the application -----------------------------------------------------------------------------


@dataclass
class ReviewPanel:
    """State of the side-by-side review: two models, a fixed sample, the store."""

    models: tuple[LoadedModel, LoadedModel]
    store: ReviewStore
    items: list[str]
    holdout: Holdout
    k: int

    def __post_init__(self) -> None:
        self._lists: dict[tuple[str, str], list[ScoredTrack]] = {}
        self._lock = threading.Lock()
        self._by_label = {m.label: m for m in self.models}

    def assignment(self, item: str) -> dict[str, str]:
        """Hidden model label behind each list of an item."""
        return self.store.assignment(item, self.models[0].label, self.models[1].label)

    def recs(self, label: str, item: str) -> list[ScoredTrack]:
        """The list model ``label`` shows for ``item`` (cached; retrievers are deterministic)."""
        key = (label, item)
        with self._lock:
            if key in self._lists:
                return self._lists[key]
        row = self.holdout.get(item)
        assert row is not None
        model = self._by_label[label]
        hist = self.holdout.histories[row][-MAX_HISTORY:]
        ctx = self.holdout.contexts[row]
        if model.holdout is self.holdout:
            ctx = model.listener_context(row)
        rec = _recommend(model, hist, self.k, True, ctx)
        with self._lock:
            self._lists[key] = rec.items
        return rec.items


@dataclass(frozen=True)
class RecommendJob:
    """One ``/recommend`` query with a known track in its history (what the batcher combines).

    Attributes:
        history: Track ids, oldest first.
        k: Recommendations wanted.
        exclude: Leave the history's tracks out (already resolved from the artifact default).
        context: Context dict for the retriever, or None.
        timestamps: Play time per history track (None where unknown), or None: no times.
        skipped: Skipped mark per history track, or None: none marked.
        at: Request time (unix seconds), or None: the retriever's default.
    """

    history: list[str]
    k: int
    exclude: bool
    context: dict | None
    timestamps: list[int | None] | None = None
    skipped: list[bool] | None = None
    at: int | None = None

    @property
    def has_signals(self) -> bool:
        """Whether the job carries any per-play signal or a request time."""
        return any(v is not None for v in (self.timestamps, self.skipped, self.at))


def _cold_start(
    model: LoadedModel, history: list[str], k: int, context: dict | None
) -> RecommendResponse:
    """The answer to a history without any known track: popular tracks and a note why."""
    reason = "empty history" if not history else "no known track in history"
    unknown = list(dict.fromkeys(history))
    try:
        items = model.catalogue.popular(k)
        notes = [f"{reason}: popular tracks"]
        if context:
            notes.append("the context is not used for popular tracks")
    except LookupError:  # an export without play counts: the model's answer to nothing
        try:
            rec = model.retriever.recommend([], k=k, exclude=None, context=context)
        except (KeyError, ValueError) as e:
            raise HTTPException(422, detail=str(e)) from e
        resp = _as_response(rec, k)
        items = resp.items
        notes = [
            f"{reason}: the model's default tracks (this export records no play counts)",
            *resp.notes,
        ]
    return RecommendResponse(items=items, unknown=unknown, notes=notes)


def _job(
    model: LoadedModel,
    history: list[str],
    k: int,
    exclude_history: bool | None,
    context: dict | None,
    timestamps: list[int | None] | None = None,
    skipped: list[bool] | None = None,
    at: int | None = None,
) -> RecommendJob | None:
    """The retriever query of a request, or None when its history has no known track."""
    if not history or not model.catalogue.known(history).any():
        return None
    exclude = model.filter_seen if exclude_history is None else bool(exclude_history)
    return RecommendJob(list(history), k, exclude, context, timestamps, skipped, at)


_SIGNAL_ARGS = ("timestamps", "skipped", "at")
_takes_signals: dict[type, bool] = {}


def _reads_signals(retriever: Any) -> bool:
    """Whether a retriever's ``recommend`` takes the per-play signals (a RetrieverLike may not)."""
    kind = type(retriever)
    if kind not in _takes_signals:
        try:
            params = inspect.signature(retriever.recommend).parameters
        except (TypeError, ValueError):
            params = {}
        _takes_signals[kind] = all(a in params for a in _SIGNAL_ARGS) or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )
    return _takes_signals[kind]


def _run_jobs(model: LoadedModel, jobs: list[RecommendJob]) -> list[RecommendResponse]:
    """Answer jobs with one ``recommend_batch`` call: one tower forward, one index search.

    The search asks for the largest ``k`` of the jobs and each answer keeps its own first
    ``k`` (exact for a flat index; an approximate one may break ties differently). The
    per-play signals go to the retriever only when some job has them (and it takes them).
    """
    batch = getattr(model.retriever, "recommend_batch", None)
    signals = any(j.has_signals for j in jobs)
    ignored = signals and not _reads_signals(model.retriever)
    signals = signals and not ignored
    if batch is None or len(jobs) == 1:
        recs = [
            model.retriever.recommend(
                j.history,
                k=j.k,
                exclude="history" if j.exclude else None,
                context=j.context,
                **({a: getattr(j, a) for a in _SIGNAL_ARGS} if signals else {}),
            )
            for j in jobs
        ]
    else:
        flags = {j.exclude for j in jobs}
        exclude: Any = [j.history if j.exclude else [] for j in jobs]  # mixed: per query
        if len(flags) == 1:  # the usual case: one rule for all (no second id lookup)
            exclude = "history" if jobs[0].exclude else None
        recs = batch(
            [j.history for j in jobs],
            k=max(j.k for j in jobs),
            exclude=exclude,
            contexts=[j.context for j in jobs],
            **({a: [getattr(j, a) for j in jobs] for a in _SIGNAL_ARGS} if signals else {}),
        )
    out = [_as_response(r, j.k) for r, j in zip(recs, jobs, strict=True)]
    if ignored:
        for resp, j in zip(out, jobs, strict=True):
            if j.has_signals and NO_SIGNALS_NOTE not in resp.notes:
                resp.notes.append(NO_SIGNALS_NOTE)
    return out


def _recommend(
    model: LoadedModel,
    history: list[str],
    k: int,
    exclude_history: bool | None,
    context: dict | None,
) -> RecommendResponse:
    """One recommendation request, unbatched (listener view, review panel, batching off)."""
    job = _job(model, history, k, exclude_history, context)
    if job is None:
        return _cold_start(model, history, k, context)
    try:
        return _run_jobs(model, [job])[0]
    except (KeyError, ValueError) as e:
        raise HTTPException(422, detail=str(e)) from e


def create_app(
    artifacts: str | Path,
    compare: str | Path | None = None,
    reviews: str | Path | None = None,
    *,
    review_sample: int = 50,
    review_k: int = 10,
    seed: int = 0,
    max_body_bytes: int = MAX_BODY_BYTES,
    loader: Callable[[Path], RetrieverLike] | None = None,
    batch_window_ms: float = BATCH_WINDOW_MS,
    max_batch: int = MAX_BATCH,
) -> FastAPI:
    """Build the service.

    Args:
        artifacts: Artifact folder of the model to serve.
        compare: Second artifact folder; enables the review panel at ``/review``.
        reviews: SQLite file of review ratings (required with ``compare``).
        review_sample: Held-out listeners offered for review (a seeded sample).
        review_k: Recommendations per list in the review panel.
        seed: Seed of the review sample and of the hidden A/B assignment.
        max_body_bytes: Larger request bodies get 413.
        loader: Builds a retriever from a folder (default ``Retriever.load``; tests swap it).
        batch_window_ms: How long the batcher waits for more concurrent ``/recommend``
            requests once batches have company (a request alone never waits).
        max_batch: Most requests per batched call; 1 turns batching off (each request is
            answered on its own, in the thread pool).
    """
    model = load_model(artifacts, loader)
    panel: ReviewPanel | None = None
    if compare is not None:
        if reviews is None:
            raise ValueError("the review panel (--compare) needs a reviews file (--reviews)")
        other = load_model(compare, loader)
        if other.label == model.label:
            other.label += "(compare)"
        holdout = model.holdout or other.holdout
        if holdout is None or len(holdout) == 0:
            raise ValueError(
                f"the review panel needs held-out listeners, but neither {artifacts} nor "
                f"{compare} has {HOLDOUT_FILE}"
            )
        order = list(range(len(holdout)))
        random.Random(seed).shuffle(order)
        items = [holdout.ids[i] for i in sorted(order[:review_sample])]
        store = ReviewStore(reviews)
        store.assign(items, model.label, other.label, seed)
        panel = ReviewPanel((model, other), store, items, holdout, review_k)

    batcher: Batcher[RecommendJob, RecommendResponse] | None = None
    if max_batch > 1:
        batcher = Batcher(
            lambda jobs: _run_jobs(model, jobs),
            window_s=batch_window_ms / 1000,
            max_batch=max_batch,
        )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if batcher is not None:
            batcher.close()

    metrics = Metrics()
    app = FastAPI(
        title="twotower",
        summary="Next-track recommendations from a two-tower model and a FAISS index.",
        version=str(model.manifest.get("package_version", "")),
        docs_url=None,  # FastAPI's Swagger UI loads from a CDN; /docs below works offline
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(ServiceMiddleware, metrics=metrics, max_body_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.state.model = model
    app.state.panel = panel
    app.state.batcher = batcher
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def page(name: str) -> FileResponse:
        return FileResponse(STATIC / name, media_type="text/html")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return page("index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(_docs_html(app.openapi()))

    @app.get("/healthz", summary="Artifact format, catalogue size, index spec, creation time")
    def healthz() -> dict:
        out = {"status": "ok", **model.health()}
        out["batching"] = (
            {"window_ms": batch_window_ms, "max_batch": max_batch} if batcher is not None else None
        )
        if panel is not None:
            out["review"] = {"items": len(panel.items), "k": panel.k}
        return out

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def metrics_endpoint() -> PlainTextResponse:
        extra = {"twotower_catalogue_size": float(len(model.catalogue))}
        if batcher is not None:
            st = batcher.stats
            extra |= {
                "twotower_recommend_batches": float(st.batches),
                "twotower_recommend_batched_requests": float(st.jobs),
                "twotower_recommend_largest_batch": float(st.largest),
            }
        text = metrics.render(extra)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/recommend", response_model=RecommendResponse, summary="Next tracks")
    async def recommend(req: RecommendRequest) -> RecommendResponse:
        ctx = (req.context.model_dump(exclude_none=True) if req.context else None) or None
        history = req.track_ids()
        job = _job(
            model,
            history,
            req.k,
            req.exclude_history,
            ctx,
            req.timestamps(),
            req.skipped(),
            req.at,
        )
        try:
            if job is None:
                return _cold_start(model, history, req.k, ctx)
            if batcher is None:
                return (await run_in_threadpool(_run_jobs, model, [job]))[0]
            return await batcher.submit(job)
        except (KeyError, ValueError) as e:
            raise HTTPException(422, detail=str(e)) from e

    @app.get("/similar/{track_id}", response_model=RecommendResponse, summary="Similar tracks")
    def similar(
        track_id: Annotated[str, PathParam(min_length=1, max_length=256)],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    ) -> RecommendResponse:
        # the retriever maps ids as training did (hashed exports: any raw id of a bucket)
        try:
            rec = model.retriever.similar_tracks(track_id, k=k)
        except (KeyError, ValueError) as e:
            raise HTTPException(404, detail=str(e)) from e
        return _as_response(rec)

    @app.get("/tracks/search", response_model=list[Track], summary="Find tracks by substring")
    def search(
        q: Annotated[str, Query(min_length=1, max_length=100)],
        limit: Annotated[int, Query(ge=1, le=MAX_SEARCH)] = 20,
    ) -> list[Track]:
        return model.catalogue.search(q, limit)

    @app.get("/listeners", summary="Held-out listeners (history and the real next track)")
    def listeners(
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict:
        h = model.holdout
        if h is None:
            return {
                "total": 0,
                "listeners": [],
                "message": "no held-out listeners in this artifact",
            }
        rows = range(offset, min(offset + limit, len(h)))
        return {
            "total": len(h),
            "listeners": [
                {
                    "id": h.ids[i],
                    "history_length": len(h.histories[i]),
                    "target": model.catalogue.track(h.targets[i]).model_dump(),
                }
                for i in rows
            ],
        }

    @app.get("/listeners/{listener_id}", summary="One held-out listener with recommendations")
    def listener(
        listener_id: Annotated[str, PathParam(min_length=1, max_length=256)],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    ) -> dict:
        h = model.holdout
        row = h.get(listener_id) if h is not None else None
        if h is None or row is None:
            msg = "no held-out listeners in this artifact" if h is None else "unknown listener"
            raise HTTPException(404, detail=f"{msg}: {listener_id!r}")
        history = h.histories[row][-MAX_HISTORY:]
        target = h.targets[row]
        rec = _recommend(model, history, k, None, model.listener_context(row))
        ranks = [i for i, t in enumerate(rec.items) if t.track_id == target]
        return {
            "id": listener_id,
            "history": [model.catalogue.track(t).model_dump() for t in history],
            "target": model.catalogue.track(target).model_dump(),
            "target_known": target in model.catalogue,
            "target_rank": ranks[0] if ranks else None,
            "context": h.contexts[row],
            "history_excluded": model.filter_seen,
            "recommendations": [t.model_dump() for t in rec.items],
            "unknown": rec.unknown,
        }

    _add_review_routes(app, panel)
    return app


def _add_review_routes(app: FastAPI, panel: ReviewPanel | None) -> None:
    def need_panel() -> ReviewPanel:
        if panel is None:
            raise HTTPException(404, detail="review panel disabled: start with --compare DIR2")
        return panel

    @app.get("/review", include_in_schema=False, response_model=None)
    def review_page() -> FileResponse | HTMLResponse:
        if panel is None:
            return HTMLResponse(
                "<!doctype html><title>Review disabled</title><p>The review panel is disabled. "
                "Start the service with <code>--compare DIR2</code>.</p>",
                status_code=404,
            )
        return FileResponse(STATIC / "review.html", media_type="text/html")

    @app.get("/review/items", summary="Review sample with the reviewer's progress")
    def review_items(
        reviewer: Annotated[
            str | None, Query(max_length=64), AfterValidator(_valid_reviewer)
        ] = None,
    ) -> dict:
        p = need_panel()
        done: dict[str, int] = {}
        if reviewer:
            for r in p.store.ratings(reviewer=reviewer):
                done[r.item] = done.get(r.item, 0) + 1
        return {
            "k": p.k,
            "items": [{"id": i, "rated": done.get(i, 0)} for i in p.items],
        }

    @app.get("/review/items/{item}", summary="History and the two anonymous lists of an item")
    def review_item(
        item: Annotated[str, PathParam(min_length=1, max_length=256)],
        reviewer: Annotated[
            str | None, Query(max_length=64), AfterValidator(_valid_reviewer)
        ] = None,
    ) -> dict:
        p = need_panel()
        if item not in p.items:
            raise HTTPException(404, detail=f"{item!r} is not in the review sample")
        side = p.assignment(item)
        row = p.holdout.get(item)
        assert row is not None
        cat = p.models[0].catalogue
        mine = {}
        if reviewer:
            mine = {
                f"{r.list}:{r.position}": r.rating
                for r in p.store.ratings(reviewer=reviewer, item=item)
            }
        return {
            "id": item,
            "history": [cat.track(t).model_dump() for t in p.holdout.histories[row][-50:]],
            "history_length": len(p.holdout.histories[row]),
            "lists": {
                name: [t.model_dump(exclude={"score"}) for t in p.recs(label, item)]
                for name, label in side.items()
            },
            "ratings": mine,
            "choices": list(RATINGS),
        }

    @app.post("/review/rate", summary="Store (or replace) one rating")
    def review_rate(req: RateRequest) -> dict:
        p = need_panel()
        if req.item not in p.items:
            raise HTTPException(404, detail=f"{req.item!r} is not in the review sample")
        label = p.assignment(req.item)[req.list]
        recs = p.recs(label, req.item)
        if req.position >= len(recs):
            raise HTTPException(
                422, detail=f"list {req.list} of {req.item!r} has {len(recs)} entries"
            )
        p.store.rate(
            req.reviewer,
            req.item,
            req.list,
            req.position,
            recs[req.position].track_id,
            label,
            req.rating,
        )
        return {"ok": True}

    @app.get("/review/report", summary="WTF share per model (Wilson CI), paired difference")
    def review_report() -> dict:
        p = need_panel()
        return build_report(p.store.ratings()).to_dict()

    @app.get("/review/report.csv", response_class=PlainTextResponse, summary="Report as CSV")
    def review_report_csv() -> PlainTextResponse:
        p = need_panel()
        text = build_report(p.store.ratings()).to_csv()
        return PlainTextResponse(
            text,
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": 'attachment; filename="review-report.csv"'},
        )

    @app.get("/review/ratings.csv", response_class=PlainTextResponse, summary="Every rating")
    def review_ratings_csv() -> PlainTextResponse:
        p = need_panel()
        return PlainTextResponse(
            ratings_csv(p.store.ratings()),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": 'attachment; filename="review-ratings.csv"'},
        )


class SafeJSONResponse(JSONResponse):
    """JSON that can always be sent: text that is not valid Unicode goes out escaped."""

    def render(self, content: Any) -> bytes:
        r"""UTF-8 JSON; ``\uXXXX`` escapes when a string holds a lone surrogate."""
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def _printable(x: Any) -> Any:
    r"""Strings of an error report, lone surrogates written as ``\udXXX`` (readable, UTF-8)."""
    if isinstance(x, str):
        return x if x.isascii() else x.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(x, dict):
        return {_printable(k): _printable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_printable(v) for v in x]
    return x


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with the validation errors and a one-line message.

    FastAPI's own handler fails (500) on non-UTF-8 bodies and on strings with lone
    surrogates; here every string of the report is made printable first.
    """
    errors = [{k: v for k, v in e.items() if k not in ("ctx", "url")} for e in exc.errors()]
    detail = _printable(
        jsonable_encoder(
            errors,
            custom_encoder={
                bytes: lambda b: b.decode("utf-8", "backslashreplace"),
                float: lambda x: x if math.isfinite(x) else str(x),  # NaN/Infinity: not JSON
            },
        )
    )
    parts = []
    for e in detail[:5]:
        loc = ".".join(str(x) for x in e.get("loc", []))
        parts.append(f"{loc}: {e.get('msg', '')}" if loc else str(e.get("msg", "")))
    if len(detail) > 5:
        parts.append(f"... and {len(detail) - 5} more")
    return SafeJSONResponse(
        status_code=422, content={"detail": detail, "message": "; ".join(parts)}
    )


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's HTTP error answer, safe for any text in ``detail``."""
    headers = getattr(exc, "headers", None)
    return SafeJSONResponse(
        status_code=exc.status_code, content={"detail": _printable(exc.detail)}, headers=headers
    )


def _docs_html(spec: dict) -> str:
    """A small offline API reference rendered from the OpenAPI document."""
    from html import escape

    rows = []
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            params = ", ".join(f"{p['name']} ({p.get('in')})" for p in op.get("parameters", []))
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            ref = body.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1]
            rows.append(
                f"<tr><td><code>{escape(method.upper())}</code></td>"
                f"<td><code>{escape(path)}</code></td><td>{escape(op.get('summary', ''))}</td>"
                f"<td>{escape(params)}{escape(' body: ' + ref if ref else '')}</td></tr>"
            )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>twotower API</title>"
        '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">'
        '<link rel="stylesheet" href="/static/style.css"></head><body><main>'
        "<h1>twotower API</h1><p>The full machine-readable description is "
        '<a href="/openapi.json">/openapi.json</a>.</p><table class="docs">'
        "<tr><th>method</th><th>path</th><th>what</th><th>parameters</th></tr>"
        + "".join(rows)
        + "</table></main></body></html>"
    )


def app_from_env() -> FastAPI:
    """App factory for uvicorn workers (``twotower serve --workers N``).

    Returns:
        ``create_app`` with the JSON options in ``$TWOTOWER_SERVE_CONFIG``, which
        ``serve_main`` sets before starting the workers.
    """
    raw = os.environ.get(ENV_CONFIG)
    if not raw:
        raise RuntimeError(f"${ENV_CONFIG} is not set (use `twotower serve`)")
    cfg = json.loads(raw)
    return create_app(
        cfg["artifacts"],
        cfg.get("compare"),
        cfg.get("reviews"),
        batch_window_ms=float(cfg.get("batch_window_ms", BATCH_WINDOW_MS)),
        max_batch=int(cfg.get("max_batch", MAX_BATCH)),
    )


def serve_main(args: argparse.Namespace) -> int:
    """``twotower serve``: load the artifacts and run uvicorn (``--workers`` processes)."""
    import uvicorn

    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(
            f"twotower serve: warning: listening on {args.host}, reachable from other machines; "
            "there is no authentication",
            file=sys.stderr,
        )
    window = float(getattr(args, "batch_window_ms", BATCH_WINDOW_MS))
    max_batch = int(getattr(args, "max_batch", MAX_BATCH))
    workers = int(getattr(args, "workers", 1) or 1)
    if window < 0 or max_batch < 1 or workers < 1:
        raise ValueError("--batch-window-ms must be >= 0, --max-batch and --workers >= 1")
    cfg = {
        "artifacts": str(args.artifacts),
        "compare": str(args.compare) if args.compare else None,
        "reviews": str(args.reviews) if args.compare else None,
        "batch_window_ms": window,
        "max_batch": max_batch,
    }
    batching = (
        f"batches up to {max_batch}, window {window:g} ms" if max_batch > 1 else "no batching"
    )
    print(
        f"twotower serve: http://{args.host}:{args.port}/ ({workers} worker(s), {batching})",
        file=sys.stderr,
    )
    if workers == 1:
        app = create_app(
            cfg["artifacts"],
            cfg["compare"],
            cfg["reviews"],
            batch_window_ms=window,
            max_batch=max_batch,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
        return 0
    create_app(cfg["artifacts"], cfg["compare"], cfg["reviews"], max_batch=1)  # fail here, early
    os.environ[ENV_CONFIG] = json.dumps(cfg)
    uvicorn.run(
        "twotower.serve.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=workers,
        log_level="info",
    )
    return 0
