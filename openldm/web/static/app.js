// openldm serve's page: a form over GET /openldm/models/{name} (what the model can do), POST /openldm/jobs,
// polling GET /openldm/jobs/{id} (+ /preview) until the job ends, a gallery of results, and PNG parameters back
// into the form (POST /openldm/png-info). Plain JS, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;

const state = {
  caps: null,          // the chosen model's capabilities
  models: [],          // names served
  tab: "txt2img",      // the visible tab
  job: null,           // id of the running job
  lastSeed: null,      // the last finished job's first seed
  initImage: null,     // image-to-image: {url, width, height}
  inpaintImage: null,  // inpainting: {url, width, height}
  maskPainted: false,
};

// ------------------------------------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(message, field) { super(message); this.field = field || null; }
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = (data && (data.error || (typeof data.detail === "string" && data.detail))) ||
      `${method} ${path}: HTTP ${response.status}`;
    throw new ApiError(message, data && data.field);
  }
  return data;
}

// ----------------------------------------------------------------------------------------- errors

// request field -> the element showing it (fields of the model's inputs are "input-<name>")
function fieldElement(field) {
  if (!field) return null;
  const imageTab = state.tab === "inpaint" ? "inpaint" : "init";
  const map = {
    model: "model", prompt: "prompt", negative_prompt: "negative-prompt", class_label: "class-label",
    seed: "seed", sampler: "sampler", karras: "karras", steps: "steps", guidance_scale: "guidance",
    width: "width", height: "height", num_images: "num-images", mask: "mask-view",
    init_image: imageTab === "inpaint" ? "inpaint-image" : "init-image",
    strength: { inpaint: "inpaint-strength", img2img: "strength" }[state.tab] || "hires-strength",
    image: "png-file", hires_scale: "hires-scale", hires_upscaler: "hires-upscaler", hires_steps: "hires-steps",
    tiling: "tiling", vae: "vae", subseed: "subseed", subseed_strength: "subseed-strength",
  };
  const name = String(field).replace(/^inputs\./, "");
  return $(map[field] || `input-${name}`);
}

function showError(message, field) {
  clearError();
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  const el = fieldElement(field);
  if (el) {
    el.classList.add("invalid");
    const row = el.closest("label");
    if (row) row.classList.add("invalid-row");
  }
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  document.querySelectorAll(".invalid-row").forEach((el) => el.classList.remove("invalid-row"));
}

function reportError(e) {
  showError(e.message || String(e), e.field);
}

// ------------------------------------------------------------------------------------------ models

async function loadModels() {
  const data = await api("GET", "/openldm/models");
  state.models = data.models.map((m) => m.name);
  const select = $("model");
  select.replaceChildren(...data.models.map((m) => new Option(m.name, m.name)));
  select.value = data.current;
  await selectModel(select.value);
}

async function selectModel(name) {
  $("generate").disabled = true;
  $("model-info").textContent = `loading ${name}…`;
  try {
    applyCapabilities(await api("GET", `/openldm/models/${encodeURIComponent(name)}`));
  } catch (e) {
    $("model-info").textContent = "";
    reportError(e);
    return;
  }
  $("generate").disabled = state.job !== null;
}

function setVisible(id, visible) {
  const el = $(id);
  el.hidden = !visible;
  el.querySelectorAll("input, select, textarea").forEach((x) => { x.disabled = !visible; });
}

