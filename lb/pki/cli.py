"""``lb-pki``: make and inspect the fleet PKI of seed 004 (cfssl) and seed 002 (openssl).

Subcommands: ``root``, ``intermediate``, ``device``, ``server``, ``node``, ``allinone``,
``revoke``, ``crl``, ``show``, ``verify`` and ``demo``. Files use cfssljson ``-bare`` names
(``NAME.pem`` + ``NAME-key.pem``) in ``--dir``; ``--ca NAME`` names the issuing CA by that
prefix (``CaIntermediate`` -> ``CaIntermediate.pem`` + ``CaIntermediate-key.pem``).

Exit codes: 0 done (``verify``: accepted), 1 ``verify`` refused, 2 wrong input (one line on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from lb.pki.certs import (
    CA_KEY_USAGE,
    CLIENT_AUTH,
    DEFAULT_CA_DAYS,
    DEFAULT_CRL_DAYS,
    DEFAULT_INTERMEDIATE_PATH_LENGTH,
    DEFAULT_LEAF_DAYS,
    KEY_TYPES,
    SERVER_AUTH,
    Issued,
    KeyPasswordError,
    KeyType,
    Names,
    PKIError,
    common_name,
    fingerprint_sha256,
    is_self_signed,
    key_description,
    load_certs,
    load_crls,
    load_issued,
    make_crl,
    make_device,
    make_intermediate,
    make_leaf,
    make_node,
    make_root,
    make_server,
    write_allinone,
    write_certs,
    write_crls,
    write_key,
)
from lb.pki.profiles import SigningProfile, load_signing_config, replace_usages
from lb.pki.revocations import RevocationIndex, RevokedEntry, index_path, parse_reason
from lb.pki.verify import eku_name, verify_chain

__all__ = ["main"]

PROGRAM = "lb-pki"
#: Devices per issuing process: below 2 * this, one process issues them all (a fork and its
#: share of the CA's state cost more than a few hundred certificates).
PARALLEL_DEVICES = 1000
ROOT_NAME = "CaRoot"
INTERMEDIATE_NAME = "CaIntermediate"


# --- small pieces ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """What the common flags (and an optional cfssl CSR JSON) ask for."""

    common_name: str | None
    key_type: KeyType
    names: Names
    hosts: tuple[str, ...]


def _say(message: str) -> None:
    print(message)


def _warn(message: str) -> None:
    print(f"{PROGRAM}: warning: {message}", file=sys.stderr)


def _password(value: str | None, file: str | None, flag: str) -> bytes | None:
    if value is not None and file is not None:
        raise PKIError(f"give either {flag} or {flag}-file, not both")
    if file is not None:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise PKIError(f"{file}: cannot read the password file: {error.strerror}") from None
        if not lines or not lines[0]:
            raise PKIError(f"{file}: the password file is empty")
        return lines[0].encode()
    if value is not None:
        if not value:
            raise PKIError(f"{flag} must not be empty")
        return value.encode()
    return None


def _directory(args: argparse.Namespace) -> Path:
    directory = Path(args.dir)
    if directory.exists() and not directory.is_dir():
        raise PKIError(f"--dir {directory}: not a directory")
    # A new PKI starts in a new folder, as cfssl users do with mkdir; make it.
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _base(directory: Path, name: str) -> Path:
    """A file prefix: ``CaRoot`` or ``CaRoot.pem`` -> DIR/CaRoot (absolute paths kept)."""
    path = Path(name)
    if path.name.endswith(".pem"):
        path = path.with_name(path.name[: -len(".pem")])
    if not path.name:
        raise PKIError(f"empty file name {name!r}")
    return path if path.is_absolute() else directory / path


def _input(directory: Path, name: str) -> Path:
    """An input file: as given when it exists, else inside --dir."""
    path = Path(name)
    if path.exists() or path.is_absolute():
        return path
    return directory / path


def _key_path(base: Path) -> Path:
    return base.with_name(f"{base.name}-key.pem")


def _cert_path(base: Path) -> Path:
    return base.with_name(f"{base.name}.pem")


def _load_ca(args: argparse.Namespace, directory: Path, name: str) -> Issued:
    base = _base(directory, name)
    cert_file, key_file = _cert_path(base), _key_path(base)
    for needed in (cert_file, key_file):
        if not needed.exists():
            raise PKIError(
                f"issuing CA file {needed} does not exist (make it first, or name another CA "
                "with --ca)"
            )
    password = _password(args.ca_password, args.ca_password_file, "--ca-password")
    try:
        issuer = load_issued(cert_file, key_file, password)
    except KeyPasswordError as error:
        raise PKIError(f"{error} (use --ca-password or --ca-password-file)") from None
    if not issuer.is_ca:
        raise PKIError(f"{cert_file} is not a CA certificate (basicConstraints CA:FALSE)")
    return issuer


def _check_outputs(paths: Sequence[Path], force: bool) -> None:
    """Refuse before anything is made, so a refused run leaves no half-written set."""
    if force:
        return
    for path in paths:
        if path.exists():
            raise PKIError(f"refusing to overwrite existing file {path} (use --force)")


def _read_csr_json(path: str) -> dict[str, object]:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise PKIError(f"{path}: cannot read: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise PKIError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
    if not isinstance(document, dict):
        raise PKIError(f"{path}: a cfssl CSR must be a JSON object")
    return document


def _csr_key_type(path: str, key: object) -> KeyType | None:
    if key is None:
        return None
    if not isinstance(key, dict):
        raise PKIError(f'{path}: \'key\' must be an object like {{"algo": "rsa", "size": 2048}}')
    algo, size = key.get("algo"), key.get("size")
    if algo == "ecdsa" and size in (None, 256):
        return "ec"
    if algo == "rsa" and size in (2048, 4096):
        return "rsa2048" if size == 2048 else "rsa4096"
    raise PKIError(f"{path}: key {algo} {size} is not supported (ecdsa 256, rsa 2048 or rsa 4096)")


def _request(args: argparse.Namespace) -> Request:
    """Merge a cfssl CSR JSON (``--csr``) with the flags; flags win."""
    csr_common_name: str | None = None
    csr_key_type: KeyType | None = None
    csr_names: dict[str, str] = {}
    hosts: tuple[str, ...] = ()
    if args.csr is not None:
        document = _read_csr_json(args.csr)
        raw_common_name = document.get("CN")
        if raw_common_name is not None and not isinstance(raw_common_name, str):
            raise PKIError(f"{args.csr}: 'CN' must be a string")
        csr_common_name = raw_common_name
        csr_key_type = _csr_key_type(args.csr, document.get("key"))
        names = document.get("names") or []
        if not isinstance(names, list) or not all(isinstance(item, dict) for item in names):
            raise PKIError(f"{args.csr}: 'names' must be a list of objects")
        if names:
            csr_names = {str(k): str(v) for k, v in names[0].items()}
        raw_hosts = document.get("hosts") or []
        if not isinstance(raw_hosts, list):
            raise PKIError(f"{args.csr}: 'hosts' must be a list")
        hosts = tuple(str(host) for host in raw_hosts)
    fields = {"C": args.C, "ST": args.ST, "L": args.L, "O": args.O, "OU": args.OU}
    merged = {key: value for key, value in csr_names.items() if value}
    merged.update({key: value for key, value in fields.items() if value is not None})
    key_type: KeyType = args.key_type or csr_key_type or "ec"
    return Request(
        common_name=args.cn if getattr(args, "cn", None) is not None else csr_common_name,
        key_type=key_type,
        names=Names.from_cfssl(merged),
        hosts=hosts,
    )


def _profile(args: argparse.Namespace, *fallbacks: str) -> SigningProfile | None:
    if args.profile_file is None:
        if args.profile is not None:
            raise PKIError("--profile needs --profile-file (a cfssl signing config)")
        return None
    config = load_signing_config(args.profile_file)
    profile = config.profile(args.profile, *fallbacks)
    for warning in profile.warnings:
        _warn(warning)
    return profile


def _validity_days(
    args: argparse.Namespace, profile: SigningProfile | None, default_days: int
) -> tuple[int, datetime.datetime | None]:
    """(days, not_after): --days wins, then the profile's expiry, then the default."""
    if args.days is not None:
        if args.days <= 0:
            raise PKIError("--days must be positive")
        return args.days, None
    if profile is not None and profile.expiry is not None:
        return default_days, datetime.datetime.now(datetime.UTC) + profile.expiry
    return default_days, None


