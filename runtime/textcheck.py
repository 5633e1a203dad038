"""Whether decoded data is text all the way down.

JSON and YAML may escape half of a UTF-16 pair ("\\ud800"). Python decodes it to a str
that cannot be encoded as UTF-8: the tokenizer, SQLite and any answer that carries it
fail on it later, some after work was done or recorded. Input is checked once, here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["broken_text_at"]


def broken_text_at(value: Any, where: str = "the body") -> str | None:
    """Where in a decoded JSON/YAML value a string (or key) is not text; None if nowhere."""
    stack = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str) and not _is_text(item):
            return at
        if isinstance(item, dict):
            for key, inner in item.items():
                if isinstance(key, str) and not _is_text(key):
                    return f"a key in {at}"  # never quoted: it would break the message too
                stack.append((inner, f"{at}.{key}"))
        elif isinstance(item, list | tuple):
            stack.extend((inner, f"{at}[{i}]") for i, inner in enumerate(item))
    return None


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
