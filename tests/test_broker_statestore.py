"""The state store (seed 003 stateStoreResources) over MQTT 5, through lb with real device
certificates, with the seed's fourth example policy as written (configs/authz/state-store.json).

Requests are RESP3 arrays published to the state store's request topic with a Response Topic
and Correlation Data; answers come back on the response topic, notifications on the client's
notify topic. Read (GET, KEYNOTIFY) and Write (SET, DEL, VDEL) are allowed or refused per key.
"""

from __future__ import annotations

import base64
import queue
import secrets
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest

from broker.statestore import STATE_STORE_REQUEST_TOPIC, encode_array, notification_topic
from tests.pki import TestPKI
from tests.test_broker_authz_clients import (
    EXAMPLES,
    SUCCESS,
    Client,
    Deployment,
    client_factory,
    deploy,
    device,
    user,
)

pytestmark = pytest.mark.timeout(90)

BINARY_KEY = base64.b64decode("xxxxxxxxxxxxxxxxxxxx")
NOT_AUTHORIZED = b"-ERR not authorized\r\n"
OK = b"+OK\r\n"
# The seed's example plus one rule of this test: an operator (password user) who may write
# every key, so that the example's read-only keys can hold values.
OPERATOR_RULE = """
  {
    "principals": {"usernames": ["operator"]},
    "brokerResources": [{"method": "Connect"}],
    "stateStoreResources": [{"method": "ReadWrite", "keyType": "Pattern", "keys": ["*"]}]
  }
]
"""


