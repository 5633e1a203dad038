"""``pcrt state list | export | import | rm`` on the local store, no daemon."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pcrt.cache.blobs import BlobStore
from pcrt.cache.store import Store
from pcrt.cli.main import main
from pcrt.runtime.engine.state import CompatKey, KVState
from pcrt.runtime.paths import Paths

KEY = CompatKey(model_sha256="ab" * 32, type_k="f16", type_v="f16", flash_attn=False)


def pcrt(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def make_state(tokens: int = 7, payload: bytes = b"kv" * 5000) -> bytes:
    """A well-formed blob; the CLI checks the format and hash, not an engine's key."""
    return KVState(KEY, list(range(1, tokens + 1)), 42, payload, model="smollm2-135m").to_bytes()


@pytest.fixture
def blob_file(tmp_path: Path) -> Path:
    path = tmp_path / "in.pcrtkv"
    path.write_bytes(make_state())
    return path


def test_import_list_export_rm_roundtrip(blob_file: Path, tmp_path: Path, pcrt_env: Paths) -> None:
    data = blob_file.read_bytes()
    imported = pcrt("state", "import", str(blob_file))
    assert imported.exit_code == 0, imported.output
    state_id = imported.stdout.strip()
    assert state_id == hashlib.sha256(data).hexdigest()
    assert pcrt("state", "import", str(blob_file)).stdout.strip() == state_id  # idempotent

    table = pcrt("state", "list")
    assert state_id[:12] in table.stdout and "smollm2-135m" in table.stdout
    listed = json.loads(pcrt("state", "list", "--json").stdout)
    assert [(s["id"], s["size"], s["tokens"]) for s in listed] == [(state_id, len(data), 7)]
    assert listed[0]["key"] == KEY.model_dump() and listed[0]["kind"] == "kv-state"

    out = tmp_path / "sub" / "out.pcrtkv"
    out.parent.mkdir()
    out.write_bytes(b"an older file, replaced whole")
    exported = pcrt("state", "export", state_id[:10], str(out))  # a unique prefix is enough
    assert exported.exit_code == 0, exported.output
    assert out.read_bytes() == data
    assert [p.name for p in out.parent.iterdir()] == ["out.pcrtkv"]  # no temp file left

    removed = pcrt("state", "rm", state_id)
    assert removed.exit_code == 0 and state_id in removed.stdout
    assert json.loads(pcrt("state", "list", "--json").stdout) == []
    assert not (pcrt_env.home / "blobs" / state_id[:2] / state_id).exists()
    assert "no states stored" in pcrt("state", "list").stdout


def test_corrupt_and_truncated_files_are_refused(tmp_path: Path) -> None:
    data = bytearray(make_state())
    data[-3] ^= 0xFF
    corrupt = tmp_path / "corrupt.pcrtkv"
    corrupt.write_bytes(bytes(data))
    result = pcrt("state", "import", str(corrupt))
    assert result.exit_code == 1
    assert "sha256" in result.stderr and "corrupt.pcrtkv" in result.stderr
    assert "Traceback" not in result.output

    truncated = tmp_path / "short.pcrtkv"
    truncated.write_bytes(make_state()[:-100])
    assert "truncated" in pcrt("state", "import", str(truncated)).stderr
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a state at all")
    assert "not a pcrt KV state" in pcrt("state", "import", str(garbage)).stderr
    missing = pcrt("state", "import", str(tmp_path / "nope.pcrtkv"))
    assert missing.exit_code == 1 and "cannot read" in missing.stderr
    assert json.loads(pcrt("state", "list", "--json").stdout) == []


def test_unknown_and_malformed_ids_are_clear_errors(tmp_path: Path) -> None:
    unknown = pcrt("state", "export", "0" * 64, str(tmp_path / "x"))
    assert unknown.exit_code == 1 and "no state" in unknown.stderr
    assert not (tmp_path / "x").exists()
    assert "not a state id" in pcrt("state", "rm", "../etc/passwd").stderr


def test_an_ambiguous_prefix_is_refused(pcrt_env: Paths) -> None:
    seen: dict[str, bytes] = {}
    n = 0
    while True:  # two blobs whose ids share 4 hex digits: a few hundred tries
        data = make_state(payload=str(n).encode())
        prefix = hashlib.sha256(data).hexdigest()[:4]
        if prefix in seen:
            break
        seen[prefix] = data
        n += 1
    with Store(pcrt_env.db_path) as store:
        blobs = BlobStore(store, pcrt_env.home / "blobs")
        blobs.put(seen[prefix])
        blobs.put(data)
    result = pcrt("state", "rm", prefix)
    assert result.exit_code == 1 and "matches 2 states" in result.stderr
    assert len(json.loads(pcrt("state", "list", "--json").stdout)) == 2


def test_export_of_a_blob_corrupted_on_disk_fails_cleanly(
    blob_file: Path, tmp_path: Path, pcrt_env: Paths
) -> None:
    state_id = pcrt("state", "import", str(blob_file)).stdout.strip()
    with Store(pcrt_env.db_path) as store:
        path = BlobStore(store, pcrt_env.home / "blobs").path_of(state_id)
    path.write_bytes(path.read_bytes()[:-1] + b"?")
    out = tmp_path / "out.pcrtkv"
    result = pcrt("state", "export", state_id, str(out))
    assert result.exit_code == 1 and "corrupt" in result.stderr
    assert not out.exists()
