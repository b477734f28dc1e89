"""Authorization policies (seed 003, Azure IoT Operations' BrokerAuthorization).

What this module owns:

- **Loading** a policy file, JSON or YAML, in the seed's shape: a list of rules, each with
  ``principals`` {clientIds, usernames, attributes} and ``brokerResources``
  [{method: Connect|Publish|Subscribe, clientIds, topics}] and, optionally,
  ``stateStoreResources`` [{method: Read|Write|ReadWrite, keyType: Pattern|String|Binary,
  keys}]. The bare list and the seed's whole Kubernetes resource (``kind:
  BrokerAuthorization``, ``spec.authorizationPolicies.rules``) are both accepted. Every
  mistake is a :class:`PolicyError` naming the file, the line and the problem.
- **Deciding** (:class:`PolicyAuthorization`, the core's ``AuthorizationHook``): a client is
  allowed something when at least one rule's principals match it *and* one of that rule's
  resources grants it; nothing else is allowed (no rule -> denied, seed 003).

  * Principals are a logical OR: the client id, the username, or one ``attributes`` entry
    whose every key/value the client has (an entry is an AND of its pairs).
  * ``{principal.clientId}``, ``{principal.username}`` and ``{principal.attributes.NAME}``
    are substituted in resource client ids, topics and state store keys. A token whose value
    is missing makes that one entry grant nothing. A substituted value is always literal: in
    a topic it may not contain ``/``, ``+`` or ``#`` (nor be ``*``), or the entry grants
    nothing, so a client id such as ``a/#`` can never widen a grant.
  * ``*`` in client ids matches any run of characters (``{principal.attributes.building}*``).
  * Topics are MQTT topic filters. ``+`` is one level, ``#`` the level above and all below
    it; a level that is exactly ``*`` (the seed's ``.../telemetry/*``) reads as the glob the
    seed uses for keys ("everything under"): one or more levels when it is the last level,
    exactly one level elsewhere. Rule filters starting with a wildcard never match topics
    starting with ``$`` (MQTT 4.7.2).
  * Publish: the topic name must match one granted filter.
  * Subscribe (the containment rule): a granted filter R *covers* a requested filter S when
    every topic name S can match is also matched by R. Level by level: R's ``#`` covers
    whatever is left of S (including S's ``#``); R's ``+`` covers one S level that is a
    literal or ``+``; R's last ``*`` covers one or more remaining S levels unless S's next
    level is ``#`` (which also matches the parent); a literal covers only the same literal;
    S's ``#`` is covered only by R's ``#`` (a lone ``#``, having no parent level, is read
    as ``+/#``). ``$share/GROUP/`` is removed from S first.
  * Connect: the rule needs a ``Connect`` resource; its ``clientIds``, if any, must match.
    Publish/Subscribe resources may also carry ``clientIds``; they then further restrict.
- **Identity** (seed 003 "X.509"): with a verified client certificate the username is the
  certificate's subject CN, whether the broker terminated TLS or the balancer sent the CN in
  its PROXY v2 header. Attributes come from the certificate, its intermediate CA or its root
  CA, configured by subject as Azure's ``authorizationAttributes`` are: each verified chain
  subject (DER, from :attr:`PeerIdentity.chain_subjects`) is compared, normalized, with the
  configured subjects; the attributes of every match are merged, the leaf's winning.
- **State store keys** (:meth:`PolicyAuthorization.authorize_state_store`): Read means GET
  and KEYNOTIFY, Write means SET, DEL and VDEL; keyType Pattern is a glob (``*``, ``?``,
  ``[0-9]``) with tokens, String an exact key, Binary an exact key given in base64.
- **Runtime updates**: :meth:`PolicyAuthorization.reload` swaps the whole policy; a file
  that fails to load keeps the old policy and logs file, line and problem. The caller (the
  server) disconnects the clients of the linked listeners, as the seed says.

Authorization applies only on linked listeners (seed 003: and only on listeners that also
authenticate; the config refuses anything else). Clients of other listeners are allowed
everything, as without a policy.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import yaml

from broker.hooks import NO_ATTRIBUTES, PeerIdentity, Principal
from broker.mqtt import misplaced_wildcard, split_shared
from broker.statestore import (
    STATE_STORE_NOTIFY_PREFIX,
    STATE_STORE_REQUEST_TOPIC,
    StateStoreAccess,
)
from broker.subjects import Subject, decode_name, normalized, parse_distinguished_name
from lb.pem import FileSignature, file_signature

__all__ = [
    "Authentication",
    "BrokerResource",
    "Grants",
    "Policy",
    "PolicyAuthorization",
    "PolicyError",
    "Principals",
    "ReloadResult",
    "Rule",
    "StateStoreResource",
    "X509Attributes",
    "covers",
    "load_policy",
    "parse_policy",
]

logger = logging.getLogger(__name__)

Method = Literal["Connect", "Publish", "Subscribe"]
Access = Literal["Read", "Write", "ReadWrite"]
KeyType = Literal["Pattern", "String", "Binary"]
Authentication = Literal["x509", "password"]

METHODS: Final[dict[str, Method]] = {
    "connect": "Connect",
    "publish": "Publish",
    "subscribe": "Subscribe",
}
ACCESS_LEVELS: Final[dict[str, Access]] = {
    "read": "Read",
    "write": "Write",
    "readwrite": "ReadWrite",
}
KEY_TYPES: Final[dict[str, KeyType]] = {
    "pattern": "Pattern",
    "string": "String",
    "binary": "Binary",
}
# {principal.clientId} / {principal.username} / {principal.attributes.NAME}
TOKEN: Final = re.compile(r"\{principal\.(clientId|username|attributes\.([^{}]+))\}")
# Principals derived once per distinct client; bounded so a flood of client ids cannot
# grow memory (the cache is simply emptied when full).
GRANTS_CACHE_SIZE: Final = 10_000


class PolicyError(Exception):
    """A policy file that cannot be used: ``file:line: problem``."""

    def __init__(self, origin: str, line: int | None, message: str) -> None:
        where = f"{origin}:{line}" if line is not None else origin
        super().__init__(f"{where}: {message}")
        self.origin = origin
        self.line = line
        self.message = message


# --- the policy model ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    """A string with ``{principal...}`` tokens: literal text and token names, in order."""

    parts: tuple[tuple[bool, str], ...]  # (is_token, literal text or token name)
    text: str

    def render(self, principal: PrincipalView) -> list[tuple[bool, str]] | None:
        """Parts with tokens replaced by (True, value); None when a value is missing."""
        rendered: list[tuple[bool, str]] = []
        for is_token, text in self.parts:
            if not is_token:
                rendered.append((False, text))
                continue
            value = principal.token(text)
            if value is None:
                return None
            rendered.append((True, value))
        return rendered


@dataclass(frozen=True, slots=True)
class Principals:
    client_ids: tuple[str, ...] = ()
    usernames: tuple[str, ...] = ()
    attributes: tuple[tuple[tuple[str, str], ...], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.client_ids or self.usernames or self.attributes)


@dataclass(frozen=True, slots=True)
class BrokerResource:
    method: Method
    client_ids: tuple[Template, ...] = ()
    topics: tuple[Template, ...] = ()
    line: int | None = None


@dataclass(frozen=True, slots=True)
class StateStoreResource:
    method: Access
    key_type: KeyType
    keys: tuple[Template, ...]
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    principals: Principals
    broker_resources: tuple[BrokerResource, ...]
    state_store_resources: tuple[StateStoreResource, ...] = ()
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    origin: str = "<policy>"


@dataclass(frozen=True, slots=True)
class X509Attributes:
    """Azure's ``authorizationAttributes`` entry: certificates with ``subject`` get these."""

    name: str
    subject: str
    attributes: tuple[tuple[str, str], ...]


