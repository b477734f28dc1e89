"""The revocation index beside a CA: ``NAME-revoked.json``, the role of openssl's index.txt.

``lb-pki revoke`` appends to it and ``lb-pki crl`` turns it into a CRL signed by the CA
(RFC 5280 section 5). One JSON object::

    {"issuer": "CN=...", "revoked": [{"serial_number": "3f2a...", "common_name": "device-7",
                                      "revocation_date": "2026-01-02T03:04:05+00:00",
                                      "reason": "keyCompromise"}]}
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from lb.pki.certs import PKIError, Revocation, write_file

__all__ = ["REASONS", "RevocationIndex", "RevokedEntry", "index_path", "parse_reason"]

# RFC 5280 5.3.1 CRLReason names, as cryptography's ReasonFlags values spell them.
REASONS: dict[str, x509.ReasonFlags] = {flag.value: flag for flag in x509.ReasonFlags}


def parse_reason(text: str) -> x509.ReasonFlags:
    """A CRLReason by its RFC 5280 name (``keyCompromise``, ``superseded``...)."""
    for name, flag in REASONS.items():
        if name.lower() == text.lower():
            return flag
    raise PKIError(f"unknown revocation reason {text!r} (one of: {', '.join(REASONS)})")


def index_path(ca_base: Path) -> Path:
    """``CaIntermediate`` -> ``CaIntermediate-revoked.json`` beside it."""
    return ca_base.with_name(f"{ca_base.name}-revoked.json")


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    """One line of the index."""

    serial_number: int
    common_name: str
    revocation_date: datetime.datetime
    reason: x509.ReasonFlags | None = None

    def revocation(self) -> Revocation:
        """As the CRL builder takes it."""
        return Revocation(self.serial_number, self.revocation_date, self.reason)


@dataclass(frozen=True, slots=True)
class RevocationIndex:
    """The whole index file."""

    issuer: str
    revoked: tuple[RevokedEntry, ...] = ()

    def serial_numbers(self) -> set[int]:
        """Serials already revoked."""
        return {entry.serial_number for entry in self.revoked}

    def with_entry(self, entry: RevokedEntry) -> RevocationIndex:
        """A new index with ``entry`` appended (an already revoked serial is an error)."""
        if entry.serial_number in self.serial_numbers():
            raise PKIError(f"serial {entry.serial_number:x} is already revoked")
        return RevocationIndex(self.issuer, (*self.revoked, entry))

    @classmethod
    def load(cls, path: Path, issuer: str) -> RevocationIndex:
        """Read the index, or an empty one when the file does not exist yet."""
        if not path.exists():
            return cls(issuer)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            revoked = tuple(
                RevokedEntry(
                    serial_number=int(item["serial_number"], 16),
                    common_name=str(item.get("common_name", "")),
                    revocation_date=datetime.datetime.fromisoformat(item["revocation_date"]),
                    reason=parse_reason(item["reason"]) if item.get("reason") else None,
                )
                for item in document["revoked"]
            )
            return cls(str(document.get("issuer", issuer)), revoked)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise PKIError(f"{path}: unreadable revocation index ({error})") from None

    def save(self, path: Path) -> None:
        """Write the index (replacing the old one atomically)."""
        document = {
            "issuer": self.issuer,
            "revoked": [
                {
                    "serial_number": f"{entry.serial_number:x}",
                    "common_name": entry.common_name,
                    "revocation_date": entry.revocation_date.isoformat(),
                    "reason": entry.reason.value if entry.reason else None,
                }
                for entry in self.revoked
            ],
        }
        data = (json.dumps(document, indent=2) + "\n").encode()
        write_file(path, data, mode=0o644, force=True)
