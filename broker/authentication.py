"""Username/password authentication for a listener (``password_file``), seed 003's
"authorization only applies on a listener that also has authentication".

The file is mosquitto's password file, so ``mosquitto_passwd`` manages it: one
``username:hash`` line per user, ``#`` comments, where the hash is ``$7$ITERATIONS$SALT$HASH``
(PBKDF2-HMAC-SHA512, mosquitto's default) or ``$6$SALT$HASH`` (SHA-512 of password + salt),
salt and hash in base64. Plain-text passwords are refused. The file is read again when its
modification time or size changes, so users can be added without a restart; a file that
cannot be read keeps the previous users (and says why in the log).

:func:`hash_password` writes the ``$7$`` form (for tests and tooling).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
from pathlib import Path
from typing import Final

from lb.pem import FileSignature, file_signature

__all__ = ["PasswordFile", "PasswordFileError", "hash_password", "verify_password"]

logger = logging.getLogger(__name__)

# mosquitto_passwd's defaults (mosquitto 2.0): 101 PBKDF2 iterations, 12-byte salt.
DEFAULT_ITERATIONS: Final = 101
SALT_BYTES: Final = 12
# Refuse absurd iteration counts that would let one CONNECT burn seconds of CPU.
MAX_ITERATIONS: Final = 1_000_000


class PasswordFileError(Exception):
    """A password file line that cannot be used: ``file:line: problem``."""


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _check_hash(text: str) -> None:
    parts = text.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations = int(parts[2])
            if not 1 <= iterations <= MAX_ITERATIONS:
                raise ValueError(f"iteration count {iterations}")
            base64.b64decode(parts[3], validate=True)
            base64.b64decode(parts[4], validate=True)
            return
        if len(parts) == 4 and parts[1] == "6":
            base64.b64decode(parts[2], validate=True)
            base64.b64decode(parts[3], validate=True)
            return
    except (ValueError, binascii.Error) as error:
        raise ValueError(f"malformed hash: {error}") from None
    raise ValueError("not a mosquitto_passwd hash ($7$... or $6$...); plain text is refused")


def verify_password(stored: str, password: bytes) -> bool:
    parts = stored.split("$")
    if len(parts) == 5 and parts[1] == "7":
        salt = base64.b64decode(parts[3])
        expected = base64.b64decode(parts[4])
        digest = hashlib.pbkdf2_hmac("sha512", password, salt, int(parts[2]))
    elif len(parts) == 4 and parts[1] == "6":
        salt = base64.b64decode(parts[2])
        expected = base64.b64decode(parts[3])
        digest = hashlib.sha512(password + salt).digest()
    else:
        return False
    return hmac.compare_digest(digest, expected)


def parse_password_file(text: str, origin: str) -> dict[str, str]:
    users: dict[str, str] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        username, separator, stored = line.rpartition(":")
        if not separator or not username:
            raise PasswordFileError(f"{origin}:{number}: expected username:hash")
        try:
            _check_hash(stored)
        except ValueError as error:
            raise PasswordFileError(f"{origin}:{number}: user {username!r}: {error}") from None
        users[username] = stored
    return users


class PasswordFile:
    """The users of one ``password_file``; :meth:`check` is the listener's authenticator."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.users: dict[str, str] = {}
        self._signature: FileSignature = ()
        self._load(initial=True)

    def _load(self, initial: bool = False) -> None:
        signature = file_signature([self.path])
        try:
            text = self.path.read_text(encoding="utf-8")
            users = parse_password_file(text, str(self.path))
        except (OSError, UnicodeDecodeError, PasswordFileError) as error:
            self._signature = signature
            message = getattr(error, "strerror", None) or str(error)
            if initial:
                raise PasswordFileError(f"{self.path}: {message}") from None
            logger.error(
                "password file not reloaded, keeping %d users: %s", len(self.users), message
            )
            return
        self.users = users
        self._signature = signature
        if not initial:
            logger.info("password file %s reloaded: %d users", self.path, len(users))

    def check(self, username: str | None, password: bytes | None) -> bool:
        if file_signature([self.path]) != self._signature:
            self._load()
        if username is None or password is None:
            return False
        stored = self.users.get(username)
        if stored is None:
            # Spend the same time as for a known user, so names cannot be probed.
            verify_password(f"$7${DEFAULT_ITERATIONS}$AAAAAAAAAAAAAAAA$AAAA", password)
            return False
        return verify_password(stored, password)
