"""Run the gateway under uvicorn (uvloop + httptools, no framework)."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from shunter.config import GatewayConfig
from shunter.observability.logging import setup_logging
from shunter.server.app import GatewayApp
from shunter.server.state import GatewayState

log = logging.getLogger("shunter.server")


def build_app(config: GatewayConfig) -> GatewayApp:
    return GatewayApp(GatewayState(config.validate()))


def uvicorn_config(app: Any, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,
        date_header=False,
        timeout_keep_alive=75,
        backlog=4096,
    )


def run_gateway(config: GatewayConfig) -> None:
    setup_logging(config.log_level, config.log_dir, config.log_json)
    app = build_app(config)
    log.info(
        "gateway starting",
        extra={
            "host": config.host,
            "port": config.port,
            "policy": config.policy,
            "workers": len(config.worker_urls),
        },
    )
    uvicorn.Server(uvicorn_config(app, config.host, config.port)).run()
