"""Every configuration file in configs/ loads as its header says.

configs/*.cfg must be valid; each configs/bad/*.cfg lists its expected errors
in `# expect: ...` header lines, which must be exactly the errors reported.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lb.config import load_config

ROOT = Path(__file__).resolve().parent.parent
GOOD = sorted((ROOT / "configs").glob("*.cfg"))
BAD = sorted((ROOT / "configs" / "bad").glob("*.cfg"))


def expectations(path: Path, prefix: str) -> list[str]:
    return [
        line.removeprefix(prefix).rstrip()
        for line in path.read_text().splitlines()
        if line.startswith(prefix)
    ]


def test_there_are_examples() -> None:
    assert any(path.name == "haproxy.cfg" for path in GOOD)
    assert len(BAD) >= 8


@pytest.mark.parametrize("path", GOOD, ids=lambda path: path.name)
def test_good_configs_are_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    result = load_config([path.relative_to(ROOT)], environ={})
    assert [d.text for d in result.diagnostics] == []
    assert result.config is not None


@pytest.mark.parametrize("path", BAD, ids=lambda path: path.name)
def test_bad_configs_report_their_expected_errors(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    expected = expectations(path, "# expect: ")
    assert expected, f"{path} has no '# expect:' header"
    result = load_config([path.relative_to(ROOT)], environ={})
    assert result.config is None
    assert [d.text for d in result.errors] == expected


def test_seed_004_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")  # paths must not depend on the working directory
    config = load_config([ROOT / "configs" / "haproxy.cfg"], environ={}).config_or_raise()
    assert config.global_.maxconn is None  # what the file limit allows (lb.limits)
    assert config.global_.log[0].format == "raw"
    metrics, frontend = config.frontends
    assert (metrics.name, metrics.http_request_use_service) == ("prometheus", "prometheus-exporter")
    assert config.global_.hard_stop_after == 20.0  # below the container's stop grace period
    assert frontend.name == "emqx-tls"
    assert frontend.default_backend == "emqx-backend"
    assert frontend.option.tcplog and frontend.log.global_
    (bind,) = frontend.binds
    certs = ROOT / "configs" / "certs"
    assert (bind.host, bind.port, bind.ssl, bind.verify) == ("127.0.0.1", 8091, True, "required")
    assert bind.crt == (str(certs / "server-allinone.pem"),)
    assert bind.ca_file == str(certs / "CaIntermediate.pem")
    assert bind.ca_verify_file == str(certs / "CaRoot.pem")
    assert bind.crl_file == str(certs / "crl.pem")
    (backend,) = config.backends
    assert backend.name == "emqx-backend" and backend.balance == "roundrobin"
    assert [(s.name, s.host, s.port) for s in backend.servers] == [
        ("emqx-165", "127.0.0.1", 1883),
        ("emqx-171", "127.0.0.1", 1884),
        ("emqx-172", "127.0.0.1", 1885),
    ]
    for server in backend.servers:
        # default-server inter 10s downinter 5s rise 2 fall 2 slowstart 60s maxconn 500000
        #   maxqueue 10000 weight 100; server ... check inter 10s fall 2 rise 5
        assert server.check and server.check_send_proxy and server.send_proxy_v2
        assert (server.inter, server.downinter, server.rise, server.fall) == (10.0, 5.0, 5, 2)
        assert (server.slowstart, server.maxconn, server.maxqueue, server.weight) == (
            60.0,
            500000,
            10000,
            100,
        )


def test_missing_file_is_reported() -> None:
    result = load_config(["/nonexistent/lb.cfg"], environ={})
    assert result.config is None
    assert [d.text for d in result.errors] == [
        "Could not open configuration file /nonexistent/lb.cfg : No such file or directory"
    ]


def test_several_files_form_one_configuration(tmp_path: Path) -> None:
    (tmp_path / "a.cfg").write_text("global\n    maxconn 5000\ndefaults\n    timeout connect 1s\n")
    (tmp_path / "b.cfg").write_text(
        "frontend fe\n    bind :1\n    default_backend be\nbackend be\n    server s 127.0.0.1:1\n"
    )
    config = load_config([tmp_path / "a.cfg", tmp_path / "b.cfg"], environ={}).config_or_raise()
    assert config.global_.maxconn == 5000
    assert config.backend("be").timeout.connect == 1.0
    assert config.files == (str(tmp_path / "a.cfg"), str(tmp_path / "b.cfg"))
