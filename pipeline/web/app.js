// MemFlow live page: draws the frames the server streams over one WebSocket, sends prompts
// and controls back as JSON (protocol: docs/live.md). No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
// A reload or a dropped connection takes the stream back within the server's grace period.
const RESUME_KEY = "memflow-live-resume";

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
  playing: false,       // false while (re)buffering one chunk of lead
  chunkFrames: 0,       // frames of the largest chunk seen: the lead kept before playing
  chunkTimes: [],       // [ms, frames, bytes] of the last chunks, for the received rates
  chunkBytes: 0,        // bytes of frames received since the last chunk message
  lastDrawAt: null,
  stalls: 0,            // gaps in playback longer than a stall (see play)
  longestGap: 0,
  reconnects: 0,
  skipped: 0,           // frames the page skipped to catch up
  serverDropped: 0,
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
  const params = new URLSearchParams();
  if (token) params.set("token", token);
  const resume = sessionStorage.getItem(RESUME_KEY);
  if (resume) params.set("resume", resume);
  const query = params.toString() ? `?${params}` : "";
  const ws = new WebSocket(`${proto}//${location.host}/ws${query}`);
  ws.binaryType = "arraybuffer";
  live.ws = ws;
  live.received = 0; live.acked = 0;  // counted per connection by the server
  ws.onopen = () => setConn("connected", "ok");
  ws.onclose = (e) => {
    setConn(`closed (${e.code}${e.reason ? ": " + e.reason : ""})`, "bad");
    setState("disconnected");
    // the server said why and meant it (a bad token, a full queue, a flood): do not retry
    const final = [1008, 1009, 1013, 4401, 4403, 4408].includes(e.code);
    if (final || live.reconnects >= 20) {
      logLine(`connection closed, code ${e.code} ${e.reason || ""}; reload the page to reconnect`);
      return;
    }
    live.reconnects += 1;
    logLine(`connection lost (code ${e.code}); reconnecting`);
    setTimeout(connect, Math.min(10000, 500 * live.reconnects));
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
  live.chunkBytes += buffer.byteLength;
  live.framesTotal = (live.framesTotal || 0) + 1;
  $("frames-received").textContent = live.framesTotal;
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
    session: onSession,
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

function onSession(m) {
  sessionStorage.setItem(RESUME_KEY, m.resume_token);
  live.reconnects = 0;
  if (m.resumed) logLine("reconnected: this page has its video back (press Resume to go on)");
}

function onStatus(m) {
  setState(m.state);
  if (m.state !== "running") { live.lastDrawAt = null; live.chunkTimes = []; }  // a pause is no stall
  $("message").textContent = m.message || "";
  if (m.frames_dropped !== undefined) live.serverDropped = m.frames_dropped;
  updateDropped();
  if (m.gen_fps) $("gen-fps").textContent = m.gen_fps.toFixed(1);
  if (m.chunk_ms) $("chunk-ms").textContent = `${m.chunk_ms.toFixed(0)} ms`;
  if (m.frames_generated !== undefined) live.framesGenerated = m.frames_generated;
  if (m.steps) $("steps-now").textContent = `steps ${m.steps.join(",")}`;
  if (m.positions) {
    $("positions").textContent = m.max_latent_frames == null ? `${m.positions} (endless)`
      : `${m.positions} (ends at latent frame ${m.max_latent_frames})`;
  }
  if (m.state === "queued") $("overlay").textContent = `busy: number ${m.position} of ${m.queue} in the queue`;
  drawTimeline();
}

// Received rates over the last chunks: frames and bytes per second between the first and the
// last chunk message in the window (a chunk arrives as a burst, so one chunk alone says nothing).
function onChunk(m) {
  live.chunkPrompt.set(m.index, m.prompt);
  live.chunkFrames = Math.max(live.chunkFrames, m.frames);
  const times = live.chunkTimes;
  if (times.length) times[times.length - 1][2] = live.chunkBytes;
  live.chunkBytes = 0;
  times.push([performance.now(), m.frames, 0]);
  while (times.length > 8) times.shift();
  if (times.length >= 3) {
    // a chunk's frames follow its message: those of all but the last arrived inside the span
    const span = (times[times.length - 1][0] - times[0][0]) / 1000, done = times.slice(0, -1);
    const frames = done.reduce((n, t) => n + t[1], 0), bytes = done.reduce((n, t) => n + t[2], 0);
    $("recv-fps").textContent = (frames / span).toFixed(1);
    $("bitrate").textContent = `${(8 * bytes / span / 1000).toFixed(0)} kbit/s`;
  }
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

// -- playback ----------------------------------------------------------------------------------
// Frames arrive a chunk at a time. Played at the video's fps they would come in bursts with a
// freeze at every chunk boundary whenever generation is slower than real time, so playback is
// paced to the generation rate: one chunk of lead is buffered before playing, each frame is
// shown for (time between chunks) / (frames per chunk), a little slower when the lead runs low
// and faster when it grows. A page more than 2 s (or 3 chunks) behind skips ahead.
function frameInterval() {
  const t = live.chunkTimes, base = 1000 / live.fps;
  if (t.length < 2) return base;
  const period = (t[t.length - 1][0] - t[0][0]) / (t.length - 1);
  return Math.max(base, period / (live.chunkFrames || 12));
}

function play(now) {
  const canvas = $("video"), ctx = canvas.getContext("2d");
  const lead = live.chunkFrames || 12;
  while (live.queue.length > Math.max(2 * live.fps, 3 * lead)) { live.queue.shift().bitmap.close(); live.skipped += 1; updateDropped(); }
  if (!live.playing && live.queue.length >= lead) { live.playing = true; live.nextShowAt = now; }
  if (live.playing && !live.queue.length) live.playing = false;  // ran dry: buffer a chunk again
  if (live.playing && now >= live.nextShowAt) {
    const { frame, chunk, bitmap } = live.queue.shift();
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width; canvas.height = bitmap.height;
      canvas.style.aspectRatio = `${bitmap.width} / ${bitmap.height}`;
    }
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    const interval = frameInterval();
    noteGap(now, interval);
    live.lastShown = frame;
    const ahead = live.queue.length, pace = ahead < lead / 2 ? 1.15 : ahead > 2 * lead ? 0.85 : 1;
    live.nextShowAt = Math.max(live.nextShowAt + interval * pace, now - interval);
    $("overlay").textContent = "";
    $("frame-shown").textContent = frame;
    const asked = live.switchAsked;
    if (asked && live.chunkPrompt.get(chunk) === asked.prompt) {
      $("switch-latency").textContent = `${(now - asked.t).toFixed(0)} ms`;
      live.switchAsked = null;
    }
    drawPlayhead();
  }
  requestAnimationFrame(play);
}

// A stall: two consecutive frames shown more than max(200 ms, 4 frame intervals) apart.
function noteGap(now, interval) {
  if (live.lastDrawAt !== null) {
    const gap = now - live.lastDrawAt;
    live.longestGap = Math.max(live.longestGap, gap);
    if (gap > Math.max(200, 4 * interval)) live.stalls += 1;
    $("stalls").textContent = live.stalls;
    $("stalls").title = `longest gap between two frames: ${live.longestGap.toFixed(0)} ms`;
    $("stalls").dataset.longest = live.longestGap.toFixed(0);
  }
  live.lastDrawAt = now;
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
  // a label is shown only where it does not run into the previous one (the title keeps the text)
  const width = box.clientWidth || 600, labelPx = 90;
  let labelEnd = -Infinity;
  const marker = (cls, frame, text) => {
    const el = document.createElement("div");
    el.className = cls; el.style.left = `${(100 * frame) / span}%`;
    el.dataset.frame = frame; el.title = `frame ${frame} (${(frame / live.fps).toFixed(2)} s): ${text}`;
    const x = (width * frame) / span;
    if (x >= labelEnd) {
      const label = document.createElement("span"); label.textContent = text; el.append(label);
      labelEnd = x + labelPx;
    }
    box.append(el);
  };
  const markers = [...live.switches.map((s) => ["tl-switch", s.pixel_frame, s.prompt]),
                   ...live.plan.map((p) => ["tl-plan", p.frame, p.prompt])].sort((a, b) => a[1] - b[1]);
  markers.forEach(([cls, frame, text]) => marker(cls, frame, text));
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
    const over = s.transition_chunks ? ` (over ${s.transition_chunks} chunks, ${s.blend})` : "";
    li.textContent = `frame ${s.pixel_frame} (${(s.pixel_frame / live.fps).toFixed(2)} s, latent ${s.latent_frame}): ${s.prompt}${over}`;
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
  $("start").disabled = !has("idle", "stopped", "limit", "error");  // not while a video runs
  $("switch").disabled = !has("running", "stopped");
  $("stop").disabled = !has("running", "stopped");
  $("stop").textContent = state === "stopped" ? "Resume" : "Stop";
  $("reset").disabled = !has("running", "stopped", "limit", "error");
  $("save").disabled = !has("running", "stopped", "limit");
  $("plan-send").disabled = !has("idle", "running", "stopped");
}

// What a new or reset video starts without: the last picture, the readouts, the timeline, the
// memory, and the plan as applied (the server drops it; the rows stay as a draft).
function clearVideo() {
  live.queue.forEach((f) => f.bitmap.close());
  Object.assign(live, { queue: [], lastShown: -1, chunkPrompt: new Map(), switchAsked: null,
    playing: false, chunkTimes: [], chunkBytes: 0, lastDrawAt: null, stalls: 0, longestGap: 0,
    framesTotal: 0, skipped: 0, serverDropped: 0, framesGenerated: 0, switches: [], plan: [] });
  const canvas = $("video");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  for (const id of ["frame-shown", "gen-fps", "recv-fps", "chunk-ms", "switch-latency", "bitrate"]) $(id).textContent = "-";
  $("frames-received").textContent = "0"; $("stalls").textContent = "0";
  $("overlay").textContent = "press start";
  $("plan-note").textContent = planRows().length ? "not applied (sent with Start)" : "";
  $("downloads").innerHTML = "";
  updateDropped();
  drawMemory({ sink: [], bank: [], window: [], thumbs: {} });
  drawTimeline();
}

function promptText() {
  const text = $("prompt").value.trim();
  if (!text) { logLine("type a prompt first", "err"); return text; }
  // "a storm:2 | lightning:1": a weighted prompt, the mix of its parts
  const parts = text.split(" | ").map((part) => part.match(/^(.*\S):\s*(\d+(?:\.\d+)?)$/));
  if (parts.length > 1 && parts.every((m) => m)) return parts.map((m) => [m[1], parseFloat(m[2])]);
  return text;
}

function bind() {
  $("start").onclick = () => {
    const prompt = promptText(); if (!prompt) return;
    if (live.framesGenerated > 0 && !confirm("Start a new video? The current one is dropped (save it first to keep it).")) return;
    clearVideo();
    sendPlan();
    const seed = parseInt($("seed").value, 10);
    const start = { type: "start", prompt, seed: Number.isFinite(seed) && seed >= 0 ? seed : 0 };
    const file = $("start-file").files[0] || live.droppedFile;
    if (!file) { send(start); return; }
    // the file goes up as bytes (the server never takes a path); `start` names the upload
    const kind = file.type.startsWith("video/") ? "video" : "image";
    const query = new URLSearchParams({ kind });
    if (token) query.set("token", token);
    fetch(`/upload?${query}`, { method: "POST", body: file })
      .then((r) => r.json().then((body) => ({ ok: r.ok, body })))
      .then(({ ok, body }) => {
        if (!ok) { logLine(`the ${kind} was refused: ${body.error}`, "err"); return; }
        logLine(`starting from the ${kind} ${file.name}`);
        send({ ...start, [kind]: body.id });
      })
      .catch((e) => logLine(`upload failed: ${e}`, "err"));
  };
  const stage = $("start-file").closest("main") || document.body;
  stage.addEventListener("dragover", (e) => e.preventDefault());
  stage.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) { live.droppedFile = file; logLine(`dropped ${file.name}: Start begins from it`); }
  });
  $("switch").onclick = () => {
    const prompt = promptText(); if (!prompt) return;
    const label = typeof prompt === "string" ? prompt : prompt.map(([t, w]) => `${t}:${w}`).join(" | ");
    live.switchAsked = { prompt: label, t: performance.now() };  // as the server names chunks
    const chunks = parseInt($("transition").value, 10);
    send({ type: "prompt", prompt, transition_chunks: Number.isFinite(chunks) && chunks > 0 ? chunks : 0,
           blend: $("blend").value });
  };
  $("prompt").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); (live.state === "running" || live.state === "stopped" ? $("switch") : $("start")).click(); }
  };
  $("stop").onclick = () => send({ type: live.state === "stopped" ? "resume" : "stop" });
  $("reset").onclick = () => { send({ type: "reset" }); clearVideo(); };
  $("save").onclick = () => send({ type: "save" });
  $("plan-add").onclick = () => { addPlanRow(); drawTimeline(); };
  $("steps-apply").onclick = () => {
    const text = $("steps").value.trim();
    const steps = text ? text.split(",").map((v) => parseInt(v, 10)) : null;
    if (steps && steps.some((v) => !Number.isFinite(v))) { logLine("steps: comma-separated integers", "err"); return; }
    send({ type: "controls", steps });
  };
  $("seed-apply").onclick = () => {
    const seed = parseInt($("next-seed").value, 10);
    if (!Number.isFinite(seed) || seed < 0) { logLine("seed: an integer >= 0", "err"); return; }
    send({ type: "controls", seed });
  };
  $("memory-view").onchange = (e) => send({ type: "controls", memory_view: e.target.checked });
  $("timeline-file").onchange = (e) => {
    const file = e.target.files[0]; if (!file) return;
    file.text().then((text) => {
      const saved = JSON.parse(text);
      const entries = (saved.timeline || []).slice(1);  // the first is the start prompt
      $("plan-rows").innerHTML = "";
      entries.forEach((entry) => addPlanRow(entry.pixel_frame, "frame", entry.prompt));
      drawTimeline();
      sendPlan();
      logLine(`plan loaded from ${file.name}: ${entries.length} switches`);
    }).catch((err) => logLine(`not a timeline JSON: ${err}`, "err"));
  };
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
