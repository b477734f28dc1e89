"""Authorization policies of seed 003 as pure logic: loading (with file:line errors), the
principal/resource matcher, token substitution, the topic containment rule, X.509 subjects
and attributes, password files, and the state store's RESP3 codec.

The seed's example policies are the files in configs/authz/, loaded as written.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.authentication import PasswordFile, PasswordFileError, hash_password
from broker.authz import (
    PolicyAuthorization,
    PolicyError,
    PrincipalView,
    X509Attributes,
    covers,
    load_policy,
    parse_policy,
    resolve,
)
from broker.hooks import PeerIdentity, Principal
from broker.statestore import (
    RESPError,
    decode_request,
    encode_array,
    notification_topic,
)
from broker.subjects import decode_name, parse_distinguished_name

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "configs" / "authz"
LISTENER = "tcp:default"


def identity(
    cn: str | None = None,
    chain: tuple[bytes, ...] = (),
    listener: str = LISTENER,
) -> PeerIdentity:
    return PeerIdentity(
        address=("192.0.2.1", 40000),
        socket_address=("127.0.0.1", 40000),
        listener=listener,
        via_proxy=True,
        certificate_cn=cn,
        certificate_verified=cn is not None,
        chain_subjects=chain,
    )


def principal(
    client_id: str,
    username: str | None = None,
    attributes: Mapping[str, str] | None = None,
    cn: str | None = None,
    listener: str = LISTENER,
) -> Principal:
    return Principal(client_id, username, dict(attributes or {}), identity(cn, (), listener))


def authorization(tmp_path: Path, source: Path | str, **kwargs: object) -> PolicyAuthorization:
    path = tmp_path / "policy.yaml"
    path.write_text(source.read_text() if isinstance(source, Path) else source)
    return PolicyAuthorization(
        path,
        {LISTENER: frozenset({"x509", "password"})},
        **kwargs,  # type: ignore[arg-type]
    )


# --- the seed's examples, as written ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(path.name for path in EXAMPLES.iterdir()))
def test_every_seed_example_loads(name: str) -> None:
    policy = load_policy(EXAMPLES / name)
    assert len(policy.rules) == 1
    assert policy.rules[0].broker_resources


def test_portal_example_client_ids_or_attributes(tmp_path: Path) -> None:
    hook = authorization(tmp_path, EXAMPLES / "portal-example.yaml")
    sensor = principal("temperature-sensor", attributes={"organization": "contoso"})
    assert hook.authorize_connect(principal("temperature-sensor", username="u"))
    assert hook.authorize_publish(sensor, "/telemetry/temperature-sensor", 1, False)
    assert hook.authorize_publish(sensor, "/telemetry/contoso", 1, False)
    assert not hook.authorize_publish(sensor, "/telemetry/humidity-sensor", 1, False)
    assert hook.authorize_subscribe(sensor, "/commands/contoso", 1)
    # Attributes must all match (city AND organization) for someone not named in clientIds.
    other = principal(
        "some-other",
        username="some-other-username",
        attributes={"organization": "contoso", "city": "seattle"},
    )
    assert hook.authorize_connect(other)
    assert hook.authorize_publish(other, "/telemetry/contoso", 1, False)
    assert hook.authorize_subscribe(other, "/commands/contoso", 0)
    half = principal("half", username="u", attributes={"organization": "contoso"})
    assert not hook.authorize_connect(half)
    assert not hook.authorize_publish(half, "/telemetry/contoso", 1, False)


def test_client_id_prefix_example(tmp_path: Path) -> None:
    hook = authorization(tmp_path, EXAMPLES / "client-id-prefix.json")
    building22 = {"building": "building22"}
    assert hook.authorize_connect(principal("building22-sensor-1", "u", building22))
    assert hook.authorize_connect(principal("building22", "u", building22))
    assert not hook.authorize_connect(principal("sensor-1", "u", building22))
    # The client id must start with the client's own building, not any listed one.
    assert not hook.authorize_connect(principal("building23-x", "u", building22))
    assert not hook.authorize_connect(principal("building24-x", "u", {"building": "building24"}))
    device = principal("building22-s1", "u", building22)
    assert hook.authorize_publish(device, "sensors/building22/building22-s1/telemetry", 1, False)
    assert not hook.authorize_publish(
        device, "sensors/building23/building22-s1/telemetry", 1, False
    )
    assert not hook.authorize_subscribe(device, "sensors/#", 0)


def test_sat_attributes_example(tmp_path: Path) -> None:
    hook = authorization(tmp_path, EXAMPLES / "sat-attributes.json")
    member = principal("any-client", "u", {"group": "authz-sat"})
    assert hook.authorize_connect(member)
    assert hook.authorize_publish(member, "odd-numbered-orders", 1, False)
    assert not hook.authorize_publish(member, "orders", 1, False)
    assert hook.authorize_subscribe(member, "orders", 1)
    assert not hook.authorize_subscribe(member, "odd-numbered-orders", 1)
    assert not hook.authorize_connect(principal("any-client", "u", {"group": "other"}))


def test_state_store_example_keys(tmp_path: Path) -> None:
    hook = authorization(tmp_path, EXAMPLES / "state-store.json")
    device = principal("17-fan", "u", {"building": "17", "organization": "contoso"})
    assert hook.authorize_connect(device)
    assert not hook.authorize_connect(
        principal("18-fan", "u", {"building": "17", "organization": "contoso"})
    )
    # The usernames principal matches, but {principal.attributes.building} has no value.
    assert not hook.authorize_connect(principal("17-x", cn="temperature-sensor"))
    assert hook.authorize_publish(device, "sensors/17/17-fan/telemetry/temperature", 1, False)
    assert hook.authorize_publish(device, "sensors/17/17-fan/telemetry/a/b", 1, False)
    assert not hook.authorize_publish(device, "sensors/17/17-fan/telemetry", 1, False)
    assert hook.authorize_subscribe(device, "commands/contoso", 1)
    read = [
        b"myreadkey",
        b"myotherkeyA",
        b"myotherkey7",
        b"mynumerickeysuffix5",
        b"clients/17-fan/settings",
        b"clients/17-fan/a/b",
    ]
    for key in read:
        assert hook.authorize_state_store(device, "Read", key), key
        assert not hook.authorize_state_store(device, "Write", key), key
    for key in [
        b"myotherkey",
        b"myotherkeyAB",
        b"mynumerickeysuffixA",
        b"clients/18-fan/x",
        b"myreadkey2",
    ]:
        assert not hook.authorize_state_store(device, "Read", key), key
    binary = base64.b64decode("xxxxxxxxxxxxxxxxxxxx")
    assert hook.authorize_state_store(device, "Read", binary)
    assert hook.authorize_state_store(device, "Write", binary)
    assert not hook.authorize_state_store(device, "Write", b"xxxxxxxxxxxxxxxxxxxx")


def test_unlinked_listener_is_not_restricted(tmp_path: Path) -> None:
    hook = authorization(tmp_path, EXAMPLES / "sat-attributes.json")
    outsider = principal("x", listener="tcp:other")
    assert hook.authorize_connect(outsider)
    assert hook.authorize_publish(outsider, "anything", 0, False)
    assert hook.authorize_state_store(outsider, "Write", b"k")


def test_linked_listener_requires_authentication(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text((EXAMPLES / "sat-attributes.json").read_text())
    hook = PolicyAuthorization(path, {LISTENER: frozenset({"x509"})})
    no_certificate = principal("c", username="forged", attributes={"group": "authz-sat"})
    assert not hook.authorize_connect(no_certificate)
    with_certificate = principal("c", attributes={"group": "authz-sat"}, cn="device-001")
    assert hook.authorize_connect(with_certificate)


def test_bare_list_and_kubernetes_resource_are_the_same(tmp_path: Path) -> None:
    resource = load_policy(EXAMPLES / "portal-example.yaml")
    bare = parse_policy(
        """
