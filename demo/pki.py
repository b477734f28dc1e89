"""``python -m demo.pki --dir configs/certs``: the demo's PKI, reused when it is still good.

A rerun of the demo must not remake certificates for nothing (nor fail because the keys are
there, as ``lb-pki demo`` does without ``--force``), and must not run on a stale PKI either.
So this checks what is in ``--dir`` with lb-pki's own verifier: every file there, the server
certificate with its SANs, the devices, the nodes, the revoked device refused as revoked,
the rogue device refused as from an unknown CA, a CRL not past its next update. When all of
that holds it says so and exits 0; otherwise it runs ``lb-pki demo --force`` into ``--dir``.
docker-compose's one-shot pki service runs this same command into its volume.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from demo import topology
from lb.pki.certs import PKIError, load_certs, load_crls
from lb.pki.cli import main as lb_pki
from lb.pki.verify import Purpose, Reason, verify_chain

SERVER_IPS = ("127.0.0.1",)
SERVER_DNS = ("localhost",)


def _pair(directory: Path, name: str) -> list[Path]:
    return [directory / f"{name}.pem", directory / f"{name}-key.pem"]


def problems(
    directory: Path,
    devices: int,
    dns_names: Sequence[str],
    node_count: int = topology.DEFAULT_NODES,
) -> list[str]:
    """Why the PKI in ``directory`` cannot be reused; empty when it can."""
    members = topology.nodes(node_count)
    required = [directory / topology.SERVER_ALLINONE, directory / topology.CRL]
    for name in (
        topology.ROOT_CA,
        topology.INTERMEDIATE_CA,
        topology.REVOKED_DEVICE,
        topology.ROGUE_DEVICE,
        *(topology.device_name(number) for number in range(1, devices + 1)),
        *(node.certificate for node in members),
    ):
        required += _pair(directory, name)
    missing = [path.name for path in required if not path.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        return [f"missing {len(missing)} file(s): {shown}"]
    try:
        roots = load_certs(directory / f"{topology.ROOT_CA}.pem")
        intermediates = load_certs(directory / f"{topology.INTERMEDIATE_CA}.pem")
        crls = load_crls(directory / topology.CRL)
        found: list[str] = []

        def refusals(name: str, purpose: Purpose) -> set[Reason]:
            path = directory / name
            leaf, *chain = load_certs(path)
            result = verify_chain(
                leaf,
                trusted=roots,
                untrusted=[*chain, *intermediates],
                crls=crls,
                purpose=purpose,
            )
            return result.reasons

        server_reasons = refusals(topology.SERVER_ALLINONE, "server")
        if server_reasons:
            found.append(f"{topology.SERVER_ALLINONE}: {', '.join(sorted(server_reasons))}")
        (server, *_) = load_certs(directory / topology.SERVER_ALLINONE)
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have_dns = set(names.get_values_for_type(x509.DNSName))
        have_ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
        for dns_name in (*SERVER_DNS, *dns_names):
            if dns_name not in have_dns:
                found.append(f"{topology.SERVER_ALLINONE}: no DNS SAN {dns_name}")
        for ip in SERVER_IPS:
            if str(ipaddress.ip_address(ip)) not in have_ips:
                found.append(f"{topology.SERVER_ALLINONE}: no IP SAN {ip}")
        for number in range(1, devices + 1):
            name = f"{topology.device_name(number)}.pem"
            if reasons := refusals(name, "client"):
                found.append(f"{name}: {', '.join(sorted(reasons))}")
        for node in members:
            name = f"{node.certificate}.pem"
            if reasons := refusals(name, "any"):
                found.append(f"{name}: {', '.join(sorted(reasons))}")
        if refusals(f"{topology.REVOKED_DEVICE}.pem", "client") != {Reason.REVOKED}:
            found.append(f"{topology.REVOKED_DEVICE}.pem: not (only) revoked")
        if Reason.UNKNOWN_CA not in refusals(f"{topology.ROGUE_DEVICE}.pem", "client"):
            found.append(f"{topology.ROGUE_DEVICE}.pem: not from an unknown CA")
    except (PKIError, ValueError, x509.ExtensionNotFound) as error:
        return [str(error)]
    return found


def make(
    directory: Path,
    devices: int,
    dns_names: Sequence[str],
    node_count: int = topology.DEFAULT_NODES,
) -> tuple[int, str]:
    """Run ``lb-pki demo --force`` into ``directory``: (exit code, its last line of output)."""
    arguments = ["demo", "--dir", str(directory), "--force", "--devices", str(devices)]
    arguments += ["--nodes", str(node_count)]
    for dns_name in dns_names:
        arguments += ["--dns", dns_name]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = lb_pki(arguments)
    lines = output.getvalue().strip().splitlines()
    return code, lines[-1] if lines else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.pki", description="reuse the demo PKI in --dir if valid, else make it"
    )
    parser.add_argument("--dir", default=topology.CERTS_DIR)
    parser.add_argument("--devices", type=int, default=topology.PKI_DEVICES)
    parser.add_argument("--nodes", type=int, default=topology.DEFAULT_NODES, help="node certs")
    parser.add_argument("--dns", action="append", default=[], help="server SAN DNS name")
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= topology.MAX_NODES:
        parser.error(f"--nodes must be 1..{topology.MAX_NODES}")
    directory = Path(args.dir)
    found = problems(directory, args.devices, args.dns, args.nodes)
    if not found:
        print(f"PKI in {directory}: present and valid, reused")
        return 0
    print(f"PKI in {directory}: {found[0]}{' ...' if len(found) > 1 else ''}; making it anew")
    code, last = make(directory, args.devices, args.dns, args.nodes)
    if code != 0:
        return code
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
