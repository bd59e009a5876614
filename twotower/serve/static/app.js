// twotower demo page and review panel. Plain JS, no dependencies, works offline.
"use strict";

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, body) {
    const detail = body && body.detail !== undefined ? body.detail : body;
    super(typeof detail === "string" ? detail : (detail && detail.message) || JSON.stringify(detail));
    this.status = status;
    this.body = body;
  }
}

async function api(path, opts = {}) {
  if (opts.json !== undefined) {
    opts = { ...opts, method: opts.method || "POST", body: JSON.stringify(opts.json),
             headers: { "content-type": "application/json" } };
  }
  const r = await fetch(path, opts);
  const isJson = (r.headers.get("content-type") || "").includes("json");
  const body = isJson ? await r.json() : await r.text();
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

// One track as a list item: title, artist, id, optional score bar and actions.
function trackItem(t, opts = {}) {
  const li = el("li", "track");
  li.dataset.trackId = t.track_id;
  const text = el("div", "track-text");
  text.appendChild(el("span", "title", t.title || t.track_id));
  const sub = el("span", "sub");
  if (t.artist) sub.appendChild(el("span", "artist", t.artist));
  if (t.title) sub.appendChild(el("code", "tid", t.track_id));
  text.appendChild(sub);
  li.appendChild(text);
  if (typeof t.score === "number") {
    const s = el("span", "score");
    s.appendChild(el("span", "score-num", t.score.toFixed(3)));
    const bar = el("span", "score-bar");
    const fill = el("span", "score-fill");
    fill.style.width = `${Math.max(0, Math.min(1, (t.score + 1) / 2)) * 100}%`;
    bar.appendChild(fill);
    s.appendChild(bar);
    li.appendChild(s);
  }
  if (opts.onClick) {
    li.classList.add("clickable");
    li.tabIndex = 0;
    li.title = opts.hint || "";
    li.addEventListener("click", () => opts.onClick(t));
    li.addEventListener("keydown", (e) => { if (e.key === "Enter") opts.onClick(t); });
  }
  if (opts.highlight) li.classList.add("hit");
  return li;
}

// A listening history (oldest first, the last `tracks.length` of `total` plays) rendered
// newest first: the plays that matter for the next track are on top, the latest one marked.
function renderHistory(ol, tracks, total) {
  clear(ol);
  const first = total - tracks.length + 1;  // play number of tracks[0]
  for (let i = tracks.length - 1; i >= 0; i--) {
    const li = trackItem(tracks[i]);
    li.dataset.play = String(first + i);
    if (i === tracks.length - 1) {
      li.classList.add("latest");
      li.title = "most recent play";
      li.appendChild(el("span", "latest-badge", "latest"));
    }
    ol.appendChild(li);
  }
  ol.scrollTop = 0;
}

async function showHealth() {
  try {
    const h = await api("/healthz");
    const idx = h.index && h.index.factory ? ` · index ${h.index.factory}` : "";
    const created = h.created ? ` · built ${String(h.created).slice(0, 10)}` : "";
    $("health").textContent = `${h.catalogue_size.toLocaleString()} tracks${idx}${created}`;
  } catch (e) {
    $("health").textContent = `service unavailable: ${e.message}`;
  }
}

// ---------------------------------------------------------------- demo page

function demoPage() {
  const session = [];
  let recSeq = 0;
  let searchSeq = 0;
  let searchTimer = null;

  // Every session play carries its time (when it was added here, unix seconds; null for plays
  // copied from a held-out listener, whose times the page does not know) and a skipped mark.
  const now = () => Math.floor(Date.now() / 1000);

  function addToSession(t) {
    session.push({ track_id: t.track_id, title: t.title, artist: t.artist, ts: now(), skipped: false });
    renderSession();
    refreshRecs();
  }

  // The /recommend history: one play object per session track (ts only when known).
  function sessionPlays() {
    return session.map((t) => (t.ts == null
      ? { track: t.track_id, skipped: !!t.skipped }
      : { track: t.track_id, ts: t.ts, skipped: !!t.skipped }));
  }

  function renderSession() {
    const ol = $("session");
    clear(ol);
    session.forEach((t, i) => {
      const li = trackItem(t);
      li.classList.toggle("skipped", !!t.skipped);
      const sk = el("button", "small skip", t.skipped ? "skipped" : "skip");
      sk.type = "button";
      sk.title = t.skipped ? "mark as listened" : "mark as skipped";
      sk.setAttribute("aria-pressed", t.skipped ? "true" : "false");
      sk.addEventListener("click", () => { t.skipped = !t.skipped; renderSession(); refreshRecs(); });
      li.appendChild(sk);
      const rm = el("button", "small remove", "×");
      rm.type = "button";
      rm.title = "remove";
      rm.addEventListener("click", () => { session.splice(i, 1); renderSession(); refreshRecs(); });
      li.appendChild(rm);
      ol.appendChild(li);
    });
    ol.scrollTop = ol.scrollHeight;  // the session grows at the end: keep the newest in view
    $("session-empty").hidden = session.length > 0;
  }

  async function refreshRecs() {
    const seq = ++recSeq;
    const ol = $("recs");
    $("unknown").hidden = true;
    if (session.length === 0) {
      clear(ol);
      $("recs-info").textContent = "Recommendations appear once the session has a track.";
      return;
    }
    $("recs-info").textContent = "…";
    try {
      const res = await api("/recommend", {
        json: { history: sessionPlays(), at: now(), k: 10, exclude_history: true },
      });
      if (seq !== recSeq) return;
      clear(ol);
      res.items.forEach((t) => ol.appendChild(trackItem(t, { onClick: addToSession, hint: "add to session" })));
      $("recs-info").textContent = "Click one to add it to the session.";
      if (res.unknown.length) {
        $("unknown").textContent = `Not in the model's vocabulary (ignored): ${res.unknown.join(", ")}`;
        $("unknown").hidden = false;
      }
    } catch (e) {
      if (seq !== recSeq) return;
      clear(ol);
      $("recs-info").textContent = `No recommendations: ${e.message}`;
    }
  }

  async function doSearch() {
    const q = $("search").value.trim();
    const seq = ++searchSeq;
    const ol = $("search-results");
    if (!q) { clear(ol); $("search-info").textContent = ""; return; }
    try {
      const res = await api(`/tracks/search?q=${encodeURIComponent(q)}&limit=20`);
      if (seq !== searchSeq) return;
      clear(ol);
      res.forEach((t) => ol.appendChild(trackItem(t, { onClick: addToSession, hint: "add to session" })));
      $("search-info").textContent = res.length ? "Click a track to add it." : "No match.";
    } catch (e) {
      $("search-info").textContent = e.message;
    }
  }

  $("search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(doSearch, 150);
  });
  $("clear").addEventListener("click", () => { session.length = 0; renderSession(); refreshRecs(); });

  // Listener view: one page of PAGE listeners at a time in a scroll box, filtered in place;
  // Enter in the filter opens any listener by its exact id.
  const PAGE = 50;
  let listenersLoaded = false;
  let offset = 0;
  let total = 0;
  let pageSeq = 0;
  let listenerSeq = 0;
  let current = null;
  const historyLength = new Map();  // id -> plays, from the listing (the detail is capped)

  function showTab(name) {
    $("view-session").hidden = name !== "session";
    $("view-listener").hidden = name !== "listener";
    $("tab-session").classList.toggle("active", name === "session");
    $("tab-listener").classList.toggle("active", name === "listener");
    if (name === "listener" && !listenersLoaded) loadListeners(0);
  }

  async function loadListeners(start) {
    listenersLoaded = true;
    const seq = ++pageSeq;
    let res;
    try {
      res = await api(`/listeners?limit=${PAGE}&offset=${start}`);
    } catch (e) {
      $("listeners-info").textContent = `Listeners unavailable: ${e.message}`;
      return;
    }
    if (seq !== pageSeq) return;
    const ol = $("listeners");
    clear(ol);
    total = res.total;
    offset = start;
    $("listeners-count").textContent = total ? `(${total.toLocaleString()})` : "";
    if (total === 0) {
      $("listeners-info").textContent = res.message || "No held-out listeners in this artifact.";
      $("listener-filter").hidden = true;
      $("listeners-page").textContent = "";
      return;
    }
    $("listeners-info").textContent = "";
    res.listeners.forEach((l) => {
      const li = el("li", "track clickable listener");
      li.dataset.listenerId = l.id;
      historyLength.set(l.id, l.history_length);
      li.dataset.search = `${l.id} ${l.target.title || ""} ${l.target.track_id}`.toLowerCase();
      li.tabIndex = 0;
      if (current && current.id === l.id) li.classList.add("selected");
      const text = el("div", "track-text");
      text.appendChild(el("span", "title", l.id));
      text.appendChild(el("span", "sub", `${l.history_length} plays · next: ${l.target.title || l.target.track_id}`));
      li.appendChild(text);
      li.addEventListener("click", () => loadListener(l.id));
      li.addEventListener("keydown", (e) => { if (e.key === "Enter") loadListener(l.id); });
      ol.appendChild(li);
    });
    ol.scrollTop = 0;
    const last = offset + res.listeners.length;
    $("listeners-page").textContent = `${(offset + 1).toLocaleString()}–${last.toLocaleString()} of ${total.toLocaleString()}`;
    $("listeners-prev").disabled = offset === 0;
    $("listeners-next").disabled = last >= total;
    filterListeners();
  }

  function filterListeners() {
    const q = $("listener-filter").value.trim().toLowerCase();
    let shown = 0;
    document.querySelectorAll("#listeners li").forEach((li) => {
      li.hidden = q !== "" && !li.dataset.search.includes(q);
      if (!li.hidden) shown += 1;
    });
    $("listeners-info").textContent = q && !shown
      ? "No match on this page; press Enter to open that listener id." : "";
  }

  async function loadListener(id) {
    const seq = ++listenerSeq;
    let res;
    try {
      res = await api(`/listeners/${encodeURIComponent(id)}?k=10`);
    } catch (e) {
      if (seq === listenerSeq) $("listeners-info").textContent = e.message;
      return;
    }
    if (seq !== listenerSeq) return;  // a later click superseded this one
    current = res;
    document.querySelectorAll("#listeners li").forEach((n) =>
      n.classList.toggle("selected", n.dataset.listenerId === res.id));
    const shown = res.history;
    const plays = Math.max(historyLength.get(res.id) || 0, shown.length);
    renderHistory($("listener-history"), shown, plays);
    $("listener-info").textContent = plays > shown.length
      ? `${res.id}: last ${shown.length} of ${plays} plays` : `${res.id}: ${plays} plays`;
    $("listener-to-session").hidden = false;
    const target = res.target;
    const name = target.title ? `${target.title}${target.artist ? " — " + target.artist : ""}` : target.track_id;
    const p = $("listener-target");
    clear(p);
    p.appendChild(el("span", "muted", "Really played next: "));
    p.appendChild(el("b", null, name));
    p.appendChild(el("span", res.target_rank === null ? "miss" : "hit-label",
      res.target_rank === null ? " · not in the top 10" : ` · rank ${res.target_rank + 1}`));
    const ol = $("listener-recs");
    clear(ol);
    res.recommendations.forEach((t) =>
      ol.appendChild(trackItem(t, { highlight: t.track_id === target.track_id })));
  }

  $("listener-filter").addEventListener("input", filterListeners);
  $("listener-filter").addEventListener("keydown", (e) => {
    const q = $("listener-filter").value.trim();
    if (e.key === "Enter" && q) loadListener(q);
  });
  $("listeners-prev").addEventListener("click", () => loadListeners(Math.max(0, offset - PAGE)));
  $("listeners-next").addEventListener("click", () => loadListeners(offset + PAGE));

  $("listener-to-session").addEventListener("click", () => {
    if (!current) return;
    session.length = 0;
    current.history.slice(-50).forEach((t) => session.push({ ...t, ts: null, skipped: false }));
    renderSession();
    refreshRecs();
    showTab("session");
  });
  $("tab-session").addEventListener("click", () => showTab("session"));
  $("tab-listener").addEventListener("click", () => showTab("listener"));
  renderSession();
}

