"""The engine room: one loaded model, one llama.cpp context, continuous batching over slots.

Callers use what this package exports; the modules behind it are the engine's own.
"""

from pcrt.runtime.engine.engine import (
    CheckpointEvent,
    Choice,
    Completion,
    Engine,
    EngineConfig,
    FinishEvent,
    GenerateRequest,
    RequestHandle,
    SlotInfo,
    TokenEvent,
)

__all__ = [
    "CheckpointEvent",
    "Choice",
    "Completion",
    "Engine",
    "EngineConfig",
    "FinishEvent",
    "GenerateRequest",
    "RequestHandle",
    "SlotInfo",
    "TokenEvent",
]
