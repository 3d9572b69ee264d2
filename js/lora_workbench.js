// LoRA Workbench in ComfyUI's editor: a live loss chart and the latest preview on Train LoRA, a row
// editor on LoRA Stack, and the trigger words of the chosen LoRA under every lora_name picker.
//
// A plain ES module, no build step: ComfyUI serves js/ (the pack's WEB_DIRECTORY) under
// /extensions/<pack folder>/, so ../../scripts/ is the frontend's own app and api.
//
// Every widget added here is left out of the saved workflow and of the queued prompt
// (serialize: false, and appended after the node's own widgets), so workflows saved with or
// without this file are the same and the prompt carries only the node's own inputs.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "LoraWorkbench.Frontend";
// The messages Train LoRA / Resume Training send while they run: the names of nodes/comfy/events.py
// (a test keeps the two the same).
const TRAIN_EVENTS = Object.freeze({
  step: "lw.train.step", preview: "lw.train.preview", memory: "lw.train.memory", saved: "lw.train.saved",
  validation: "lw.train.validation",
});
const TRAIN_NODES = new Set(["LW_TrainLoRA", "LW_ResumeTraining"]);
const STACK_NODE = "LW_LoraStack";
const NONE = "None";
const SMOOTHING = 0.9;
const INFO_TTL_MS = 30000;
const STACK_MIN_WIDTH = 400; // room for a LoRA name beside the strengths and buttons

// ---------------------------------------------------------------------------------------------- helpers
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "style") Object.assign(node.style, value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c != null));
  return node;
}

function classOf(node) {
  return node?.comfyClass ?? node?.type;
}

