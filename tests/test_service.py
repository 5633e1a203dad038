"""``pcrt service``: the systemd unit and the launchd plist rendered from this install
(verified by systemd itself where it is installed, parsed by plistlib), the dry run, a
clear line where no service manager answers (this container, CI), and the whole life of
the service under a real systemd user manager that the last test starts itself (as root,
where systemd is installed: this container and CI)."""

from __future__ import annotations

import contextlib
import os
import plistlib
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from pcrt.cli.main import main
from pcrt.cli.service import (
    LAUNCHD_LABEL,
    UNIT_NAME,
    ServiceSpec,
    launchd_plist,
    systemd_unit,
)
from tests.live_server import free_port


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


# --- a real systemd user manager (issue 21) ---------------------------------------------
#
# ``systemd --user`` runs here once two things of a booted systemd machine are given to it
# alone (tried by hand first, with these exact failures):
# - it refuses to start "as user instance, but the system has not been booted with
#   systemd" unless /run/systemd/system exists (sd_booted()): a private tmpfs on
#   /run/systemd, in a mount namespace of its own, holds that directory;
# - it adopts every process of the cgroup it starts in into its init.scope: started in
#   this machine's root cgroup it took in every process of the machine, PID 1 included.
#   It starts in an empty cgroup of its own, which also lets the fixture kill whatever
#   it leaves behind.
# systemctl --user then talks to it over $XDG_RUNTIME_DIR/systemd/private (no D-Bus). No
# journald runs (starting one would turn the kernel's auditing on for the whole machine),
# so `pcrt service logs` finds no entries here.

