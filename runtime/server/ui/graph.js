// A DAG run as SVG: the graph's layers as columns (each node right of what it waits
// for), one box per node coloured by its status, with its tokens, time and where it ran.
import { svg } from "./dom.js";

const BOX_W = 200;
const BOX_H = 66;
const GAP_X = 70;
const GAP_Y = 22;
const PAD = 20;
const TOP = 48; // room above the first row for the arcs of edges that skip a layer

function place(graph) {
  const columns = new Map();
  for (const node of graph.nodes) {
    if (!columns.has(node.layer)) columns.set(node.layer, []);
    columns.get(node.layer).push(node);
  }
  const spot = new Map();
  let tallest = 0;
  for (const [layer, nodes] of columns) {
    nodes.forEach((node, row) => {
      spot.set(node.id, { x: PAD + layer * (BOX_W + GAP_X), y: TOP + row * (BOX_H + GAP_Y), layer });
    });
    tallest = Math.max(tallest, nodes.length);
  }
  const width = PAD * 2 + Math.max(1, columns.size) * (BOX_W + GAP_X) - GAP_X;
  const height = TOP + PAD + Math.max(1, tallest) * (BOX_H + GAP_Y) - GAP_Y;
  return { spot, width, height };
}

function tokensOf(record, live) {
  if (record.status === "running") {
    // streamed since this page opened, or the last checkpoint's count if that is more
    // (a page opened mid-node, a node resumed from its checkpoint)
    const soFar = Math.max(live || 0, record.checkpoint_tokens || 0);
    return soFar ? `${soFar} tokens so far` : "generating";
  }
  const total = (record.prompt_tokens || 0) + (record.completion_tokens || 0);
  if (record.cache_hit) return "cache hit";
  return record.prompt_tokens === null && record.completion_tokens === null ? "" : `${total} tokens`;
}

export function factsOf(record, live, calls) {
  const facts = [tokensOf(record, live)];
  if (record.seconds !== null && record.seconds !== undefined) facts.push(`${record.seconds.toFixed(1)} s`);
  if (record.ran_on) facts.push(record.ran_on);
  if (calls) facts.push(`${calls} call${calls === 1 ? "" : "s"}`);
  return facts.filter(Boolean).join(" · ");
}

function tooltip(node, record) {
  const lines = [`${node.id} (${node.type}): ${record.status}`];
  if (node.model || record.model) lines.push(`model: ${record.model || node.model}`);
  if (record.prompt_tokens !== null) {
    lines.push(`prompt ${record.prompt_tokens}, cached ${record.cached_tokens || 0}, completion ${record.completion_tokens || 0}`);
  }
  if (record.resumed_from_checkpoint) lines.push("resumed from its checkpoint");
  if (record.error) lines.push(`error: ${record.error}`);
  return lines.join("\n");
}

// graph: GET /v1/dags/ID/graph; view: GET /v1/dags/ID; live: node id -> tokens streamed
// so far; pick(id) is called when a node is clicked.
export function drawRun(graph, view, live, pick, picked) {
  const { spot, width, height } = place(graph);
  const records = new Map(view.nodes.map((n) => [n.node_id, n]));
  const calls = new Map();
  for (const call of view.tool_calls || []) calls.set(call.node, (calls.get(call.node) || 0) + 1);
  const picture = svg("svg", {
    width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `DAG run ${view.id}`, "data-run": view.id,
  });
  picture.append(svg("defs", null, svg("marker", {
    id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse",
  }, svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "currentColor", class: "dim" }))));
  for (const [from, to] of graph.edges) {
    const a = spot.get(from);
    const b = spot.get(to);
    if (!a || !b) continue;
    let d;
    if (b.layer - a.layer > 1) {
      // past the boxes between: out of the top of one, over them, into the top of the other
      const x1 = a.x + BOX_W - 24;
      const x2 = b.x + 24;
      d = `M ${x1} ${a.y} C ${x1} ${-8}, ${x2} ${-8}, ${x2} ${b.y}`;
    } else {
      const x1 = a.x + BOX_W;
      const y1 = a.y + BOX_H / 2;
      const x2 = b.x;
      const y2 = b.y + BOX_H / 2;
      const bend = Math.max(30, (x2 - x1) / 2);
      d = `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}`;
    }
    picture.append(svg("path", { class: "edge", d, "marker-end": "url(#arrow)", "data-edge": `${from}->${to}` }));
  }
  for (const node of graph.nodes) {
    const record = records.get(node.id) || { status: "pending", prompt_tokens: null, completion_tokens: null };
    const { x, y } = spot.get(node.id);
    const box = svg("g", {
      class: `node status-${record.status}${picked === node.id ? " picked" : ""}`,
      "data-node": node.id, "data-status": record.status, tabindex: 0, role: "button",
      transform: `translate(${x} ${y})`,
      onclick: () => pick(node.id),
      onkeydown: (event) => { if (event.key === "Enter") pick(node.id); },
    },
    svg("title", null, tooltip(node, record)),
    svg("rect", { width: BOX_W, height: BOX_H, rx: 8, ry: 8, "stroke-width": picked === node.id ? 3 : 1 }),
    svg("text", { x: 10, y: 20, "font-weight": 700 }, node.id.length > 26 ? `${node.id.slice(0, 25)}…` : node.id),
    svg("text", { x: 10, y: 38, class: "sub" }, `${node.type} · ${record.status.replace("_", " ")}`),
    svg("text", { x: 10, y: 55, class: "sub", "data-facts": node.id }, factsOf(record, live.get(node.id), calls.get(node.id))));
    picture.append(box);
  }
  return picture;
}
