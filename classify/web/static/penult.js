// penult serve: the Similar page asks /api/neighbors (a stored image by key, or an upload), the
// Score page /api/predict, and each draws the answer. No framework, no build step.
"use strict";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

function showHits(hits, queryLabel) {
  const grid = document.getElementById("hits");
  grid.replaceChildren();
  for (const h of hits) {
    const cls = queryLabel && h.label === queryLabel ? "same" : "";
    // h.key is the stored name percent-encoded byte for byte (exact even where it is not UTF-8)
    const img = el("img", { src: "/thumb/" + h.key, alt: h.path, width: 160, height: 160 });
    const link = el("a", { href: "/similar?key=" + h.key, title: h.path }, img);
    const cap = el("figcaption", {}, el("span", { class: cls }, h.label), el("br"),
                   el("span", { class: "score" }, h.score.toFixed(3)));
    grid.append(el("figure", { class: "hit", "data-path": h.path, "data-label": h.label }, link, cap));
  }
}

function say(text, isError) {
  const m = document.getElementById("message");
  m.textContent = text;
  m.className = "message" + (isError ? " error" : "");
}

async function answer(response) {
  let body;
  try { body = await response.json(); } catch { body = { error: "the server sent no answer (" + response.status + ")" }; }
  if (!response.ok || body.error) { say(body.error || response.statusText, true); return null; }
  return body;
}

async function byKey(key, k) {  // key: already percent-encoded (the page's data-key)
  say("searching…");
  const body = await answer(await fetch("/api/neighbors?k=" + k + "&key=" + key));
  if (body) { say(body.hits.length + " most similar to " + body.query.path); showHits(body.hits, body.query.label); }
}

async function byUpload(file, k) {
  say("embedding " + file.name + "…");
  const form = new FormData();
  form.append("file", file);
  const body = await answer(await fetch("/api/neighbors?k=" + k, { method: "POST", body: form }));
  if (!body) return;
  const q = document.getElementById("query");
  const img = el("img", { src: URL.createObjectURL(file), alt: file.name });
  q.replaceChildren(el("figure", {}, img, el("figcaption", {}, file.name)));
  say(body.hits.length + " most similar to " + file.name);
  showHits(body.hits, "");
}

function showScores(results, files) {
  const table = document.getElementById("scores");
  table.replaceChildren(el("tr", {}, el("th", {}, "image"), el("th", {}, "prediction"),
                           el("th", {}, "top labels")));
  results.forEach((r, i) => {
    const img = el("img", { src: URL.createObjectURL(files[i]), alt: r.upload });
    let said;
    if (r.error) said = el("span", { class: "err" }, r.error);
    else if (r.unknown) said = el("span", { class: "unknown" }, r.label + " (no class passed its threshold)");
    else said = el("strong", {}, r.label + " " + r.probability.toFixed(3));
    const cell = el("td", { class: "prediction" }, said);
    if (r.path.length > 1) cell.append(el("br"), el("span", { class: "muted" }, r.path.join(" › ")));
    const tops = el("td", { class: "top" }, r.top.map((t) => t.label + " " + t.probability.toFixed(3)).join(", "));
    table.append(el("tr", { class: "scored", "data-upload": r.upload, "data-label": r.label },
                    el("td", {}, img, el("br"), r.upload), cell, tops));
  });
}

function csvCell(v) {
  // as `penult predict` writes its CSV: a cell a spreadsheet would run as a formula is quoted
  let s = String(v ?? "");
  if (/^[=+\-@\t\r]/.test(s)) s = "'" + s;
  return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
}

function scoresCsv(results, k) {
  const head = ["image", "label", "probability", "unknown", "path"];
  for (let i = 1; i <= k; i++) head.push("top" + i, "p" + i);
  head.push("error");
  const rows = [head];
  for (const r of results) {
    const row = [r.upload, r.label ?? "", r.error ? "" : (r.probability ?? 0).toFixed(6),
                 r.unknown ? "yes" : "", (r.path || []).join(" > ")];
    for (let i = 0; i < k; i++) {
      const t = (r.top || [])[i];
      row.push(t ? t.label : "", t ? t.probability.toFixed(6) : "");
    }
    row.push(r.error || "");
    rows.push(row);
  }
  return rows.map((row) => row.map(csvCell).join(",")).join("\r\n") + "\r\n";
}

function offerCsv(results, k) {
  const blob = new Blob([scoresCsv(results, k)], { type: "text/csv" });
  const link = document.getElementById("download");
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(blob);
  link.hidden = false;
}

