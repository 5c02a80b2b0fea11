// qkv explorer: plain JavaScript, no library. Every number shown comes from POST /v1/explain
// (or, in an exported file, from the data embedded in the page); nothing here recomputes a stage.
"use strict";

const settings = JSON.parse(document.getElementById("qkv-settings").textContent);
const embedded = JSON.parse(document.getElementById("qkv-data").textContent);
const $ = (id) => document.getElementById(id);
// selected: the token (a row of d.tokens); sourceSelected: an encoder-decoder's source row.
const state = { data: null, layer: 0, head: 0, kind: "attention", stack: "decoder", selected: 0, sourceSelected: 0, tokenIds: null, draws: 0 };
// The API key, where the server asks for one: the page is opened as /?key=KEY (or /#key=KEY).
const apiKey = new URLSearchParams(location.search).get("key") ?? new URLSearchParams(location.hash.slice(1)).get("key");

// ---- colour scales (each drawn with a legend that states its numbers) ----
function mix(a, b, t) {
  return a.map((v, i) => Math.round(v + (b[i] - v) * t));
}
const WHITE = [255, 255, 255], BLUE = [33, 102, 172], RED = [178, 24, 43], DEEP = [8, 48, 107];
function sequential(t) {  // 0 -> white, 1 -> deep blue
  const c = mix(WHITE, DEEP, Math.min(1, Math.max(0, t)));
  return `rgb(${c})`;
}
function diverging(v, m) {  // -m -> blue, 0 -> white, +m -> red
  const t = m > 0 ? Math.max(-1, Math.min(1, v / m)) : 0;
  const c = t < 0 ? mix(WHITE, BLUE, -t) : mix(WHITE, RED, t);
  return `rgb(${c})`;
}
function fmt(v) {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toFixed(3);
}
function legend(kind, low, high) {
  const box = document.createElement("span");
  box.className = "legend";
  const canvas = document.createElement("canvas");
  canvas.width = 120; canvas.height = 10;
  const g = canvas.getContext("2d");
  for (let x = 0; x < 120; x++) {
    const t = x / 119;
    g.fillStyle = kind === "sequential" ? sequential(t) : diverging(low + t * (high - low), Math.max(-low, high));
    g.fillRect(x, 0, 1, 10);
  }
  const lo = document.createElement("span"), hi = document.createElement("span");
  lo.textContent = fmt(low); hi.textContent = fmt(high);
  lo.className = hi.className = "legend-value";
  box.append(lo, canvas, hi);
  return box;
}

// ---- the data ----
function inStack(s) {  // an encoder-decoder's layered stages: those of the chosen stack
  return s.layer === undefined || s.stack === undefined || s.stack === state.stack;
}
function stage(name, layer = null, sublayer = null) {
  return state.data.stages.find((s) => s.name === name && (layer === null || s.layer === layer)
    && (sublayer === null || s.sublayer === sublayer) && inStack(s));
}
function rowsOf(s) {  // the tokens a stage's rows are: the source's in the encoder
  return s.rows || state.data.tokens;
}
function rowIndex(s) {  // the selected token's row in this stage (the source's own selection)
  return Math.min(s.rows ? state.sourceSelected : state.selected, rowsOf(s).length - 1);
}
function causal(s) {  // scores are recorded before the mask: a decoder's self-attention hides j > i
  const arch = state.data.config.arch;
  return s.sublayer !== "cross_attention" && (arch === "decoder" || (arch === "encoder-decoder" && s.stack === "decoder"));
}
function label(token) {
  const shown = JSON.stringify(token).slice(1, -1).replaceAll(" ", "·");
  return shown || "∅";
}
function absMax(rows) {
  let m = 0;
  for (const row of rows) for (const v of row) m = Math.max(m, Math.abs(v));
  return m;
}
function range(rows) {
  let lo = Infinity, hi = -Infinity;
  for (const row of rows) for (const v of row) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  return [lo, hi];
}

