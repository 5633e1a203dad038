"""Real chat templates for the tool-call family tests: llama.cpp's own collection
(``models/templates/*.jinja``), taken from the sdist of the llama-cpp-python that pcrt
runs. Fetched once per machine into the shared models dir, as the test model is, and
verified by the index's sha256."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import httpx

from tests.homes import shared_models_dir

__all__ = ["llama_cpp_templates"]

_SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


def llama_cpp_templates() -> Path:
    """The dir holding llama.cpp's templates (``NAME.jinja``), fetched the first time."""
    version = importlib.metadata.version("llama_cpp_python")
    target = shared_models_dir() / f"llama.cpp-templates-{version}"
    if (target / ".complete").exists():
        return target
    index = os.environ.get("PCRT_PYPI_INDEX_URL") or "https://pypi.org/simple"
    name = f"llama_cpp_python-{version}.tar.gz"
    with httpx.Client(timeout=60, follow_redirects=True) as client:
        page = client.get(
            f"{index.rstrip('/')}/llama-cpp-python/", headers={"Accept": _SIMPLE_JSON}
        )
        page.raise_for_status()
        listed = next(f for f in page.json()["files"] if f["filename"] == name)
        with tempfile.TemporaryDirectory(dir=shared_models_dir()) as work:
            sdist = Path(work) / name
            digest = hashlib.sha256()
            with client.stream("GET", listed["url"]) as response, sdist.open("wb") as out:
                response.raise_for_status()
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != listed["hashes"]["sha256"]:
                raise RuntimeError(f"{name}: sha256 differs from the index's")
            unpacked = Path(work) / "templates"
            unpacked.mkdir()
            with tarfile.open(sdist) as tar:
                for member in tar.getmembers():
                    parts = Path(member.name).parts
                    if member.isfile() and parts[-2:-1] == ("templates",) and "vendor" in parts:
                        extracted = tar.extractfile(member)
                        assert extracted is not None
                        (unpacked / parts[-1]).write_bytes(extracted.read())
            (unpacked / ".complete").touch()
            if target.exists():  # another session's half-done copy
                shutil.rmtree(target)
            unpacked.rename(target)  # whole or not at all
    return target