function applyCapabilities(caps) {
  state.caps = caps;
  const colour = caps.channels === 1 ? "greyscale" : "RGB";
  $("model-info").textContent = `${caps.kind}, ${colour}, sizes in multiples of ${caps.size_multiple}` +
    (caps.num_classes ? `, ${caps.num_classes} classes` : "");
  $("model-info").title = caps.source;

  setVisible("prompt-row", caps.prompt);
  setVisible("negative-prompt-row", caps.negative_prompt);
  if (!caps.prompt) $("prompt").value = "";
  if (!caps.negative_prompt) $("negative-prompt").value = "";

  const labels = caps.sampler_labels || {};
  $("sampler").replaceChildren(...caps.samplers.map((s) => new Option(labels[s] || s, s)));

  // conditions: a class picker by name, a field per declared input
  const classes = caps.class_names || (caps.num_classes ? [...Array(caps.num_classes).keys()].map(String) : null);
  const classSelect = $("class-label");
  classSelect.replaceChildren(new Option("(none: unconditional)", ""),
    ...(classes || []).map((name, i) => new Option(`${i}: ${name}`, String(i))));
  setVisible("class-row", Boolean(classes));
  buildInputs(caps.inputs || []);
  const hasConditions = Boolean(classes) || (caps.inputs || []).length > 0;

  setVisible("hires-row", Boolean(caps.hires_fix));
  setVisible("tiling-row", Boolean(caps.tiling));
  const vaes = caps.vaes || [];
  $("vae").replaceChildren(new Option("Automatic (the model's own)", ""), ...vaes.map((v) => new Option(v, v)));
  setVisible("vae-row", vaes.length > 0);
  $("hires-upscaler").replaceChildren(...(caps.hires_upscalers || []).map((u) => new Option(u, u)));
  $("tab-img2img").hidden = !caps.image_to_image;
  $("tab-inpaint").hidden = !caps.inpainting;
  $("tab-conditions").hidden = !hasConditions;
  if ($(`tab-${state.tab}`).hidden) showTab("txt2img");

  $("steps").max = caps.max_steps;
  for (const id of ["width", "height"]) {
    $(id).step = caps.size_multiple;
    $(id).min = caps.size_multiple;
  }
  applyRecommended(caps.recommended);
  updateSummary();
}

function applyRecommended(rec) {
  $("sampler").value = rec.sampler;
  $("karras").checked = Boolean(rec.karras);
  $("steps").value = rec.steps;
  $("guidance").value = rec.guidance_scale;
  $("width").value = rec.width;
  $("height").value = rec.height;
}

function buildInputs(inputs) {
  const box = $("inputs");
  box.replaceChildren();
  for (const field of inputs) {
    const label = document.createElement("label");
    label.textContent = field.name.replace(/_/g, " ");
    label.title = field.help || "";
    let input;
    if (field.type === "image" || field.type === "label_map") {
      input = document.createElement("input");
      input.type = "file";
      input.accept = "image/*";
      const thumb = document.createElement("img");
      thumb.className = "thumb";
      thumb.hidden = true;
      input.addEventListener("change", async () => {
        const file = input.files[0];
        input.dataset.url = file ? await readDataURL(file) : "";
        thumb.src = input.dataset.url || "";
        thumb.hidden = !file;
        updateSummary();
      });
      label.append(input, thumb);
    } else {
      input = document.createElement("input");
      input.type = "number";
      input.step = field.type === "int" ? "1" : "any";
      input.addEventListener("input", updateSummary);
      label.append(input);
    }
    input.id = `input-${field.name}`;
    input.dataset.name = field.name;
    input.dataset.kind = field.type;
    if (field.help) {
      const help = document.createElement("span");
      help.className = "muted small";
      help.textContent = field.help;
      label.append(help);
    }
    box.append(label);
  }
}

function inputValues() {
  const values = {};
  for (const el of $("inputs").querySelectorAll("input")) {
    if (el.type === "file") {
      if (el.dataset.url) values[el.dataset.name] = el.dataset.url;
    } else if (el.value !== "") {
      values[el.dataset.name] = Number(el.value);
    }
  }
  return values;
}

function updateSummary() {
  const parts = [];
  const classSelect = $("class-label");
  if (!$("class-row").hidden && classSelect.value !== "") {
    parts.push(`class ${classSelect.selectedOptions[0].textContent.replace(/^\d+: /, "")}`);
  }
  for (const name of Object.keys(inputValues())) parts.push(name.replace(/_/g, " "));
  const summary = $("conditions-summary");
  summary.textContent = parts.length ? `Conditions: ${parts.join(", ")}` : "";
  summary.hidden = parts.length === 0;
}

// -------------------------------------------------------------------------------------------- tabs

const MODE_LABELS = { txt2img: "text to image", img2img: "image to image", inpaint: "inpainting",
  conditions: "from the conditions" };

function showTab(name) {
  state.tab = name;
  for (const tab of document.querySelectorAll(".tab")) {
    const active = tab.dataset.tab === name;
    tab.classList.toggle("active", active);
    tab.setAttribute("aria-selected", String(active));
    $(`panel-${tab.dataset.tab}`).hidden = !active;
  }
  $("mode-label").textContent = MODE_LABELS[name];
  const fromImage = name === "img2img" || name === "inpaint";
  $("width").disabled = fromImage;
  $("height").disabled = fromImage;
  if (name === "inpaint") resizeMaskView();
}

