// rlsedit console: plain JavaScript, no libraries. Every data call carries the bearer token the
// user typed (kept in this tab's sessionStorage); the server decides what a token may do.
"use strict";

const TOKEN_KEY = "rlsedit.console.token";
const PAGE = 25;
const SERIES = ["#2f5fd0", "#c23b30", "#1e8a4c", "#b7791f", "#7b3fb5", "#178a94", "#6b7385"];
const $ = (id) => document.getElementById(id);
const state = { scopes: [], offset: 0, total: 0, version: null };

// ---- HTTP --------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error.message : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body, contentType) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  let data;
  if (body !== undefined) {
    headers["Content-Type"] = contentType || "application/json";
    data = typeof body === "string" ? body : JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: data, cache: "no-store" });
  let parsed = null;
  try { parsed = await response.json(); } catch (e) { parsed = null; }
  if (!response.ok) throw new ApiError(response.status, parsed);
  return parsed;
}

function show(el, text) {
  el.textContent = text;
  el.hidden = !text;
}

function canEdit() { return state.scopes.includes("edit"); }

function setVersion(v) {
  if (v === undefined || v === null) return;
  state.version = v;
  $("version").textContent = "weight version " + v;
}

function when(t) {
  if (t === null || t === undefined) return "";
  return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// ---- token and tabs ----------------------------------------------------------------------------

async function whoami() {
  show($("banner"), "");
  try {
    const me = await api("GET", "/v1/console/whoami");
    state.scopes = me.scopes;
    $("model").textContent = me.model_id;
    const who = $("who");
    who.replaceChildren(document.createTextNode(me.auth ? me.name : "no tokens required"),
      ...me.scopes.map((s) => el("span", { class: "scope " + s }, s)));
    setVersion(me.weight_version);
    const chat = document.querySelector("input[name=ask-mode][value=chat]");
    chat.disabled = !me.chat;  // the model has no chat template: raw prompts only
    if (!me.chat) document.querySelector("input[name=ask-mode][value=raw]").checked = true;
  } catch (e) {
    state.scopes = [];
    $("who").textContent = "";
    show($("banner"), e.status === 401 ? "Enter a bearer token to use this console: " + e.message : e.message);
  }
  applyScopes();
}

function applyScopes() {
  const editing = canEdit();
  $("edit-fields").disabled = !editing;
  $("upload-fields").disabled = !editing;
  $("edit-scope").hidden = editing || state.scopes.length === 0;
  document.querySelectorAll("button.undo").forEach((b) => { b.hidden = !editing; b.disabled = !editing; });
}

function selectTab(name) {
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll("section.tab").forEach((s) => { s.hidden = s.id !== "tab-" + name; });
  if (name === "edits") loadEdits();
  if (name === "health") loadHealth();
}

// ---- Ask ---------------------------------------------------------------------------------------

async function ask(event) {
  event.preventDefault();
  show($("ask-error"), "");
  const mode = document.querySelector("input[name=ask-mode]:checked").value;
  const body = { prompt: $("ask-prompt").value, mode, max_tokens: Number($("ask-max").value) };
  $("ask-go").disabled = true;
  $("ask-edited").textContent = "…";
  $("ask-unedited").textContent = "…";
  try {
    const r = await api("POST", "/v1/console/ask", body);
    $("ask-edited").textContent = r.edited.text;
    $("ask-unedited").textContent = r.unedited.text;
    $("ask-version").textContent = "(weight version " + r.weight_version + ")";
    $("ask-edited").dataset.version = r.weight_version;
    setVersion(r.weight_version);
  } catch (e) {
    $("ask-edited").textContent = "";
    $("ask-unedited").textContent = "";
    show($("ask-error"), e.message);
  } finally {
    $("ask-go").disabled = false;
  }
}

// ---- Edit --------------------------------------------------------------------------------------

async function pollProgress(until) {
  const box = $("edit-progress");
  while (!until.done) {
    try {
      const p = await api("GET", "/v1/console/progress");
      const run = p.running;
      const queued = p.queued_edits;
      const text = run
        ? `computing ${run.ids.length} edit(s) for ${run.seconds.toFixed(1)} s` +
          (queued ? `, ${queued} queued` : "")
        : queued ? `${queued} edit(s) queued` : "waiting for the edit worker";
      if (!until.done) { $("edit-progress-text").textContent = text; box.hidden = false; }
    } catch (e) { /* progress is best effort; the edit's own answer reports errors */ }
    await new Promise((r) => setTimeout(r, 400));
  }
  box.hidden = true;
}

async function submitEdits(body, contentType) {
  show($("edit-error"), "");
  show($("edit-result"), "");
  const until = { done: false };
  $("edit-go").disabled = $("upload-go").disabled = true;
  pollProgress(until);
  try {
    const r = await api("POST", "/v1/edits", body, contentType);
    show($("edit-result"), `Applied ${r.applied} edit(s) (${r.ids.join(", ")}) in ${r.seconds} s; ` +
      `weight version ${r.weight_version}.`);
    setVersion(r.weight_version);
    return true;
  } catch (e) {
    show($("edit-error"), e.message);
    return false;
  } finally {
    until.done = true;
    $("edit-progress").hidden = true;
    $("edit-go").disabled = $("upload-go").disabled = false;
  }
}

async function editForm(event) {
  event.preventDefault();
  const record = { prompt: $("edit-prompt").value, subject: $("edit-subject").value,
                   target_new: $("edit-target").value };
  if ($("edit-id").value.trim()) record.id = $("edit-id").value.trim();
  if (await submitEdits(record)) $("edit-id").value = "";
}

async function upload(event) {
  event.preventDefault();
  const file = $("upload-file").files[0];
  if (!file) { show($("edit-error"), "choose a JSONL file first"); return; }
  await submitEdits(await file.text(), "application/jsonl");
}

// ---- Edits -------------------------------------------------------------------------------------

function checkCell(check) {
  if (!check) return [el("span", { class: "muted" }, "—")];
  return [el("span", { class: check.says ? "says-yes" : "says-no" }, check.says ? "yes" : "no"),
          el("span", { class: "gen", title: "greedy continuation at weight version " + check.weight_version },
             "“" + check.generation + "”")];
}

function editRow(item) {
  const cell = el("td", { class: "check" }, ...checkCell(item.check));
  const check = el("button", { class: "small check-one", type: "button" }, "check");
  check.addEventListener("click", () => runChecks([item.id]));
  const actions = el("td", {}, check);
  if (item.status === "live") {
    const undo = el("button", { class: "danger undo", type: "button" }, "Undo");
    undo.addEventListener("click", () => undoEdit(item.id, undo));
    undo.hidden = undo.disabled = !canEdit();
    actions.append(" ", undo);
  }
  const prompt = String(item.prompt).replace("{}", "[" + item.subject + "]");
  return el("tr", { "data-id": item.id, class: item.status },
    el("td", { class: "id" }, item.id), el("td", {}, prompt), el("td", {}, item.target_new),
    el("td", {}, when(item.accepted_at)), el("td", {}, item.batch),
    el("td", {}, item.status + (item.undone_at ? " " + when(item.undone_at) : "")), cell, actions);
}

async function loadEdits() {
  show($("edits-error"), "");
  const q = $("edits-q").value.trim();
  const params = new URLSearchParams({ status: $("edits-status").value, offset: state.offset, limit: PAGE });
  if (q) params.set("q", q);
  try {
    const page = await api("GET", "/v1/console/edits?" + params);
    state.total = page.total;
    $("edits-table").querySelector("tbody").replaceChildren(...page.data.map(editRow));
    $("edits-range").textContent = page.total
      ? `${page.offset + 1}–${page.offset + page.data.length} of ${page.total}` : "no edits";
    $("edits-prev").disabled = page.offset === 0;
    $("edits-next").disabled = !page.has_more;
    setVersion(page.weight_version);
  } catch (e) {
    show($("edits-error"), e.message);
  }
}

async function runChecks(ids) {
  if (!ids.length) return;
  show($("edits-error"), "");
  for (const id of ids) {
    const row = document.querySelector(`#edits-table tr[data-id="${CSS.escape(id)}"] td.check`);
    if (row) row.replaceChildren(el("span", { class: "muted" }, "checking…"));
  }
  try {
    const r = await api("POST", "/v1/console/check", { ids });
    for (const c of r.data) {
      const row = document.querySelector(`#edits-table tr[data-id="${CSS.escape(c.id)}"] td.check`);
      if (row) row.replaceChildren(...checkCell(c));
    }
    setVersion(r.weight_version);
  } catch (e) {
    show($("edits-error"), e.message);
  }
}

async function undoEdit(id, button) {
  if (!button.classList.contains("confirm")) {  // a second click within 5 s confirms
    button.classList.add("confirm");
    button.textContent = "Confirm undo";
    setTimeout(() => { button.classList.remove("confirm"); button.textContent = "Undo"; }, 5000);
    return;
  }
  button.disabled = true;
  try {
    const r = await api("DELETE", "/v1/edits/" + encodeURIComponent(id));
    setVersion(r.weight_version);
    await loadEdits();
  } catch (e) {
    button.disabled = false;
    show($("edits-error"), e.message);
  }
}

// ---- Health: charts drawn as inline SVG --------------------------------------------------------

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(v) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a >= 1e4 || a < 1e-2) ? v.toExponential(1) : (+v.toPrecision(3)).toString();
}