// ---- requests ----
async function post(path, body) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const reply = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  if (!reply.ok) {
    let message = `${reply.status} ${reply.statusText}`;
    try { message = (await reply.json()).error.message; } catch (_) { /* not JSON */ }
    if (reply.status === 401) message += " (open the page as /#key=YOUR_KEY)";
    throw new Error(message);
  }
  return reply;
}
function samplingFields() {
  return {
    temperature: Number($("temperature").value),
    top_k: Number($("top-k").value),
    top_p: Number($("top-p").value),
  };
}
async function explain(extra = {}) {
  const body = { model: settings.model, layers: [state.layer], top: 10, ...samplingFields(), ...extra };
  if (!body.token_ids) {
    if (state.tokenIds) body.token_ids = state.tokenIds; else body.text = $("text-input").value;
  }
  $("status").textContent = "explaining…";
  const started = performance.now();
  try {
    const data = await (await post("/v1/explain", body)).json();
    state.data = data;
    state.selected = Math.min(state.selected, data.tokens.length - 1);
    if (data.source) state.sourceSelected = Math.min(state.sourceSelected, data.source.length - 1);
    render();
    $("status").textContent = `${data.tokens.length} tokens, explained in ${Math.round(performance.now() - started)} ms`;
    return data;
  } catch (err) {
    $("status").innerHTML = "";
    const line = document.createElement("span");
    line.className = "error"; line.textContent = err.message;
    $("status").append(line);
    return null;
  }
}

// ---- panels ----
function render() {
  const d = state.data, c = d.config;
  $("model-name").textContent = settings.model || "embedded data";
  $("model-description").textContent = d.description;
  $("model-weights").textContent = d.untrained ? "weights: freshly initialised, untrained (the notes' worked example)" : "weights: as loaded";
  renderTokens();
  renderEmbeddings();
  // a server answers for any layer; an exported file holds the layers and heads it was made with
  const layers = settings.api ? [...Array(c.n_layers).keys()] : d.layers;
  if (!layers.includes(state.layer)) state.layer = layers[0];
  if (!d.heads.includes(state.head)) state.head = d.heads[0];
  fillSelect($("layer-select"), layers, state.layer, "layer");
  fillSelect($("head-select"), d.heads, state.head, "head");
  const stacks = [...new Set(d.stages.filter((s) => s.stack && s.layer !== undefined).map((s) => s.stack))];
  $("stack-label").hidden = stacks.length < 2;
  if (stacks.length && !stacks.includes(state.stack)) state.stack = stacks[stacks.length - 1];
  $("stack-select").innerHTML = "";
  for (const k of stacks) $("stack-select").append(new Option(k, k, false, k === state.stack));
  const kinds = [...new Set(d.stages.filter((s) => s.name === "attention_weights" && inStack(s)).map((s) => s.sublayer || "attention"))];
  $("kind-label").hidden = kinds.length < 2;
  if (!kinds.includes(state.kind)) state.kind = kinds[0] || "attention";
  const kindSelect = $("kind-select");
  kindSelect.innerHTML = "";
  for (const k of kinds) kindSelect.append(new Option(k.replaceAll("_", " "), k, false, k === state.kind));
  renderAttention();
  renderFeedForward();
  renderLens();
  renderNext();
}
function fillSelect(select, choices, value, name) {
  select.innerHTML = "";
  for (const i of choices) select.append(new Option(`${name} ${i}`, String(i), false, i === value));
}
function chips(box, tokens, ids, selected, source) {
  // One button per token (its text and id); the chosen one pressed.
  box.innerHTML = "";
  tokens.forEach((token, i) => {
    const chip = document.createElement("button");
    chip.type = "button"; chip.className = "token";
    chip.setAttribute("aria-pressed", String(i === selected));
    chip.dataset.index = String(i);
    chip.append(label(token));
    const id = document.createElement("small");
    id.textContent = String(ids[i]);
    chip.append(id);
    chip.title = `token ${i}: ${JSON.stringify(token)}, id ${ids[i]}`;
    chip.addEventListener("click", () => select(i, source));
    box.append(chip);
  });
}
function renderTokens() {
  const d = state.data;
  $("tokens-formula").textContent = stage("token_ids") ? stage("token_ids").formula : "";
  chips($("tokens"), d.tokens, d.token_ids, state.selected, false);
  $("source-block").hidden = !d.source;
  if (d.source) {
    const ids = d.stages.find((s) => s.name === "token_ids" && s.stack === "encoder").values.map((r) => r[0]);
    chips($("source-tokens"), d.source, ids, state.sourceSelected, true);
  }
}
function select(i, source = false) {
  if (source) state.sourceSelected = i; else state.selected = i;
  renderTokens();
  renderAttention();
  renderFeedForward();
  renderLens();
  const chip = $(source ? "source-tokens" : "tokens").children[i];
  if (chip) chip.focus();
}
for (const [box, source] of [["tokens", false], ["source-tokens", true]]) {
  $(box).addEventListener("keydown", (event) => {  // arrow keys move the choice
    const n = $(box).children.length, at = source ? state.sourceSelected : state.selected;
    const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
    if (!step) return;
    select(Math.max(0, Math.min(n - 1, at + step)), source);
    event.preventDefault();
  });
}

