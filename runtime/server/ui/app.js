// The dashboard's views and the router among them (#/models, #/runs, #/runs/ID, #/peers,
// #/usage, #/cache). Each view draws into <main>, refreshes itself, and returns the
// function that stops it when another view opens.
import { api, ApiError, follow } from "./api.js";
import { topology, usageChart } from "./charts.js";
import { bytes, count, h, seconds, statusBadge, table, when } from "./dom.js";
import { drawRun } from "./graph.js";

const view = () => document.getElementById("view");
// cache/status.py's RESUMABLE_RUN_STATES but running (tests/test_dashboard_api.py holds
// the two the same), and the runs a cancel stops
const RESUMABLE = new Set(["pending", "interrupted", "cancelled", "needs_attention"]);
const STOPPABLE = new Set(["running", "pending"]);

function show(...children) {
  view().replaceChildren(...children);
}

function problem(error) {
  const banner = document.getElementById("problem");
  if (!error) {
    banner.hidden = true;
    return;
  }
  banner.textContent = error instanceof ApiError ? error.message : `the daemon does not answer (${error.message || error})`;
  banner.hidden = false;
}

// Calls draw() now and every `every` ms until stopped; a failure shows in the banner.
function refreshing(draw, every) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    try {
      await draw();
      problem(null);
    } catch (error) {
      if (!stopped) problem(error);
    }
    if (!stopped) timer = setTimeout(tick, every);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

async function act(button, call) {
  button.disabled = true;
  try {
    await call();
    problem(null);
  } catch (error) {
    problem(error);
  } finally {
    button.disabled = false;
  }
}

// -- models -----------------------------------------------------------------------------

function keepAliveLeft(expires) {
  if (expires === null || expires === undefined) return "for ever";
  const left = expires - Date.now() / 1000;
  return left <= 0 ? "unloading" : seconds(left);
}

function modelsView() {
  const heading = h("h1", null, "Models");
  const loaded = h("section", { "data-section": "loaded" });
  const available = h("section", { "data-section": "available" });
  show(heading, h("h2", null, "Loaded"), loaded, h("h2", null, "Available"), available);
  return refreshing(async () => {
    const [ps, models] = await Promise.all([api("/v1/pcrt/ps"), api("/v1/models")]);
    const rows = ps.models.map((m) => h("tr", { "data-model": m.name },
      h("td", null, h("strong", null, m.name), h("div", { class: "dim mono" }, m.model_sha256.slice(0, 12))),
      h("td", { class: "num" }, `${m.busy_slots} / ${m.parallel}`),
      h("td", { class: "num" }, count(m.queue_depth)),
      h("td", { class: "num" }, bytes(m.size_bytes)),
      h("td", { class: "num" }, bytes(m.kv_bytes)),
      h("td", { class: "num" }, count(m.context)),
      h("td", null, keepAliveLeft(m.expires_at)),
      h("td", null, h("button", { class: "danger", onclick: (event) => act(event.target, () => api("/v1/pcrt/stop", { method: "POST", body: { model: m.name } })) }, "Unload"))));
    loaded.replaceChildren(
      table([["model"], ["slots busy", "num"], ["queued", "num"], ["weights", "num"], ["KV cache", "num"], ["context / slot", "num"], ["keep-alive left"], [""]], rows,
        "No model is loaded; the first request for one loads it."),
      h("p", { class: "dim" }, `daemon memory (RSS): ${bytes(ps.process_rss_bytes)}`));
    const listed = models.data.map((m) => h("tr", { "data-model": m.id },
      h("td", null, m.id), h("td", null, m.owned_by || ""),
      h("td", null, ps.models.some((l) => l.name === m.id) ? "loaded" : "")));
    available.replaceChildren(table([["model"], ["from"], [""]], listed, "No models."));
  }, 2000);
}

// -- DAG runs -----------------------------------------------------------------------------

function runsView() {
  const list = h("section", { "data-section": "runs" });
  show(h("h1", null, "DAG runs"), list);
  return refreshing(async () => {
    const runs = await api("/v1/dags");
    const rows = runs.data.slice().reverse().map((run) => h("tr", { "data-run": run.id },
      h("td", null, h("a", { href: `#/runs/${encodeURIComponent(run.id)}`, class: "mono" }, run.id.slice(0, 12))),
      h("td", null, run.dag),
      h("td", null, statusBadge(run.status)),
      h("td", { class: "num" }, count(run.nodes_executed)),
      h("td", { class: "num" }, count(run.tokens_used)),
      h("td", null, when(run.created_at)),
      h("td", null, when(run.finished_at))));
    list.replaceChildren(table([["run"], ["DAG"], ["status"], ["nodes run", "num"], ["tokens", "num"], ["started"], ["finished"]], rows,
      "No runs yet: pcrt dag run FILE, or POST /v1/dags."));
  }, 3000);
}

