"""Reading disk images qemu understands (qcow2, vmdk, vhdx...) through qemu-nbd.

qemu-nbd serves the image, read-only, on a private unix socket, inside the
sandbox of sandbox.py (as do qemu-img info and map); this is the
smallest client that reads from it (fixed newstyle handshake, simple replies).
The allocation map comes from `qemu-img map`, so unallocated or zero ranges are
never read. No temporary copy of the image is made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from controller.images.errors import ImageToolError
from controller.images.sandbox import SOCKET_DIR, SandboxedImage, bwrap_argv, limited, qemu_tool

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_EXPORT_NAME = 1
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
CMD_READ = 0
CMD_DISC = 2
MAX_REQUEST = 8 << 20


class NbdError(ImageToolError):
    pass


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise NbdError(f"qemu-nbd closed the connection while sending {what}")
        got += k
    return bytes(buf)


class NbdClient:
    def __init__(self, socket_path: str, export: str = "") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self._lock = threading.Lock()
        self._cookie = 0
        self.size = self._handshake(export.encode())

    def _handshake(self, name: bytes) -> int:
        hello = _recv_exact(self.sock, 18, "the greeting")
        if hello[:8] != NBDMAGIC or hello[8:16] != IHAVEOPT:
            raise NbdError(f"not a newstyle NBD server: greeting {hello[:16]!r}")
        (server_flags,) = struct.unpack(">H", hello[16:18])
        if not server_flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("NBD server lacks fixed newstyle negotiation")
        no_zeroes = bool(server_flags & FLAG_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0)))
        self.sock.sendall(IHAVEOPT + struct.pack(">II", OPT_EXPORT_NAME, len(name)) + name)
        reply = _recv_exact(self.sock, 10 if no_zeroes else 134, "the export size")
        size: int = struct.unpack(">Q", reply[:8])[0]
        return size

    def pread(self, length: int, offset: int) -> bytes:
        parts = []
        with self._lock:
            while length > 0:
                n = min(length, MAX_REQUEST)
                self._cookie += 1
                self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, self._cookie, offset, n))
                magic, error, cookie = struct.unpack(">IIQ", _recv_exact(self.sock, 16, "a reply"))
                if magic != REPLY_MAGIC or cookie != self._cookie:
                    raise NbdError(f"bad NBD reply (magic {magic:#x}, cookie {cookie})")
                if error:
                    raise NbdError(f"NBD read of {n} bytes at {offset} failed: errno {error}")
                parts.append(_recv_exact(self.sock, n, f"{n} bytes at offset {offset}"))
                offset += n
                length -= n
        return b"".join(parts)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        self.sock.close()


def image_info(image: SandboxedImage) -> dict[str, object]:
    out = _run(image.top_only(), ["qemu-img", "info", "--output=json"])
    info: dict[str, object] = json.loads(out)
    return info


def data_ranges(image: SandboxedImage) -> list[tuple[int, int]]:
    """Ranges [start, end) that qemu says may hold non-zero data."""
    out = _run(image, ["qemu-img", "map", "--output=json"])
    ranges: list[tuple[int, int]] = []
    for ext in json.loads(out):
        if ext.get("zero") and not ext.get("data"):
            continue
        start, end = int(ext["start"]), int(ext["start"]) + int(ext["length"])
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def _run(image: SandboxedImage, cmd: list[str]) -> str:
    argv = limited(bwrap_argv(image, [qemu_tool(cmd[0]), *cmd[1:], image.target()]))
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, pass_fds=image.fds())
    if proc.returncode != 0:
        raise NbdError(f"{' '.join(cmd)} (sandboxed) failed: {proc.stderr.strip()}")
    return proc.stdout


class QemuNbdServer:
    """qemu-nbd serving one image read-only on a private socket, for the life of a `with`."""

    def __init__(self, path: str, image: SandboxedImage) -> None:
        self.path = path
        fmt = image.layers[0].format
        self._dir = tempfile.mkdtemp(prefix="sledge-nbd-")
        self.socket_path = os.path.join(self._dir, "sock")
        inner = [
            qemu_tool("qemu-nbd"),
            "--read-only",
            "--persistent",
            "-k",
            f"{SOCKET_DIR}/sock",
            image.target(),
        ]
        self._proc = subprocess.Popen(
            bwrap_argv(image, inner, socket_dir=self._dir),
            pass_fds=image.fds(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        while not Path(self.socket_path).exists():
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                self.close()
                raise NbdError(f"qemu-nbd could not serve {path} as {fmt}: {err.strip()}")
            if time.monotonic() > deadline:
                self.close()
                raise NbdError(f"qemu-nbd did not start serving {path} within 15 s")
            time.sleep(0.02)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)
