"""The demo's report, judged and rendered: what is wrong with it, and the lines a person reads.

A report is the JSON-shaped dict that :mod:`demo.devices` makes: the devices with what they
sent and heard, each broker node's ``/api/clients`` records (with the connection id lb sent,
the ``%ID`` of its log lines), and the two connections lb had to refuse. The local demo adds
lb's own log line for each refusal (``lb_reasons``: device name -> the reason after
``SSL handshake failure:``, or None when no line was found).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LbReasons = Mapping[str, str | None]
MAX_PROBLEMS_SHOWN = 12


def device_nodes(report: Mapping[str, Any]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Client id -> [(node, its /api/clients record)]: where each client was seen."""
    seen: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for node_name, node in report["nodes"].items():
        for record in node["clients"]:
            seen.setdefault(str(record.get("client_id")), []).append((node_name, record))
    return seen


def crossed_nodes(report: Mapping[str, Any]) -> int:
    """Messages received by a device on another node than their sender's."""
    seen = device_nodes(report)
    node_of = {name: places[0][0] for name, places in seen.items() if len(places) == 1}
    return sum(
        device["received"]
        for device in report["devices"]
        if device["from"] in node_of
        and device["name"] in node_of
        and node_of[device["from"]] != node_of[device["name"]]
    )


def problems(report: Mapping[str, Any], lb_reasons: LbReasons | None = None) -> list[str]:
    """Everything that makes the report wrong; empty when the demo did what it should."""
    found = list(report.get("fleet_problems", []))
    devices = report["devices"]
    broken: set[str] = set()
    for device in devices:
        name = device["name"]
        if device["error"] or not device["connected"]:
            # One line for a device that never got in: the rest follows from it.
            found.append(f"{name}: {device['error'] or 'not connected'}")
            broken.add(name)
            continue
        if device["sent"] != device["expected"]:
            found.append(f"{name}: sent {device['sent']} of {device['expected']}")
        if device["received"] != device["expected"]:
            found.append(f"{name}: received {device['received']} of {device['expected']}")
    nodes = report["nodes"]
    for node_name, node in nodes.items():
        if node["error"]:
            found.append(f"{node_name}: {node['error']}")
    if nodes:
        seen = device_nodes(report)
        for device in devices:
            name = device["name"]
            if name in broken:
                continue
            places = seen.get(name, [])
            if len(places) != 1:
                where = ", ".join(node for node, _ in places) or "no node"
                found.append(f"{name}: seen on {where}, expected on exactly one")
                continue
            node_name, record = places[0]
            if record.get("certificate_cn") != name:
                found.append(f"{name}: {node_name} learned CN {record.get('certificate_cn')!r}")
            if not record.get("via_proxy"):
                found.append(f"{name}: {node_name} got no PROXY header for it")
            elif record.get("connection_id_source") != "proxy":
                found.append(f"{name}: {node_name} got no connection id from lb (unique-id)")
            if device["local_address"] and record.get("address") != device["local_address"]:
                found.append(
                    f"{name}: {node_name} says it comes from {record.get('address')}, "
                    f"its socket is {device['local_address']}"
                )
        holding = {places[0][0] for places in seen.values() if places}
        if len(devices) >= len(nodes) and len(holding & set(nodes)) < len(nodes):
            empty = sorted(set(nodes) - holding)
            found.append(f"round robin left {', '.join(empty)} without devices")
    for refusal in report["refusals"]:
        if not refusal["refused"]:
            found.append(f"{refusal['device']}: not refused ({refusal['client_error']})")
        if lb_reasons is not None and not lb_reasons.get(refusal["device"]):
            found.append(f"{refusal['device']}: no refusal line in lb's log")
    return found


def render(
    report: Mapping[str, Any],
    lb_reasons: LbReasons | None = None,
    node_notes: Mapping[str, str] | None = None,
) -> list[str]:
    """The summary: devices per node, messages, refusals, and the verdict.

    ``node_notes`` adds a word about each node to its heading (the local demo: lb's server
    line that points at it).
    """
    devices = {device["name"]: device for device in report["devices"]}
    lines = [
        f"{len(devices)} devices -> lb {report['lb']} (mutual TLS) -> "
        f"{len(report['nodes']) or 'the'} broker nodes; each device sends "
        f"{report['messages_per_device']} QoS 1 messages to the next one's "
        "fleet/<id>/commands",
        "",
    ]
    listed: set[str] = set()
    width = max((len(name) for name in devices), default=11)
    for node_name, node in report["nodes"].items():
        clients = node["clients"]
        fleet = [record for record in clients if record.get("client_id") in devices]
        note = f"{node_notes[node_name]}; " if node_notes and node_name in node_notes else ""
        lines.append(
            f"{node_name}: {len(fleet)} devices ({note}GET http://{node['admin']}/api/clients)"
        )
        if node["error"]:
            lines.append(f"  ! {node['error']}")
        for record in sorted(clients, key=lambda r: str(r.get("client_id"))):
            client_id = str(record.get("client_id"))
            device = devices.get(client_id)
            text = (
                f"  {client_id:<{width}}  {record.get('address')!s:<21}  "
                f"CN={record.get('certificate_cn')}  id={record.get('connection_id')}"
            )
            if device is None:
                lines.append(f"{text}  (not one of the simulated devices)")
                continue
            listed.add(client_id)
            lines.append(
                f"{text}  sent {device['sent']}  "
                f"received {device['received']}/{device['expected']} from {device['from']}"
            )
        lines.append("")
    unlisted = [device for name, device in devices.items() if name not in listed]
    if unlisted:
        lines.append("devices no node reported:" if report["nodes"] else "devices:")
        for device in unlisted:
            lines.append(
                f"  {device['name']:<{width}}  {device['local_address']!s:<21}  "
                f"sent {device['sent']}  received {device['received']}/{device['expected']}"
                + (f"  ! {device['error']}" if device["error"] else "")
            )
        lines.append("")
    sent = sum(device["sent"] for device in devices.values())
    received = sum(device["received"] for device in devices.values())
    expected = sum(device["expected"] for device in devices.values())
    verdict = "all delivered" if sent == received == expected else "NOT all delivered"
    crossed = f", {crossed_nodes(report)} crossed nodes" if report["nodes"] else ""
    lines.append(f"messages: {sent} sent, {received} received of {expected}{crossed}: {verdict}")
    lines.append("")
    lines.append("refused by lb:")
    for refusal in report["refusals"]:
        label = f"{refusal['device']} (client id {refusal['client_id']})"
        address = refusal["local_address"] or "?"
        if lb_reasons is not None:
            reason = lb_reasons.get(refusal["device"]) or "NO LINE IN lb's LOG"
            lines.append(f"  {label} from {address}: {reason}")
            lines.append(f"      the device saw: {refusal['client_error']}")
        else:
            outcome = "refused" if refusal["refused"] else "NOT REFUSED"
            lines.append(f"  {label} from {address}: {outcome}: {refusal['client_error']}")
    lines.append("")
    found = problems(report, lb_reasons)
    if found:
        lines.append(f"result: FAILED ({len(found)} problems)")
        lines.extend(f"  - {problem}" for problem in found[:MAX_PROBLEMS_SHOWN])
        if len(found) > MAX_PROBLEMS_SHOWN:
            lines.append(f"  - ... and {len(found) - MAX_PROBLEMS_SHOWN} more")
    else:
        lines.append("result: OK")
    return lines
