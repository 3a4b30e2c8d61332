"""initramfs/init: which NIC gets a DHCP client, and when (udev_named, start_dhcp_clients,
bring_up_network), run by dash on a made-up sysfs and udev database.

The live image's /init is dash; sourced by a shell that is not PID 1 it defines its functions and
stops. udev, ip, udhcpc and sleep are shell functions here: the tests look at the decisions.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.tools import need

INIT = Path(__file__).resolve().parents[2] / "initramfs" / "init"

PRELUDE = """
. "$INIT"
sysnet=$T/net udevdb=$T/udev dhcpdir=$T/dhcp udev=1
mkdir -p "$dhcpdir/client" "$udevdb"
log() { echo "LOG $*"; }
ip() { :; }
udevadm() { return 1; }
dhcp_client() { echo "CLIENT $1"; }
"""


def nic(root: Path, name: str, index: int, kind: int = 1) -> None:
    d = root / "net" / name
    d.mkdir(parents=True)
    (d / "type").write_text(f"{kind}\n")
    (d / "ifindex").write_text(f"{index}\n")


def entry(root: Path, index: int, chosen: str | None) -> None:
    (root / "udev").mkdir(parents=True, exist_ok=True)
    lines = ["I:12345", "E:ID_NET_DRIVER=virtio_net"] + ([f"E:ID_NET_NAME={chosen}"] if chosen else [])
    (root / "udev" / f"n{index}").write_text("\n".join(lines) + "\n")


def run(root: Path, script: str) -> list[str]:
    need("dash")  # the live image's /bin/sh
    dash = shutil.which("dash")
    assert dash is not None
    done = subprocess.run(
        [dash, "-c", PRELUDE + script],
        env={"INIT": str(INIT), "T": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def clients(out: list[str]) -> list[str]:
    return [line.split()[1] for line in out if line.startswith("CLIENT ")]


@pytest.mark.parametrize(
    ("name", "chosen", "settled", "started"),
    [
        ("eth0", None, 0, False),  # no entry: udev has not handled it
        ("eth0", None, 1, False),  # udev's queue seen empty, but its event not yet handled
        ("eth0", None, 2, True),  # 5 s of idle udev, or a blocking settle: any name goes
        ("eth0", "ens3", 0, False),  # udev chose ens3: the rename is still to come
        ("eth0", "ens3", 1, True),  # udev idle, the rename failed: eth0 for good
        ("ens3", "ens3", 0, True),  # named as udev chose
        ("eth0", "", 0, True),  # no name chosen by the rules: the kernel's stays
    ],
)
def test_a_nic_gets_its_client_once_udev_has_named_it(
    tmp_path: Path, name: str, chosen: str | None, settled: int, started: bool
) -> None:
    nic(tmp_path, "lo", 1, kind=772)
    nic(tmp_path, name, 2)
    if chosen is not None:
        entry(tmp_path, 2, chosen)
    out = run(tmp_path, f'settled={settled}; start_dhcp_clients; wait; echo "n=$n pending=$pending"')
    assert clients(out) == ([name] if started else [])
    assert out[-1] == ("n=1 pending=0" if started else "n=0 pending=1")


def test_a_nic_with_a_client_is_counted_and_not_started_again(tmp_path: Path) -> None:
    nic(tmp_path, "ens3", 2)
    entry(tmp_path, 2, "ens3")
    out = run(tmp_path, 'start_dhcp_clients; start_dhcp_clients; wait; echo "n=$n"')
    assert clients(out) == ["ens3"]
    assert out[-1] == "n=1"


# bring_up_network with udev's queue always empty: the moment between a driver's load and its
# NIC's event reaching udevd, seen on machines with more than one CPU.
LOOP = """
udev_settled() { return 0; }
coldplug_rest() { rest=1; }
ticks=0
sleep() { ticks=$((ticks + 1)); event; }
dhcp_client() { echo "CLIENT $1"; : >"$dhcpdir/failed/$1"; }
bring_up_network
wait
echo "ticks=$ticks settled=$settled"
"""


def test_a_nic_renamed_while_udev_looked_idle_gets_its_client_under_its_new_name(tmp_path: Path) -> None:
    nic(tmp_path, "eth0", 2)
    out = run(
        tmp_path,
        # the third tick: udev renames eth0 to ens3 and writes its entry
        'event() { [ $ticks = 3 ] && mv "$sysnet/eth0" "$sysnet/ens3" && '
        'printf "E:ID_NET_NAME=ens3\\n" >"$udevdb/n2"; :; }' + LOOP,
    )
    assert clients(out) == ["ens3"]
    assert not any("kernel names" in line for line in out)


def test_a_nic_udev_never_handles_gets_its_client_5_s_after_udev_went_idle(tmp_path: Path) -> None:
    nic(tmp_path, "eth0", 2)
    out = run(tmp_path, "event() { :; }" + LOOP)
    assert clients(out) == ["eth0"]
    waited = [i for i, line in enumerate(out) if "without a udev entry 5 s after udev was idle" in line]
    assert waited and waited[0] < out.index("CLIENT eth0")
    ticks, settled = out[-1].split()
    assert int(ticks.split("=")[1]) >= 50  # 0.1 s each
    assert settled == "settled=2"