function nodeDetails(record, calls) {
  if (!record) return h("p", { class: "dim" }, "Click a node for its facts and output.");
  const facts = [
    ["status", statusBadge(record.status)],
    ["type", record.type],
    ["model", record.model || "–"],
    ["ran on", record.ran_on || "–"],
    ["tokens", `prompt ${count(record.prompt_tokens)}, cached ${count(record.cached_tokens)}, completion ${count(record.completion_tokens)}`],
    ["time", seconds(record.seconds)],
    ["cache hit", record.cache_hit ? "yes: no inference" : "no"],
    ["checkpoint", record.checkpoint_tokens ? `${record.checkpoint_tokens} tokens` : "–"],
  ];
  if (record.resumed_from_checkpoint) facts.push(["resumed", "from its checkpoint"]);
  if (record.child_run_id) facts.push(["subgraph run", h("a", { href: `#/runs/${encodeURIComponent(record.child_run_id)}` }, record.child_run_id)]);
  if (record.routing && record.routing.reason) facts.push(["routed", record.routing.reason]);
  if (record.error) facts.push(["error", h("span", { class: "error" }, record.error)]);
  const output = record.output === null || record.output === undefined ? null
    : h("pre", { class: "mono", "data-output": record.node_id }, typeof record.output === "string" ? record.output : JSON.stringify(record.output, null, 2));
  const callRows = calls.map((c) => h("tr", null, h("td", { class: "num" }, c.step), h("td", { class: "mono" }, c.tool),
    h("td", null, c.status), h("td", { class: "num" }, seconds(c.seconds))));
  return h("div", { "data-details": record.node_id },
    h("h2", null, `Node ${record.node_id}`),
    h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", null, k), h("dd", null, v)])),
    calls.length ? [h("h2", null, "Tool calls"), table([["step", "num"], ["tool"], ["status"], ["time", "num"]], callRows, "")] : null,
    output ? [h("h2", null, "Output"), output] : null);
}

