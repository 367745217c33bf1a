"""How the supervisor starts its children, and how it holds their port.

Each child is ``python -m shunter <the supervisor's own command line>`` plus the hidden
flags of its slot: started fresh (no state forked from the supervisor), with the same
flags, so every child is configured exactly as the operator asked. A child runs the
plain single-process gateway, listening with SO_REUSEPORT.

Why SO_REUSEPORT and not one listening socket handed to every child: each child then has
an accept queue of its own and the kernel spreads connections over them by a hash of the
addresses, so no child is woken for a connection another takes, and a child that is
gone takes no new connection (bench/workers_bench.py measures the spread).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from shunter.supervisor.supervisor import Child

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ChildCommand:
    """The command line of each child."""

    argv: Sequence[str]  # the supervisor's own, after the program name ("serve", ...)
    supervisor_pid: int
    metrics_sockets: Sequence[str] | None = None  # per slot; None: metrics off
    peer_ports: Sequence[int] | None = None  # per slot; None: no peer exchange

    def args(self, index: int) -> list[str]:
        args = [
            *self.argv,
            "--worker-index",
            str(index),
            "--supervisor-pid",
            str(self.supervisor_pid),
        ]
        if self.metrics_sockets is not None:
            args += ["--metrics-socket", self.metrics_sockets[index]]
        if self.peer_ports is not None:
            args += sibling_peer_args(index, self.peer_ports)
        return args

    async def spawn(self, index: int) -> Child:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shunter", *self.args(index)
        )


def sibling_peer_args(index: int, peer_ports: Sequence[int]) -> list[str]:
    """PEER EXCHANGE HOOK: the flags that make child ``index`` a peer of its siblings.

    Each child listens for its peers on a loopback port of its own and names every
    sibling's, so that a ``POST /workers`` to any process reaches all of them (the peer
    exchange: ``--peer-port`` / ``--peer-urls``). Used only when ``shunter serve`` has
    those flags; a slot keeps its port across restarts, so the siblings' lists stay true.
    """
    siblings = [f"{LOOPBACK}:{port}" for slot, port in enumerate(peer_ports) if slot != index]
    return ["--peer-port", str(peer_ports[index]), "--peer-urls", *siblings]


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free now (held together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind host:port with SO_REUSEPORT without listening, for as long as the supervisor
    lives: a port already taken is a clear error at start (not a child failing forever),
    and while a child restarts no other program can take the port. A socket that does
    not listen receives no connection; the children's listening sockets join it.
    Raises OSError."""
    held = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in held:
            sock.close()
        raise
    return held