// ------------------------------------------------------------------------------------------ images

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("not an image the browser can read"));
    img.src = url;
  });
}

async function setInitImage(url) {
  const img = await loadImage(url);
  state.initImage = { url, width: img.naturalWidth, height: img.naturalHeight };
  const thumb = $("init-preview");
  thumb.src = url;
  thumb.hidden = false;
  thumb.title = `${img.naturalWidth}x${img.naturalHeight}`;
}

// ---------------------------------------------------------------------------------- mask painting
// #mask-canvas holds the mask itself at the image's size (white = redraw, black = keep); #mask-view shows it as
// a red tint over the image, at the same resolution, scaled up by CSS.

const painter = { drawing: false, last: null, pending: false };

async function setInpaintImage(url) {
  const img = await loadImage(url);
  const w = img.naturalWidth, h = img.naturalHeight;
  state.inpaintImage = { url, width: w, height: h };
  $("inpaint-preview").src = url;
  for (const id of ["mask-canvas", "mask-view"]) {
    $(id).width = w;
    $(id).height = h;
  }
  const brush = $("brush-size");
  brush.max = Math.max(2, Math.ceil(Math.max(w, h) / 2));
  brush.value = Math.max(1, Math.round(Math.min(w, h) / 8));
  $("brush-size-value").textContent = brush.value;
  $("mask-stage").hidden = false;
  clearMask();
  resizeMaskView();
}

function resizeMaskView() {
  const image = state.inpaintImage;
  if (!image) return;
  const room = Math.min(420, $("panel-inpaint").clientWidth || 420);
  const scale = room / Math.max(image.width, image.height);
  const stage = $("mask-stage");
  stage.style.width = `${Math.round(image.width * scale)}px`;
  stage.style.height = `${Math.round(image.height * scale)}px`;
}

function maskContext() {
  return $("mask-canvas").getContext("2d", { willReadFrequently: true });
}

function clearMask() {
  const canvas = $("mask-canvas");
  const ctx = maskContext();
  ctx.globalCompositeOperation = "source-over";
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  state.maskPainted = false;
  redrawMaskView();
}

function invertMask() {
  const canvas = $("mask-canvas");
  if (!canvas.width) return;
  const ctx = maskContext();
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < data.data.length; i += 4) {
    const v = 255 - data.data[i];
    data.data[i] = data.data[i + 1] = data.data[i + 2] = v;
    data.data[i + 3] = 255;
  }
  ctx.putImageData(data, 0, 0);
  state.maskPainted = true;
  redrawMaskView();
}

function redrawMaskView() {
  const mask = $("mask-canvas"), view = $("mask-view");
  if (!mask.width) return;
  const source = maskContext().getImageData(0, 0, mask.width, mask.height);
  const tint = new ImageData(mask.width, mask.height);
  for (let i = 0; i < source.data.length; i += 4) {
    tint.data[i] = 255;
    tint.data[i + 1] = 40;
    tint.data[i + 2] = 60;
    tint.data[i + 3] = Math.round(source.data[i] * 0.6);
  }
  view.getContext("2d").putImageData(tint, 0, 0);
}

function scheduleRedraw() {
  if (painter.pending) return;
  painter.pending = true;
  requestAnimationFrame(() => { painter.pending = false; redrawMaskView(); });
}

function canvasPoint(event) {
  const view = $("mask-view");
  const rect = view.getBoundingClientRect();
  return { x: (event.clientX - rect.left) * view.width / rect.width,
           y: (event.clientY - rect.top) * view.height / rect.height };
}

function paintTo(point) {
  const ctx = maskContext();
  const size = Number($("brush-size").value);
  ctx.globalCompositeOperation = "source-over";
  ctx.strokeStyle = ctx.fillStyle = $("eraser").checked ? "#000" : "#fff";
  ctx.lineWidth = size;
  ctx.lineCap = ctx.lineJoin = "round";
  if (painter.last) {
    ctx.beginPath();
    ctx.moveTo(painter.last.x, painter.last.y);
    ctx.lineTo(point.x, point.y);
    ctx.stroke();
  } else {
    ctx.beginPath();
    ctx.arc(point.x, point.y, size / 2, 0, 2 * Math.PI);
    ctx.fill();
  }
  painter.last = point;
  state.maskPainted = true;
  scheduleRedraw();
}

