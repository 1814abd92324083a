// MemFlow live page: draws the frames the server streams over one WebSocket, sends prompts
// and controls back as JSON (protocol: docs/live.md). No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");

const live = {
  ws: null,
  fps: 16,
  headerBytes: 8,
  received: 0,          // binary frames received
  acked: 0,
  ackTimer: null,
  queue: [],            // decoded frames waiting to be shown: {frame, chunk, bitmap}
  lastShown: -1,
  nextShowAt: 0,
  skipped: 0,           // frames the page skipped to catch up
  serverDropped: 0,
  arrivals: [],         // receive times (ms) of the last frames, for the received FPS
  firstArrival: null,
  chunkPrompt: new Map(),  // chunk index -> prompt
  switchAsked: null,    // {prompt, t} of the last "switch now", until its first frame is shown
  state: "connecting",
  framesGenerated: 0,
  switches: [],
  plan: [],
  pings: new Map(),
};

// -- connection --------------------------------------------------------------------------------
function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  const ws = new WebSocket(`${proto}//${location.host}/ws${query}`);
  ws.binaryType = "arraybuffer";
  live.ws = ws;
  ws.onopen = () => setConn("connected", "ok");
  ws.onclose = (e) => {
    setConn(`closed (${e.code}${e.reason ? ": " + e.reason : ""})`, "bad");
    setState("disconnected");
    logLine(`connection closed, code ${e.code} ${e.reason || ""}; reload the page to reconnect`);
  };
  ws.onmessage = (e) => (typeof e.data === "string" ? onJson(JSON.parse(e.data)) : onFrame(e.data));
}

function send(obj) {
  if (live.ws && live.ws.readyState === WebSocket.OPEN) live.ws.send(JSON.stringify(obj));
}

// Frames are acknowledged (cumulatively, at most every 100 ms, well inside the message rate
// limit): the server sends only a window of unacknowledged frames, so a slow page gets dropped
// frames instead of a growing delay.
function scheduleAck() {
  if (live.ackTimer !== null) return;
  live.ackTimer = setTimeout(() => {
    live.ackTimer = null;
    if (live.received > live.acked) {
      live.acked = live.received;
      send({ type: "ack", frames: live.acked });
    }
  }, 100);
}

// -- incoming ----------------------------------------------------------------------------------
function onFrame(buffer) {
  const view = new DataView(buffer);
  const frame = view.getUint32(0), chunk = view.getUint32(4);
  live.received += 1;
  const now = performance.now();
  if (live.firstArrival === null) live.firstArrival = now;
  live.arrivals.push(now);
  while (live.arrivals.length && now - live.arrivals[0] > 5000) live.arrivals.shift();
  $("frames-received").textContent = live.received;
  scheduleAck();
  const blob = new Blob([new Uint8Array(buffer, live.headerBytes)], { type: "image/jpeg" });
  createImageBitmap(blob).then((bitmap) => {
    live.queue.push({ frame, chunk, bitmap });
    live.queue.sort((a, b) => a.frame - b.frame);
  });
}

function onJson(msg) {
  const handlers = {
    hello: (m) => { live.fps = m.fps || 16; live.headerBytes = m.frame_header_bytes || 8; },
    status: onStatus,
    chunk: onChunk,
    timeline: (m) => { live.switches = m.switches; live.plan = m.plan; live.framesGenerated = m.frames_generated; drawTimeline(); },
    memory: drawMemory,
    saved: onSaved,
    pong: (m) => { const t0 = live.pings.get(m.t); if (t0 !== undefined) { $("rtt").textContent = `${(performance.now() - t0).toFixed(0)} ms`; live.pings.delete(m.t); } },
    error: (m) => logLine(`error ${m.code}: ${m.message}`, "err"),
  };
  (handlers[msg.type] || (() => logLine(`unknown message ${msg.type}`)))(msg);
}

function onStatus(m) {
  setState(m.state);
  $("message").textContent = m.message || "";
  if (m.frames_dropped !== undefined) live.serverDropped = m.frames_dropped;
  updateDropped();
  if (m.gen_fps) $("gen-fps").textContent = m.gen_fps.toFixed(1);
  if (m.chunk_ms) $("chunk-ms").textContent = `${m.chunk_ms.toFixed(0)} ms`;
  if (m.frames_generated !== undefined) live.framesGenerated = m.frames_generated;
  if (m.state === "queued") $("overlay").textContent = `busy: number ${m.position} of ${m.queue} in the queue`;
  drawTimeline();
}

function onChunk(m) {
  live.chunkPrompt.set(m.index, m.prompt);
  if (m.gen_fps) $("gen-fps").textContent = m.gen_fps.toFixed(1);
  $("chunk-ms").textContent = `${((m.generate_s + m.decode_s) * 1000).toFixed(0)} ms`;
  if (m.switch_latency_ms !== undefined) {
    logLine(`switch to "${m.prompt}" at frame ${m.pixel_start} (chunk ${m.index}), ` + (m.planned
      ? "as planned" : `generated ${m.switch_latency_ms.toFixed(0)} ms after the server got it`));
  }
}

