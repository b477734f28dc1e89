"""cfssl signing configuration files (the seed's ``config.json``), read into typed profiles.

The format is cfssl's ``signing`` section::

    {"signing": {"default": {"expiry": "262800h"},
                 "profiles": {"intermediate": {"usages": ["cert sign", "crl sign"],
                                               "expiry": "700800h",
                                               "ca_constraint": {"is_ca": true,
                                                                 "max_path_len": 1}},
                              "device": {"usages": ["client auth", "signing", ...]}}}}

Usage names are cfssl's (``config.KeyUsage`` and ``config.ExtKeyUsage`` in cfssl's
config/config.go); expiries are Go durations ("8760h", "1h30m"). ``max_path_len`` 0 means
"no limit" unless ``max_path_len_zero`` is true, as in cfssl.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from lb.pki.certs import KeyUsage, PKIError

__all__ = [
    "EXTENDED_KEY_USAGES",
    "KEY_USAGES",
    "SigningConfig",
    "SigningProfile",
    "load_signing_config",
    "parse_go_duration",
    "parse_signing_config",
    "replace_usages",
]

# cfssl's config.KeyUsage table: usage name -> KeyUsage field set to True.
KEY_USAGES: dict[str, str] = {
    "signing": "digital_signature",
    "digital signature": "digital_signature",
    "content commitment": "content_commitment",
    "key encipherment": "key_encipherment",
    "key agreement": "key_agreement",
    "data encipherment": "data_encipherment",
    "cert sign": "key_cert_sign",
    "crl sign": "crl_sign",
}

# cfssl's config.ExtKeyUsage table.
EXTENDED_KEY_USAGES: dict[str, x509.ObjectIdentifier] = {
    "any": ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    "server auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "code signing": ExtendedKeyUsageOID.CODE_SIGNING,
    "email protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "s/mime": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "ipsec end system": x509.ObjectIdentifier("1.3.6.1.5.5.7.3.5"),
    "ipsec tunnel": x509.ObjectIdentifier("1.3.6.1.5.5.7.3.6"),
    "ipsec user": x509.ObjectIdentifier("1.3.6.1.5.5.7.3.7"),
    "timestamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "ocsp signing": ExtendedKeyUsageOID.OCSP_SIGNING,
    "microsoft sgc": x509.ObjectIdentifier("1.3.6.1.4.1.311.10.3.3"),
    "netscape sgc": x509.ObjectIdentifier("2.16.840.1.113730.4.1"),
}

# Names seen in the wild that are not cfssl's but whose intent is plain. The seed's device
# profile lists "digital signing".
USAGE_ALIASES: dict[str, str] = {"digital signing": "digital signature"}

_GO_DURATION_UNITS: dict[str, float] = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|h|m|s)")


def parse_go_duration(text: str) -> datetime.timedelta:
    """A Go ``time.ParseDuration`` string ("262800h", "1h30m", "90s") as a timedelta."""
    position = 0
    seconds = 0.0
    if not text:
        raise PKIError("empty duration")
    while position < len(text):
        match = _GO_DURATION_PART.match(text, position)
        if match is None:
            raise PKIError(f"invalid duration {text!r}: expected e.g. '8760h' or '1h30m'")
        seconds += float(match.group(1)) * _GO_DURATION_UNITS[match.group(2)]
        position = match.end()
    return datetime.timedelta(seconds=seconds)


@dataclass(frozen=True, slots=True)
class SigningProfile:
    """One cfssl signing profile, resolved to X.509 terms."""

    name: str
    usages: tuple[str, ...] = ()
    key_usage: KeyUsage | None = None  # None: no key usage named, the tool picks per key type
    extended_key_usage: tuple[x509.ObjectIdentifier, ...] = ()
    expiry: datetime.timedelta | None = None
    is_ca: bool = False
    path_length: int | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SigningConfig:
    """The ``signing`` section: a default profile and named profiles."""

    origin: str
    default: SigningProfile
    profiles: dict[str, SigningProfile]

    def profile(self, name: str | None, *fallbacks: str) -> SigningProfile:
        """Profile ``name`` (an error when missing), else the first present fallback, else
        the default profile."""
        if name is not None:
            if name not in self.profiles:
                known = ", ".join(sorted(self.profiles)) or "none"
                raise PKIError(f"{self.origin}: unknown profile {name!r} (profiles: {known})")
            return self.profiles[name]
        for fallback in fallbacks:
            if fallback in self.profiles:
                return self.profiles[fallback]
        return self.default


def _expect(condition: bool, origin: str, message: str) -> None:
    if not condition:
        raise PKIError(f"{origin}: {message}")


def _parse_profile(
    name: str, raw: object, origin: str, inherited: SigningProfile | None
) -> SigningProfile:
    where = f"{origin}: profile {name!r}"
    _expect(isinstance(raw, dict), origin, f"profile {name!r} must be a JSON object")
    assert isinstance(raw, dict)
    warnings: list[str] = []

    usages_raw = raw.get("usages")
    if usages_raw is None:
        usages: tuple[str, ...] = inherited.usages if inherited else ()
    else:
        _expect(
            isinstance(usages_raw, list) and all(isinstance(u, str) for u in usages_raw),
            where,
            "'usages' must be a list of strings",
        )
        usages = tuple(usages_raw)
    key_usage_fields: dict[str, bool] = {}
    extended: list[x509.ObjectIdentifier] = []
    for usage in usages:
        word = usage.strip().lower()
        if word in USAGE_ALIASES:
            warnings.append(
                f"{where}: usage {usage!r} is not a cfssl name; read as {USAGE_ALIASES[word]!r}"
            )
            word = USAGE_ALIASES[word]
        if word in KEY_USAGES:
            key_usage_fields[KEY_USAGES[word]] = True
        elif word in EXTENDED_KEY_USAGES:
            if EXTENDED_KEY_USAGES[word] not in extended:
                extended.append(EXTENDED_KEY_USAGES[word])
        else:
            known = ", ".join(sorted({*KEY_USAGES, *EXTENDED_KEY_USAGES}))
            raise PKIError(f"{where}: unknown usage {usage!r} (known: {known})")

    expiry_raw = raw.get("expiry")
    if expiry_raw is None:
        expiry = inherited.expiry if inherited else None
    else:
        _expect(isinstance(expiry_raw, str), where, "'expiry' must be a string like '8760h'")
        try:
            expiry = parse_go_duration(str(expiry_raw))
        except PKIError as error:
            raise PKIError(f"{where}: 'expiry': {error}") from None

    is_ca = False
    path_length: int | None = None
    constraint = raw.get("ca_constraint")
    if constraint is not None:
        _expect(isinstance(constraint, dict), where, "'ca_constraint' must be a JSON object")
        assert isinstance(constraint, dict)
        is_ca = bool(constraint.get("is_ca", False))
        max_path_len = constraint.get("max_path_len", 0)
        _expect(
            isinstance(max_path_len, int) and not isinstance(max_path_len, bool),
            where,
            "'max_path_len' must be an integer",
        )
        if max_path_len < 0:
            raise PKIError(f"{where}: 'max_path_len' must not be negative")
        # cfssl: 0 means "no limit" unless max_path_len_zero says it really is zero.
        if max_path_len > 0 or constraint.get("max_path_len_zero", False):
            path_length = max_path_len

    return SigningProfile(
        name=name,
        usages=usages,
        key_usage=KeyUsage(**key_usage_fields) if key_usage_fields else None,
        extended_key_usage=tuple(extended),
        expiry=expiry,
        is_ca=is_ca,
        path_length=path_length,
        warnings=tuple(warnings),
    )


def parse_signing_config(text: str, origin: str = "<config>") -> SigningConfig:
    """Parse a cfssl config JSON document."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise PKIError(f"{origin}:{error.lineno}: invalid JSON: {error.msg}") from None
    _expect(isinstance(document, dict), origin, "the top level must be a JSON object")
    signing = document.get("signing")
    _expect(isinstance(signing, dict), origin, "no 'signing' object (cfssl signing config)")
    default_raw = signing.get("default", {})
    default = _parse_profile("default", default_raw, origin, None)
    profiles_raw = signing.get("profiles", {})
    _expect(isinstance(profiles_raw, dict), origin, "'profiles' must be a JSON object")
    profiles = {
        name: _parse_profile(name, raw, origin, default) for name, raw in profiles_raw.items()
    }
    return SigningConfig(origin=origin, default=default, profiles=profiles)


def load_signing_config(path: Path | str) -> SigningConfig:
    """Read and parse a cfssl signing config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PKIError(f"{path}: no such file") from None
    except OSError as error:
        raise PKIError(f"{path}: cannot read: {error.strerror}") from None
    return parse_signing_config(text, str(path))


def replace_usages(profile: SigningProfile, usages: list[str]) -> SigningProfile:
    """The profile with its usages replaced (the CLI's ``--usage`` override)."""
    raw: dict[str, object] = {"usages": usages}
    parsed = _parse_profile(profile.name, raw, "--usage", None)
    return dataclasses.replace(
        profile,
        usages=parsed.usages,
        key_usage=parsed.key_usage,
        extended_key_usage=parsed.extended_key_usage,
        warnings=profile.warnings + parsed.warnings,
    )
