"""The demo page and review panel in headless Chromium (Debian's chromium + chromium-driver).

uvicorn runs in a thread on 127.0.0.1 with a free port. Skips with the reason when Chromium,
chromedriver or Selenium are missing. The layout tests render each page at a desktop and a phone
viewport and save full-page screenshots (to ``TWOTOWER_SHOT_DIR``, else pytest's tmp folder).
With ``TWOTOWER_SCREENSHOTS=1`` the tests also write ``docs/demo.png`` and ``docs/review.png``.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from test_serve import build_real_artifacts  # noqa: E402

from twotower.serve.app import create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = os.environ.get("TWOTOWER_SCREENSHOTS") == "1"
SHOT_ARTIFACTS = os.environ.get("TWOTOWER_SCREENSHOT_ARTIFACTS", "")
SHOT_DIR = os.environ.get("TWOTOWER_SHOT_DIR", "")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_real_artifacts(tmp_path_factory.mktemp("browser"))


@contextmanager
def _serve(app) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on 127.0.0.1 (a free port); yield its URL."""
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def base_url(real: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reviews = tmp_path_factory.mktemp("reviews") / "reviews.sqlite"
    with _serve(create_app(real["a"], real["b"], reviews, review_k=5)) as url:
        yield url


@pytest.fixture(scope="module")
def driver() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not (Path(exe).is_file() or shutil.which(exe)):
            pytest.skip(f"{exe} not found (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1360,860",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, for asserts
    # an explicit driver path: Selenium Manager never runs (and never downloads anything)
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def _wait(drv, cond, timeout: float = 15.0):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(drv, timeout, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(cond)


def _report_wtf(drv) -> list[str]:
    """The WTF column of the report table, sorted (read in one go)."""
    return sorted(
        drv.execute_script(
            "return Array.from(document.querySelectorAll('#report tr[data-model]'),"
            " r => r.children[4].textContent)"
        )
    )


def _rendered(drv) -> str:
    return drv.execute_script("return document.body.dataset.rendered || ''")


def _ids(drv, css: str) -> list[str]:
    """Track ids of the elements matching ``css``, read in one go (no stale elements)."""
    return drv.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.dataset.trackId)", css
    )


def _console_errors(drv) -> list[str]:
    """Console errors (failed loads included) since the last call; reading clears the log."""
    return [e["message"] for e in drv.get_log("browser") if e["level"] == "SEVERE"]


def _shot(drv, name: str) -> None:
    """The whole page at the desktop viewport's width as ``docs/<name>``."""
    (REPO / "docs").mkdir(exist_ok=True)
    _full_shot(drv, REPO / "docs" / name, "desktop")


def test_demo_search_add_recommend_and_listener(driver, base_url: str, real: dict) -> None:
    from selenium.webdriver.common.by import By

    from twotower.retrieve import Retriever

    ref = Retriever.load(real["a"])

    def expected(history: list[str]) -> list[str]:
        return ref.recommend(history, k=10, exclude="history").ids

    drv = driver
    drv.get(base_url + "/")
    _wait(drv, lambda d: "tracks" in d.find_element(By.ID, "health").text)
    assert "24 tracks" in drv.find_element(By.ID, "health").text

    drv.find_element(By.ID, "search").send_keys("track 7")
    _wait(drv, lambda d: _ids(d, "#search-results li") == ["g07"])
    drv.find_element(By.CSS_SELECTOR, '#search-results li[data-track-id="g07"]').click()
    _wait(drv, lambda d: len(_ids(d, "#recs li")) == 10)
    assert _ids(drv, "#session li") == ["g07"]
    recs = _ids(drv, "#recs li")
    assert recs == expected(["g07"])
    assert {real["cluster"][t] for t in recs[:5]} == {1}  # planted: g07's cluster first
    first = drv.find_element(By.CSS_SELECTOR, "#recs li")
    assert f"Golden track {int(recs[0][1:])}" in first.text and "Artist B" in first.text

    # click a recommendation: it joins the session and the list follows
    first.click()
    _wait(drv, lambda d: _ids(d, "#session li") == ["g07", recs[0]])
    _wait(drv, lambda d: _ids(d, "#recs li") == expected(["g07", recs[0]]))
    search = drv.find_element(By.ID, "search")
    search.clear()
    search.send_keys("artist")
    _wait(drv, lambda d: len(_ids(d, "#search-results li")) == 20)

    # remove the first session track
    drv.find_element(By.CSS_SELECTOR, "#session li .remove").click()
    _wait(drv, lambda d: _ids(d, "#session li") == [recs[0]])
    _wait(drv, lambda d: _ids(d, "#recs li") == expected([recs[0]]))

    # listener view: L0 played g00-g02 and then g03, which the model ranks in its top 10
    drv.find_element(By.ID, "tab-listener").click()
    _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#listeners li")) == 8)
    drv.find_element(By.CSS_SELECTOR, '#listeners li[data-listener-id="L0"]').click()
    _wait(drv, lambda d: _ids(d, "#listener-recs li.hit") == ["g03"])
    assert _ids(drv, "#listener-history li") == ["g02", "g01", "g00"]  # newest first
    assert _ids(drv, "#listener-history li.latest") == ["g02"]
    rank = ref.recommend(["g00", "g01", "g02"], k=10).ids.index("g03") + 1
    assert f"rank {rank}" in drv.find_element(By.ID, "listener-target").text
    # M0 played a track of another cluster next
    drv.find_element(By.CSS_SELECTOR, '#listeners li[data-listener-id="M0"]').click()
    _wait(
        drv,
        lambda d: (
            _ids(d, "#listener-history li") == ["g02", "g01", "g00"]
            and "Golden track 11" in d.find_element(By.ID, "listener-target").text
        ),
    )
    m0 = ref.recommend(["g00", "g01", "g02"], k=10, context={"hour": 7, "context_type": "radio"})
    if "g11" in m0.ids:
        assert _ids(drv, "#listener-recs li.hit") == ["g11"]
    else:
        assert "not in the top 10" in drv.find_element(By.ID, "listener-target").text
        assert _ids(drv, "#listener-recs li.hit") == []


def test_review_panel_rate_and_report(driver, base_url: str) -> None:
    from selenium.webdriver.common.by import By

    drv = driver
    drv.get(base_url + "/review")
    _wait(drv, lambda d: len(_ids(d, "#list-A li")) == 5 and len(_ids(d, "#list-B li")) == 5)
    # rating before giving a name is refused with a message
    drv.find_element(By.CSS_SELECTOR, "#list-A li .rate-wtf").click()
    _wait(drv, lambda d: d.find_element(By.ID, "review-msg").is_displayed())
    name = drv.find_element(By.ID, "reviewer")
    name.send_keys("ann")
    drv.find_element(By.ID, "progress").click()  # blur: fires "change", the page reloads
    _wait(drv, lambda d: _rendered(d).startswith("ann|"))
    assert not drv.find_element(By.ID, "review-msg").is_displayed()

    a_items = drv.find_elements(By.CSS_SELECTOR, "#list-A li")
    b_items = drv.find_elements(By.CSS_SELECTOR, "#list-B li")
    a_items[0].find_element(By.CSS_SELECTOR, ".rate-wtf").click()
    _wait(
        drv,
        lambda d: (
            "on" in a_items[0].find_element(By.CSS_SELECTOR, ".rate-wtf").get_attribute("class")
        ),
    )
    for li in b_items[:3]:
        li.find_element(By.CSS_SELECTOR, ".rate-good").click()
    a_items[1].find_element(By.CSS_SELECTOR, ".rate-okay").click()
    _wait(drv, lambda d: "(5/10 rated)" in d.find_element(By.ID, "item-select").text)

    drv.find_element(By.CSS_SELECTOR, "#report-box summary").click()
    _wait(drv, lambda d: "5 ratings by 1 reviewer" in d.find_element(By.ID, "report").text)
    _wait(drv, lambda d: _report_wtf(d) == ["0", "1"])

    # re-rating replaces (count stays 5); a new rating moves the report
    a_items[0].find_element(By.CSS_SELECTOR, ".rate-good").click()
    _wait(
        drv,
        lambda d: (
            "on" in a_items[0].find_element(By.CSS_SELECTOR, ".rate-good").get_attribute("class")
        ),
    )
    _wait(drv, lambda d: _report_wtf(d) == ["0", "0"])
    assert "5 ratings" in drv.find_element(By.ID, "report").text
    b_items[3].find_element(By.CSS_SELECTOR, ".rate-wtf").click()
    _wait(drv, lambda d: "6 ratings" in d.find_element(By.ID, "report").text)
    _wait(drv, lambda d: "paired" in d.find_element(By.ID, "report").get_attribute("innerHTML"))

    # next listener, then back: the ratings are still shown
    first = _rendered(drv)
    drv.find_element(By.ID, "next").click()
    _wait(drv, lambda d: _rendered(d) not in ("", first))
    assert drv.find_element(By.ID, "item-select").get_attribute("value") == "1"
    assert not drv.find_elements(By.CSS_SELECTOR, ".rate.on")
    drv.find_element(By.ID, "prev").click()
    _wait(drv, lambda d: _rendered(d) == first)
    assert len(drv.find_elements(By.CSS_SELECTOR, ".rate.on")) == 6


@pytest.mark.skipif(not SCREENSHOTS, reason="set TWOTOWER_SCREENSHOTS=1 to write docs/*.png")
def test_screenshots(driver, real: dict, tmp_path: Path) -> None:
    """Write docs/demo.png and docs/review.png.

    ``TWOTOWER_SCREENSHOT_ARTIFACTS=DIR_A,DIR_B`` shows real exports instead of the planted pair.
    """
    from selenium.webdriver.common.by import By

    dirs = [d for d in SHOT_ARTIFACTS.split(",") if d] or [real["a"], real["b"]]
    compare = dirs[1] if len(dirs) > 1 else dirs[0]
    app = create_app(dirs[0], compare, tmp_path / "reviews.sqlite", review_k=8)
    holdout = app.state.model.holdout
    drv = driver
    with _serve(app) as url, _viewport(drv, "desktop"):
        # demo: start from a held-out listener's last track, then follow two recommendations
        seed_track = holdout.histories[0][-1] if holdout else app.state.model.catalogue.ids[0]
        title = app.state.model.catalogue.track(seed_track).title or seed_track
        drv.get(url + "/")
        drv.find_element(By.ID, "search").send_keys(title[:24])
        _wait(drv, lambda d: _ids(d, f'#search-results li[data-track-id="{seed_track}"]'))
        drv.find_element(
            By.CSS_SELECTOR, f'#search-results li[data-track-id="{seed_track}"]'
        ).click()
        for n in (2, 3):
            _wait(drv, lambda d: len(_ids(d, "#recs li")) == 10)
            drv.find_elements(By.CSS_SELECTOR, "#recs li")[1].click()
            _wait(drv, lambda d, n=n: len(_ids(d, "#session li")) == n)
        _wait(drv, _recs_settled)
        drv.find_element(By.ID, "search").clear()
        drv.find_element(By.ID, "search").send_keys(title.split()[0][:12])
        _wait(drv, lambda d: len(_ids(d, "#search-results li")) > 0)
        time.sleep(0.3)
        _shot(drv, "demo.png")

        drv.get(url + "/review")
        name = drv.find_element(By.ID, "reviewer")
        name.clear()
        name.send_keys("demo")
        drv.find_element(By.ID, "progress").click()
        _wait(drv, lambda d: _rendered(d).startswith("demo|"))
        marks = ["good", "good", "okay", "wtf", "good", "okay"]
        for lst, offset in (("A", 0), ("B", 2)):
            items = drv.find_elements(By.CSS_SELECTOR, f"#list-{lst} li")
            for li, mark in zip(items, marks[offset:] + marks[:offset], strict=False):
                li.find_element(By.CSS_SELECTOR, f".rate-{mark}").click()
        _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".rate.on")) == 12)
        drv.find_element(By.CSS_SELECTOR, "#report-box summary").click()
        _wait(drv, lambda d: "12 ratings" in d.find_element(By.ID, "report").text)
        _shot(drv, "review.png")


