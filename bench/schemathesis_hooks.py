"""Schemathesis hooks that let the fuzzer reach the generation paths: every body that
names a model names the real default one, with a small token bound, instead of a random
name that stops at a 404 (or no bound, which generates to the context's end).

    pcrt serve --port 18555 --api-key K --threads 2 --ctx 1024
    PATHS='^/(api/(chat|generate|embed|embeddings|show)|v1/messages.*|v1/responses)$'
    PYTHONPATH=. SCHEMATHESIS_HOOKS=bench.schemathesis_hooks st run \\
        http://127.0.0.1:18555/openapi.json --header "Authorization: Bearer K" \\
        --include-path-regex "$PATHS" \\
        --max-examples 40 --phases coverage,fuzzing --workers 1 --request-timeout 180 \\
        --seed 22 --no-shrink --checks not_a_server_error
"""

from __future__ import annotations

from typing import Any

import schemathesis

MODEL = "smollm2-135m"
MOST_TOKENS = 24


@schemathesis.hook
def map_body(ctx: Any, body: Any) -> Any:
    if not isinstance(body, dict) or "model" not in body:
        return body
    body["model"] = MODEL
    for key in ("max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            body[key] = max(0, min(value, MOST_TOKENS))
    if "input" in body and "max_output_tokens" not in body:  # the Responses API's
        body["max_output_tokens"] = 16
    if "messages" in body or "prompt" in body:  # Ollama's bound, ignored by the others
        options = body.get("options")
        body["options"] = {**(options if isinstance(options, dict) else {}), "num_predict": 8}
    return body
