"""How fast ``pcrt`` starts: the median of several process starts of a command.

    python -m bench.cli [--repeats 7] [--out bench/results/cli.json]

``pcrt --help``, ``pcrt ps`` (no daemon answers: it says so and exits 1) and ``pcrt
models list``, each as a new process through the installed ``pcrt`` script, against the
goal of 0.25 s and, measured in the same run, the floor any Python command pays: ``python
-c pass`` and ``python -c "import click"``. The runs take turns, so a busy moment of a
shared machine spreads over every command instead of one. Then, for each command, the
imports that cost most (``python -X importtime``, top 5 by cumulative time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import format_table

GOAL_S = 0.25
COMMANDS = {"pcrt --help": ["--help"], "pcrt ps": ["ps"], "pcrt models list": ["models", "list"]}
REFERENCES = {"python -c pass": "pass", 'python -c "import click"': "import click"}
TOP_IMPORTS = 5


def pcrt_command() -> list[str]:
    """The installed ``pcrt`` script next to this interpreter, as a user runs it."""
    script = Path(sys.executable).with_name("pcrt")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from pcrt.cli.main import main; sys.exit(main())"]


def isolated_env(home: Path) -> dict[str, str]:
    """A fresh PCRT_HOME, no user models file, and a PCRT_URL where no daemon answers."""
    env = dict(os.environ)
    env.update(
        PCRT_HOME=str(home / "home"),
        PCRT_MODELS_FILE=str(home / "no-such-models.toml"),
        PCRT_URL="http://127.0.0.1:9",  # port 9 is "discard": nothing answers
    )
    return env


def start_seconds(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall time of one process start to exit, and its exit code."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, done.returncode


def worst_imports(argv: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    """The imports with the largest cumulative time (``-X importtime``), largest first."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    found: list[dict[str, Any]] = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own, cumulative, name = line.removeprefix("import time:").split("|")
        found.append(
            {
                "module": name.strip(),
                "depth": (len(name) - len(name.lstrip()) - 1) // 2,
                "self_ms": int(own) / 1000,
                "cumulative_ms": int(cumulative) / 1000,
            }
        )
    found.sort(key=lambda entry: -entry["cumulative_ms"])
    return found[:TOP_IMPORTS]


def measure(repeats: int) -> dict[str, Any]:
    pcrt = pcrt_command()
    runs: dict[str, list[float]] = {name: [] for name in (*COMMANDS, *REFERENCES)}
    codes: dict[str, int] = {}
    argvs = {name: [*pcrt, *args] for name, args in COMMANDS.items()}
    argvs |= {name: [sys.executable, "-c", code] for name, code in REFERENCES.items()}
    with tempfile.TemporaryDirectory(prefix="pcrt-bench-cli-") as tmp:
        env = isolated_env(Path(tmp))
        for argv in argvs.values():  # warm the page cache; not counted
            start_seconds(argv, env)
        for _ in range(repeats):
            for name, argv in argvs.items():
                seconds, codes[name] = start_seconds(argv, env)
                runs[name].append(seconds)
        script = [pcrt[-1]] if len(pcrt) == 1 else pcrt[1:]
        imports = {name: worst_imports([*script, *args], env) for name, args in COMMANDS.items()}

    def figures(name: str) -> dict[str, Any]:
        return {"median_s": statistics.median(runs[name]), "runs_s": runs[name]}

    commands = {name: {**figures(name), "exit_code": codes[name]} for name in COMMANDS}
    for entry in commands.values():
        entry["meets_goal"] = entry["median_s"] < GOAL_S
    return {
        "repeats": repeats,
        "goal_s": GOAL_S,
        "commands": commands,
        "references": {name: figures(name) for name in REFERENCES},
        "worst_imports": imports,
    }


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    click_s = results["references"]['python -c "import click"']["median_s"]
    table: list[tuple[str, str, str, str]] = []
    for name, figures in results["commands"].items():
        median = figures["median_s"]
        verdict = "yes" if figures["meets_goal"] else "NO"
        table.append(
            (
                f"{name} (median of {results['repeats']})",
                f"{median:.3f} s",
                f"{click_s:.3f} s (import click)",
                f"{median / click_s:.1f}x (< {GOAL_S} s: {verdict})",
            )
        )
    for name, figures in results["references"].items():
        table.append((name, "-", f"{figures['median_s']:.3f} s", "-"))
    return table


def import_report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for name, entries in results["worst_imports"].items():
        lines.append(f"\n{name}: top {TOP_IMPORTS} imports by cumulative time")
        for entry in entries:
            module = "  " * entry["depth"] + entry["module"]
            lines.append(
                f"  {entry['cumulative_ms']:7.1f} ms  (self {entry['self_ms']:5.1f} ms)  {module}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cli.json"))
    args = parser.parse_args()
    results = measure(args.repeats)
    print(format_table(rows(results)))
    print(import_report(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