# --- principals ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrincipalView:
    """What the policy sees of a client: client id, (verified) username, attributes."""

    client_id: str
    username: str | None
    attributes: tuple[tuple[str, str], ...]

    def token(self, name: str) -> str | None:
        if name == "clientId":
            return self.client_id
        if name == "username":
            return self.username
        return dict(self.attributes).get(name.removeprefix("attributes."))

    def matches(self, principals: Principals) -> bool:
        if any(_glob_match(pattern, self.client_id) for pattern in principals.client_ids):
            return True
        if self.username is not None and self.username in principals.usernames:
            return True
        own = dict(self.attributes)
        return any(
            all(own.get(key) == value for key, value in entry) for entry in principals.attributes
        )


def principal_view(principal: Principal) -> PrincipalView:
    """The username is the certificate CN when a certificate was verified (seed 003)."""
    identity = principal.identity
    username = principal.username
    if identity is not None and identity.certificate_verified and identity.certificate_cn:
        username = identity.certificate_cn
    return PrincipalView(
        principal.client_id,
        username,
        tuple(sorted((str(key), str(value)) for key, value in principal.attributes.items())),
    )


def _glob_match(pattern: str, text: str) -> bool:
    if "*" not in pattern:
        return pattern == text
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), text) is not None


def _client_id_matches(template: Template, principal: PrincipalView) -> bool:
    rendered = template.render(principal)
    if rendered is None:
        return False
    # `*` is a wildcard only in the policy's own text; substituted values are literal.
    expression = "".join(
        re.escape(text) if is_token else ".*".join(re.escape(part) for part in text.split("*"))
        for is_token, text in rendered
    )
    return re.fullmatch(expression, principal.client_id, flags=re.DOTALL) is not None


