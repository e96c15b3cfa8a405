// The appliance console: chat (streaming), agent threads, status. Vanilla JS, no build, no dependencies.
//
// Safety rule for this file: text from the model, the user or the server is only ever put into the page
// with textContent / createTextNode (see the markdown renderer below), never as HTML.

const KEY_STORAGE = "appliance.apiKey"; // sessionStorage only: gone when the tab closes
const STATUS_EVERY_MS = 2500;
const TPS_WINDOW_MS = 30000;
const PAINT_EVERY_MS = 50; // re-render a streaming answer at most this often

const $ = (id) => document.getElementById(id);

const state = {
  models: [], // [{id, aliases, kind}]
  history: [], // plain models: the whole conversation, sent with every request
  threadId: null, // the agent: the server keeps the history under this id
  controller: null, // AbortController of the running generation
  agentEnabled: true,
};

// -- small helpers -------------------------------------------------------------------------------

/** Create an element with a class and text (text always as a text node). */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function fmtBytes(n) {
  if (!Number.isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtAgo(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(seconds * 1000).toLocaleDateString();
}

/** A thread id the server accepts ([A-Za-z0-9._-]{1,128}); randomUUID needs a secure context. */
function newThreadId() {
  if (crypto.randomUUID) return `console-${crypto.randomUUID()}`;
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `console-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

const isAgent = (model) => model === "agent" || model.startsWith("agent:");

// -- API key -------------------------------------------------------------------------------------

const getKey = () => sessionStorage.getItem(KEY_STORAGE);

let keyWaiters = null; // callers waiting for the user to enter a key (one prompt for all of them)

/** Show the key form; resolves once the user has entered a key. */
function askForKey(message) {
  const err = $("key-error");
  err.textContent = message || "";
  err.hidden = !message;
  $("key-dialog").hidden = false;
  $("key-input").focus();
  if (!keyWaiters) keyWaiters = [];
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function onKeySubmit(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key-input").value = "";
  $("key-dialog").hidden = true;
  $("forget-key").hidden = false;
  const waiters = keyWaiters || [];
  keyWaiters = null;
  waiters.forEach((resolve) => resolve());
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  $("forget-key").hidden = true;
  loadModels(); // asks for a key again if the appliance needs one
}

// -- API calls -----------------------------------------------------------------------------------

class ApiError extends Error {}

/** The message of an OpenAI-shaped error response ({"error": {"message": ...}}), or the status. */
async function errorText(res) {
  try {
    const body = await res.json();
    const e = body && body.error;
    if (e) return typeof e === "string" ? e : e.message || JSON.stringify(e);
  } catch {
    // not JSON
  }
  return `HTTP ${res.status} ${res.statusText}`;
}

/**
 * fetch() with the API key. On a 401 it asks for a key and tries again, unless `prompt` is false
 * (background polls must not pop up a dialog); then the 401 response is returned.
 */
async function api(path, { prompt = true, headers = {}, ...init } = {}) {
  for (;;) {
    const h = new Headers(headers);
    const key = getKey();
    if (key) h.set("Authorization", `Bearer ${key}`);
    const res = await fetch(path, { ...init, headers: h, cache: "no-store" });
    if (res.status !== 401 || !prompt) return res;
    const message = key ? await errorText(res) : "";
    if (key) sessionStorage.removeItem(KEY_STORAGE);
    await askForKey(message);
  }
}

async function apiJson(path, options) {
  const res = await api(path, options);
  if (!res.ok) throw new ApiError(await errorText(res));
  return res.json();
}

/** Yield the `data:` payloads of a server-sent event stream. */
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (let line of lines) {
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
      }
    }
    if (data.length) yield data.join("\n");
  } finally {
    reader.cancel().catch(() => {});
  }
}

// -- safe markdown -------------------------------------------------------------------------------
//
// A small subset: fenced code, headings, lists, block quotes, paragraphs; inline code, bold, italic,
// links. It builds DOM nodes; every piece of text goes in through createTextNode.

const INLINE = new RegExp(
  [
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: `code`
    /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 3: **bold**
    /\*(?=[^\s*])([^*]*?[^\s*])\*/.source, // 4: *italic*
    /\[([^\]\n]+)\]\(([^()\s]+)\)/.source, // 5, 6: [text](url)
    /(https?:\/\/[^\s<>"'`]*[^\s<>"'`.,;:!?)\]])/.source, // 7: a bare URL
  ].join("|"),
  "g",
);

/** A URL usable as a link: absolute http(s) only (no javascript:, data:, relative paths). */
function safeUrl(raw) {
  try {
    const url = new URL(raw);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function link(href, text) {
  const a = el("a", null, text);
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  return a;
}

/** Append `text` with inline markup to `parent`. */
function renderInline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[1]) {
      parent.append(el("code", null, m[2]));
    } else if (m[3] !== undefined) {
      const b = el("strong");
      renderInline(b, m[3]);
      parent.append(b);
    } else if (m[4] !== undefined) {
      const i = el("em");
      renderInline(i, m[4]);
      parent.append(i);
    } else if (m[5] !== undefined) {
      const href = safeUrl(m[6]);
      parent.append(href ? link(href, m[5]) : document.createTextNode(m[0]));
    } else {
      const href = safeUrl(m[7]);
      parent.append(href ? link(href, m[7]) : document.createTextNode(m[0]));
    }
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;

/** Render markdown `text` into a new <div class="md">. An unclosed fence (mid-stream) is still code. */
function renderMarkdown(text) {
  const root = el("div", "md");
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let para = null;
  let list = null;
  const endBlocks = () => {
    para = null;
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      endBlocks();
      const fence = m[1];
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence); i++) body.push(lines[i]);
      const pre = el("pre");
      const code = el("code", null, body.join("\n"));
      if (m[2]) {
        pre.dataset.lang = m[2];
        code.className = `language-${m[2].replace(/[^\w-]/g, "")}`;
      }
      pre.append(code);
      root.append(pre);
    } else if (!line.trim()) {
      endBlocks();
    } else if ((m = HEADING.exec(line))) {
      endBlocks();
      const h = el(`h${m[1].length}`);
      renderInline(h, m[2]);
      root.append(h);
    } else if ((m = BULLET.exec(line)) || (m = NUMBERED.exec(line))) {
      const ordered = m.length === 3;
      const tag = ordered ? "ol" : "ul";
      if (!list || list.tagName.toLowerCase() !== tag) {
        para = null;
        list = el(tag);
        if (ordered && m[1] !== "1") list.start = Number(m[1]);
        root.append(list);
      }
      const li = el("li");
      renderInline(li, ordered ? m[2] : m[1]);
      list.append(li);
    } else if ((m = QUOTE.exec(line))) {
      endBlocks();
      const q = el("blockquote");
      renderInline(q, m[1]);
      root.append(q);
    } else if (list && /^\s+\S/.test(line)) {
      // a continuation line of the last list item
      const li = list.lastElementChild;
      li.append(el("br"));
      renderInline(li, line.trim());
    } else {
      list = null;
      if (para) {
        para.append(el("br"));
      } else {
        para = el("p");
        root.append(para);
      }
      renderInline(para, line);
    }
  }
  return root;
}