async function score(files, k) {
  say("scoring " + files.length + " image" + (files.length > 1 ? "s" : "") + "…");
  const form = new FormData();
  for (const f of files) form.append("file", f);
  const body = await answer(await fetch("/api/predict?k=" + k, { method: "POST", body: form }));
  if (!body) return;
  say(body.results.length + " scored");
  showScores(body.results, files);
  offerCsv(body.results, Number(k));
}

function dropZone(form, onFiles) {
  const input = form.querySelector("input[type=file]");
  input.addEventListener("change", () => { if (input.files.length) onFiles([...input.files]); });
  form.addEventListener("dragover", (e) => { e.preventDefault(); form.classList.add("over"); });
  form.addEventListener("dragleave", () => form.classList.remove("over"));
  form.addEventListener("drop", (e) => {
    e.preventDefault();
    form.classList.remove("over");
    if (e.dataTransfer.files.length) onFiles([...e.dataTransfer.files]);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const scoring = document.getElementById("score");
  if (scoring) dropZone(scoring, (files) => score(files, scoring.dataset.k || 5));
  const q = document.getElementById("query");
  if (!q) return;
  const k = q.dataset.k || 12;
  if (q.dataset.key) byKey(q.dataset.key, k);
  dropZone(document.getElementById("upload"), (files) => byUpload(files[0], k));
});

// -- Review (serve --annotate): select tiles, then validate, mark dubious, move or undo ----------

// Tiles of ``grid`` that click, shift-click, drag and keyboard select (a: all, Esc: none).
function selectable(grid) {
  const tiles = Array.from(grid.querySelectorAll("figure.tile"));
  let last = -1, painting = false, paintOn = true;
  const count = () => {
    const n = document.getElementById("selected");
    if (n) n.textContent = grid.querySelectorAll("figure.tile.selected").length;
  };
  const set = (i, on) => { tiles[i].classList.toggle("selected", on); };
  tiles.forEach((t, i) => {
    t.addEventListener("mousedown", (e) => {
      e.preventDefault();
      if (e.shiftKey && last >= 0) {
        const [a, b] = last < i ? [last, i] : [i, last];
        for (let k = a; k <= b; k++) set(k, true);
      } else {
        paintOn = !t.classList.contains("selected");
        set(i, paintOn);
        painting = true;
      }
      last = i;
      count();
    });
    t.addEventListener("mouseenter", () => { if (painting) { set(i, paintOn); last = i; count(); } });
    t.addEventListener("keydown", (e) => {
      if (e.key === " " || e.key === "Enter") { e.preventDefault(); set(i, !t.classList.contains("selected")); last = i; count(); }
    });
  });
  document.addEventListener("mouseup", () => { painting = false; });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "a") { tiles.forEach((_, i) => set(i, true)); count(); }
    else if (e.key === "Escape") { tiles.forEach((_, i) => set(i, false)); count(); }
  });
  return {
    all: () => tiles.map((t) => t.dataset.key),
    selected: () => tiles.filter((t) => t.classList.contains("selected")).map((t) => t.dataset.key),
  };
}

// POST a write with the page's CSRF token; on success the page reloads and says what changed.
async function write(url, body) {
  const token = document.querySelector('meta[name="csrf-token"]').content;
  const r = await fetch(url, {
    method: "POST", headers: { "content-type": "application/json", "x-csrf-token": token },
    body: JSON.stringify(body),
  });
  const answer = await r.json();
  if (!r.ok) { say(answer.error, true); return null; }
  const changed = Object.entries(answer.changed || {}).map(([k, v]) => `${v} ${k}`).join(", ");
  return `${answer.action}: ${changed || "nothing"} changed`;
}

async function writeAll(steps) {  // [url, body] pairs in order; stops at the first refusal
  const said = [];
  for (const [url, body] of steps) {
    const s = await write(url, body);
    if (s === null) return;
    said.push(s);
  }
  sessionStorage.setItem("penult-said", said.join("; "));
  location.reload();
}

function sayWhatWasDone() {
  const said = sessionStorage.getItem("penult-said");
  if (said) { say(said, false); sessionStorage.removeItem("penult-said"); }
}

function reviewPage() {
  const grid = document.getElementById("review-grid");
  const actions = document.getElementById("actions");
  if (!grid || !actions) return;
  const sel = selectable(grid);
  const level = actions.dataset.level || "label";
  const send = (body) => writeAll([["/api/label", { level, ...body }]]);
  const act = (action, extra) => {
    const keys = sel.selected();
    if (!keys.length) { say("select images first", true); return; }
    send({ action, keys, ...extra });
  };
  document.getElementById("act-validate").onclick = () => act("validate");
  document.getElementById("act-dubious").onclick = () => act("dubious");
  document.getElementById("act-undo").onclick = () => send({ action: "undo" });
  const move = document.getElementById("move-to");
  document.getElementById("act-move").onclick = () => act("move", { to: move.value });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "v") act("validate");
    else if (e.key === "d") act("dubious");
    else if (e.key === "u") send({ action: "undo" });
    else if (e.key === "m") { e.preventDefault(); move.focus(); }
  });
  sayWhatWasDone();
}

