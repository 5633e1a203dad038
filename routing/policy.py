"""The routing policy: where a piece of work runs, here or on a peer.

A piece of work is an HTTP generation request or a DAG node (or a whole subgraph). The
answer is a ``Decision``: an ordered list of candidates (the first is the choice, the rest
are fallbacks the caller tries when a forward fails before the first token), the nodes that
were filtered out with a reason each, and one line explaining the choice.

Everything here is pure: plain frozen dataclasses in, a frozen dataclass out, no I/O, no
clock, no other pcrt module. The peer table and the local device monitor build the
``NodeView`` snapshots; this module only judges them, so every rule is tested on synthetic
tables and a decision can be replayed from the inputs it was made from.

How a decision is made::

    every node ──hard filters──> qualifying (node, model, est. seconds)
                     │                         │
                     └─> rejected + reason     └─score─> ordered candidates + reason

Hard filters, in order (the first that fails is the reason): the route hint, the peer kinds
the work allows, trust (the cluster key), health (cooldown), a model matching the wanted
name, alias or tag, the context window, memory (local only, for a model not yet loaded) and
the caller's timeout against the estimated time.

Scores are effective costs in seconds, lower is better, built on ``estimate_seconds``:

- complexity "low" or unset: simple work stays local, so a peer's cost is its estimate
  times ``local_preference``: a peer wins only when clearly faster, not when a network hop
  makes it barely faster on paper.
- complexity "medium": plain estimates.
- complexity "high": the strongest model matters more than speed, so peers come first,
  strongest model first (unknown strength is weakest), then by score; local is the last
  resort. Here the order is not by score alone.
- on battery below the threshold, the local cost is multiplied by ``battery_penalty``: a
  laptop at 12% hands work to a plugged-in peer unless it is much slower.

Fallback order keeps local last where it can: a failed forward to the chosen peer goes to
the next peer, and local only after every peer, since the policy already judged it worse.
When local is the choice, the peers follow by score. Ties go to local (no network hop),
then to the node name, so the same inputs always give the same order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pcrt.device.units import format_bytes

__all__ = [
    "Candidate",
    "Complexity",
    "Decision",
    "Kind",
    "ModelOffer",
    "NodeView",
    "PolicySettings",
    "Route",
    "Work",
    "decide",
    "estimate_seconds",
    "match_model",
]

Kind = Literal["local", "pcrt", "vllm", "openai"]
Complexity = Literal["low", "medium", "high"]
Route = Literal["local", "peer", "auto"]


@dataclass(frozen=True)
class ModelOffer:
    """A model one node can run, with what the node knows about it."""

    name: str
    sha256: str | None = None
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    context: int | None = None  # max context tokens; None = unknown (don't filter)
    size_bytes: int | None = None  # file/weights size; for the memory check on local
    strength: float | None = None  # billions of parameters, or any larger-is-stronger number
    tokens_per_s: float | None = None  # measured decode speed; None = unknown
    prefill_tokens_per_s: float | None = None
    loaded: bool = False


@dataclass(frozen=True)
class NodeView:
    """The local node or one peer, as the policy sees it at one moment."""

    name: str
    kind: Kind
    models: tuple[ModelOffer, ...]
    trusted: bool = True
    healthy: bool = True
    queue_depth: int = 0  # requests waiting
    slots: int = 1  # parallel sequences
    latency_s: float = 0.0  # network round trip (0 for local)
    on_battery: bool = False
    battery_percent: float | None = None
    available_memory: int | None = None  # bytes; only meaningful for local (None = don't check)
    tools: frozenset[str] = frozenset()  # the tools registered there, by name
    idempotent_tools: frozenset[str] = frozenset()  # of those, the ones safe to send twice


@dataclass(frozen=True)
class Work:
    """What is to be run, as far as routing cares."""

    model: str | None = None  # wanted model name or alias
    tag: str | None = None  # or wanted tag (e.g. "simple", "complex")
    prompt_tokens: int = 0
    max_tokens: int = 256
    has_schema: bool = False  # carried for callers and logs; no rule depends on it yet
    complexity: Complexity | None = None
    route: Route = "auto"
    timeout_s: float | None = None
    # which peer kinds may take it: a whole DAG subgraph can only go to another pcrt daemon
    peer_kinds: frozenset[str] = frozenset({"pcrt", "vllm", "openai"})


@dataclass(frozen=True)
class PolicySettings:
    battery_threshold: float = 30.0  # percent; on battery below it, prefer peers
    default_tokens_per_s: float = 20.0  # decode speed assumed when unknown
    default_prefill_tokens_per_s: float = 200.0
    local_preference: float = 1.5  # low/unset complexity: a peer must be this much faster
    battery_penalty: float = 4.0  # local cost multiplier on battery below the threshold


@dataclass(frozen=True)
class Candidate:
    node: str  # NodeView.name
    kind: Kind  # "local" for the local node, whatever kind its view carried
    model: str  # the model's name ON THAT NODE (resolved from name/alias/tag)
    est_seconds: float
    score: float  # effective cost, lower is better
    why: str  # short human reason, e.g. "smollm2-135m, est. 2.1 s, queue 0"
    tools: frozenset[str] = frozenset()  # the tools registered on that node
    idempotent_tools: frozenset[str] = frozenset()  # of those, the ones safe to send twice


@dataclass(frozen=True)
class Decision:
    candidates: tuple[Candidate, ...]  # first is the choice, the rest are fallbacks in order
    rejected: tuple[tuple[str, str], ...]  # (node name, reason) for each node filtered out
    reason: str  # one line: the choice against the alternatives

    @property
    def chosen(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    @property
    def is_local(self) -> bool:
        chosen = self.chosen
        return chosen is not None and chosen.kind == "local"


def _offer_preference(offer: ModelOffer) -> tuple[bool, float, float, str]:
    """Sort key among several matching offers: loaded, then strongest, then fastest.

    A loaded model answers without a load; unknown strength or speed ranks below any known
    number; the name keeps the choice deterministic.
    """
    strength = -offer.strength if offer.strength is not None else math.inf
    speed = -offer.tokens_per_s if offer.tokens_per_s is not None else math.inf
    return (not offer.loaded, strength, speed, offer.name)


def match_model(node: NodeView, work: Work) -> ModelOffer | None:
    """The node's model for this work: by exact name, else alias, else tag.

    A name beats an alias (a model named like another model's alias is what was asked for).
    Several offers matching the same alias or tag are ranked loaded, strongest, fastest.
    Work naming neither a model nor a tag takes the node's best offer by the same ranking.
    """
    if work.model is not None:
        for offer in sorted(node.models, key=_offer_preference):
            if offer.name == work.model:
                return offer
        by_alias = [o for o in node.models if work.model in o.aliases]
        if by_alias:
            return min(by_alias, key=_offer_preference)
    if work.tag is not None:
        tagged = [o for o in node.models if work.tag in o.tags]
        return min(tagged, key=_offer_preference) if tagged else None
    if work.model is None and node.models:
        return min(node.models, key=_offer_preference)
    return None


def _rate(measured: float | None, default: float) -> float:
    # a zero or negative measurement is a broken probe, not an infinitely slow node
    return measured if measured is not None and measured > 0 else default


def estimate_seconds(
    node: NodeView, offer: ModelOffer, work: Work, settings: PolicySettings
) -> float:
    """Predicted wall time from sending the work to its last token.

    The network round trip, plus the wait for a slot (each queued request is assumed to be
    as long as this one, spread over the node's slots), plus prefill and decode.
    """
    tps = _rate(offer.tokens_per_s, settings.default_tokens_per_s)
    prefill_tps = _rate(offer.prefill_tokens_per_s, settings.default_prefill_tokens_per_s)
    decode = work.max_tokens / tps
    queue_wait = max(0, node.queue_depth) / max(1, node.slots) * decode
    prefill = work.prompt_tokens / prefill_tps
    return max(0.0, node.latency_s) + queue_wait + prefill + decode


def _missing_model(work: Work) -> str:
    if work.model is not None and work.tag is not None:
        return f"no such model {work.model} or model tagged {work.tag}"
    if work.model is not None:
        return f"no such model {work.model}"
    if work.tag is not None:
        return f"no model tagged {work.tag}"
    return "no models"


@dataclass(frozen=True)
class _Option:
    """A node that passed every filter, with its resolved model and costs."""

    node: NodeView
    offer: ModelOffer
    est: float
    score: float
    is_local: bool


def _check(
    node: NodeView, is_local: bool, work: Work, settings: PolicySettings
) -> tuple[ModelOffer, float] | str:
    """The node's model and estimate if it passes the hard filters, else why not."""
    if work.route == "local" and not is_local:
        return "route hint: local only"
    if work.route == "peer" and is_local:
        return "route hint: peer only"
    if not is_local and node.kind not in work.peer_kinds:
        allowed = ", ".join(sorted(work.peer_kinds)) or "none"
        return f"kind {node.kind} cannot take this work (allowed: {allowed})"
    if not node.trusted:
        return "untrusted: cluster key not proven"
    if not node.healthy:
        return "unhealthy: in cooldown"
    offer = match_model(node, work)
    if offer is None:
        return _missing_model(work)
    needed = work.prompt_tokens + work.max_tokens
    if offer.context is not None and needed > offer.context:
        return (
            f"context of {offer.name} is {offer.context} tokens, "
            f"needs {work.prompt_tokens} + {work.max_tokens}"
        )
    # only a model that still has to be loaded needs free memory; a peer manages its own
    if (
        is_local
        and not offer.loaded
        and offer.size_bytes is not None
        and node.available_memory is not None
        and offer.size_bytes > node.available_memory
    ):
        return (
            f"not enough memory: {offer.name} needs {format_bytes(offer.size_bytes)}, "
            f"{format_bytes(node.available_memory)} free"
        )
    est = estimate_seconds(node, offer, work, settings)
    if work.timeout_s is not None and est > work.timeout_s:
        return f"est. {est:.1f} s over the {work.timeout_s:g} s timeout"
    return offer, est


def _low_battery(node: NodeView, settings: PolicySettings) -> bool:
    return (
        node.on_battery
        and node.battery_percent is not None
        and node.battery_percent < settings.battery_threshold
    )


def _score(
    node: NodeView, est: float, is_local: bool, work: Work, settings: PolicySettings
) -> float:
    if is_local:
        return est * settings.battery_penalty if _low_battery(node, settings) else est
    if work.complexity in (None, "low"):
        return est * settings.local_preference
    return est


def _order_key(option: _Option, work: Work) -> tuple[bool, float, float, bool, str]:
    # local before a peer of equal score: the same cost without a network hop
    tail = (option.score, not option.is_local, option.node.name)
    if work.complexity == "high":
        strength = option.offer.strength
        return (option.is_local, -strength if strength is not None else math.inf, *tail)
    return (False, 0.0, *tail)


def _label(option: _Option) -> str:
    return "local" if option.is_local else f"peer {option.node.name}"


def _describe(option: _Option) -> str:
    return f"{_label(option)}: {option.offer.name}, est. {option.est:.1f} s"


def _why(option: _Option, settings: PolicySettings) -> str:
    why = f"{option.offer.name}, est. {option.est:.1f} s, queue {option.node.queue_depth}"
    if option.is_local and _low_battery(option.node, settings):
        why += f", on battery at {option.node.battery_percent:g}%"
    return why


def _reason(
    chosen: _Option,
    ordered: list[_Option],
    local_rejection: str | None,
    peer_rejections: list[tuple[str, str]],
    work: Work,
    settings: PolicySettings,
) -> str:
    local_option = next((o for o in ordered if o.is_local), None)
    best_peer = next((o for o in ordered if not o.is_local), None)
    # the alternative worth naming: the other side of the local/peer split
    if not chosen.is_local:
        if local_option is not None:
            other = _describe(local_option)
        else:
            other = f"local: {local_rejection}" if local_rejection else "no local node"
    elif best_peer is not None:
        other = _describe(best_peer)
    elif peer_rejections:
        other = "no peer qualified (" + "; ".join(f"{n}: {r}" for n, r in peer_rejections) + ")"
    else:
        other = "no peers"
    notes: list[str] = []
    if local_option is not None and _low_battery(local_option.node, settings):
        notes.append(
            f"local on battery at {local_option.node.battery_percent:g}%, "
            f"cost x{settings.battery_penalty:g}"
        )
    if work.complexity == "high" and not chosen.is_local:
        notes.append("complexity high: strongest peer first")
    elif work.complexity in (None, "low") and local_option is not None and len(ordered) > 1:
        notes.append(f"local preferred unless a peer is {settings.local_preference:g}x faster")
    text = f"{_describe(chosen)} vs {other}"
    return text + ("; " + "; ".join(notes) if notes else "")


def decide(
    work: Work,
    local: NodeView | None,
    peers: Sequence[NodeView],
    settings: PolicySettings = PolicySettings(),  # frozen, so sharing is safe
) -> Decision:
    """Where ``work`` should run: ordered candidates, rejections with reasons, one line why.

    ``local`` is None when this node must not run the work itself (it was forwarded here,
    or it has no engine); ``peers`` are every known peer, in any order.
    """
    # (node name, reason, is_local): the reason line labels the local node "local"
    rejected: list[tuple[str, str, bool]] = []
    options: list[_Option] = []
    nodes: list[tuple[NodeView, bool]] = [(local, True)] if local is not None else []
    nodes += [(peer, False) for peer in peers]
    for node, is_local in nodes:
        checked = _check(node, is_local, work, settings)
        if isinstance(checked, str):
            rejected.append((node.name, checked, is_local))
            continue
        offer, est = checked
        score = _score(node, est, is_local, work, settings)
        options.append(_Option(node, offer, est, score, is_local))
    rejected_pairs = tuple((name, why) for name, why, _ in rejected)

    if not options:
        parts = [] if local is not None or work.route == "peer" else ["no local node"]
        parts += [f"{'local' if is_local else name}: {why}" for name, why, is_local in rejected]
        return Decision((), rejected_pairs, "nowhere to run: " + ("; ".join(parts) or "no nodes"))

    ordered = sorted(options, key=lambda o: _order_key(o, work))
    chosen = ordered[0]
    # a chosen peer falls back to the other peers first: local was already judged worse
    rest = [o for o in ordered[1:] if not o.is_local] + [o for o in ordered[1:] if o.is_local]
    candidates = tuple(
        Candidate(
            node=o.node.name,
            kind="local" if o.is_local else o.node.kind,
            model=o.offer.name,
            est_seconds=o.est,
            score=o.score,
            why=_why(o, settings),
            tools=o.node.tools,
            idempotent_tools=o.node.idempotent_tools,
        )
        for o in [chosen, *rest]
    )
    local_rejection = next((why for _, why, is_local in rejected if is_local), None)
    peer_rejections = [(name, why) for name, why, is_local in rejected if not is_local]
    reason = _reason(chosen, ordered, local_rejection, peer_rejections, work, settings)
    return Decision(candidates, rejected_pairs, reason)