# ---------------------------------------------------------------- layout at two viewports

#: CSS px viewports (width, height, mobile) of the layout tests: a laptop and a phone (390x844).
VIEWPORTS = {"desktop": (1280, 900, False), "phone": (390, 844, True)}
#: Max-height of a ``.tracks.scroll`` box in style.css at each viewport (px).
SCROLL_BOX = {"desktop": 400, "phone": 300}
#: Document height bounds (px). Every list on the pages is a bounded scroll box or k=10 rows, so
#: the height is a fixed number of rows whatever the number of listeners or plays (before the
#: fix, 200 listeners made the listener view 5,857 px tall). Desktop (three columns): header,
#: tabs and the tallest card (10 scored rows or a 400 px box plus its controls) fit in one
#: 900 px screen; 100 px of slack for fonts. Phone (one column): the cards stack, a 300 px box
#: or 10 rows (~47 px) plus controls each; the tallest page (the review panel: history, lists
#: A and B) measures ~1,850 px, and 2,200 px (2.6 screens) leaves room for fonts and wrapping.
MAX_HEIGHT = {"desktop": 1000, "phone": 2200}
N_LISTENERS = 240


def build_crowded_artifacts(root: Path, listeners: int = N_LISTENERS) -> dict:
    """Two planted exports (8 clusters x 12 tracks) with many held-out listeners (``U000``...)
    whose histories are 20 to 80 plays long: what made the listener view thousands of pixels
    tall and hid the latest plays at the bottom of the review panel's history."""
    import numpy as np
    import pandas as pd
    from test_serve import _make_golden

    from twotower.export import write_artifact

    mg = _make_golden()
    rng = np.random.default_rng(0)
    histories, records = {}, []
    for j in range(listeners):
        c = j % 8
        hist = [f"g{12 * c + int(i):02d}" for i in rng.integers(0, 12, 80 - (13 * j) % 61)]
        histories[f"U{j:03d}"] = hist
        target = f"g{12 * c + int(rng.integers(0, 12)):02d}"
        records.append(
            {
                "query_id": f"U{j:03d}",
                "history": hist,
                "target": target,
                "hour": -1,
                "context_type": None,
            }
        )
    holdout = pd.DataFrame(records)
    out: dict = {"histories": histories}
    for name, seed in (("a", 0), ("b", 1)):
        parts = mg.planted_parts(n_clusters=8, per_cluster=12, seed=seed)
        parts.pop("cluster")
        out[name] = write_artifact(root / name, index="Flat", holdout=holdout, **parts)
    return out


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_crowded_artifacts(tmp_path_factory.mktemp("crowded"))


