// merg explore: vanilla JS over the JSON endpoints (no network beyond this server).
"use strict";
const $ = (sel) => document.querySelector(sel);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
};
const api = async (path, options) => {
  const response = await fetch(path, options);
  if (!response.ok) throw new Error((await response.json().catch(() => ({}))).detail || response.statusText);
  return response.json();
};
const state = { offset: 0, limit: 50, total: 0, key: null };

async function loadFacets() {
  const facets = await api("/api/facets");
  $("#store-info").textContent = `${facets.store} (version ${facets.version}, ${facets.rows} utterances)`;
  for (const select of document.querySelectorAll("#filters select")) {
    for (const [value, count] of Object.entries(facets[select.dataset.facet] || {})) {
      select.append(el("option", { value, textContent: `${value} (${count})` }));
    }
  }
  for (const value of Object.keys(facets.emotion)) $("#neighbour-emotion").append(el("option", { value, textContent: value }));
  for (const run of facets.runs) $("#reply-run").append(el("option", { value: run, textContent: run }));
  if (!facets.runs.length) $("#reply-form").hidden = true;
  for (const name of facets.report) {
    const url = `/media/report/${encodeURIComponent(name)}`;
    $("#report").append(name.endsWith(".png") || name.endsWith(".svg") ? el("img", { src: url, alt: name })
      : el("div", {}, el("a", { href: url, textContent: name, target: "_blank" })));
  }
}

function filterQuery() {
  const params = new URLSearchParams({ offset: state.offset, limit: state.limit });
  for (const select of document.querySelectorAll("#filters select")) if (select.value) params.set(select.dataset.facet, select.value);
  if ($("#filter-q").value) params.set("q", $("#filter-q").value);
  return params;
}

async function loadRows() {
  const page = await api(`/api/utterances?${filterQuery()}`);
  state.total = page.total;
  const body = $("#rows tbody");
  body.replaceChildren(...page.items.map((row) => {
    const tr = el("tr", { className: row.key === state.key ? "selected" : "" },
      el("td", { textContent: row.key }), el("td", { textContent: row.speaker }), el("td", { textContent: row.emotion }),
      el("td", { textContent: row.text }), el("td", { textContent: row.face_visible ?? "?" }), el("td", { textContent: (row.failure ?? "").replaceAll(";", "; ") }));
    tr.dataset.key = row.key;
    tr.dataset.emotion = row.emotion;
    tr.addEventListener("click", () => openUtterance(row.key));
    return tr;
  }));
  const last = Math.min(state.offset + state.limit, state.total);
  $("#page-info").textContent = `${state.total ? state.offset + 1 : 0}-${last} of ${state.total}`;
}

function drawBox(box) {
  const overlay = $("#speaker-box");
  overlay.hidden = !box;
  if (!box) return;
  const [x0, y0, x1, y1] = box;
  Object.assign(overlay.style, { left: `${x0 * 100}%`, top: `${y0 * 100}%`, width: `${(x1 - x0) * 100}%`, height: `${(y1 - y0) * 100}%` });
}

function fill(list, entries) {
  list.replaceChildren(...entries.flatMap(([name, value]) => [el("dt", { textContent: name }), el("dd", { textContent: value ?? "-" })]));
}

async function openUtterance(key) {
  state.key = key;
  const row = await api(`/api/utterance/${encodeURI(key)}`);
  $("#detail").hidden = false;
  $("#detail-key").textContent = key;
  const video = $("#clip");
  $("#player").hidden = !row.clip_url;
  $("#no-clip").hidden = !!row.clip_url;
  if (row.clip_url) video.src = row.clip_url; else video.removeAttribute("src");
  drawBox(row.speaker_box);
  $("#sheet").hidden = true;
  $("#sheet-go").hidden = !row.sheet_url;
  $("#sheet-go").onclick = () => { $("#sheet").src = row.sheet_url; $("#sheet").hidden = false; };
  fill($("#labels"), [["speaker", row.speaker], ["text", row.text], ["emotion", row.emotion], ["sentiment", row.sentiment],
    ["face visible", row.face_visible], ["speaker detection", `${row.asd_method ?? "-"} (score ${row.asd_score == null ? "-" : row.asd_score.toFixed(3)})`]]);
  fill($("#provenance"), ["encoder", "encoder_checkpoint", "fusion", "pipeline_version", "config_hash", "clip_sha256", "created_at"].map((k) => [k, row[k]]));
  $("#failures").replaceChildren(...row.failures.map((f) => el("li", { textContent: `${f.stage}: ${f.reason} ${f.detail || ""}` })));
  $("#reply-out").textContent = "";
  for (const tr of document.querySelectorAll("#rows tbody tr")) tr.classList.toggle("selected", tr.dataset.key === key);
  await loadNeighbours();
}