// -- chat ----------------------------------------------------------------------------------------

function clearEmptyNote() {
  const note = $("empty-note");
  if (note) note.remove();
}

function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

/** Add a message bubble; returns its element. `role`: user, assistant, tool or error. */
function addMessage(role, text = "") {
  clearEmptyNote();
  const msg = el("div", `msg ${role}`);
  msg.append(el("div", "role", role === "error" ? "error" : role));
  const body = el("div", "body");
  msg.append(body);
  setMessageText(msg, text);
  $("messages").append(msg);
  scrollToEnd();
  return msg;
}

/** Set a bubble's text: assistant text as markdown, anything else as plain text. */
function setMessageText(msg, text) {
  const body = msg.querySelector(".body");
  if (msg.classList.contains("assistant")) body.replaceChildren(renderMarkdown(text));
  else body.textContent = text;
}

function setBusy(controller) {
  state.controller = controller;
  const busy = controller !== null;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("model").disabled = busy;
  document.body.dataset.busy = busy ? "1" : "";
}

function updateThreadLabel() {
  $("thread-label").textContent = state.threadId ? `thread ${state.threadId}` : "";
  for (const b of document.querySelectorAll("#thread-list button")) {
    b.classList.toggle("active", b.dataset.threadId === state.threadId);
  }
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.threadId = null;
  $("messages").replaceChildren();
  updateThreadLabel();
  $("input").focus();
}

