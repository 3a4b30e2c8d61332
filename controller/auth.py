"""Tokens: 256 random bits, stored as sha256, compared in constant time.

A token reads `<prefix>_<id>_<secret>`: the id finds the stored row, the secret is
checked against its hash with hmac.compare_digest. The operator token lives in
DATA/operator.token (mode 0600, created on first start).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from controller.errors import ControllerError

ENROLLMENT_PREFIX = "sle"
AGENT_PREFIX = "sla"
OPERATOR_PREFIX = "slo"
_TOKEN = re.compile(r"(sle|sla|slo)_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


class AuthError(ControllerError):
    """A credential that is missing, malformed, unknown, used, expired or for someone else."""


@dataclass(frozen=True)
class NewToken:
    text: str  # handed out once, never stored
    id: str
    secret_hash: bytes


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_token(prefix: str) -> NewToken:
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)  # 256 bits
    return NewToken(f"{prefix}_{token_id}_{secret}", token_id, hash_secret(secret))


def parse_token(text: str, prefix: str, what: str) -> tuple[str, str]:
    """-> (id, secret); AuthError if it is not a token of that kind."""
    match = _TOKEN.fullmatch(text.strip())
    if not match or match.group(1) != prefix:
        raise AuthError(
            f"{what}: expected a token like {prefix}_<16 hex>_<43 base64url>, got a malformed one"
        )
    return match.group(2), match.group(3)


def secret_matches(secret: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


@dataclass(frozen=True)
class OperatorKey:
    """The operator token's hash; the token itself stays in its file."""

    token_id: str
    secret_hash: bytes

    def check(self, text: str | None) -> None:
        if text is None:
            raise AuthError(
                "operator token: expected 'Authorization: Bearer <token>' (see DATA/operator.token)"
            )
        token_id, secret = parse_token(text, OPERATOR_PREFIX, "operator token")
        # both compared in constant time; the id is not secret but is checked the same way
        if not (hmac.compare_digest(token_id, self.token_id) & secret_matches(secret, self.secret_hash)):
            raise AuthError("operator token: not the one in DATA/operator.token")


def operator_token_path(data_dir: Path) -> Path:
    return data_dir / "operator.token"


def ensure_operator_token(data_dir: Path) -> OperatorKey:
    """Read DATA/operator.token, creating it (mode 0600) if absent."""
    path = operator_token_path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_operator_key(path)
    token = new_token(OPERATOR_PREFIX)
    with os.fdopen(fd, "w") as f:
        f.write(token.text + "\n")
        f.flush()
        os.fsync(f.fileno())
    return OperatorKey(token.id, token.secret_hash)


def read_operator_token(path: Path) -> str:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise AuthError(f"operator token {path}: expected mode 0600, found {mode:04o} (chmod 600 {path})")
    return path.read_text().strip()


def read_operator_key(path: Path) -> OperatorKey:
    token_id, secret = parse_token(read_operator_token(path), OPERATOR_PREFIX, f"operator token {path}")
    return OperatorKey(token_id, hash_secret(secret))
