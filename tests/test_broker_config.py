"""Broker TOML configuration: every configs/broker-*.toml loads, every configs/bad/broker-*.toml
fails with the error its header announces, and errors name the file and the key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from broker.config import ConfigError, default_config, load_config, parse_config

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
GOOD = sorted((ROOT / "configs").glob("broker-*.toml"))
BAD = sorted((ROOT / "configs" / "bad").glob("broker-*.toml"))


def test_there_are_three_nodes() -> None:
    assert [path.name for path in GOOD] == ["broker-1.toml", "broker-2.toml", "broker-3.toml"]


@pytest.mark.parametrize("path", GOOD, ids=lambda path: path.name)
def test_node_configs_load(path: Path) -> None:
    number = int(path.stem.rsplit("-", 1)[1])
    config = load_config(path)
    assert config.node_name == f"broker-{number}"
    [listener] = config.listeners
    assert (listener.host, listener.port) == ("127.0.0.1", 1882 + number)
    assert listener.proxy_protocol and listener.max_connections == 500000
    assert listener.peer_cert_as_username == "cn"
    assert ipaddress.ip_network("127.0.0.0/8") in listener.proxy_protocol_trusted
    assert config.admin is not None and config.admin.port == 18082 + number
    assert config.cluster is not None and config.cluster.port == 5370 + number
    assert len(config.cluster.peers) == 2
    assert config.cookie
    ssl_options = config.cluster.ssl_options
    assert ssl_options is not None and ssl_options.verify == "verify_peer"
    assert ssl_options.fail_if_no_peer_cert
    # Relative paths resolve against the config file's directory.
    assert ssl_options.keyfile.parent == ROOT / "configs" / "certs"
    assert ssl_options.cacertfile is not None and ssl_options.cacertfile.is_absolute()


@pytest.mark.parametrize("path", BAD, ids=lambda path: path.name)
def test_bad_configs_report_their_expected_error(path: Path) -> None:
    expected = next(
        line.split("expect:", 1)[1].strip()
        for line in path.read_text().splitlines()
        if line.startswith("# expect:")
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {expected}"


def test_defaults_like_mosquitto_p() -> None:
    """mosquitto 2.0's -p without a config: local only mode, on the loopback address."""
    config = default_config(1883)
    [listener] = config.listeners
    assert (listener.host, listener.port, listener.proxy_protocol) == ("127.0.0.1", 1883, False)
    assert config.admin is None and config.cluster is None


def test_durations_and_errors_name_file_and_key(tmp_path: Path) -> None:
    document = {
        "listeners": {"tcp": {"a": {"bind": "127.0.0.1:1", "proxy_protocol_timeout": "500ms"}}}
    }
    assert parse_config(document, "x.toml").listeners[0].proxy_protocol_timeout == 0.5
    with pytest.raises(ConfigError, match=r"^x\.toml: 'listeners\.tcp\.a\.max_connections'"):
        parse_config(
            {"listeners": {"tcp": {"a": {"bind": "127.0.0.1:1", "max_connections": "many"}}}},
            "x.toml",
        )
    with pytest.raises(ConfigError, match="no listener"):
        parse_config({}, "empty.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\n")
    with pytest.raises(ConfigError, match=r"broken.toml: '\(syntax\)': not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "missing.toml")


def test_a_file_that_is_not_toml_at_all_is_a_config_error(tmp_path: Path) -> None:
    # Found by the fuzzer (tests/fuzz, target broker-toml): a byte that is not UTF-8 escaped
    # `broker -c` as a UnicodeDecodeError traceback; nesting past Python's recursion limit
    # (tomllib recurses per level) as a RecursionError.
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[node]\nname = "br\xf6ker"\n')
    with pytest.raises(ConfigError, match=r"'\(syntax\)': not UTF-8: byte 0xf6 at offset 17"):
        load_config(latin1)
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 5000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(deep)


def test_duplicate_bind_is_refused() -> None:
    document = {
        "listeners": {"tcp": {"a": {"bind": "127.0.0.1:1883"}, "b": {"bind": "127.0.0.1:1883"}}}
    }
    with pytest.raises(ConfigError, match="already used by listener tcp:a"):
        parse_config(document, "dup.toml")


def test_stop_evacuation_is_off_unless_said() -> None:
    """``[cluster] stop_evacuation`` (a duration, "0s" by default: a stop drops the clients
    at once) and ``stop_evacuation_rate`` (clients and sessions per second, 1 to 100,000)."""
    document: dict[str, object] = {"listeners": {"tcp": {"a": {"bind": "127.0.0.1:1"}}}}
    config = parse_config({**document, "cluster": {}}, "c.toml")
    assert config.cluster is not None
    assert (config.cluster.stop_evacuation, config.cluster.stop_evacuation_rate) == (0.0, 500)
    table = {"stop_evacuation": "2m", "stop_evacuation_rate": 200}
    config = parse_config({**document, "cluster": table}, "c.toml")
    assert config.cluster is not None
    assert (config.cluster.stop_evacuation, config.cluster.stop_evacuation_rate) == (120.0, 200)
    for key, value, words in (
        ("stop_evacuation", "soon", "expected a duration"),
        ("stop_evacuation_rate", 0, "expected an integer from 1 to 100000, got 0"),
    ):
        with pytest.raises(ConfigError, match=f"c.toml: 'cluster.{key}': {words}"):
            parse_config({**document, "cluster": {key: value}}, "c.toml")


def test_autoclean_is_off_unless_said() -> None:
    """``[cluster] autoclean``: a peer down this long is forgotten (EMQX's cluster.autoclean);
    "0s", the default, never."""
    document: dict[str, object] = {"listeners": {"tcp": {"a": {"bind": "127.0.0.1:1"}}}}
    config = parse_config({**document, "cluster": {}}, "c.toml")
    assert config.cluster is not None and config.cluster.autoclean == 0.0
    for value, seconds in (("24h", 86400.0), ("0s", 0.0), (90, 90.0)):
        config = parse_config({**document, "cluster": {"autoclean": value}}, "c.toml")
        assert config.cluster is not None and config.cluster.autoclean == seconds
    for value, words in (("a day", "expected a duration"), (-1, "expected a duration of 0")):
        with pytest.raises(ConfigError, match=f"c.toml: 'cluster.autoclean': {words}"):
            parse_config({**document, "cluster": {"autoclean": value}}, "c.toml")


def test_cluster_protocol_version_is_2_to_10() -> None:
    """``[cluster] protocol_version``: the version a node announces in HELLO, 10 unless said
    (an older one while a rolling upgrade has nodes that speak only it); anything else names
    the key and what is allowed."""

    def cluster(**table: object) -> dict[str, object]:
        return {"listeners": {"tcp": {"a": {"bind": "127.0.0.1:1"}}}, "cluster": table}

    config = parse_config(cluster(), "c.toml")
    assert config.cluster is not None and config.cluster.protocol_version == 10
    config = parse_config(cluster(protocol_version=2), "c.toml")
    assert config.cluster is not None and config.cluster.protocol_version == 2
    for value in (1, 11, "3", True, 2.0):
        with pytest.raises(ConfigError) as caught:
            parse_config(cluster(protocol_version=value), "c.toml")
        assert str(caught.value).startswith(
            "c.toml: 'cluster.protocol_version': expected 2 or 3 or 4 or 5 or 6 or 7 or 8 or 9 "
            "or 10 (the cluster protocol versions"
        )
        assert str(caught.value).endswith(f"got {value!r}")
