// The nnglass dashboard: models, this key's jobs, server health, kept live by one stream.
// Rules this file keeps: the key lives in sessionStorage and goes out only as a Bearer
// header (never in a URL); everything put in the page is text (textContent), never
// HTML, since job errors carry user text; updates come from one fetch()-read event
// stream (GET /v1/events), reopened with a growing pause when it drops, never polled.
"use strict";

const KEY = "nnglass.key";
const TERMINAL = new Set(["COMPLETED", "ERROR", "CANCELLED"]);
const RANK = { RECEIVED: 0, QUEUED: 1, RUNNING: 2, COMPLETED: 3, ERROR: 3, CANCELLED: 3 };
const jobs = new Map(); // id -> the last status object shown
let stream = null; // the AbortController of the open event stream
let nextCursor = null; // `before` for the next page of older jobs

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

class KeyRefused extends Error {}

async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  if (!key) throw new KeyRefused("no key");
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${key}` };
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.status === 401) throw new KeyRefused("the server refused this key");
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const detail = (await response.json()).detail;
      if (detail && detail.message) message = detail.message;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new Error(message);
  }
  return response;
}

// --- formatting ------------------------------------------------------------------------
function clock(t) {
  return t ? new Date(t * 1000).toLocaleTimeString() : "";
}
function span(a, b) {
  if (!a) return "";
  const s = Math.max(0, (b || Date.now() / 1000) - a);
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}
function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}
function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

// --- models and health -----------------------------------------------------------------
function showModels(models) {
  const box = $("models");
  box.replaceChildren(...models.map(modelCard));
  const ready = models.filter((m) => m.state === "ready").length;
  const health = $("health");
  health.textContent = `${ready}/${models.length} models ready`;
  health.className = `badge ${ready === models.length ? "ok" : "warn"}`;
}

function modelCard(m) {
  const card = el("article", null, "card");
  card.dataset.model = m.name;
  const title = el("h3", m.name);
  title.append(" ", el("span", m.state, `badge state-${m.state}`));
  card.append(title, el("p", m.source, "muted"));
  const p = m.policy;
  const facts = [
    ["replicas", `${m.replicas_alive ?? "?"}/${m.replicas} alive, ${m.replicas_busy ?? 0} busy`],
    ["queue", `${m.queue_depth} waiting, ${m.running} running`],
    ["last pass", m.last_pass_jobs ? plural(m.last_pass_jobs, "job") : "none yet"],
    ["last minute", `${plural(m.jobs_last_minute ?? 0, "job")} ended, ${m.prompt_tokens_per_s ?? 0} prompt tokens/s`],
    ["read", p.read.length ? p.read.join(", ") : "nothing"],
    ["write", p.write.length ? p.write.join(", ") : "nothing"],
    ["weights", p.weights_visible ? "visible" : "hidden"],
    ["gradients", p.gradients ? "allowed" : "refused"],
    ["module calls", p.module_calls ? "allowed" : "refused"],
    ["limits", `${p.limits.prompt_tokens} prompt tokens, ${p.limits.new_tokens} new, ${p.limits.run_seconds} s`],
  ];
  const list = el("dl");
  for (const [name, value] of facts) list.append(el("dt", name), el("dd", value));
  card.append(list);
  if (m.error) card.append(el("p", m.error, "error"));
  return card;
}

// --- jobs ------------------------------------------------------------------------------
function rowOf(id) {
  return $("job-rows").querySelector(`tr[data-job="${CSS.escape(id)}"]`);
}

function showJob(job) {
  const old = jobs.get(job.id);
  // A list read and the stream can cross: never step a job's status back.
  if (old && RANK[job.status] < RANK[old.status]) return;
  jobs.set(job.id, job);
  const rows = $("job-rows");
  let row = rowOf(job.id);
  if (!row) {
    row = el("tr");
    row.dataset.job = job.id;
    row.dataset.history = "";
    const later = [...rows.children].find((r) => jobs.get(r.dataset.job).created_at < job.created_at);
    rows.insertBefore(row, later || null);
  }
  const trail = row.dataset.history ? row.dataset.history.split(" ") : [];
  if (trail[trail.length - 1] !== job.status) trail.push(job.status);
  row.dataset.history = trail.join(" "); // every status this row has shown, in order
  row.replaceChildren(...jobCells(job));
  row.title = `seen: ${trail.join(" → ")}`;
  $("jobs-empty").hidden = jobs.size > 0;
}

// Waiting and running times of unfinished jobs grow between events: counted here, in
// place (the row's buttons stay the same elements under the pointer).
setInterval(() => {
  for (const job of jobs.values()) {
    const row = !TERMINAL.has(job.status) && rowOf(job.id);
    if (!row) continue;
    row.querySelector("td.waited").textContent = span(job.queued_at, job.started_at);
    row.querySelector("td.ran").textContent = span(job.started_at, job.finished_at);
  }
}, 1000);

function jobCells(job) {
  const id = el("td", job.id.slice(0, 10), "id");
  id.title = job.id;
  const status = el("td", job.status, `status status-${job.status}`);
  const ahead = job.position === 0 ? "next" : `${job.position} ahead`;
  const queue = el("td", job.status === "QUEUED" && job.position !== undefined ? ahead : "", "queue");
  const error = el("td", null, "error");
  if (job.error) {
    error.append(el("strong", job.error.type), ": ", job.error.message);
    if (job.error.where) error.append(el("div", job.error.where, "where"));
  }
  const actions = el("td", null, "actions");
  if (!TERMINAL.has(job.status)) actions.append(button("Cancel", "cancel", () => cancel(job.id)));
  if (job.status === "COMPLETED" && job.result_bytes !== null && job.expires_at) {
    actions.append(button("Download", "download", () => download(job.id)));
  }
  return [
    id, el("td", job.model), status, queue, el("td", clock(job.created_at)),
    el("td", span(job.queued_at, job.started_at), "waited"), el("td", span(job.started_at, job.finished_at), "ran"),
    el("td", bytes(job.result_bytes)), error, actions,
  ];
}

function button(text, cls, onClick) {
  const b = el("button", text, cls);
  b.type = "button";
  b.addEventListener("click", (e) => { e.target.disabled = true; onClick().finally(() => { e.target.disabled = false; }); });
  return b;
}

async function cancel(id) {
  try {
    showJob(await (await api(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" })).json());
  } catch (e) { notice(e); }
}

async function download(id) {
  try {
    const blob = await (await api(`/v1/jobs/${encodeURIComponent(id)}/result`)).blob();
    const url = URL.createObjectURL(blob); // the bytes are in the page: no key in any URL
    const a = el("a");
    a.href = url;
    a.download = `${id}.safetensors`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) { notice(e); }
}

async function loadJobs(before) {
  const query = before ? `?limit=50&before=${encodeURIComponent(before)}` : "?limit=50";
  const page = await (await api(`/v1/jobs${query}`)).json();
  page.jobs.forEach(showJob);
  if (!before || nextCursor === before) nextCursor = page.next; // a stale click changes nothing
  $("more").hidden = nextCursor === null;
}

function notice(e) {
  if (e instanceof KeyRefused) return logout(e.message);
  $("notice").textContent = e.message;
}

// --- the event stream ------------------------------------------------------------------
async function follow() {
  let pause = 1000;
  while (sessionStorage.getItem(KEY)) {
    const controller = new AbortController();
    stream = controller;
    let first = true;
    try {
      const response = await api("/v1/events", { signal: controller.signal });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const event = parse(block);
          if (!event) continue;
          if (event.kind === "models") showModels(event.data);
          if (event.kind === "job") showJob(event.data);
          if (first) { // the server now listens: a list read from here on misses nothing
            first = false;
            pause = 1000;
            live(true);
            await loadJobs(null);
          }
        }
      }
    } catch (e) {
      if (e instanceof KeyRefused) return logout(e.message);
      if (controller.signal.aborted) return;
    }
    live(false);
    await new Promise((done) => setTimeout(done, pause));
    pause = Math.min(pause * 2, 30000);
  }
}

function parse(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5));
  }
  return data.length ? { kind, data: JSON.parse(data.join("\n")) } : null;
}

function live(on) {
  const badge = $("live");
  badge.textContent = on ? "live" : "reconnecting";
  badge.className = `badge ${on ? "ok" : "warn"}`;
}

// --- login -----------------------------------------------------------------------------
function logout(message) {
  if (stream) stream.abort();
  stream = null;
  sessionStorage.removeItem(KEY);
  jobs.clear();
  $("job-rows").replaceChildren();
  $("models").replaceChildren();
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("live").textContent = "offline";
  $("live").className = "badge";
}

function open() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  $("notice").textContent = "";
  follow();
}

async function health() {
  try {
    const h = await (await fetch("/health", { cache: "no-store" })).json();
    const states = Object.values(h.models);
    $("health").textContent = `${states.filter((s) => s === "ready").length}/${states.length} models ready`;
  } catch (_) {
    $("health").textContent = "server unreachable";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key").value.trim();
    $("key").value = "";
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    open();
  });
  $("logout").addEventListener("click", () => logout(""));
  $("more").addEventListener("click", () => loadJobs(nextCursor).catch(notice));
  health();
  if (sessionStorage.getItem(KEY)) open();
  else logout("");
});
