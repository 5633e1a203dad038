"""Whether a KV state made here would load into a peer's engine, known before sending it.

A state loads only into an engine with the same compatibility key
(``runtime.state.CompatKey``): GGUF sha256, K and V cache types, flash attention, layout,
llama.cpp version, state format version. A peer refuses any other on import and
recomputes, after we paid to send tens of MB; so a migration compares first.

A pcrt peer's node info reports, per model, the key its engine gives states
(``EngineKey``): all of it once the model is loaded; before a load, all but the layout,
which depends on the model's architecture, and its slot count instead (a model whose
states keep llama.cpp's raw layout has one stream per slot). A peer that reports nothing
(an older one) is judged by the model's sha256 alone, as before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # attributes only: the peer table need not import llama.cpp
    from pcrt.runtime.engine.state import CompatKey

__all__ = ["EngineKey", "key_mismatches"]

_LABELS = {
    "type_k": "K type",
    "type_v": "V type",
    "flash_attn": "flash attention",
    "layout": "layout",
    "llama_cpp_version": "llama.cpp version",
    "format_version": "state format",
}


@dataclass(frozen=True)
class EngineKey:
    """The key a node's engine gives one model's KV states, less the model's sha256 (its
    offer carries that). None: not reported."""

    type_k: str | None = None
    type_v: str | None = None
    flash_attn: bool | None = None
    llama_cpp_version: str | None = None
    format_version: int | None = None
    layout: str | None = None  # known once the model is loaded
    parallel: int | None = None  # slots: predicts a raw layout before a load

    @classmethod
    def of(cls, key: CompatKey, parallel: int) -> EngineKey:
        """A loaded engine's key, whole."""
        return cls(
            type_k=key.type_k,
            type_v=key.type_v,
            flash_attn=key.flash_attn,
            llama_cpp_version=key.llama_cpp_version,
            format_version=key.format_version,
            layout=key.layout,
            parallel=parallel,
        )

    def to_info(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_info(cls, value: Any) -> EngineKey | None:
        """A peer's report, field by field: a value of the wrong type counts as not
        reported (a peer's bad field must not block, nor pass, a state on its own)."""
        if not isinstance(value, dict):
            return None

        def text(name: str) -> str | None:
            item = value.get(name)
            return item if isinstance(item, str) else None

        def count(name: str) -> int | None:
            item = value.get(name)
            return item if isinstance(item, int) and not isinstance(item, bool) else None

        flash = value.get("flash_attn")
        return cls(
            type_k=text("type_k"),
            type_v=text("type_v"),
            flash_attn=flash if isinstance(flash, bool) else None,
            llama_cpp_version=text("llama_cpp_version"),
            format_version=count("format_version"),
            layout=text("layout"),
            parallel=count("parallel"),
        )

    def expected_layout(self, state_layout: str) -> str | None:
        """The layout this engine would give a state of the same model (None: unknown).

        Before a load, the state's own layout says what the model is: a portable one stays
        portable; a raw one has as many streams as the engine has slots."""
        if self.layout is not None:
            return self.layout
        # imported here: runtime.state loads llama.cpp, which the peer table does without
        # (a state to compare means it is loaded already)
        from pcrt.runtime.engine.state import RAW_LAYOUT_PREFIX, raw_layout

        if state_layout.startswith(RAW_LAYOUT_PREFIX):
            return None if self.parallel is None else raw_layout(self.parallel)
        return state_layout


def key_mismatches(state: CompatKey, engine: EngineKey) -> list[str]:
    """Each reported field where the state (made here) differs from the peer's engine, as
    "K type q8_0 vs f16" (the state's value first); empty when it would load there."""
    theirs: dict[str, Any] = {name: getattr(engine, name) for name in _LABELS if name != "layout"}
    theirs["layout"] = engine.expected_layout(state.layout)
    problems = []
    for name, label in _LABELS.items():
        peer_value = theirs[name]
        ours = getattr(state, name)
        if peer_value is not None and peer_value != ours:
            problems.append(f"{label} {_show(ours)} vs {_show(peer_value)}")
    return problems


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
