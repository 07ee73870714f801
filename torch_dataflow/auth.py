"""Shared-secret checks for stores and ledgers (DESIGN invariant 5).

A backend created with a secret records a *verifier* (salt + PBKDF2 digest)
where every client can read it (a file in the store directory, a row in the
ledger, a key in Redis). A client presents its own secret; the two digests are
compared with :func:`hmac.compare_digest` at attach and on every data-path call.
A backend created without a secret rejects clients that present one, so a
typo in deployment cannot silently run unauthenticated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass

from .errors import AuthError

__all__ = ["SecretGuard", "make_verifier"]

_ITERATIONS = 20_000


def _digest(secret: str | bytes, salt: bytes) -> bytes:
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    return hashlib.pbkdf2_hmac("sha256", raw, salt, _ITERATIONS)


def make_verifier(secret: str | bytes) -> str:
    """A JSON verifier for ``secret``: what a backend stores, never the secret."""
    salt = os.urandom(16)
    return json.dumps({"salt": salt.hex(), "digest": _digest(secret, salt).hex(), "kdf": "pbkdf2-sha256"})


@dataclass
class SecretGuard:
    """The credential a client presents, checked against a backend's verifier.

    Example:
        >>> v = make_verifier("s3cret")
        >>> g = SecretGuard.attach("s3cret", v, "ledger x")
        >>> g.check()          # constant-time, on every call
        >>> SecretGuard.attach("wrong", v, "ledger x")
        Traceback (most recent call last):
        ...
        torch_dataflow.errors.AuthError: wrong or missing secret for ledger x
    """

    what: str
    expected: bytes | None
    presented: bytes | None

    @classmethod
    def attach(cls, secret: str | bytes | None, verifier: str | None, what: str) -> SecretGuard:
        """Check ``secret`` against ``verifier`` (either may be ``None``)."""
        if verifier is None:
            guard = cls(what, None, None if secret is None else b"")
        else:
            v = json.loads(verifier)
            salt = bytes.fromhex(v["salt"])
            presented = None if secret is None else _digest(secret, salt)
            guard = cls(what, bytes.fromhex(v["digest"]), presented)
        guard.check()
        return guard

    def check(self) -> None:
        """Raise :class:`AuthError` unless the presented credential matches."""
        if self.expected is None and self.presented is None:
            return
        if self.expected is None:
            raise AuthError(f"{self.what} has no secret configured, but a secret was given")
        if self.presented is None or not hmac.compare_digest(self.expected, self.presented):
            raise AuthError(f"wrong or missing secret for {self.what}")
