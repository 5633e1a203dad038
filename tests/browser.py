"""A real browser for the dashboard's tests: Debian's chromium, headless, driven through
its chromedriver by Selenium (no browser download: both come from Debian's packages,
``apt-get install chromium chromium-driver``, which ``.ci/run`` does).

Where they are missing the tests skip, unless ``PCRT_REQUIRE_BROWSER`` is set (``.ci/run``
sets it), so CI cannot pass by skipping them. Screenshots go to ``PCRT_TEST_ARTIFACTS``
(else a temporary folder), whose path the run prints."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest

__all__ = ["Browser", "artifacts_dir", "browser_or_skip"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# as root, in a closed network: no sandbox (needs user namespaces), no GPU, and none of
# the background calls to Google's hosts that this machine refuses
_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)
T = TypeVar("T")


def browser_or_skip() -> None:
    """Skip the test where chromium or its driver is missing (fail, under CI)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if not missing:
        return
    why = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("PCRT_REQUIRE_BROWSER"):
        pytest.fail(why + ", and PCRT_REQUIRE_BROWSER is set")
    pytest.skip(why)


def artifacts_dir() -> Path:
    """Where screenshots go: ``PCRT_TEST_ARTIFACTS/dashboard``, else a fixed temporary
    folder (overwritten by the next run)."""
    root = os.environ.get("PCRT_TEST_ARTIFACTS")
    base = Path(root) if root else Path(tempfile.gettempdir()) / "pcrt-test-artifacts"
    folder = base / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Browser:
    """One headless chromium (``with Browser() as browser``) with its console log kept."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self._profile = tempfile.mkdtemp(prefix="pcrt-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*_FLAGS, f"--user-data-dir={self._profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(60)
        self.console: list[dict[str, Any]] = []  # every entry read so far

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self._profile, ignore_errors=True)

    def open(self, url: str) -> None:
        self.driver.get(url)

    def js(self, script: str, *args: Any) -> Any:
        """The value of ``script`` (a function body: ``return ...``) run in the page."""
        return self.driver.execute_script(script, *args)

    def wait(self, probe: Callable[[], T | None], timeout: float, what: str) -> T:
        """The first truthy value of ``probe``, polled every 50 ms; AssertionError naming
        ``what`` (and the console's errors) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s; {self.errors()}")
            time.sleep(0.05)

    def errors(self) -> list[str]:
        """The console's errors so far (SEVERE: uncaught exceptions, failed loads, policy
        violations); the log is read once and kept."""
        self.console.extend(self.driver.get_log("browser"))
        return [e["message"] for e in self.console if e["level"] == "SEVERE"]

    def shot(self, name: str) -> Path:
        path = artifacts_dir() / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path