function requestBody(model, messages) {
  const body = { model, messages, stream: true };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = parseFloat($("temperature").value);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  return body;
}

/** Send the composer's text and stream the answer into a new assistant bubble. */
async function send() {
  const input = $("input");
  const text = input.value.trim();
  const model = $("model").value;
  if (!text || !model || state.controller) return;
  input.value = "";
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");

  const agent = isAgent(model);
  const headers = { "Content-Type": "application/json" };
  let messages;
  if (agent) {
    state.threadId = state.threadId || newThreadId();
    headers["X-Thread-Id"] = state.threadId;
    messages = [{ role: "user", content: text }]; // the server has the rest of the thread
    updateThreadLabel();
  } else {
    state.history.push({ role: "user", content: text });
    messages = state.history.slice();
  }

  const controller = new AbortController();
  setBusy(controller);
  let answer = "";
  let pending = false; // a repaint is scheduled
  const paint = () => {
    pending = false;
    setMessageText(bubble, answer);
    scrollToEnd();
  };
  try {
    const res = await api("/v1/chat/completions", {
      method: "POST",
      headers,
      body: JSON.stringify(requestBody(model, messages)),
      signal: controller.signal,
    });
    if (!res.ok) throw new ApiError(await errorText(res));
    const tid = res.headers.get("X-Thread-Id");
    if (agent && tid) state.threadId = tid;
    for await (const data of sseData(res.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message || JSON.stringify(chunk.error));
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        answer += delta.content;
        if (!pending) {
          pending = true;
          setTimeout(paint, PAINT_EVERY_MS); // not requestAnimationFrame: it stops in hidden tabs
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      bubble.append(el("div", "stopped", "stopped"));
    } else {
      addMessage("error", e instanceof ApiError ? e.message : `${e.name}: ${e.message}`);
    }
  } finally {
    paint();
    bubble.classList.remove("streaming");
    if (!agent) {
      if (answer) state.history.push({ role: "assistant", content: answer });
      else state.history.pop(); // nothing came back: leave the unanswered message out of the history
    }
    if (!answer) bubble.dataset.empty = "1";
    bubble.dataset.done = "1";
    setBusy(null);
    updateThreadLabel();
    if (agent) loadThreads();
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function onInputKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
}

// -- models --------------------------------------------------------------------------------------

/** Fill the model picker from /v1/models (kinds from /health?verbose=1: embedding models are left out). */
async function loadModels() {
  const select = $("model");
  let list;
  try {
    list = await apiJson("/v1/models");
  } catch (e) {
    select.replaceChildren(el("option", null, `(models unavailable: ${e.message})`));
    return;
  }
  let kinds = {};
  let defaultModel = null;
  try {
    const health = await (await api("/health?verbose=1", { prompt: false })).json();
    defaultModel = health.default_model || null;
    for (const m of health.models || []) kinds[m.id] = m.kind;
  } catch {
    kinds = {};
  }
  const previous = select.value;
  state.models = list.data.map((m) => ({ id: m.id, aliases: m.aliases || [], kind: kinds[m.id] || null }));
  select.replaceChildren();
  for (const m of state.models) {
    if (m.kind === "embedding") continue;
    const label = m.aliases.length ? `${m.id} (${m.aliases.join(", ")})` : m.id;
    const option = el("option", null, label);
    option.value = m.id;
    select.append(option);
  }
  // keep the current choice; else the default model; else the first one
  const offered = [...select.options].map((o) => o.value);
  select.value = [previous, defaultModel, offered[0]].find((id) => id && offered.includes(id)) || "";
  select.dataset.previous = select.value;
  document.body.dataset.modelsLoaded = "1";
  loadThreads();
}

/** Switching between the agent and a plain model starts a new conversation (their histories differ). */
function onModelChange() {
  const select = $("model");
  const before = select.dataset.previous || "";
  if (before && isAgent(before) !== isAgent(select.value)) newConversation();
  select.dataset.previous = select.value;
}

// -- agent threads -------------------------------------------------------------------------------

async function loadThreads() {
  if (!state.agentEnabled) return;
  const list = $("thread-list");
  const note = $("threads-note");
  let doc;
  try {
    const res = await api("/v1/threads?limit=50");
    if (res.status === 404) {
      state.agentEnabled = false; // APPLIANCE_AGENT_ENABLED=false
      $("threads-panel").hidden = true;
      return;
    }
    if (!res.ok) throw new ApiError(await errorText(res));
    doc = await res.json();
  } catch (e) {
    note.textContent = `Threads unavailable: ${e.message}`;
    note.hidden = false;
    return;
  }
  note.hidden = doc.data.length > 0;
  note.textContent = "No threads yet: choose the agent model and send a message.";
  list.replaceChildren();
  for (const t of doc.data) {
    const button = el("button");
    button.type = "button";
    button.dataset.threadId = t.id;
    button.append(el("span", "title", t.title || t.id));
    button.append(el("span", "meta", `${t.model} · ${fmtAgo(t.updated_at)}`));
    button.title = t.id;
    button.addEventListener("click", () => openThread(t.id));
    const li = el("li");
    li.append(button);
    list.append(li);
  }
  updateThreadLabel();
}

/** A compact one-line form of a tool call or result. */
function toolText(m) {
  if (m.role === "tool") {
    const content = m.content || "";
    return `← ${m.name || "tool"}: ${content.length > 300 ? `${content.slice(0, 300)}…` : content}`;
  }
  return (m.tool_calls || []).map((c) => `→ ${c.function.name}(${c.function.arguments})`).join("\n");
}

/** Show a thread's messages from the server and continue it. */
async function openThread(id) {
  if (state.controller) return;
  let doc;
  try {
    doc = await apiJson(`/v1/threads/${encodeURIComponent(id)}`);
  } catch (e) {
    addMessage("error", e.message);
    return;
  }
  newConversation();
  state.threadId = doc.id;
  const select = $("model");
  const model = doc.model && [...select.options].some((o) => o.value === doc.model) ? doc.model : "agent";
  if ([...select.options].some((o) => o.value === model)) select.value = model;
  select.dataset.previous = select.value;
  for (const m of doc.messages) {
    if (m.role === "user") addMessage("user", m.content || "");
    else if (m.role === "tool" || (m.role === "assistant" && m.tool_calls)) {
      if (m.content) addMessage("assistant", m.content);
      addMessage("tool", toolText(m));
    } else if (m.role === "assistant") addMessage("assistant", m.content || "");
  }
  updateThreadLabel();
}

// -- status --------------------------------------------------------------------------------------

/** Parse Prometheus text exposition into [{name, labels, value}]. */
function parseMetrics(text) {
  const out = [];
  const LINE = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/;
  const LABEL = /([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"/g;
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = LINE.exec(line);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(LABEL)) {
      labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c)); // unescape \\ \" \n
    }
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

/** Sum of the samples named `name` whose labels match `where`; null when there are none. */
function sum(samples, name, where = {}) {
  let total = null;
  for (const s of samples) {
    if (s.name !== name) continue;
    if (Object.entries(where).some(([k, v]) => s.labels[k] !== v)) continue;
    total = (total || 0) + s.value;
  }
  return total;
}

const rates = { tokens: [], ttft: null, decode: null, last: null };

/** Rates from two scrapes: completion tokens/s (sliding window), TTFT and decode speed of recent requests. */
function updateRates(samples) {
  const now = Date.now();
  const cur = {
    t: now,
    tokens: sum(samples, "appliance_tokens_total", { kind: "completion" }) || 0,
    ttftSum: sum(samples, "appliance_ttft_seconds_sum") || 0,
    ttftCount: sum(samples, "appliance_ttft_seconds_count") || 0,
    decSum: sum(samples, "appliance_decode_tokens_per_second_sum") || 0,
    decCount: sum(samples, "appliance_decode_tokens_per_second_count") || 0,
  };
  const prev = rates.last;
  if (!prev) {
    // first scrape: the averages since start, until something new happens
    if (cur.ttftCount) rates.ttft = cur.ttftSum / cur.ttftCount;
    if (cur.decCount) rates.decode = cur.decSum / cur.decCount;
  } else {
    if (cur.ttftCount > prev.ttftCount) rates.ttft = (cur.ttftSum - prev.ttftSum) / (cur.ttftCount - prev.ttftCount);
    if (cur.decCount > prev.decCount) rates.decode = (cur.decSum - prev.decSum) / (cur.decCount - prev.decCount);
  }
  rates.last = cur;
  rates.tokens.push({ t: now, v: cur.tokens });
  while (rates.tokens.length > 2 && now - rates.tokens[0].t > TPS_WINDOW_MS) rates.tokens.shift();
  const first = rates.tokens[0];
  const tps = rates.tokens.length > 1 && now > first.t ? (cur.tokens - first.v) / ((now - first.t) / 1000) : null;
  return { tps, ttft: rates.ttft, decode: rates.decode };
}

function showMetrics(samples) {
  const { tps, ttft, decode } = updateRates(samples);
  $("st-tps").textContent = tps === null ? "–" : tps.toFixed(1);
  $("st-decode").textContent = decode === null ? "–" : `${decode.toFixed(1)} tok/s`;
  $("st-ttft").textContent = ttft === null ? "–" : `${Math.round(ttft * 1000)} ms`;
  const inflight = sum(samples, "appliance_inflight_streams");
  const queued = sum(samples, "appliance_queue_depth");
  $("st-inflight").textContent = inflight === null ? "–" : `${inflight}${queued ? ` (+${queued} queued)` : ""}`;
  $("st-rss").textContent = fmtBytes(sum(samples, "appliance_process_resident_memory_bytes") ?? NaN);
  const cpu = sum(samples, "appliance_host_cpu_percent");
  $("st-cpu").textContent = cpu === null ? "–" : `${cpu.toFixed(0)} %`;
  const memUsed = sum(samples, "appliance_host_memory_used_bytes");
  const memTotal = sum(samples, "appliance_host_memory_total_bytes");
  $("st-mem").textContent = memTotal ? `${fmtBytes(memUsed)} / ${fmtBytes(memTotal)}` : "–";
  const diskFree = sum(samples, "appliance_data_disk_free_bytes");
  const diskTotal = sum(samples, "appliance_data_disk_total_bytes");
  $("st-disk").textContent = diskTotal ? `${fmtBytes(diskFree)} free of ${fmtBytes(diskTotal)}` : "–";
  const gpuTotal = sum(samples, "appliance_gpu_memory_total_bytes");
  const gpuUsed = sum(samples, "appliance_gpu_memory_used_bytes");
  const gpuUtil = sum(samples, "appliance_gpu_utilization_percent");
  $("st-gpu").hidden = $("st-gpu-label").hidden = !gpuTotal;
  if (gpuTotal) {
    const util = gpuUtil === null ? "" : `, ${gpuUtil.toFixed(0)} %`;
    $("st-gpu").textContent = `${fmtBytes(gpuUsed)} / ${fmtBytes(gpuTotal)}${util}`;
  }
}

function showHealth(doc, ok) {
  const status = doc ? doc.status : "down";
  const badge = $("health-badge");
  badge.textContent = status;
  badge.className = `badge ${status}`;
  $("st-health").textContent = ok ? status : `${status}${doc ? "" : " (no answer)"}`;
  if (!doc || !doc.models) return;
  const list = $("st-models");
  list.replaceChildren();
  for (const m of doc.models) {
    const li = el("li");
    li.dataset.model = m.id;
    const head = el("div");
    head.append(el("span", "id", m.id));
    if (m.kind && m.kind !== "chat") head.append(el("span", "kind", ` · ${m.kind}`));
    li.append(head);
    if (m.aliases && m.aliases.length) li.append(el("div", "aliases", m.aliases.join(", ")));
    for (const b of m.backends || []) {
      const row = el("div", "backend");
      row.append(el("span", null, b.name || b.type || "backend"));
      const states = el("span");
      states.append(el("span", `state ${b.state}`, b.state));
      const circuit = b.circuit && b.circuit.state;
      if (circuit && circuit !== "closed") states.append(el("span", `state ${circuit}`, ` · circuit ${circuit}`));
      row.append(states);
      if (b.error) row.title = String(b.error);
      li.append(row);
    }
    list.append(li);
  }
}

async function refreshStatus() {
  try {
    const res = await api("/health?verbose=1", { prompt: false });
    showHealth(await res.json(), res.ok);
  } catch {
    showHealth(null, false);
  }
  const note = $("st-metrics-note");
  try {
    const res = await api("/metrics", { prompt: false });
    if (res.status === 401 || res.status === 403) {
      // 401: auth is on and /metrics is not public; 403: e.g. nginx serves /metrics to loopback only
      note.textContent =
        res.status === 401
          ? "Metrics need a key: enter an API key to see throughput and resources."
          : "Metrics need a key or are closed to this address (403).";
      note.hidden = false;
    } else if (!res.ok) {
      note.textContent = `Metrics unavailable: ${await errorText(res)}`;
      note.hidden = false;
    } else {
      showMetrics(parseMetrics(await res.text()));
      note.hidden = true;
    }
  } catch (e) {
    note.textContent = `Metrics unavailable: ${e.message}`;
    note.hidden = false;
  }
  try {
    const today = new Date().toISOString().slice(0, 10);
    const res = await api(`/v1/usage?key=me&since=${today}`, { prompt: false });
    if (res.ok) {
      const t = (await res.json()).totals;
      $("st-usage").textContent = `${t.requests} requests · ${t.total_tokens} tokens`;
    }
  } catch {
    // usage is optional in the panel: leave the last figure
  }
  $("st-updated").textContent = new Date().toLocaleTimeString();
  document.body.dataset.statusLoaded = "1";
}

let statusTimer = null;

/** Poll the status every few seconds while the tab is visible. */
function scheduleStatus() {
  clearTimeout(statusTimer);
  if (document.hidden) return;
  refreshStatus().finally(() => {
    clearTimeout(statusTimer);
    if (!document.hidden) statusTimer = setTimeout(scheduleStatus, STATUS_EVERY_MS);
  });
}

// -- start ---------------------------------------------------------------------------------------

function start() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", onInputKey);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newConversation);
  $("model").addEventListener("change", onModelChange);
  $("refresh-threads").addEventListener("click", loadThreads);
  $("key-form").addEventListener("submit", onKeySubmit);
  $("forget-key").addEventListener("click", forgetKey);
  $("forget-key").hidden = !getKey();
  document.addEventListener("visibilitychange", scheduleStatus);
  setBusy(null);
  loadModels();
  scheduleStatus();
}

start();

// For tests and the curious: the pure parts.
export { parseMetrics, renderMarkdown, safeUrl };