// ---------------------------------------------------------------- review panel

function reviewPage() {
  let items = [];
  let k = 10;
  let index = 0;
  let itemSeq = 0;
  let reportSeq = 0;

  const reviewer = () => $("reviewer").value.trim();
  // the server refuses an empty name: no name, no parameter (progress of nobody)
  const asReviewer = (who) => (who ? `?reviewer=${encodeURIComponent(who)}` : "");

  function message(text) {
    $("review-msg").textContent = text || "";
    $("review-msg").hidden = !text;
  }

  async function loadItems() {
    const res = await api(`/review/items${asReviewer(reviewer())}`);
    items = res.items;
    k = res.k;
    const sel = $("item-select");
    clear(sel);
    items.forEach((it, i) => {
      const o = el("option", null, `${i + 1}. ${it.id}  (${it.rated}/${2 * k} rated)`);
      o.value = String(i);
      sel.appendChild(o);
    });
    sel.value = String(index);
    updateProgress();
  }

  function updateProgress() {
    const done = items.filter((it) => it.rated >= 2 * k).length;
    $("progress").textContent = `${done} of ${items.length} listeners fully rated`;
  }

  async function loadItem(i) {
    if (!items.length) return;
    index = Math.max(0, Math.min(items.length - 1, i));
    $("item-select").value = String(index);
    const id = items[index].id;
    const who = reviewer();
    const seq = ++itemSeq;
    const res = await api(`/review/items/${encodeURIComponent(id)}${asReviewer(who)}`);
    if (seq !== itemSeq) return;  // a later request superseded this one
    renderHistory($("history"), res.history, res.history_length);
    $("history-len").textContent = (res.history_length > res.history.length
      ? `last ${res.history.length} of ${res.history_length}` : `${res.history_length} plays`) +
      " · newest first";
    for (const name of ["A", "B"]) {
      const ol = $(`list-${name}`);
      clear(ol);
      res.lists[name].forEach((t, pos) => {
        const li = trackItem(t);
        const box = el("span", "rate-box");
        for (const choice of res.choices) {
          const b = el("button", `rate rate-${choice}`, choice === "wtf" ? "WTF" : choice);
          b.type = "button";
          b.dataset.rating = choice;
          if (res.ratings[`${name}:${pos}`] === choice) b.classList.add("on");
          b.addEventListener("click", () => rate(id, name, pos, choice, box));
          box.appendChild(b);
        }
        li.appendChild(box);
        ol.appendChild(li);
      });
    }
    document.body.dataset.rendered = `${who}|${id}`;  // lets tests know the page settled
  }

  async function rate(item, list, position, rating, box) {
    if (!reviewer()) {
      message("Enter your name first.");
      $("reviewer").focus();
      return;
    }
    message("");
    try {
      await api("/review/rate", { json: { reviewer: reviewer(), item, list, position, rating } });
      const wasNew = !box.querySelector(".on");
      box.querySelectorAll("button").forEach((b) => b.classList.toggle("on", b.dataset.rating === rating));
      if (wasNew) {
        items[index].rated += 1;
        const o = $("item-select").options[index];
        o.textContent = `${index + 1}. ${item}  (${items[index].rated}/${2 * k} rated)`;
        updateProgress();
      }
      if ($("report-box").open) loadReport();
    } catch (e) {
      message(`Not saved: ${e.message}`);
    }
  }

  async function loadReport() {
    const box = $("report");
    const seq = ++reportSeq;
    const r = await api("/review/report");
    if (seq !== reportSeq) return;
    clear(box);
    box.appendChild(el("p", "muted", `${r.ratings} ratings by ${r.reviewers} reviewer(s) on ${r.items} listener(s)`));
    const pct = (x, signed) => (x === null ? "n/a" : `${signed && x > 0 ? "+" : ""}${(100 * x).toFixed(1)}%`);
    const table = el("table", "report");
    const head = el("tr");
    ["model", "ratings", "good", "okay", "WTF", "WTF share", "95% CI (Wilson)"].forEach((h) => head.appendChild(el("th", null, h)));
    table.appendChild(head);
    r.models.forEach((m) => {
      const tr = el("tr");
      tr.dataset.model = m.model;
      [m.model, m.n, m.good, m.okay, m.wtf, pct(m.wtf_share), `${pct(m.wtf_low)} – ${pct(m.wtf_high)}`]
        .forEach((v) => tr.appendChild(el("td", null, String(v))));
      table.appendChild(tr);
    });
    box.appendChild(table);
    r.paired.forEach((d) => {
      box.appendChild(el("p", "paired",
        `WTF share, ${d.model_b} minus ${d.model_a}: ${pct(d.mean_diff, true)} ` +
        `(95% CI ${pct(d.low, true)} – ${pct(d.high, true)}, ${d.units} (reviewer, listener) pairs)`));
    });
  }

  $("reviewer").value = localStorage.getItem("twotower.reviewer") || "";
  $("reviewer").addEventListener("change", async () => {
    localStorage.setItem("twotower.reviewer", reviewer());
    message("");
    await loadItems();
    await loadItem(index);
  });
  $("prev").addEventListener("click", () => loadItem(index - 1));
  $("next").addEventListener("click", () => loadItem(index + 1));
  $("item-select").addEventListener("change", (e) => loadItem(Number(e.target.value)));
  $("report-box").addEventListener("toggle", () => { if ($("report-box").open) loadReport(); });
  loadItems().then(() => loadItem(0)).catch((e) => message(e.message));
}

document.addEventListener("DOMContentLoaded", () => {
  showHealth();
  if (document.body.dataset.page === "demo") demoPage();
  if (document.body.dataset.page === "review") reviewPage();
});