function strip(container, title, formula, rows, columns, rowLabels) {
  // A heat strip: one row per token, one column per value, hover for the number.
  const block = document.createElement("div");
  block.className = "strip-block";
  const h = document.createElement("h3");
  h.textContent = `${title}  (${rows.length} × ${columns.length})`;
  const f = document.createElement("p");
  f.className = "formula"; f.textContent = formula;
  const m = absMax(rows);
  const canvas = document.createElement("canvas");
  const cell = Math.max(1, Math.min(14, Math.floor(900 / columns.length)));
  const height = 12;
  canvas.width = cell * columns.length; canvas.height = height * rows.length;
  const g = canvas.getContext("2d");
  rows.forEach((row, r) => row.forEach((v, k) => {
    g.fillStyle = diverging(v, m);
    g.fillRect(k * cell, r * height, cell, height);
  }));
  const readout = document.createElement("div");
  readout.className = "readout";
  readout.textContent = "hover for numbers";
  canvas.addEventListener("mousemove", (event) => {
    const box = canvas.getBoundingClientRect();
    const k = Math.floor((event.clientX - box.left) * canvas.width / box.width / cell);
    const r = Math.floor((event.clientY - box.top) * canvas.height / box.height / height);
    if (rows[r] && k < columns.length) readout.textContent = `${label(rowLabels[r])}, ${columns[k]} = ${fmt(rows[r][k])}`;
  });
  block.append(h, f, legend("diverging", -m, m), canvas, readout);
  container.append(block);
}
function renderEmbeddings() {
  const box = $("embedding-strips");
  box.innerHTML = "";
  const tokens = state.data.tokens;
  const names = ["embeddings", "positional_encoding", "local_positional_encoding", "token_type_embeddings", "embeddings_plus_positions", "embedding_norm"];
  for (const s of state.data.stages.filter((x) => names.includes(x.name))) {
    const title = (s.stack ? `${s.stack}: ` : "") + s.name.replaceAll("_", " ");
    strip(box, title, s.formula, s.values, s.columns, s.rows || tokens);
  }
}

