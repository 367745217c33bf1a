"""Run the simulated worker under uvicorn."""

from __future__ import annotations

import ssl

import uvicorn

from shunter.sim.app import SimApp
from shunter.sim.config import SimConfig


def run_sim(config: SimConfig, log_level: str = "warning") -> None:
    app = SimApp(config)
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