def _leaf_usages(
    args: argparse.Namespace,
    profile: SigningProfile | None,
    default_extended: tuple[x509.ObjectIdentifier, ...],
    command: str,
) -> tuple[tuple[x509.ObjectIdentifier, ...], SigningProfile | None]:
    if args.usage:
        base = profile or SigningProfile(name="--usage")
        profile = replace_usages(base, list(args.usage))
        for warning in profile.warnings:
            _warn(warning)
    if profile is None:
        return default_extended, None
    if profile.is_ca:
        raise PKIError(
            f"profile {profile.name!r} makes CA certificates (ca_constraint is_ca); use "
            f"`{PROGRAM} intermediate`, or another profile for `{command}`"
        )
    return profile.extended_key_usage or default_extended, profile


def _written(*paths: Path) -> None:
    for path in paths:
        mode = path.stat().st_mode & 0o777
        _say(f"wrote {path} ({mode:04o})")


def _password_for_new_key(args: argparse.Namespace) -> bytes | None:
    return _password(args.password, args.password_file, "--password")


def _save_pair(
    args: argparse.Namespace,
    base: Path,
    issued: Issued,
    *,
    certs: Sequence[x509.Certificate] | None = None,
    bundle: bool = False,
    sync: bool = True,
) -> list[Path]:
    password = _password_for_new_key(args)
    cert_file = write_certs(
        _cert_path(base),
        certs if certs is not None else [issued.cert],
        force=args.force,
        sync=sync,
    )
    key_file = write_key(
        _key_path(base), issued.key, password=password, force=args.force, sync=sync
    )
    written = [cert_file, key_file]
    if bundle:
        written.append(
            write_certs(
                base.with_name(f"{base.name}-bundle.pem"),
                issued.certs,
                force=args.force,
                sync=sync,
            )
        )
    return written


