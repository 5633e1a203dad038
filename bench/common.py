"""What every benchmark shares: the command line, the table and the JSON results."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_table", "run_benchmark"]

HEADER = ("benchmark", "pcrt", "reference", "ratio (goal)")


def format_table(rows: Sequence[tuple[str, str, str, str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(HEADER), line(["-" * w for w in widths]), *map(line, rows)])


def run_benchmark(
    doc: str,
    name: str,
    run: Callable[[int, int], Coroutine[Any, Any, dict[str, Any]]],
    rows: Callable[[dict[str, Any]], Sequence[tuple[str, str, str, str]]],
    *,
    repeats: int = 2,
) -> None:
    """``python -m bench.NAME [--threads N] [--repeats N] [--out FILE]``: run, print the
    table, write the JSON."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/{name}.json"))
    args = parser.parse_args()
    results = asyncio.run(run(args.threads, args.repeats))
    print(format_table(rows(results)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
