"""Run the gateway: our HTTP/1.1 server (server/http11.py) on uvloop, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import ssl

import uvloop

from shunter.config import GatewayConfig
from shunter.observability.logging import setup_logging
from shunter.server.app import GatewayApp
from shunter.server.http11 import HttpServer
from shunter.server.state import GatewayState

log = logging.getLogger("shunter.server")


def build_app(config: GatewayConfig) -> GatewayApp:
    return GatewayApp(GatewayState(config.validate()))


async def serve(app: GatewayApp, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then drain in-flight requests and shut down."""
    config = app.config
    app.startup()
    _tune_gc()
    server = HttpServer(app, limits=config.server_limits)
    port = await server.listen(config.host, config.port, ssl=_server_tls(config))
    log.info(
        "gateway listening",
        extra={
            "host": config.host,
            "port": port,
            "policy": config.policy,
            "workers": len(config.worker_urls),
            "max_connections": server.max_connections,
        },
    )
    try:
        await stop.wait()
    finally:
        log.info("shutting down", extra={"drain_secs": config.shutdown_drain_secs})
        await server.shutdown(config.shutdown_drain_secs)
        await app.shutdown()


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
    app = build_app(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(app, stop)


def _raise_open_file_limit() -> None:
    """Each proxied connection needs two descriptors (client and worker): take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit", extra={"soft": soft})


def run_gateway(config: GatewayConfig) -> None:
    setup_logging(config.log_level, config.log_dir, config.log_json)
    _raise_open_file_limit()
    uvloop.run(_main(config))