function ticks(lo, hi, count) {
  const step = (hi - lo) / count;
  return Array.from({ length: count + 1 }, (_, i) => lo + i * step);
}

function frame(width, height, pad) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  return { root, x0: pad.l, x1: width - pad.r, y0: height - pad.b, y1: pad.t };
}

function emptyChart(host, message) {
  const f = frame(520, 80, { l: 10, r: 10, t: 10, b: 10 });
  f.root.append(svg("text", { x: 260, y: 45, "text-anchor": "middle" }, message));
  host.replaceChildren(f.root);
}

// bars per layer, one per series side by side; log: log10 axis (for S's eigenvalues and condition)
function barChart(host, labels, series, { log = false } = {}) {
  const ok = (v) => v !== null && v !== undefined && isFinite(v) && (!log || v > 0);
  const known = series.flatMap((s) => s.values.filter(ok));
  if (!known.length) return emptyChart(host, "no value yet");
  const f = frame(520, 210, { l: 56, r: 12, t: 16, b: 34 });
  const t = (v) => (log ? Math.log10(v) : v);
  const lo = log ? Math.floor(Math.min(0, ...known.map(t))) : 0;
  const hi = log ? Math.ceil(Math.max(...known.map(t), lo + 1)) : Math.max(...known) * 1.15 || 1;
  const y = (v) => f.y0 - ((t(v) - lo) / (hi - lo)) * (f.y0 - f.y1);
  for (const tv of ticks(lo, hi, log ? Math.min(4, hi - lo) : 4)) {
    const yy = f.y0 - ((tv - lo) / (hi - lo)) * (f.y0 - f.y1);
    f.root.append(svg("line", { x1: f.x0, x2: f.x1, y1: yy, y2: yy, class: "grid" }),
      svg("text", { x: f.x0 - 6, y: yy + 4, "text-anchor": "end" }, log ? fmt(10 ** tv) : fmt(tv)));
  }
  const slot = (f.x1 - f.x0) / labels.length;
  const w = Math.min(60 / series.length, (slot * 0.7) / series.length);
  labels.forEach((label, i) => {
    const cx = f.x0 + slot * (i + 0.5);
    series.forEach((s, k) => {
      const v = s.values[i];
      const bx = cx - (w * series.length) / 2 + k * w;
      if (ok(v)) {
        const top = Math.min(y(v), f.y0 - 1);
        const bar = svg("rect", { x: bx + 1, y: top, width: w - 2, height: Math.max(1, f.y0 - top),
                                  fill: s.color || SERIES[0], class: "bar" });
        bar.append(svg("title", {}, `layer ${label}, ${s.name}: ${v}`));
        f.root.append(bar);
        if (w >= 34) f.root.append(svg("text", { x: bx + w / 2, y: top - 4, "text-anchor": "middle", class: "label" }, fmt(v)));
      } else {
        f.root.append(svg("text", { x: bx + w / 2, y: f.y0 - 6, "text-anchor": "middle" }, "n/a"));
      }
    });
    f.root.append(svg("text", { x: cx, y: f.y0 + 16, "text-anchor": "middle" }, "layer " + label));
  });
  f.root.append(svg("line", { x1: f.x0, x2: f.x1, y1: f.y0, y2: f.y0, class: "axis" }));
  host.replaceChildren(f.root);
  if (series.length > 1) legend(host, series.map((s) => s.name), series.map((s) => s.color));
}

