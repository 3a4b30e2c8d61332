"""controller/boot against the real things: the TFTP root, a supervised child, and `sledge serve
--dhcp full` running Debian's dnsmasq on a bridge in a network namespace of the test's own, with a
busybox DHCP and TFTP client in a second namespace."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller import cli
from controller.boot import leases, tftp
from controller.boot.errors import OptionError
from controller.boot.supervisor import Backoff, Supervisor
from tests.tools import need

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from netlab import Lan  # noqa: E402

SLEDGE = str(REPO / ".venv" / "bin" / "sledge")
IPXE = Path("/usr/lib/ipxe")


def test_tftp_root_holds_exactly_the_ipxe_binaries(tmp_path: Path) -> None:
    source = tmp_path / "ipxe"
    source.mkdir()
    (source / "undionly.kpxe").write_bytes(b"bios" * 100)
    (source / "snponly.efi").write_bytes(b"efi" * 100)
    (source / "ipxe.efi").write_bytes(b"full" * 100)
    root = tmp_path / "tftp"
    root.mkdir()
    (root / "secret.txt").write_text("not for TFTP")
    (root / "sub").mkdir()
    (root / "undionly.kpxe").symlink_to(tmp_path / "elsewhere")
    tftp.fill(root, source, ("undionly.kpxe", "snponly.efi"))
    assert sorted(p.name for p in root.iterdir()) == ["snponly.efi", "undionly.kpxe"]
    assert not (root / "undionly.kpxe").is_symlink()
    assert (root / "undionly.kpxe").read_bytes() == b"bios" * 100
    (source / "snponly.efi").write_bytes(b"efi v2")  # a package upgrade reaches the root
    tftp.fill(root, source, ("undionly.kpxe", "ipxe.efi"))
    assert sorted(p.name for p in root.iterdir()) == ["ipxe.efi", "undionly.kpxe"]
    with pytest.raises(OptionError) as exc:
        tftp.fill(root, tmp_path / "no-ipxe", ("undionly.kpxe", "snponly.efi"))
    assert "no-ipxe/undionly.kpxe" in str(exc.value)


def test_backoff_doubles_to_its_limit_and_resets_after_a_stable_run() -> None:
    b = Backoff(first=1, limit=8, stable=60)
    delays = [b.next(None, 0)]
    for _ in range(5):
        delays.append(b.next(delays[-1], 0.5))
    assert delays == [1, 2, 4, 8, 8, 8]
    assert b.next(8, 61) == 1


def test_a_dying_child_is_restarted_with_its_output_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sledge.flaky")
    sup = Supervisor(
        ["sh", "-c", "echo child says hello; exit 3"], name="flaky", backoff=Backoff(first=0.05, limit=0.1)
    )

    async def scenario() -> None:
        task = asyncio.create_task(sup.run())
        deadline = time.monotonic() + 10
        while sup.starts < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await sup.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert sup.starts >= 3
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("child says hello") >= 3
    assert any(re.fullmatch(r"flaky exited with 3; restarting in 0 s", m) for m in messages), messages


def test_a_killed_child_is_restarted_and_stop_ends_it(tmp_path: Path) -> None:
    sup = Supervisor(["sleep", "300"], name="sleeper", backoff=Backoff(first=0.05))

    async def scenario() -> tuple[int, int]:
        task = asyncio.create_task(sup.run())
        while sup.pid is None:
            await asyncio.sleep(0.02)
        first = sup.pid
        os.kill(first, signal.SIGKILL)
        while sup.pid in (None, first):
            await asyncio.sleep(0.02)
        second = sup.pid
        assert second is not None
        await sup.stop()
        await asyncio.wait_for(task, 5)
        return first, second

    first, second = asyncio.run(scenario())
    assert first != second and sup.starts == 2
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)


def test_a_child_that_cannot_start_is_retried_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor([str(Path("/nonexistent/dnsmasq"))], name="ghost", backoff=Backoff(first=0.05))

    async def scenario() -> None:
        task = asyncio.create_task(sup.run())
        await asyncio.sleep(0.3)
        await sup.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert sup.starts == 0
    assert any("ghost exited with a start failure" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dhcp", "full", "--interface", "sledge-none0"], "--interface: expected an existing interface"),
        (
            ["--dhcp", "full", "--interface", "lo", "--dhcp-range", "10.9.0.2,10.9.0.9"],
            "--dhcp-range: expected",
        ),
        (["--dhcp", "full", "--interface", "lo"], "--dhcp-range: expected FIRST,LAST for --dhcp full"),
        (["--dhcp", "proxy", "--interface", "lo", "--dhcp-range", "127.0.0.2,127.0.0.9"], "--dhcp-range"),
        (["--dhcp", "full", "--interface", "lo", "--dhcp-range", "127.0.0.2,127.0.0.9"], "--url: expected"),
        (["--dhcp", "sometimes"], "--dhcp: expected one of off, proxy, full"),
        (["--dhcp", "full", "--lease-time", "30"], "--lease-time: expected at least 120 seconds"),
        (["--dhcp", "proxy", "--ipxe-efi", "grub"], "--ipxe-efi: expected one of snponly, ipxe"),
    ],
)
def test_serve_refuses_bad_boot_options_before_starting(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--data", str(tmp_path), *args]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "dnsmasq" / "dnsmasq.conf").exists()


def test_dhcp_config_prints_what_serve_would_run() -> None:
    out = subprocess.run(
        [SLEDGE, "dhcp-config", "--url", "http://10.0.0.1:8470", "--ipxe-efi", "ipxe"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "dhcp-range=NETWORK,proxy" in out and 'x86-64_EFI,"sledge iPXE (UEFI)",ipxe.efi' in out
    assert "dhcp-boot=tag:ipxe,http://10.0.0.1:8470/boot.ipxe" in out


@pytest.fixture
def lan() -> Iterator[Lan]:
    need("dnsmasq", "busybox", "ip")
    lan = Lan().up()
    try:
        yield lan
    finally:
        lan.down()


def wait_for(path: Path, pattern: str, timeout: float = 30) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (m := re.search(pattern, path.read_text())):
            return m
        time.sleep(0.1)
    raise AssertionError(f"{path} never showed {pattern!r}:\n{path.read_text() if path.exists() else ''}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.root
def test_serve_full_dhcp_leases_serves_only_ipxe_and_restarts_dnsmasq(tmp_path: Path, lan: Lan) -> None:
    data = tmp_path / "data"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = lan.spawn(
            [SLEDGE, "serve", "--listen", "0.0.0.0:8470", "--data", str(data), "--dhcp", "full",
             "--interface", "br0", "--dhcp-range", "10.77.0.100,10.77.0.120", "--lease-time", "120"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    first = int(wait_for(log, r"dnsmasq started \(pid (\d+)")[1])
    wait_for(log, r"DHCP, sockets bound exclusively to interface br0")
    assert "iPXE chains http://10.77.0.1:8470/boot.ipxe" in log.read_text()  # --url from br0's address

    client = lan.client("c1")
    mac = (
        subprocess.run(
            ["ip", "-n", client, "-j", "link", "show", "eth0"], check=True, capture_output=True, text=True
        )
        .stdout.split('"address":"')[1]
        .split('"')[0]
    )
    got = subprocess.run(
        ["ip", "netns", "exec", client, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5",
         "-T", "2", "-s", "/bin/true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    m = re.search(r"lease of (10\.77\.0\.\d+) obtained", got.stdout + got.stderr)
    assert m, got
    leased = leases.lookup(data / "dnsmasq" / "leases", mac, time.time())
    assert str(leased) == m[1]
    assert 100 <= int(m[1].rsplit(".", 1)[1]) <= 120

    subprocess.run(["ip", "-n", client, "addr", "add", "10.77.0.50/24", "dev", "eth0"], check=True)

    def fetch(name: str) -> subprocess.CompletedProcess[str]:
        dest = tmp_path / "got"
        dest.unlink(missing_ok=True)
        return subprocess.run(
            ["ip", "netns", "exec", client, "busybox", "tftp", "-g", "-r", name, "-l", str(dest), lan.ip],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert fetch("undionly.kpxe").returncode == 0
    assert (tmp_path / "got").read_bytes() == (IPXE / "undionly.kpxe").read_bytes()
    assert fetch("snponly.efi").returncode == 0
    for name in ("../dnsmasq.conf", "../leases", "../../operator.token", "/etc/passwd", "ipxe.efi"):
        assert fetch(name).returncode != 0, name

    os.kill(first, signal.SIGKILL)  # dnsmasq dies: the controller says so and starts another
    wait_for(log, r"dnsmasq exited with -9; restarting in 1 s")
    second = int(wait_for(log, r"dnsmasq started \(pid (\d+), start 2")[1])
    assert second != first and pid_alive(second)
    wait_for(log, rf"dnsmasq-dhcp\[{second}\]: DHCP, sockets bound")
    subprocess.run(["ip", "-n", client, "addr", "flush", "dev", "eth0"], check=True)
    again = subprocess.run(
        ["ip", "netns", "exec", client, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5",
         "-T", "2", "-s", "/bin/true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert f"lease of {m[1]} obtained" in again.stdout + again.stderr  # the lease file survived

    serve.send_signal(signal.SIGTERM)
    assert serve.wait(20) == 0
    assert not pid_alive(second)  # stopped with the controller
    assert "exiting on receipt of SIGTERM" in log.read_text()


@pytest.mark.root
def test_a_dnsmasq_left_by_a_killed_controller_is_ended_by_the_next(tmp_path: Path, lan: Lan) -> None:
    def serve(log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            return lan.spawn(
                [SLEDGE, "serve", "--listen", "0.0.0.0:8470", "--data", str(tmp_path / "data"), "--dhcp",
                 "proxy", "--interface", "br0"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    first = serve(tmp_path / "1.log")
    old = int(wait_for(tmp_path / "1.log", r"dnsmasq started \(pid (\d+)")[1])
    wait_for(tmp_path / "1.log", r"proxy on subnet 10\.77\.0\.0")
    first.kill()  # SIGKILL: no clean-up ran
    first.wait(10)
    assert pid_alive(old)
    second = serve(tmp_path / "2.log")
    wait_for(tmp_path / "2.log", rf"ended dnsmasq {old} left running by a previous controller")
    new = int(wait_for(tmp_path / "2.log", r"dnsmasq started \(pid (\d+)")[1])
    wait_for(tmp_path / "2.log", rf"dnsmasq-dhcp\[{new}\]: DHCP, proxy on subnet")
    assert not pid_alive(old) and pid_alive(new)
    second.send_signal(signal.SIGTERM)
    assert second.wait(20) == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
