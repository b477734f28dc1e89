"""Node counters, shown by the admin API (/api/stats) and as Prometheus metrics (/metrics).

Plain integers bumped by the core and the listeners; every refusal and every drop has one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Counters", "render_prometheus", "render_prometheus_rows"]


@dataclass(slots=True)
class Counters:
    connections_accepted: int = 0
    connections_closed: int = 0
    connections_refused_max_connections: int = 0
    connects_accepted: int = 0
    connects_refused: int = 0
    authorization_denied: int = 0
    proxy_headers_accepted: int = 0
    proxy_untrusted_sources: int = 0
    proxy_health_checks: int = 0
    mqtt_health_checks: int = 0  # CONNECTs on PROXY LOCAL connections, answered (mqtt-chk)
    proxy_missing_header: int = 0
    proxy_header_errors: int = 0
    proxy_header_timeouts: int = 0
    proxy_header_unexpected: int = 0
    # proxy_protocol_hmac_keys (lb.proxy_hmac): headers accepted, refused by reason, and
    # headers with an HMAC TLV on a listener that has no key to check it.
    proxy_hmac_verified: int = 0
    proxy_hmac_missing: int = 0
    proxy_hmac_unknown_key: int = 0
    proxy_hmac_bad_mac: int = 0
    proxy_hmac_stale: int = 0
    proxy_hmac_replayed: int = 0
    proxy_hmac_unchecked: int = 0
    malformed_packets: int = 0
    protocol_errors: int = 0
    keepalive_timeouts: int = 0
    takeovers: int = 0
    messages_received: int = 0
    messages_sent: int = 0
    messages_retained: int = 0
    messages_dropped_queue_full: int = 0
    messages_dropped_qos0_offline: int = 0
    messages_dropped_too_large: int = 0
    messages_expired: int = 0
    # Issue 14 item 2: QoS 1/2 messages lost to a bound (the publisher had its PUBACK).
    messages_dropped_acknowledged: int = 0
    # A shared group's picked member left and no other local member was there.
    messages_dropped_no_member: int = 0
    # Issue 12: a message that reached a transferred or merged session twice.
    messages_duplicates_dropped: int = 0
    sessions_transferred_in: int = 0
    sessions_transferred_out: int = 0
    sessions_merged: int = 0
    # Connects refused because a newer claim on the client id won (two connects at once).
    claims_rejected: int = 0
    # PUBACK/PUBREC/PUBCOMP held until the store committed what they promise.
    acks_after_commit: int = 0
    # Freed heap handed back to the system after queues emptied (malloc_trim).
    memory_releases: int = 0
    # Backpressure (broker.session): QoS 1/2 publishers paused for a subscriber's queue,
    # how many are paused now (a gauge), and pauses skipped because they would deadlock.
    publishers_paused: int = 0
    publishers_paused_current: int = 0
    # ... of which for ACKS_WAITING_MAX acknowledgements waiting (broker.connection).
    publishers_paused_acks: int = 0
    backpressure_cycles_skipped: int = 0
    messages_no_subscribers: int = 0
    wills_published: int = 0
    sessions_expired: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    # Listener limits (broker.listener, broker.accept): sockets closed before CONNECT to keep
    # max_pending_connections / max_pending_bytes, deadline timers that ran late because
    # the event loop stalled (each gave its socket one more poll), accepts that failed for
    # lack of file descriptors.
    pending_connections_evicted: int = 0
    # TLS clients whose verified chain is longer than ssl_options.depth allows.
    tls_chain_too_deep: int = 0
    timers_late: int = 0
    accepts_failed: int = 0
    # Accept pauses for a listener's max_conn_rate (every listener's; /api/listeners has
    # each one's): the connections waited in the kernel's queue, none was refused.
    accepts_paused_max_conn_rate: int = 0
    # Clients disconnected by an evacuation (broker.evacuation), to reconnect elsewhere.
    clients_evacuated: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def render_prometheus(prefix: str, values: dict[str, int], labels: dict[str, str]) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    label_text = ",".join(
        f'{name}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for name, value in labels.items()
    )
    lines: list[str] = []
    for name, value in values.items():
        metric = f"{prefix}_{name}"
        kind = "counter" if not name.endswith(("_current", "_count")) else "gauge"
        if kind == "counter" and not metric.endswith("_total"):
            metric += "_total"
        lines.append(f"# TYPE {metric} {kind}")
        lines.append(f"{metric}{{{label_text}}} {value}")
    return "\n".join(lines) + "\n"


def render_prometheus_rows(
    prefix: str, rows: list[tuple[dict[str, str], dict[str, int | None]]]
) -> str:
    """One family per value name over several labelled rows (a node's listeners): the text
    format wants every sample of a family after its one TYPE line. A None value (a figure
    the row does not have) is left out."""
    families: dict[str, list[str]] = {}
    for labels, values in rows:
        for name, value in values.items():
            if value is None:
                continue
            sample = render_prometheus(prefix, {name: value}, labels).splitlines()
            family = families.setdefault(sample[0], [])
            family.append(sample[1])
    lines: list[str] = []
    for type_line, samples in families.items():
        lines.append(type_line)
        lines.extend(samples)
    return "".join(line + "\n" for line in lines)
