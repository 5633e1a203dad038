// The dashboard's views and the router among them (#/models, #/runs, #/runs/ID, #/peers,
// #/usage, #/cache). Each view draws into <main>, refreshes itself, and returns the
// function that stops it when another view opens.
import { api, ApiError, forgetKey, read, savedKey, subscribe } from "./api.js";
import { topology, usageChart } from "./charts.js";
import { bytes, count, h, seconds, statusBadge, table, when } from "./dom.js";
import { drawRun, factsOf } from "./graph.js";

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

// Calls draw() now and every `every` ms (a number, or a function that says it each
// time) until stopped; a failure shows in the banner.
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
    if (!stopped) timer = setTimeout(tick, typeof every === "function" ? every() : every);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

// A button's action, the button disabled meanwhile; then `settle` (by default: enabled
// again; a view whose drawing decides which buttons apply passes its draw)
async function act(button, call, settle = () => { button.disabled = false; }) {
  button.disabled = true;
  try {
    await call();
    problem(null);
  } catch (error) {
    problem(error);
  } finally {
    settle();
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
    // newest first, as the daemon lists them
    const rows = runs.data.map((run) => h("tr", { "data-run": run.id },
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

// a run whose state may still change without anyone asking (it runs, waits, or moves)
const MOVING = new Set(["pending", "running", "migrating"]);

function runView(runId) {
  let id;
  try {
    id = decodeURIComponent(runId);
  } catch {
    id = runId;
  }
  const title = h("h1", null, "DAG run ", h("span", { class: "mono" }, id));
  const facts = h("div", { "data-section": "run-facts" });
  const picture = h("div", { class: "picture", "data-section": "graph" });
  const details = h("section", { "data-section": "node" });
  const resume = h("button", { "data-action": "resume" }, "Resume");
  const cancel = h("button", { class: "danger", "data-action": "cancel" }, "Cancel");
  const live = h("span", { class: "dim", "data-live": "" });
  show(title, facts, h("div", { class: "actions" }, resume, cancel, live), picture, details);
  const path = `/v1/dags/${encodeURIComponent(id)}`;

  let graph = null;
  let record = null;
  let picked = null;
  let stopped = false;
  let following = null;
  let timer = null;
  // what the events said of a node since the record last changed: the record lags them
  // (a node is announced before its record says running, and a reload can race either)
  const told = new Map(); // node id -> {status, then: the record's status when told}
  const streamed = new Map(); // node id -> tokens streamed while it runs

  const recordOf = (nodeId) => (record ? record.nodes.find((n) => n.node_id === nodeId) : null);
  const statusOf = (node) => {
    const heard = told.get(node.node_id);
    if (heard && heard.then === node.status) return heard.status;
    told.delete(node.node_id); // the record moved on: it knows better now
    return node.status;
  };
  const hear = (nodeId, status) => {
    const node = recordOf(nodeId);
    const heard = told.get(nodeId);
    told.set(nodeId, { status, then: heard ? heard.then : node ? node.status : "pending" });
  };
  const shown = () => ({ ...record, nodes: record.nodes.map((n) => ({ ...n, status: statusOf(n) })) });

  const draw = () => {
    if (!graph || !record) return;
    const view = shown();
    facts.replaceChildren(h("dl", { class: "facts" },
      h("dt", null, "status"), h("dd", null, statusBadge(view.status), view.error ? h("span", { class: "error" }, ` ${view.error}`) : null),
      h("dt", null, "DAG"), h("dd", null, view.dag),
      h("dt", null, "nodes"), h("dd", null, `${view.nodes.filter((n) => n.status === "succeeded").length} of ${graph.nodes.length} done`),
      h("dt", null, "tokens"), h("dd", null, count(view.tokens_used)),
      h("dt", null, "started"), h("dd", null, when(view.created_at)),
      h("dt", null, "finished"), h("dd", null, when(view.finished_at)),
      view.migrated_to ? [h("dt", null, "moved to"), h("dd", null, view.migrated_to)] : null));
    picture.replaceChildren(graph.problem ? h("p", { class: "error" }, `This run's DAG cannot be drawn: ${graph.problem}`)
      : drawRun(graph, view, streamed, (node) => { picked = node; draw(); }, picked));
    const chosen = view.nodes.find((n) => n.node_id === picked);
    details.replaceChildren(nodeDetails(chosen, (view.tool_calls || []).filter((c) => c.node === picked)));
    resume.disabled = !RESUMABLE.has(view.status);
    cancel.disabled = !STOPPABLE.has(view.status);
    resume.textContent = view.status === "needs_attention" ? "Resume: send the call again" : "Resume";
  };
  // a token changes one line of one box: that line alone, unless the box must change too
  const drawTokens = (nodeId) => {
    const line = picture.querySelector(`[data-facts="${CSS.escape(nodeId)}"]`);
    const node = recordOf(nodeId);
    if (!line || !node || line.closest("g").dataset.status !== statusOf(node)) {
      draw();
      return;
    }
    const calls = (record.tool_calls || []).filter((c) => c.node === nodeId).length;
    line.textContent = factsOf({ ...node, status: statusOf(node) }, streamed.get(nodeId), calls);
  };

  // one read of the run at a time; one more after it if anything happened meanwhile
  let reading = null;
  let again = false;
  const reload = () => {
    if (reading) {
      again = true;
      return reading;
    }
    reading = (async () => {
      try {
        do {
          again = false;
          record = await api(path);
          for (const node of record.nodes) if (node.status !== "running" && !told.has(node.node_id)) streamed.delete(node.node_id);
          draw();
        } while (again && !stopped);
        return record;
      } finally {
        reading = null;
      }
    })();
    return reading;
  };
  let soonTimer = null;
  const soon = () => {
    if (soonTimer) return;
    soonTimer = setTimeout(() => {
      soonTimer = null;
      reload().catch(problem);
    }, 120);
  };

  const onEvent = ({ event, data }) => {
    if (data.run !== id || !data.node) {
      if (event === "run_finished") soon();
      return; // a subgraph's child run: its node shows as running here
    }
    if (event === "token") {
      streamed.set(data.node, (streamed.get(data.node) || 0) + 1);
      // a token of a node shown pending means its start was missed; one that comes
      // after the node stopped (a batch in flight when the run was cancelled) changes
      // nothing but the count
      const node = recordOf(data.node);
      if (!node || statusOf(node) === "pending") hear(data.node, "running");
      drawTokens(data.node);
      return;
    }
    if (event === "node_started") {
      streamed.delete(data.node);
      hear(data.node, "running");
    } else if (event === "node_finished" && data.status) {
      hear(data.node, data.status);
    }
    draw();
    soon();
  };

  // Follow the run while it runs here; otherwise read it now and then while it may still
  // change (it waits, moves, or the daemon is away), following again once it runs.
  let watched = 0; // when the page last began following
  const watch = async () => {
    if (following || stopped) return;
    watched = Date.now();
    following = new AbortController();
    live.textContent = "live";
    let ended = true;
    try {
      const reader = await subscribe(`${path}/events`, following.signal);
      await reload(); // after subscribing: nothing falls between the read and the stream
      await read(reader, onEvent);
    } catch (error) {
      ended = false;
      if (error.name !== "AbortError") problem(error);
    } finally {
      following = null;
      live.textContent = "";
    }
    if (!stopped) keepUp(ended ? 0 : 1000);
  };
  const keepUp = (wait) => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      let next = null;
      try {
        const now = await reload();
        problem(null);
        // running: follow it, unless a stream just ended on it (a run the store says is
        // running but that does not execute here): then read it now and then instead
        if (now.status === "running" && Date.now() - watched > 2000) {
          watch();
          return;
        }
        if (MOVING.has(now.status)) next = 2000;
      } catch (error) {
        problem(error);
        next = Math.min(10000, Math.max(1000, wait * 2)); // the daemon is away: back off
      }
      if (next !== null && !stopped) keepUp(next);
    }, wait);
  };

  resume.addEventListener("click", () => act(resume, async () => {
    const body = record && record.status === "needs_attention" ? { retry_call: true } : undefined;
    if (body && !window.confirm("Send the tool call that was in flight again? Skip it with pcrt dag resume --skip-call.")) return;
    await api(`${path}/resume`, { method: "POST", body });
    watch(); // it runs here from the moment the answer came: its events are to come
  }, draw));
  cancel.addEventListener("click", () => act(cancel, async () => {
    await api(path, { method: "DELETE" });
    await reload();
  }, draw));

  (async () => {
    try {
      graph = await api(`${path}/graph`);
      await reload();
      problem(null);
      if (MOVING.has(record.status)) keepUp(0);
    } catch (error) {
      problem(error);
    }
  })();
  return () => {
    stopped = true;
    if (following) following.abort();
    clearTimeout(soonTimer);
    clearTimeout(timer);
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
  let asked = 0; // the newest read wins: a window chosen mid-read is not drawn over
  const drawUsage = async () => {
    buttons.forEach((b) => b.classList.toggle("active", Number(b.dataset.window) === windowS));
    const mine = ++asked;
    const data = await api(`/v1/pcrt/usage?window_s=${windowS}`);
    if (mine !== asked) return;
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
  // buckets of 30 minutes and more change slowly; each read scans the window's rows
  return refreshing(drawUsage, () => (windowS <= 3600 ? 15000 : 60000));
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
    const chosen = Object.hasOwn(VIEWS, name) ? name : "models";
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
const logout = document.getElementById("logout");
logout.hidden = !savedKey();
logout.addEventListener("click", async () => {
  await api("/ui/logout", { method: "POST" }).catch(() => null); // the cookie goes too
  forgetKey();
  window.location.assign("/ui/login");
});
daemonLine();
setInterval(daemonLine, 5000);