async function loadNeighbours() {
  const params = new URLSearchParams({ column: $("#neighbour-column").value, k: 10 });
  if ($("#neighbour-emotion").value) params.set("emotion", $("#neighbour-emotion").value);
  const found = await api(`/api/similar/${encodeURI(state.key)}?${params}`);
  $("#neighbours").replaceChildren(...found.items.map((n) => {
    const item = el("li", {}, el("a", { href: "#", textContent: n.key, onclick: (e) => { e.preventDefault(); openUtterance(n.key); } }),
      ` ${n.emotion} d=${n._distance.toFixed(3)} ${n.speaker}: ${n.text} `);
    if (n.clip_url) item.append(el("video", { src: n.clip_url, controls: true, preload: "none" }));
    return item;
  }));
  if (found.note) $("#neighbours").append(el("li", { textContent: found.note }));
}

async function reply(event) {
  event.preventDefault();
  $("#reply-out").textContent = "thinking...";
  try {
    const result = await api("/api/reply", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ run: $("#reply-run").value, key: state.key, allow_text_only: $("#reply-text-only").checked }) });
    $("#reply-out").textContent = `${result.next_speaker}: ${result.reply}\n\nused ${result.used}; ${result.notes.join("; ")}`;
  } catch (error) {
    $("#reply-out").textContent = `error: ${error.message}`;
  }
}

// A metric as the report prints it: the value and its bootstrap 95% interval, "0.512 (0.431–0.590)".
function metricText(value, interval) {
  if (value == null || Number.isNaN(value)) return "–";
  const digits = Math.abs(value) >= 10 ? 2 : 3;
  const ok = interval && interval.every((v) => v != null && !Number.isNaN(v));
  return ok ? `${value.toFixed(digits)} (${interval[0].toFixed(digits)}–${interval[1].toFixed(digits)})` : value.toFixed(digits);
}

async function loadResults() {
  const sweep = $("#sweep").value;
  const results = await api(`/api/results${sweep ? `?sweep=${encodeURIComponent(sweep)}` : ""}`);
  if ($("#sweep").options.length === 1) for (const s of results.sweeps) $("#sweep").append(el("option", { value: s, textContent: s }));
  const names = [...new Set(results.cells.flatMap((c) => Object.keys(c.metrics)))];
  $("#cells thead").replaceChildren(el("tr", {}, ...["system", "preset", "split", "N", ...names].map((n) => el("th", { textContent: n }))));
  $("#cells tbody").replaceChildren(...results.cells.map((c) => el("tr", {}, ...[c.system, c.preset, c.split, c.examples,
    ...names.map((n) => metricText(c.metrics[n], (c.intervals || {})[n]))].map((v) => el("td", { textContent: v })))));
  $("#pairs").replaceChildren(...results.pairs.map((p) => el("div", { className: "pair" },
    el("div", {}, el("strong", { textContent: p.key })), el("pre", { textContent: p.history.join("\n") }),
    el("div", { textContent: `reference (${p.next_speaker}): ${p.reference}` }),
    ...Object.entries(p.replies).map(([system, r]) => el("div", { className: "reply",
      textContent: `${system}: ${r.reply}  [BERTScore ${(r.bertscore_f1 ?? NaN).toFixed(3)}, emotion ${r.emotion_alignment ?? "-"}, sentiment ${r.sentiment_alignment ?? "-"}]` })))));
}

function showTab(name) {
  $("#browse").hidden = name !== "browse";
  $("#results").hidden = name !== "results";
  $("#tab-browse").classList.toggle("active", name === "browse");
  $("#tab-results").classList.toggle("active", name === "results");
  if (name === "results") loadResults();
}

let searchTimer = null;
$("#filters").addEventListener("change", () => { state.offset = 0; loadRows(); });
$("#filter-q").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(() => { state.offset = 0; loadRows(); }, 200); });
$("#filters").addEventListener("submit", (e) => e.preventDefault());
$("#prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); loadRows(); });
$("#next").addEventListener("click", () => { if (state.offset + state.limit < state.total) { state.offset += state.limit; loadRows(); } });
$("#neighbour-form").addEventListener("change", loadNeighbours);
$("#reply-form").addEventListener("submit", reply);
$("#sweep").addEventListener("change", loadResults);
$("#tab-browse").addEventListener("click", () => showTab("browse"));
$("#tab-results").addEventListener("click", () => showTab("results"));
loadFacets().then(loadRows);