function heatmap(container, s, h, scale) {
  // One head's (tokens x tokens) matrix as a table: a cell per (query, key), its value in data-value.
  container.innerHTML = "";
  const rows = s.values[s.head_ids.indexOf(h)], tokens = rowsOf(s);
  const table = document.createElement("table");
  table.className = "heatmap"; table.dataset.stage = s.name; table.dataset.head = String(h);
  const head = table.createTHead().insertRow();
  head.append(document.createElement("th"));
  for (const t of s.columns) { const th = document.createElement("th"); th.textContent = label(t); head.append(th); }
  const body = table.createTBody();
  const hidden = (i, j) => causal(s) && j > i;  // a future key the mask removes
  const shown = rows.map((r, i) => r.filter((_, j) => !hidden(i, j)));
  const [lo, hi] = scale === "sequential" ? [0, 1] : range(shown);
  const m = Math.max(Math.abs(lo), Math.abs(hi));
  rows.forEach((row, i) => {
    const tr = body.insertRow();
    if (i === rowIndex(s)) tr.className = "selected";
    const th = document.createElement("th");
    th.textContent = label(tokens[i]);
    tr.append(th);
    row.forEach((v, j) => {
      const td = tr.insertCell();
      td.dataset.value = String(v);
      td.title = `${label(tokens[i])} → ${label(s.columns[j])}: ${fmt(v)}`;
      if (hidden(i, j)) { td.className = "masked"; td.title += " (masked: a later token)"; }
      else td.style.background = scale === "sequential" ? sequential(v) : diverging(v, m);
    });
    tr.addEventListener("click", () => select(i, Boolean(s.rows)));
  });
  container.append(scale === "sequential" ? legend("sequential", 0, 1) : legend("diverging", -m, m));
  if (causal(s)) {
    const note = document.createElement("span");
    note.className = "note masked-note";
    note.textContent = "hatched: a later key, removed by the causal mask (its score is shown on hover; its weight is 0)";
    container.append(note);
  }
  container.append(table);
}
function headBlock(s, h) {
  // A per-head stage's columns for head h (keys and values: the key/value head h reads).
  const c = state.data.config;
  const own = Math.floor(h * s.heads_total / c.n_heads);  // key/value heads serve a group
  const k = s.head_ids.indexOf(own);
  const width = s.shape[1] / s.head_ids.length;
  return { rows: s.values.map((r) => r.slice(k * width, (k + 1) * width)), columns: s.columns.slice(k * width, (k + 1) * width), head: own };
}
function renderAttention() {
  const d = state.data, layer = state.layer, h = state.head, kind = state.kind;
  const scores = stage("scores", layer, kind), weights = stage("attention_weights", layer, kind);
  if (!weights) { $("weights-map").textContent = "no attention recorded for this layer"; return; }
  $("scores-formula").textContent = scores.formula;
  $("weights-formula").textContent = weights.formula;
  heatmap($("scores-map"), scores, h, "diverging");
  heatmap($("weights-map"), weights, h, "sequential");
  const at = rowIndex(weights);
  const row = weights.values[weights.head_ids.indexOf(h)][at] || [];
  $("attends-title").textContent = `what ${label(rowsOf(weights)[at])} (query) attends to, layer ${layer}, head ${h}`;
  const bars = $("attends");
  bars.innerHTML = "";
  row.map((w, j) => [w, j]).filter(([w]) => w > 0).sort((a, b) => b[0] - a[0]).forEach(([w, j]) => {
    bar(bars, label(weights.columns[j]), w, 1);
  });
  const many = $("multiples");
  many.innerHTML = "";
  weights.head_ids.forEach((head, k) => {
    const button = document.createElement("button");
    button.type = "button";
    button.setAttribute("aria-pressed", String(head === h));
    button.setAttribute("aria-label", `head ${head}`);
    const canvas = document.createElement("canvas");
    const n = weights.values[k].length, side = Math.max(2, Math.floor(96 / Math.max(n, weights.columns.length)));
    canvas.width = side * weights.columns.length; canvas.height = side * n;
    const g = canvas.getContext("2d");
    weights.values[k].forEach((r, i) => r.forEach((w, j) => {
      g.fillStyle = sequential(w);
      g.fillRect(j * side, i * side, side, side);
    }));
    button.append(canvas, `head ${head}`);
    button.addEventListener("click", () => { state.head = head; $("head-select").value = String(head); renderAttention(); });
    many.append(button);
  });
  many.append(legend("sequential", 0, 1));
  const strips = $("qkv-strips");
  strips.innerHTML = "";
  for (const name of ["query", "key", "value"]) {
    const s = d.stages.find((x) => x.name === name && x.layer === layer && (x.sublayer || "attention") === kind && inStack(x));
    if (!s) continue;
    const part = headBlock(s, h), at = rowIndex(s), rows = rowsOf(s);
    const which = name === "query" ? `head ${h}` : `key/value head ${part.head}`;
    if (s.rows && kind === "cross_attention") {  // the keys and values of every source token
      strip(strips, `${name}, ${which}, every source token`, s.formula, part.rows, part.columns, rows);
    } else {
      strip(strips, `${name}, ${which}, token ${label(rows[at])}`, s.formula, [part.rows[at]], part.columns, [rows[at]]);
    }
  }
}
function bar(container, name, value, max, text = fmt(value)) {
  const a = document.createElement("span"), b = document.createElement("div"), c = document.createElement("span");
  a.className = "mono"; a.textContent = name;
  b.className = "bar"; b.style.width = `${Math.max(0, Math.min(100, 100 * value / (max || 1)))}%`;
  c.className = "mono"; c.textContent = text;
  container.append(a, b, c);
}
function renderFeedForward() {
  const d = state.data, layer = state.layer;
  const hidden = stage("feed_forward_hidden", layer);
  const units = $("hidden-units");
  units.innerHTML = "";
  if (hidden) {
    $("hidden-formula").textContent = hidden.formula;
    const row = hidden.values[rowIndex(hidden)];
    const top = row.map((v, k) => [v, k]).sort((a, b) => b[0] - a[0]).slice(0, 12);
    const max = Math.max(...top.map(([v]) => Math.abs(v)));
    for (const [v, k] of top) bar(units, hidden.columns[k], Math.abs(v), max, fmt(v));
  }
  const residual = d.residual_stream;
  $("residual-formula").textContent = residual.formula;
  const table = document.createElement("table");
  table.className = "heatmap residual";
  const head = table.createTHead().insertRow();
  for (const t of ["after", "‖x‖", "mean", "std"]) { const th = document.createElement("th"); th.textContent = t; head.append(th); }
  const body = table.createTBody();
  const max = Math.max(...residual.rows.map((r) => r.norm[state.selected]));
  for (const r of residual.rows) {
    const tr = body.insertRow();
    const th = document.createElement("th");
    th.textContent = r.label; tr.append(th);
    for (const [key, scale] of [["norm", max], ["mean", 0], ["std", 0]]) {
      const td = tr.insertCell();
      const v = r[key][state.selected];
      td.dataset.value = String(v); td.textContent = fmt(v);
      if (scale) td.style.background = sequential(v / scale);
    }
  }
  const box = $("residual-table");
  box.innerHTML = "";
  const caption = document.createElement("p");
  caption.className = "note";
  caption.textContent = `token ${label(d.tokens[state.selected])}; shading: ‖x‖ over its largest, ${fmt(max)}`;
  box.append(caption, legend("sequential", 0, max), table);
  const norms = $("norm-strips");
  norms.innerHTML = "";
  for (const s of d.stages.filter((x) => x.name === "layer_norm" && x.layer === layer && inStack(x))) {
    const where = d.config.norm_first ? "before" : "after";
    strip(norms, `norm ${where} the ${(s.sublayer || "").replaceAll("_", " ")} sublayer, layer ${layer}`, s.formula, s.values, s.columns, rowsOf(s));
  }
}
function renderLens() {
  const d = state.data, box = $("lens-map"), detail = $("lens-detail");
  const lens = d.stages.filter((s) => s.name === "logit_lens");
  box.innerHTML = ""; detail.innerHTML = "";
  if (!lens.length) {
    $("lens-formula").textContent = "an encoder predicts no next token: no logit lens";
    $("lens-detail-title").textContent = "";
    return;
  }
  $("lens-formula").textContent = lens[0].formula;
  const table = document.createElement("table");
  table.className = "heatmap lens";
  const head = table.createTHead().insertRow();
  head.append(document.createElement("th"));
  d.tokens.forEach((t) => { const th = document.createElement("th"); th.textContent = label(t); head.append(th); });
  const body = table.createTBody();
  for (const s of lens) {
    const tr = body.insertRow();
    const th = document.createElement("th");
    th.textContent = `after layer ${s.layer}`; tr.append(th);
    s.top.tokens.forEach((top, i) => {
      const p = s.top.values[i];
      const td = tr.insertCell();
      td.textContent = label(top[0]);
      td.dataset.value = String(p[0]);
      td.title = `after layer ${s.layer}, at ${label(d.tokens[i])}: ${top.map((t, k) => `${label(t)} ${fmt(p[k])}`).join(", ")}`;
      td.style.background = sequential(p[0]);
      if (p[0] > 0.6) td.style.color = "#fff";
      if (i === state.selected) td.className = "selected-column";
      td.addEventListener("click", () => select(i));
    });
  }
  box.append(legend("sequential", 0, 1), table);
  $("lens-detail-title").textContent = `next-token guesses at ${label(d.tokens[state.selected])}, layer by layer`;
  const bars = document.createElement("div");
  bars.className = "bars";
  for (const s of lens) {
    const p = s.top.values[state.selected];
    const top = s.top.tokens[state.selected].slice(0, 5).map((t, k) => `${label(t)} ${fmt(p[k])}`);
    bar(bars, `layer ${s.layer}`, p[0], 1, top.join("  "));
  }
  detail.append(bars);
}
function renderNext() {
  const next = state.data.next_token, box = $("next-bars");
  box.innerHTML = "";
  if (!next) { $("next-formula").textContent = "an encoder predicts no next token"; return; }
  $("next-formula").textContent = next.formula;
  const s = next.sampling;
  $("next-note").textContent = `after ${label(state.data.tokens[state.data.tokens.length - 1])}: ` +
    `${next.candidates} candidate tokens at temperature ${s.temperature}, top-k ${s.top_k || "off"}, top-p ${s.top_p}` +
    (settings.api ? "" : " (this file has no server: the controls need qkv explore)");
  next.tokens.forEach((t, k) => bar(box, label(t), next.probs[k], next.probs[0], fmt(next.probs[k])));
}