function widget(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

/** The graph node a server message names ("12", or "5:12" inside a subgraph). */
function graphNode(id) {
  const graph = app.graph;
  if (id == null || !graph) return null;
  const text = String(id);
  return graph.getNodeById(text) ?? graph.getNodeById(Number(text)) ?? null;
}

function redraw(node) {
  node?.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

/** Size the node to its widgets: as tall as they need (our views are sized to their content, so any
 * more would only be empty), and at least as wide as they need and as the user made it. */
function fit(node) {
  const size = node.computeSize?.();
  if (!size) return;
  const width = Math.max(node.size[0], size[0], node.lwMinWidth ?? 0);
  if (width !== node.size[0] || Math.abs(size[1] - node.size[1]) > 1) node.setSize([width, size[1]]);
  redraw(node);
}

/** The height ``root``'s children take (display: none ones left out), or ``fallback()`` while the view
 * is not laid out (not yet attached, or the node collapsed). */
function contentHeight(root, fallback) {
  let total = 0;
  let shown = 0;
  for (const child of root.children) {
    if (getComputedStyle(child).display === "none") continue;
    total += child.offsetHeight;
    shown += 1;
  }
  if (!total) return fallback();
  const style = getComputedStyle(root);
  const gap = parseFloat(style.rowGap) || 0;
  const padding = (parseFloat(style.paddingTop) || 0) + (parseFloat(style.paddingBottom) || 0);
  return Math.ceil(total + gap * (shown - 1) + padding);
}

function safely(what, fn) {
  return (...args) => {
    try {
      return fn(...args);
    } catch (error) {
      console.warn(`[LoRA Workbench] ${what} failed:`, error);
    }
  };
}

/** A DOM widget as tall as ``height()`` says: no taller (the canvas would stretch it over the node's
 * free height, Nodes 2.0 over its grid row) and no shorter. */
function addView(node, name, element, height) {
  // The canvas draws the element inside the widget's margin (Nodes 2.0 has no such margin).
  const outer = () => height() + 2 * (view.margin ?? 0);
  const view = node.addDOMWidget(name, name, element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: outer,
    getMaxHeight: outer,
  });
  view.serialize = false; // not in widgets_values: the saved workflow stays what the node defines
  return view;
}

const STYLE = `
.lw-view { display: flex; flex-direction: column; gap: 4px; width: 100%; height: 100%; box-sizing: border-box;
  font: 11px sans-serif; color: var(--input-text, #ddd); overflow: hidden; }
.lw-view > * { flex: none; }
.lw-train-status, .lw-preview-caption, .lw-saved, .lw-memory { white-space: normal; overflow-wrap: anywhere;
  line-height: 14px; opacity: 0.85; }
.lw-memory:empty, .lw-saved:empty, .lw-preview-caption:empty { display: none; }
.lw-loss-chart { width: 100%; height: 150px; border-radius: 4px; background: #151515; }
.lw-train-previews { display: flex; gap: 4px; }
.lw-train-previews.lw-empty { display: none; }
.lw-train-preview, .lw-train-baseline { height: 128px; min-width: 0; flex: 1; object-fit: contain; border-radius: 4px; }
.lw-train-preview:not([src]), .lw-train-baseline:not([src]) { display: none; }
.lw-stack-rows { display: flex; flex-direction: column; gap: 3px; }
.lw-stack-row { display: grid; grid-template-columns: 18px 1fr 52px 52px 18px 18px 18px; gap: 3px; align-items: center; }
.lw-stack-row.lw-off { opacity: 0.5; }
.lw-stack-row select, .lw-stack-row input[type=number] { min-width: 0; background: var(--comfy-input-bg, #222);
  color: var(--input-text, #ddd); border: 1px solid var(--border-color, #444); border-radius: 3px; font-size: 11px;
  height: 20px; box-sizing: border-box; }
.lw-stack-row button, .lw-stack-add { background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd);
  border: 1px solid var(--border-color, #444); border-radius: 3px; font-size: 11px; padding: 0; height: 20px;
  cursor: pointer; }
.lw-stack-row button:disabled, .lw-stack-add:disabled { opacity: 0.35; cursor: default; }
.lw-stack-add { height: 22px; padding: 0 8px; align-self: flex-start; }
.lw-stack-head { display: grid; grid-template-columns: 18px 1fr 52px 52px 60px; gap: 3px; opacity: 0.6; }
.lw-triggers { grid-column: 2 / -1; font-size: 10px; line-height: 12px; opacity: 0.75; min-height: 12px;
  overflow-wrap: anywhere; }
.lw-trigger-line { font-size: 11px; line-height: 14px; opacity: 0.8; overflow-wrap: anywhere; padding: 0 6px; }
`;

// ---------------------------------------------------------------------------------------------- LoRA info
const infoCache = new Map(); // name -> {time, promise}

function loraInfo(name) {
  if (!name || name === NONE) return Promise.resolve(null);
  const hit = infoCache.get(name);
  if (hit && Date.now() - hit.time < INFO_TTL_MS) return hit.promise;
  const promise = api
    .fetchApi(`/lora_workbench/lora_info?name=${encodeURIComponent(name)}`)
    .then((r) => (r.ok ? r.json() : null))
    .catch(() => null);
  infoCache.set(name, { time: Date.now(), promise });
  return promise;
}

function triggerText(info) {
  if (!info) return "";
  if (info.found === false) return "not in models/loras";
  const words = info.trigger_words ?? [];
  return words.length ? `trigger: ${words.join(", ")}` : "no trigger words in this file";
}

async function showTriggers(target, name) {
  target.dataset.lora = name ?? "";
  const info = await loraInfo(name);
  if (target.dataset.lora !== (name ?? "")) return; // another LoRA was picked meanwhile
  target.textContent = triggerText(info);
  target.title = info?.title ? `${info.title}${info.base_model ? ` (${info.base_model})` : ""}` : "";
  target.dataset.triggers = (info?.trigger_words ?? []).join(", ");
}

// ---------------------------------------------------------------------------------------------- training view
function drawChart(state) {
  const canvas = state.canvas;
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(60, canvas.clientWidth || 300);
  const height = Math.max(40, canvas.clientHeight || 150);
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#151515";
  ctx.fillRect(0, 0, width, height);
  const points = state.points.filter(([, loss]) => Number.isFinite(loss));
  const val = (state.validation ?? []).filter(([, loss]) => Number.isFinite(loss));
  canvas.dataset.points = String(points.length);
  canvas.dataset.validationPoints = String(val.length);
  ctx.font = "10px sans-serif";
  if (!points.length) {
    ctx.fillStyle = "#777";
    ctx.fillText("loss: waiting for the first step", 8, height / 2);
    return;
  }
  const left = 44, right = 8, top = 8, bottom = 16;
  const lastStep = points[points.length - 1][0];
  const xMax = Math.max(state.total || 0, lastStep, 2);
  const xMin = Math.min(points[0][0], 1);
  let yMin = Math.min(...points.map((p) => p[1]), ...val.map((p) => p[1]));
  let yMax = Math.max(...points.map((p) => p[1]), ...val.map((p) => p[1]));
  if (yMax - yMin < 1e-9) { yMax += 0.5 * (Math.abs(yMax) || 1); yMin -= 0.5 * (Math.abs(yMin) || 1); }
  const pad = 0.06 * (yMax - yMin);
  yMin -= pad; yMax += pad;
  const x = (step) => left + ((step - xMin) / Math.max(1e-9, xMax - xMin)) * (width - left - right);
  const y = (loss) => top + (1 - (loss - yMin) / (yMax - yMin)) * (height - top - bottom);

  ctx.strokeStyle = "#2c2c2c";
  ctx.lineWidth = 1;
  ctx.fillStyle = "#8a8a8a";
  for (let i = 0; i <= 3; i++) {
    const v = yMin + ((yMax - yMin) * i) / 3;
    ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(width - right, y(v)); ctx.stroke();
    ctx.fillText(v.toPrecision(3), 4, y(v) + 3);
  }
  ctx.fillText(`step ${lastStep} / ${xMax}`, left, height - 4);

  // raw loss per step: light, with dots while there are few
  ctx.strokeStyle = "rgba(110, 170, 255, 0.55)";
  ctx.fillStyle = "rgba(110, 170, 255, 0.9)";
  ctx.beginPath();
  points.forEach(([s, l], i) => (i ? ctx.lineTo(x(s), y(l)) : ctx.moveTo(x(s), y(l))));
  ctx.stroke();
  if (points.length <= 80) {
    for (const [s, l] of points) { ctx.beginPath(); ctx.arc(x(s), y(l), 2, 0, 2 * Math.PI); ctx.fill(); }
  }
  // smoothed loss (exponential moving average, debiased like TensorBoard's)
  let ema = 0;
  ctx.strokeStyle = "#ffa23a";
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach(([s, l], i) => {
    ema = SMOOTHING * ema + (1 - SMOOTHING) * l;
    const v = ema / (1 - SMOOTHING ** (i + 1));
    if (i) ctx.lineTo(x(s), y(v)); else ctx.moveTo(x(s), y(v));
  });
  ctx.stroke();
  // validation loss (held-out images, fixed noise): green, its lowest point ringed
  if (val.length) {
    ctx.strokeStyle = ctx.fillStyle = "#3ccf6e";
    ctx.beginPath();
    val.forEach(([s, l], i) => (i ? ctx.lineTo(x(s), y(l)) : ctx.moveTo(x(s), y(l))));
    ctx.stroke();
    for (const [s, l] of val) { ctx.beginPath(); ctx.arc(x(s), y(l), 2.5, 0, 2 * Math.PI); ctx.fill(); }
    const [bs, bl] = val.reduce((a, b) => (b[1] < a[1] ? b : a));
    ctx.beginPath(); ctx.arc(x(bs), y(bl), 5, 0, 2 * Math.PI); ctx.stroke();
    ctx.fillText(`validation best ${bl.toPrecision(4)} @ ${bs}`, width - right - 150, top + 10);
  }
}

function addTrainView(node) {
  const status = el("div", { className: "lw-train-status" }, "Loss and previews appear here while it trains.");
  const memory = el("div", { className: "lw-memory" });
  const canvas = el("canvas", { className: "lw-loss-chart", dataset: { points: "0" } });
  const saved = el("div", { className: "lw-saved" });
  // The baseline (step 0: the model before training, same prompt and seed) beside the latest preview.
  const baseline = el("img", { className: "lw-train-baseline", alt: "before training",
                               title: "before training (step 0)" });
  const preview = el("img", { className: "lw-train-preview", alt: "latest training preview" });
  const previews = el("div", { className: "lw-train-previews lw-empty" }, baseline, preview);
  const caption = el("div", { className: "lw-preview-caption" });
  const root = el("div", { className: "lw-view lw-train-view" }, status, memory, canvas, saved, previews, caption);
  const state = { node, points: [], total: 0, canvas, status, memory, saved, preview, baseline, previews, caption,
                  previewUrl: null, baselineUrl: null, previewStep: null };
  node.lwTrain = state;
  addView(node, "lw_train_view", root, () => contentHeight(root, () => 190));
  for (const img of [preview, baseline]) {
    img.addEventListener("load", safely("preview", () => { img.dataset.loaded = "1"; fit(node); }));
  }
  if (typeof ResizeObserver === "function") new ResizeObserver(safely("loss chart", () => drawChart(state))).observe(canvas);
  drawChart(state);
}

function resetTrainView(state) {
  state.points = [];
  state.validation = [];
  state.total = 0;
  state.status.textContent = "starting…";
  state.saved.textContent = "";
  state.memory.textContent = "";
  drawChart(state);
  fit(state.node);
}

function showPreview(state, blob) {
  const url = URL.createObjectURL(blob);
  const step = state.previewStep ?? state.points[state.points.length - 1]?.[0];
  const isBaseline = step === 0;
  const img = isBaseline ? state.baseline : state.preview;
  const key = isBaseline ? "baselineUrl" : "previewUrl";
  const old = state[key];
  state[key] = url;
  img.dataset.loaded = "";
  img.src = url;
  state.previews.classList.remove("lw-empty");
  if (old) setTimeout(() => URL.revokeObjectURL(old), 1000);
  const prompt = state.previewPrompt ? `: ${state.previewPrompt}` : "";
  state.caption.textContent = isBaseline ? `before training (step 0)${prompt}`
    : `preview${step != null ? ` at step ${step}` : ""}${state.baseline.src ? " (left: before training)" : ""}${prompt}`;
}

let executingId = null;
let previewsCarryNodeIds = false;

function listenForTraining() {
  api.addEventListener("executing", safely("executing", ({ detail }) => {
    executingId = detail && typeof detail === "object" ? (detail.display_node ?? detail.node) : detail;
    const state = graphNode(executingId)?.lwTrain;
    if (state) resetTrainView(state);
  }));
  api.addEventListener(TRAIN_EVENTS.step, safely(TRAIN_EVENTS.step, ({ detail }) => {
    const node = graphNode(detail?.node);
    const state = node?.lwTrain;
    if (!state) return;
    const last = state.points[state.points.length - 1];
    if (last && detail.step <= last[0]) resetTrainView(state); // a new run on the same node
    state.points.push([Number(detail.step), Number(detail.loss)]);
    state.total = Number(detail.total) || state.total;
    state.status.textContent = `step ${detail.step}/${detail.total}   loss ${Number(detail.loss).toFixed(4)}   lr ${Number(detail.lr).toExponential(1)}`;
    drawChart(state);
    redraw(node);
  }));
  api.addEventListener(TRAIN_EVENTS.preview, safely(TRAIN_EVENTS.preview, ({ detail }) => {
    const state = graphNode(detail?.node)?.lwTrain;
    if (!state) return;
    state.previewStep = detail.step;
    state.previewPrompt = detail.prompt ?? "";
  }));
  api.addEventListener(TRAIN_EVENTS.validation, safely(TRAIN_EVENTS.validation, ({ detail }) => {
    const node = graphNode(detail?.node);
    const state = node?.lwTrain;
    if (!state) return;
    (state.validation ??= []).push([Number(detail.step), Number(detail.loss)]);
    drawChart(state);
    redraw(node);
  }));
  api.addEventListener(TRAIN_EVENTS.memory, safely(TRAIN_EVENTS.memory, ({ detail }) => {
    const state = graphNode(detail?.node)?.lwTrain;
    if (!state) return;
    state.memory.textContent = detail.text ?? "";
    fit(state.node);
  }));
  api.addEventListener(TRAIN_EVENTS.saved, safely(TRAIN_EVENTS.saved, ({ detail }) => {
    const state = graphNode(detail?.node)?.lwTrain;
    if (!state) return;
    const file = String(detail.path ?? "").split(/[\\/]/).pop();
    state.saved.textContent = `saved at step ${detail.step}: ${file}`;
    state.saved.title = detail.path ?? "";
    fit(state.node);
  }));
  // The image comes with the progress update after lw.train.preview: with its node id from
  // frontends that announce preview metadata, else as a bare blob while the node executes.
  api.addEventListener("b_preview_with_metadata", safely("preview", ({ detail }) => {
    previewsCarryNodeIds = true;
    const state = graphNode(detail?.displayNodeId ?? detail?.nodeId)?.lwTrain;
    if (state && detail.blob) showPreview(state, detail.blob);
  }));
  api.addEventListener("b_preview", safely("preview", ({ detail }) => {
    if (previewsCarryNodeIds) return;
    const state = graphNode(executingId)?.lwTrain;
    if (state && detail instanceof Blob) showPreview(state, detail);
  }));
}

// ---------------------------------------------------------------------------------------------- LoRA Stack
/** A LoRA's name as the row shows it: without the extension nearly every file has (the full name is
 * the option's tooltip). */
function loraLabel(name) {
  return String(name).replace(/\.safetensors$/i, "");
}

function comboValues(w) {
  const values = w?.options?.values;
  const list = typeof values === "function" ? values() : values;
  return Array.isArray(list) ? list : [NONE];
}

function addStackEditor(node) {
  const slots = [];
  for (let i = 1; widget(node, `lora_${i}`); i++) {
    slots.push({
      lora: widget(node, `lora_${i}`), enabled: widget(node, `enabled_${i}`),
      model: widget(node, `model_strength_${i}`), clip: widget(node, `clip_strength_${i}`),
    });
  }
  if (!slots.length || slots.some((s) => !s.enabled || !s.model || !s.clip)) return; // not the inputs we know
  // The editor shows these: hidden on the canvas (w.hidden, and no height in the layout, which older
  // frontends give hidden widgets too) and in Nodes 2.0 (which reads options.hidden).
  for (const s of slots) {
    for (const w of Object.values(s)) {
      w.hidden = true;
      w.options ??= {};
      w.options.hidden = true; // in place: Nodes 2.0 keeps a reference to this object
      w.computeSize = () => [0, -4];
    }
  }
  node.lwMinWidth = STACK_MIN_WIDTH;

  const read = (i) => ({ lora: slots[i].lora.value, enabled: slots[i].enabled.value !== false,
                         model: slots[i].model.value, clip: slots[i].clip.value });
  const write = (i, row) => {
    for (const key of ["lora", "enabled", "model", "clip"]) {
      const w = slots[i][key];
      if (w.value !== row[key]) { w.value = row[key]; w.callback?.(w.value, app.canvas, node); }
    }
  };
  const blank = (lora = NONE) => ({ lora, enabled: true, model: 1.0, clip: 1.0 });
  const used = () => {
    let n = 0;
    slots.forEach((s, i) => { if (s.lora.value && s.lora.value !== NONE) n = i + 1; });
    return n;
  };
  const count = () => Math.min(slots.length, Math.max(used(), Number(node.properties?.lw_rows) || 0));
  const setCount = (n) => { node.properties = node.properties ?? {}; node.properties.lw_rows = n; };

  const list = el("div", { className: "lw-stack-rows" });
  const addButton = el("button", { className: "lw-stack-add", textContent: "+ Add LoRA",
    title: `Up to ${slots.length} LoRAs; chain another LoRA Stack into lora_stack for more.` });
  const head = el("div", { className: "lw-stack-head" }, el("span", {}, "on"), el("span", {}, "LoRA"),
                  el("span", {}, "model"), el("span", {}, "clip"), el("span", {}, ""));
  const root = el("div", { className: "lw-view lw-stack-editor" }, head, list, addButton);

  const api_ = {
    rows: () => Array.from({ length: count() }, (_, i) => read(i)),
    add(lora = NONE) {
      const n = count();
      if (n >= slots.length) return false;
      write(n, blank(lora));
      setCount(n + 1);
      render();
      return true;
    },
    remove(index) {
      const rows = api_.rows();
      if (index < 0 || index >= rows.length) return;
      rows.splice(index, 1);
      slots.forEach((_, i) => write(i, rows[i] ?? blank()));
      setCount(rows.length);
      render();
    },
    move(index, delta) {
      const rows = api_.rows();
      const to = index + delta;
      if (index < 0 || to < 0 || index >= rows.length || to >= rows.length) return;
      [rows[index], rows[to]] = [rows[to], rows[index]];
      rows.forEach((row, i) => write(i, row));
      render();
    },
    update(index, changes) {
      write(index, { ...read(index), ...changes });
      render();
    },
  };
  node.lwStack = api_;

  function numberInput(className, value, title, onchange) {
    return el("input", { type: "number", className, step: "0.05", min: "-100", max: "100", value: String(value), title,
                         onchange: safely("strength", (e) => onchange(parseFloat(e.target.value) || 0)) });
  }

  function render() {
    const rows = api_.rows();
    const lookups = [];
    list.replaceChildren(...rows.map((row, i) => {
      const select = el("select", { className: "lw-lora-select",
                                    onchange: safely("pick", (e) => api_.update(i, { lora: e.target.value })) },
                        ...comboValues(slots[i].lora).map((v) => el("option", { value: v, textContent: loraLabel(v), title: v })));
      if (![...select.options].some((o) => o.value === row.lora)) {
        select.append(el("option", { value: row.lora, textContent: `${loraLabel(row.lora)} (missing)`, title: row.lora }));
      }
      select.value = row.lora;
      select.title = `${row.lora} (models/loras)`;
      const triggers = el("div", { className: "lw-triggers" });
      const line = el("div", { className: `lw-stack-row${row.enabled ? "" : " lw-off"}`, dataset: { row: String(i + 1) } },
        el("input", { type: "checkbox", className: "lw-enabled", checked: row.enabled, title: "on / off (keeps the settings)",
                      onchange: safely("toggle", (e) => api_.update(i, { enabled: e.target.checked })) }),
        select,
        numberInput("lw-model", row.model, "model strength", (v) => api_.update(i, { model: v })),
        numberInput("lw-clip", row.clip, "clip strength", (v) => api_.update(i, { clip: v })),
        el("button", { className: "lw-up", textContent: "▲", title: "move up", disabled: i === 0,
                       onclick: safely("move", () => api_.move(i, -1)) }),
        el("button", { className: "lw-down", textContent: "▼", title: "move down", disabled: i === rows.length - 1,
                       onclick: safely("move", () => api_.move(i, 1)) }),
        el("button", { className: "lw-remove", textContent: "✕", title: "remove",
                       onclick: safely("remove", () => api_.remove(i)) }),
        triggers);
      lookups.push(showTriggers(triggers, row.lora));
      return line;
    }));
    addButton.disabled = rows.length >= slots.length;
    root.dataset.rows = String(rows.length);
    fit(node);
    Promise.all(lookups).then(safely("fit", () => fit(node))); // trigger words may take a second line
  }

  addButton.addEventListener("click", safely("add", () => api_.add()));
  addView(node, "lw_stack_editor", root, () => contentHeight(root, () => 40 + count() * 40));
  node.lwRender = render;
  render();
}

// ---------------------------------------------------------------------------------------------- loaders
function addTriggerLine(node) {
  const picker = widget(node, "lora_name");
  if (!picker) return;
  const line = el("div", { className: "lw-trigger-line" });
  const box = el("div", { className: "lw-view" }, line);
  addView(node, "lw_trigger_words", box, () => Math.max(18, contentHeight(box, () => 18)));
  const update = () => showTriggers(line, picker.value).then(safely("fit", () => fit(node)));
  const original = picker.callback;
  picker.callback = function (...args) {
    const result = original?.apply(this, args);
    safely("trigger words", update)();
    return result;
  };
  node.lwRender = update;
  update();
}

// ---------------------------------------------------------------------------------------------- extension
app.registerExtension({
  name: EXTENSION,
  setup() {
    document.head.append(el("style", { textContent: STYLE, id: "lora-workbench-style" }));
    listenForTraining();
  },
  nodeCreated: safely("nodeCreated", (node) => {
    const type = classOf(node);
    if (TRAIN_NODES.has(type)) addTrainView(node);
    else if (type === STACK_NODE) addStackEditor(node);
    else if (widget(node, "lora_name")?.type === "combo") addTriggerLine(node);
    if (node.lwRender || node.lwTrain) {
      // Saved values arrive after creation (configure): show them, and make room for the view.
      const configure = node.onConfigure;
      node.onConfigure = function (...args) {
        const result = configure?.apply(this, args);
        safely("configure", () => { node.lwRender?.(); fit(node); })();
        return result;
      };
      requestAnimationFrame(() => fit(node));
    }
  }),
});
