"""Seed 003's example policies, as written (configs/authz/), enforced on real MQTT clients.

One `broker -c FILE` process and one `lb -f FILE` process serve the whole module:

- devices connect with real certificates to lb (mutual TLS, seed 004's bind line); lb
  verifies the chain, terminates TLS and sends PROXY v2 with the CN and the verified chain's
  subjects (``proxy-v2-options ssl,cert-cn,chain-subjects``) to the broker listener
  ``tcp:devices`` (proxy_protocol, peer_cert_as_username = "cn", authorization = true);
  the broker gives attributes by subject, from the root, an intermediate or the leaf;
- users connect straight to ``tcp:users`` with a username and a password from a
  mosquitto_passwd file (authorization = true);
- ``tcp:open`` has no authorization.

paho-mqtt speaks 3.1.1 and 5.0; a raw socket checks the exact bytes of 3.1.1 refusals. Each
test loads its policy with ``POST /api/authz/reload`` (which also disconnects everyone).
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from bench.ports import free_port
from broker.authentication import hash_password
from broker.mqtt import (
    NEED_DATA,
    Connack,
    Connect,
    MQTTDecoder,
    Packet,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    encode,
)
from lb.pki.certs import Issued, Names, make_device, make_intermediate, make_root, write_certs
from lb.pki.certs import write_key as write_private_key
from tests.harness import VENV_BIN, Process, run_lb, start_process
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "configs" / "authz"
BROKER = VENV_BIN / "broker"
PASSWORD = "correct horse"
USERS = ("temperature-sensor", "humidity-sensor", "operator", "someone")

# Subjects as an operator writes them (Azure's spaced form, root-first OpenSSL form, ...).
X509_ATTRIBUTES = """
[authorization.x509_attributes.root]
subject = "CN = Contoso Root CA Cert, OU = Engineering, C = US"
attributes = {{ organization = "contoso" }}

[authorization.x509_attributes.intermediate]
subject = "CN=Contoso Intermediate CA Seattle"
attributes = {{ city = "seattle" }}

[authorization.x509_attributes.smart-fan]
subject = "CN = smart-fan"
attributes = {{ building = "17" }}

[authorization.x509_attributes.smart-fan-2]
subject = "/CN=smart-fan-2"
attributes = {{ building = "17" }}

[authorization.x509_attributes.lobby-sensor]
subject = "CN = lobby-sensor"
attributes = {{ building = "building22" }}

[authorization.x509_attributes.orders-app]
subject = "CN = orders-app"
attributes = {{ group = "authz-sat" }}
"""


# --- a PKI with the seed's attributes in its subjects -------------------------------------


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


class ContosoPKI:
    """Contoso root -> Seattle and Redmond intermediates -> devices; a Fabrikam root too."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        contoso = make_root(
            "Contoso Root CA Cert", names=Names(country="US", organizational_unit="Engineering")
        )
        fabrikam = make_root("Fabrikam Root CA")
        self.intermediates: dict[str, Issued] = {
            "seattle": make_intermediate(contoso, "Contoso Intermediate CA Seattle"),
            "redmond": make_intermediate(contoso, "Contoso Intermediate CA Redmond"),
            "fabrikam": make_intermediate(fabrikam, "Fabrikam Intermediate CA"),
        }
        self.client_ca = write_certs(
            directory / "intermediates.pem",
            [issued.cert for issued in self.intermediates.values()],
        )
        self.roots = write_certs(directory / "roots.pem", [contoso.cert, fabrikam.cert])
        self._devices: dict[tuple[str, str], Certificate] = {}

    def device(self, cn: str, intermediate: str = "seattle") -> Certificate:
        found = self._devices.get((cn, intermediate))
        if found is None:
            issued = make_device(self.intermediates[intermediate], cn)
            stem = self.directory / f"{cn}@{intermediate}"
            found = Certificate(
                write_certs(stem.with_suffix(".pem"), [issued.cert]),
                write_private_key(stem.with_suffix(".key"), issued.key),
            )
            self._devices[(cn, intermediate)] = found
        return found


# --- processes ----------------------------------------------------------------------------


