// mmexplain explorer: the page's logic. Every text from the server or the user reaches the
// page as text (textContent, createTextNode: never parsed as HTML); requests go to this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, input: null, task: null, body: null, result: null, k: 0, frame: 0 };

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function say(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

function busy(on, what) {
  document.body.dataset.state = on ? "busy" : "ready";
  $("status").textContent = on ? (what || "working…") : "";
}

async function call(url, options) {
  busy(true);
  try {
    const response = await fetch(url, options);
    const type = response.headers.get("content-type") || "";
    const data = type.includes("json") ? await response.json() : { error: await response.text() };
    if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
    say("");
    return data;
  } catch (err) {
    say(err.message);
    throw err;
  } finally {
    busy(false);
  }
}

const postJSON = (url, body) => call(url, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

function fill(select, items, chosen) {
  select.replaceChildren(...items.map(([value, label]) => el("option", label, { value })));
  if (chosen !== undefined) select.value = chosen;
}

function modelOf(task) {
  const name = $(task + "-model").value;
  return state.info.models.find((m) => m.name === name);
}

function fillLayers() {
  const model = state.task && modelOf(state.task);
  if (model) fill($("layer"), model.layers.map((l) => [l, l]), model.layer);
}

async function init() {
  const info = await call("/api/models");
  state.info = info;
  fill($("method"), info.methods.map((m) => [m.name, m.label]));
  fill($("cmap"), info.colormaps.map((c) => [c, c]));
  for (const task of ["caption", "vqa", "video"]) {
    fill($(task + "-model"), info.models.filter((m) => m.tasks.includes(task)).map((m) => [m.name, m.name]));
    $(task + "-model").addEventListener("change", () => { fillLayers(); rerun(); });
  }
  $("frames").max = info.limits.frames;
  $("frames").value = Math.min(64, info.limits.frames);
  bind();
  busy(false);
}

function bind() {
  $("gen-scene").addEventListener("click", () => newInput(postJSON("/api/generate/scene", {})));
  $("gen-clip").addEventListener("click", () => newInput(postJSON("/api/generate/clip", {})));
  $("image-file").addEventListener("change", (e) => upload("image", e.target));
  $("video-file").addEventListener("change", (e) => upload("video", e.target));
  $("method").addEventListener("change", rerun);
  $("layer").addEventListener("change", rerun);
  $("cmap").addEventListener("change", () => (state.task === "video" ? rerun() : showMap()));
  $("alpha").addEventListener("input", () => { $("alpha-out").textContent = Number($("alpha").value).toFixed(2); showMap(); });
  $("caption-form").addEventListener("submit", (e) => { e.preventDefault(); explain("caption", { caption: $("caption-text").value }); });
  $("own-caption").addEventListener("click", () => explain("caption", {}));
  $("ask-form").addEventListener("submit", (e) => { e.preventDefault(); explain("vqa", { question: $("question").value, answers: [] }); });
  $("force-form").addEventListener("submit", (e) => { e.preventDefault(); force($("force").value); });
  $("scrub").addEventListener("input", () => seek(Number($("scrub").value), true));
  $("player").addEventListener("timeupdate", () => {
    const r = state.result;
    if (r && r.task === "video" && !$("player").paused) seek(Math.min(r.frames - 1, Math.floor($("player").currentTime * r.fps)), false);
  });
}

async function upload(kind, input) {
  const file = input.files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file, file.name);
  input.value = "";
  await newInput(call("/api/upload/" + kind, { method: "POST", body: form }));
}

async function newInput(request) {
  let data;
  try { data = await request; } catch (err) { return; }
  state.input = data;
  state.result = null;
  $("map-panel").hidden = true;
  const image = data.kind === "image";
  $("input-figure").hidden = !image;
  if (image) $("input-img").src = "/api/input/" + encodeURIComponent(data.input) + ".png";
  $("input-name").textContent = data.name;
  showTruth(data.truth);
  $("caption-panel").hidden = !image;
  $("vqa-panel").hidden = !image;
  $("video-panel").hidden = image;
  $("answers").replaceChildren();
  $("own-answers").textContent = "";
  $("own-chips").replaceChildren();
  $("question").value = "";
  const questions = (data.truth && data.truth.questions) || [];
  $("questions").replaceChildren(...questions.map((q) => el("option", null, { value: q.question })));
  await explain(image ? "caption" : "video", {}).catch(() => {});
}

function showTruth(truth) {
  const list = $("truth-list");
  list.replaceChildren();
  $("truth").hidden = !truth;
  if (!truth) return;
  const add = (term, value) => list.append(el("dt", term), el("dd", value));
  if (truth.caption !== undefined) {
    add("caption", truth.caption);
    add("objects", truth.objects.join(", "));
    for (const q of truth.questions) add(q.question, q.answer);
  } else {
    add("action", truth.action);
    add("actor", truth.actor);
  }
}

async function explain(task, extra) {
  if (!state.input) return;
  state.task = task;
  const model = $(task + "-model").value;
  const known = state.info.models.find((m) => m.name === model);
  if (!known || !known.layers.includes($("layer").value)) fillLayers();
  const body = Object.assign({ input: state.input.input, task, model, method: $("method").value,
    layer: $("layer").value, cmap: $("cmap").value, frames: Number($("frames").value) }, extra);
  state.body = body;
  const result = await postJSON("/api/explain", body);
  state.result = result;
  render(result);
}

function rerun() {
  if (!state.body || !state.input) return;
  const { model, method, layer, cmap, frames, ...asked } = state.body;  // the settings are read anew
  const keep = state.result ? state.result.labels[state.k] : null;
  explain(state.task, asked).then(() => {
    const k = state.result.labels.indexOf(keep);
    if (k >= 0) pick(k);
  }).catch(() => {});
}

function force(answer) {
  const text = (answer || "").trim();
  if (!text || !state.body || state.task !== "vqa") return;
  const answers = (state.body.answers || []).filter((a) => a !== text).concat([text]);
  const keep = text;
  explain("vqa", { question: state.body.question, answers }).then(() => {
    const k = state.result.labels.indexOf(keep);
    if (k >= 0) pick(k);
  }).catch(() => {});
}

function chips(box, labels, onClick, extra) {
  box.replaceChildren(...labels.map((label, k) => {
    const b = el("button", label, { type: "button", "data-k": k });
    if (extra) extra(b, k);
    b.addEventListener("click", () => onClick(k));
    return b;
  }));
}

function render(r) {
  $("map-panel").hidden = false;
  let first = 0;
  if (r.task === "caption") {
    $("caption-line").textContent = (r.own ? "The model says: " : "Scored caption: ") + r.caption;
    chips($("words"), r.labels, pick, (b, k) => { if (r.pointing[k] !== null) b.classList.add("truth"); });
    const visual = r.pointing.findIndex((p) => p !== null);
    first = visual >= 0 ? visual : 0;
  } else if (r.task === "vqa") {
    $("own-answers").textContent = "The model's top answers (click one to explain it)" + (r.true_answer ? "; the truth: " + r.true_answer : "") + ":";
    // a classifier's answers come with probabilities, a generative model's with log p
    const shown = (a) => (a.score >= 0 && a.score <= 1 ? (100 * a.score).toFixed(1) + " %" : "log p " + a.score.toFixed(2));
    chips($("own-chips"), r.own.map((a) => a.answer + " " + shown(a)), (k) => force(r.own[k].answer));
    chips($("answers"), r.labels.map((a, k) => (k === 0 ? a : a + "?")), pick);
  } else {
    if (!state.body.action) {  // the clip's candidates stay while one of them is explained
      chips($("actions"), r.actions.map((a) => a.action), (k) => explain("video", { action: r.actions[k].action }).catch(() => {}));
    }
    for (const b of $("actions").children) b.classList.toggle("on", b.textContent === state.body.action);
    chips($("targets"), r.labels, pick);
    $("scrub").max = r.frames - 1;
    $("player").src = "/api/result/" + encodeURIComponent(r.result) + "/download.mp4";
    $("dl-mp4").href = $("player").src;
  }
  $("dl-mp4").hidden = r.task !== "video";
  $("dl-npz").href = "/api/result/" + encodeURIComponent(r.result) + "/download.npz";
  state.frame = 0;
  pick(first);
}

function pick(k) {
  state.k = k;
  for (const box of ["words", "answers", "targets"]) {
    for (const b of $(box).children) b.classList.toggle("on", Number(b.dataset.k) === k);
  }
  showMap();
}

function seek(frame, movePlayer) {
  const r = state.result;
  if (!r || r.task !== "video") return;
  state.frame = frame;
  $("scrub").value = frame;
  if (movePlayer) { $("player").pause(); $("player").currentTime = (frame + 0.5) / r.fps; }
  showMap();
}

function resultURL(kind) {
  const r = state.result;
  const q = new URLSearchParams();
  if (kind === "overlay") { q.set("cmap", $("cmap").value); q.set("alpha", $("alpha").value); }
  if (r.task === "video") q.set("frame", state.frame);
  return "/api/result/" + encodeURIComponent(r.result) + "/" + kind + "/" + state.k + ".png?" + q;
}

function showMap() {
  const r = state.result;
  if (!r) return;
  const k = state.k;
  const map = $("map");
  map.dataset.result = r.result;
  map.dataset.k = k;
  map.dataset.label = r.labels[k];
  map.dataset.frame = r.task === "video" ? state.frame : "";
  map.dataset.map = r.maps ? JSON.stringify(r.maps[k]) : "";
  map.src = resultURL("overlay");
  $("dl-png").href = map.src;
  let caption = r.labels[k];
  if (r.scores) caption += " — score " + r.scores[k].toPrecision(4);
  if (r.task === "video") {
    caption = r.frame_labels[k][state.frame] + " — frame " + state.frame + " of " + r.frames;
    $("frame-out").textContent = state.frame + " / " + (r.frames - 1);
    drawCurve(r.importance[k], state.frame);
  }
  $("map-caption").textContent = caption + " (" + r.method + ", " + r.layer + ")";
  showPointing(r, k);
}

function showPointing(r, k) {
  let hit = r.pointing[k];
  if (hit !== null && r.task === "video") hit = hit[state.frame];
  $("mask-figure").hidden = hit === null;
  if (hit === null) return;
  $("mask").src = resultURL("mask");
  const text = $("pointing");
  text.replaceChildren(el("span", hit ? "hit" : "miss", { class: hit ? "hit" : "miss" }),
    document.createTextNode(": the pointing game (the map's peak, red, within the tolerance of the ground-truth mask, lit)"));
}

function drawCurve(values, frame) {
  const canvas = $("curve");
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  g.fillStyle = "#111"; g.fillRect(0, 0, w, h);
  const top = Math.max(...values, 1e-30);
  const x = (i) => (values.length > 1 ? (i * (w - 1)) / (values.length - 1) : w / 2);
  g.strokeStyle = "#fff"; g.beginPath();
  values.forEach((v, i) => (i ? g.lineTo(x(i), h - 2 - (v / top) * (h - 4)) : g.moveTo(x(i), h - 2 - (v / top) * (h - 4))));
  g.stroke();
  g.fillStyle = "#ff3c3c"; g.fillRect(Math.round(x(frame)) - 1, 0, 3, h);
}

window.addEventListener("DOMContentLoaded", () => { init().catch(() => busy(false)); });
