"""Micro-benchmark: lb.proxyproto vs the proxy-protocol package (µs per call, JSON).

    .venv/bin/python bench/proxyproto_bench.py [--number 20000] [--repeat 5]

Prints the best of ``--repeat`` runs. The package (a test-only dependency) adds a CRC32C TLV
to every pack when the ``crc32c`` wheel is installed, so its pack numbers include one.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import timeit
from collections.abc import Callable

from lb.proxyproto import ClientFlags, Command, ProxyProtocolDecoder, SSLInfo, encode_v1, encode_v2

SOURCE = ("203.0.113.7", 51234)
DESTINATION = ("10.0.0.5", 8883)
SSL = SSLInfo(
    ClientFlags.SSL | ClientFlags.CERT_CONN | ClientFlags.CERT_SESS,
    0,
    version="TLSv1.3",
    cn="device-0001",
    cipher="TLS_AES_256_GCM_SHA384",
    sig_alg="ecdsa-with-SHA256",
    key_alg="EC256",
)
FULL = {"alpn": b"mqtt", "authority": "broker.example", "unique_id": b"A1B2C3", "ssl": SSL}


def best_us(function: Callable[[], object], number: int, repeat: int) -> float:
    return round(min(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e6, 3)


def decode(data: bytes) -> object:
    decoder = ProxyProtocolDecoder()
    decoder.feed(data)
    return decoder.next_event()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    arguments = parser.parse_args()
    n, r = arguments.number, arguments.repeat

    plain = encode_v2(Command.PROXY, SOURCE, DESTINATION)
    full = encode_v2(Command.PROXY, SOURCE, DESTINATION, **FULL)  # type: ignore[arg-type]
    full_crc = encode_v2(Command.PROXY, SOURCE, DESTINATION, crc32c=True, **FULL)  # type: ignore[arg-type]
    line = encode_v1(SOURCE, DESTINATION)
    ours = {
        "v2_encode_plain": lambda: encode_v2(Command.PROXY, SOURCE, DESTINATION),
        "v2_encode_full_tlvs": lambda: encode_v2(Command.PROXY, SOURCE, DESTINATION, **FULL),  # type: ignore[arg-type]
        "v2_encode_full_tlvs_crc32c": lambda: encode_v2(
            Command.PROXY,
            SOURCE,
            DESTINATION,
            crc32c=True,
            **FULL,  # type: ignore[arg-type]
        ),
        "v2_decode_plain": lambda: decode(plain),
        "v2_decode_full_tlvs": lambda: decode(full),
        "v2_decode_full_tlvs_crc32c": lambda: decode(full_crc),
        "v1_encode": lambda: encode_v1(SOURCE, DESTINATION),
        "v1_decode": lambda: decode(line),
    }
    results: dict[str, dict[str, float | int]] = {
        "lb.proxyproto": {name: best_us(f, n, r) for name, f in ours.items()},
        "header_bytes": {
            "v2_plain": len(plain),
            "v2_full": len(full),
            "v2_full_crc": len(full_crc),
        },
    }

    try:  # the proxy-protocol package (a test extra) is optional here: compared when present
        from proxyprotocol.result import ProxyResultIPv4  # noqa: PLC0415
        from proxyprotocol.tlv import ProxyProtocolSSLTLV, ProxyProtocolTLV  # noqa: PLC0415
        from proxyprotocol.v1 import ProxyProtocolV1  # noqa: PLC0415
        from proxyprotocol.v2 import ProxyProtocolV2  # noqa: PLC0415
    except ImportError:
        results["proxy-protocol"] = {}
    else:
        v1, v2 = ProxyProtocolV1(), ProxyProtocolV2()
        addresses = (
            (ipaddress.IPv4Address(SOURCE[0]), SOURCE[1]),
            (ipaddress.IPv4Address(DESTINATION[0]), DESTINATION[1]),
        )
        tlv = ProxyProtocolTLV(
            alpn=b"mqtt",
            authority="broker.example",
            unique_id=b"A1B2C3",
            ssl=ProxyProtocolSSLTLV(
                has_ssl=True,
                has_cert_conn=True,
                has_cert_sess=True,
                verified=True,
                version="TLSv1.3",
                cn="device-0001",
                cipher="TLS_AES_256_GCM_SHA384",
                sig_alg="ecdsa-with-SHA256",
                key_alg="EC256",
            ),
        )
        plain_result = ProxyResultIPv4(*addresses, protocol=socket.SOCK_STREAM)
        full_result = ProxyResultIPv4(*addresses, protocol=socket.SOCK_STREAM, tlv=tlv)
        theirs = {
            "v2_encode_plain": lambda: v2.pack(plain_result),
            "v2_encode_full_tlvs_crc32c": lambda: v2.pack(full_result),
            "v2_decode_plain": lambda: v2.unpack(plain),
            "v2_decode_full_tlvs": lambda: v2.unpack(full),
            "v1_encode": lambda: v1.pack(plain_result),
            "v1_decode": lambda: v1.unpack(line),
        }
        results["proxy-protocol"] = {name: best_us(f, n, r) for name, f in theirs.items()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
