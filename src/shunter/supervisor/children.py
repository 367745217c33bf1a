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
import os
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
    control_sockets: Sequence[str] = ()  # per slot (supervisor/control.py)
    peers: ChildPeers | None = None  # None: no peer exchange

    def args(self, index: int) -> list[str]:
        args = [
            *self.argv,
            "--worker-index",
            str(index),
            "--supervisor-pid",
            str(self.supervisor_pid),
        ]
        if self.control_sockets:
            own = self.control_sockets[index]
            siblings = [path for path in self.control_sockets if path != own]
            args += ["--control-socket", own, "--sibling-sockets", *siblings]
        if self.peers is not None:
            args += self.peers.args(index)
        return args

    async def spawn(self, index: int) -> Child:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shunter", *self.args(index)
        )


@dataclass(frozen=True)
class ChildPeers:
    """The peer exchange among the children, and with other gateways.

    Each child binds a peer endpoint of its own and names every sibling's, so that a change
    through ``/workers`` (``POST``, ``PUT``, ``PATCH``, ``DELETE``) on any process reaches
    all of them and every process learns the others' cache-aware decisions. With the
    operator's ``--peer-port P`` child ``i`` binds ``P + i`` on ``--host`` (a replica
    elsewhere lists ``P`` .. ``P + N - 1`` of this host) and also names the operator's
    ``--peer-urls``. Without it the children talk over ZeroMQ IPC sockets in the
    supervisor's private directory: no port to pick, so none another program can take
    between the supervisor's choice and the child's bind (loopback ports found free with
    bind(0) come from the range every outgoing connection also draws from). A slot keeps
    its endpoint across restarts, so the siblings' lists stay true.
    """

    # Per slot, where its siblings reach it: "127.0.0.1:PORT" (the child binds PORT on
    # --host) or "ipc://PATH" (the child binds that).
    endpoints: Sequence[str]
    remote: Sequence[str] = ()  # the operator's --peer-urls

    def args(self, index: int) -> list[str]:
        own = self.endpoints[index]
        siblings = [e for slot, e in enumerate(self.endpoints) if slot != index]
        if own.startswith("ipc://"):
            bind = ["--peer-endpoint", own]
        else:
            bind = ["--peer-port", own.rpartition(":")[2]]
        # Given after the operator's flags, these win (argparse keeps the last).
        return [*bind, "--peer-urls", *siblings, *self.remote]


def children_peers(
    count: int, peer_port: int | None, peer_urls: Sequence[str], socket_dir: str
) -> ChildPeers:
    """The peer exchange of ``count`` children, given the operator's ``--peer-port`` and
    ``--peer-urls`` and the supervisor's private ``socket_dir`` (see ``ChildPeers``)."""
    if peer_port is not None:
        ports = [peer_port + index for index in range(count)]
        return ChildPeers([f"{LOOPBACK}:{port}" for port in ports], tuple(peer_urls))
    return ChildPeers(
        [f"ipc://{os.path.join(socket_dir, f'peer-{index}')}" for index in range(count)]
    )


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