@pytest.fixture(scope="module")
def deployment(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deploy(pki, tmp_path_factory.mktemp("statestore")) as running:
        yield running


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    with client_factory() as make:
        yield make


class StoreClient:
    """A state store client over one paho 5.0 connection (Azure's protocol)."""

    def __init__(self, client: Client, client_id: str) -> None:
        self.client = client
        self.client_id = client_id
        self.response_topic = (
            f"clients/{client_id}/services/statestore/_any_/command/invoke/response"
        )
        self.notify_filter = notification_topic(client_id, b"").rsplit("/", 1)[0] + "/#"
        self.responses: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.notifications: queue.Queue[mqtt.MQTTMessage] = queue.Queue()

        def route(_client: object, _userdata: object, message: mqtt.MQTTMessage) -> None:
            if message.topic == self.response_topic:
                self.responses.put(message)
            else:
                self.notifications.put(message)

        client.client.on_message = route
        assert client.connect() == SUCCESS
        # Allowed without any grant in the policy: the client's own state store topics.
        assert client.subscribe(self.response_topic) == 1
        assert client.subscribe(self.notify_filter) == 1

    def request(self, *items: bytes) -> bytes:
        correlation = secrets.token_bytes(8)
        code = self.client.publish(
            STATE_STORE_REQUEST_TOPIC,
            encode_array(list(items)),
            ResponseTopic=self.response_topic,
            CorrelationData=correlation,
        )
        assert code == SUCCESS
        message = self.responses.get(timeout=10)
        assert message.properties.CorrelationData == correlation  # type: ignore[union-attr]
        return bytes(message.payload)

    def notification(self) -> tuple[str, bytes]:
        message = self.notifications.get(timeout=10)
        return message.topic, bytes(message.payload)

    def no_notification(self, wait: float = 0.5) -> bool:
        try:
            self.notifications.get(timeout=wait)
        except queue.Empty:
            return True
        return False


def fan(deployment: Deployment, clients: Callable[..., Client], client_id: str) -> StoreClient:
    """building=17 (leaf) and organization=contoso (root): the example's attributes."""
    return StoreClient(device(deployment, clients, client_id, "smart-fan"), client_id)


def test_read_keys_of_the_seed_example(
    deployment: Deployment, clients: Callable[..., Client]
) -> None:
    deployment.use_policy(EXAMPLES / "state-store.json")
    store = fan(deployment, clients, "17-fan")
    for key in (b"myreadkey", b"myotherkeyA", b"mynumerickeysuffix7", b"clients/17-fan/mode"):
        assert store.request(b"GET", key) == b"$-1\r\n", key
        assert store.request(b"KEYNOTIFY", key) == OK, key
        for write in ((b"SET", key, b"v"), (b"DEL", key), (b"VDEL", key, b"v")):
            assert store.request(*write) == NOT_AUTHORIZED, write
    for key in (b"myotherkey", b"mynumerickeysuffixX", b"clients/18-fan/mode", b"secret"):
        assert store.request(b"GET", key) == NOT_AUTHORIZED, key
        assert store.request(b"KEYNOTIFY", key) == NOT_AUTHORIZED, key


def test_binary_key_read_write(deployment: Deployment, clients: Callable[..., Client]) -> None:
    deployment.use_policy(EXAMPLES / "state-store.json")
    store = fan(deployment, clients, "17-fan")
    assert store.request(b"SET", BINARY_KEY, b"on") == OK
    assert store.request(b"GET", BINARY_KEY) == b"$2\r\non\r\n"
    assert store.request(b"SET", BINARY_KEY, b"off", b"NX") == b":-1\r\n"
    assert store.request(b"SET", BINARY_KEY, b"on", b"NEX") == OK
    assert store.request(b"VDEL", BINARY_KEY, b"off") == b":-1\r\n"
    assert store.request(b"VDEL", BINARY_KEY, b"on") == b":1\r\n"
    assert store.request(b"VDEL", BINARY_KEY, b"on") == b":0\r\n"
    assert store.request(b"SET", BINARY_KEY, b"again") == OK
    assert store.request(b"DEL", BINARY_KEY) == b":1\r\n"
    assert store.request(b"DEL", BINARY_KEY) == b":0\r\n"
    # The base64 text itself is not the key.
    assert store.request(b"SET", b"xxxxxxxxxxxxxxxxxxxx", b"v") == NOT_AUTHORIZED
    assert store.request(b"NOSUCH", BINARY_KEY) == b"-ERR unknown command\r\n"


def test_keynotify_on_the_binary_key(
    deployment: Deployment, clients: Callable[..., Client]
) -> None:
    deployment.use_policy(EXAMPLES / "state-store.json")
    watcher = fan(deployment, clients, "17-fan")
    writer = StoreClient(device(deployment, clients, "17-fan-2", "smart-fan-2"), "17-fan-2")
    assert watcher.request(b"KEYNOTIFY", BINARY_KEY) == OK
    assert writer.request(b"SET", BINARY_KEY, b"42") == OK
    topic, payload = watcher.notification()
    assert topic == notification_topic("17-fan", BINARY_KEY)
    assert payload == b"*4\r\n$6\r\nNOTIFY\r\n$3\r\nSET\r\n$5\r\nVALUE\r\n$2\r\n42\r\n"
    assert writer.request(b"DEL", BINARY_KEY) == b":1\r\n"
    assert watcher.notification()[1] == b"*2\r\n$6\r\nNOTIFY\r\n$6\r\nDELETE\r\n"
    assert writer.no_notification()
    assert watcher.request(b"KEYNOTIFY", BINARY_KEY, b"STOP") == OK
    assert writer.request(b"SET", BINARY_KEY, b"43") == OK
    assert watcher.no_notification()


def test_read_only_keys_hold_values_set_by_a_writer(
    deployment: Deployment, clients: Callable[..., Client]
) -> None:
    seed = (EXAMPLES / "state-store.json").read_text().rstrip().removesuffix("]")
    deployment.use_policy(seed + "," + OPERATOR_RULE)
    store = fan(deployment, clients, "17-fan")
    operator = StoreClient(user(deployment, clients, "operator", "operator"), "operator")
    assert store.request(b"KEYNOTIFY", b"clients/17-fan/mode") == OK
    assert operator.request(b"SET", b"clients/17-fan/mode", b"eco") == OK
    assert store.notification()[1].endswith(b"$3\r\neco\r\n")
    assert store.request(b"GET", b"clients/17-fan/mode") == b"$3\r\neco\r\n"
    assert store.request(b"SET", b"clients/17-fan/mode", b"turbo") == NOT_AUTHORIZED
    assert store.request(b"GET", b"clients/17-fan/mode") == b"$3\r\neco\r\n"
    assert operator.request(b"SET", b"secret", b"s") == OK
    assert store.request(b"GET", b"secret") == NOT_AUTHORIZED


def test_a_response_topic_of_someone_else_reveals_nothing(
    deployment: Deployment, clients: Callable[..., Client]
) -> None:
    """Answers go to the requester only, even when it names another client's topic."""
    deployment.use_policy(EXAMPLES / "state-store.json")
    victim = fan(deployment, clients, "17-fan")
    attacker = device(deployment, clients, "17-fan-2", "smart-fan-2")
    assert attacker.connect() == SUCCESS
    assert attacker.subscribe("clients/17-fan/#") == 0x87
    assert (
        attacker.publish(
            STATE_STORE_REQUEST_TOPIC,
            encode_array([b"GET", b"myreadkey"]),
            ResponseTopic=victim.response_topic,
            CorrelationData=b"x",
        )
        == SUCCESS
    )
    assert victim.responses.empty()
    assert attacker.nothing_received()


def test_requests_are_never_routed_and_need_a_response_topic(
    deployment: Deployment, clients: Callable[..., Client]
) -> None:
    deployment.use_policy(EXAMPLES / "state-store.json")
    spy = clients(deployment.open_port, "spy", 5)
    assert spy.connect() == SUCCESS
    assert spy.subscribe("statestore/#") == 1
    # 3.1.1 has no Response Topic: the request is dropped (and not executed).
    old = clients(deployment.open_port, "old", 4)
    assert old.connect() == SUCCESS
    assert old.publish(STATE_STORE_REQUEST_TOPIC, encode_array([b"SET", b"k", b"v"])) == SUCCESS
    assert spy.nothing_received()
    # The open listener has no authorization: every key is allowed there.
    store = StoreClient(clients(deployment.open_port, "open-store", 5), "open-store")
    assert store.request(b"GET", b"k") == b"$-1\r\n"
    assert store.request(b"SET", b"k", b"v") == OK
    assert spy.nothing_received()