function moveBrushCursor(event) {
  const view = $("mask-view"), cursor = $("brush-cursor");
  const rect = view.getBoundingClientRect();
  const diameter = Number($("brush-size").value) * rect.width / view.width;
  cursor.style.width = cursor.style.height = `${diameter}px`;
  cursor.style.left = `${event.clientX - rect.left - diameter / 2}px`;
  cursor.style.top = `${event.clientY - rect.top - diameter / 2}px`;
  cursor.hidden = false;
}

function setUpPainter() {
  const view = $("mask-view");
  view.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    view.setPointerCapture(e.pointerId);
    painter.drawing = true;
    painter.last = null;
    paintTo(canvasPoint(e));
  });
  view.addEventListener("pointermove", (e) => {
    moveBrushCursor(e);
    if (painter.drawing) paintTo(canvasPoint(e));
  });
  const stop = () => { painter.drawing = false; painter.last = null; };
  view.addEventListener("pointerup", stop);
  view.addEventListener("pointercancel", stop);
  view.addEventListener("pointerleave", () => { $("brush-cursor").hidden = true; });
  $("brush-size").addEventListener("input", () => { $("brush-size-value").textContent = $("brush-size").value; });
  $("mask-clear").addEventListener("click", clearMask);
  $("mask-invert").addEventListener("click", invertMask);
  window.addEventListener("resize", resizeMaskView);
}

// ---------------------------------------------------------------------------------------- request

function numberOrNull(id) {
  const el = $(id);
  if (el.disabled || el.value === "") return null;
  const value = Number(el.value);
  return Number.isFinite(value) ? value : null;
}

function buildRequest() {
  const caps = state.caps;
  const classValue = $("class-label").value;
  const seed = numberOrNull("seed");
  const request = {
    model: $("model").value,
    prompt: caps.prompt ? $("prompt").value : null,
    negative_prompt: caps.negative_prompt ? $("negative-prompt").value : "",
    class_label: !$("class-row").hidden && classValue !== "" ? Number(classValue) : null,
    seed: seed === null ? -1 : Math.trunc(seed),
    sampler: $("sampler").value || null,
    karras: $("karras").checked,
    steps: numberOrNull("steps"),
    guidance_scale: numberOrNull("guidance"),
    width: null,
    height: null,
    num_images: numberOrNull("num-images") || 1,
    init_image: null,
    strength: null,
    mask: null,
    paste_back: false,
    inputs: inputValues(),
    tiling: Boolean(caps.tiling) && $("tiling").checked,
    vae: $("vae").value || null,
    subseed: Math.trunc(numberOrNull("subseed") ?? -1),
    subseed_strength: numberOrNull("subseed-strength") || 0,
  };
  if (state.tab === "img2img") {
    if (!state.initImage) throw new ApiError("choose an init image for image-to-image", "init_image");
    request.init_image = state.initImage.url;
    request.strength = Number($("strength").value);
  } else if (state.tab === "inpaint") {
    if (!state.inpaintImage) throw new ApiError("choose an image to inpaint", "init_image");
    if (!state.maskPainted) throw new ApiError("paint the region to redraw on the image", "mask");
    request.init_image = state.inpaintImage.url;
    request.mask = $("mask-canvas").toDataURL("image/png");
    request.strength = Number($("inpaint-strength").value);
    request.paste_back = $("paste-back").checked;
  } else {
    request.width = numberOrNull("width");
    request.height = numberOrNull("height");
    if (caps.hires_fix && $("hires").checked) {
      request.hires_scale = numberOrNull("hires-scale");
      request.hires_upscaler = $("hires-upscaler").value || null;
      request.hires_steps = numberOrNull("hires-steps") || null;  // 0: the same as Steps
      request.strength = Number($("hires-strength").value);
    }
  }
  return request;
}

// ------------------------------------------------------------------------------------- generation

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function generate() {
  if (state.job !== null || !state.caps) return;
  clearError();
  let request;
  try {
    request = buildRequest();
  } catch (e) {
    reportError(e);
    return;
  }
  setRunning(true);
  $("progress").value = 0;
  $("eta").textContent = "submitting…";
  try {
    const started = performance.now();
    const { id } = await api("POST", "/openldm/jobs", request);
    state.job = id;
    const job = await follow(id);
    finish(job);
    const count = job.images.length;
    $("eta").textContent = `${job.state} · ${count} image${count === 1 ? "" : "s"} in ` +
      formatSeconds((performance.now() - started) / 1000);
  } catch (e) {
    reportError(e);
    $("eta").textContent = "failed";
  } finally {
    state.job = null;
    setRunning(false);
    $("preview").hidden = true;
  }
}