# --- topics -------------------------------------------------------------------------------


def _render_topic(template: Template, principal: PrincipalView) -> tuple[str, ...] | None:
    rendered = template.render(principal)
    if rendered is None:
        return None
    for is_token, text in rendered:
        if is_token and (text == "*" or any(character in text for character in "/+#")):
            logger.debug(
                "topic %r not granted to client_id=%s: substituted value %r is not one literal "
                "topic level",
                template.text,
                principal.client_id,
                text,
            )
            return None
    return tuple("".join(text for _, text in rendered).split("/"))


def covers(rule: Sequence[str], requested: Sequence[str]) -> bool:
    """Whether rule filter levels ``rule`` allow every topic ``requested`` can match.

    ``requested`` is a topic name (publish) or a topic filter (subscribe), split on "/".
    See the module docstring for the rule, including the seed's ``*`` level.
    """
    if rule and rule[0] in ("+", "#", "*") and requested and requested[0][:1] == "$":
        return False
    if len(requested) == 1 and requested[0] == "#":
        # A lone "#" has no parent level to match: it is one level and all below ("+/#").
        requested = ("+", "#")
    return _covers(rule, requested, 0, 0)


def _covers(rule: Sequence[str], requested: Sequence[str], i: int, j: int) -> bool:
    while True:
        if i == len(rule):
            return j == len(requested)
        level = rule[i]
        if level == "#" and i == len(rule) - 1:
            return True
        if level == "*" and i == len(rule) - 1:
            return j < len(requested) and requested[j] != "#"
        if j == len(requested):
            return False
        wanted = requested[j]
        if wanted == "#":
            return False
        if level in ("+", "*"):
            pass  # one level: a literal or "+"
        elif level != wanted or wanted == "+":
            return False
        i += 1
        j += 1


# --- state store keys ---------------------------------------------------------------------


def _glob_class(body: str) -> str:
    """A glob's ``[...]`` body as a regular expression's: every character literal, ``a-z`` a
    range, and a reversed range swapped as Redis's stringmatchlen does (``[9-0]`` is
    ``[0-9]``; the regular expression would be an error, found by the fuzz campaign)."""
    out: list[str] = []
    index = 0
    while index < len(body):
        if index + 2 < len(body) and body[index + 1] == "-":
            low, high = sorted((body[index], body[index + 2]))
            out.append(f"{_class_character(low)}-{_class_character(high)}")
            index += 3
        else:
            out.append(_class_character(body[index]))
            index += 1
    return "".join(out)


def _class_character(character: str) -> str:
    return "\\" + character if character in "\\^[]-" else character