- principals: {clientIds: [temperature-sensor, humidity-sensor],
               attributes: [{city: seattle, organization: contoso}]}
  brokerResources:
    - {method: Connect}
    - {method: Publish, topics: ["/telemetry/{principal.clientId}",
                                 "/telemetry/{principal.attributes.organization}"]}
    - {method: Subscribe, topics: ["/commands/{principal.attributes.organization}"]}
"""
    )
    strip = [
        (rule.principals, [(r.method, r.client_ids, r.topics) for r in rule.broker_resources])
        for rule in resource.rules
    ]
    assert strip == [
        (rule.principals, [(r.method, r.client_ids, r.topics) for r in rule.broker_resources])
        for rule in bare.rules
    ]


# --- errors name file and line ------------------------------------------------------------

BAD_POLICIES = [
    ("bad.json", '[\n  {"principals": {}\n  "brokerResources": []}\n]', 3, "not valid JSON"),
    ("bad.yaml", "- principals:\n    clientIds: [a\n  brokerResources: []\n", 3, "not valid YAML"),
    (
        "bad.yaml",
        "- principals: {clientIds: [a]}\n  brokerResources:\n    - method: Conect\n",
        3,
        "method 'Conect': expected Connect, Publish or Subscribe",
    ),
    (
        "bad.yaml",
        "- principals: {clientIds: [a]}\n  brokerResources:\n"
        "    - method: Publish\n      topics: ['a/{principal.clientID}']\n",
        4,
        "unknown token",
    ),
    (
        "bad.yaml",
        "- principals: {clientIds: [a]}\n  brokerResources:\n"
        "    - method: Subscribe\n      topics: ['a/#/b']\n",
        4,
        "'#' must be a whole last level",
    ),
    (
        "bad.yaml",
        "- principals: {clientIds: [a]}\n  brokerResources:\n    - method: Publish\n",
        3,
        "'topics' is required",
    ),
    (
        "bad.yaml",
        "- principals: {clientIds: [a]}\n  brokerResources: []\n  stateStoreResources:\n"
        "    - method: Read\n      keyType: Binary\n      keys: ['not base64!']\n",
        6,
        "keyType Binary needs base64",
    ),
    (
        "bad.yaml",
        "- principals: {clientIds: [a]}\n  brokerResources: []\n  stateStoreResources:\n"
        "    - method: Delete\n      keys: [k]\n",
        4,
        "expected Read, Write or ReadWrite",
    ),
    ("bad.yaml", "- principal: {}\n", 1, "unknown field 'principal'"),
    ("bad.yaml", "kind: BrokerListener\nspec: {}\n", 1, "expected BrokerAuthorization"),
]


@pytest.mark.parametrize(("name", "text", "line", "problem"), BAD_POLICIES)
def test_errors_name_file_line_and_problem(
    tmp_path: Path, name: str, text: str, line: int, problem: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.line == line, caught.value
    assert problem in caught.value.message
    assert str(caught.value).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize(
    ("name", "text"),
    [("deep.json", "[" * 5000), ("deep.yaml", "[" * 5000), ("deep.yaml", "- " * 5000 + "a")],
)
def test_nesting_past_the_recursion_limit_is_a_policy_error(
    tmp_path: Path, name: str, text: str
) -> None:
    # json and PyYAML's composer recurse per level: without a limit of our own, a deep file
    # escaped the loader (and a reload) as RecursionError.
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PolicyError, match="nested too deeply"):
        load_policy(path)


def test_failed_reload_keeps_the_old_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    updates: list[int] = []
    path = tmp_path / "policy.json"
    path.write_text((EXAMPLES / "sat-attributes.json").read_text())
    hook = PolicyAuthorization(
        path,
        {LISTENER: frozenset({"password"})},
        on_update=lambda policy: updates.append(len(policy.rules)),
    )
    member = principal("c", "u", {"group": "authz-sat"})
    assert hook.authorize_publish(member, "odd-numbered-orders", 1, False)
    path.write_text(
        '[{"principals": {"usernames": ["u"]}, "brokerResources": [{"method": "Pub"}]}]'
    )
    caplog.set_level(logging.ERROR, logger="broker.authz")
    result = hook.reload()
    assert not result.changed
    assert result.error is not None and f"{path}:1:" in result.error
    assert any(f"{path}:1: method 'Pub'" in record.getMessage() for record in caplog.records)
    assert hook.authorize_publish(member, "odd-numbered-orders", 1, False)
    assert not updates
    # The same text again is not an update; a different valid text is, and is swapped whole.
    path.write_text((EXAMPLES / "sat-attributes.json").read_text())
    assert not hook.reload().changed
    path.write_text((EXAMPLES / "client-id-prefix.json").read_text())
    assert hook.file_changed()
    assert hook.reload().changed
    assert updates == [1]
    assert not hook.authorize_publish(member, "odd-numbered-orders", 1, False)


# --- tokens are literal -------------------------------------------------------------------


def test_substituted_values_never_widen_a_grant(tmp_path: Path) -> None:
    hook = authorization(
        tmp_path,
        """