@dataclass
class Deployment:
    directory: Path
    policy: Path
    process: Process
    devices_port: int
    users_port: int
    open_port: int
    admin_port: int
    lb_port: int
    server_ca: Path
    pki: ContosoPKI

    def admin(self, method: str, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def use_policy(self, source: Path | str) -> dict[str, Any]:
        """Install a policy and reload now; every connected client is disconnected."""
        text = source.read_text() if isinstance(source, Path) else source
        self.policy.write_text(text)
        result: dict[str, Any] = self.admin("POST", "/api/authz/reload")
        assert result["error"] is None, result
        return result

    def log(self) -> str:
        return self.process.stderr


def broker_config(
    policy: Path, passwords: Path, ports: dict[str, int], reload_interval: str = "10s"
) -> str:
    return f"""
[node]
name = "authz-node"

[listeners.tcp.devices]
bind = "127.0.0.1:{ports["devices"]}"
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.1/32"]
peer_cert_as_username = "cn"
authorization = true

[listeners.tcp.users]
bind = "127.0.0.1:{ports["users"]}"
password_file = "{passwords}"
authorization = true

[listeners.tcp.open]
bind = "127.0.0.1:{ports["open"]}"

[admin]
bind = "127.0.0.1:{ports["admin"]}"

[authorization]
policy_file = "{policy}"
reload_interval = "{reload_interval}"
""" + X509_ATTRIBUTES.format()


def lb_config(pki: TestPKI, contoso: ContosoPKI, front: int, broker_port: int) -> str:
    verify = f"ca-file {contoso.client_ca} ca-verify-file {contoso.roots} verify required"
    proxy = "send-proxy-v2 proxy-v2-options ssl,cert-cn,chain-subjects"
    return f"""
global
    maxconn 1000

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s

frontend devices
    bind 127.0.0.1:{front} ssl crt {pki.server_allinone} {verify}
    default_backend brokers

backend brokers
    balance roundrobin
    server authz-node 127.0.0.1:{broker_port} {proxy}
"""


@contextlib.contextmanager
def running_broker(config: str, directory: Path, name: str = "broker") -> Iterator[Process]:
    path = directory / f"{name}.toml"
    path.write_text(config)
    process = start_process([str(BROKER), "-c", str(path)], directory, name)
    try:
        try:
            process.wait_output("started", 15, stream="stderr")
        except TimeoutError:
            process.stop()
            raise AssertionError(f"broker did not start:\n{process.stderr}") from None
        yield process
    finally:
        process.stop()


def write_passwords(path: Path) -> Path:
    path.write_text("".join(f"{user}:{hash_password(PASSWORD)}\n" for user in USERS))
    return path


@contextlib.contextmanager
def deploy(pki: TestPKI, directory: Path) -> Iterator[Deployment]:
    """The broker and lb processes of this module (also used by test_broker_statestore)."""
    contoso = ContosoPKI(directory / "contoso")
    policy = directory / "policy.yaml"
    policy.write_text((EXAMPLES / "sat-attributes.json").read_text())
    passwords = write_passwords(directory / "passwd")
    ports = {name: free_port() for name in ("devices", "users", "open", "admin")}
    front = free_port()
    config = broker_config(policy, passwords, ports)
    with (
        running_broker(config, directory) as process,
        run_lb(lb_config(pki, contoso, front, ports["devices"]), directory, front),
    ):
        yield Deployment(
            directory,
            policy,
            process,
            ports["devices"],
            ports["users"],
            ports["open"],
            ports["admin"],
            front,
            pki.root,
            contoso,
        )


@pytest.fixture(scope="module")
def deployment(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deploy(pki, tmp_path_factory.mktemp("authz")) as running:
        yield running


# --- a blocking paho client ---------------------------------------------------------------


class Client:
    """paho-mqtt (3.1.1 = level 4, or 5.0), with every acknowledgement in a queue."""

    def __init__(
        self,
        port: int,
        client_id: str,
        level: int = 5,
        username: str | None = None,
        password: str | None = None,
        certificate: Certificate | None = None,
        server_ca: Path | None = None,
    ) -> None:
        self.port = port
        self.level = level
        protocol = mqtt.MQTTv5 if level == 5 else mqtt.MQTTv311
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if certificate is not None:
            assert server_ca is not None
            self.client.tls_set(
                ca_certs=str(server_ca),
                certfile=str(certificate.cert),
                keyfile=str(certificate.key),
            )
            self.client.tls_insecure_set(True)
        self.connacks: queue.Queue[int] = queue.Queue()
        self.acks: dict[int, queue.Queue[int]] = {}
        self.subacks: dict[int, queue.Queue[list[int]]] = {}
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.disconnects: queue.Queue[int] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _client, _userdata, message: self.messages.put(message)
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        self.connacks.put(int(reason.value))

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self.acks.setdefault(mid, queue.Queue()).put(int(reason.value))

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        self.subacks.setdefault(mid, queue.Queue()).put([int(code.value) for code in reasons])

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        self.disconnects.put(int(reason.value))

    def connect(self) -> int:
        """The CONNACK reason (paho reports 3.1.1 return codes as 5.0 reason codes)."""
        self.client.reconnect_delay_set(60, 120)  # never reconnect behind the test's back
        self.client.connect("127.0.0.1", self.port, keepalive=60)
        self.client.loop_start()
        return self.connacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes = b"x", qos: int = 1, **properties: Any) -> int:
        paho_properties = None
        if properties:
            paho_properties = PahoProperties(PacketTypes.PUBLISH)
            for name, value in properties.items():
                setattr(paho_properties, name, value)
        info = self.client.publish(topic, payload, qos=qos, properties=paho_properties)
        if qos == 0:
            return 0
        code = self.acks.setdefault(info.mid, queue.Queue()).get(timeout=10)
        # 0x10 No matching subscribers is an accepted publish too.
        return SUCCESS if code == NO_MATCHING_SUBSCRIBERS else code

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        _, mid = self.client.subscribe(topic_filter, qos=qos)
        assert mid is not None
        [code] = self.subacks.setdefault(mid, queue.Queue()).get(timeout=10)
        return code

    def receive(self, timeout: float = 5.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def nothing_received(self, wait: float = 0.5) -> bool:
        try:
            self.messages.get(timeout=wait)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def client_factory() -> Iterator[Callable[..., Client]]:
    """Make clients; every one is disconnected at the end."""
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        client = Client(*args, **kwargs)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            with contextlib.suppress(Exception):
                client.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    with client_factory() as make:
        yield make


def device(
    deployment: Deployment,
    clients: Callable[..., Client],
    client_id: str,
    cn: str,
    intermediate: str = "seattle",
    level: int = 5,
) -> Client:
    certificate = deployment.pki.device(cn, intermediate)
    return clients(
        deployment.lb_port,
        client_id,
        level,
        certificate=certificate,
        server_ca=deployment.server_ca,
    )


def user(
    deployment: Deployment,
    clients: Callable[..., Client],
    client_id: str,
    username: str,
    level: int = 5,
    password: str = PASSWORD,
) -> Client:
    return clients(deployment.users_port, client_id, level, username=username, password=password)


class Raw:
    """A blocking socket client speaking exactly the packets given (the project's codec)."""

    def __init__(self, port: int, level: int) -> None:
        self.level = level
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.decoder = MQTTDecoder(protocol_level=level)

    def exchange(self, packet: Packet) -> Packet | None:
        self.sock.sendall(encode(packet, self.level))
        while True:
            event = self.decoder.next_event()
            if event is not NEED_DATA:
                return event
            data = self.sock.recv(65536)
            if not data:
                return None
            self.decoder.feed(data)

    def close(self) -> None:
        self.sock.close()


NOT_AUTHORIZED = 0x87
NO_MATCHING_SUBSCRIBERS = 0x10
SUCCESS = 0
LEVELS = [pytest.param(4, id="3.1.1"), pytest.param(5, id="5.0")]


# --- seed 003 example 1 (the portal's policy): client ids OR city AND organization ----------


@pytest.mark.parametrize("level", LEVELS)
def test_portal_example_over_x509(
    deployment: Deployment, clients: Callable[..., Client], level: int
) -> None:
    deployment.use_policy(EXAMPLES / "portal-example.yaml")
    # Listed client id; organization=contoso comes from the Contoso ROOT's subject.
    sensor = device(
        deployment, clients, "temperature-sensor", "temperature-sensor", "redmond", level
    )
    assert sensor.connect() == SUCCESS
    assert sensor.publish("/telemetry/temperature-sensor") == SUCCESS
    assert sensor.publish("/telemetry/contoso") == SUCCESS
    denied = SUCCESS if level == 4 else NOT_AUTHORIZED  # 3.1.1: a plain PUBACK (seed 003)
    assert sensor.publish("/telemetry/humidity-sensor") == denied
    assert sensor.subscribe("/commands/contoso") == 1
    assert sensor.subscribe("/commands/fabrikam") == (0x80 if level == 4 else NOT_AUTHORIZED)

    # The same client id under another root: no organization, so only its own topic.
    fabrikam = device(
        deployment, clients, "humidity-sensor", "temperature-sensor", "fabrikam", level
    )
    assert fabrikam.connect() == SUCCESS
    assert fabrikam.publish("/telemetry/humidity-sensor") == SUCCESS
    assert fabrikam.publish("/telemetry/contoso") == denied

    # Not a listed client id: city=seattle from the Seattle INTERMEDIATE decides.
    smart_lock = device(deployment, clients, "some-other-username", "smart-lock", "seattle", level)
    assert smart_lock.connect() == SUCCESS
    assert smart_lock.publish("/telemetry/contoso") == SUCCESS
    assert smart_lock.subscribe("/commands/contoso") == 1
    elsewhere = device(deployment, clients, "some-other-username-2", "smart-lock", "redmond", level)
    assert elsewhere.connect() == NOT_AUTHORIZED


def test_delivery_between_authorized_clients(
    deployment: Deployment, clients: Callable[..., Client]
) -> None:
    deployment.use_policy(EXAMPLES / "portal-example.yaml")
    listener = device(deployment, clients, "lock-1", "smart-lock")
    assert listener.connect() == SUCCESS
    assert listener.subscribe("/commands/contoso") == 1
    # An operator on the open listener may publish anything (no authorization there).
    operator = clients(deployment.open_port, "operator", 5)
    assert operator.connect() == SUCCESS
    operator.publish("/commands/contoso", b"unlock")
    assert listener.receive().payload == b"unlock"
    # A denied QoS 0 publish is dropped silently: nothing arrives, the client stays connected.
    sensor = device(deployment, clients, "temperature-sensor", "temperature-sensor", "seattle")
    assert sensor.connect() == SUCCESS
    assert listener.subscribe("/telemetry/#") == NOT_AUTHORIZED
    assert operator.subscribe("/telemetry/#") == 1
    sensor.publish("/telemetry/humidity-sensor", b"forged", qos=0)
    sensor.publish("/telemetry/temperature-sensor", b"21.5", qos=0)
    message = operator.receive()
    assert (message.topic, message.payload) == ("/telemetry/temperature-sensor", b"21.5")
    assert operator.nothing_received()
    assert sensor.disconnects.empty()


# --- seed 003 example 2: client ids starting with the building ----------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_client_id_prefix_example(
    deployment: Deployment, clients: Callable[..., Client], level: int
) -> None:
    deployment.use_policy(EXAMPLES / "client-id-prefix.json")
    # building=building22 comes from the LEAF's subject.
    sensor = device(deployment, clients, "building22-lobby-1", "lobby-sensor", level=level)
    assert sensor.connect() == SUCCESS
    denied = SUCCESS if level == 4 else NOT_AUTHORIZED
    assert sensor.publish("sensors/building22/building22-lobby-1/telemetry") == SUCCESS
    assert sensor.publish("sensors/building23/building22-lobby-1/telemetry") == denied
    assert sensor.publish("sensors/building22/other/telemetry") == denied
    wrong_prefix = device(deployment, clients, "lobby-1", "lobby-sensor", level=level)
    assert wrong_prefix.connect() == NOT_AUTHORIZED
    no_building = device(deployment, clients, "building22-x", "smart-lock", level=level)
    assert no_building.connect() == NOT_AUTHORIZED


# --- seed 003 example 3: an attribute alone (the SAT example's group) ---------------------


@pytest.mark.parametrize("level", LEVELS)
def test_group_attribute_example(
    deployment: Deployment, clients: Callable[..., Client], level: int
) -> None:
    deployment.use_policy(EXAMPLES / "sat-attributes.json")
    app = device(deployment, clients, "orders-app-1", "orders-app", level=level)
    assert app.connect() == SUCCESS
    assert app.subscribe("orders") == 1
    assert app.subscribe("odd-numbered-orders") == (0x80 if level == 4 else NOT_AUTHORIZED)
    assert app.publish("odd-numbered-orders", b"order 1") == SUCCESS
    assert app.publish("orders", b"order 1") == (SUCCESS if level == 4 else NOT_AUTHORIZED)
    other = device(deployment, clients, "other-app", "smart-fan", level=level)
    assert other.connect() == NOT_AUTHORIZED


# --- seed 003 example 4's broker resources (its state store part: test_broker_statestore) --


def test_state_store_example_broker_resources(
    deployment: Deployment, clients: Callable[..., Client]
) -> None:
    deployment.use_policy(EXAMPLES / "state-store.json")
    # building=17 from the LEAF, organization=contoso from the ROOT, one attributes entry.
    fan = device(deployment, clients, "17-fan", "smart-fan")
    assert fan.connect() == SUCCESS
    assert fan.publish("sensors/17/17-fan/telemetry/temperature") == SUCCESS
    assert fan.publish("sensors/17/17-fan/telemetry") == NOT_AUTHORIZED
    assert fan.publish("sensors/18/17-fan/telemetry/temperature") == NOT_AUTHORIZED
    assert fan.subscribe("commands/contoso") == 1
    assert fan.subscribe("commands/+") == NOT_AUTHORIZED
    assert device(deployment, clients, "18-fan", "smart-fan").connect() == NOT_AUTHORIZED
    # Same leaf name under the Fabrikam root: building=17 but no organization.
    assert device(deployment, clients, "17-fan-f", "smart-fan", "fabrikam").connect() == (
        NOT_AUTHORIZED
    )
    # The usernames principal matches the CN, but Connect needs {attributes.building}.
    named = device(deployment, clients, "17-x", "temperature-sensor")
    assert named.connect() == NOT_AUTHORIZED


def test_username_is_the_certificate_cn_behind_lb(
    deployment: Deployment, clients: Callable[..., Client]
) -> None:
    """Seed 003: with X.509 the username is the subject CN (smart-lock), not what the client
    sends; lb carries the CN in its PROXY v2 header."""
    deployment.use_policy(
        "- principals: {usernames: [smart-lock]}\n"
        "  brokerResources:\n"
        "    - {method: Connect}\n"
        "    - {method: Publish, topics: ['locks/{principal.username}']}\n"
    )
    certificate = deployment.pki.device("smart-lock", "redmond")
    lock = clients(
        deployment.lb_port,
        "front-door",
        5,
        username="temperature-sensor",
        password="ignored",
        certificate=certificate,
        server_ca=deployment.server_ca,
    )
    assert lock.connect() == SUCCESS
    assert lock.publish("locks/smart-lock") == SUCCESS
    assert lock.publish("locks/temperature-sensor") == NOT_AUTHORIZED
    [record] = [
        c for c in deployment.admin("GET", "/api/clients") if c["client_id"] == "front-door"
    ]
    assert record["username"] == "smart-lock"
    assert record["certificate_cn"] == "smart-lock"


# --- username/password listener -----------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_password_listener(
    deployment: Deployment, clients: Callable[..., Client], level: int
) -> None:
    deployment.use_policy(EXAMPLES / "portal-example.yaml")
    sensor = user(deployment, clients, "temperature-sensor", "temperature-sensor", level)
    assert sensor.connect() == SUCCESS
    assert sensor.publish("/telemetry/temperature-sensor") == SUCCESS
    # No attributes for password users: {principal.attributes.organization} grants nothing.
    assert sensor.publish("/telemetry/contoso") == (SUCCESS if level == 4 else NOT_AUTHORIZED)
    wrong = user(deployment, clients, "temperature-sensor", "temperature-sensor", level, "guess")
    assert wrong.connect() == 0x86  # 3.1.1 return code 4, shown by paho as 0x86
    stranger = user(deployment, clients, "someone", "someone", level)
    assert stranger.connect() == NOT_AUTHORIZED