_SYSTEMD = next(
    (p for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd") if os.access(p, os.X_OK)),
    None,
)
# the manager's launcher, in its new mount namespace: its own cgroup(s), then the marker
# (--no-mtab: nothing written to the machine's /run/mount)
_LAUNCH = r"""set -e
systemd="$1"; shift
for procs in "$@"; do echo $$ > "$procs"; done
if [ ! -d /run/systemd ]; then
    mount --no-mtab -t tmpfs -o mode=0755 pcrt-test /run && mkdir /run/systemd
fi
mount --no-mtab -t tmpfs -o mode=0755 pcrt-test /run/systemd
mkdir /run/systemd/system
exec "$systemd" --user
"""
_DEADLINE = 30.0  # seconds for any one wait below


@dataclass
class UserManager:
    pid: int
    env: dict[str, str]  # HOME and XDG_RUNTIME_DIR of its user
    cgroup: Path  # its cgroup in the cgroup2 hierarchy, or the name=systemd one
    log: Path

    def run(
        self, *command: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``command`` in the manager's mount namespace (where systemd booted, as far as
        systemctl can tell), with its user's environment."""
        return subprocess.run(
            ["nsenter", f"--target={self.pid}", "--mount", "--", *command],
            env=env or {**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=_DEADLINE,
        )

    def show(self, prop: str) -> str:
        done = self.run("systemctl", "--user", "show", f"--property={prop}", "--value", UNIT_NAME)
        return done.stdout.strip()

    def pids(self) -> set[int]:
        """Every process in the manager's cgroup tree."""
        return {
            int(pid)
            for procs in self.cgroup.rglob("cgroup.procs")
            for pid in procs.read_text().split()
        }


def _cgroup_mounts() -> list[tuple[Path, str, list[str]]]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        fstype, _source, options = rest.split()[:3]
        if fstype in ("cgroup", "cgroup2"):
            mounts.append((Path(fields.split()[4]), fstype, options.split(",")))
    return mounts


def _own_cgroup(hierarchy: str) -> str:
    """This process's cgroup in ``hierarchy`` ("" for cgroup2, or "name=systemd")."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if names == hierarchy:
            return path
    raise LookupError(hierarchy)


def _remove_cgroup(place: Path) -> None:
    if place.is_dir():
        for directory, _dirs, _files in os.walk(place, topdown=False):
            os.rmdir(directory)  # a cgroup's files go with it


@pytest.fixture
def user_manager(tmp_path: Path) -> Iterator[UserManager]:
    """A ``systemd --user`` of a temporary user (HOME, XDG_RUNTIME_DIR under tmp_path),
    running, in a mount namespace and a cgroup of its own; stopped, and everything in its
    cgroup killed and the cgroup removed, after the test."""
    if sys.platform != "linux" or _SYSTEMD is None:
        pytest.skip("no systemd here (Debian's systemd package)")
    for tool in ("systemctl", "unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"no {tool} here")
    if os.geteuid() != 0:
        pytest.skip("a user manager of its own needs root here (a cgroup and a mount namespace)")
    probe = subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True, text=True, timeout=_DEADLINE
    )
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace can be made here: {probe.stderr.strip()}")
    # the cgroup2 hierarchy (the manager's own, hybrid or unified) and name=systemd (v1)
    tracked = [
        (mount, "" if fstype == "cgroup2" else "name=systemd")
        for mount, fstype, options in _cgroup_mounts()
        if fstype == "cgroup2" or "name=systemd" in options
    ]
    if not tracked:
        pytest.skip("no cgroup hierarchy systemd could manage is mounted here")
    tracked.sort(key=lambda place: place[1] != "")  # cgroup2 first: it has cgroup.kill
    name = f"pcrt-service-test-{uuid.uuid4().hex[:12]}"
    places: list[Path] = []
    try:
        for mount, hierarchy in tracked:
            place = mount / _own_cgroup(hierarchy).lstrip("/") / name
            place.mkdir()
            places.append(place)
    except OSError as exc:
        for place in places:
            place.rmdir()
        pytest.skip(f"cannot make a cgroup here: {exc}")

    run, home = tmp_path / "run", tmp_path / "home"
    run.mkdir(mode=0o700)
    home.mkdir()
    user = {"HOME": str(home), "XDG_RUNTIME_DIR": str(run)}
    log = tmp_path / "user-manager.log"
    # a user manager hands its own environment to its services: only this, so whatever
    # reaches the daemon comes from the unit
    environment = {**user, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    with log.open("wb") as out:
        manager = subprocess.Popen(
            [
                "setpriv",
                "--pdeathsig=TERM",  # stops with this test process, should it die
                "unshare",
                "--mount",
                "--propagation=private",
                "sh",
                "-c",
                _LAUNCH,
                "sh",
                _SYSTEMD,
                *(str(place / "cgroup.procs") for place in places),
            ],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = UserManager(manager.pid, user, places[0], log)
        deadline = time.monotonic() + _DEADLINE
        state = ""
        while state not in ("running", "degraded"):
            if manager.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"systemd --user did not start (exit {manager.returncode}, state "
                    f"{state!r}):\n{log.read_text(errors='replace')}"
                )
            time.sleep(0.1)
            state = subprocess.run(
                ["systemctl", "--user", "show", "--property=SystemState", "--value"],
                env={**os.environ, **user},
                capture_output=True,
                text=True,
                timeout=_DEADLINE,
            ).stdout.strip()
        yield started
    finally:
        with contextlib.suppress(ProcessLookupError):
            manager.send_signal(signal.SIGTERM)  # it stops its units, then exits
        try:
            manager.wait(timeout=_DEADLINE)
        except subprocess.TimeoutExpired:
            manager.kill()
            manager.wait(timeout=_DEADLINE)
        for place in places:  # whatever outlived it
            kill = place / "cgroup.kill"
            if kill.exists():
                kill.write_text("1")
            else:
                for procs in place.rglob("cgroup.procs"):
                    for pid in procs.read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + _DEADLINE
        while any((place / "cgroup.procs").exists() and _pids_under(place) for place in places):
            assert time.monotonic() < deadline, f"processes outlived the user manager in {places}"
            time.sleep(0.1)
        # systemd made the same tree in every controller it accounts with (v1: memory, ...)
        relative = places[0].relative_to(tracked[0][0])
        for mount, _fstype, _options in _cgroup_mounts():
            _remove_cgroup(mount / relative)
        for place in places:
            _remove_cgroup(place)


def _pids_under(place: Path) -> bool:
    return any(procs.read_text().split() for procs in place.rglob("cgroup.procs"))


def _healthy(url: str, deadline: float) -> None:
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url}/health never answered 200"
        time.sleep(0.1)


def _gone(pid: int, deadline: float) -> bool:
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_the_service_lives_under_a_real_user_manager(
    user_manager: UserManager, tmp_path: Path
) -> None:
    """install starts the daemon as the manager's unit, answering on its port; status,
    restart and logs ask the manager; uninstall leaves nothing running and no unit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "config.toml"
    config.write_text(f"[server]\nport = {port}\n", encoding="utf-8")
    env = {**os.environ, **user_manager.env, "PCRT_CONFIG": str(config)}
    for leaky in ("XDG_CONFIG_HOME", "DBUS_SESSION_BUS_ADDRESS"):
        env.pop(leaky, None)
    pcrt = str(Path(sys.executable).with_name("pcrt"))
    unit = Path(env["HOME"]) / ".config" / "systemd" / "user" / UNIT_NAME
    wanted = unit.parent / "default.target.wants" / UNIT_NAME

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return user_manager.run(pcrt, "service", *args, env=env)

    deadline = time.monotonic() + 45
    installed = cli("install")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert f"wrote {unit}" in installed.stdout and "started" in installed.stdout
    assert unit.is_file() and wanted.resolve() == unit  # enabled: started with the session
    _healthy(url, deadline)
    assert user_manager.show("ActiveState") == "active"
    first = int(user_manager.show("MainPID"))
    # the manager's own child: in its cgroup, this install's pcrt serve, with the
    # environment the unit carries (the manager's own has none of it)
    assert first in user_manager.pids()
    assert Path(f"/proc/{first}/cgroup").read_text().rstrip().endswith("/app.slice/pcrt.service")
    argv = Path(f"/proc/{first}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    assert [a.decode() for a in argv[-3:]] == [pcrt, "serve", "--resume-on-start"]
    daemon_env = Path(f"/proc/{first}/environ").read_bytes().split(b"\0")
    assert f"PCRT_HOME={os.environ['PCRT_HOME']}".encode() in daemon_env
    assert f"PCRT_CONFIG={config}".encode() in daemon_env

    status = cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "Active: active (running)" in status.stdout and f"Main PID: {first}" in status.stdout

    restarted = cli("restart")
    assert restarted.returncode == 0 and "restarted" in restarted.stdout, restarted.stderr
    second = int(user_manager.show("MainPID"))
    assert second not in (0, first) and _gone(first, deadline)
    _healthy(url, deadline)

    # installed again (new settings, a new venv): what was just written is what runs
    again_installed = cli("install")
    assert again_installed.returncode == 0, again_installed.stdout + again_installed.stderr
    third = int(user_manager.show("MainPID"))
    assert third not in (0, second) and _gone(second, deadline)
    _healthy(url, deadline)

    logs = cli("logs", "--lines", "20")  # journalctl's answer: no journald runs here
    assert logs.returncode == 0 and "Traceback" not in logs.stderr, logs.stderr

    removed = cli("uninstall")
    assert removed.returncode == 0 and f"removed {unit}" in removed.stdout, removed.stderr
    assert not unit.exists() and not wanted.exists()
    assert _gone(third, deadline)
    assert user_manager.show("ActiveState") == "inactive"
    assert user_manager.show("LoadState") == "not-found"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)
    assert user_manager.pids() == {user_manager.pid}  # the manager alone is left

    # and the manager's refusals reach the user, not a "restarted"
    again = cli("restart")
    assert again.returncode == 1 and "Unit pcrt.service not found" in again.stderr, again
    unknown = cli("status")
    assert unknown.returncode not in (0, 1) and "could not be found" in unknown.stdout, unknown
    gone = cli("uninstall")
    assert gone.returncode == 1 and "no pcrt service installed" in gone.stderr
