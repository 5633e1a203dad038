"""A DAG as the data of a picture: its nodes in layers, each to the right of every node it
waits for, and its edges. Pure; the dashboard draws it (``GET /v1/dags/{id}/graph``).

A node's layer is the length of the longest chain of nodes it waits for, so edges only
point rightwards; within a layer nodes keep the document's order. A stored run's DAG was
validated (no cycles), but a cycle is drawn rather than refused: its nodes stay where
the walk that found it put them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pcrt.runtime.dag.load import parse_dag
from pcrt.runtime.dag.spec import DagSpec
from pcrt.runtime.dag.validate import dependencies
from pcrt.runtime.errors import DagInvalid, ShapeInvalid

__all__ = ["dag_graph", "layers_of"]


def dag_graph(document: Mapping[str, Any]) -> dict[str, Any]:
    """``{"nodes": [{"id", "type", "model", "layer"}], "edges": [[from, to]]}`` of a DAG
    document (a run's ``spec``); of one with malformed nodes, the part that parsed and
    the malformed nodes' edges; of one that does not parse at all (a stored run that a
    later pcrt reads differently), no nodes and the ``problem``."""
    try:
        spec = parse_dag(dict(document))
    except ShapeInvalid as exc:
        spec = exc.partial
    except DagInvalid as exc:
        return {"nodes": [], "edges": [], "problem": str(exc)}
    deps = dependencies(spec)
    layer = layers_of(deps)
    nodes = [
        {
            "id": node_id,
            "type": _type_of(spec, node_id),
            "model": _model_of(spec, node_id),
            "layer": layer[node_id],
        }
        for node_id in deps
    ]
    edges = [[before, node_id] for node_id, wanted in deps.items() for before in sorted(wanted)]
    return {"nodes": nodes, "edges": edges}


def layers_of(deps: Mapping[str, set[str]]) -> dict[str, int]:
    """Each node's layer: 0 for a node that waits for none, else one more than the
    deepest node it waits for. Iterative (a chain of 10,000 nodes is no recursion)."""
    layer: dict[str, int] = {}
    for root in deps:
        if root in layer:
            continue
        stack: list[tuple[str, bool]] = [(root, False)]
        on_path: set[str] = set()
        while stack:
            node, expanded = stack.pop()
            if expanded:
                on_path.discard(node)
                wanted = [d for d in deps[node] if d in layer]
                layer[node] = 1 + max((layer[d] for d in wanted), default=-1)
                continue
            if node in layer or node in on_path:
                continue  # done, or a cycle's back edge: drawn, not followed
            on_path.add(node)
            stack.append((node, True))
            stack.extend((d, False) for d in deps[node] if d not in layer and d in deps)
    return layer


def _type_of(spec: DagSpec, node_id: str) -> str:
    node = spec.nodes.get(node_id)
    if node is not None:
        return str(node.type)
    raw = spec.rejected.get(node_id)
    kind = raw.get("type") if isinstance(raw, Mapping) else None
    return kind if isinstance(kind, str) else "unknown"


def _model_of(spec: DagSpec, node_id: str) -> str | None:
    model = getattr(spec.nodes.get(node_id), "model", None)
    return model if isinstance(model, str) else None