function runView(runId) {
  const id = decodeURIComponent(runId);
  const title = h("h1", null, "DAG run ", h("span", { class: "mono" }, id));
  const facts = h("div", { "data-section": "run-facts" });
  const picture = h("div", { class: "picture", "data-section": "graph" });
  const details = h("section", { "data-section": "node" });
  const resume = h("button", { "data-action": "resume" }, "Resume");
  const cancel = h("button", { class: "danger", "data-action": "cancel" }, "Cancel");
  const live = h("span", { class: "dim", "data-live": "" });
  show(title, facts, h("div", { class: "actions" }, resume, cancel, live), picture, details);

  let graph = null;
  let record = null;
  let picked = null;
  let stopped = false;
  let following = null;
  let poll = null;
  const streamed = new Map(); // node id -> tokens streamed while it runs
  let pending = null;

  const draw = () => {
    if (!graph || !record) return;
    facts.replaceChildren(h("dl", { class: "facts" },
      h("dt", null, "status"), h("dd", null, statusBadge(record.status), record.error ? h("span", { class: "error" }, ` ${record.error}`) : null),
      h("dt", null, "DAG"), h("dd", null, record.dag),
      h("dt", null, "nodes"), h("dd", null, `${record.nodes.filter((n) => n.status === "succeeded").length} of ${graph.nodes.length} done`),
      h("dt", null, "tokens"), h("dd", null, count(record.tokens_used)),
      h("dt", null, "started"), h("dd", null, when(record.created_at)),
      h("dt", null, "finished"), h("dd", null, when(record.finished_at)),
      record.migrated_to ? [h("dt", null, "moved to"), h("dd", null, record.migrated_to)] : null));
    picture.replaceChildren(graph.problem ? h("p", { class: "error" }, `This run's DAG cannot be drawn: ${graph.problem}`)
      : drawRun(graph, record, streamed, (node) => { picked = node; draw(); }, picked));
    const chosen = record.nodes.find((n) => n.node_id === picked);
    details.replaceChildren(nodeDetails(chosen, (record.tool_calls || []).filter((c) => c.node === picked)));
    resume.disabled = !RESUMABLE.has(record.status);
    cancel.disabled = !STOPPABLE.has(record.status);
    resume.textContent = record.status === "needs_attention" ? "Resume: send the call again" : "Resume";
  };

  const reload = async () => {
    record = await api(`/v1/dags/${encodeURIComponent(id)}`);
    for (const node of record.nodes) if (node.status !== "running") streamed.delete(node.node_id);
    draw();
    return record;
  };
  // node events come in bursts: one read of the run per burst
  const soon = () => {
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      try { await reload(); } catch (error) { problem(error); }
    }, 120);
  };
  let paint = null;
  const repaintTokens = () => {
    if (paint) return;
    paint = requestAnimationFrame(() => { paint = null; draw(); });
  };

  const watch = async () => {
    if (following || stopped) return;
    following = new AbortController();
    live.textContent = "live";
    try {
      await follow(`/v1/dags/${encodeURIComponent(id)}/events`, ({ event, data }) => {
        if (data.run !== id) return; // a subgraph's child run: its node shows as running here
        if (event === "token") {
          streamed.set(data.node, (streamed.get(data.node) || 0) + 1);
          repaintTokens();
        } else {
          soon();
        }
      }, following.signal);
    } catch (error) {
      if (error.name !== "AbortError") problem(error);
    } finally {
      following = null;
      live.textContent = "";
    }
    if (stopped) return;
    const now = await reload().catch((error) => { problem(error); return null; });
    // a run still running but not here (moved, or an older daemon's): poll it
    if (now && STOPPABLE.has(now.status) && !poll) poll = setInterval(() => reload().catch(problem), 2000);
  };

  resume.addEventListener("click", () => act(resume, async () => {
    const body = record && record.status === "needs_attention" ? { retry_call: true } : undefined;
    if (body && !window.confirm("Send the tool call that was in flight again? Skip it with pcrt dag resume --skip-call.")) return;
    await api(`/v1/dags/${encodeURIComponent(id)}/resume`, { method: "POST", body });
    await reload();
    watch();
  }));
  cancel.addEventListener("click", () => act(cancel, async () => {
    await api(`/v1/dags/${encodeURIComponent(id)}`, { method: "DELETE" });
    await reload();
  }));

  (async () => {
    try {
      [graph] = await Promise.all([api(`/v1/dags/${encodeURIComponent(id)}/graph`), reload()]);
      draw();
      problem(null);
      if (STOPPABLE.has(record.status)) watch();
    } catch (error) {
      problem(error);
    }
  })();
  return () => {
    stopped = true;
    if (following) following.abort();
    clearTimeout(pending);
    clearInterval(poll);
  };
}

// -- peers --------------------------------------------------------------------------------

function peersView() {
  const picture = h("section", { "data-section": "topology" });
  const list = h("section", { "data-section": "peers" });
  show(h("h1", null, "Peers"), picture, list);
  return refreshing(async () => {
    const { node, peers } = await api("/v1/pcrt/peers");
    picture.replaceChildren(topology(node, peers), h("p", { class: "dim" },
      `${node.name}: LAN discovery ${node.lan ? "on" : "off"}, cluster key ${node.cluster_key ? "set" : "not set"}`));
    const rows = peers.map((p) => h("tr", { "data-peer": p.name },
      h("td", null, h("strong", null, p.name), h("div", { class: "dim mono" }, p.url)),
      h("td", null, p.kind, h("div", { class: "dim" }, p.source)),
      h("td", null, p.trusted ? "trusted" : "not trusted", h("div", { class: "dim" }, p.trust || "")),
      h("td", null, statusBadge(p.health), p.in_rotation ? "" : h("div", { class: "dim" }, "out of rotation")),
      h("td", { class: "num" }, p.latency_ms === null ? "–" : `${p.latency_ms} ms`),
      h("td", null, Object.entries(p.tokens_per_s).map(([m, s]) => h("div", null, `${m}: ${Math.round(s)} tok/s`))),
      h("td", null, p.models.join(", ")),
      h("td", { class: "dim" }, p.last_error || "")));
    list.replaceChildren(table([["peer"], ["kind"], ["trust"], ["health"], ["latency", "num"], ["speed"], ["models"], ["last error"]], rows,
      "No peers: pcrt finds pcrt daemons on the LAN (mDNS) and reads static peers from its config."));
  }, 3000);
}

// -- usage --------------------------------------------------------------------------------

const WINDOWS = [["1 hour", 3600], ["24 hours", 86400], ["7 days", 7 * 86400], ["30 days", 30 * 86400]];