def test_exact_bytes_of_3_1_1_refusals(deployment: Deployment) -> None:
    deployment.use_policy(EXAMPLES / "portal-example.yaml")
    password = PASSWORD.encode()
    refused = Raw(deployment.users_port, 4)
    answer = refused.exchange(Connect("MQTT", 4, True, 30, "x", "someone", password))
    assert answer == Connack(False, 5)
    refused.close()
    bad = Raw(deployment.users_port, 4)
    assert bad.exchange(Connect("MQTT", 4, True, 30, "x", "someone", b"no")) == Connack(False, 4)
    bad.close()
    raw = Raw(deployment.users_port, 4)
    connect = Connect("MQTT", 4, True, 30, "temperature-sensor", "temperature-sensor", password)
    assert raw.exchange(connect) == Connack(False, 0)
    subscribe = Subscribe(1, (Subscription("/commands/x", 1), Subscription("/commands/#", 0)))
    assert raw.exchange(subscribe) == Suback(1, (0x80, 0x80))
    publish = Publish("/telemetry/other", b"x", qos=1, packet_id=7)
    assert raw.exchange(publish) == Puback(7)
    raw.close()
    five = Raw(deployment.users_port, 5)
    answer = five.exchange(Connect("MQTT", 5, True, 30, "x", "someone", password))
    assert isinstance(answer, Connack) and answer.reason_code == NOT_AUTHORIZED
    five.close()