function legend(host, names, colors) {
  const box = el("div", { class: "legend" });
  names.forEach((name, i) => {
    const sw = svg("svg", { width: 12, height: 10, viewBox: "0 0 12 10" });
    sw.append(svg("rect", { width: 12, height: 10, rx: 2, fill: (colors || SERIES)[i % SERIES.length] }));
    box.append(sw, " " + name + "  ");
  });
  host.append(box);
}

function axes(f, xmax, ymax, xlabel, yfmt) {
  for (const tv of ticks(0, ymax, 4)) {
    const yy = f.y0 - (tv / ymax) * (f.y0 - f.y1);
    f.root.append(svg("line", { x1: f.x0, x2: f.x1, y1: yy, y2: yy, class: "grid" }),
      svg("text", { x: f.x0 - 6, y: yy + 4, "text-anchor": "end" }, yfmt(tv)));
  }
  const step = Math.max(1, Math.ceil(xmax / 8));  // whole numbers of edits
  for (let tv = 0; tv <= xmax; tv += step) {
    const xx = f.x0 + (tv / xmax) * (f.x1 - f.x0);
    f.root.append(svg("text", { x: xx, y: f.y0 + 16, "text-anchor": "middle" }, tv));
  }
  f.root.append(svg("line", { x1: f.x0, x2: f.x1, y1: f.y0, y2: f.y0, class: "axis" }),
    svg("line", { x1: f.x0, x2: f.x0, y1: f.y0, y2: f.y1, class: "axis" }),
    svg("text", { x: (f.x0 + f.x1) / 2, y: f.y0 + 30, "text-anchor": "middle" }, xlabel));
}

