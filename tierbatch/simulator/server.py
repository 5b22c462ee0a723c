"""`serve(host, port, config_path)`: run the simulator with uvicorn until stopped."""

from __future__ import annotations

from pathlib import Path

import uvicorn

from tierbatch.base.logs import LogFormat, log_format_from_env, uvicorn_log_config
from tierbatch.simulator.app import create_app
from tierbatch.simulator.config import load_sim_config


def serve(host: str, port: int, config_path: Path | None, log_format: LogFormat | None = None) -> None:
    config = load_sim_config(config_path)
    app = create_app(config)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                log_config=uvicorn_log_config(log_format or log_format_from_env(), "WARNING"))
