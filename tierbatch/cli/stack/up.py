"""`tierbatch up`: run the local stack in the foreground until Ctrl-C, SIGTERM or a part dies."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tierbatch.cli.stack.local_stack import LocalStack, StackError, StackInfo
from tierbatch.cli.stack.signals import sigterm_as_interrupt


def print_info(console: Console, info: StackInfo) -> None:
    rows = [
        ("API", info.api_url),
        ("OpenAI base URL", info.openai_base_url),
        ("simulator", info.simulator_url or "(not started: TIERBATCH_CONFIG names the providers)"),
        *([("open model", f"{info.open_model_url} (llama-server, SmolLM2-135M: the light tier)")]
          if info.open_model_url else []),
        ("dev API key", f"[green]{info.dev_api_key}[/]"),
        ("admin token", info.admin_token),
        ("database", ("embedded PostgreSQL " if info.embedded_database else "") + info.database_url),
        ("redis", ("embedded Redis " if info.embedded_redis else "") + info.redis_url),
        ("config", str(info.config_path) if info.config_path else "(embedded default)"),
        ("logs", str(info.logs_dir)),
    ]
    width = max(len(label) for label, _ in rows)
    console.print("[bold green]tierbatch is up[/]")
    for label, value in rows:
        console.print(f"  [bold]{label.ljust(width)}[/]  {value}", highlight=False, soft_wrap=True)
    console.print(f"The dev key is kept in {info.data_dir / 'dev_api_key'}. Press Ctrl-C to stop everything.",
                  soft_wrap=True)


def run_up(data_dir: Path, api_port: int, simulator_port: int, concurrency: int, simulator: bool,
           open_model: bool = False) -> int:
    """Run the stack until Ctrl-C / SIGTERM (exit 0) or until a part dies (exit 1)."""
    out = Console()
    err = Console(stderr=True)
    stack = LocalStack(data_dir, api_port=api_port, simulator_port=simulator_port, concurrency=concurrency,
                       simulator=simulator, console=err, open_model=open_model)
    try:
        with sigterm_as_interrupt(), stack as info:
            print_info(out, info)
            while True:
                dead = stack.dead()
                if dead:
                    err.print("[bold red]error:[/] stopped unexpectedly: " + escape("; ".join(dead)), highlight=False)
                    return 1
                time.sleep(0.5)
    except KeyboardInterrupt:
        err.print("stopped")
        return 0
    except StackError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 1
