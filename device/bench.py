"""Benchmark figures: prefill and decode speed of one model with one plan on one machine.

The measurement itself drives the engine (``pcrt.runtime.models.benchmark``); this module holds
the figures and how repeated runs combine, as plain data that routing can read to predict
latency. Figures are only comparable for the same model file, device fingerprint, offload
plan and thread count: the store keys them so.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, computed_field

__all__ = ["BenchFigures", "best_of", "predict_seconds"]


class BenchFigures(BaseModel):
    """One run: ``prompt_tokens`` prefilled, then ``decode_tokens`` generated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_tokens: int = Field(ge=0)
    prefill_seconds: float = Field(ge=0)
    decode_tokens: int = Field(ge=0)
    """Tokens decoded after the first one (the first comes out of the prefill)."""
    decode_seconds: float = Field(ge=0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def best_of(runs: Sequence[BenchFigures]) -> BenchFigures:
    """Each phase's best run: on a shared machine the fastest run is the least disturbed."""
    if not runs:
        raise ValueError("no benchmark runs to combine")
    prefill = max(runs, key=lambda r: r.prefill_tps)
    decode = max(runs, key=lambda r: r.decode_tps)
    return BenchFigures(
        prompt_tokens=prefill.prompt_tokens,
        prefill_seconds=prefill.prefill_seconds,
        decode_tokens=decode.decode_tokens,
        decode_seconds=decode.decode_seconds,
    )


def predict_seconds(figures: BenchFigures, prompt_tokens: int, max_tokens: int) -> float:
    """Expected latency of a request on this machine, from its benchmark (for routing)."""
    prefill = prompt_tokens / figures.prefill_tps if figures.prefill_tps > 0 else 0.0
    decode = max(0, max_tokens - 1) / figures.decode_tps if figures.decode_tps > 0 else 0.0
    return prefill + decode
