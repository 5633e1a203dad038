"""``pcrt bench`` through click's test runner, and the store behind it (tiny runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pcrt.cache.migrations import applied
from pcrt.cache.store import BenchRecord, Store
from pcrt.cli.main import main
from pcrt.device.bench import BenchFigures, best_of, predict_seconds
from pcrt.runtime.paths import Paths

TINY = ("--prompt-tokens", "16", "--gen-tokens", "4", "--threads", "2")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def bench_json(*args: str) -> dict:
    result = invoke("bench", *TINY, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_bench_measures_stores_and_reuses(default_model_path: Path, pcrt_env: Paths) -> None:
    first = bench_json()
    assert first["measured"] is True and first["model"] == "smollm2-135m"
    result = first["result"]
    assert result["prompt_tokens"] == 16 and result["decode_tokens"] == 3
    assert result["prefill_tps"] > 0 and result["decode_tps"] > 0
    assert result["fingerprint"] == first["fingerprint"]
    assert result["plan_key"] == first["plan_key"] and result["status"] == "current"

    again = bench_json("--if-stale")  # a fresh result exists: not measured again
    assert again["measured"] is False and again["result"]["id"] == result["id"]

    with Store(pcrt_env.db_path) as store:
        (record,) = store.bench_results(first["model_sha256"])
        assert json.loads(record.plan_json)["context"] == 2048
        # the machine changes (another GPU, another llama.cpp build): the fingerprint no
        # longer matches, so the stored figures are stale and --if-stale re-measures
        store.db.execute("update bench_results set fingerprint = 'elsewhere'")
    third = bench_json("--if-stale")
    assert third["measured"] is True and third["result"]["id"] != result["id"]
    statuses = sorted(r["status"] for r in third["history"])
    assert statuses == ["current", "stale (other device)"]

    # a different thread count is another plan: measured, and listed as such
    result = invoke("bench", "--prompt-tokens", "16", "--gen-tokens", "4", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "smollm2-135m: prefill" in result.output and "tokens/s" in result.output
    assert "measured" in result.output
    assert "other plan" in result.output and "stale (other device)" in result.output


def test_bench_rejects_a_run_longer_than_the_context(default_model_path: Path) -> None:
    result = CliRunner().invoke(main, ["bench", "--ctx", "64", "--prompt-tokens", "100"])
    assert result.exit_code == 1
    assert "do not fit the context of 64" in result.output


def _record(fingerprint: str, measured_at: str, decode_tps: float = 100.0) -> BenchRecord:
    return BenchRecord(
        model_sha256="a" * 64,
        model="m",
        fingerprint=fingerprint,
        plan_key="p1",
        n_threads=2,
        plan_json="{}",
        prompt_tokens=256,
        prefill_seconds=0.5,
        prefill_tps=512.0,
        decode_tokens=63,
        decode_seconds=0.63,
        decode_tps=decode_tps,
        llama_cpp_version="0.3.36",
        measured_at=measured_at,
    )


def test_store_bench_results(tmp_path: Path) -> None:
    with Store(tmp_path / "pcrt.db") as store:
        assert "m002_bench_results" in applied(store.db)
        old = store.add_bench_result(_record("fp1", "2026-01-01T00:00:00+00:00", 90.0))
        new = store.add_bench_result(_record("fp1", "2026-02-01T00:00:00+00:00", 95.0))
        store.add_bench_result(_record("fp2", "2026-03-01T00:00:00+00:00"))
        assert old.id is not None and new.id == old.id + 1
        latest = store.latest_bench("a" * 64, "fp1", "p1", 2)
        assert latest == new
        assert store.latest_bench("a" * 64, "fp1", "p1", 4) is None  # other thread count
        assert store.latest_bench("a" * 64, "fp3", "p1", 2) is None  # other machine
        assert [r.fingerprint for r in store.bench_results("a" * 64)] == ["fp2", "fp1", "fp1"]
        assert store.bench_results("b" * 64) == []
    with Store(tmp_path / "pcrt.db") as store:  # persisted
        assert len(store.bench_results()) == 3


def test_figures_combine_and_predict() -> None:
    slow = BenchFigures(
        prompt_tokens=256, prefill_seconds=1.0, decode_tokens=63, decode_seconds=1.0
    )
    fast_prefill = BenchFigures(
        prompt_tokens=256, prefill_seconds=0.5, decode_tokens=63, decode_seconds=1.26
    )
    best = best_of([slow, fast_prefill])
    assert best.prefill_tps == 512.0 and best.decode_tps == 63.0
    # 512 prompt tokens at 512/s, then 64 more tokens (the first comes with the prefill)
    assert predict_seconds(best, 512, 64) == pytest.approx(1.0 + 63 / 63.0)
    with pytest.raises(ValueError, match="no benchmark runs"):
        best_of([])
