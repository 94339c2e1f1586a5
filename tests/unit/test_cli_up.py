"""`tierserve up`'s choice of who owns the public port (Ray Serve direct ingress, issue 9)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from serving.cli import direct_ingress, main, port_free, ray_defaults, serve_run_command, wait_port_free
from serving.config import load_config

LOCAL = load_config(Path(__file__).resolve().parents[2] / "models.yaml", "local")


def test_one_node_one_ingress_replica_gets_the_public_port() -> None:
    env: dict[str, str] = {}
    proxy = direct_ingress(LOCAL, env, "127.0.0.1", 8123)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # The allocation range is exactly the public port; released ports come back at once.
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == (
        "8123",
        "8124",
    )
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"
    assert proxy != 8123
    with socket.socket() as s:  # the proxy's port was free on the bind address
        s.bind(("127.0.0.1", proxy))


def test_ray_defaults_fill_only_what_the_operator_left_unset() -> None:
    env = ray_defaults({})
    assert env == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                   "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
    mine = ray_defaults({"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1", "RAY_ADDRESS": "10.0.0.1:6379"})
    assert mine["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"  # the operator's value stays
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in mine  # a cluster's nodes are started elsewhere


@pytest.mark.parametrize(
    ("config", "env"),
    [
        (LOCAL.model_copy(update={"ingress": LOCAL.ingress.model_copy(update={"replicas": 2})}), {}),
        (LOCAL, {"RAY_ADDRESS": "10.0.0.1:6379"}),  # a cluster: the ingress may land on any node
        (LOCAL, {"TIERSERVE_DIRECT_INGRESS": "0"}),  # the operator's opt-out
    ],
    ids=["two ingress replicas", "cluster", "opted out"],
)
def test_otherwise_the_proxy_keeps_the_public_port(config, env: dict[str, str]) -> None:
    before = dict(env)
    assert direct_ingress(config, env, "127.0.0.1", 8123) == 8123
    assert env == before


def lingering_port() -> tuple[int, list[socket.socket]]:
    """A port whose server side was closed with a client still connected (FIN_WAIT2, as after a crash):
    a plain bind fails, a bind with SO_REUSEADDR would not."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()
    server.close()
    return port, [client]


def test_port_closed_with_open_connections_is_not_free_and_is_waited_for() -> None:
    port, keep = lingering_port()
    try:
        assert not port_free("127.0.0.1", port)
        now = [0.0]
        slept: list[float] = []

        def sleep(s: float) -> None:
            slept.append(s)
            now[0] += s

        assert not wait_port_free("127.0.0.1", port, timeout_s=5, poll_s=1, sleep=sleep, clock=lambda: now[0])
        assert slept == [1, 1, 1, 1, 1]
    finally:
        for s in keep:
            s.close()


def test_free_port_is_not_waited_for() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert wait_port_free("127.0.0.1", port, sleep=lambda _s: pytest.fail("waited for a free port"))


def test_a_bad_environment_setting_is_named_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIERSERVE_PORT", "eighty")
    assert main(["validate", "models.yaml"]) == 2
    err = capsys.readouterr().err
    assert "environment variable TIERSERVE_PORT" in err and "valid integer" in err and "'eighty'" in err
    assert "Traceback" not in err


def test_a_port_picked_for_later_is_outside_the_kernels_ephemeral_range() -> None:
    from pathlib import Path

    from serving.cli import unclaimed_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {unclaimed_port("127.0.0.1") for _ in range(20)}
    assert all(20000 <= p < low for p in ports), ports
    assert len(ports) > 1  # drawn at random: two runs starting together don't pick the same one
    for port in ports:
        assert port_free("127.0.0.1", port)


def test_serve_run_starts_its_own_ray_unless_a_cluster_is_named() -> None:
    serve = Path("/venv/bin/serve")
    assert serve_run_command(serve, "/tmp/app.yaml", {}) == [
        "/venv/bin/serve", "run", "--address", "local", "/tmp/app.yaml"]
    assert serve_run_command(serve, "/tmp/app.yaml", {"RAY_ADDRESS": "10.1.0.1:6379"}) == [
        "/venv/bin/serve", "run", "/tmp/app.yaml"]
