"""``shunter serve --workers N``: the supervisor process and what it owns.

It holds the API port and ``--health-check-port`` (children listen on them with
SO_REUSEPORT: each answers probes with its own readiness), keeps N children
running (supervisor/), serves the merged ``/metrics`` of all of them on
``--prometheus-port`` (observability/merged.py), and on SIGTERM or SIGINT has every child
drain, exiting 0 when all drained cleanly. It serves no request itself: a crash in
request code takes one child down, never the supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from shunter.config import GatewayConfig
from shunter.fleet import ids as worker_ids
from shunter.observability.exporter import Exporter
from shunter.observability.logging import setup_logging
from shunter.observability.merged import ChildrenCollector, fetch_exposition
from shunter.supervisor.children import ChildCommand, children_peers, reserve_port
from shunter.supervisor.supervisor import Supervisor

log = logging.getLogger("shunter.supervisor")


def run_supervisor(config: GatewayConfig, argv: Sequence[str]) -> None:
    """Run the children of ``shunter <argv>`` (``argv``: a ``serve`` command line with
    ``--workers N``) until a signal; exit with 0 if all of them drained cleanly."""
    setup_logging(config.log_level, config.log_dir, config.log_json)
    held = []
    ports = [("the gateway's port", config.port)]
    if config.health_check_port is not None:  # the children listen there too
        ports.append(("the probes' port", config.health_check_port))
    for what, port in ports:
        try:
            held += reserve_port(config.host, port)
        except OSError as exc:
            log.error(
                f"cannot listen on {what}",
                extra={"host": config.host, "port": port, "error": exc.strerror},
            )
            sys.exit(1)
    sockets = tempfile.mkdtemp(prefix="shunter-control-")  # private: mode 0700
    try:
        code = asyncio.run(_supervise(config, argv, sockets))
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
        for sock in held:
            sock.close()
    sys.exit(code)


async def _supervise(config: GatewayConfig, argv: Sequence[str], socket_dir: str) -> int:
    count = config.workers
    worker_ids.share_key()  # the children derive the same ids for the same workers
    paths = [os.path.join(socket_dir, f"{index}.sock") for index in range(count)]
    command = ChildCommand(
        argv,
        os.getpid(),
        control_sockets=paths,
        peers=children_peers(count, config.peer_port, config.peer_urls, socket_dir),
    )
    collector = ChildrenCollector(count, lambda index: fetch_exposition(paths[index]))
    supervisor = Supervisor(count, command.spawn, restarted=collector.retire)
    exporter = None
    if config.prometheus_port:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        exporter = Exporter(config.prometheus_host, config.prometheus_port, registry)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.stop, sig)
    log.info(
        "supervising gateway processes",
        extra={"workers": count, "host": config.host, "port": config.port},
    )
    try:
        return await supervisor.run()
    finally:
        if exporter is not None:
            exporter.close()
