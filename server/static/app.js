// The playground: reads /info and /classes, posts /generate asking for server-sent progress events,
// shows "step k of n" while the image forms, then the images with their seeds and download links.
"use strict";
const $ = (id) => document.getElementById(id);
let classes = [];

function authHeaders() {
  const key = $("api-key").value.trim() || sessionStorage.getItem("dit-api-key") || "";
  if (key) sessionStorage.setItem("dit-api-key", key);
  return key ? { "X-API-Key": key } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function classId(text) {
  const t = text.trim().toLowerCase();
  if (/^\d+$/.test(t)) return Number(t);
  const exact = classes.find((c) => c.name.toLowerCase() === t || `${c.id}: ${c.name}`.toLowerCase() === t);
  if (exact) return exact.id;
  const partial = classes.filter((c) => c.name.toLowerCase().includes(t));
  return partial.length === 1 ? partial[0].id : null;
}

async function load() {
  try {
    const [info, cls] = await Promise.all([fetch("/info", { headers: authHeaders() }),
                                           fetch("/classes", { headers: authHeaders() })]);
    if (!info.ok) throw new Error((await info.json()).error.message);
    $("api-key").closest("label").hidden = !sessionStorage.getItem("dit-api-key");
    const i = await info.json();
    classes = (await cls.json()).classes;
    $("model-line").textContent = `${i.model}: ${i.image_size} px, ${i.num_classes} classes, ${i.device} ` +
      `${i.dtype}, ${i.policy} batching`;
    $("class-list").replaceChildren(...classes.map((c) => new Option(`${c.id}: ${c.name}`, c.name)));
    Object.assign($("cfg"), { min: i.limits.min_cfg_scale, max: Math.min(i.limits.max_cfg_scale, 10),
                              value: i.defaults.cfg_scale });
    $("cfg-value").textContent = i.defaults.cfg_scale;
    Object.assign($("steps"), { max: i.limits.max_steps, value: i.defaults.steps });
    $("sampler").replaceChildren(...i.samplers.map((s) => new Option(s, s, false, s === i.defaults.sampler)));
    $("num-images").max = i.limits.max_images;
    document.body.dataset.ready = "true";
  } catch (e) {
    setStatus(`The server is not ready or needs an API key: ${e.message}. Reload in a moment.`, true);
  }
}

function explain(status, body, retryAfter) {
  const err = (body && body.error) || {};
  if (status === 429) return `The server is busy (${err.message || "queue full"}); try again in ${retryAfter || "a few"} s.`;
  if (status === 401) return "This server needs an API key: enter it above, then reload the page.";
  if (status === 503) return `The server is not ready: ${err.message || ""}`;
  if (status === 422) return `Please check ${err.field || "the form"}: ${err.message}`;
  return `Generation failed (${status}): ${err.message || "unknown error"}`;
}

function showResult(result) {
  const figures = result.images.map((im) => {
    const url = `data:${im.media_type};base64,${im.data}`;
    const fig = document.createElement("figure");
    const img = new Image();
    img.src = url;
    img.alt = `${result.class_name}, seed ${im.seed}`;
    img.dataset.seed = im.seed;
    const cap = document.createElement("figcaption");
    const link = Object.assign(document.createElement("a"), { href: url, textContent: "download",
      download: `${result.class_name.replace(/\W+/g, "_")}-${im.seed}.png` });
    cap.append(`seed ${im.seed}`, link);
    fig.append(img, cap);
    return fig;
  });
  $("results").replaceChildren(...figures);
  const t = result.timings;
  setStatus(`${result.class_name}: ${result.steps} ${result.sampler} steps, cfg ${result.cfg_scale}, ` +
            `${(t.total * 1000).toFixed(0)} ms (queue ${(t.queue * 1000).toFixed(0)} ms)`);
  document.body.dataset.done = String(Number(document.body.dataset.done || 0) + 1);
}

async function generate(ev) {
  ev.preventDefault();
  const id = classId($("class").value);
  if (id === null) return setStatus("Pick a class from the list (type part of its name).", true);
  if ($("random-seed").checked) $("seed").value = Math.floor(Math.random() * 2 ** 31);
  const body = { class_id: id, cfg_scale: Number($("cfg").value), steps: Number($("steps").value),
                 sampler: $("sampler").value, seed: Number($("seed").value),
                 num_images: Number($("num-images").value) };
  $("generate").disabled = true;
  $("progress").hidden = false;
  $("progress").value = 0;
  setStatus("queued…");
  try {
    const r = await fetch("/generate", { method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", "Accept": "text/event-stream", ...authHeaders() } });
    if (!r.ok) {
      const err = await r.json().catch(() => null);
      return setStatus(explain(r.status, err, r.headers.get("Retry-After")), true);
    }
    await readEvents(r.body.getReader(), (name, data) => {
      if (name === "progress") {
        $("progress").value = data.step / data.steps;
        setStatus(`step ${data.step} of ${data.steps}`);
      } else if (name === "result") {
        showResult(data);
      } else if (name === "error") {
        setStatus(explain(data.error.code === "deadline_exceeded" ? 504 : 500, data), true);
      }
    });
  } catch (e) {
    setStatus(`The connection failed: ${e.message}`, true);
  } finally {
    $("generate").disabled = false;
    $("progress").hidden = true;
  }
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

$("cfg").addEventListener("input", () => { $("cfg-value").textContent = $("cfg").value; });
$("form").addEventListener("submit", generate);
load();
