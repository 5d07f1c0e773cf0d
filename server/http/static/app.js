// The playground. Reads /info and /classes, posts /generate asking for server-sent events (progress, queue
// position, x0 previews), shows the images with their seeds, and keeps a history of this browser's results.
// State the tests read is mirrored on <body data-*>: ready, state, done, previews (and the last one's
// size as sent and as decoded), cancelled.
"use strict";
const $ = (id) => document.getElementById(id);
const KEY_STORE = "dit-api-key";
const HISTORY_STORE = "dit-history";
const HISTORY_MAX = 24;
const SEED_END = 2 ** 53;    // seeds stay below 2^53 so a JavaScript number holds them exactly
const RESULT_PX = 256;       // images are shown at the largest whole-number scale that fits this
const THUMB_PX = 64;         // history thumbnails: at most this per image, at most 4 images
let classes = [];
let info = null;
let current = null;          // the generation in flight: {controller, body, step, steps, previews, finished}
let previewsSupported = true; // until a server without preview events says "unknown field previews"
let statusField = null;      // the form field the error shown is about: fixing that field clears it

// ---- small helpers ----

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }
function authHeaders() { return apiKey() ? { "X-API-Key": apiKey() } : {}; }
function bump(name) { document.body.dataset[name] = String(Number(document.body.dataset[name] || 0) + 1); }

function setStatus(text, isError = false, field = null) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
  statusField = isError ? field : null;
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

// A whole-number magnification keeps every pixel a crisp square (with image-rendering: pixelated);
// images larger than the box are shrunk to fit instead.
function showAt(img, width, height, box) {
  const scale = width <= box ? Math.max(1, Math.floor(box / width)) : box / width;
  img.style.width = `${Math.round(width * scale)}px`;
  img.style.height = `${Math.round(height * scale)}px`;
}

function randomSeed(count) {
  // 53 random bits, then kept low enough that seed + k (image k of the request) is below 2^53 too.
  const [hi, lo] = crypto.getRandomValues(new Uint32Array(2));
  return ((hi & 0x1fffff) * 2 ** 32 + lo) % (SEED_END - count + 1);
}

function readSeed(count) {
  const typed = $("seed").value.trim();
  if (typed === "") return randomSeed(count);
  if (!/^\d+$/.test(typed) || Number(typed) > SEED_END - count) return null;
  return Number(typed);
}

function readInterval() {
  const interval = [Number($("interval-lo").value), Number($("interval-hi").value)];
  return 0 <= interval[0] && interval[0] < interval[1] && interval[1] <= 1 ? interval : null;
}

// Whether each field an error can be about is now valid (what generate() checks before sending).
const FIELD_OK = {
  class: () => classId($("class").value) !== null,
  seed: () => readSeed(Number($("num-images").value) || 1) !== null,
  interval: () => readInterval() !== null,
};

function clearFixedError() {
  if (statusField && FIELD_OK[statusField]()) setStatus("");
}

function classId(text) {
  const t = text.trim().toLowerCase();
  if (/^\d+$/.test(t)) return Number(t);
  const exact = classes.find((c) => c.name.toLowerCase() === t || `${c.id}: ${c.name}`.toLowerCase() === t);
  if (exact) return exact.id;
  const partial = classes.filter((c) => c.name.toLowerCase().includes(t));
  return partial.length === 1 ? partial[0].id : null;
}

// ---- loading, and the API key ----

async function load() {
  document.body.dataset.state = "loading";
  let r;
  try {
    r = await fetch("/info", { headers: authHeaders() });
  } catch (e) {
    return retryLoad(`the server does not answer (${e.message})`);
  }
  if (r.status === 401) return askForKey(Boolean(apiKey()));
  const body = await r.json().catch(() => null);
  if (r.status === 503) return retryLoad(body?.error?.message || "not ready");
  if (!r.ok) return setStatus(explain(r.status, body), true);
  const cls = await fetch("/classes", { headers: authHeaders() });
  if (!cls.ok) return setStatus(explain(cls.status, await cls.json().catch(() => null)), true);
  classes = (await cls.json()).classes;
  if (!info) fillForm(body);
  info = body;
  $("model-line").textContent = `${info.model}: ${info.image_size} px, ${info.num_classes} classes, ` +
    `${info.device} ${info.dtype}, ${info.policy} batching`;
  $("key-form").hidden = true;
  $("forget-key").hidden = !apiKey();
  setStatus("");
  document.body.dataset.ready = "true";
  document.body.dataset.state = "idle";
}

