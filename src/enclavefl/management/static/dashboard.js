// The enclavefl dashboard: one page over the job's /api/v1 routes, live through its event stream.
//
// How this works: on load the page reads the status, every metrics row and the
// worker table, then follows GET /api/v1/events (Server-Sent Events: "id: seq",
// "event: kind", "data: json"). The stream is read with fetch() rather than
// EventSource because EventSource cannot send the Authorization header the API
// asks for; a dropped stream is reopened after the last event seen (?after=seq).
// Round events add points to the charts, worker and update events refresh the
// worker table, attestation and control events go to the audit feed. Every
// string that comes from the API is put in the page with textContent or an SVG
// attribute, never parsed as HTML. The token is kept in sessionStorage (this tab
// only) and sent as "Authorization: Bearer <token>".
"use strict";

(() => {
  const API = "/api/v1";
  const TOKEN_KEY = "enclavefl.token";
  const MAX_FEED = 200;
  const MAX_REFUSED = 50;
  const STATUS_EVERY_MS = 5000;
  const RECONNECT_MS = 2000;
  const ENDED = new Set(["finished", "failed", "stopped"]);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const EVIDENCE_LABEL = { sgx: "SGX", tdx: "TDX", simulated: "SIMULATED — NOT A REAL TEE", none: "none" };

  const state = {
    status: null,        // the last /status body
    statusAt: 0,         // Date.now() when it arrived
    rows: new Map(),     // round number -> metrics row (a retried round replaces its row)
    workers: [],
    servers: [],         // a cluster's live servers (GET /cluster/servers)
    cluster: null,       // null: not known yet; true: a cluster's scheduler; false: one PS
    leader: "",          // the server holding the leader lease
    refused: [],         // attestation refusals, newest first
    lastSeq: 0,
    streamAbort: null,
    timers: new Map(),
    authNeeded: false,
  };

  // ------------------------------------------------------------ small helpers
  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function setText(id, value) { $(id).textContent = value === null || value === undefined ? "—" : String(value); }

  function isNum(v) { return typeof v === "number" && Number.isFinite(v); }

  function duration(seconds) {
    if (!isNum(seconds)) return "—";
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return h ? `${h}h ${String(m).padStart(2, "0")}m` : m ? `${m}m ${String(r).padStart(2, "0")}s` : `${r}s`;
  }

  function bytes(n) {
    if (!isNum(n)) return "—";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let v = n, i = 0;
    while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
    return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
  }

  function clock(unixSeconds) {
    if (!isNum(unixSeconds)) return "";
    return new Date(unixSeconds * 1000).toLocaleTimeString([], { hour12: false });
  }

  function debounce(name, fn, ms = 300) {
    if (state.timers.has(name)) return;
    state.timers.set(name, setTimeout(() => { state.timers.delete(name); fn(); }, ms));
  }

  function notice(message) {
    const box = $("notice");
    box.textContent = message || "";
    box.hidden = !message;
  }

  // ------------------------------------------------------------ the API
  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

  function authHeaders() {
    const t = token();
    return t ? { Authorization: `Bearer ${t}` } : {};
  }

  class HttpError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  async function api(path, init = {}) {
    const response = await fetch(API + path, {
      ...init, cache: "no-store", headers: { ...authHeaders(), ...(init.headers || {}) },
    });
    if (response.status === 401) {
      askForToken();
      throw new HttpError(401, "this job's bearer token is needed");
    }
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : `HTTP ${response.status}`;
      throw new HttpError(response.status, detail);
    }
    return body;
  }

  function askForToken() {
    state.authNeeded = true;
    renderToken();
    notice("This job's API needs its bearer token: paste the contents of management.token from the run directory.");
  }

  // ------------------------------------------------------------ loading
  async function loadStatus() {
    try {
      state.status = await api("/status");
      state.statusAt = Date.now();
      renderHeader();
    } catch (err) { if (!(err instanceof HttpError && err.status === 401)) notice(`status: ${err.message}`); }
  }

  async function loadRounds() {
    try {
      let offset = 0;
      for (;;) {
        const page = await api(`/rounds?offset=${offset}&limit=1000`);
        for (const row of page.rows) addRow(row);
        offset += page.rows.length;
        if (!page.rows.length || offset >= page.total) break;
      }
      renderCharts();
    } catch (err) { if (!(err instanceof HttpError && err.status === 401)) notice(`rounds: ${err.message}`); }
  }

  async function loadWorkers() {
    try {
      state.workers = await api("/workers");
      renderWorkers();
    } catch (err) { if (!(err instanceof HttpError && err.status === 401)) notice(`workers: ${err.message}`); }
  }

  // A cluster's scheduler serves its servers; one PS answers 404 and the card stays hidden.
  async function loadServers() {
    if (state.cluster === false) return;
    try {
      const body = await api("/cluster/servers");
      state.servers = body.servers;
      state.leader = body.leader || "";
      state.cluster = true;
      renderServers();
    } catch (err) {
      if (err instanceof HttpError && err.status === 404) state.cluster = false;
      else if (!(err instanceof HttpError && err.status === 401)) notice(`servers: ${err.message}`);
    }
  }

  async function loadAll() {
    await loadStatus();
    if (state.authNeeded) return;
    await Promise.all([loadRounds(), loadWorkers(), loadServers()]);
    startStream();
  }

  function addRow(row) {
    if (row && isNum(row.round)) state.rows.set(row.round, row);
  }

  // ------------------------------------------------------------ the event stream
  function startStream() {
    if (state.streamAbort) state.streamAbort.abort();
    const controller = new AbortController();
    state.streamAbort = controller;
    readStream(controller).catch(() => {}).finally(() => {
      if (state.streamAbort !== controller || controller.signal.aborted) return;
      state.streamAbort = null;
      if (!jobEnded()) setTimeout(() => { if (!state.streamAbort) startStream(); }, RECONNECT_MS);
    });
  }

  async function readStream(controller) {
    const response = await fetch(`${API}/events?after=${state.lastSeq}`, {
      headers: { ...authHeaders(), Accept: "text/event-stream" }, cache: "no-store", signal: controller.signal,
    });
    if (response.status === 401) { askForToken(); controller.abort(); return; }
    if (!response.ok || !response.body) throw new HttpError(response.status, "event stream refused");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        dispatchBlock(block);
      }
    }
  }

  function dispatchBlock(block) {
    let id = null, kind = "message";
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "id") id = value;
      else if (field === "event") kind = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return;
    let payload;
    try { payload = JSON.parse(data.join("\n")); } catch (_) { return; }
    if (id !== null && /^\d+$/.test(id)) state.lastSeq = Math.max(state.lastSeq, Number(id));
    onEvent(kind, payload);
  }

  function onEvent(kind, ev) {
    switch (kind) {
      case "round":
        addRow(ev);
        renderCharts();
        if (state.status && isNum(ev.model_version)) {
          state.status = { ...state.status, model_version: Math.max(state.status.model_version, ev.model_version) };
          renderHeader();
        }
        debounce("status", loadStatus);
        debounce("workers", loadWorkers, 500);
        break;
      case "phase":
        if (state.status) {
          state.status = { ...state.status, phase: ev.phase, round: isNum(ev.round) ? ev.round : state.status.round };
          renderHeader();
        }
        debounce("status", loadStatus);
        break;
      case "update":
        debounce("status", loadStatus);
        debounce("workers", loadWorkers, 500);
        break;
      case "worker":
        debounce("workers", loadWorkers, 300);
        break;
      case "attestation":
        addFeed(ev);
        if (ev.decision === "refused") {
          state.refused.unshift(ev);
          state.refused.length = Math.min(state.refused.length, MAX_REFUSED);
          renderRefused();
        }
        break;
      case "control":
        addFeed(ev);
        debounce("status", loadStatus);
        break;
      case "cluster":
        addFeed(ev);
        if (ev.event === "leader") { state.leader = ev.leader; renderServers(); }
        debounce("servers", loadServers, 200);
        debounce("workers", loadWorkers, 500);
        break;
      case "job":
        addFeed(ev);
        if (state.status && typeof ev.state === "string") {
          state.status = { ...state.status, state: ev.state };
          renderHeader();
        }
        debounce("status", loadStatus, 100);
        debounce("workers", loadWorkers, 100);
        break;
      case "missed":
        // Some events fell out of the job's ring before we read them: read the state again.
        notice(`${ev.missed} events were missed; the page re-read the job's state.`);
        loadStatus(); loadRounds(); loadWorkers();
        break;
      default:
        break;
    }
  }

  function jobEnded() { return !!(state.status && ENDED.has(state.status.state)); }

  // ------------------------------------------------------------ header
  function renderHeader() {
    const s = state.status;
    if (!s) return;
    setText("job", s.job);
    document.title = `${s.job} · enclavefl`;
    const pill = $("state");
    pill.textContent = s.state;
    pill.dataset.state = s.state;
    setText("phase", s.phase);
    setText("round", s.round);
    setText("rounds", s.rounds);
    setText("version", `v${s.model_version}`);
    const id = s.identity || {};
    setText("attestation", `${s.attestation_mode}${id.evidence ? ` (${EVIDENCE_LABEL[id.evidence] || id.evidence})` : ""}`);
    $("stop").disabled = jobEnded();
    if (jobEnded() && s.failure) notice(`The job ${s.state}: ${s.failure}`);
    tick();
  }

  function tick() {
    const s = state.status;
    if (!s) return;
    const since = jobEnded() ? 0 : (Date.now() - state.statusAt) / 1000;
    setText("elapsed", duration(s.uptime_s + since));
    setText("eta", jobEnded() ? "—" : isNum(s.eta_s) ? duration(Math.max(0, s.eta_s - since)) : "—");
  }

  // ------------------------------------------------------------ charts (plain SVG)
  const W = 480, PAD = { l: 58, r: 12, t: 10, b: 24 };

  // Draws the axes of a plot from round xLo to xHi and value yMin to yMax; returns the two scales.
  function axes(svg, h, xLo, xHi, yMin, yMax, yFormat) {
    const plotH = h - PAD.t - PAD.b, plotW = W - PAD.l - PAD.r;
    const x = (v) => PAD.l + ((v - xLo) / (xHi - xLo || 1)) * plotW;
    const y = (v) => PAD.t + plotH - ((v - yMin) / (yMax - yMin || 1)) * plotH;
    svg.append(svgEl("line", { class: "axis", x1: PAD.l, y1: PAD.t + plotH, x2: W - PAD.r, y2: PAD.t + plotH }));
    svg.append(svgEl("line", { class: "axis", x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: PAD.t + plotH }));
    for (let i = 0; i <= 4; i += 1) {
      const v = yMin + ((yMax - yMin) * i) / 4;
      svg.append(svgEl("line", { class: "axis", x1: PAD.l - 3, y1: y(v), x2: W - PAD.r, y2: y(v), "stroke-opacity": 0.5 }));
      svg.append(svgEl("text", { class: "tick", x: PAD.l - 6, y: y(v) + 3, "text-anchor": "end" }, yFormat(v)));
    }
    const first = Math.ceil(xLo), last = Math.floor(xHi);
    const step = Math.max(1, Math.ceil((last - first + 1) / 10));
    for (let r = first; r <= last; r += step) {
      svg.append(svgEl("text", { class: "tick", x: x(r), y: h - 8, "text-anchor": "middle" }, r));
    }
    return { x, y };
  }

  // The last round on the x axis: the whole job when it is short, else the rounds so far plus half again
  // (a 1000-round job's first rounds would otherwise be squeezed into the left edge).
  function roundsShown(rows) {
    const last = Math.max(1, ...rows.map((r) => r.round));
    const planned = state.status && isNum(state.status.rounds) ? state.status.rounds : last;
    return Math.max(last, Math.min(planned, Math.max(10, Math.ceil(last * 1.5))));
  }

  function emptyChart(svg, h, message) {
    svg.append(svgEl("text", { class: "empty", x: W / 2, y: h / 2, "text-anchor": "middle" }, message));
  }

  function lineChart(svg, rows, series, { fixedMax, format }) {
    const h = Number(svg.viewBox.baseVal.height) || 220;
    svg.replaceChildren();
    const points = series.map((s) => ({
      ...s, pts: rows.filter((r) => isNum(r[s.key])).map((r) => [r.round, r[s.key]]),
    }));
    const values = points.flatMap((s) => s.pts.map((p) => p[1]));
    if (!values.length) { emptyChart(svg, h, "no completed round yet"); return; }
    const xMax = roundsShown(rows);
    const yMax = fixedMax !== undefined && Math.max(...values) <= fixedMax ? fixedMax : Math.max(...values) * 1.1 || 1;
    const yMin = Math.min(0, ...values);
    const { x, y } = axes(svg, h, 1, Math.max(xMax, 2), yMin, yMax, format);
    for (const s of points) {
      if (!s.pts.length) continue;
      svg.append(svgEl("polyline", { class: s.cls, points: s.pts.map(([r, v]) => `${x(r)},${y(v)}`).join(" ") }));
      for (const [r, v] of s.pts) {
        const dot = svgEl("circle", { class: `point ${s.cls}`, cx: x(r), cy: y(v), r: 3, "data-round": r });
        dot.append(svgEl("title", {}, `round ${r}: ${s.label} ${format(v)}`));
        svg.append(dot);
      }
    }
  }

  function barChart(svg, rows, parts, { stacked, format }) {
    const h = Number(svg.viewBox.baseVal.height) || 180;
    svg.replaceChildren();
    if (!rows.length) { emptyChart(svg, h, "no completed round yet"); return; }
    const total = (r) => parts.reduce((sum, p) => sum + (isNum(r[p.key]) ? r[p.key] : 0), 0);
    const tallest = stacked ? Math.max(...rows.map(total))
      : Math.max(...rows.flatMap((r) => parts.map((p) => (isNum(r[p.key]) ? r[p.key] : 0))));
    const xMax = roundsShown(rows);
    // Each round owns a slot one unit wide, centred on its number.
    const { x, y } = axes(svg, h, 0.5, xMax + 0.5, 0, tallest * 1.1 || 1, format);
    const slot = Math.max(2, Math.min(28, (W - PAD.l - PAD.r) / xMax - 4));
    for (const r of rows) {
      let base = 0;
      parts.forEach((p, i) => {
        const v = isNum(r[p.key]) ? r[p.key] : 0;
        const width = stacked ? slot : slot / parts.length;
        const left = x(r.round) - slot / 2 + (stacked ? 0 : i * width);
        const top = y(base + v), bottom = y(base);
        const bar = svgEl("rect", { class: `bar ${p.cls}`, x: left, y: top, width, height: Math.max(0, bottom - top),
          "data-round": r.round });
        bar.append(svgEl("title", {}, `round ${r.round}: ${p.label} ${format(v)}`));
        svg.append(bar);
        if (stacked) base += v;
      });
    }
  }

  function renderCharts() {
    const rows = [...state.rows.values()].sort((a, b) => a.round - b.round);
    const pct = (v) => `${Math.round(v * 100)}%`;
    const num = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(2));
    lineChart($("chart-accuracy"), rows, [
      { key: "eval_accuracy", cls: "eval", label: "eval accuracy" },
      { key: "train_accuracy", cls: "train", label: "train accuracy" },
    ], { fixedMax: 1, format: pct });
    lineChart($("chart-loss"), rows, [
      { key: "eval_loss", cls: "eval", label: "eval loss" },
      { key: "train_loss", cls: "train", label: "train loss" },
    ], { format: num });
    barChart($("chart-seconds"), rows, [
      { key: "seconds_wait", cls: "wait", label: "wait" },
      { key: "seconds_train", cls: "trainphase", label: "train" },
      { key: "seconds_aggregate", cls: "aggregate", label: "aggregate" },
    ], { stacked: true, format: (v) => `${v >= 10 ? v.toFixed(0) : v.toFixed(1)}s` });
    barChart($("chart-bytes"), rows, [
      { key: "bytes_in", cls: "bytesin", label: "in" },
      { key: "bytes_out", cls: "bytesout", label: "out" },
    ], { stacked: false, format: bytes });
  }

  // ------------------------------------------------------------ tables and feed
  function badges(identity) {
    const cell = el("td");
    const id = identity || {};
    const evidence = Object.hasOwn(EVIDENCE_LABEL, id.evidence) ? id.evidence : "none";
    cell.append(el("span", `badge ${evidence}`, EVIDENCE_LABEL[evidence]));
    if (Array.isArray(id.weaker) && id.weaker.length) {
      const weak = el("span", "badge weaker", `weaker: ${id.weaker.join(", ")}`);
      weak.title = "accepted only because the policy allows this";
      cell.append(weak);
    }
    if (id.tcb_status && id.tcb_status !== "UpToDate") {
      const tcb = el("span", "badge tcb", `TCB ${id.tcb_status}`);
      if (Array.isArray(id.advisories) && id.advisories.length) tcb.title = id.advisories.join(", ");
      cell.append(tcb);
    }
    return cell;
  }

  function renderWorkers() {
    const body = $("workers").tBodies[0];
    const rows = state.workers.map((w) => {
      const tr = el("tr");
      tr.dataset.state = w.state;
      const name = el("td", "", w.name || w.worker_id);
      name.title = w.worker_id;
      const mr = el("td", "mono", w.identity && w.identity.mr_enclave ? `${w.identity.mr_enclave.slice(0, 16)}…` : "—");
      if (w.identity && w.identity.mr_enclave) mr.title = w.identity.mr_enclave;
      tr.append(
        name, el("td", "", w.state), badges(w.identity), mr,
        el("td", "", (w.identity && w.identity.tcb_status) || "—"),
        el("td", "num", w.rounds_contributed), el("td", "num", bytes(w.bytes_in)), el("td", "num", bytes(w.bytes_out)),
        el("td", "num", isNum(w.last_seen_s) ? `${duration(w.last_seen_s)} ago` : "—"), el("td", "", w.reason || ""),
      );
      return tr;
    });
    body.replaceChildren(...rows);
    const active = state.workers.filter((w) => w.state !== "left" && w.state !== "dropped").length;
    setText("worker-count", `${active} active of ${state.workers.length}`);
  }

  function renderServers() {
    if (!state.cluster) return;
    $("servers-card").hidden = false;
    const rows = (state.servers || []).map((m) => {
      const tr = el("tr");
      tr.append(el("td", "", m.id), el("td", "mono", m.address || "—"), el("td", "", m.id === state.leader ? "leader" : ""));
      return tr;
    });
    $("servers").tBodies[0].replaceChildren(...rows);
    setText("server-count", `${rows.length} live`);
  }

  function renderRefused() {
    const rows = state.refused.map((ev) => {
      const tr = el("tr");
      tr.append(el("td", "", clock(ev.time)), el("td", "", ev.peer || "—"), el("td", "", ev.evidence || "—"),
        el("td", "mono", ev.field || "—"), el("td", "", ev.reason || ""));
      return tr;
    });
    $("refused").tBodies[0].replaceChildren(...rows);
  }

  function describe(ev) {
    switch (ev.kind) {
      case "attestation": {
        const weaker = Array.isArray(ev.weaker) && ev.weaker.length ? ` (weaker: ${ev.weaker.join(", ")})` : "";
        const why = ev.decision === "refused" ? `: ${ev.field ? `${ev.field}: ` : ""}${ev.reason || ""}` : "";
        return `${ev.peer || "?"} ${ev.decision || "?"} [${EVIDENCE_LABEL[ev.evidence] || ev.evidence || "?"}]${weaker}${why}`;
      }
      case "control": {
        const extra = Object.entries(ev).filter(([k]) => !["seq", "time", "kind", "action", "by"].includes(k))
          .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
        return `${ev.action || "?"} by ${ev.by || "?"}${extra ? ` ${extra}` : ""}`;
      }
      case "job":
        return `job ${ev.state || "?"}${ev.reason ? `: ${ev.reason}` : ""}`;
      case "cluster": {
        const list = (xs) => (Array.isArray(xs) && xs.length ? xs.join(", ") : "none");
        if (ev.event === "servers") return `servers: ${list(ev.servers)} (joined ${list(ev.joined)}, left ${list(ev.left)})`;
        if (ev.event === "leader") return `${ev.leader || "?"} leads`;
        if (ev.event === "store_down") return `store unreachable, rounds pause: ${ev.reason || ""}`;
        if (ev.event === "store_back") return `store reachable again (${ev.reason || ""})`;
        if (ev.event === "store_emptied") return `store emptied: ${ev.reason || ""}`;
        return JSON.stringify(ev);
      }
      default:
        return JSON.stringify(ev);
    }
  }

  function addFeed(ev) {
    const li = el("li", ev.decision === "refused" ? "refused" : "");
    li.dataset.kind = ev.kind;
    li.append(el("time", "", clock(ev.time)), el("span", "kind", ev.kind), el("span", "", describe(ev)));
    const feed = $("audit");
    feed.prepend(li);
    while (feed.children.length > MAX_FEED) feed.lastElementChild.remove();
  }

  // ------------------------------------------------------------ token and stop
  function renderToken() {
    const has = !!token();
    $("token-forget").hidden = !has;
    $("token-state").textContent = has ? "token set" : state.authNeeded ? "needed" : "";
  }

  function saveToken(event) {
    event.preventDefault();
    const value = $("token-input").value.trim();
    $("token-input").value = "";
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    state.authNeeded = false;
    notice("");
    renderToken();
    loadAll();
  }

  function forgetToken() {
    sessionStorage.removeItem(TOKEN_KEY);
    renderToken();
  }

  function openStop() {
    if (!token()) {
      notice("Stopping the job needs its bearer token: paste management.token from the run directory first.");
      $("token-input").focus();
      return;
    }
    $("stop-error").hidden = true;
    $("stop-dialog").showModal();
  }

  async function confirmStop(event) {
    event.preventDefault();
    const mode = new FormData($("stop-form")).get("mode") === "abort" ? "abort" : "finish";
    const button = $("stop-confirm");
    button.disabled = true;
    try {
      await api("/stop", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ mode }),
      });
      $("stop-dialog").close();
      $("stop").disabled = true;
      notice(mode === "finish" ? "Stop requested: the open round finishes, then the job ends."
        : "Stop requested: the open round is abandoned and the job ends.");
      debounce("status", loadStatus, 100);
    } catch (err) {
      const box = $("stop-error");
      box.textContent = err.status === 401 ? "The token was refused: check management.token." : err.message;
      box.hidden = false;
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------ start
  function start() {
    $("token-form").addEventListener("submit", saveToken);
    $("token-forget").addEventListener("click", forgetToken);
    $("stop").addEventListener("click", openStop);
    $("stop-cancel").addEventListener("click", () => $("stop-dialog").close());
    $("stop-form").addEventListener("submit", confirmStop);
    renderToken();
    renderCharts();
    loadAll();
    setInterval(tick, 1000);
    setInterval(() => { if (!state.authNeeded && !jobEnded()) loadStatus(); }, STATUS_EVERY_MS);
  }

  document.addEventListener("DOMContentLoaded", start);
})();
