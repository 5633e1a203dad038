"""The tool registry over HTTP: what tools there are, and calling one.

    GET  /v1/pcrt/tools              every tool (allowed: for the caller's agent) and
                                     the problems met starting them
    POST /v1/pcrt/tools/{name}/call  {"arguments": {...}} -> the ToolResult

The caller's agent is its X-PC-Agent-ID ("anonymous" without one), held to
``[tools.permissions]``: a denied call is a 403 before anything is sent, an unknown tool
a 404, arguments its schema refuses a 400 naming the argument. A tool that fails or
times out is a 200 whose result says ``ok: false``: that is the tool's answer, for the
model to read. The body is held to the guard's bound for small routes
(``bodies.SMALL_BODY_BYTES``, 1 MiB). Nothing listed is secret: no header values, no
environment values.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from pcrt.runtime.server.services import agent_of, services_of

__all__ = ["router"]

router = APIRouter()


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arguments: dict[str, Any] = {}


@router.get("/v1/pcrt/tools")
async def list_tools(request: Request) -> dict[str, Any]:
    return services_of(request).tools.describe(agent_of(request))


@router.post("/v1/pcrt/tools/{name}/call")
async def call_tool(name: str, body: ToolCall, request: Request) -> dict[str, Any]:
    tools = services_of(request).tools
    result = await tools.call(name, body.arguments, agent=agent_of(request))
    return {"tool": name, **result.to_dict()}