// Clusters (serve --annotate): name a cluster (all its open members), skip a mixed one, or
// grow a class: accept or reject the images nearest to its validated ones.
function clusterPage() {
  document.querySelectorAll("section.cluster").forEach((c) => {
    const number = Number(c.dataset.cluster);
    const name = c.querySelector(".name-to");
    const nameIt = c.querySelector(".act-name");
    if (!nameIt) return;
    nameIt.onclick = () => {
      if (!name.value.trim()) { say("type the taxon this cluster is", true); name.focus(); return; }
      writeAll([["/api/cluster", { cluster: number, to: name.value.trim() }]]);
    };
    name.addEventListener("keydown", (e) => { if (e.key === "Enter") nameIt.click(); });
    c.querySelector(".act-skip").onclick = () => writeAll([["/api/cluster", { cluster: number, skip: true }]]);
  });
  const again = document.getElementById("act-recluster");
  if (again) again.onclick = () => { say("clustering ...", false); writeAll([["/api/cluster", { recluster: true }]]); };
  const actions = document.getElementById("grow-actions");
  if (actions) {
    const sel = selectable(document.getElementById("review-grid"));
    const to = actions.dataset.label, level = actions.dataset.level || "label";
    const label = (action, keys) => ["/api/label", { action, keys, to, level }];
    const accept = () => writeAll([label("move", sel.all())]);
    const reject = () => writeAll([label("reject", sel.all())]);
    document.getElementById("act-accept").onclick = accept;
    document.getElementById("act-reject").onclick = reject;
    document.getElementById("act-accept-selected").onclick = () => {
      const yes = sel.selected();
      if (!yes.length) { say("select the images that are " + to + " first", true); return; }
      const no = sel.all().filter((k) => !yes.includes(k));
      writeAll(no.length ? [label("move", yes), label("reject", no)] : [label("move", yes)]);
    };
    document.getElementById("act-undo").onclick = () => writeAll([["/api/label", { action: "undo" }]]);
    document.addEventListener("keydown", (e) => {
      if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
      if (e.key === "y") accept();
      else if (e.key === "r") reject();
    });
  }
  sayWhatWasDone();
}

// Retrain (the review page, --annotate): `penult train` in the server's background, a progress
// bar while it runs, then the held-out numbers beside those before it.
function retrainBox() {
  const button = document.getElementById("act-retrain");
  if (!button) return;
  const token = document.querySelector('meta[name="csrf-token"]').content;
  const bar = document.getElementById("retrain-bar");
  const stage = document.getElementById("retrain-stage");
  const table = document.getElementById("retrain-result");
  const names = { top1: "top-1", balanced_accuracy: "balanced accuracy", macro_f1: "macro-F1", images: "training images" };
  const fmt = (v) => (v === undefined ? "-" : Number.isInteger(v) ? String(v) : v.toFixed(3));
  function draw(s) {
    bar.hidden = s.state !== "running";
    bar.value = s.share;
    stage.textContent = s.state === "running" ? s.stage + "..." : s.state === "done" ? "saved " + s.model : "";
    if (s.state === "failed") say("retraining failed: " + s.error, true);
    if (s.state !== "done") return;
    table.replaceChildren(el("tr", {}, el("th", {}, ""), el("th", {}, "before"), el("th", {}, "now")));
    for (const [k, label] of Object.entries(names)) {
      table.append(el("tr", {}, el("td", {}, label), el("td", {}, fmt((s.before || {})[k])), el("td", {}, fmt(s.after[k]))));
    }
    table.hidden = false;
  }
  async function poll() {
    const s = await (await fetch("/api/retrain")).json();
    draw(s);
    if (s.state === "running") setTimeout(poll, 400);
    else button.disabled = false;
  }
  button.onclick = async () => {
    button.disabled = true;
    const r = await fetch("/api/retrain", { method: "POST", headers: { "x-csrf-token": token } });
    if (!r.ok) { say((await r.json()).error, true); button.disabled = false; return; }
    poll();
  };
  poll();
}

document.addEventListener("DOMContentLoaded", reviewPage);
document.addEventListener("DOMContentLoaded", retrainBox);
document.addEventListener("DOMContentLoaded", clusterPage);
