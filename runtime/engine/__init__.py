"""The engine room: one loaded model, one llama.cpp context, continuous batching over slots.

Callers use what this package exports; the modules behind it are the engine's own
(``engine`` says which does what). ``EngineClient`` names what callers may rely on.
"""

from pcrt.runtime.engine.config import EngineConfig
from pcrt.runtime.engine.engine import Engine
from pcrt.runtime.engine.handoff import RequestHandle
from pcrt.runtime.engine.protocol import EngineClient
from pcrt.runtime.engine.requests import (
    Candidate,
    CheckpointEvent,
    Choice,
    Completion,
    FinishEvent,
    FinishReason,
    GenerateRequest,
    SlotInfo,
    TokenEvent,
    TokenLogprob,
)

__all__ = [
    "Candidate",
    "CheckpointEvent",
    "Choice",
    "Completion",
    "Engine",
    "EngineClient",
    "EngineConfig",
    "FinishEvent",
    "FinishReason",
    "GenerateRequest",
    "RequestHandle",
    "SlotInfo",
    "TokenEvent",
    "TokenLogprob",
]