function fillForm(i) {
  $("class-list").replaceChildren(...classes.map((c) => new Option(`${c.id}: ${c.name}`, c.name)));
  Object.assign($("cfg"), { min: i.limits.min_cfg_scale, max: Math.min(i.limits.max_cfg_scale, 10),
                            value: i.defaults.cfg_scale });
  $("cfg-value").textContent = i.defaults.cfg_scale;
  Object.assign($("steps"), { max: i.limits.max_steps, value: Math.min(i.defaults.steps, i.limits.max_steps) });
  $("sampler").replaceChildren(...i.samplers.map((s) => new Option(s, s, false, s === i.defaults.sampler)));
  showGuidanceInterval(i.defaults.guidance_interval);
  const presets = Object.keys(i.cache_presets);  // "off" first; a default given as parameters is shown as such
  const custom = typeof i.defaults.cache === "string" ? [] : [JSON.stringify(i.defaults.cache)];
  $("cache").replaceChildren(...[...presets, ...custom].map((name) => new Option(
    name, name, false, name === (custom[0] ?? i.defaults.cache))));
  $("num-images").max = i.limits.max_images;
}

function readCache() {
  const value = $("cache").value;
  return value.startsWith("{") ? JSON.parse(value) : value;
}

function showGuidanceInterval([lo, hi]) {
  $("interval-lo").value = lo;
  $("interval-hi").value = hi;
}

function retryLoad(reason) {
  setStatus(`The server is not ready yet (${reason}); this page tries again every few seconds.`, true);
  setTimeout(load, 3000);
}

function askForKey(refused) {
  $("key-message").textContent = refused ? "The server refused this API key: enter a valid one."
                                         : "This server needs an API key: enter it to use the playground.";
  $("key-form").hidden = false;
  $("forget-key").hidden = !apiKey();
  document.body.dataset.state = "needs-key";
  setStatus("Waiting for an API key.", true);
  $("api-key").focus();
}

function useKey(ev) {
  ev.preventDefault();
  localStorage.setItem(KEY_STORE, $("api-key").value.trim());
  $("api-key").value = "";
  load();
}

function forgetKey() {
  localStorage.removeItem(KEY_STORE);
  load();
}

function explain(status, body, retryAfter) {
  const err = (body && body.error) || {};
  if (status === 429) return `The server is busy (${err.message || "queue full"}); try again in ${retryAfter || "a few"} s.`;
  if (status === 401) return "The server refused the API key: enter a valid one above.";
  if (status === 503) return `The server is not ready: ${err.message || ""}`;
  if (status === 504) return `The server gave up: ${err.message || "the request took too long"}.`;
  if (status === 422) return `Please check ${err.field || "the form"}: ${err.message}`;
  return `Generation failed (${status}): ${err.message || "unknown error"}`;
}

// ---- generating ----

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").hidden = !busy;
  $("cancel").disabled = false;
  $("progress").hidden = !busy;
  $("progress").removeAttribute("value");  // indeterminate while queued
  $("results").classList.toggle("stale", busy);
  document.body.dataset.state = busy ? "running" : "idle";
}

function post(job, withPreviews) {
  const body = withPreviews ? { ...job.body, previews: true } : job.body;
  return fetch("/generate", { method: "POST", body: JSON.stringify(body), signal: job.controller.signal,
    headers: { "Content-Type": "application/json", "Accept": "text/event-stream", ...authHeaders() } });
}