function onSaved(m) {
  const q = token ? `?token=${encodeURIComponent(token)}` : "";
  $("downloads").innerHTML = "";
  for (const [label, href] of [["MP4", m.mp4], ["timeline JSON", m.timeline]]) {
    const a = document.createElement("a");
    a.href = href + q; a.textContent = label; a.setAttribute("download", "");
    $("downloads").append(a, " ");
  }
  logLine(`saved ${m.frames} frames`);
}

// -- playback: frames shown at the video's fps, skipping ahead when more than 2 s are queued ---
function play(now) {
  const canvas = $("video"), ctx = canvas.getContext("2d");
  while (live.queue.length > 2 * live.fps) { live.queue.shift().bitmap.close(); live.skipped += 1; updateDropped(); }
  if (live.queue.length && now >= live.nextShowAt) {
    const { frame, chunk, bitmap } = live.queue.shift();
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width; canvas.height = bitmap.height;
      canvas.style.aspectRatio = `${bitmap.width} / ${bitmap.height}`;
    }
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    live.lastShown = frame;
    live.nextShowAt = Math.max(live.nextShowAt + 1000 / live.fps, now - 1000 / live.fps);
    $("overlay").textContent = "";
    $("frame-shown").textContent = frame;
    const asked = live.switchAsked;
    if (asked && live.chunkPrompt.get(chunk) === asked.prompt) {
      $("switch-latency").textContent = `${(now - asked.t).toFixed(0)} ms`;
      live.switchAsked = null;
    }
    drawPlayhead();
  }
  // frames received over the last 5 s (chunks arrive in bursts, so a short span would overstate it)
  const n = live.arrivals.length, since = live.firstArrival === null ? 0 : Math.min(5000, now - live.firstArrival);
  $("recv-fps").textContent = n > 1 && since > 500 ? (n / (since / 1000)).toFixed(1) : "-";
  requestAnimationFrame(play);
}

function updateDropped() {
  $("dropped").textContent = live.serverDropped + live.skipped;
  $("dropped").title = `server dropped ${live.serverDropped} (slow connection), page skipped ${live.skipped}`;
}

// -- timeline ----------------------------------------------------------------------------------
function timelineSpan() {
  const planned = live.plan.map((p) => p.frame);
  const edited = planRows().map((r) => r.frame).filter((f) => f !== null);
  return Math.max(live.fps * 10, live.framesGenerated, ...planned, ...edited) * 1.08;
}

function drawTimeline() {
  const box = $("timeline"), span = timelineSpan();
  box.querySelectorAll(".tl-switch, .tl-plan").forEach((e) => e.remove());
  $("tl-generated").style.width = `${(100 * live.framesGenerated) / span}%`;
  const marker = (cls, frame, text) => {
    const el = document.createElement("div");
    el.className = cls; el.style.left = `${(100 * frame) / span}%`;
    el.dataset.frame = frame; el.title = `frame ${frame} (${(frame / live.fps).toFixed(2)} s): ${text}`;
    const label = document.createElement("span"); label.textContent = text; el.append(label);
    box.append(el);
  };
  live.switches.forEach((s) => marker("tl-switch", s.pixel_frame, s.prompt));
  live.plan.forEach((p) => marker("tl-plan", p.frame, p.prompt));
  const ticks = $("tl-ticks"); ticks.innerHTML = "";
  const step = Math.max(1, Math.ceil(span / live.fps / 8));
  for (let s = 0; s * live.fps < span; s += step) {
    const t = document.createElement("span");
    t.style.left = `${(100 * s * live.fps) / span}%`; t.textContent = `${s}s`; ticks.append(t);
  }
  const list = $("switch-list"); list.innerHTML = "";
  live.switches.forEach((s) => {
    const li = document.createElement("li");
    li.dataset.frame = s.pixel_frame; li.dataset.latent = s.latent_frame;
    li.textContent = `frame ${s.pixel_frame} (${(s.pixel_frame / live.fps).toFixed(2)} s, latent ${s.latent_frame}): ${s.prompt}`;
    list.append(li);
  });
  drawPlayhead();
  markPastRows();
}

function drawPlayhead() {
  $("tl-playhead").style.left = `${(100 * Math.max(0, live.lastShown)) / timelineSpan()}%`;
}