// ---- controls ----
$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.tokenIds = null; state.selected = 0; state.sourceSelected = 0;
  explain();
});
$("layer-select").addEventListener("change", () => {
  state.layer = Number($("layer-select").value);
  if (settings.api) explain(); else render();  // an exported file holds every layer
});
$("head-select").addEventListener("change", () => { state.head = Number($("head-select").value); renderAttention(); });
$("kind-select").addEventListener("change", () => { state.kind = $("kind-select").value; renderAttention(); });
$("stack-select").addEventListener("change", () => { state.stack = $("stack-select").value; render(); });
$("sampling-form").addEventListener("submit", (event) => { event.preventDefault(); explain(); });
$("sample-button").addEventListener("click", async () => {
  if (!state.data) return;
  state.draws += 1;
  const ids = state.tokenIds || state.data.token_ids;
  const data = await explain({ sample: true, seed: state.draws, ...(settings.notes ? {} : { token_ids: ids }) });
  if (!data || data.next_token.sampled === null) return;
  const sampled = data.next_token.sampled;
  if (settings.notes) {
    $("text-input").value = `${$("text-input").value} ${sampled.text}`;
  } else {
    state.tokenIds = [...ids, sampled.id];
    $("text-input").value += sampled.text;
  }
  state.selected = Number.MAX_SAFE_INTEGER;  // the appended token (explain clamps it)
  await explain();
});