def _outputs(base: Path, *, bundle: bool = False) -> list[Path]:
    paths = [_cert_path(base), _key_path(base)]
    if bundle:
        paths.append(base.with_name(f"{base.name}-bundle.pem"))
    return paths


# --- subcommands ---------------------------------------------------------------------------------


def command_root(args: argparse.Namespace) -> int:
    directory = _directory(args)
    request = _request(args)
    base = _base(directory, args.name)
    _check_outputs(_outputs(base), args.force)
    profile = _profile(args)
    days, not_after = _validity_days(args, profile, DEFAULT_CA_DAYS)
    root = make_root(
        request.common_name or "lb-pki Root CA",
        key_type=request.key_type,
        names=request.names,
        days=days,
        not_after=not_after,
        path_length=args.path_length,
    )
    _written(*_save_pair(args, base, root))
    return 0


def command_intermediate(args: argparse.Namespace) -> int:
    directory = _directory(args)
    request = _request(args)
    base = _base(directory, args.name)
    _check_outputs(_outputs(base), args.force)
    profile = _profile(args, "intermediate")
    if profile is not None and profile.name != "default" and not profile.is_ca:
        raise PKIError(f"profile {profile.name!r} has no ca_constraint is_ca: it cannot make a CA")
    issuer = _load_ca(args, directory, args.ca or ROOT_NAME)
    days, not_after = _validity_days(args, profile, DEFAULT_CA_DAYS)
    if args.path_length is not None:
        path_length: int | None = None if args.path_length < 0 else args.path_length
    elif profile is not None and profile.is_ca:
        path_length = profile.path_length
    else:
        path_length = DEFAULT_INTERMEDIATE_PATH_LENGTH
    key_usage = CA_KEY_USAGE
    if profile is not None and profile.key_usage is not None:
        key_usage = profile.key_usage
        if not key_usage.key_cert_sign:
            raise PKIError(f"profile {profile.name!r} has no 'cert sign' usage: not a CA")
    intermediate = make_intermediate(
        issuer,
        request.common_name or "lb-pki Intermediate CA",
        key_type=request.key_type,
        names=request.names,
        days=days,
        not_after=not_after,
        path_length=path_length,
        key_usage=key_usage,
    )
    _written(*_save_pair(args, base, intermediate, certs=intermediate.certs))
    return 0


