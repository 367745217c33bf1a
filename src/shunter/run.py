"""Run the gateway: our HTTP/1.1 server on uvloop, until SIGTERM or SIGINT, then drain.

On the signal, in three phases (smg's): ``/readiness`` answers 503 ("draining") at once,
and new requests are still served for a settle window of min(grace / 2, 5 s), the time a
load balancer or a Kubernetes Service takes to stop sending; then the gateway stops
accepting connections and lets requests and streams in flight finish within what is left
of ``--shutdown-grace-period-secs``; then it closes. From the signal on, every response says
``Connection: close``: a balancer keeps a kept-alive connection where it is, so this is how
keep-alive clients move to a ready gateway before the settle window ends. So a rolling
restart loses nothing.

With ``--health-check-port``, the probes have a listener of their own (``api/probes.py``),
which keeps answering through the settle window and the drain (``/readiness`` 503, the
others 200) and closes after the data port, just before the gateway's teardown.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import resource
import signal
import ssl

import uvloop

from shunter.api.probes import ProbeApp
from shunter.compiled import installed_build
from shunter.config import GatewayConfig
from shunter.gateway import Gateway
from shunter.observability.logging import setup_logging
from shunter.supervisor.child import become_child
from shunter.wire.server import HttpServer

log = logging.getLogger("shunter.server")

SETTLE_SECS = 5.0  # the longest settle window (smg's)


async def serve(gateway: Gateway, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then drain in-flight requests and shut down."""
    config = gateway.config
    gateway.start()
    _warn_if_open(config)
    _tune_gc()
    server = HttpServer(gateway.app, limits=config.server_limits)
    probes = await _probe_listener(gateway)
    port = await server.listen(
        config.host, config.port, ssl=_server_tls(config), reuse_port=config.supervised
    )
    log.info(
        "gateway listening",
        extra={
            "host": config.host,
            "port": port,
            "policy": config.policy,
            "workers": len(config.worker_urls),
            "max_connections": server.max_connections,
            "build": installed_build(),
        },
    )
    try:
        await stop.wait()
    finally:
        gateway.draining = True
        server.drain()  # keep-alive clients are told to reconnect (Connection: close)
        grace = config.shutdown_grace_secs
        settle = min(grace / 2, SETTLE_SECS)
        log.info("shutting down", extra={"settle_secs": settle, "grace_secs": grace})
        await asyncio.sleep(settle)  # still serving while the balancer stops sending
        await server.shutdown(grace - settle)
        if probes is not None:  # answered "draining" until now; nothing is left to probe
            await probes.shutdown(0)
        await gateway.close()


async def _probe_listener(gateway: Gateway) -> HttpServer | None:
    """The probes' own listener on ``--health-check-port`` (None: not asked for).

    Plain HTTP, as ``/metrics`` on ``--prometheus-port``, even with ``--tls-cert-path``: a
    probe carries no credential and reveals nothing secret, and a TLS handshake per probe
    is CPU taken from the very process a saturated data port already keeps busy. Under
    ``--workers N`` every child listens there with SO_REUSEPORT, as on the data port: a
    probe is answered by a process that serves requests, with that process's readiness."""
    config = gateway.config
    if config.health_check_port is None:
        return None
    probes = HttpServer(ProbeApp(gateway.app), limits=config.server_limits)
    port = config.health_check_port
    try:
        await probes.listen(config.host, port, reuse_port=config.supervised)
    except OSError as exc:
        log.error(
            "cannot listen on the probes' port (--health-check-port)",
            extra={"host": config.host, "port": port, "error": exc.strerror},
        )
        raise SystemExit(1) from None
    log.info("probes listening", extra={"host": config.host, "port": port})
    return probes


def _warn_if_open(config: GatewayConfig) -> None:
    """Listening beyond loopback with no key lets anyone who can reach the gateway add a
    worker (and so read prompts): say so at start."""
    if config.api_key is None and listens_beyond_loopback(config.host):
        log.warning(
            "listening beyond loopback without --api-key: anyone who can reach this "
            "address can add workers (and so read prompts), flush caches and run "
            "inference; set --api-key, or --host 127.0.0.1",
            extra={"host": config.host},
        )


def listens_beyond_loopback(host: str) -> bool:
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name: assume it resolves beyond this machine


def _server_tls(config: GatewayConfig) -> ssl.SSLContext | None:
    if not config.tls_cert_path or not config.tls_key_path:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert_path, config.tls_key_path)
    return context


def _tune_gc() -> None:
    """Fewer, larger young-generation collections, and start-up objects out of their way.

    The hot path makes few reference cycles, so the default threshold (700 allocations)
    runs the collector thousands of times a second for nothing. Measured on the proxy
    benchmark: ~10 µs of CPU per request (bench/README.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def _main(config: GatewayConfig) -> None:
    gateway = Gateway(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(gateway, stop)


def _raise_open_file_limit() -> None:
    """Each proxied connection needs two descriptors (client and worker): take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit", extra={"soft": soft})


def run_gateway(config: GatewayConfig) -> None:
    if config.worker_index is None:
        setup_logging(config.log_level, config.log_dir, config.log_json)
    else:  # one of --workers N: a log file of its own, its lines tagged with its slot
        setup_logging(
            config.log_level, config.log_dir, config.log_json, name=f"shunter.{config.worker_index}"
        )
        become_child(config.worker_index, config.supervisor_pid)
    _raise_open_file_limit()
    uvloop.run(_main(config))