function historyChart(host, layers, points) {
  if (!points.length) return emptyChart(host, "no point yet");
  const f = frame(520, 220, { l: 56, r: 14, t: 12, b: 40 });
  const xmax = Math.max(1, ...points.map((p) => p.live_edits));
  const ymax = Math.max(1e-12, ...points.flatMap((p) => layers.map((l) => p.drift[l] || 0))) * 1.1;
  axes(f, xmax, ymax, "live edits", fmt);
  const x = (v) => f.x0 + (v / xmax) * (f.x1 - f.x0);
  const y = (v) => f.y0 - (v / ymax) * (f.y0 - f.y1);
  layers.forEach((l, i) => {
    const color = SERIES[i % SERIES.length];
    const pts = points.map((p) => [x(p.live_edits), y(p.drift[l] || 0)]);
    if (pts.length > 1) {
      f.root.append(svg("polyline", { points: pts.map((p) => p.join(",")).join(" "), fill: "none",
                                      stroke: color, "stroke-width": 1.5, "stroke-opacity": 0.6 }));
    }
    points.forEach((p, k) => {
      const dot = svg("circle", { cx: pts[k][0], cy: pts[k][1], r: 3.5, fill: color, class: "drift-point" });
      dot.append(svg("title", {}, `weight version ${p.weight_version}, ${p.live_edits} live edits, layer ${l}: ${p.drift[l]}`));
      f.root.append(dot);
    });
  });
  host.replaceChildren(f.root);
  legend(host, layers.map((l) => "layer " + l));
}