async function generate(ev) {
  ev.preventDefault();
  if (current) return;
  const id = classId($("class").value);
  if (id === null) return setStatus("Pick a class from the list (type part of its name).", true, "class");
  const count = Number($("num-images").value) || 1;
  const seed = readSeed(count);
  if (seed === null) {
    return setStatus(`The seed is a whole number from 0 to ${SEED_END - count}; leave it empty for a random one.`,
                     true, "seed");
  }
  const interval = readInterval();
  if (interval === null) {
    return setStatus("The guidance interval needs 0 ≤ from < to ≤ 1 (0 to 1 guides every step).", true, "interval");
  }
  const body = { class_id: id, cfg_scale: Number($("cfg").value), steps: Number($("steps").value),
                 sampler: $("sampler").value, guidance_interval: interval, cache: readCache(), seed,
                 num_images: count };
  const job = current = { controller: new AbortController(), body, step: 0, steps: body.steps, previews: 0,
                          finished: false };
  setBusy(true);
  showLastSeed(seed);
  setStatus(`sending… (seed ${seed})`);
  try {
    let r = await post(job, previewsSupported);
    if (r.status === 422 && previewsSupported) {
      // A server without live previews rejects the field (unknown fields are 422): ask again without it.
      const err = await r.clone().json().catch(() => null);
      if (err?.error?.field === "previews") {
        previewsSupported = false;
        r = await post(job, false);
      }
    }
    if (!r.ok) {
      const err = await r.json().catch(() => null);
      if (r.status === 401) askForKey(true);
      return setStatus(explain(r.status, err, r.headers.get("Retry-After")), true);
    }
    await readEvents(r.body.getReader(), (name, data) => onEvent(job, name, data));
    if (!job.finished) setStatus("The server closed the stream before the result; try again.", true);
  } catch (e) {
    if (e.name === "AbortError") showCancelled(job);
    else setStatus(`The connection failed: ${e.message}`, true);
  } finally {
    current = null;
    setBusy(false);
  }
}

function cancel() {
  // Closing the stream is the cancel: the server drops the request's samples at its next step.
  if (!current) return;
  $("cancel").disabled = true;
  current.controller.abort();
}

function showCancelled(job) {
  const where = job.step > 0 ? `at step ${job.step} of ${job.steps}` : "before it started";
  setStatus(`Cancelled ${where}: the server stopped this generation and freed its samples.`);
  const preview = $("results").querySelector("figure.preview");
  if (preview) {
    preview.classList.add("cancelled");
    preview.querySelector("figcaption").textContent = `cancelled ${where}`;
  }
  bump("cancelled");
}

function onEvent(job, name, data) {
  if (name === "progress") showProgress(job, data);
  else if (name === "preview") showPreview(job, data);
  else if (name === "result") {
    job.finished = true;
    showResult(job, data);
  } else if (name === "error") {
    job.finished = true;
    const status = { deadline_exceeded: 504, queue_full: 429, not_ready: 503 }[data.error.code] || 500;
    setStatus(explain(status, data), true);
  }
}

function showProgress(job, p) {
  job.step = p.step;
  job.steps = p.steps;
  if (p.status === "queued") {
    const pos = p.queue_position;
    setStatus(pos === 1 ? "waiting in the queue: next" : pos ? `waiting in the queue: position ${pos}`
                                                           : "waiting in the queue…");
    document.body.dataset.queuePosition = pos || "";
    return;
  }
  delete document.body.dataset.queuePosition;
  $("progress").value = p.steps ? p.step / p.steps : 0;
  setStatus(p.status === "running" ? `step ${p.step} of ${p.steps} (seed ${job.body.seed})` : "encoding…");
}

// Up to four images share a row; one image alone gets the full RESULT_PX.
function resultBox(count) {
  const perRow = Math.min(count, 4);
  const width = $("results").clientWidth || RESULT_PX * perRow;
  return Math.min(RESULT_PX, Math.floor((width - 32 * perRow) / perRow));
}