function setRunning(running) {
  $("generate").disabled = running;
  $("interrupt").disabled = !running;
  document.body.classList.toggle("running", running);
}

// Poll the job until it ends, showing progress, ETA and the live preview; returns the final job.
async function follow(id) {
  let counter = 0;
  for (;;) {
    const job = await api("GET", `/openldm/jobs/${id}`);
    showProgress(job);
    if (["done", "interrupted", "failed"].includes(job.state)) return job;
    if (job.state === "running" && job.step > 0) refreshPreview(id, ++counter);
    await sleep(POLL_MS);
  }
}

function showProgress(job) {
  const fraction = job.total > 0 ? job.step / job.total : job.progress;
  $("progress").value = job.state === "done" ? 1 : Math.min(1, fraction || 0);
  let text;
  if (job.state === "queued") text = `queued (position ${job.position})`;
  else if (job.state === "running") {
    text = job.total ? `step ${job.step} / ${job.total}` : "starting…";
    if (job.eta_seconds !== null && job.eta_seconds !== undefined) text += ` · ETA ${formatSeconds(job.eta_seconds)}`;
  } else text = job.state;
  $("eta").textContent = text;
}

function formatSeconds(s) {
  if (s < 60) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

// Load the preview off-screen and show it only when it arrived (404 before the first step: keep the old one).
function refreshPreview(id, counter) {
  const img = new Image();
  img.onload = () => {
    if (state.job !== id) return;
    $("preview").src = img.src;
    $("preview").hidden = false;
  };
  img.src = `/openldm/jobs/${id}/preview?t=${counter}`;
}

function finish(job) {
  if (job.state === "failed") throw new ApiError(`generation failed: ${job.error || "unknown error"}`);
  if (job.seeds && job.seeds.length) {
    state.lastSeed = job.seeds[0];
    $("seed-reuse").disabled = false;
  }
  addResults(job);
}

async function interrupt() {
  if (state.job === null) return;
  try {
    await api("POST", `/openldm/jobs/${state.job}/interrupt`);
    $("eta").textContent = "interrupting…";
  } catch (e) {
    reportError(e);
  }
}

// ------------------------------------------------------------------------------------------- gallery

function addResults(job) {
  const gallery = $("gallery");
  const cards = job.images.map((url, i) => {
    const seed = job.seeds[i];
    const card = document.createElement("figure");
    card.className = "result";
    card.dataset.job = job.id;
    if (job.state === "interrupted") card.classList.add("interrupted");

    const img = document.createElement("img");
    img.className = "result-image";
    img.src = url;
    img.alt = `result ${i + 1}, seed ${seed}`;
    img.dataset.seed = seed;
    img.addEventListener("load", () => { img.title = `${img.naturalWidth}x${img.naturalHeight}`; });

    const info = document.createElement("pre");
    info.className = "infotext";
    info.textContent = (job.infotexts[i] || "").trim();

    const tools = document.createElement("div");
    tools.className = "tools";
    const download = document.createElement("a");
    download.className = "download";
    download.href = url;
    download.download = `openldm-${seed}-${i}.png`;
    download.textContent = "download";
    tools.append(download,
      toolButton("seed", "use this image's seed", () => { $("seed").value = seed; }),
      toolButton("→ img2img", "use as the init image", async () => { await setInitImage(url); showTab("img2img"); }),
      toolButton("→ inpaint", "inpaint this image", async () => { showTab("inpaint"); await setInpaintImage(url); }));
    if (!state.caps || !state.caps.image_to_image) tools.children[2].hidden = true;
    if (!state.caps || !state.caps.inpainting) tools.children[3].hidden = true;

    card.append(img, info, tools);
    return card;
  });
  gallery.prepend(...cards);
}

function toolButton(text, title, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = text;
  button.title = title;
  button.addEventListener("click", () => { Promise.resolve().then(onClick).catch(reportError); });
  return button;
}

// ----------------------------------------------------------------------------------- PNG parameters

async function loadParameters(file) {
  clearError();
  try {
    const url = await readDataURL(file);
    const info = await api("POST", "/openldm/png-info", { image: url });
    const box = $("png-info");
    box.textContent = `${file.name}:\n${info.text.trim()}`;
    box.hidden = false;
    await applyParams(info.params);
  } catch (e) {
    reportError(e);
  }
}

async function applyParams(p) {
  if (p.model && state.models.includes(p.model) && p.model !== $("model").value) {
    $("model").value = p.model;
    await selectModel(p.model);
  }
  const caps = state.caps;
  if (caps && caps.prompt && p.prompt !== undefined) $("prompt").value = p.prompt || "";
  if (caps && caps.negative_prompt && p.negative_prompt !== undefined) $("negative-prompt").value = p.negative_prompt || "";
  if (p.sampler && [...$("sampler").options].some((o) => o.value === p.sampler)) $("sampler").value = p.sampler;
  if (p.karras !== undefined && p.karras !== null) $("karras").checked = Boolean(p.karras);
  const numbers = { steps: "steps", guidance_scale: "guidance", seed: "seed", width: "width", height: "height",
    num_images: "num-images" };
  for (const [key, id] of Object.entries(numbers)) {
    if (p[key] !== undefined && p[key] !== null) $(id).value = p[key];
  }
  if (caps && caps.tiling) $("tiling").checked = Boolean(p.tiling);
  if ([...$("vae").options].some((o) => o.value === (p.vae || ""))) $("vae").value = p.vae || "";
  $("subseed-strength").value = p.subseed_strength || 0;
  if (p.subseed !== undefined && p.subseed !== null) $("subseed").value = p.subseed;
  if (caps && caps.hires_fix) {
    $("hires").checked = p.hires_scale !== undefined && p.hires_scale !== null;
    if ($("hires").checked) {
      $("hires-scale").value = p.hires_scale;
      if ([...$("hires-upscaler").options].some((o) => o.value === p.hires_upscaler)) {
        $("hires-upscaler").value = p.hires_upscaler;
      }
      $("hires-steps").value = p.hires_steps || 0;
    }
  }
  if (p.strength !== undefined && p.strength !== null) {
    for (const id of ["strength", "inpaint-strength", "hires-strength"]) {
      $(id).value = p.strength;
      $(id).dispatchEvent(new Event("input"));
    }
  }
  if (p.class_label !== undefined && p.class_label !== null && caps) {
    const names = caps.class_names || [];
    const text = String(p.class_label);
    const index = /^\d+$/.test(text) ? Number(text) : names.indexOf(text);
    if (index >= 0 && [...$("class-label").options].some((o) => o.value === String(index))) {
      $("class-label").value = String(index);
    }
  }
  updateSummary();
}

function setUpDrop() {
  let depth = 0;
  const overlay = $("drop-overlay");
  const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth++;
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) overlay.hidden = true;
  });
  document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    depth = 0;
    overlay.hidden = true;
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (!file) return;
    e.preventDefault();
    const target = e.target instanceof Element ? e.target.closest("[data-drop]") : null;
    if (target && target.dataset.drop === "init") readDataURL(file).then(setInitImage).catch(reportError);
    else if (target && target.dataset.drop === "inpaint") readDataURL(file).then(setInpaintImage).catch(reportError);
    else loadParameters(file);
  });
}

// ------------------------------------------------------------------------------------------- wiring

function setUp() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  $("model").addEventListener("change", () => { clearError(); selectModel($("model").value); });
  $("generate").addEventListener("click", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-reuse").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  $("class-label").addEventListener("change", updateSummary);
  for (const id of ["strength", "inpaint-strength", "hires-strength"]) {
    $(id).addEventListener("input", () => { $(`${id}-value`).textContent = Number($(id).value).toFixed(2); });
  }
  $("init-image").addEventListener("change", async () => {
    const file = $("init-image").files[0];
    if (file) await setInitImage(await readDataURL(file)).catch(reportError);
  });
  $("inpaint-image").addEventListener("change", async () => {
    const file = $("inpaint-image").files[0];
    if (file) await setInpaintImage(await readDataURL(file)).catch(reportError);
  });
  $("png-file").addEventListener("change", () => {
    const file = $("png-file").files[0];
    if (file) loadParameters(file);
    $("png-file").value = "";
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
  });
  // a field the user edits is no longer the one in error
  document.addEventListener("input", (e) => {
    if (e.target.classList && e.target.classList.contains("invalid")) clearError();
  });
  setUpPainter();
  setUpDrop();
  showTab("txt2img");
  loadModels().catch(reportError);
}

setUp();
