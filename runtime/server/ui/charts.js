// The usage chart (tokens per agent over time, stacked bars) and the peers' topology
// (this node in the middle, each peer on a ring, its link coloured by health), as SVG.
import { count, h, svg } from "./dom.js";

const PALETTE = ["#2f6fd0", "#2e9d55", "#e08a00", "#a64fb6", "#1f9fbf", "#d04646", "#7a8b2f", "#c45d9a"];

export function colourOf(index) {
  return PALETTE[index % PALETTE.length];
}

// a bucket's start: its time within an hour's window, its day and time beyond; buckets of
// a day or more start at midnight UTC (the daemon's), so they are labelled in UTC
function clock(unix, windowS, bucket) {
  const date = new Date(unix * 1000);
  const time = { hour: "2-digit", minute: "2-digit" };
  if (bucket >= 86400) return `${date.toLocaleDateString([], { month: "short", day: "numeric", timeZone: "UTC" })} UTC`;
  return windowS <= 3600 ? date.toLocaleTimeString([], time) : date.toLocaleString([], { month: "short", day: "numeric", ...time });
}

// data: GET /v1/pcrt/usage. Each bar is one bucket: prompt + completion tokens, one band
// per agent.
export function usageChart(data) {
  const width = 900;
  const height = 260;
  const left = 64;
  const bottom = 28;
  const bucket = data.bucket_s;
  const first = Math.floor((data.now - data.window_s) / bucket) * bucket;
  const buckets = [];
  for (let start = first; start <= data.now; start += bucket) buckets.push(start);
  const agents = [...new Set(data.series.map((row) => row.agent))].sort();
  const totals = new Map();
  for (const row of data.series) {
    const key = `${row.start}|${row.agent}`;
    totals.set(key, (totals.get(key) || 0) + row.prompt_tokens + row.completion_tokens);
  }
  const stackOf = (start) => agents.reduce((sum, agent) => sum + (totals.get(`${start}|${agent}`) || 0), 0);
  const top = Math.max(1, ...buckets.map(stackOf));
  const plotW = width - left - 10;
  const plotH = height - bottom - 10;
  const barW = plotW / buckets.length;
  const chart = svg("svg", { width: "100%", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "tokens per agent over time", "data-chart": "usage" });
  chart.append(svg("line", { class: "axis", x1: left, y1: 10 + plotH, x2: width - 10, y2: 10 + plotH }));
  chart.append(svg("line", { class: "axis", x1: left, y1: 10, x2: left, y2: 10 + plotH }));
  chart.append(svg("text", { x: left - 6, y: 16, "text-anchor": "end" }, count(top)));
  chart.append(svg("text", { x: left - 6, y: 10 + plotH, "text-anchor": "end" }, "0"));
  chart.append(svg("text", { x: left, y: height - 6 }, clock(first, data.window_s, bucket)));
  chart.append(svg("text", { x: width - 10, y: height - 6, "text-anchor": "end" }, clock(data.now, data.window_s, bucket)));
  buckets.forEach((start, i) => {
    let y = 10 + plotH;
    agents.forEach((agent, a) => {
      const value = totals.get(`${start}|${agent}`) || 0;
      if (!value) return;
      const tall = (value / top) * plotH;
      y -= tall;
      chart.append(svg("rect", {
        x: left + i * barW + 1, y, width: Math.max(1, barW - 2), height: tall, fill: colourOf(a), "data-agent": agent,
      }, svg("title", null, `${agent}: ${count(value)} tokens from ${clock(start, data.window_s, bucket)}`)));
    });
  });
  const legend = h("div", { class: "legend" }, agents.map((agent, a) => h("span", null, h("i", { "data-colour": a }), agent)));
  // colours come from the palette by index; set as properties (no inline style attribute:
  // the page's policy forbids those)
  legend.querySelectorAll("i").forEach((mark) => { mark.style.background = colourOf(Number(mark.dataset.colour)); });
  return h("div", { class: "picture" }, chart, legend);
}

function bestSpeed(peer) {
  const speeds = Object.values(peer.tokens_per_s || {});
  return speeds.length ? `${Math.round(Math.max(...speeds))} tok/s` : "";
}

// node: the "node" of GET /v1/pcrt/peers; peers: its "peers".
export function topology(node, peers) {
  const width = 640;
  const height = peers.length ? 380 : 160;
  const cx = width / 2;
  const cy = height / 2;
  const ring = Math.min(cx, cy) - 60;
  const picture = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "peers", "data-chart": "topology" });
  const spots = peers.map((_, i) => {
    const angle = (2 * Math.PI * i) / peers.length - Math.PI / 2;
    return { x: cx + ring * Math.cos(angle), y: cy + ring * Math.sin(angle) };
  });
  peers.forEach((peer, i) => {
    const { x, y } = spots[i];
    picture.append(svg("line", { class: `link ${peer.health}`, x1: cx, y1: cy, x2: x, y2: y }));
    if (peer.latency_ms !== null) {
      picture.append(svg("text", { x: (cx + x) / 2 + 6, y: (cy + y) / 2 - 4, class: "dim" }, `${peer.latency_ms} ms`));
    }
  });
  picture.append(svg("g", { class: "peer self", "data-peer": node.name },
    svg("circle", { cx, cy, r: 34 }),
    svg("text", { x: cx, y: cy + 4, "text-anchor": "middle", "font-weight": 700 }, node.name.length > 12 ? `${node.name.slice(0, 11)}…` : node.name)));
  peers.forEach((peer, i) => {
    const { x, y } = spots[i];
    picture.append(svg("g", { class: `peer ${peer.trusted ? "trusted" : "untrusted"}`, "data-peer": peer.name },
      svg("title", null, `${peer.name} (${peer.kind}, ${peer.trusted ? "trusted" : "not trusted"}): ${peer.health}\n${peer.url}`),
      svg("circle", { cx: x, cy: y, r: 26 }),
      svg("text", { x, y: y + 4, "text-anchor": "middle" }, peer.name.length > 10 ? `${peer.name.slice(0, 9)}…` : peer.name),
      svg("text", { x, y: y + 42, "text-anchor": "middle", class: "dim" }, bestSpeed(peer))));
  });
  if (!peers.length) {
    picture.append(svg("text", { x: cx, y: cy + 56, "text-anchor": "middle", class: "dim" }, "no peers yet"));
  }
  return h("div", { class: "picture" }, picture);
}