function forgettingChart(host, curve) {
  const points = curve.points;
  if (!points.length) return emptyChart(host, "no live edits");
  const f = frame(1060, 240, { l: 56, r: 14, t: 14, b: 40 });
  const xmax = Math.max(1, curve.live_edits - 1);
  axes(f, xmax, 1, "edit position among the live edits (0 = accepted first)", (v) => Math.round(v * 100) + "%");
  const x = (v) => f.x0 + (v / xmax) * (f.x1 - f.x0);
  const y = (v) => f.y0 - v * (f.y0 - f.y1);
  // success rate in up to 8 equal bins of position, drawn as a line through the bin centres
  const bins = Math.min(8, points.length);
  const rate = [];
  for (let b = 0; b < bins; b++) {
    const lo = (b * (xmax + 1)) / bins, hi = ((b + 1) * (xmax + 1)) / bins;
    const inBin = points.filter((p) => p.position >= lo && p.position < hi);
    if (inBin.length) rate.push([x((lo + hi - 1) / 2), y(inBin.filter((p) => p.says).length / inBin.length)]);
  }
  if (rate.length > 1) f.root.append(svg("polyline", { points: rate.map((p) => p.join(",")).join(" "), class: "rate" }));
  points.forEach((p, k) => {
    const jitter = ((k * 37) % 11) / 11 * 0.06;  // spread the 0/1 dots a little so they do not hide each other
    const dot = svg("circle", { cx: x(p.position), cy: y(p.says ? 1 - jitter : jitter), r: 4,
                                class: (p.says ? "yes" : "no") + " forget-point" });
    dot.append(svg("title", {}, `${p.id} (position ${p.position}, batch ${p.batch}): ${p.says ? "says it" : "does not say it"}`));
    f.root.append(dot);
  });
  host.replaceChildren(f.root);
  const said = points.filter((p) => p.says).length;
  host.append(el("div", { class: "legend" },
    `${said} of ${points.length} sampled live edits said now (weight version ${curve.weight_version}` +
    `${curve.cached ? ", cached" : ""}); line: success rate by position bin`));
}

async function loadHealth() {
  show($("health-error"), "");
  $("health-note").textContent = "computing…";
  try {
    const [status, drift] = await Promise.all([api("GET", "/v1/state"), api("GET", "/v1/console/drift")]);
    const diag = status.layer_diagnostics || {};
    const layers = Object.keys(diag);
    const pick = (k) => layers.map((l) => (diag[l][k] === undefined ? null : diag[l][k]));
    barChart($("chart-drift"), layers, [{ name: "drift", values: pick("drift_fro") }]);
    barChart($("chart-anchor"), layers, [{ name: "anchor residual", values: pick("anchor_residual") }]);
    barChart($("chart-cond"), layers, [
      { name: "λmin(S)", values: pick("S_eig_min_last"), color: SERIES[5] },
      { name: "λmax(S)", values: pick("S_eig_max_last"), color: SERIES[4] },
      { name: "cond(S) = λmax/λmin", values: pick("S_condition_last"), color: SERIES[0] }], { log: true });
    historyChart($("chart-history"), drift.layers, drift.points);
    setVersion(status.weight_version);
    $("health-note").textContent = `${status.edits_applied} live, ${status.edits_undone} undone; computing the forgetting curve…`;
    const n = Math.max(1, Math.min(200, Number($("health-n").value) || 48));
    const curve = await api("GET", `/v1/console/forgetting?n=${n}&seed=0`);
    forgettingChart($("chart-forgetting"), curve);
    $("health-note").textContent = `${status.edits_applied} live, ${status.edits_undone} undone, method ${status.method}`;
  } catch (e) {
    $("health-note").textContent = "";
    show($("health-error"), e.message);
  }
}

// ---- wiring ------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
    whoami();
  });
  $("token-forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); $("token").value = ""; whoami(); });
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => selectTab(b.dataset.tab)));
  $("ask-form").addEventListener("submit", ask);
  $("edit-form").addEventListener("submit", editForm);
  $("upload-form").addEventListener("submit", upload);
  $("edits-form").addEventListener("submit", (e) => { e.preventDefault(); state.offset = 0; loadEdits(); });
  $("edits-status").addEventListener("change", () => { state.offset = 0; loadEdits(); });
  $("edits-prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadEdits(); });
  $("edits-next").addEventListener("click", () => { state.offset += PAGE; loadEdits(); });
  $("edits-check-page").addEventListener("click", () =>
    runChecks([...document.querySelectorAll("#edits-table tbody tr")].map((r) => r.dataset.id)));
  $("health-refresh").addEventListener("click", loadHealth);
  whoami();
});