function showPreview(job, p) {
  let fig = $("results").querySelector("figure.preview");
  if (!fig) {
    fig = el("figure", { className: "preview" }, el("img", { alt: "preview of the images forming" }),
             el("figcaption"));
    $("results").replaceChildren(fig);
    $("results").classList.remove("stale");
  }
  const img = fig.querySelector("img");
  img.src = `data:${p.media_type};base64,${p.data}`;
  // The preview is a grid of the request's images, ceil(sqrt(n)) per row: each cell gets about the
  // size its image will have as a result.
  const cols = Math.ceil(Math.sqrt(job.body.num_images));
  showAt(img, p.width, p.height, resultBox(job.body.num_images) * cols);
  fig.querySelector("figcaption").textContent = `preview: step ${p.step} of ${p.steps}`;
  document.body.dataset.previewSize = `${p.width}x${p.height}`;
  img.decode().then(() => { document.body.dataset.previewDecoded = `${img.naturalWidth}x${img.naturalHeight}`; },
                    () => {});  // a newer preview replaced this one before it was decoded
  job.previews += 1;
  bump("previews");
}

function showLastSeed(seed) {
  $("last-seed-value").textContent = seed;
  $("last-seed").hidden = false;
}

function reuseSeed(seed) {
  $("seed").value = seed;
  setStatus(`Seed ${seed} set: Generate makes the same image again (same settings).`);
}

function showResult(job, result) {
  const box = resultBox(result.images.length);
  const figures = result.images.map((im) => {
    const url = `data:${im.media_type};base64,${im.data}`;
    const img = el("img", { src: url, alt: `${result.class_name}, seed ${im.seed}`, title: "click to enlarge" });
    img.dataset.seed = im.seed;
    showAt(img, info.image_size, info.image_size, box);
    img.addEventListener("click", () => zoom(url, img.alt));
    const reuse = el("button", { type: "button", className: "link reuse", textContent: "reuse seed",
                                 title: "put this seed in the form" });
    reuse.addEventListener("click", () => reuseSeed(im.seed));
    const ext = im.media_type.split("/")[1].replace("jpeg", "jpg");
    const link = el("a", { href: url, textContent: "download",
                           download: `${result.class_name.replace(/\W+/g, "_")}-${im.seed}.${ext}` });
    return el("figure", {}, img, el("figcaption", {}, el("span", { className: "seed", textContent: `seed ${im.seed}` }),
                                    reuse, link));
  });
  $("results").replaceChildren(...figures);
  $("results").classList.remove("stale");
  const t = result.timings;
  const [lo, hi] = result.guidance_interval;
  const guided = lo === 0 && hi === 1 ? "" : ` guided in [${lo}, ${hi}]`;
  const cached = result.cache === "off" ? "" : `, cache ${typeof result.cache === "string" ? result.cache
                                                                                         : JSON.stringify(result.cache)}`;
  setStatus(`${result.class_name}: ${result.steps} ${result.sampler} steps, cfg ${result.cfg_scale}${guided}${cached}, ` +
            `${(t.total * 1000).toFixed(0)} ms (queue ${(t.queue * 1000).toFixed(0)} ms)`);
  document.body.dataset.previewsBeforeResult = job.previews;
  bump("done");
  remember(result).catch((e) => console.warn("history not saved:", e));
}

async function readEvents(reader, onEvent) {
  // Server-sent events over a POST response: "event: NAME\ndata: JSON\n\n" blocks.
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const name = (block.match(/^event: (.*)$/m) || [])[1];
      const data = (block.match(/^data: (.*)$/m) || [])[1];
      if (name && data) onEvent(name, JSON.parse(data));
    }
  }
}

function zoom(url, alt) {
  const img = $("zoom-image");
  img.src = url;
  img.alt = alt;
  const box = Math.min(window.innerWidth, window.innerHeight) * 0.85;
  showAt(img, info.image_size, info.image_size, box);
  $("zoom").showModal();
}

// ---- history (localStorage; thumbnails, not the full images, so that dozens fit) ----

function loadHistory() {
  try {
    const entries = JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]");
    return Array.isArray(entries) ? entries : [];
  } catch {
    return [];
  }
}

function saveHistory(entries) {
  for (;;) {
    try {
      localStorage.setItem(HISTORY_STORE, JSON.stringify(entries));
      return;
    } catch (e) {
      if (!entries.length) throw e;
      entries.pop();  // storage is full: the oldest entry goes
    }
  }
}

