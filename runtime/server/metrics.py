"""Prometheus metrics for one daemon, in a registry of its own (no global collectors)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pcrt.cache.chunks import ChunkStats

__all__ = ["LiveGauges", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)

LiveGauges = Callable[[], dict[str, list[tuple[dict[str, str], float]]]]
"""Returns current values by gauge name: queue depth, busy slots, loaded models."""


class _LiveCollector(Collector):
    def __init__(self, read: LiveGauges) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        helps = {
            "pcrt_queue_depth": "Requests waiting for a slot, by model",
            "pcrt_busy_slots": "Slots decoding or prefilling, by model",
            "pcrt_loaded_models": "Models loaded in memory",
        }
        values = self.read()
        for name, help_text in helps.items():
            labels = [] if name == "pcrt_loaded_models" else ["model"]
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for label_values, value in values.get(name, []):
                family.add_metric(list(label_values.values()), value)
            yield family


class _ChunkCollector(Collector):
    """The KV chunk store's counters and tiers, read when scraped."""

    def __init__(self, read: Callable[[], ChunkStats]) -> None:
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.read()
        for name, help_text, value in (
            ("pcrt_kv_chunk_hits", "KV chunks restored instead of computed", s.hits),
            ("pcrt_kv_chunk_misses", "Full prompt chunks no slot or tier held", s.misses),
            ("pcrt_kv_chunk_bytes_restored", "Bytes of KV restored from chunks", s.bytes_restored),
            (
                "pcrt_kv_prefill_tokens_saved",
                "Prompt tokens restored, not computed",
                s.tokens_saved,
            ),
            ("pcrt_kv_chunks_refused", "Chunks refused: bytes not matching their hash", s.refused),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        tiers = GaugeMetricFamily(
            "pcrt_kv_chunk_store_bytes", "Bytes held, by tier", labels=["tier"]
        )
        tiers.add_metric(["ram"], s.ram_bytes)
        tiers.add_metric(["disk"], s.disk_bytes)
        yield tiers
        entries = GaugeMetricFamily("pcrt_kv_chunks", "Chunks held, by tier", labels=["tier"])
        entries.add_metric(["ram"], s.ram_entries)
        entries.add_metric(["disk"], s.disk_entries)
        yield entries


class Metrics:
    def __init__(self, live: LiveGauges, chunks: Callable[[], ChunkStats] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pcrt_requests",
            "HTTP requests by route, model and status",
            ["route", "model", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pcrt_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "pcrt_cached_prompt_tokens",
            "Prompt tokens reused from the KV cache",
            ["model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "pcrt_completion_tokens", "Tokens generated", ["model"], registry=r
        )
        self.ttft = Histogram(
            "pcrt_time_to_first_token_seconds",
            "Request start to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "pcrt_time_per_output_token_seconds",
            "Mean time between tokens of a request",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.peer_fallbacks = Counter(
            "pcrt_peer_fallbacks",
            "Forwards a peer failed before answering (the next candidate took the request)",
            ["peer"],
            registry=r,
        )
        self.tool_calls = Counter(
            "pcrt_tool_calls",
            "Tool calls by tool and outcome (ok, error, timeout; denied, invalid: not sent)",
            ["tool", "outcome"],
            registry=r,
        )
        self.tool_seconds = Histogram(
            "pcrt_tool_seconds",
            "Wall time of tool calls that reached their tool",
            ["tool"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_LiveCollector(live))
        if chunks is not None:
            r.register(_ChunkCollector(chunks))

    def tool_call(self, tool: str, outcome: str, seconds: float, agent: str | None = None) -> None:
        """The tool registry's observer: one call counted, and timed unless it was
        refused before it was sent."""
        self.tool_calls.labels(tool, outcome).inc()
        if outcome not in ("denied", "invalid"):
            self.tool_seconds.labels(tool).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