// -- memory readout ------------------------------------------------------------------------------
function drawMemory(m) {
  const fill = (id, frames) => {
    const box = $(id); box.innerHTML = "";
    if (!frames.length) { box.textContent = "-"; return; }
    for (const f of frames) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      if (m.thumbs[String(f)]) img.src = m.thumbs[String(f)];
      img.alt = `latent frame ${f}`;
      const cap = document.createElement("figcaption"); cap.textContent = `latent ${f}`;
      fig.append(img, cap); box.append(fig);
    }
  };
  fill("mem-sink", m.sink);
  fill("mem-bank", m.bank);
  $("mem-window").textContent = m.window && m.window.length ? `latent ${m.window[0]}-${m.window[m.window.length - 1]}` : "-";
}

// -- planned switches ------------------------------------------------------------------------------
function addPlanRow(at = "", unit = "second", prompt = "") {
  const tr = document.createElement("tr");
  tr.innerHTML = `<td><input class="plan-at" type="number" min="0" step="any"></td>
    <td><select class="plan-unit"><option value="second">s</option><option value="frame">frame</option></select></td>
    <td><input class="plan-prompt" type="text" maxlength="1000"></td>
    <td><button class="plan-del" title="remove">x</button></td>`;
  tr.querySelector(".plan-at").value = at;
  tr.querySelector(".plan-unit").value = unit;
  tr.querySelector(".plan-prompt").value = prompt;
  tr.querySelector(".plan-del").onclick = () => { tr.remove(); drawTimeline(); };
  tr.querySelectorAll("input, select").forEach((e) => (e.oninput = () => { $("plan-note").textContent = "not applied yet"; drawTimeline(); }));
  $("plan-rows").append(tr);
}

function planRows() {
  return [...$("plan-rows").children].map((tr) => {
    const at = parseFloat(tr.querySelector(".plan-at").value);
    const unit = tr.querySelector(".plan-unit").value;
    const prompt = tr.querySelector(".plan-prompt").value.trim();
    const frame = Number.isFinite(at) && at >= 0 ? (unit === "second" ? Math.round(at * live.fps) : Math.round(at)) : null;
    return { tr, frame, prompt };
  });
}

function sendPlan() {
  const rows = planRows().filter((r) => r.frame !== null && r.prompt);
  send({ type: "plan", switches: rows.map((r) => ({ frame: r.frame, prompt: r.prompt })) });
  $("plan-note").textContent = rows.length ? `${rows.length} planned` : "";
}

function markPastRows() {
  planRows().forEach((r) => r.tr.classList.toggle("past", r.frame !== null && r.frame <= live.framesGenerated));
}

// -- controls ----------------------------------------------------------------------------------
function setConn(text, cls) { const e = $("conn"); e.textContent = text; e.className = `badge ${cls}`; }

function setState(state) {
  live.state = state;
  const e = $("state"); e.textContent = state; e.className = `badge state-${state}`;
  const has = (...s) => s.includes(state);
  $("start").disabled = !has("idle", "running", "stopped", "limit", "error");
  $("switch").disabled = !has("running", "stopped");
  $("stop").disabled = !has("running", "stopped");
  $("stop").textContent = state === "stopped" ? "Resume" : "Stop";
  $("reset").disabled = !has("running", "stopped", "limit", "error");
  $("save").disabled = !has("running", "stopped", "limit");
  $("plan-send").disabled = !has("idle", "running", "stopped");
}

function promptText() {
  const text = $("prompt").value.trim();
  if (!text) logLine("type a prompt first", "err");
  return text;
}

function bind() {
  $("start").onclick = () => {
    const prompt = promptText(); if (!prompt) return;
    live.queue.forEach((f) => f.bitmap.close());
    Object.assign(live, { queue: [], lastShown: -1, chunkPrompt: new Map(), switchAsked: null });
    sendPlan();
    const seed = parseInt($("seed").value, 10);
    send({ type: "start", prompt, seed: Number.isFinite(seed) && seed >= 0 ? seed : 0 });
  };
  $("switch").onclick = () => {
    const prompt = promptText(); if (!prompt) return;
    live.switchAsked = { prompt, t: performance.now() };
    send({ type: "prompt", prompt });
  };
  $("prompt").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); (live.state === "running" || live.state === "stopped" ? $("switch") : $("start")).click(); }
  };
  $("stop").onclick = () => send({ type: live.state === "stopped" ? "resume" : "stop" });
  $("reset").onclick = () => send({ type: "reset" });
  $("save").onclick = () => send({ type: "save" });
  $("plan-add").onclick = () => { addPlanRow(); drawTimeline(); };
  $("plan-send").onclick = sendPlan;
  setInterval(() => { const t = Math.round(performance.now()); live.pings.set(t, t); send({ type: "ping", t }); }, 2000);
}

function logLine(text, cls = "") {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()}  ${text}`; li.className = cls;
  const log = $("log"); log.prepend(li);
  while (log.children.length > 30) log.lastChild.remove();
}

bind();
setState("connecting");
drawTimeline();
connect();
requestAnimationFrame(play);
