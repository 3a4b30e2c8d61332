"""BMC passwords sealed at rest: AES-256-GCM (cryptography's AESGCM) with a key in DATA/bmc.key.

Why AES-GCM and not Fernet: GCM takes associated data, and each password is sealed with its
machine's id as that data, so a sealed password copied onto another machine's record does not
open. A sealed value is `v1:KEYID:BASE64(nonce || ciphertext+tag)`, a fresh 96-bit random nonce
each time. The key file has one key per line (`KEYID BASE64KEY`), the first one seals; all of
them open, which is what lets `sledge bmc rotate-key` re-seal every record while a running
controller keeps working (docs/power.md). The file is made with mode 600 and refused when
anyone but its owner may read it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from controller.power.errors import VaultError

KEY_FILE = "bmc.key"
_VERSION = "v1"


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:12]


@dataclass(frozen=True)
class Keys:
    keys: tuple[bytes, ...]  # the first seals; every one opens

    def seal(self, password: str, machine_id: str) -> str:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key = self.keys[0]
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(key).encrypt(nonce, password.encode(), machine_id.encode())
        return f"{_VERSION}:{key_id(key)}:{base64.b64encode(nonce + sealed).decode()}"

    def open(self, sealed: str, machine_id: str) -> str:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        parts = sealed.split(":")
        if len(parts) != 3 or parts[0] != _VERSION:
            raise VaultError(f"sealed BMC password of machine {machine_id}: expected {_VERSION}:KEYID:DATA")
        key = next((k for k in self.keys if key_id(k) == parts[1]), None)
        if key is None:
            raise VaultError(
                f"sealed BMC password of machine {machine_id}: sealed with key {parts[1]}, which "
                f"{KEY_FILE} no longer holds (it holds {', '.join(map(key_id, self.keys))})"
            )
        try:
            raw = base64.b64decode(parts[2], validate=True)
            return AESGCM(key).decrypt(raw[:12], raw[12:], machine_id.encode()).decode()
        except (binascii.Error, InvalidTag, UnicodeDecodeError, ValueError):
            raise VaultError(
                f"sealed BMC password of machine {machine_id}: does not open with key {parts[1]}"
            ) from None


def _write(path: Path, keys: tuple[bytes, ...]) -> None:
    """Atomically, mode 600 from the start (never a moment world-readable)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = "".join(f"{key_id(k)} {base64.b64encode(k).decode()}\n" for k in keys)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load(data_dir: Path, create: bool = True) -> Keys:
    """The keys in DATA/bmc.key, made (one new key) if absent and `create`."""
    path = data_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        if not create:
            raise VaultError(f"BMC key {path}: not found") from None
        data_dir.mkdir(parents=True, exist_ok=True)
        fresh = (secrets.token_bytes(32),)
        _write(path, fresh)
        return Keys(fresh)
    except OSError as exc:
        raise VaultError(f"BMC key {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise VaultError(
                f"BMC key {path}: expected mode 600, found {stat.S_IMODE(st.st_mode):03o} (chmod 600 it)"
            )
        text = os.read(fd, 1 << 16).decode(errors="replace")
    finally:
        os.close(fd)
    keys: list[bytes] = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        try:
            key = base64.b64decode(fields[1], validate=True) if len(fields) == 2 else b""
        except binascii.Error:
            key = b""
        if len(key) != 32 or key_id(key) != fields[0]:
            raise VaultError(f"BMC key {path}: line {n}: expected KEYID BASE64 of a 32-byte key")
        keys.append(key)
    if not keys:
        raise VaultError(f"BMC key {path}: expected at least one key, found none")
    return Keys(tuple(keys))


def add_key(data_dir: Path) -> Keys:
    """Put a new sealing key first, keeping the old ones for opening (rotation's first step)."""
    old = load(data_dir)
    keys = (secrets.token_bytes(32), *old.keys)
    _write(data_dir / KEY_FILE, keys)
    return Keys(keys)


def keep_only_first(data_dir: Path) -> Keys:
    """Drop every key but the sealing one (rotation's last step, once every record is re-sealed)."""
    keys = (load(data_dir, create=False).keys[0],)
    _write(data_dir / KEY_FILE, keys)
    return Keys(keys)