async function thumbnail(images) {
  const imgs = await Promise.all(images.slice(0, 4).map(async (im) => {
    const img = new Image();
    img.src = `data:${im.media_type};base64,${im.data}`;
    await img.decode();
    return img;
  }));
  const cols = imgs.length > 1 ? 2 : 1;
  const size = imgs[0].naturalWidth;
  const cell = Math.min(THUMB_PX, size);
  const canvas = el("canvas", { width: cols * cell, height: Math.ceil(imgs.length / cols) * cell });
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  imgs.forEach((img, k) => ctx.drawImage(img, (k % cols) * cell, Math.floor(k / cols) * cell, cell, cell));
  // Small images stay exact (PNG); shrunk photographs are smaller as JPEG.
  return cell < size ? canvas.toDataURL("image/jpeg", 0.85) : canvas.toDataURL("image/png");
}

async function remember(result) {
  const entry = { time: Date.now(), model: result.model, class_id: result.class_id, class_name: result.class_name,
                  cfg_scale: result.cfg_scale, steps: result.steps, sampler: result.sampler,
                  guidance_interval: result.guidance_interval, cache: result.cache,
                  seed: result.images[0].seed, num_images: result.images.length,
                  thumb: await thumbnail(result.images) };
  saveHistory([entry, ...loadHistory()].slice(0, HISTORY_MAX));
  renderHistory();
}

function useSettings(e) {
  $("class").value = e.class_name;
  $("cfg").value = e.cfg_scale;
  $("cfg-value").textContent = e.cfg_scale;
  $("steps").value = e.steps;
  $("sampler").value = e.sampler;
  if (e.guidance_interval) showGuidanceInterval(e.guidance_interval);
  if (typeof e.cache === "string" && [...$("cache").options].some((o) => o.value === e.cache)) $("cache").value = e.cache;
  $("num-images").value = e.num_images;
  $("seed").value = e.seed;
  setStatus(`Settings of ${e.class_name}, seed ${e.seed} loaded: Generate makes the same images again.`);
}

function renderHistory() {
  const entries = loadHistory();
  $("history-section").hidden = entries.length === 0;
  $("history").replaceChildren(...entries.map((e) => {
    const when = new Date(e.time).toLocaleString([], { dateStyle: "short", timeStyle: "short" });
    const thumb = el("img", { src: e.thumb, alt: `${e.class_name}, seed ${e.seed}` });
    const use = el("button", { type: "button", className: "thumb", title: "use these settings" }, thumb);
    use.addEventListener("click", () => useSettings(e));
    const again = el("button", { type: "button", className: "link", textContent: "use settings" });
    again.addEventListener("click", () => useSettings(e));
    const item = el("li", {}, use, el("div", {},
      el("strong", { textContent: e.class_name }), " ",
      el("span", { className: "seed", textContent: `seed ${e.seed}` }), e.num_images > 1 ? ` ×${e.num_images}` : "",
      el("br"), el("small", { textContent: `${e.steps} ${e.sampler} steps · cfg ${e.cfg_scale} · ${when}` }),
      el("br"), again));
    item.dataset.seed = e.seed;
    return item;
  }));
}

function clearHistory() {
  localStorage.removeItem(HISTORY_STORE);
  renderHistory();
  setStatus("History cleared.");
}

$("cfg").addEventListener("input", () => { $("cfg-value").textContent = $("cfg").value; });
$("form").addEventListener("submit", generate);
for (const id of ["class", "seed", "num-images", "interval-lo", "interval-hi"]) {
  for (const type of ["input", "change"]) $(id).addEventListener(type, clearFixedError);
}
$("cancel").addEventListener("click", cancel);
$("random-seed").addEventListener("click", () => { $("seed").value = ""; $("seed").focus(); });
$("reuse-last-seed").addEventListener("click", () => reuseSeed($("last-seed-value").textContent));
$("key-form").addEventListener("submit", useKey);
$("forget-key").addEventListener("click", forgetKey);
$("clear-history").addEventListener("click", clearHistory);
$("zoom").addEventListener("click", (ev) => { if (ev.target === $("zoom")) $("zoom").close(); });
renderHistory();
load();