def _glob_expression(rendered: Iterable[tuple[bool, str]]) -> str:
    """Redis-style glob (seed 003: ``*``, ``?``, ``[0-9]``) to a regular expression."""
    out: list[str] = []
    for is_token, text in rendered:
        if is_token:
            out.append(re.escape(text))
            continue
        index = 0
        while index < len(text):
            character = text[index]
            if character == "*":
                out.append(".*")
            elif character == "?":
                out.append(".")
            elif character == "\\" and index + 1 < len(text):
                index += 1
                out.append(re.escape(text[index]))
            elif character == "[":
                end = text.find("]", index + 2)
                if end == -1:
                    out.append(re.escape(character))
                else:
                    body = text[index + 1 : end]
                    negate = body[:1] in ("^", "!")
                    if negate:
                        body = body[1:]
                    out.append(f"[{'^' if negate else ''}{_glob_class(body)}]")
                    index = end
            else:
                out.append(re.escape(character))
            index += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class KeyGrant:
    read: bool
    write: bool
    key_type: KeyType
    expression: re.Pattern[str] | None = None
    text: str | None = None
    binary: bytes | None = None

    def matches(self, key: bytes) -> bool:
        if self.key_type == "Binary":
            return key == self.binary
        try:
            decoded = key.decode("utf-8")
        except UnicodeDecodeError:
            return False
        if self.key_type == "String":
            return decoded == self.text
        if self.expression is None:  # a key template naming what this principal lacks
            return False
        return self.expression.fullmatch(decoded) is not None


def _key_grant(resource: StateStoreResource, key: Template, principal: PrincipalView) -> KeyGrant:
    read = resource.method in ("Read", "ReadWrite")
    write = resource.method in ("Write", "ReadWrite")
    if resource.key_type == "Binary":
        return KeyGrant(read, write, "Binary", binary=base64.b64decode(key.text, validate=True))
    if resource.key_type == "String":
        return KeyGrant(read, write, "String", text=key.text)
    rendered = key.render(principal)
    if rendered is None:
        return KeyGrant(read=False, write=False, key_type="Pattern", expression=None)
    expression = re.compile(_glob_expression(rendered), flags=re.DOTALL)
    return KeyGrant(read, write, "Pattern", expression=expression)


# --- what one principal may do ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grants:
    """The policy resolved for one principal: everything it may connect to and use."""

    connect: bool
    publish: tuple[tuple[str, ...], ...]
    subscribe: tuple[tuple[str, ...], ...]
    keys: tuple[KeyGrant, ...]
    reason: str = ""

    def may_publish(self, topic: str) -> bool:
        levels = topic.split("/")
        return any(covers(rule, levels) for rule in self.publish)

    def may_subscribe(self, topic_filter: str) -> bool:
        levels = split_shared(topic_filter)[1].split("/")
        return any(covers(rule, levels) for rule in self.subscribe)


def resolve(policy: Policy, principal: PrincipalView) -> Grants:
    connect = False
    matched_rule = False
    publish: list[tuple[str, ...]] = []
    subscribe: list[tuple[str, ...]] = []
    keys: list[KeyGrant] = []
    for rule in policy.rules:
        if not principal.matches(rule.principals):
            continue
        matched_rule = True
        for resource in rule.broker_resources:
            if resource.client_ids and not any(
                _client_id_matches(pattern, principal) for pattern in resource.client_ids
            ):
                continue
            if resource.method == "Connect":
                connect = True
                continue
            target = publish if resource.method == "Publish" else subscribe
            for topic in resource.topics:
                levels = _render_topic(topic, principal)
                if levels is not None:
                    target.append(levels)
        for store_resource in rule.state_store_resources:
            for key in store_resource.keys:
                keys.append(_key_grant(store_resource, key, principal))
    if not matched_rule:
        reason = "no rule's principals match this client"
    elif not connect:
        reason = "no Connect resource of the matching rules allows this client id"
    else:
        reason = ""
    return Grants(connect, tuple(publish), tuple(subscribe), tuple(keys), reason)


# --- loading ------------------------------------------------------------------------------


def load_policy(path: str | Path) -> Policy:
    return _read_policy(Path(path))[0]