// ---- tabs ----
for (const tab of document.querySelectorAll('[role="tab"]')) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll('[role="tab"]')) {
      other.setAttribute("aria-selected", String(other === tab));
      $(other.getAttribute("aria-controls")).hidden = other !== tab;
    }
  });
}

// ---- chat: this server's own /v1/chat/completions, streamed ----
const conversation = [];
function message(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`; div.textContent = text;
  $("chat-log").append(div);
  return div;
}
$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-error").textContent = "";
  conversation.push({ role: "user", content: text });
  message("user", text);
  $("chat-input").value = "";
  const shown = message("assistant", "");
  let reply = "";
  try {
    const response = await post("/v1/chat/completions", {
      model: settings.model, messages: conversation, stream: true, max_tokens: 128, ...samplingFields(),
    });
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const e of events) {
        const line = e.trim();
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        for (const choice of chunk.choices || []) reply += (choice.delta && choice.delta.content) || "";
        shown.textContent = reply;
      }
    }
    conversation.push({ role: "assistant", content: reply });
  } catch (err) {
    shown.remove();
    conversation.pop();
    $("chat-error").textContent = err.message;
  }
});
$("chat-reset").addEventListener("click", () => { conversation.length = 0; $("chat-log").innerHTML = ""; });

// ---- start ----
if (!settings.api) {
  for (const id of ["explain-button", "apply-sampling", "chat-send"]) $(id).disabled = true;
}
// only a decoder (or the notes' example) appends its own next token; only one with role tokens chats
$("sample-button").disabled = !settings.sample;
if (!settings.sample) $("sample-button").title = settings.api ? "only a decoder writes a next token onto its text" : "this file has no server: use qkv explore";
$("tab-chat").hidden = !settings.chat;
if (embedded) {
  state.data = embedded;
  state.layer = embedded.layers.length ? embedded.layers[0] : 0;
  $("text-input").value = embedded.text;
  render();
  $("status").textContent = `${embedded.tokens.length} tokens (embedded in this file)`;
} else {
  $("text-input").value = settings.text;
  explain();
}
