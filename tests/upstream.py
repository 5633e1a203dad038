"""A second GGUF model and a server that is not ours, for the peer tests and bench.peers.

The second model is the default model requantized to Q8_0 with llama.cpp's own quantizer
(0.7 s): a different file, a different sha256, the same tokenizer. llama-cpp-python's
``llama_cpp.server`` serves it as the "vLLM box" of the tests: a real OpenAI-compatible
server in its own process, which a test may kill.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import llama_cpp

from pcrt.runtime.engine.llama_model import quiet_llama_logs
from tests.live_server import free_port

__all__ = ["LlamaCppServer", "second_model"]

SECOND_MODEL_NAME = "SmolLM2-135M-Instruct.Q8_0.gguf"


def second_model(default_model: Path, models_dir: Path) -> Path:
    """The Q8_0 copy of the default model, made once per machine (written atomically)."""
    target = models_dir / SECOND_MODEL_NAME
    if target.is_file():
        return target
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = 2
    quiet_llama_logs()  # the quantizer lists every tensor otherwise
    rc = llama_cpp.llama_model_quantize(
        str(default_model).encode(), str(tmp).encode(), ctypes.byref(params)
    )
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize failed with {rc}")
    tmp.replace(target)
    return target


class LlamaCppServer:
    """``python -m llama_cpp.server`` on a free loopback port, in its own process."""

    def __init__(self, model: Path, alias: str, *, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.alias = alias
        self.api_key = api_key
        self.args = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--model_alias",
            alias,
            "--n_ctx",
            "2048",
            "--n_threads",
            "2",
            "--interrupt_requests",
            "false",
            "--verbose",
            "false",
        ]
        if api_key:
            self.args += ["--api_key", api_key]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LlamaCppServer:
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v1/models", headers=headers, timeout=1).is_success:
                    return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError("llama_cpp.server did not start within 60 s")

    def kill(self) -> None:
        """SIGKILL: the server dies as a crashed machine would, mid-stream."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def __exit__(self, *_: object) -> None:
        self.kill()
