"""The demo: an empty QEMU machine network-boots the sledge agent the way a rack server does, is
imaged, and boots its new disk when the controller answers `exit`.

Run by scripts/demo (which sets things up first). Everything happens in a network namespace the
demo creates: a bridge, the machine's tap device, and `sledge serve --dhcp full` with its dnsmasq
(DHCP + TFTP) on the bridge. UEFI (OVMF: the firmware's own PXE, TFTP snponly.efi, then iPXE) by
default, SeaBIOS with --bios. Narrated; the namespace and every process in it are gone on exit,
on failure and on Ctrl-C too.
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

from lab import REPO, VENV_BIN, build_demo_image, build_live_image
from netlab import Lan, NetController, NetVm

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
        say("1/6 prep: the live image (kernel + initramfs with the agent) and a bootable demo image")
        kernel, initrd = build_live_image()
        image = uefi_demo_image() if firmware == "uefi" else build_demo_image("v1")
        mib = (kernel.stat().st_size >> 20, initrd.stat().st_size >> 20)
        print(f"  live image: {mib[0]} MiB kernel, {mib[1]} MiB initramfs")
        kind = (
            "GPT + EFI system partition + GRUB"
            if firmware == "uefi"
            else "MBR + extlinux + a marker initramfs"
        )
        print(f"  demo image: {image} ({image.stat().st_size >> 20} MiB, {kind})")

        say("2/6 stage: a provisioning network (bridge in a network namespace), the controller on it")
        lan = Lan().up()
        dhcp = ["--dhcp", "full", "--interface", "br0", "--dhcp-range", "10.77.0.100,10.77.0.200"]
        controller = NetController(work / "data", lan, dhcp)
        controller.install_boot_files(kernel, initrd)
        controller.start()
        digest = controller.import_image(image, "demo", "v1")
        print(f"  namespace {lan.ns}: bridge br0 {lan.address}; nothing leaves it")
        print(f"  sledge serve --dhcp full on br0: {controller.url}, its dnsmasq answers DHCP and TFTP")
        print(f"  imported demo:v1, manifest {digest}")
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
        vm.wait_for(r"sledge-agent: registered as machine", args.timeout)
        say("4/6 it registered with its inventory")
        print(controller.sledge("machines").stdout, end="")
        show = controller.sledge("machine", "show", MAC).stdout.splitlines()
        print("\n".join(show[:25]))

        say("5/6 deploy demo:v1 to it, with live progress (verified chunk by chunk)")
        t0 = time.monotonic()
        mark = vm.mark()
        result = controller.sledge("deploy", MAC, "demo:v1", "--wait", check=False)
        print(result.stderr[-3000:], end="")
        print(result.stdout, end="")
        if result.returncode != 0:
            print("  deploy failed", file=sys.stderr)
            return 1
        print(f"  deployed in {time.monotonic() - t0:.1f} s")

        say("6/6 the machine reboots: iPXE asks the controller, hears `exit`, the firmware boots the disk")
        vm.wait_for(r"is deployed, booting from disk", args.timeout, since=mark)
        vm.wait_for(MARKER, args.timeout, since=mark)
        print(f"  {BOLD}the machine booted its own disk and printed the marker{RESET}")
        print(controller.sledge("machines").stdout, end="")
        say(f"done in {time.monotonic() - START:.0f} s ({firmware})")
        return 0
    except (TimeoutError, RuntimeError, subprocess.CalledProcessError) as exc:
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
