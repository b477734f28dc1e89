"""The shared test PKI: one root -> intermediate -> leaf hierarchy per test session.

Loaded as a pytest plugin (``pytest_plugins = ["tests.pki"]`` in tests/conftest.py). It
provides the session fixtures ``pki`` (ECDSA P-256, fast) and ``pki_rsa`` (RSA 2048, made
only when a test asks for it). Files follow the seed's names (004: cfssljson ``-bare``):

    CaRoot.pem CaRoot-key.pem CaIntermediate.pem CaIntermediate-key.pem
    server.pem server-key.pem server-chain.pem server-allinone.pem
    ca-bundle.pem crl.pem crl-intermediate-only.pem
    devices/<cn>.pem <cn>-key.pem <cn>-chain.pem <cn>-allinone.pem
    nodes/<name>.pem <name>-key.pem
    rogue/RogueRoot.pem RogueIntermediate.pem

The CA material, server and revocation list are made when the fixture is created; devices,
nodes and the odd cases are made the first time a test asks for them and then reused.
Every key file is mode 0600.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from cryptography import x509

from lb.pki.certs import (
    CLIENT_AUTH,
    SERVER_AUTH,
    Issued,
    KeyType,
    Names,
    make_crl,
    make_device,
    make_intermediate,
    make_node,
    make_root,
    make_server,
    write_allinone,
    write_certs,
    write_crls,
    write_key,
)

__all__ = ["DEVICE_COUNT", "DeviceFiles", "NodeFiles", "TestPKI", "load_cert", "pki", "pki_rsa"]

# Good devices device-001 .. device-030 can be asked for; more is a test bug.
DEVICE_COUNT = 30
ROOT_COMMON_NAME = "Test Root CA"
INTERMEDIATE_COMMON_NAME = "Test Intermediate CA"
SERVER_COMMON_NAME = "lb.local"


@dataclass(frozen=True, slots=True)
class DeviceFiles:
    """One device's files. ``chain`` is cert + intermediate; ``pem`` is key + cert."""

    cert: Path
    key: Path
    cn: str
    chain: Path
    pem: Path
    issued: Issued


class NodeFiles(NamedTuple):
    """A cluster node's files; ``cert`` holds the node certificate then the intermediate."""

    cert: Path
    key: Path


