// The demo page: plain JS talking to this gateway's own /v1 API; nothing is fetched from elsewhere.
"use strict";

// Ultralytics' palette (as the annotated PNGs use), indexed by class id.
const PALETTE = ["#FF3838", "#FF9D97", "#FF701F", "#FFB21D", "#CFD231", "#48F90A", "#92CC17", "#3DDB86", "#1A9334", "#00D4BB",
  "#2C99A8", "#00C2FF", "#344593", "#6473FF", "#0018EC", "#8438FF", "#520085", "#CB38FF", "#FF95C8", "#FF37C7"];
const STATS_EVERY_MS = 2000;

const $ = (id) => document.getElementById(id);
let models = [];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
  status.setAttribute("role", isError ? "alert" : "status");
}

// Every URL is relative to the page's <base> (the gateway sets it to the sub-path the page came
// through, behind an Ingress); the API key, when the gateway requires one, goes as a bearer token.
function api(url, init = {}) {
  const key = $("api-key").value.trim();
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  return fetch(url, { ...init, headers: { ...headers, ...(init.headers || {}) } });
}

async function problemText(response) {
  try {
    const body = await response.json();
    return `${response.status} ${body.code || ""}: ${body.detail || response.statusText}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

// Detect serves detect and segment models (common/tasks.py); a segment model's boxes carry masks.
function detects(model) {
  return model.task === "detect" || model.task === "segment";
}

function isZeroShot(model) {
  return model.task === "embed" && model.postprocess && model.postprocess.params && model.postprocess.params.text_model;
}

async function loadModels() {
  const select = $("model");
  const response = await api("v1/models");
  if (!response.ok) {
    setStatus(`cannot list models: ${await problemText(response)}`, true);
    select.replaceChildren(el("option", { value: "" }, "no models"));
    return;
  }
  models = (await response.json()).models.filter((m) => detects(m) || isZeroShot(m));
  select.replaceChildren(...models.map((m) =>
    el("option", { value: m.name }, `${m.name} (${detects(m) ? m.task : "zero-shot classify"})`)));
  const yolo = models.find((m) => m.name === "yolov8n");
  if (yolo) select.value = yolo.name;
}

function chosenFiles(files) {
  $("chosen").textContent = files.length ? Array.from(files).map((f) => f.name).join(", ") : "no image chosen";
}

function setUpDropZone() {
  const zone = $("drop-zone");
  const input = $("images");
  input.addEventListener("change", () => chosenFiles(input.files));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    input.files = e.dataTransfer.files;
    chosenFiles(input.files);
  });
}

function labelsValue() {
  return $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
}

async function run(event) {
  event.preventDefault();
  const files = $("images").files;
  const model = models.find((m) => m.name === $("model").value);
  if (!files.length) { setStatus("Choose at least one image first.", true); $("images").focus(); return; }
  if (!model) { setStatus("No model is available; is the stack up?", true); return; }
  const form = new FormData();
  for (const file of files) form.append("images", file, file.name);
  const params = new URLSearchParams({ model: model.name });
  let endpoint = "v1/classify";
  if (detects(model)) {
    endpoint = "v1/detect";
    params.set("conf", $("conf").value);
    params.set("iou", $("iou").value);
    const zeroShot = models.find(isZeroShot);
    if ($("relabel").checked && zeroShot) {
      params.set("classify_with", zeroShot.name);
      for (const label of labelsValue()) form.append("labels", label);
    }
  } else {
    for (const label of labelsValue()) form.append("labels", label);
  }
  $("run").disabled = true;
  setStatus(`Running ${model.name} on ${files.length} image(s)…`);
  const started = performance.now();
  try {
    const response = await api(`${endpoint}?${params}`, { method: "POST", body: form });
    if (!response.ok) { setStatus(await problemText(response), true); return; }
    const body = await response.json();
    await showResults(body.results, files, detects(model), serverTiming(response.headers.get("Server-Timing")));
    const failed = body.results.filter((r) => r.error).length;
    setStatus(`Done in ${Math.round(performance.now() - started)} ms` + (failed ? `; ${failed} image(s) failed` : "") + ".");
  } catch (e) {
    setStatus(`The gateway did not answer: ${e}`, true);
  } finally {
    $("run").disabled = false;
    refreshStats();
  }
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error(`cannot show ${file.name}`));
    image.src = URL.createObjectURL(file);
  });
}

// Black or white, whichever reads better on the box colour (WCAG relative luminance).
function textColorOn(hex) {
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16) / 255)
    .map((c) => (c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4));
  return 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 ? "#000" : "#fff";
}

function drawDetections(canvas, image, detections) {
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0);
  const line = Math.max(2, Math.round(canvas.width / 320));
  ctx.font = `${Math.max(12, line * 7)}px system-ui, sans-serif`;
  ctx.textBaseline = "bottom";
  for (const d of detections) {
    const [x1, y1, x2, y2] = d.box;
    const color = PALETTE[d.class_id % PALETTE.length];
    ctx.strokeStyle = color;
    ctx.lineWidth = line;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = `${d.zero_shot ? d.zero_shot.label : d.label} ${d.score.toFixed(2)}`;
    const width = ctx.measureText(text).width + 6;
    const height = parseInt(ctx.font, 10) + 4;
    const top = y1 - height < 0 ? y1 + height : y1;
    ctx.fillStyle = color;
    ctx.fillRect(x1 - line / 2, top - height, width, height);
    ctx.fillStyle = textColorOn(color);
    ctx.fillText(text, x1 + 3 - line / 2, top - 2);
  }
  canvas.dataset.boxes = String(detections.length);
}

function detectionTable(detections) {
  const rows = detections.map((d) => el("tr", {},
    el("td", {}, el("span", { class: "swatch", style: `background:${PALETTE[d.class_id % PALETTE.length]}`, "aria-hidden": "true" }), d.label),
    el("td", {}, d.score.toFixed(3)),
    el("td", {}, d.box.map((v) => v.toFixed(1)).join(", ")),
    el("td", {}, d.zero_shot ? `${d.zero_shot.label} (${d.zero_shot.score.toFixed(2)})` : "–")));
  return el("table", { class: "detections" },
    el("caption", {}, `${detections.length} detection(s)`),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "label"), el("th", { scope: "col" }, "score"),
      el("th", { scope: "col" }, "box (x1, y1, x2, y2)"), el("th", { scope: "col" }, "zero-shot"))),
    el("tbody", {}, ...rows));
}

function labelTable(labels) {
  return el("table", { class: "labels" },
    el("caption", {}, "zero-shot labels"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "label"), el("th", { scope: "col" }, "probability"))),
    el("tbody", {}, ...labels.map((l) => el("tr", {}, el("td", {}, l.label),
      el("td", {}, l.score.toFixed(3), el("span", { class: "bar", style: `width:${Math.round(l.score * 8)}rem`, "aria-hidden": "true" }))))));
}

function timingTable(timings) {
  if (!timings) return el("p", { class: "hint" }, "no per-stage timings in this answer");
  const entries = Object.entries(timings).filter(([stage]) => stage !== "total");
  const total = timings.total || entries.reduce((sum, [, ms]) => sum + ms, 0);
  return el("table", { class: "timings" },
    el("caption", {}, `time per stage (total ${total.toFixed(1)} ms)`),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "stage"), el("th", { scope: "col" }, "ms"))),
    el("tbody", {}, ...entries.map(([stage, ms]) => el("tr", {}, el("td", {}, stage),
      el("td", {}, ms.toFixed(1), el("span", { class: "bar", style: `width:${Math.max(0.1, (ms / total) * 8).toFixed(2)}rem`, "aria-hidden": "true" }))))));
}

// "preprocess;dur=7.69, inference;dur=141.88, ..." -> {preprocess: 7.69, inference: 141.88, ...}
function serverTiming(header) {
  if (!header) return null;
  const timings = {};
  for (const entry of header.split(",")) {
    const match = entry.trim().match(/^([\w-]+);dur=([\d.]+)$/);
    if (match) timings[match[1]] = parseFloat(match[2]);
  }
  return Object.keys(timings).length ? timings : null;
}

async function showResults(results, files, isDetect, timings) {
  const section = $("results");
  section.querySelectorAll(".result").forEach((node) => node.remove());
  $("results-empty").hidden = true;
  for (const [index, result] of results.entries()) {
    const file = files[index];
    const canvas = el("canvas", { role: "img", "aria-label": `${result.image} with ${(result.detections || []).length} box(es) drawn` });
    const details = el("div", {});
    const card = el("article", { class: "result" }, el("h3", {}, result.image), canvas, details);
    section.append(card);
    const image = await loadImage(file);
    drawDetections(canvas, image, isDetect ? result.detections || [] : []);
    if (result.error) {
      details.append(el("p", { class: "error", role: "alert" }, `${result.error.code}: ${result.error.message}`));
      continue;
    }
    if (isDetect) details.append(detectionTable(result.detections), timingTable(result.timings_ms || timings));
    else details.append(labelTable(result.labels), timingTable(timings));
  }
}

async function refreshStats() {
  try {
    const response = await api("v1/stats");
    if (!response.ok) return;
    const stats = await response.json();
    $("live-rate").textContent = `${stats.requests} (${stats.rate_per_s.toFixed(2)}/s)`;
    $("live-p95").textContent = stats.p95_ms === null ? "–" : `${Math.round(stats.p95_ms)} ms`;
    $("live-errors").textContent = String(stats.errors);
  } catch (e) {
    $("live-rate").textContent = "gateway unreachable";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setUpDropZone();
  $("run-form").addEventListener("submit", run);
  loadModels().catch((e) => setStatus(`cannot list models: ${e}`, true));
  refreshStats();
  setInterval(refreshStats, STATS_EVERY_MS);
});
