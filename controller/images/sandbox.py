"""Running qemu-img / qemu-nbd so that the only image files they can open are the inspected ones.

Two independent fences, so that a gap in inspection (inspect*.py) still reads nothing:

1. A bubblewrap sandbox (mount, pid, net, ipc, uts and, where allowed, user namespaces;
   no capabilities): its file system is /usr read-only (the binaries and their block
   driver modules) without /usr/local, /dev/null, an empty /tmp, and each inspected
   layer bound by its open descriptor at /sledge/N. Whatever name a header carries
   (/etc/..., the store, a token file, json:{...}), qemu finds nothing there; with no
   network it cannot fetch http: or nbd: references either. A mount namespace is a
   property of the process, so it holds for every format driver and qemu version,
   which a list of options cannot promise.
2. Every node pinned: qemu is given a json: node graph naming the format driver and
   the plain `file` (or `host_device`) protocol of each layer, and `backing` as the
   next inspected layer or null, so the names in the headers are not followed at all.
   (qcow2 external data files and VMDK extents cannot be pinned this way; fence 1
   and the inspection hold those.)

info and map also run under resource limits (address space, CPU time), because a
hostile header can make them allocate or loop (as OpenStack does with qemu-img).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from controller.images.errors import ImageToolError

SANDBOX_DIR = "/sledge"
SOCKET_DIR = "/run/sledge"
INFO_LIMITS = ("--as=2147483648", "--cpu=60")


class SandboxError(ImageToolError):
    """bwrap or the sandboxed qemu tool could not run."""


@dataclass(frozen=True)
class SandboxLayer:
    fd: int
    block_device: bool
    format: str


@dataclass(frozen=True)
class SandboxedImage:
    """An image (layers[0]) and its permitted backing chain, as qemu will be shown them."""

    layers: tuple[SandboxLayer, ...]
    pin_nodes: bool = True

    def inner_path(self, i: int) -> str:
        return f"{SANDBOX_DIR}/{i}"

    def target(self) -> str:
        """The json: filename qemu opens: every layer's format and protocol named."""

        def node(i: int) -> dict[str, object]:
            layer = self.layers[i]
            protocol = "host_device" if layer.block_device else "file"
            spec: dict[str, object] = {
                "driver": layer.format,
                "file": {"driver": protocol, "filename": self.inner_path(i)},
            }
            # raw has no backing to pin (and nested, qemu rejects the option on it)
            if self.pin_nodes and layer.format != "raw":
                spec["backing"] = node(i + 1) if i + 1 < len(self.layers) else None
            return spec

        return "json:" + json.dumps(node(0), separators=(",", ":"))

    def top_only(self) -> SandboxedImage:
        """The image without its chain: what `qemu-img info` opens (it skips backing files,
        and then refuses the pinned backing options it did not use)."""
        return SandboxedImage(self.layers[:1], self.pin_nodes)

    def fds(self) -> tuple[int, ...]:
        return tuple(layer.fd for layer in self.layers)


def qemu_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SandboxError(f"{name} not found: install qemu-utils to import non-raw images")
    real = os.path.realpath(path)
    if not real.startswith("/usr/") or real.startswith("/usr/local/"):
        raise SandboxError(f"{name} at {real}: expected it under /usr (the sandbox shows only /usr)")
    return real


def bwrap_argv(image: SandboxedImage, command: list[str], socket_dir: str | None = None) -> list[str]:
    """The bubblewrap command line that runs `command` seeing only the image's layers."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError("bwrap not found: install bubblewrap (qemu reads images only inside it)")
    argv = [
        bwrap,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin",
        "--cap-drop", "ALL",
        "--ro-bind", "/usr", "/usr",
        "--tmpfs", "/usr/local",
        "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin",
        "--dev-bind", "/dev/null", "/dev/null",
        "--tmpfs", "/tmp",
    ]  # fmt: skip
    for i, layer in enumerate(image.layers):
        if layer.block_device:
            # bind mounts of descriptors are nodev; a device node needs --dev-bind by path,
            # and /proc/self/fd/N is bwrap's own inherited descriptor
            argv += ["--dev-bind", f"/proc/self/fd/{layer.fd}", image.inner_path(i)]
        else:
            argv += ["--ro-bind-fd", str(layer.fd), image.inner_path(i)]
    if socket_dir is not None:
        argv += ["--bind", socket_dir, SOCKET_DIR]
    return [*argv, "--", *command]


def limited(argv: list[str]) -> list[str]:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise SandboxError("prlimit not found: install util-linux")
    return [prlimit, *INFO_LIMITS, *argv]