def _read_policy(path: Path) -> tuple[Policy, bytes]:
    """The policy in the file, and the file's bytes (kept to tell a real change on reload)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PolicyError(str(path), None, f"cannot read policy file: {error.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PolicyError(str(path), None, f"not UTF-8: {error.reason}") from None
    return parse_policy(text, str(path)), data


# json and PyYAML's composer nest by recursion: a file of about a thousand "[" reaches
# Python's recursion limit. No policy is nested deeper than five levels.
_TOO_DEEP: Final = "nested too deeply (lists or mappings within each other)"


def parse_policy(text: str, origin: str = "<policy>") -> Policy:
    """Parse a policy document (JSON or YAML; JSON is checked strictly as JSON first)."""
    stripped = text.lstrip()
    if origin.endswith(".json") or stripped[:1] in ("[", "{"):
        try:
            json.loads(text)
        except RecursionError:
            raise PolicyError(origin, None, _TOO_DEEP) from None
        except json.JSONDecodeError as error:
            if origin.endswith(".json"):
                raise PolicyError(
                    origin, error.lineno, f"not valid JSON: {error.msg} (column {error.colno})"
                ) from None
            # Flow-style YAML that is not JSON: let YAML judge it.
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = None if mark is None else mark.line + 1
        problem = error.problem or error.context or "syntax error"
        raise PolicyError(origin, line, f"not valid YAML: {problem}") from None
    except yaml.YAMLError as error:
        raise PolicyError(origin, None, f"not valid YAML: {error}") from None
    except RecursionError:
        raise PolicyError(origin, None, _TOO_DEEP) from None
    if node is None:
        raise PolicyError(origin, None, "empty policy file: expected a list of rules")
    return _Parser(origin).policy(node)


class _Parser:
    """Walks the YAML node tree (JSON is YAML too) so every error can name its line."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, node: yaml.Node, message: str) -> PolicyError:
        return PolicyError(self.origin, node.start_mark.line + 1, message)

    def mapping(self, node: yaml.Node, what: str) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what}: expected a mapping")
        result: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, f"{what} key")
            if key in result:
                raise self.fail(key_node, f"{what}: duplicate key {key!r}")
            result[key] = value_node
        return result

    def sequence(self, node: yaml.Node | None, what: str) -> list[yaml.Node]:
        if node is None:
            return []
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what}: expected a list")
        return list(node.value)

    def scalar(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            raise self.fail(node, f"{what}: expected a string")
        return str(node.value)

    def strings(self, node: yaml.Node | None, what: str) -> list[tuple[str, yaml.Node]]:
        return [(self.scalar(item, what), item) for item in self.sequence(node, what)]

    def known(self, node: yaml.Node, fields: dict[str, yaml.Node], allowed: set[str]) -> None:
        for name in fields:
            if name not in allowed:
                expected = ", ".join(sorted(allowed))
                raise self.fail(node, f"unknown field {name!r} (expected one of: {expected})")

    def policy(self, node: yaml.Node) -> Policy:
        rules_node: yaml.Node | None = node
        if isinstance(node, yaml.MappingNode):
            document = self.mapping(node, "policy")
            kind = document.get("kind")
            if kind is not None and self.scalar(kind, "kind") != "BrokerAuthorization":
                raise self.fail(kind, "kind: expected BrokerAuthorization")
            if "spec" in document:
                document = self.mapping(document["spec"], "spec")
            if "authorizationPolicies" in document:
                document = self.mapping(
                    document["authorizationPolicies"], "spec.authorizationPolicies"
                )
            if "rules" not in document:
                raise self.fail(
                    node,
                    "expected a list of rules, or a BrokerAuthorization resource with "
                    "spec.authorizationPolicies.rules",
                )
            rules_node = document["rules"]
        assert rules_node is not None
        if not isinstance(rules_node, yaml.SequenceNode) and not (
            isinstance(rules_node, yaml.ScalarNode) and rules_node.tag.endswith(":null")
        ):
            raise self.fail(rules_node, "rules: expected a list of rules")
        rules = tuple(
            self.rule(rule, index + 1)
            for index, rule in enumerate(self.sequence(rules_node, "rules"))
        )
        return Policy(rules, self.origin)

    def rule(self, node: yaml.Node, number: int) -> Rule:
        fields = self.mapping(node, f"rule {number}")
        self.known(node, fields, {"principals", "brokerResources", "stateStoreResources"})
        if "principals" not in fields:
            raise self.fail(node, f"rule {number}: 'principals' is required")
        principals = self.principals(fields["principals"])
        if principals.empty:
            logger.warning(
                "%s:%d: rule %d has no principals: it matches no client",
                self.origin,
                node.start_mark.line + 1,
                number,
            )
        resources = tuple(
            self.broker_resource(item) for item in self.sequence(fields.get("brokerResources"), "")
        )
        store = tuple(
            self.state_store_resource(item)
            for item in self.sequence(fields.get("stateStoreResources"), "stateStoreResources")
        )
        return Rule(principals, resources, store, node.start_mark.line + 1)

    def principals(self, node: yaml.Node) -> Principals:
        fields = self.mapping(node, "principals")
        self.known(node, fields, {"clientIds", "usernames", "attributes"})
        client_ids = tuple(text for text, _ in self.strings(fields.get("clientIds"), "clientIds"))
        usernames = tuple(text for text, _ in self.strings(fields.get("usernames"), "usernames"))
        for text, item in [
            *self.strings(fields.get("clientIds"), "clientIds"),
            *self.strings(fields.get("usernames"), "usernames"),
        ]:
            if TOKEN.search(text) or "{" in text:
                raise self.fail(item, f"{text!r}: principals cannot use tokens")
        attributes: list[tuple[tuple[str, str], ...]] = []
        for entry in self.sequence(fields.get("attributes"), "attributes"):
            pairs = self.mapping(entry, "attributes entry")
            if not pairs:
                raise self.fail(entry, "attributes entry is empty (it would match every client)")
            attributes.append(
                tuple(
                    sorted(
                        (key, self.scalar(value, f"attribute {key}"))
                        for key, value in pairs.items()
                    )
                )
            )
        return Principals(client_ids, usernames, tuple(attributes))

    def template(self, node: yaml.Node, what: str) -> Template:
        text = self.scalar(node, what)
        parts: list[tuple[bool, str]] = []
        position = 0
        for match in TOKEN.finditer(text):
            literal = text[position : match.start()]
            self.check_braces(node, literal, text)
            if literal:
                parts.append((False, literal))
            parts.append((True, match.group(1)))
            position = match.end()
        rest = text[position:]
        self.check_braces(node, rest, text)
        if rest:
            parts.append((False, rest))
        return Template(tuple(parts), text)

    def check_braces(self, node: yaml.Node, literal: str, text: str) -> None:
        if "{" in literal or "}" in literal:
            raise self.fail(
                node,
                f"{text!r}: unknown token; the tokens are {{principal.clientId}}, "
                "{principal.username} and {principal.attributes.NAME}",
            )

    def broker_resource(self, node: yaml.Node) -> BrokerResource:
        fields = self.mapping(node, "brokerResources entry")
        self.known(node, fields, {"method", "clientIds", "topics"})
        if "method" not in fields:
            raise self.fail(node, "brokerResources entry: 'method' is required")
        method_text = self.scalar(fields["method"], "method")
        method = METHODS.get(method_text.lower())
        if method is None:
            raise self.fail(
                fields["method"],
                f"method {method_text!r}: expected Connect, Publish or Subscribe",
            )
        client_ids = tuple(
            self.template(item, "clientIds")
            for item in self.sequence(fields.get("clientIds"), "clientIds")
        )
        topic_nodes = self.sequence(fields.get("topics"), "topics")
        topics = tuple(self.template(item, "topics") for item in topic_nodes)
        for topic, item in zip(topics, topic_nodes, strict=True):
            self.check_topic(item, topic.text)
        if method == "Connect" and topics:
            raise self.fail(node, "method Connect takes no topics")
        if method != "Connect" and not topics:
            raise self.fail(node, f"method {method}: 'topics' is required")
        return BrokerResource(method, client_ids, topics, node.start_mark.line + 1)

    def check_topic(self, node: yaml.Node, text: str) -> None:
        if not text:
            raise self.fail(node, "empty topic")
        problem = misplaced_wildcard(text)
        if problem is not None:
            raise self.fail(node, f"topic {text!r}: {problem}")

    def state_store_resource(self, node: yaml.Node) -> StateStoreResource:
        fields = self.mapping(node, "stateStoreResources entry")
        self.known(node, fields, {"method", "keyType", "keys"})
        if "method" not in fields:
            raise self.fail(node, "stateStoreResources entry: 'method' is required")
        method_text = self.scalar(fields["method"], "method")
        method = ACCESS_LEVELS.get(method_text.lower())
        if method is None:
            raise self.fail(
                fields["method"], f"method {method_text!r}: expected Read, Write or ReadWrite"
            )
        key_type: KeyType = "Pattern"
        if "keyType" in fields:
            key_type_text = self.scalar(fields["keyType"], "keyType")
            found = KEY_TYPES.get(key_type_text.lower())
            if found is None:
                raise self.fail(
                    fields["keyType"],
                    f"keyType {key_type_text!r}: expected Pattern, String or Binary",
                )
            key_type = found
        keys: list[Template] = []
        for item in self.sequence(fields.get("keys"), "keys"):
            if key_type == "Pattern":
                keys.append(self.template(item, "keys"))
                continue
            text = self.scalar(item, "keys")
            if key_type == "Binary":
                try:
                    base64.b64decode(text, validate=True)
                except (binascii.Error, ValueError):
                    raise self.fail(item, f"key {text!r}: keyType Binary needs base64") from None
            keys.append(Template(((False, text),), text))
        if not keys:
            raise self.fail(node, "stateStoreResources entry: 'keys' is required")
        return StateStoreResource(method, key_type, tuple(keys), node.start_mark.line + 1)


# --- the hook -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReloadResult:
    changed: bool
    error: str | None = None
    rules: int = 0


@dataclass(slots=True)
class _FileState:
    signature: FileSignature = ()
    text: bytes | None = None


class PolicyAuthorization:
    """The ``AuthorizationHook`` of seed 003 over one policy file.

    ``listeners`` maps each linked listener label (``tcp:default``) to the ways it
    authenticates (``x509``, ``password``); clients of other listeners are not restricted.
    """

    def __init__(
        self,
        policy_file: str | Path,
        listeners: Mapping[str, frozenset[Authentication]],
        x509_attributes: Sequence[X509Attributes] = (),
        on_update: Callable[[Policy], None] | None = None,
    ) -> None:
        self.policy_file = Path(policy_file)
        self.listeners = dict(listeners)
        self.on_update = on_update
        self._subjects: list[tuple[Subject, tuple[tuple[str, str], ...]]] = [
            (parse_distinguished_name(entry.subject), entry.attributes) for entry in x509_attributes
        ]
        self._file = _FileState()
        self._grants: dict[tuple[str, PrincipalView], Grants] = {}
        self.reloads = 0
        self.reload_failures = 0
        self.policy = self._load()  # PolicyError at start: refuse to run

    # --- policy updates ---------------------------------------------------------------------

    def _load(self) -> Policy:
        signature = file_signature([self.policy_file])
        policy, data = _read_policy(self.policy_file)
        self._file = _FileState(signature, data)
        return policy

    def file_changed(self) -> bool:
        """The policy file's mtime or size differs from the loaded one (cheap: one stat)."""
        return file_signature([self.policy_file]) != self._file.signature

    def reload(self) -> ReloadResult:
        """Load the file again; swap the policy whole if it loads and differs."""
        previous_text = self._file.text
        try:
            policy = self._load()
        except PolicyError as error:
            self.reload_failures += 1
            # Remember the broken file's signature so the poller reports it once.
            self._file.signature = file_signature([self.policy_file])
            logger.error("authorization policy not updated, keeping the old one: %s", error)
            return ReloadResult(False, str(error), len(self.policy.rules))
        if self._file.text == previous_text:
            return ReloadResult(False, None, len(policy.rules))
        self.policy = policy
        self._grants.clear()
        self.reloads += 1
        logger.info(
            "authorization policy updated from %s: %d rules", self.policy_file, len(policy.rules)
        )
        if self.on_update is not None:
            self.on_update(policy)
        return ReloadResult(True, None, len(policy.rules))

    # --- identity ---------------------------------------------------------------------------

    def principal_attributes(self, identity: PeerIdentity) -> Mapping[str, str]:
        if not self._subjects or not identity.certificate_verified:
            return NO_ATTRIBUTES
        subjects: list[Subject] = []
        for der in identity.chain_subjects:
            try:
                subjects.append(decode_name(der))
            except ValueError as error:
                logger.warning("chain subject from %s not decodable: %s", identity.address, error)
        if not subjects and identity.certificate_cn:
            # No chain (e.g. a TLS listener that only knows the CN): the leaf's CN alone.
            subjects.append(normalized([("2.5.4.3", identity.certificate_cn)]))
        attributes: dict[str, str] = {}
        # Root first, so intermediate and then leaf attributes win on the same name.
        for subject in reversed(subjects):
            for configured, values in self._subjects:
                if configured == subject:
                    attributes.update(values)
        return attributes or NO_ATTRIBUTES

    def _linked(self, principal: Principal) -> frozenset[Authentication] | None:
        identity = principal.identity
        if identity is None:
            return None
        return self.listeners.get(identity.listener)

    def grants(self, principal: Principal) -> Grants:
        view = principal_view(principal)
        listener = "" if principal.identity is None else principal.identity.listener
        key = (listener, view)
        found = self._grants.get(key)
        if found is None:
            if len(self._grants) >= GRANTS_CACHE_SIZE:
                self._grants.clear()
            found = self._grants[key] = resolve(self.policy, view)
        return found

    # --- AuthorizationHook ------------------------------------------------------------------

    def authorize_connect(self, principal: Principal) -> bool:
        authentication = self._linked(principal)
        if authentication is None:
            return True
        identity = principal.identity
        assert identity is not None
        certificate = identity.certificate_verified and bool(identity.certificate_cn)
        password = "password" in authentication and principal.username is not None
        if not (certificate and "x509" in authentication) and not password:
            logger.info(
                "connect denied: client_id=%s listener=%s: not authenticated (%s)",
                principal.client_id,
                identity.listener,
                "no verified client certificate"
                if "x509" in authentication
                else "no username/password",
            )
            return False
        grants = self.grants(principal)
        if not grants.connect:
            view = principal_view(principal)
            logger.info(
                "connect denied: client_id=%s username=%s attributes=%s listener=%s: %s",
                principal.client_id,
                view.username or "-",
                dict(view.attributes),
                identity.listener,
                grants.reason,
            )
        return grants.connect

    def authorize_publish(self, principal: Principal, topic: str, qos: int, retain: bool) -> bool:
        if self._linked(principal) is None or topic == STATE_STORE_REQUEST_TOPIC:
            # The state store's request topic is open to every client; each key is
            # authorized by stateStoreResources (seed 003 "状態ストア キー").
            return True
        return self.grants(principal).may_publish(topic)

    def authorize_subscribe(self, principal: Principal, topic_filter: str, qos: int) -> bool:
        if self._linked(principal) is None:
            return True
        if _own_state_store_topics(principal.client_id, split_shared(topic_filter)[1]):
            return True
        return self.grants(principal).may_subscribe(topic_filter)

    # --- state store ------------------------------------------------------------------------

    def authorize_state_store(
        self, principal: Principal, access: StateStoreAccess, key: bytes
    ) -> bool:
        if self._linked(principal) is None:
            return True
        wanted_read = access == "Read"
        return any(
            (grant.read if wanted_read else grant.write) and grant.matches(key)
            for grant in self.grants(principal).keys
        )


def _own_state_store_topics(client_id: str, topic_filter: str) -> bool:
    """A client may always subscribe to its own state store responses and notifications.

    The seed's state store example grants keys but no topics; responses go to the
    requester only (broker/statestore.py), so these filters reveal nothing of others:
    ``clients/{clientId}/...`` or ``clients/{HEX(clientId)}/...`` (Azure's response
    topics) and ``clients/statestore/v1/<id>/{HEX(clientId)}/command/notify/...``.
    """
    hexadecimal = client_id.encode().hex().upper()
    levels = topic_filter.split("/")
    for prefix in (
        ("clients", client_id),
        ("clients", hexadecimal),
        (*STATE_STORE_NOTIFY_PREFIX.split("/"), hexadecimal, "command", "notify"),
    ):
        count = len(prefix)
        if (
            len(levels) > count
            and tuple(levels[:count]) == prefix
            and all(level not in ("+", "#") for level in levels[:count])
        ):
            return True
    return False