- principals: {usernames: [u]}
  brokerResources:
    - {method: Connect, clientIds: ["dev-*"]}
    - {method: Publish, topics: ["t/{principal.clientId}", "c/{principal.clientId}/x"]}
    - {method: Subscribe, topics: ["s/{principal.clientId}/#"]}
""",
    )
    for client_id in ("a/#", "+", "#", "*", "a/b"):
        sneaky = principal(client_id, "u")
        assert not hook.authorize_publish(sneaky, "t/zzz", 1, False)
        assert not hook.authorize_subscribe(sneaky, "s/other/x", 1)
    plain = principal("dev-1", "u")
    assert hook.authorize_connect(plain)
    assert hook.authorize_publish(plain, "t/dev-1", 1, False)
    assert not hook.authorize_publish(plain, "t/dev-1/x", 1, False)
    assert hook.authorize_subscribe(plain, "s/dev-1/#", 1)
    assert hook.authorize_subscribe(plain, "$share/group/s/dev-1/+/x", 1)
    assert not hook.authorize_connect(principal("xdev-1", "u"))


def test_star_in_a_client_id_template_only_from_the_policy(tmp_path: Path) -> None:
    hook = authorization(
        tmp_path,
        """
- principals: {attributes: [{building: "b.*"}, {building: "b1"}]}
  brokerResources:
    - {method: Connect, clientIds: ["{principal.attributes.building}-*"]}
