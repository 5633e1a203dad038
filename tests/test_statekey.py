"""Which KV states a peer's engine would load (``routing/statekey.py``) and the state keys
read from a peer's node info."""

from __future__ import annotations

import pytest

from pcrt.routing.peers import state_keys_from_node_info
from pcrt.routing.statekey import EngineKey, key_mismatches
from tests.routing_helpers import HERE_KEY


def test_a_loaded_engine_key_takes_the_states_it_made() -> None:
    assert key_mismatches(HERE_KEY, EngineKey.of(HERE_KEY, parallel=4)) == []
    assert key_mismatches(HERE_KEY, EngineKey()) == []  # nothing reported: nothing to refuse


def test_key_mismatches_name_every_differing_field_state_first() -> None:
    there = EngineKey(
        type_k="q8_0", type_v="q8_0", flash_attn=True, llama_cpp_version="0.0.1", format_version=2
    )
    assert key_mismatches(HERE_KEY, there) == [
        "K type f16 vs q8_0",
        "V type f16 vs q8_0",
        "flash attention off vs on",
        f"llama.cpp version {HERE_KEY.llama_cpp_version} vs 0.0.1",
        "state format 1 vs 2",
    ]


@pytest.mark.parametrize(
    ("state_layout", "engine", "problem"),
    [
        ("portable", EngineKey(parallel=2), None),  # before a load: portable stays portable
        ("raw-4", EngineKey(parallel=4), None),  # raw: one stream per slot
        ("raw-4", EngineKey(parallel=2), "layout raw-4 vs raw-2"),
        ("raw-4", EngineKey(), None),  # slots unknown: not refused on a guess
        ("portable", EngineKey(layout="raw-2", parallel=2), "layout portable vs raw-2"),
    ],
)
def test_layout_is_predicted_before_a_load_from_the_slots(
    state_layout: str, engine: EngineKey, problem: str | None
) -> None:
    state = HERE_KEY.model_copy(update={"layout": state_layout})
    assert key_mismatches(state, engine) == ([problem] if problem else [])


def test_engine_key_from_info_round_trips_and_drops_badly_typed_fields() -> None:
    key = EngineKey.of(HERE_KEY, parallel=4)
    assert EngineKey.from_info(key.to_info()) == key
    bad = {
        "type_k": 8,
        "flash_attn": "yes",
        "format_version": True,
        "parallel": 2.5,
        "type_v": "q8_0",
    }
    assert EngineKey.from_info(bad) == EngineKey(type_v="q8_0")
    assert EngineKey.from_info("f16") is None and EngineKey.from_info(None) is None


def test_state_keys_from_node_info_by_model_name() -> None:
    info = {
        "models": [
            {"name": "a", "state_key": {"type_k": "q8_0"}},
            {"name": "old"},
            {"name": 3, "state_key": {}},
            "x",
        ]
    }
    assert state_keys_from_node_info(info) == {"a": EngineKey(type_k="q8_0")}
