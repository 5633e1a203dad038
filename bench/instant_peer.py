"""An OpenAI-compatible peer that answers at once, for bench.peers' edge-overhead row.

    python -m bench.instant_peer PORT

It lists one model and answers every chat completion with the same one-token reply, so
the time a request spends through the edge, minus the time straight to it, is what the
edge adds: no model's noise on either side.
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

MODEL = "instant"
_REPLY = (
    b'{"id":"chatcmpl-instant","object":"chat.completion","created":0,"model":"instant",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},'
    b'"finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":1,'
    b'"total_tokens":2}}'
)
_MODELS = b'{"object":"list","data":[{"id":"instant","object":"model"}]}'


async def _chat(request: Request) -> Response:
    await request.body()
    return Response(_REPLY, media_type="application/json")


async def _models(_: Request) -> Response:
    return Response(_MODELS, media_type="application/json")


def main() -> None:
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", _chat, methods=["POST"]),
            Route("/v1/models", _models),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")


if __name__ == "__main__":
    main()
