"""The children's command lines, the peer-exchange hook, the held port, the flags."""

from __future__ import annotations

import socket

import pytest

from shunter.cli import main, serve_config
from shunter.supervisor.children import (
    ChildCommand,
    children_peers,
    reserve_port,
)

LOOPBACK = "127.0.0.1"


def test_each_child_runs_the_same_command_line_with_its_slot_flags() -> None:
    argv = ["serve", "--workers", "2", "--port", "30111", "--policy", "round_robin"]
    sockets = ["/s/0.sock", "/s/1.sock", "/s/2.sock"]
    command = ChildCommand(argv, 4242, control_sockets=sockets)
    config = serve_config(command.args(1)[1:])  # what the child runs with
    assert (config.worker_index, config.supervisor_pid) == (1, 4242)
    assert config.control_socket == "/s/1.sock"
    assert config.sibling_sockets == ["/s/0.sock", "/s/2.sock"]
    assert config.supervised and config.workers == 2
    assert (config.port, config.policy) == (30111, "round_robin")
    assert not serve_config(argv[1:]).supervised  # the supervisor itself is not a child


def test_without_sockets_a_child_gets_no_socket_flags() -> None:
    command = ChildCommand(["serve", "--workers", "2"], 1)
    assert "--control-socket" not in command.args(0)
    assert "--sibling-sockets" not in command.args(0)


def test_each_child_is_a_peer_of_its_siblings_over_ipc_in_the_private_directory() -> None:
    argv = ["serve", "--workers", "3", "--port", "30111"]
    config = serve_config(argv[1:])
    peers = children_peers(config.workers, config.peer_port, config.peer_urls, "/run/x")
    assert peers.endpoints == [f"ipc:///run/x/peer-{i}" for i in range(3)]
    command = ChildCommand(argv, 1, peers=peers)
    for index in range(3):
        config = serve_config(command.args(index)[1:])  # what child ``index`` runs with
        siblings = {e for i, e in enumerate(peers.endpoints) if i != index}
        assert config.peer_endpoint == peers.endpoints[index]
        assert config.peer_port is None  # no port: none to pick, none to lose to another
        assert set(config.peer_urls) == siblings


def test_the_operators_peers_are_kept_and_its_port_counts_up_per_child() -> None:
    argv = ["serve", "--workers", "2", "--port", "30111", "--peer-port", "7100"]
    argv += ["--peer-urls", "10.0.0.2:7100", "10.0.0.2:7101"]
    config = serve_config(argv[1:])
    peers = children_peers(config.workers, config.peer_port, config.peer_urls, "/run/x")
    command = ChildCommand(argv, 1, peers=peers)
    first, second = (serve_config(command.args(i)[1:]) for i in range(2))
    assert (first.peer_port, second.peer_port) == (7100, 7101)
    assert set(first.peer_urls) == {"127.0.0.1:7101", "10.0.0.2:7100", "10.0.0.2:7101"}
    assert set(second.peer_urls) == {"127.0.0.1:7100", "10.0.0.2:7100", "10.0.0.2:7101"}
    assert first.peer_endpoint is None  # bound on --host, for the remote replicas


def _listener(port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((LOOPBACK, port))
    sock.listen()
    return sock


def test_the_held_port_lets_the_children_listen_and_keeps_everyone_else_out() -> None:
    held = reserve_port(LOOPBACK, 0)
    port = held[0].getsockname()[1]
    children = [_listener(port, reuse_port=True) for _ in range(2)]
    try:
        with pytest.raises(OSError):
            _listener(port, reuse_port=False)  # another program
        with socket.create_connection((LOOPBACK, port), timeout=5):
            pass  # a child's socket takes it (the held one does not listen)
    finally:
        for sock in [*children, *held]:
            sock.close()


def test_a_port_taken_by_another_program_is_refused_at_start() -> None:
    other = _listener(0, reuse_port=False)
    try:
        with pytest.raises(OSError):
            reserve_port(LOOPBACK, other.getsockname()[1])
    finally:
        other.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--workers", "2", "--policy", "manual"], "--policy manual remembers each"),
        (
            ["--workers", "3", "--pd-disaggregation", "--decode-policy", "manual"],
            "up to 3 different workers",
        ),
    ],
)
def test_bad_workers_flags_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_one_process_keeps_every_policy() -> None:
    assert serve_config(["--workers", "1", "--policy", "manual"]).policy == "manual"
    assert serve_config(["--workers", "2", "--policy", "consistent_hashing"]).workers == 2


def test_one_worker_runs_the_gateway_in_this_process_and_more_start_a_supervisor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shunter.run
    import shunter.supervise

    ran: list[tuple[str, object]] = []
    monkeypatch.setattr(shunter.run, "run_gateway", lambda config: ran.append(("gateway", config)))
    monkeypatch.setattr(
        shunter.supervise,
        "run_supervisor",
        lambda config, argv: ran.append(("supervisor", list(argv))),
    )
    main(["serve", "--port", "30999"])
    assert [kind for kind, _ in ran] == ["gateway"]  # no supervisor process at all
    main(["launch", "--workers", "2", "--port", "30999"])
    assert ran[1] == ("supervisor", ["launch", "--workers", "2", "--port", "30999"])
