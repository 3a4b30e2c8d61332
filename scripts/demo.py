"""The demo: an empty QEMU machine PXE-boots the sledge agent, is imaged, and reboots into its disk.

Run by scripts/demo (which sets things up first). Narrated; tidy on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import VENV_BIN, Controller, Vm, build_demo_image, build_live_image

MAC = "52:54:00:5e:d6:01"
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")
START = time.monotonic()


def say(text: str) -> None:
    print(f"\n{BOLD}[{time.monotonic() - START:5.1f}s] {text}{RESET}", flush=True)


def guest(line: str) -> None:
    if any(k in line for k in ("sledge", "SLEDGE", "iPXE", "http://", "Booting", "DHCP")):
        print(f"{DIM}  vm | {line[:140]}{RESET}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed for each boot")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sledge-demo-"))
    controller = Controller(work / "data")
    vm: Vm | None = None
    try:
        say("1/6 prep: the live image (kernel + initramfs with the agent) and a bootable demo image")
        kernel, initrd = build_live_image()
        image = build_demo_image("v1")
        mib = (kernel.stat().st_size >> 20, initrd.stat().st_size >> 20)
        print(f"  live image: {mib[0]} MiB kernel, {mib[1]} MiB initramfs")
        print(
            f"  demo image: {image} ({image.stat().st_size >> 20} MiB, MBR + extlinux + a marker initramfs)"
        )

        say("2/6 stage: start the controller on loopback and import the image into its chunk store")
        controller.install_boot_files(kernel, initrd)
        controller.start()
        digest = controller.import_image(image, "demo", "v1")
        print(f"  controller {controller.url} (guests see http://10.0.2.100:8080)")
        print(f"  imported demo:v1, manifest {digest}")
        listing = subprocess.run(
            [str(VENV_BIN / "sledge"), "image", "list", "--store", str(controller.data / "store")],
            capture_output=True,
            text=True,
            check=True,
        )
        print(listing.stdout, end="")

        say("3/6 an empty machine (4 GiB blank disk) powers on and PXE-boots the agent")
        (work / "vm").mkdir(parents=True)
        vm = Vm(work / "vm", controller.port, MAC, echo=guest)
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

        say("6/6 the machine reboots: iPXE hears 'boot from disk' and it boots its new disk")
        vm.wait_for(r"SLEDGE-DEMO-IMAGE-BOOTED v1", args.timeout, since=mark)
        print(f"  {BOLD}the machine booted its own disk and printed the marker{RESET}")
        print(controller.sledge("machines").stdout, end="")
        with contextlib.suppress(subprocess.TimeoutExpired):
            vm.wait_exit(60)  # the demo image powers off
        say(f"done in {time.monotonic() - START:.0f} s")
        return 0
    except (TimeoutError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        print(f"(work directory: {work}; console log: {work / 'vm' / 'console.log'})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        if vm is not None:
            vm.stop()
        controller.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