""",
    )
    # "b.*" is substituted literally: it does not become a wildcard or a regex.
    assert hook.authorize_connect(principal("b.*-1", "u", {"building": "b.*"}))
    assert not hook.authorize_connect(principal("bX-1", "u", {"building": "b.*"}))
    assert hook.authorize_connect(principal("b1-anything-at-all", "u", {"building": "b1"}))


# --- the containment rule -----------------------------------------------------------------

COVERS = [
    ("a/b", "a/b", True),
    ("a/b", "a/+", False),
    ("a/+", "a/b", True),
    ("a/+", "a/+", True),
    ("a/+", "a/#", False),
    ("a/+", "a/b/c", False),
    ("a/#", "a", True),
    ("a/#", "a/#", True),
    ("a/#", "a/+/c", True),
    ("a/#", "b/#", False),
    ("#", "#", True),
    ("#", "$SYS/x", False),
    ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True),
    ("a/*", "a/b", True),
    ("a/*", "a/b/c", True),
    ("a/*", "a/+/#", True),
    ("a/*", "a/#", False),
    ("a/*", "a", False),
    ("a/*/c", "a/b/c", True),
    ("a/*/c", "a/b/b/c", False),
    ("a/+/#", "a/b", True),
    ("a/+/#", "a/#", False),
    ("a/b*", "a/b*", True),
    ("a/b*", "a/bc", False),
]


@pytest.mark.parametrize(("rule", "requested", "expected"), COVERS)
def test_covers_table(rule: str, requested: str, expected: bool) -> None:
    assert covers(rule.split("/"), requested.split("/")) is expected


def _matches(levels: tuple[str, ...], topic: tuple[str, ...]) -> bool:
    """Reference matcher on topic names (MQTT 4.7 plus the seed's ``*`` level)."""
    if levels[0] in ("+", "#", "*") and topic[0].startswith("$"):
        return False
    for index, level in enumerate(levels):
        last = index == len(levels) - 1
        if level == "#" and last:
            return True
        if level == "*" and last:
            return len(topic) > index
        if index >= len(topic):
            return False
        if level not in ("+", "*") and level != topic[index]:
            return False
    return len(topic) == len(levels)


LEVELS = st.sampled_from(["a", "b", "$s", "+", "#", "*"])


@st.composite
def filters(draw: st.DrawFn) -> tuple[str, ...]:
    levels = draw(st.lists(LEVELS, min_size=1, max_size=4))
    # '#' only last; '$' only first (it is a literal there, like "$SYS").
    cleaned = [level for level in levels[:-1] if level != "#"] + [levels[-1]]
    cleaned = [cleaned[0], *[("a" if level == "$s" else level) for level in cleaned[1:]]]
    return tuple(cleaned)


@settings(max_examples=400, deadline=None)
@given(filters(), filters())
def test_covers_agrees_with_brute_force(rule: tuple[str, ...], requested: tuple[str, ...]) -> None:
    """covers(R, S) exactly when every topic S matches is matched by R.

    Topics over the levels both filters use plus a fresh one, up to one level deeper than
    either filter, are enough: deeper topics behave as that depth does for both.
    """
    requested_topic_filter = tuple("+" if level == "*" else level for level in requested)
    literals = sorted({level for level in rule + requested if level not in ("+", "#", "*")})
    alphabet = [*literals, "z", "$z"]
    depth = max(len(rule), len(requested_topic_filter)) + 1
    expected = True
    for length in range(1, depth + 1):
        for topic in itertools.product(alphabet, repeat=length):
            if any(level.startswith("$") for level in topic[1:]):
                continue
            if _matches(requested_topic_filter, topic) and not _matches(rule, topic):
                expected = False
                break
        if not expected:
            break
    assert covers(rule, requested_topic_filter) is expected


# --- X.509 subjects and attributes --------------------------------------------------------


def name(*pairs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


ROOT_NAME = name(
    (NameOID.COUNTRY_NAME, "US"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
    (NameOID.COMMON_NAME, "Contoso Root CA Cert"),
)
INTERMEDIATE_NAME = name((NameOID.COMMON_NAME, "Contoso Intermediate CA"))
LEAF_NAME = name((NameOID.ORGANIZATION_NAME, "Contoso"), (NameOID.COMMON_NAME, "smart-fan"))


@pytest.mark.parametrize(
    "written",
    [
        "CN = Contoso Root CA Cert, OU = Engineering, C = US",
        "C=US,OU=Engineering,CN=Contoso Root CA Cert",
        "/C=US/OU=Engineering/CN=Contoso Root CA Cert",
        "cn=contoso  root ca cert, ou=ENGINEERING, c=us",
        "2.5.4.3=Contoso Root CA Cert, OU=Engineering, C=US",
    ],
)
def test_subject_strings_compare_normalized(written: str) -> None:
    assert parse_distinguished_name(written) == decode_name(ROOT_NAME.public_bytes())


def test_subject_escapes_and_errors() -> None:
    escaped = name((NameOID.COMMON_NAME, "a,b+c"), (NameOID.ORGANIZATION_NAME, "Ünï"))
    assert parse_distinguished_name(r"CN=a\,b\+c, O=\C3\9Cn\C3\AF") == decode_name(
        escaped.public_bytes()
    )
    assert parse_distinguished_name(escaped.rfc4514_string()) == decode_name(escaped.public_bytes())
    for bad in ("", "CN", "XX=1", "CN=#0403"):
        with pytest.raises(ValueError):
            parse_distinguished_name(bad)
    for bad_der in (b"", b"\x30\x05\x31", b"\x31\x00", b"\x30\x02\x30\x00"):
        with pytest.raises(ValueError):
            decode_name(bad_der)


CHAIN_ATTRIBUTES = [
    X509Attributes(
        "root",
        "CN = Contoso Root CA Cert, OU = Engineering, C = US",
        (("organization", "contoso"), ("tier", "root")),
    ),
    X509Attributes(
        "intermediate",
        "CN = Contoso Intermediate CA",
        (("city", "seattle"), ("tier", "intermediate")),
    ),
    X509Attributes("smart-fan", "CN = smart-fan, O = Contoso", (("building", "17"),)),
]


def test_attributes_merge_along_the_chain_leaf_winning(tmp_path: Path) -> None:
    hook = authorization(tmp_path, EXAMPLES / "state-store.json", x509_attributes=CHAIN_ATTRIBUTES)
    chain = (LEAF_NAME.public_bytes(), INTERMEDIATE_NAME.public_bytes(), ROOT_NAME.public_bytes())
    assert hook.principal_attributes(identity("smart-fan", chain)) == {
        "organization": "contoso",
        "city": "seattle",
        "tier": "intermediate",
        "building": "17",
    }
    other_leaf = name((NameOID.COMMON_NAME, "smart-lock")).public_bytes()
    assert hook.principal_attributes(identity("smart-lock", (other_leaf, *chain[1:]))) == {
        "organization": "contoso",
        "city": "seattle",
        "tier": "intermediate",
    }
    # Subjects are trusted only from a verified certificate.
    unverified = PeerIdentity(("192.0.2.1", 1), ("127.0.0.1", 1), LISTENER, chain_subjects=chain)
    assert hook.principal_attributes(unverified) == {}


def test_username_is_the_certificate_cn(tmp_path: Path) -> None:
    hook = authorization(tmp_path, EXAMPLES / "portal-example.yaml")
    forged = principal("x", username="temperature-sensor", cn="smart-lock")
    assert not hook.authorize_connect(forged)
    hook = authorization(
        tmp_path,
        "- principals: {usernames: [smart-lock]}\n  brokerResources: [{method: Connect}]\n",
    )
    assert hook.authorize_connect(principal("x", username="forged", cn="smart-lock"))


# --- password files -----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_password_file_reads_mosquitto_passwd(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "s3cret"], check=True)
    subprocess.run(
        ["mosquitto_passwd", "-H", "sha512", "-b", str(path), "bob", "hunter2"], check=True
    )
    passwords = PasswordFile(path)
    assert passwords.check("alice", b"s3cret")
    assert passwords.check("bob", b"hunter2")
    assert not passwords.check("alice", b"hunter2")
    assert not passwords.check("carol", b"s3cret")
    assert not passwords.check(None, None)
    # A changed file is read again on the next check.
    with path.open("a") as file:
        file.write(f"carol:{hash_password('pw')}\n")
    assert passwords.check("carol", b"pw")


def test_password_file_refuses_plain_text(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("# users\nalice:secret\n")
    with pytest.raises(PasswordFileError, match=r"passwd:2: user 'alice'"):
        PasswordFile(path)


# --- the state store's RESP3 --------------------------------------------------------------

REQUESTS = [
    (
        b"*3\r\n$3\r\nSET\r\n$7\r\ntestkey\r\n$9\r\ntestvalue\r\n",
        [b"SET", b"testkey", b"testvalue"],
    ),
    (b"*2\r\n$3\r\nGET\r\n$7\r\ntestkey\r\n", [b"GET", b"testkey"]),
    (b"*3\r\n$4\r\nVDEL\r\n$1\r\nk\r\n$0\r\n\r\n", [b"VDEL", b"k", b""]),
    (
        b"*6\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$3\r\nNEX\r\n$2\r\nPX\r\n$3\r\n100\r\n",
        [b"SET", b"k", b"v", b"NEX", b"PX", b"100"],
    ),
]


@pytest.mark.parametrize(("payload", "items"), REQUESTS)
def test_resp3_request_vectors(payload: bytes, items: list[bytes]) -> None:
    assert decode_request(payload) == items
    assert encode_array(items) == payload
    with pytest.raises(RESPError):
        decode_request(payload + b"x")
    for cut in range(len(payload)):
        with pytest.raises(RESPError):
            decode_request(payload[:cut])


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=8))
def test_resp3_round_trip(items: list[bytes]) -> None:
    assert decode_request(encode_array(items)) == items


@given(st.binary(max_size=64))
def test_resp3_random_bytes_raise_only_resp_error(data: bytes) -> None:
    try:
        decode_request(data)
    except RESPError:
        pass


def test_notification_topic_is_hex_upper() -> None:
    assert notification_topic("c1", b"k\x00") == (
        "clients/statestore/v1/FA9AE35F-2F64-47CD-9BFF-08E2B32A0FE8/6331/command/notify/6B00"
    )


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("sensor-[0-9]", b"sensor-7", True),
        ("sensor-[9-0]", b"sensor-7", True),  # Redis swaps a reversed range
        ("sensor-[9-0]", b"sensor-x", False),
        ("a[0-']", b"a(", True),  # the fuzz campaign's finding: "bad character range" before
        ("a[-x]", b"a-", True),
        ("a[!b]", b"ab", False),
    ],
)
def test_state_store_key_globs_follow_redis_classes(
    pattern: str, key: bytes, matches: bool
) -> None:
    policy = parse_policy(
        "- principals: {clientIds: [a]}\n  brokerResources: []\n  stateStoreResources:\n"
        f"    - method: Read\n      keyType: Pattern\n      keys: [{json.dumps(pattern)}]\n",
        "policy.yaml",
    )
    grants = resolve(policy, PrincipalView("a", None, ()))
    assert [grant.matches(key) for grant in grants.keys] == [matches]


def test_a_key_template_naming_what_the_principal_lacks_grants_no_key() -> None:
    """{principal.username} for a client without a username: that key is granted to no one
    (found by the fuzz campaign: matches() asserted instead)."""
    policy = parse_policy(
        "- principals: {clientIds: [a]}\n  brokerResources: []\n  stateStoreResources:\n"
        "    - method: Read\n      keys: ['tenant-{principal.username}-*']\n",
        "policy.yaml",
    )
    grants = resolve(policy, PrincipalView("a", None, ()))
    assert [grant.matches(b"tenant--x") for grant in grants.keys] == [False]
    assert [grant.matches(b"tenant-bob-x") for grant in grants.keys] == [False]