def test_open_listener_is_not_restricted(
    deployment: Deployment, clients: Callable[..., Client]
) -> None:
    deployment.use_policy(EXAMPLES / "sat-attributes.json")
    anyone = clients(deployment.open_port, "anyone", 5)
    assert anyone.connect() == SUCCESS
    assert anyone.publish("anything/at/all") == SUCCESS
    assert anyone.subscribe("#") == 1


# --- runtime updates ----------------------------------------------------------------------


def test_policy_update_disconnects_connected_clients(
    deployment: Deployment, clients: Callable[..., Client]
) -> None:
    deployment.use_policy(EXAMPLES / "sat-attributes.json")
    # Under the Redmond intermediate: no city=seattle, so the portal policy will not match.
    five = device(deployment, clients, "orders-5", "orders-app", "redmond", level=5)
    three = device(deployment, clients, "orders-3", "orders-app", "redmond", level=4)
    bystander = clients(deployment.open_port, "bystander", 5)
    for client in (five, three, bystander):
        assert client.connect() == SUCCESS
    result = deployment.use_policy(EXAMPLES / "portal-example.yaml")
    assert result["changed"] and result["disconnected"] == 2
    assert five.disconnects.get(timeout=10) == 0x98  # Administrative action
    three.disconnects.get(timeout=10)
    assert bystander.disconnects.empty()
    # Under the new policy the same device is no longer allowed in.
    again = device(deployment, clients, "orders-5b", "orders-app", "redmond", level=5)
    assert again.connect() == NOT_AUTHORIZED


