"""The demo: an empty QEMU machine network-boots the sledge agent the way a rack server does, is
imaged, and boots its new disk when the controller answers `exit`.

Run by scripts/demo (which sets things up first). Everything happens in a network namespace the
demo creates: a bridge, the machine's tap device, and `sledge serve --dhcp full` with its dnsmasq
(DHCP + TFTP) on the bridge. UEFI (OVMF: the firmware's own PXE, TFTP snponly.efi, then iPXE) by
default, SeaBIOS with --bios. Narrated; the namespace and every process in it are gone on exit,
on failure and on Ctrl-C too.

With --os the image is a real operating system: the Debian 12 cloud image of scripts/build-os-image
(GPT, GRUB for BIOS and UEFI, systemd, cloud-init), deployed with user-data that sets the hostname
and creates a user with an SSH key made for the demo. The demo ends with cloud-init's result and
an SSH login to the address the machine's own DHCP client leased on the provisioning network.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import REPO, VENV_BIN, build_demo_image, build_live_image, build_os_image
from netlab import Lan, NetController, NetVm
from osdemo import find_login, make_key, ssh, user_data

from controller.boot.prepare import lease_file

MAC = "52:54:00:5e:d6:01"
MARKER = "SLEDGE-DEMO-IMAGE-BOOTED v1"
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")
START = time.monotonic()
SHOWN = (
    "sledge",
    "SLEDGE",
    "iPXE",
    "http://",
    "Booting",
    "DHCP",
    "PXE",
    "NBP",
    "BdsDxe",
    "Configuring",
    "GRUB",
    "Cloud-init",
    "Debian GNU/Linux",
)


def say(text: str) -> None:
    print(f"\n{BOLD}[{time.monotonic() - START:5.1f}s] {text}{RESET}", flush=True)


def guest(line: str) -> None:
    if any(k in line for k in SHOWN):
        print(f"{DIM}  vm | {line[:140]}{RESET}", flush=True)


def uefi_demo_image() -> Path:
    """GPT + an EFI system partition with GRUB at the removable-media path (EFI/BOOT/BOOTX64.EFI)."""
    out = REPO / "build" / "demo" / "demo-uefi-v1.img"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(REPO / "scripts" / "build-uefi-demo-image"), str(out), "--marker", MARKER],
            check=True,
            stdout=sys.stderr,
        )
    return out


def stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bios", action="store_true", help="boot the machine with SeaBIOS instead of UEFI")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--os", action="store_true", help="deploy the Debian 12 cloud image and log in over SSH (issue 13)"
    )
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="with --os: print where the guest's boot went (systemd-analyze, cloud-init analyze)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed for each boot")
    args = parser.parse_args()
    firmware = "bios" if args.bios else "uefi"
    # Ctrl-C raises KeyboardInterrupt already; a kill or a closed terminal must clean up as well
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGHUP, stop_on_signal)
    work = Path(tempfile.mkdtemp(prefix="sledge-demo-"))
    lan: Lan | None = None
    vm: NetVm | None = None
    try:
        what = "the Debian 12 cloud image" if args.os else "a bootable demo image"
        say(f"1/6 prep: the live image (kernel + initramfs with the agent) and {what}")
        kernel, initrd = build_live_image()
        name, version = ("debian", "12") if args.os else ("demo", "v1")
        if args.os:
            image = build_os_image()
            kind = "qcow2: GPT, GRUB for BIOS and UEFI, systemd, cloud-init, openssh-server"
        elif firmware == "uefi":
            image, kind = uefi_demo_image(), "GPT + EFI system partition + GRUB"
        else:
            image, kind = build_demo_image("v1"), "MBR + extlinux + a marker initramfs"
        mib = (kernel.stat().st_size >> 20, initrd.stat().st_size >> 20)
        print(f"  live image: {mib[0]} MiB kernel, {mib[1]} MiB initramfs")
        print(f"  {name} image: {image} ({image.stat().st_size >> 20} MiB, {kind})")

        say("2/6 stage: a provisioning network (bridge in a network namespace), the controller on it")
        lan = Lan().up()
        dhcp = ["--dhcp", "full", "--interface", "br0", "--dhcp-range", "10.77.0.100,10.77.0.200"]
        controller = NetController(work / "data", lan, dhcp)
        controller.install_boot_files(kernel, initrd)
        controller.start()
        digest = controller.import_image(image, name, version)
        print(f"  namespace {lan.ns}: bridge br0 {lan.address}; nothing leaves it")
        print(f"  sledge serve --dhcp full on br0: {controller.url}, its dnsmasq answers DHCP and TFTP")
        print(f"  imported {name}:{version}, manifest {digest}")
        listing = subprocess.run(
            [str(VENV_BIN / "sledge"), "image", "list", "--store", str(controller.data / "store")],
            capture_output=True,
            text=True,
            check=True,
        )
        print(listing.stdout, end="")

        board = (
            "UEFI (OVMF: its own PXE, TFTP snponly.efi)" if firmware == "uefi" else "BIOS (SeaBIOS, iPXE ROM)"
        )
        say(f"3/6 an empty machine (4 GiB blank disk, {board}) powers on and network-boots the agent")
        vm = NetVm(work / "vm", lan, MAC, firmware, echo=guest)
        vm.start()
        powered = time.monotonic()
        vm.wait_for(r"sledge-agent: registered as machine", args.timeout)
        say("4/6 it registered with its inventory")
        print(controller.sledge("machines").stdout, end="")
        show = controller.sledge("machine", "show", MAC).stdout.splitlines()
        print("\n".join(show[:25]))

        deploy = [MAC, f"{name}:{version}", "--wait"]
        if args.os:
            key = make_key(work / "id_ed25519")
            (work / "user-data").write_text(user_data(key, "sledge-demo", MARKER))
            deploy += ["--user-data", str(work / "user-data")]
            say(f"5/6 deploy {name}:{version} with user-data (hostname, user `op` with this demo's SSH key)")
        else:
            say(f"5/6 deploy {name}:{version} to it, with live progress (verified chunk by chunk)")
        t0 = time.monotonic()
        mark = vm.mark()
        result = controller.sledge("deploy", *deploy, check=False)
        print(result.stderr[-3000:], end="")
        print(result.stdout, end="")
        if result.returncode != 0:
            print("  deploy failed", file=sys.stderr)
            return 1
        print(f"  deployed in {time.monotonic() - t0:.1f} s")

        say("6/6 the machine reboots: iPXE asks the controller, hears `exit`, the firmware boots the disk")
        vm.wait_for(r"is deployed, booting from disk", args.timeout, since=mark)
        if args.os:
            say("Debian boots: GRUB, systemd, cloud-init reads the seed; then an SSH login")
            leases = lease_file(controller.data)  # dnsmasq runs as the controller's child
            host = find_login(key, leases, MAC, lan.ns, vm, args.timeout)
            login = time.monotonic() - powered
            print(f"  {BOLD}power-on to SSH login: {login:.0f} s{RESET} (op@{host.address})")
            print(ssh(key, host, "cloud-init status --long --wait", timeout=args.timeout), end="")
            print(ssh(key, host, "hostname; id; cat /etc/sledge-test; sudo -n id -u; df -h /"), end="")
            if args.analyze:
                where = "systemd-analyze; systemd-analyze blame | head -15; sudo cloud-init analyze show"
                print(ssh(key, host, where, timeout=args.timeout), end="")
            say(f"done in {time.monotonic() - START:.0f} s ({firmware}, Debian 12)")
            return 0
        vm.wait_for(MARKER, args.timeout, since=mark)
        print(f"  {BOLD}the machine booted its own disk and printed the marker{RESET}")
        print(controller.sledge("machines").stdout, end="")
        say(f"done in {time.monotonic() - START:.0f} s ({firmware})")
        return 0
    except (TimeoutError, RuntimeError, AssertionError, subprocess.SubprocessError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        print(f"(work directory: {work}; console log: {work / 'vm' / 'console.log'})", file=sys.stderr)
        args.keep = True
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        if vm is not None:
            vm.stop()
        if lan is not None:
            lan.down()  # the controller and its dnsmasq, then the namespace
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
