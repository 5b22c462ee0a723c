"""`serve(host, port, config_path)`: run the simulator with uvicorn until stopped."""

from __future__ import annotations

from pathlib import Path

import uvicorn

from tierbatch.simulator.app import create_app
from tierbatch.simulator.config import load_sim_config


def serve(host: str, port: int, config_path: Path | None) -> None:
    config = load_sim_config(config_path)
    app = create_app(config)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