function usageView() {
  let windowS = 86400;
  const buttons = WINDOWS.map(([label, value]) => h("button", { "data-window": value }, label));
  const chart = h("section", { "data-section": "usage-chart" });
  const totals = h("section", { "data-section": "usage-totals" });
  show(h("h1", null, "Usage by agent"), h("div", { class: "actions windows" }, buttons), chart, h("h2", null, "Totals"), totals);
  const drawUsage = async () => {
    buttons.forEach((b) => b.classList.toggle("active", Number(b.dataset.window) === windowS));
    const data = await api(`/v1/pcrt/usage?window_s=${windowS}`);
    chart.replaceChildren(data.series.length ? usageChart(data) : h("p", { class: "empty" }, "Nothing was asked in this window."));
    const rows = data.totals.map((t) => h("tr", { "data-agent": t.agent },
      h("td", null, t.agent), h("td", null, t.model),
      h("td", { class: "num" }, count(t.requests)), h("td", { class: "num" }, count(t.errors)),
      h("td", { class: "num" }, count(t.prompt_tokens)), h("td", { class: "num" }, count(t.cached_tokens)),
      h("td", { class: "num" }, count(t.completion_tokens)), h("td", { class: "num" }, count(t.on_peers))));
    totals.replaceChildren(table([["agent"], ["model"], ["requests", "num"], ["errors", "num"], ["prompt", "num"], ["cached", "num"], ["completion", "num"], ["on peers", "num"]], rows, ""));
  };
  buttons.forEach((b) => b.addEventListener("click", () => {
    windowS = Number(b.dataset.window);
    drawUsage().catch(problem);
  }));
  return refreshing(drawUsage, 10000);
}

// -- KV store -------------------------------------------------------------------------------

function tier(name, used, limit, entries) {
  const share = limit ? Math.min(1, used / limit) : 0;
  const fillBar = h("span");
  fillBar.style.width = `${(share * 100).toFixed(1)}%`;
  return h("div", { class: "card", "data-tier": name },
    h("div", { class: "dim" }, `${name} tier`),
    h("div", { class: "big" }, bytes(used)),
    h("div", { class: "bar" }, fillBar),
    h("div", { class: "dim" }, `of ${bytes(limit)}, ${count(entries)} chunks`));
}

function cacheView() {
  const body = h("section", { "data-section": "cache" });
  show(h("h1", null, "KV store"), body);
  return refreshing(async () => {
    const cache = await api("/v1/pcrt/cache");
    if (!cache.enabled) {
      body.replaceChildren(h("p", { class: "empty" }, "The KV chunk store is off (kv_ram_bytes and kv_disk_bytes are 0)."));
      return;
    }
    const s = cache.store;
    const models = Object.entries(cache.models).map(([name, status]) => h("tr", null, h("td", null, name), h("td", null, String(status))));
    body.replaceChildren(
      h("div", { class: "cards" },
        tier("RAM", s.ram_bytes, s.ram_limit, s.ram_entries),
        tier("disk", s.disk_bytes, s.disk_limit, s.disk_entries),
        h("div", { class: "card", "data-stat": "hit-rate" }, h("div", { class: "dim" }, "hit rate"),
          h("div", { class: "big" }, `${(100 * (s.hit_rate || 0)).toFixed(1)} %`),
          h("div", { class: "dim" }, `${count(s.hits)} hits, ${count(s.misses)} misses`)),
        h("div", { class: "card" }, h("div", { class: "dim" }, "prompt tokens not computed"),
          h("div", { class: "big" }, count(s.tokens_saved)),
          h("div", { class: "dim" }, `${bytes(s.bytes_restored)} restored, ${count(s.pinned)} pinned, ${count(s.refused)} refused`))),
      h("h2", null, "Loaded models"),
      table([["model"], ["chunk store"]], models, "No model is loaded."));
  }, 3000);
}

// -- the router -----------------------------------------------------------------------------

const VIEWS = { models: modelsView, runs: runsView, peers: peersView, usage: usageView, cache: cacheView };

// The view the address names, drawn after the one before it stops.
function router() {
  let stop = null;
  return () => {
    if (stop) stop();
    problem(null);
    const [name, arg] = window.location.hash.replace(/^#\/?/, "").split("/");
    const chosen = name in VIEWS ? name : "models";
    document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === chosen));
    stop = chosen === "runs" && arg ? runView(arg) : VIEWS[chosen]();
  };
}

async function daemonLine() {
  const line = document.getElementById("daemon");
  try {
    const [ps, peers] = await Promise.all([api("/v1/pcrt/ps"), api("/v1/pcrt/peers")]);
    line.textContent = `${peers.node.name} · ${ps.state}`;
  } catch {
    line.textContent = "not answering";
  }
}

const route = router();
window.addEventListener("hashchange", route);
route();
daemonLine();
setInterval(daemonLine, 5000);
