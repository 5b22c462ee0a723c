"""`python -m simulator --host 127.0.0.1 --port 8100 [--config sim.toml]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tierbatch.simulator.config import SimConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulator",
                                     description="OpenAI-compatible provider simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--config", type=Path, default=None, help="simulator TOML file")
    args = parser.parse_args(argv)
    from tierbatch.simulator.server import serve

    try:
        serve(args.host, args.port, args.config)
    except SimConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