@pytest.fixture(scope="module")
def crowded_url(crowded: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reviews = tmp_path_factory.mktemp("crowded-reviews") / "reviews.sqlite"
    with _serve(create_app(crowded["a"], crowded["b"], reviews, review_k=10)) as url:
        yield url


@pytest.fixture
def shot_dir(tmp_path: Path) -> Path:
    out = Path(SHOT_DIR) if SHOT_DIR else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def _viewport(drv, view: str) -> Iterator[None]:
    """Emulate the viewport ``view`` (CSS px, scale 1; ``mobile`` honours the meta viewport)."""
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", _metrics(view))
    try:
        yield
    finally:
        drv.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _metrics(view: str, height: int | None = None) -> dict:
    width, h, mobile = VIEWPORTS[view]
    return {"width": width, "height": height or h, "deviceScaleFactor": 1, "mobile": mobile}


def _full_shot(drv, path: Path, view: str) -> None:
    """The whole document at ``view``'s width: a viewport as tall as the page, no scrollbar."""
    full = drv.execute_script("return document.documentElement.scrollHeight")
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", _metrics(view, full))
    try:
        shot = drv.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", _metrics(view))
    path.write_bytes(base64.b64decode(shot["data"]))


_LAYOUT_JS = """
const de = document.documentElement;
const header = Array.from(
  document.querySelectorAll("header.top .brand, header.top nav a, header.top #health"))
  .filter((e) => e.textContent.trim() && e.getClientRects().length)
  .map((e) => { const r = e.getBoundingClientRect();
                return [e.textContent.trim().slice(0, 30), r.left, r.top, r.right, r.bottom]; });
return {height: de.scrollHeight, scrollWidth: de.scrollWidth, width: window.innerWidth,
        header: header};
"""


def _check_layout(drv, view: str) -> dict:
    """Assert the viewport, the height bound, no sideways scroll, no overlapping header items."""
    m = drv.execute_script(_LAYOUT_JS)
    assert m["width"] == VIEWPORTS[view][0], m
    assert m["height"] <= MAX_HEIGHT[view], f"document {m['height']} px tall at {view}"
    assert m["scrollWidth"] <= m["width"], f"sideways scroll at {view}: {m['scrollWidth']} px"
    boxes = m["header"]
    assert len(boxes) == 5, boxes  # brand, Demo, Review, API, health
    for i, (a, *ra) in enumerate(boxes):
        assert 0 <= ra[0] and ra[2] <= m["width"], f"{a!r} leaves the viewport: {ra}"
        for b, *rb in boxes[i + 1 :]:
            overlap_x = min(ra[2], rb[2]) - max(ra[0], rb[0])
            overlap_y = min(ra[3], rb[3]) - max(ra[1], rb[1])
            assert overlap_x <= 0.5 or overlap_y <= 0.5, f"{a!r} {ra} overlaps {b!r} {rb}"
    return m


def _box(drv, css: str) -> dict:
    return drv.execute_script(
        "const e = document.querySelector(arguments[0]); const r = e.getBoundingClientRect();"
        "return {client: e.clientHeight, scroll: e.scrollHeight, top: r.top, bottom: r.bottom,"
        " scrollTop: e.scrollTop};",
        css,
    )


def _first_row(drv, css: str) -> dict:
    """The first row of the list ``css``: id, play number, classes, and whether it is visible."""
    return drv.execute_script(
        "const ol = document.querySelector(arguments[0]); const li = ol.querySelector('li');"
        "const o = ol.getBoundingClientRect(), r = li.getBoundingClientRect();"
        "return {id: li.dataset.trackId, play: li.dataset.play, cls: li.className,"
        " text: li.textContent, visible: r.top >= o.top - 0.5 && r.bottom <= o.bottom + 0.5"
        " && r.top >= 0 && r.bottom <= window.innerHeight};",
        css,
    )


def _recs_settled(drv) -> bool:
    """The last /recommend answer is shown (none in flight: the info line is not "…")."""
    info = drv.execute_script("return document.getElementById('recs-info').textContent")
    return info.startswith("Click one") and len(_ids(drv, "#recs li")) == 10


def _health_loaded(drv) -> bool:
    return "tracks" in drv.execute_script("return document.getElementById('health').textContent")


@pytest.mark.parametrize("view", list(VIEWPORTS))
def test_layout_demo(driver, crowded: dict, crowded_url: str, shot_dir: Path, view: str) -> None:
    """Both demo views at ``view``: bounded height and lists, header, newest play first."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    drv = driver
    _console_errors(drv)  # drop what earlier tests logged
    with _viewport(drv, view):
        drv.get(crowded_url + "/")
        _wait(drv, _health_loaded)
        drv.find_element(By.ID, "search").send_keys("golden track")
        _wait(drv, lambda d: len(_ids(d, "#search-results li")) == 20)
        for n in (1, 2, 3):
            drv.find_elements(By.CSS_SELECTOR, "#search-results li")[n].click()
            _wait(drv, lambda d, n=n: len(_ids(d, "#session li")) == n)
        _wait(drv, _recs_settled)
        assert not set(_ids(drv, "#recs li")) & set(_ids(drv, "#session li"))
        _check_layout(drv, view)
        box = _box(drv, "#search-results")  # 20 results scroll inside the card
        assert box["client"] <= SCROLL_BOX[view] < box["scroll"], box
        _full_shot(drv, shot_dir / f"demo-session-{view}.png", view)

        # listener view: one page of 50 of the 240 listeners, in a bounded scroll box
        drv.find_element(By.ID, "tab-listener").click()
        _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#listeners li")) == 50)
        assert drv.find_element(By.ID, "listeners-page").text == f"1–50 of {N_LISTENERS}"
        box = _box(drv, "#listeners")
        assert box["client"] <= SCROLL_BOX[view] < box["scroll"], box
        drv.find_element(By.CSS_SELECTOR, '#listeners li[data-listener-id="U000"]').click()
        hist = crowded["histories"]["U000"]
        _wait(drv, lambda d: d.find_element(By.ID, "listener-info").text.startswith("U000:"))
        assert len(_ids(drv, "#listener-history li")) == len(hist)
        first = _first_row(drv, "#listener-history")
        assert (first["id"], first["play"]) == (hist[-1], str(len(hist))), first
        assert "latest" in first["cls"].split() and first["text"].endswith("latest"), first
        if view == "desktop":  # on the phone the history card is below the fold
            assert first["visible"], first
        box = _box(drv, "#listener-history")
        assert box["client"] <= SCROLL_BOX[view] < box["scroll"] and box["scrollTop"] == 0, box
        m = _check_layout(drv, view)
        _full_shot(drv, shot_dir / f"demo-listener-{view}.png", view)

        # next page, the filter, and Enter opening a listener by id from another page
        drv.find_element(By.ID, "listeners-next").click()
        _wait(drv, lambda d: _listener_ids(d)[:1] == ["U050"])
        assert drv.find_element(By.ID, "listeners-page").text == f"51–100 of {N_LISTENERS}"
        drv.find_element(By.ID, "listener-filter").send_keys("U07")
        _wait(drv, lambda d: _listener_ids(d, visible=True) == [f"U07{i}" for i in range(10)])
        drv.find_element(By.ID, "listener-filter").send_keys(Keys.BACKSPACE * 3 + "U239\n")
        _wait(drv, lambda d: d.find_element(By.ID, "listener-info").text.startswith("U239:"))
        assert drv.execute_script("return document.documentElement.scrollHeight") <= m["height"]
    assert _console_errors(drv) == []


def _listener_ids(drv, visible: bool = False) -> list[str]:
    return drv.execute_script(
        "return Array.from(document.querySelectorAll('#listeners li'))"
        ".filter(e => !arguments[0] || !e.hidden).map(e => e.dataset.listenerId)",
        visible,
    )


@pytest.mark.parametrize("view", list(VIEWPORTS))
def test_layout_review(driver, crowded: dict, crowded_url: str, shot_dir: Path, view: str) -> None:
    """The review panel at ``view``: bounded height, header, the latest play on top and visible."""
    drv = driver
    _console_errors(drv)
    with _viewport(drv, view):
        drv.get(crowded_url + "/review")
        _wait(drv, lambda d: _rendered(d) and len(_ids(d, "#list-B li")) == 10)
        _wait(drv, _health_loaded)
        item = _rendered(drv).split("|", 1)[1]
        hist = crowded["histories"][item]
        shown = hist[-50:]
        assert _ids(drv, "#history li") == shown[::-1]  # newest first
        first = _first_row(drv, "#history")
        assert (first["id"], first["play"]) == (hist[-1], str(len(hist))), first
        assert "latest" in first["cls"].split() and first["text"].endswith("latest"), first
        assert first["visible"], first  # on top of its box, inside the first screen
        assert "newest first" in drv.execute_script(
            "return document.getElementById('history-len').textContent"
        )
        box = _box(drv, "#history")
        assert box["client"] <= SCROLL_BOX[view] < box["scroll"] and box["scrollTop"] == 0, box
        _check_layout(drv, view)
        _full_shot(drv, shot_dir / f"review-{view}.png", view)
    assert _console_errors(drv) == []


def test_api_page_no_console_errors(driver, base_url: str) -> None:
    """The API reference page loads without console errors (its favicon included)."""
    from selenium.webdriver.common.by import By

    drv = driver
    _console_errors(drv)
    drv.get(base_url + "/docs")
    _wait(drv, lambda d: "/recommend" in d.find_element(By.TAG_NAME, "table").text)
    time.sleep(0.3)  # the favicon is fetched after the load event
    assert _console_errors(drv) == []
