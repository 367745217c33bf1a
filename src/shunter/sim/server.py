"""Run the simulated worker: HTTP under uvicorn, or gRPC (with HTTP beside it)."""

from __future__ import annotations

import asyncio
import ssl

import uvicorn

from shunter.sim.app import SimApp
from shunter.sim.config import SimConfig


def run_sim(config: SimConfig, log_level: str = "warning") -> None:
    app = SimApp(config)
    if config.grpc:
        asyncio.run(_serve_grpc(app, config, log_level))
        return
    tls: dict[str, object] = {}
    if config.tls_cert_path:
        tls = {"ssl_certfile": config.tls_cert_path, "ssl_keyfile": config.tls_key_path}
        if config.tls_client_ca_path:  # require client certificates signed by this CA
            tls |= {"ssl_ca_certs": config.tls_client_ca_path, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        timeout_keep_alive=75,
        **tls,  # type: ignore[arg-type]
    )


async def _serve_grpc(app: SimApp, config: SimConfig, log_level: str) -> None:
    """The gRPC scheduler on ``port``; the HTTP API on ``http_port`` if given. Both share
    one engine, so faults set over HTTP (/sim/faults) act on gRPC requests too, and one PD
    role (a prefill's bootstrap server is HTTP whichever API the sim speaks)."""
    from shunter.sim.grpc_server import serve_grpc

    await app.start()  # a prefill's bootstrap server, before the first request can come
    server = await serve_grpc(config, app.engine, config.port, app.recent, app.pd)
    try:
        if config.http_port is None:
            await server.wait_for_termination()
            return
        http = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.http_port,
                lifespan="on",
                access_log=False,
                log_level=log_level,
            )
        )
        await http.serve()
    finally:
        await server.stop(grace=1)
        await app.stop()