def _split_hosts(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    dns_names: list[str] = []
    ip_addresses: list[str] = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            dns_names.append(host)
        else:
            ip_addresses.append(host)
    return dns_names, ip_addresses


def command_device(args: argparse.Namespace) -> int:
    directory = _directory(args)
    request = _request(args)
    if args.count is not None:
        if args.count <= 0:
            raise PKIError("--count must be positive")
        if args.name is not None:
            raise PKIError("--name names one device; with --count the names are PREFIX-NNNN")
        prefix = request.common_name or "device"
        common_names = [f"{prefix}-{number:04d}" for number in range(1, args.count + 1)]
        bases = [_base(directory, name) for name in common_names]
    else:
        if not request.common_name:
            raise PKIError("a device needs a CN (the device id): lb-pki device DEVICE_ID")
        common_names = [request.common_name]
        bases = [_base(directory, args.name or request.common_name)]
    _check_outputs(
        [path for base in bases for path in _outputs(base, bundle=args.bundle)], args.force
    )
    profile = _profile(args, "device")
    extended, profile = _leaf_usages(args, profile, (CLIENT_AUTH, SERVER_AUTH), "device")
    issuer = _load_ca(args, directory, args.ca or INTERMEDIATE_NAME)
    days, not_after = _validity_days(args, profile, DEFAULT_LEAF_DAYS)
    dns_names, _ = _split_hosts(request.hosts)
    sync = len(bases) == 1

    def issue(share: Sequence[tuple[str, Path]]) -> None:
        for cn, base in share:
            device = make_device(
                issuer,
                cn,
                extended_key_usage=extended,
                key_type=request.key_type,
                names=request.names,
                days=days,
                not_after=not_after,
                key_usage=profile.key_usage if profile else None,
                dns_names=[*dns_names, *args.dns],
            )
            _save_pair(args, base, device, bundle=args.bundle, sync=sync)

    _in_processes(issue, list(zip(common_names, bases, strict=True)))
    if not sync:
        os.sync()  # one flush for the whole set instead of an fsync per file
    for base in bases:
        # The modes are the ones write_file set exactly; no need to stat 2N files again.
        _say(f"wrote {_cert_path(base)} (0644)")
        _say(f"wrote {_key_path(base)} (0600)")
        if args.bundle:
            _say(f"wrote {base.with_name(f'{base.name}-bundle.pem')} (0644)")
    return 0


def _in_processes(
    work: Callable[[Sequence[tuple[str, Path]]], None], items: list[tuple[str, Path]]
) -> None:
    """Run ``work`` over ``items`` in forked processes, one per CPU, when there are enough
    items to pay for the forks (each child inherits the loaded CA, so it is read once).
    A child's failure is raised here as a PKIError with the child's own message."""
    processes = min(os.cpu_count() or 1, len(items) // PARALLEL_DEVICES)
    if processes <= 1:
        work(items)
        return
    sys.stdout.flush()
    children: list[tuple[int, int]] = []
    for index in range(processes):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its share, then its error (if any) on the pipe
            os.close(read_end)
            code = 0
            try:
                work(items[index::processes])
            except (PKIError, OSError) as error:
                os.write(write_end, str(error).encode()[:4000])
                code = 1
            except BaseException as error:
                os.write(write_end, repr(error).encode()[:4000])
                code = 1
            finally:
                os._exit(code)
        os.close(write_end)
        children.append((pid, read_end))
    errors = []
    for pid, read_end in children:
        with os.fdopen(read_end, "rb") as stream:
            message = stream.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if status != 0:
            errors.append(message or f"an issuing process ended with status {status}")
    if errors:
        raise PKIError(errors[0])


def command_server(args: argparse.Namespace) -> int:
    directory = _directory(args)
    request = _request(args)
    common_name_value = request.common_name or "localhost"
    base = _base(directory, args.name)
    outputs = _outputs(base, bundle=args.bundle)
    allinone_path = base.with_name(f"{base.name}-allinone.pem")
    if args.allinone:
        outputs.append(allinone_path)
    _check_outputs(outputs, args.force)
    profile = _profile(args, "server")
    extended, profile = _leaf_usages(args, profile, (SERVER_AUTH,), "server")
    issuer = _load_ca(args, directory, args.ca or INTERMEDIATE_NAME)
    days, not_after = _validity_days(args, profile, DEFAULT_LEAF_DAYS)
    host_dns, host_ips = _split_hosts(request.hosts)
    dns_names = [*host_dns, *args.dns] or [common_name_value]
    server = make_server(
        issuer,
        common_name_value,
        dns_names=dns_names,
        ip_addresses=[*host_ips, *args.ip],
        extended_key_usage=extended,
        key_type=request.key_type,
        names=request.names,
        days=days,
        not_after=not_after,
        key_usage=profile.key_usage if profile else None,
    )
    written = _save_pair(args, base, server, bundle=args.bundle)
    if args.allinone:
        written.append(
            write_allinone(
                allinone_path, server, password=_password_for_new_key(args), force=args.force
            )
        )
    _written(*written)
    return 0


def command_node(args: argparse.Namespace) -> int:
    directory = _directory(args)
    request = _request(args)
    bases = [_base(directory, name) for name in args.names]
    _check_outputs([path for base in bases for path in _outputs(base)], args.force)
    profile = _profile(args, "node")
    extended, profile = _leaf_usages(args, profile, (SERVER_AUTH, CLIENT_AUTH), "node")
    issuer = _load_ca(args, directory, args.ca or INTERMEDIATE_NAME)
    days, not_after = _validity_days(args, profile, DEFAULT_LEAF_DAYS)
    for name, base in zip(args.names, bases, strict=True):
        # make_leaf rather than make_node so that a profile's or --usage's usages apply.
        node = make_leaf(
            issuer,
            name,
            extended_key_usage=extended,
            dns_names=[name, *args.dns],
            ip_addresses=list(args.ip),
            key_type=request.key_type,
            names=request.names,
            days=days,
            not_after=not_after,
            key_usage=profile.key_usage if profile else None,
        )
        # Seed 000/002: a certfile holds the certificate, then the intermediates.
        _written(*_save_pair(args, base, node, certs=node.certs))
    return 0


def command_allinone(args: argparse.Namespace) -> int:
    directory = _directory(args)
    base = _base(directory, args.name)
    cert_file = Path(args.cert) if args.cert else _cert_path(base)
    key_file = Path(args.key) if args.key else _key_path(base)
    output = Path(args.out) if args.out else base.with_name(f"{base.name}-allinone.pem")
    if not output.is_absolute() and args.out:
        output = directory / output
    _check_outputs([output], args.force)
    password = _password_for_new_key(args)
    try:
        issued = load_issued(cert_file, key_file, password)
    except KeyPasswordError as error:
        raise PKIError(f"{error} (use --password or --password-file)") from None
    chain: list[x509.Certificate] = list(issued.chain)
    if args.chain:
        for chain_file in args.chain:
            chain.extend(cert for cert in load_certs(chain_file) if not is_self_signed(cert))
    elif not chain:
        # The issuing CA's certificate, when it is the one that signed (and not the root).
        ca_file = _cert_path(_base(directory, args.ca or INTERMEDIATE_NAME))
        if ca_file.exists():
            for cert in load_certs(ca_file):
                if cert.subject == issued.cert.issuer and not is_self_signed(cert):
                    chain.append(cert)
    complete = Issued(cert=issued.cert, key=issued.key, chain=tuple(chain))
    _written(write_allinone(output, complete, password=password, force=args.force))
    return 0


def _target_cert(directory: Path, target: str) -> x509.Certificate:
    path = Path(target)
    if not path.exists():
        path = _cert_path(_base(directory, target))
    return load_certs(path)[0]


def command_revoke(args: argparse.Namespace) -> int:
    directory = _directory(args)
    ca_base = _base(directory, args.ca or INTERMEDIATE_NAME)
    issuer_certs = load_certs(_cert_path(ca_base))
    issuer = issuer_certs[0]
    now = datetime.datetime.now(datetime.UTC)
    reason = parse_reason(args.reason) if args.reason else None
    if args.serial is not None:
        if args.target is not None:
            raise PKIError("give a certificate or --serial, not both")
        try:
            serial_number = int(args.serial.replace(":", ""), 16)
        except ValueError:
            raise PKIError(f"--serial {args.serial!r}: not a hexadecimal serial number") from None
        cn = ""
    else:
        if args.target is None:
            raise PKIError("name the certificate to revoke (NAME or FILE) or give --serial")
        cert = _target_cert(directory, args.target)
        if cert.issuer != issuer.subject:
            raise PKIError(
                f"{common_name(cert)!r} was issued by {cert.issuer.rfc4514_string()!r}, not by "
                f"{ca_base.name} ({issuer.subject.rfc4514_string()!r}): use --ca"
            )
        serial_number, cn = cert.serial_number, common_name(cert)
    path = index_path(ca_base)
    index = RevocationIndex.load(path, issuer.subject.rfc4514_string())
    index = index.with_entry(RevokedEntry(serial_number, cn, now, reason))
    index.save(path)
    _say(f"revoked serial {serial_number:x} ({cn or 'by serial'}); recorded in {path}")
    _say(f"make the CRL with: {PROGRAM} crl --dir {directory}")
    return 0


def command_crl(args: argparse.Namespace) -> int:
    directory = _directory(args)
    names: list[str] = args.ca or [INTERMEDIATE_NAME]
    if not args.ca and _key_path(_base(directory, ROOT_NAME)).exists():
        # HAProxy's crl-file checks every level: the root must have a CRL too.
        names.append(ROOT_NAME)
    output = Path(args.out)
    output = output if output.is_absolute() else directory / output
    crls = []
    for name in names:
        ca = _load_ca(args, directory, name)
        index = RevocationIndex.load(
            index_path(_base(directory, name)), ca.cert.subject.rfc4514_string()
        )
        days = args.days if args.days is not None else DEFAULT_CRL_DAYS
        if days <= 0:
            raise PKIError("--days must be positive")
        crls.append(
            make_crl(ca, [entry.revocation() for entry in index.revoked], next_update_days=days)
        )
        _say(f"CRL of {ca.common_name!r}: {len(index.revoked)} revoked, next update in {days} days")
    _written(write_crls(output, crls, force=True))
    return 0


# --- show ----------------------------------------------------------------------------------------


def _date(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_certificate(cert: x509.Certificate) -> list[str]:
    """Human lines for one certificate (``lb-pki show``)."""
    lines = [
        f"subject:     {cert.subject.rfc4514_string()}",
        f"issuer:      {cert.issuer.rfc4514_string()}",
        f"serial:      {cert.serial_number:x}",
        f"valid:       {_date(cert.not_valid_before_utc)} .. {_date(cert.not_valid_after_utc)}",
        f"key:         {key_description(cert)}",
    ]
    extensions = cert.extensions
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.ca:
            length = (
                "unlimited" if constraints.path_length is None else str(constraints.path_length)
            )
            lines.append(f"CA:          TRUE, path length {length}")
        else:
            lines.append("CA:          FALSE")
    except x509.ExtensionNotFound:
        lines.append("CA:          (no basicConstraints)")
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
        names = [
            name
            for name, present in (
                ("digitalSignature", usage.digital_signature),
                ("contentCommitment", usage.content_commitment),
                ("keyEncipherment", usage.key_encipherment),
                ("dataEncipherment", usage.data_encipherment),
                ("keyAgreement", usage.key_agreement),
                ("keyCertSign", usage.key_cert_sign),
                ("cRLSign", usage.crl_sign),
            )
            if present
        ]
        lines.append(f"key usage:   {', '.join(names)}")
    except x509.ExtensionNotFound:
        pass
    try:
        extended = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        lines.append(f"ext. usage:  {', '.join(eku_name(oid) for oid in extended)}")
    except x509.ExtensionNotFound:
        pass
    try:
        alternative = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        entries = [f"DNS:{name}" for name in alternative.get_values_for_type(x509.DNSName)]
        entries += [f"IP:{address}" for address in alternative.get_values_for_type(x509.IPAddress)]
        lines.append(f"SAN:         {', '.join(entries)}")
    except x509.ExtensionNotFound:
        pass
    lines.append(f"SHA256:      {fingerprint_sha256(cert)}")
    return lines


def describe_crl(crl: x509.CertificateRevocationList) -> list[str]:
    """Human lines for one CRL."""
    next_update = crl.next_update_utc
    lines = [
        f"CRL issuer:  {crl.issuer.rfc4514_string()}",
        f"updated:     {_date(crl.last_update_utc)}, next "
        f"{_date(next_update) if next_update else '(none)'}",
        f"revoked:     {len(crl)}",
    ]
    lines.extend(
        f"  serial {entry.serial_number:x} on {_date(entry.revocation_date_utc)}" for entry in crl
    )
    return lines


def command_show(args: argparse.Namespace) -> int:
    first = True
    for file in args.files:
        data = Path(file).read_bytes() if Path(file).exists() else None
        if data is None:
            raise PKIError(f"{file}: no such file")
        blocks: list[list[str]] = []
        if b"CERTIFICATE-----" in data or b"-----BEGIN" not in data:
            certs = load_certs(file)
            for depth, cert in enumerate(certs):
                blocks.append([f"{file} [{depth}]", *describe_certificate(cert)])
        if b"X509 CRL-----" in data:
            for number, crl in enumerate(load_crls(file)):
                blocks.append([f"{file} CRL [{number}]", *describe_crl(crl)])
        if b"PRIVATE KEY-----" in data and not blocks:
            blocks.append([f"{file}: a private key (not shown)"])
        for block in blocks:
            if not first:
                _say("")
            first = False
            _say(block[0])
            for line in block[1:]:
                _say(f"  {line}")
    return 0


# --- verify --------------------------------------------------------------------------------------


def command_verify(args: argparse.Namespace) -> int:
    directory = _directory(args)
    certs = load_certs(_input(directory, args.cert))
    leaf, sent_chain = certs[0], certs[1:]
    trusted_files = [_input(directory, name) for name in args.ca_file] or [
        path
        for path in (_cert_path(directory / INTERMEDIATE_NAME), _cert_path(directory / ROOT_NAME))
        if path.exists()
    ]
    if not trusted_files:
        raise PKIError("no CA files: give --ca-file (e.g. CaIntermediate.pem and CaRoot.pem)")
    trusted = [cert for file in trusted_files for cert in load_certs(file)]
    untrusted = [
        *sent_chain,
        *(cert for name in args.untrusted for cert in load_certs(_input(directory, name))),
    ]
    crl_files = [_input(directory, name) for name in args.crl]
    if not crl_files and (directory / "crl.pem").exists():
        # What `lb-pki crl` wrote is what a balancer would load: check it unless told otherwise.
        crl_files = [directory / "crl.pem"]
        _say(f"checking revocation with {crl_files[0]} (give --crl to choose others)")
    crls = [crl for path in crl_files for crl in load_crls(path)]
    at: datetime.datetime | None = None
    if args.at is not None:
        try:
            at = datetime.datetime.fromisoformat(args.at)
        except ValueError:
            raise PKIError(f"--at {args.at!r}: not an ISO date like 2030-01-31T12:00") from None
        if at.tzinfo is None:
            at = at.replace(tzinfo=datetime.UTC)
    result = verify_chain(
        leaf,
        trusted=trusted,
        untrusted=untrusted,
        crls=crls,
        purpose=args.purpose,
        at=at,
        crl_check_all=not args.crl_leaf_only,
    )
    chain_text = " <- ".join(
        repr(common_name(cert) or cert.subject.rfc4514_string()) for cert in result.path
    )
    if result.ok:
        checked = f", CRLs checked ({len(crls)})" if crls else ""
        _say(f"{args.cert}: OK: {chain_text} ({args.purpose} purpose{checked})")
        return 0
    _say(f"{args.cert}: REFUSED: {chain_text}")
    for refusal in result.refusals:
        _say(f"  {refusal}")
    return 1


# --- demo ----------------------------------------------------------------------------------------


def command_demo(args: argparse.Namespace) -> int:
    """The whole demo set in one go (the demo runner and docker-compose call this)."""
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    key_type: KeyType = args.key_type or "ec"
    if not args.force and (directory / "CaRoot-key.pem").exists():
        raise PKIError(f"{directory} already holds a PKI (CaRoot-key.pem); use --force to remake")
    force = args.force
    names = Names(country="CN", state="Hubei", locality="Wuhan", organization="lb-pki demo")
    written: list[Path] = []

    def pair(name: str, issued: Issued, certs: Sequence[x509.Certificate] | None = None) -> None:
        written.append(write_certs(directory / f"{name}.pem", certs or [issued.cert], force=force))
        written.append(write_key(directory / f"{name}-key.pem", issued.key, force=force))

    root = make_root("lb-pki Demo Root CA", key_type=key_type, names=names)
    intermediate = make_intermediate(
        root, "lb-pki Demo Intermediate CA", key_type=key_type, names=names
    )
    pair(ROOT_NAME, root)
    pair(INTERMEDIATE_NAME, intermediate)
    written.append(
        write_certs(directory / "ca-bundle.pem", [intermediate.cert, root.cert], force=force)
    )

    server = make_server(
        intermediate,
        args.server_cn,
        dns_names=["localhost", args.server_cn, *args.dns],
        ip_addresses=["127.0.0.1", *args.ip],
        key_type=key_type,
        names=names,
    )
    pair("server", server)
    written.append(write_allinone(directory / "server-allinone.pem", server, force=force))

    for number in range(1, args.devices + 1):
        pair(
            f"device-{number:04d}",
            make_device(intermediate, f"device-{number:04d}", key_type=key_type),
        )
    for number in range(1, args.nodes + 1):
        name = f"node-{number}"
        node = make_node(
            intermediate,
            name,
            dns_names=[name, "localhost"],
            ip_addresses=["127.0.0.1"],
            key_type=key_type,
        )
        pair(name, node, certs=node.certs)

    revoked = make_device(intermediate, "device-revoked", key_type=key_type)
    pair("device-revoked", revoked)
    now = datetime.datetime.now(datetime.UTC)
    index = RevocationIndex(intermediate.cert.subject.rfc4514_string()).with_entry(
        RevokedEntry(
            revoked.serial_number, revoked.common_name, now, x509.ReasonFlags.key_compromise
        )
    )
    index.save(index_path(directory / INTERMEDIATE_NAME))
    written.append(index_path(directory / INTERMEDIATE_NAME))
    written.append(
        write_crls(
            directory / "crl.pem",
            [
                make_crl(intermediate, [entry.revocation() for entry in index.revoked]),
                make_crl(root),
            ],
            force=True,
        )
    )
    expired = make_device(
        intermediate,
        "device-expired",
        key_type=key_type,
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    pair("device-expired", expired)

    rogue_root = make_root("lb-pki Rogue Root CA", key_type=key_type)
    rogue_intermediate = make_intermediate(
        rogue_root, "lb-pki Rogue Intermediate CA", key_type=key_type
    )
    pair("RogueRoot", rogue_root)
    pair("RogueIntermediate", rogue_intermediate, certs=rogue_intermediate.certs)
    # An impostor: a real device's id, signed by a CA nobody trusts.
    pair("rogue-device-0001", make_device(rogue_intermediate, "device-0001", key_type=key_type))

    for path in written:
        mode = path.stat().st_mode & 0o777
        _say(f"wrote {path} ({mode:04o})")
    _say(
        f"demo PKI in {directory}: root, intermediate, server-allinone.pem "
        f"(CN {args.server_cn}), {args.devices} devices, {args.nodes} nodes, "
        "device-revoked (in crl.pem), device-expired, rogue-device-0001"
    )
    return 0


# --- parser --------------------------------------------------------------------------------------


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--dir", default=".", help="folder for the files (default: current)")
    common.add_argument("--force", action="store_true", help="overwrite existing files")
    return common


def _making_options() -> argparse.ArgumentParser:
    making = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    making.add_argument(
        "--key-type", choices=KEY_TYPES, default=None, help="ec (P-256, default), rsa2048, rsa4096"
    )
    making.add_argument("--days", type=int, default=None, help="validity in days")
    for field, words in (
        ("C", "country"),
        ("ST", "state or province"),
        ("L", "locality"),
        ("O", "organization"),
        ("OU", "organizational unit"),
    ):
        making.add_argument(f"--{field}", dest=field, default=None, help=f"subject {words}")
    making.add_argument("--csr", default=None, help="a cfssl CSR JSON (CN, key, names, hosts)")
    making.add_argument(
        "--profile-file", default=None, help="a cfssl signing config (the seed's config.json)"
    )
    making.add_argument("--profile", default=None, help="profile name in --profile-file")
    making.add_argument("--password", default=None, help="encrypt the new key with this")
    making.add_argument("--password-file", default=None, help="... or with this file's first line")
    making.add_argument("--ca-password", default=None, help="password of the issuing CA's key")
    making.add_argument("--ca-password-file", default=None)
    return making


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree (exposed for the tests and for --help)."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Make and check the fleet PKI: root -> intermediate -> device/server/node.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, making = _common_options(), _making_options()

    def add(
        name: str,
        handler: Callable[[argparse.Namespace], int],
        help_text: str,
        *,
        makes: bool = True,
    ) -> argparse.ArgumentParser:
        parents = [common, making] if makes else [common]
        sub = commands.add_parser(
            name, help=help_text, description=help_text, parents=parents, allow_abbrev=False
        )
        sub.set_defaults(handler=handler)
        return sub

    root = add("root", command_root, "make a self-signed root CA (CaRoot.pem, CaRoot-key.pem)")
    root.add_argument("--cn", default=None, help="common name (default 'lb-pki Root CA')")
    root.add_argument("--name", default=ROOT_NAME, help="file prefix (default CaRoot)")
    root.add_argument("--path-length", type=int, default=None, help="pathlen (default none)")

    intermediate = add("intermediate", command_intermediate, "make an intermediate CA")
    intermediate.add_argument("--cn", default=None)
    intermediate.add_argument("--name", default=INTERMEDIATE_NAME)
    intermediate.add_argument("--ca", default=None, help="issuing CA prefix (default CaRoot)")
    intermediate.add_argument(
        "--path-length", type=int, default=None, help="pathlen (default 1; -1 for none)"
    )

    device = add("device", command_device, "make device certificates (CN = device id)")
    device.add_argument("cn", nargs="?", default=None, help="device id (with --count: prefix)")
    device.add_argument("--count", type=int, default=None, help="make PREFIX-0001..PREFIX-N")
    device.add_argument("--name", default=None, help="file prefix (default: the CN)")
    device.add_argument("--ca", default=None, help="issuing CA prefix (default CaIntermediate)")
    device.add_argument("--usage", action="append", default=[], help="cfssl usage (repeatable)")
    device.add_argument("--dns", action="append", default=[], help="SAN DNS name (repeatable)")
    device.add_argument("--bundle", action="store_true", help="also NAME-bundle.pem (+chain)")

    server = add("server", command_server, "make a TLS server certificate with SANs")
    server.add_argument("cn", nargs="?", default=None, help="common name (default localhost)")
    server.add_argument("--name", default="server", help="file prefix (default server)")
    server.add_argument("--dns", action="append", default=[], help="SAN DNS name (repeatable)")
    server.add_argument("--ip", action="append", default=[], help="SAN IP address (repeatable)")
    server.add_argument("--ca", default=None)
    server.add_argument("--usage", action="append", default=[])
    server.add_argument("--bundle", action="store_true", help="also NAME-bundle.pem (+chain)")
    server.add_argument("--allinone", action="store_true", help="also NAME-allinone.pem")

    node = add("node", command_node, "make cluster node certificates (SAN DNS, CA:FALSE)")
    node.add_argument("names", nargs="+", help="node names, e.g. node-1 node-2")
    node.add_argument("--dns", action="append", default=[], help="extra SAN DNS name")
    node.add_argument("--ip", action="append", default=[], help="SAN IP address")
    node.add_argument("--ca", default=None)
    node.add_argument("--usage", action="append", default=[])

    allinone = add("allinone", command_allinone, "key + certificate + chain in one PEM")
    allinone.add_argument("name", nargs="?", default="server", help="reads NAME.pem, NAME-key.pem")
    allinone.add_argument("--cert", default=None)
    allinone.add_argument("--key", default=None)
    allinone.add_argument("--chain", action="append", default=[], help="intermediates file")
    allinone.add_argument("--ca", default=None, help="CA whose certificate completes the chain")
    allinone.add_argument("--out", default=None, help="default NAME-allinone.pem")

    revoke = add(
        "revoke", command_revoke, "record a revoked certificate beside its CA", makes=False
    )
    revoke.add_argument("target", nargs="?", default=None, help="NAME or certificate file")
    revoke.add_argument("--serial", default=None, help="hexadecimal serial instead")
    revoke.add_argument("--reason", default=None, help="keyCompromise, superseded, ...")
    revoke.add_argument("--ca", default=None, help="issuing CA prefix (default CaIntermediate)")

    crl = add("crl", command_crl, "write the CRL(s) from the revocation index", makes=False)
    crl.add_argument("--ca", action="append", default=[], help="CA prefix (repeatable)")
    crl.add_argument("--out", default="crl.pem", help="default crl.pem")
    crl.add_argument("--days", type=int, default=None, help="next update in days (default 30)")
    crl.add_argument("--ca-password", default=None)
    crl.add_argument("--ca-password-file", default=None)

    show = add("show", command_show, "print certificates and CRLs in words", makes=False)
    show.add_argument("files", nargs="+")

    verify = add(
        "verify", command_verify, "say whether and why a certificate is refused", makes=False
    )
    verify.add_argument("cert", help="certificate file (its chain may follow it)")
    verify.add_argument(
        "--ca-file",
        action="append",
        default=[],
        help="trusted CA file (repeatable; default CaIntermediate.pem CaRoot.pem)",
    )
    verify.add_argument("--untrusted", action="append", default=[], help="intermediates file")
    verify.add_argument(
        "--crl",
        action="append",
        default=[],
        help="CRL file (repeatable; default: DIR/crl.pem if present)",
    )
    verify.add_argument("--purpose", choices=["client", "server", "any"], default="client")
    verify.add_argument(
        "--crl-leaf-only",
        action="store_true",
        help="check only the leaf's CRL (openssl -crl_check)",
    )
    verify.add_argument("--at", default=None, help="verify at this ISO time instead of now")

    demo = add("demo", command_demo, "make the whole demo PKI in --dir", makes=False)
    demo.add_argument("--key-type", choices=KEY_TYPES, default=None)
    demo.add_argument("--devices", type=int, default=10, help="good devices (default 10)")
    demo.add_argument("--nodes", type=int, default=3, help="cluster nodes (default 3)")
    demo.add_argument("--server-cn", default="lb.local")
    demo.add_argument("--dns", action="append", default=[], help="extra server SAN DNS")
    demo.add_argument("--ip", action="append", default=[], help="extra server SAN IP")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lb-pki`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.handler(args)
    except PKIError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
