"""``pcrt service``: the systemd unit and the launchd plist rendered from this install
(verified by systemd itself where it is installed, parsed by plistlib), the dry run, and
a clear line where no service manager answers (this container, CI)."""

from __future__ import annotations

import plistlib
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcrt.cli.main import main
from pcrt.cli.service import LAUNCHD_LABEL, ServiceSpec, launchd_plist, systemd_unit


def _spec(monkeypatch: pytest.MonkeyPatch) -> ServiceSpec:
    monkeypatch.setenv("PCRT_CONFIG", "/etc/pcrt/config.toml")
    return ServiceSpec.here()


def test_the_unit_runs_this_install_and_systemd_accepts_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = _spec(monkeypatch)
    unit = systemd_unit(spec)
    assert f"ExecStart={spec.pcrt} serve --resume-on-start\n" in unit
    assert 'Environment="PCRT_CONFIG=/etc/pcrt/config.toml"' in unit
    assert f'Environment="PCRT_HOME={spec.environment["PCRT_HOME"]}"' in unit
    assert "Restart=on-failure" in unit and "WantedBy=default.target" in unit
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here (Debian's systemd package)")
    path = tmp_path / "pcrt.service"
    path.write_text(unit, encoding="utf-8")
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    # the check can fail: a unit whose program is not there is refused
    path.write_text(unit.replace(str(spec.pcrt), "/no/such/pcrt"), encoding="utf-8")
    broken = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    assert broken.returncode != 0 and "/no/such/pcrt" in broken.stderr


def test_the_plist_parses_as_a_launchd_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(monkeypatch)
    agent = plistlib.loads(launchd_plist(spec))
    assert agent["Label"] == LAUNCHD_LABEL
    assert agent["ProgramArguments"] == [str(spec.pcrt), "serve", "--resume-on-start"]
    assert agent["EnvironmentVariables"]["PCRT_CONFIG"] == "/etc/pcrt/config.toml"
    assert agent["KeepAlive"] == {"SuccessfulExit": False} and agent["RunAtLoad"] is True
    assert agent["StandardOutPath"] == agent["StandardErrorPath"] == str(spec.log_file)


def test_install_dry_run_prints_what_it_would_write(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    linux = CliRunner().invoke(main, ["service", "install", "--dry-run"])
    assert linux.exit_code == 0, linux.output
    assert linux.output.startswith(f"# {tmp_path}/.config/systemd/user/pcrt.service\n[Unit]")
    monkeypatch.setattr("pcrt.cli.service._on_mac", lambda: True)
    mac = CliRunner().invoke(main, ["service", "install", "--dry-run"])
    assert f"# {tmp_path}/Library/LaunchAgents/{LAUNCHD_LABEL}.plist" in mac.output
    assert "<key>KeepAlive</key>" in mac.output
    assert not (tmp_path / ".config").exists() and not (tmp_path / "Library").exists()


def test_without_a_service_manager_each_command_says_so() -> None:
    if shutil.which("systemctl") is None:
        pytest.skip("no systemctl here")
    probe = subprocess.run(
        ["systemctl", "--user", "status", "--no-pager", "pcrt.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "failed to connect to bus" not in probe.stderr.lower():
        pytest.skip("a systemd user manager runs here: nothing to refuse")
    for command in ("status", "restart"):
        result = CliRunner().invoke(main, ["service", command])
        assert result.exit_code == 1, result.output
        assert "no systemd user manager answers here" in result.output
        assert "Traceback" not in result.output
    absent = CliRunner().invoke(main, ["service", "uninstall"])
    assert absent.exit_code == 1 and "no pcrt service installed" in absent.output