def test_broken_policy_keeps_the_old_one(
    deployment: Deployment, clients: Callable[..., Client]
) -> None:
    deployment.use_policy(EXAMPLES / "sat-attributes.json")
    app = device(deployment, clients, "orders-keep", "orders-app")
    assert app.connect() == SUCCESS
    deployment.policy.write_text(
        '[\n  {"principals": {"usernames": ["u"]},\n   "brokerResources": [{"method": "Pub"}]}\n]\n'
    )
    result = deployment.admin("POST", "/api/authz/reload")
    assert not result["changed"]
    assert result["error"].startswith(f"{deployment.policy}:3: method 'Pub'")
    assert f"{deployment.policy}:3: method 'Pub'" in deployment.log()
    assert app.disconnects.empty()
    assert app.publish("odd-numbered-orders") == SUCCESS


def test_file_change_is_picked_up_by_polling(
    tmp_path: Path, clients: Callable[..., Client]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text((EXAMPLES / "portal-example.yaml").read_text())
    passwords = write_passwords(tmp_path / "passwd")
    ports = {name: free_port() for name in ("devices", "users", "open", "admin")}
    config = broker_config(policy, passwords, ports, reload_interval="200ms")
    with running_broker(config, tmp_path, "polling"):
        sensor = clients(ports["users"], "temperature-sensor", 5, "temperature-sensor", PASSWORD)
        assert sensor.connect() == SUCCESS
        assert sensor.publish("/telemetry/temperature-sensor") == SUCCESS
        time.sleep(0.05)
        policy.write_text(
            "- principals: {usernames: [temperature-sensor]}\n"
            "  brokerResources:\n"
            "    - {method: Connect}\n"
            "    - {method: Publish, topics: ['/telemetry/v2/{principal.username}']}\n"
        )
        assert sensor.disconnects.get(timeout=10) == 0x98
        again = clients(ports["users"], "temperature-sensor", 5, "temperature-sensor", PASSWORD)
        assert again.connect() == SUCCESS
        assert again.publish("/telemetry/temperature-sensor") == NOT_AUTHORIZED
        assert again.publish("/telemetry/v2/temperature-sensor") == SUCCESS


# --- configuration refusals ---------------------------------------------------------------


def run_broker_check(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "broker.toml"
    path.write_text(config)
    return subprocess.run(
        [str(BROKER), "-c", str(path)], check=False, capture_output=True, text=True, timeout=30
    )


def test_authorization_without_authentication_is_refused(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text((EXAMPLES / "sat-attributes.json").read_text())
    result = run_broker_check(
        tmp_path,
        f"""
[listeners.tcp.plain]
bind = "127.0.0.1:{free_port()}"
proxy_protocol = true
authorization = true

[authorization]
policy_file = "{policy}"
""",
    )
    assert result.returncode == 1
    assert "'listeners.tcp.plain.authorization'" in result.stderr
    assert "listener tcp:plain links authorization but does not authenticate" in result.stderr


def test_unloadable_policy_at_start_is_refused(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("- principals: {clientIds: [a]}\n  brokerResources:\n    - method: Conect\n")
    result = run_broker_check(
        tmp_path,
        f"""
[listeners.tcp.users]
bind = "127.0.0.1:{free_port()}"
password_file = "{write_passwords(tmp_path / "passwd")}"
authorization = true

[authorization]
policy_file = "{policy}"
""",
    )
    assert result.returncode == 1
    assert f"{policy}:3: method 'Conect'" in result.stderr


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_mosquitto_passwd_file_on_a_real_broker(
    tmp_path: Path, clients: Callable[..., Client]
) -> None:
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "alice", "pw"], check=True)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "- principals: {usernames: [alice]}\n  brokerResources: [{method: Connect}]\n"
    )
    port, admin = free_port(), free_port()
    config = f"""
[listeners.tcp.users]
bind = "127.0.0.1:{port}"
password_file = "{passwords}"
authorization = true

[admin]
bind = "127.0.0.1:{admin}"

[authorization]
policy_file = "{policy}"
"""
    with running_broker(config, tmp_path, "mosquitto-passwd"):
        assert clients(port, "a", 4, "alice", "pw").connect() == SUCCESS
        assert clients(port, "b", 4, "alice", "nope").connect() == 0x86


def test_tls_client_context_is_real(deployment: Deployment) -> None:
    """A device without a certificate never reaches the broker (lb: verify required)."""
    context = ssl.create_default_context(cafile=str(deployment.server_ca))
    context.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", deployment.lb_port), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(encode(Connect("MQTT", 5, True, 30, "x"), 5))
        if not tls.recv(1):
            raise ConnectionError("closed")


def test_broker_own_mutual_tls_listener(
    pki: TestPKI, tmp_path: Path, clients: Callable[..., Client]
) -> None:
    """The broker terminates TLS itself (seed 000's mutual TLS): the username is the CN and
    attributes come from the verified chain it built, as behind lb."""
    contoso = ContosoPKI(tmp_path / "contoso")
    bundle = tmp_path / "client-cas.pem"
    bundle.write_text(contoso.client_ca.read_text() + contoso.roots.read_text())
    policy = tmp_path / "policy.yaml"
    policy.write_text((EXAMPLES / "portal-example.yaml").read_text())
    port, admin = free_port(), free_port()
    config = f"""
[listeners.ssl.devices]
bind = "127.0.0.1:{port}"
authorization = true
[listeners.ssl.devices.ssl_options]
certfile = "{pki.server_chain}"
keyfile = "{pki.server_key}"
cacertfile = "{bundle}"
verify = "verify_peer"
fail_if_no_peer_cert = true

[admin]
bind = "127.0.0.1:{admin}"

[authorization]
policy_file = "{policy}"
""" + X509_ATTRIBUTES.format()
    with running_broker(config, tmp_path, "mtls"):

        def tls_device(client_id: str, cn: str, intermediate: str) -> Client:
            certificate = contoso.device(cn, intermediate)
            return clients(port, client_id, 5, certificate=certificate, server_ca=pki.root)

        # Intermediate (city) + root (organization) attributes from the broker's own chain.
        lock = tls_device("some-other-username", "smart-lock", "seattle")
        assert lock.connect() == SUCCESS
        assert lock.publish("/telemetry/contoso") == SUCCESS
        assert lock.publish("/telemetry/temperature-sensor") == NOT_AUTHORIZED
        assert tls_device("lock-2", "smart-lock", "redmond").connect() == NOT_AUTHORIZED
        sensor = tls_device("temperature-sensor", "temperature-sensor", "redmond")
        assert sensor.connect() == SUCCESS
        assert sensor.publish("/telemetry/temperature-sensor") == SUCCESS
