"""``pcrt service``: the daemon as a user service that starts with the session (and,
with lingering, at boot) and restarts on failure: a systemd user unit on Linux, a
launchd agent on macOS. ``install`` writes it (``--dry-run`` prints it) and starts it;
``status``, ``logs``, ``restart`` and ``uninstall`` ask the service manager, and say
clearly where there is none (containers, CI)."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from pcrt.runtime.errors import PcrtError
from pcrt.runtime.paths import Paths

__all__ = ["LAUNCHD_LABEL", "UNIT_NAME", "ServiceSpec", "launchd_plist", "service", "systemd_unit"]

UNIT_NAME = "pcrt.service"
LAUNCHD_LABEL = "dev.pcrt.serve"
# what the service carries over from the environment that installs it
_CARRIED = ("PCRT_HOME", "PCRT_MODELS_DIR", "PCRT_MODELS_FILE", "PCRT_CONFIG", "PCRT_API_KEY")


@dataclass(frozen=True)
class ServiceSpec:
    """What the service runs: this install's ``pcrt serve``, resuming interrupted runs,
    with the environment that names the user's home, models and settings."""

    pcrt: Path
    environment: dict[str, str]
    log_file: Path

    @classmethod
    def here(cls) -> ServiceSpec:
        carried = {k: os.environ[k] for k in _CARRIED if os.environ.get(k)}
        return cls(
            pcrt=Path(sys.executable).with_name("pcrt"),
            environment=carried,
            log_file=Paths.from_env().home / "logs" / "service.log",
        )

    @property
    def arguments(self) -> list[str]:
        return [str(self.pcrt), "serve", "--resume-on-start"]


def systemd_unit(spec: ServiceSpec) -> str:
    """The systemd user unit (``~/.config/systemd/user/pcrt.service``)."""
    environment = "".join(
        f'Environment="{key}={value}"\n' for key, value in sorted(spec.environment.items())
    )
    return (
        "[Unit]\n"
        "Description=pcrt: an edge LLM daemon (llama.cpp)\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        f"ExecStart={' '.join(spec.arguments)}\n"
        f"{environment}"
        "Restart=on-failure\n"
        "RestartSec=3\n"
        "# SIGTERM drains: running requests finish, then the models close\n"
        "KillSignal=SIGTERM\n"
        "TimeoutStopSec=60\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def launchd_plist(spec: ServiceSpec) -> bytes:
    """The launchd agent (``~/Library/LaunchAgents/dev.pcrt.serve.plist``)."""
    agent = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": spec.arguments,
        "EnvironmentVariables": spec.environment,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restarted when it fails
        "StandardOutPath": str(spec.log_file),
        "StandardErrorPath": str(spec.log_file),
    }
    return plistlib.dumps(agent)


def _on_mac() -> bool:
    return sys.platform == "darwin"


def _service_file() -> Path:
    home = Path.home()
    if _on_mac():
        return home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return config / "systemd" / "user" / UNIT_NAME


def _manager(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The service manager's answer (systemctl --user, or launchctl); a PcrtError that
    says so where there is none to ask, or (``check``) where it refuses: a restart of a
    unit it does not know fails there, and must not print "restarted"."""
    command = ["launchctl", *args] if _on_mac() else ["systemctl", "--user", *args]
    if shutil.which(command[0]) is None:
        raise PcrtError(f"no {command[0]} here: run the daemon with pcrt serve")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and _no_user_manager(done.stderr):
        raise PcrtError(
            "no systemd user manager answers here (a container or CI?): nothing can "
            f"start or query the service ({_service_file()}); run pcrt serve instead"
        )
    if check and done.returncode != 0:
        said = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise PcrtError(f"{' '.join(command)}: {said}")
    return done


def _no_user_manager(stderr: str) -> bool:
    said = stderr.lower()
    return "failed to connect to bus" in said or "no medium found" in said


@click.group()
def service() -> None:
    """Run the daemon as a user service: started with your session, restarted on
    failure (systemd on Linux, launchd on macOS)."""


@service.command()
@click.option("--dry-run", is_flag=True, help="Print what would be written, write nothing.")
def install(dry_run: bool) -> None:
    """Write the service file for this install's pcrt serve and start it."""
    spec = ServiceSpec.here()
    path = _service_file()
    text = launchd_plist(spec).decode() if _on_mac() else systemd_unit(spec)
    if dry_run:
        click.echo(f"# {path}")
        click.echo(text, nl=False)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    written = path.with_name(path.name + ".tmp")
    written.write_text(text, encoding="utf-8")
    written.replace(path)  # whole or not at all
    click.echo(f"wrote {path}")
    # installed again (new settings, a new venv): the running daemon is replaced, so the
    # file just written is what runs ("enable --now" would leave the old process be)
    if _on_mac():
        _manager("bootout", f"gui/{os.getuid()}/{LAUNCHD_LABEL}", check=False)
        _manager("bootstrap", f"gui/{os.getuid()}", str(path))
    else:
        _manager("daemon-reload")
        _manager("enable", UNIT_NAME)
        _manager("restart", UNIT_NAME)  # starts it, or restarts the one running
        click.echo(
            "started. To start it at boot without logging in: loginctl enable-linger "
            f"{os.environ.get('USER', '$USER')}"
        )


@service.command()
def uninstall() -> None:
    """Stop the service and remove its file."""
    path = _service_file()
    if not path.exists():
        raise PcrtError(f"no pcrt service installed ({path} does not exist)")
    if _on_mac():
        _manager("bootout", f"gui/{os.getuid()}/{LAUNCHD_LABEL}")
    else:
        _manager("disable", "--now", UNIT_NAME)
    path.unlink()
    click.echo(f"removed {path}")


@service.command()
def status() -> None:
    """What the service manager says of the service; its exit status too (systemctl's:
    0 running, 3 stopped, 4 unknown)."""
    if _on_mac():
        done = _manager("print", f"gui/{os.getuid()}/{LAUNCHD_LABEL}", check=False)
    else:
        done = _manager("status", "--no-pager", UNIT_NAME, check=False)
    click.echo(done.stdout or done.stderr, nl=False)
    if done.returncode != 0:
        click.get_current_context().exit(done.returncode)


@service.command()
def restart() -> None:
    """Restart the service (running requests drain first)."""
    if _on_mac():
        _manager("kickstart", "-k", f"gui/{os.getuid()}/{LAUNCHD_LABEL}")
    else:
        _manager("restart", UNIT_NAME)
    click.echo("restarted")


@service.command()
@click.option("-n", "--lines", default=50, show_default=True)
def logs(lines: int) -> None:
    """The service's output (journald's, or launchd's log file)."""
    if _on_mac():
        spec = ServiceSpec.here()
        if not spec.log_file.exists():
            raise PcrtError(f"no service log at {spec.log_file} yet")
        click.echo("".join(spec.log_file.read_text(errors="replace").splitlines(True)[-lines:]))
        return
    if shutil.which("journalctl") is None:
        raise PcrtError("no journalctl here: pcrt logs shows the daemon's own log")
    done = subprocess.run(
        # --user-unit, not --user -u: journald keeps the user units of root and of other
        # system users (uid < 1000) in the system journal, which --user never reads
        ["journalctl", f"--user-unit={UNIT_NAME}", "-n", str(lines), "--no-pager"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    click.echo(done.stdout or done.stderr, nl=False)
