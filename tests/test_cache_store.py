"""The SQLite store migrates itself; file hashes are cached by path, size and mtime."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import sqlite_utils

from pcrt.cache import migrations
from pcrt.cache.store import Store
from pcrt.runtime.models.hashing import file_sha256
from tests.httpserver import sha256_hex

SHIPPED = [
    "m001_file_hashes",
    "m002_bench_results",
    "m003_usage",
    "m004_runs_nodes_blobs",
    "m005_node_routing",
    "m006_subgraph_runs",
    "m007_usage_fallbacks",
    "m008_run_origin",
    "m009_runs_for_peer",
    "m010_run_agent",
    "m011_tool_calls",
    "m012_kv_chunks",
    "m013_responses",
]


def test_new_database_is_migrated(tmp_path: Path) -> None:
    db_path = tmp_path / "sub" / "pcrt.db"
    with Store(db_path) as store:
        assert migrations.applied(store.db) == SHIPPED
        columns = store.db.table("file_hashes").columns_dict
        assert columns == {
            "path": str,
            "size": int,
            "mtime_ns": int,
            "sha256": str,
            "computed_at": str,
        }
        assert store.db.table("file_hashes").pks == ["path"]
    with Store(db_path) as store:  # reopening runs nothing again
        assert migrations.migrate(store.db) == []


def test_later_migrations_run_once_in_order(tmp_path: Path) -> None:
    db_path = tmp_path / "pcrt.db"
    Store(db_path).close()  # a database made by the current version

    calls = []

    def m004_example(db: sqlite_utils.Database) -> None:
        calls.append("m004")
        db.table("example").create({"id": int}, pk="id")

    later = (*migrations.MIGRATIONS, m004_example)
    with Store(db_path, migrations=later) as store:
        assert migrations.applied(store.db) == [*SHIPPED, "m004_example"]
        assert store.db.table("example").exists()
    with Store(db_path, migrations=later):
        pass
    assert calls == ["m004"]


def test_concurrent_first_opens(tmp_path: Path) -> None:
    db_path = tmp_path / "pcrt.db"
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_it() -> None:
        barrier.wait()
        try:
            Store(db_path).close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Store(db_path) as store:
        assert migrations.applied(store.db) == SHIPPED


def test_file_hash_rows(tmp_path: Path) -> None:
    with Store(tmp_path / "pcrt.db") as store:
        assert store.get_file_hash("/a", 1, 2) is None
        store.put_file_hash("/a", 1, 2, "f" * 64)
        assert store.get_file_hash("/a", 1, 2) == "f" * 64
        assert store.get_file_hash("/a", 1, 3) is None  # another mtime: another file version
        store.put_file_hash("/a", 5, 6, "e" * 64)  # replaces, one row per path
        assert [(h.path, h.size, h.sha256) for h in store.file_hashes()] == [("/a", 5, "e" * 64)]
        store.forget_file_hash("/a")
        assert store.file_hashes() == []


def test_file_sha256_is_cached_by_stat(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    with Store(tmp_path / "pcrt.db") as store:
        assert file_sha256(path, store) == sha256_hex(data)
        st = path.stat()
        # same size and mtime: the cache answers without reading (proved by changed bytes)
        path.write_bytes(b"x" * len(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert file_sha256(path, store) == sha256_hex(data)
        # a new mtime: computed again
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert file_sha256(path, store) == sha256_hex(b"x" * len(data))
        assert file_sha256(path, None) == sha256_hex(b"x" * len(data))