class TestPKI:
    """Certificates and keys on disk for one test session (see the module docstring)."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, directory: Path, *, key_type: KeyType = "ec") -> None:
        self.directory = directory
        self.key_type: KeyType = key_type
        (directory / "devices").mkdir(parents=True, exist_ok=True)
        (directory / "nodes").mkdir(exist_ok=True)
        (directory / "rogue").mkdir(exist_ok=True)

        self.root_issued = make_root(
            ROOT_COMMON_NAME,
            key_type=key_type,
            names=Names(country="CN", locality="WuHan", organization="emqx", state="China"),
        )
        self.intermediate_issued = make_intermediate(
            self.root_issued, INTERMEDIATE_COMMON_NAME, key_type=key_type
        )
        self.root = write_certs(directory / "CaRoot.pem", [self.root_issued.cert])
        self.root_key = write_key(directory / "CaRoot-key.pem", self.root_issued.key)
        self.intermediate = write_certs(
            directory / "CaIntermediate.pem", [self.intermediate_issued.cert]
        )
        self.intermediate_key = write_key(
            directory / "CaIntermediate-key.pem", self.intermediate_issued.key
        )
        self.ca_bundle = write_certs(
            directory / "ca-bundle.pem", [self.intermediate_issued.cert, self.root_issued.cert]
        )

        self.server_issued = make_server(
            self.intermediate_issued,
            SERVER_COMMON_NAME,
            dns_names=["localhost", SERVER_COMMON_NAME],
            ip_addresses=["127.0.0.1"],
            key_type=key_type,
        )
        self.server_cert = write_certs(directory / "server.pem", [self.server_issued.cert])
        self.server_key = write_key(directory / "server-key.pem", self.server_issued.key)
        self.server_chain = write_certs(directory / "server-chain.pem", self.server_issued.certs)
        self.server_allinone = write_allinone(directory / "server-allinone.pem", self.server_issued)

        self._devices: dict[str, DeviceFiles] = {}
        self._nodes: dict[str, NodeFiles] = {}
        self.revoked = self._device(self.intermediate_issued, "device-revoked")
        intermediate_crl = make_crl(self.intermediate_issued, [self.revoked.issued.cert])
        root_crl = make_crl(self.root_issued)
        # HAProxy's crl-file checks every level of the chain, so the root needs a CRL too.
        self.crl = write_crls(directory / "crl.pem", [intermediate_crl, root_crl])
        self.crl_intermediate_only = write_crls(
            directory / "crl-intermediate-only.pem", [intermediate_crl]
        )

    # --- devices -----------------------------------------------------------------------------

    def _device(
        self,
        issuer: Issued,
        cn: str,
        *,
        subdirectory: str = "devices",
        file_name: str | None = None,
        extended_key_usage: Sequence[x509.ObjectIdentifier] = (CLIENT_AUTH, SERVER_AUTH),
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> DeviceFiles:
        name = file_name or cn
        if name in self._devices:
            return self._devices[name]
        issued = make_device(
            issuer,
            cn,
            key_type=self.key_type,
            extended_key_usage=extended_key_usage,
            not_before=not_before,
            not_after=not_after,
        )
        return self._save_device(issued, subdirectory, name)

    def _save_device(self, issued: Issued, subdirectory: str, name: str) -> DeviceFiles:
        folder = self.directory / subdirectory
        files = DeviceFiles(
            cert=write_certs(folder / f"{name}.pem", [issued.cert]),
            key=write_key(folder / f"{name}-key.pem", issued.key),
            cn=issued.common_name,
            chain=write_certs(folder / f"{name}-chain.pem", issued.certs),
            pem=_write_key_and_cert(folder / f"{name}-allinone.pem", issued),
            issued=issued,
        )
        self._devices[name] = files
        return files

    def device(self, number: int) -> DeviceFiles:
        """Good device ``number`` (1..30), CN ``device-NNN``, signed by the intermediate."""
        if not 1 <= number <= DEVICE_COUNT:
            raise ValueError(f"device number {number} outside 1..{DEVICE_COUNT}")
        return self._device(self.intermediate_issued, f"device-{number:03d}")

    def devices(self, count: int) -> list[DeviceFiles]:
        """Good devices 1..count."""
        return [self.device(number) for number in range(1, count + 1)]

    @functools.cached_property
    def expired(self) -> DeviceFiles:
        """Signed by the intermediate, but its notAfter was yesterday."""
        now = datetime.datetime.now(datetime.UTC)
        return self._device(
            self.intermediate_issued,
            "device-expired",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )

    @functools.cached_property
    def not_yet_valid(self) -> DeviceFiles:
        """Signed by the intermediate, but its notBefore is tomorrow."""
        now = datetime.datetime.now(datetime.UTC)
        return self._device(
            self.intermediate_issued,
            "device-not-yet-valid",
            not_before=now + datetime.timedelta(days=1),
            not_after=now + datetime.timedelta(days=30),
        )

    @functools.cached_property
    def server_purpose(self) -> DeviceFiles:
        """Signed by the intermediate, EKU serverAuth only: wrong purpose for a client."""
        return self._device(
            self.intermediate_issued, "device-server-purpose", extended_key_usage=(SERVER_AUTH,)
        )

    @functools.cached_property
    def by_root(self) -> DeviceFiles:
        """Signed directly by the root (the seed's one-level trust model)."""
        return self._device(self.root_issued, "device-by-root")

    @functools.cached_property
    def self_signed(self) -> DeviceFiles:
        """A self-signed certificate that calls itself device-001."""
        root = make_root("device-001", key_type=self.key_type, days=30)
        return self._save_device(root, "devices", "device-self-signed")

    @functools.cached_property
    def _rogue(self) -> tuple[Issued, Issued]:
        # Same subject names as the real CAs, different keys: only the signatures tell.
        root = make_root(
            ROOT_COMMON_NAME,
            key_type=self.key_type,
            names=Names(country="CN", locality="WuHan", organization="emqx", state="China"),
        )
        intermediate = make_intermediate(root, INTERMEDIATE_COMMON_NAME, key_type=self.key_type)
        write_certs(self.directory / "rogue" / "RogueRoot.pem", [root.cert])
        write_certs(self.directory / "rogue" / "RogueIntermediate.pem", [intermediate.cert])
        return root, intermediate

    @property
    def rogue_root(self) -> Path:
        """The rogue root CA certificate (same subject as the real root, another key)."""
        self._rogue  # noqa: B018 - creates the files
        return self.directory / "rogue" / "RogueRoot.pem"

    @property
    def rogue_intermediate(self) -> Path:
        """The rogue intermediate CA certificate (same subject as the real one)."""
        self._rogue  # noqa: B018 - creates the files
        return self.directory / "rogue" / "RogueIntermediate.pem"

    @functools.cached_property
    def rogue(self) -> DeviceFiles:
        """CN device-001, signed by the rogue intermediate: an impostor."""
        return self._device(
            self._rogue[1], "device-001", subdirectory="rogue", file_name="rogue-device-001"
        )

    # --- cluster nodes -----------------------------------------------------------------------

    def node(self, name: str) -> NodeFiles:
        """Node certificate for ``name`` (SAN DNS name + localhost, IP 127.0.0.1)."""
        if name not in self._nodes:
            issued = make_node(
                self.intermediate_issued,
                name,
                dns_names=[name, "localhost"],
                ip_addresses=["127.0.0.1"],
                key_type=self.key_type,
            )
            folder = self.directory / "nodes"
            self._nodes[name] = NodeFiles(
                cert=write_certs(folder / f"{name}.pem", issued.certs),
                key=write_key(folder / f"{name}-key.pem", issued.key),
            )
        return self._nodes[name]


def _write_key_and_cert(path: Path, issued: Issued) -> Path:
    # The device "pem" is key + certificate only (no chain), as the brief of the fixture says.
    return write_allinone(path, Issued(cert=issued.cert, key=issued.key))


def load_cert(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file (a small convenience for tests)."""
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestPKI]:
    """The session's ECDSA P-256 test PKI."""
    yield TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def pki_rsa(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestPKI]:
    """The same PKI with RSA 2048 keys (slower to make; only when asked for)."""
    yield TestPKI(tmp_path_factory.mktemp("pki-rsa"), key_type="rsa2048")
