"""Run the simulated worker under uvicorn."""

from __future__ import annotations

import uvicorn

from shunter.sim.app import SimApp
from shunter.sim.config import SimConfig


def run_sim(config: SimConfig, log_level: str = "warning") -> None:
    app = SimApp(config)
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
    )
