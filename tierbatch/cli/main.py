"""The `tierbatch` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from tierbatch.base.config import AppConfig, load_config
from tierbatch.base.errors import ConfigError
from tierbatch.base.logs import LOG_FORMAT_ENV, LogFormat, log_format_from_env
from tierbatch.base.messaging import ALL_QUEUES
from tierbatch.base.settings import Settings
from tierbatch.cli.batches import batches_app

app = typer.Typer(help="tierbatch: route, batch and price LLM calls.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
tenants_app = typer.Typer(help="Manage tenants.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(batches_app, name="batches")  # provider batches (tierbatch/cli/batches.py)

err = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def load_settings_and_config() -> tuple[Settings, AppConfig]:
    """Stop with one clear message when configuration is missing or wrong."""
    try:
        settings = Settings()
        return settings, load_config(settings.config_path)
    except ConfigError as exc:
        fail(f"invalid configuration:\n{exc}")
    except ValidationError as exc:  # pydantic-settings errors on bad environment values (inputs hidden)
        fail("invalid environment:\n" + "\n".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors(include_url=False, include_input=False)))
    except ValueError as exc:
        fail(f"invalid environment: {exc}")


# json lines or text, for this process and (through the environment) its children: Celery's forks,
# uvicorn's workers, the processes of `tierbatch up`
LogFormatOption = Annotated[str | None, typer.Option(
    "--log-format", help="Log lines as json or text (default: TIERBATCH_LOG_FORMAT, else text).",
    show_default=False)]


def chosen_log_format(value: str | None) -> LogFormat:
    """The format asked for, also put in the environment so the children of this process log alike."""
    if value is None:
        return log_format_from_env()
    if value not in ("json", "text"):
        fail(f"--log-format: {value!r} is not json or text")
    os.environ[LOG_FORMAT_ENV] = value
    return log_format_from_env()


@app.command()
def api(host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
        workers: Annotated[int, typer.Option(help="Uvicorn worker processes.")] = 1,
        log_format: LogFormatOption = None) -> None:
    """Run the HTTP API (native and OpenAI-compatible)."""
    import uvicorn

    from tierbatch.base.logs import uvicorn_log_config

    chosen = chosen_log_format(log_format)
    load_settings_and_config()
    if workers > 1:  # /metrics must sum every worker's series, whichever worker answers the scrape
        from tierbatch.metrics.process import ensure_multiprocess_directory

        ensure_multiprocess_directory()
    # uvicorn's access log stays off: the API logs its own access line, with the request id
    uvicorn.run("tierbatch.api.main:create_app", factory=True, host=host, port=port, workers=workers,
                log_level="info", access_log=False, log_config=uvicorn_log_config(chosen))


METRICS_PORT_HELP = ("Serve this process's Prometheus metrics (a prefork worker's children included) on this "
                     "port, for a scraper that cannot read the API's /metrics directory (other hosts). "
                     "Unauthenticated: keep it on an internal interface.")


def start_metrics_server(port: int | None, host: str) -> None:
    """Before the Celery app exists: the multiprocess directory must be chosen before the first series."""
    if port is None:
        return
    from tierbatch.metrics.process import ensure_multiprocess_directory

    directory = ensure_multiprocess_directory()
    from tierbatch.metrics.exposition import serve

    try:
        serve(port, host)
    except OSError as exc:
        fail(f"--metrics-port {port}: {exc}")
    # plain print: a console would wrap a long path
    print(f"metrics on http://{host}:{port}/metrics, summed over the processes writing to {directory}",
          file=sys.stderr, flush=True)


# Celery's broadcasts between workers, which nothing here reads. Its heartbeat is a publish from the event
# loop that retries until the broker answers: while Redis is down the worker would stop acknowledging and
# would not notice the loss.
WORKER_WITHOUT = ("--without-gossip", "--without-mingle", "--without-heartbeat")


@app.command()
def worker(concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 2,
           queues: Annotated[str, typer.Option(help="Comma-separated queues.")] = ",".join(ALL_QUEUES),
           pool: Annotated[str, typer.Option(help="Celery pool: prefork or threads.")] = "prefork",
           loglevel: Annotated[str, typer.Option()] = "INFO", log_format: LogFormatOption = None,
           metrics_port: Annotated[int | None, typer.Option(help=METRICS_PORT_HELP)] = None,
           metrics_host: Annotated[str, typer.Option(help="Interface of --metrics-port.")] = "127.0.0.1") -> None:
    """Run a Celery worker on the dispatch, immediate, batch, webhooks and background queues."""
    chosen_log_format(log_format)  # the worker's setup_logging handler reads it from the environment
    settings, config = load_settings_and_config()
    start_metrics_server(metrics_port, metrics_host)
    from tierbatch.worker.app import create_celery_app

    celery_app = create_celery_app(settings, config)
    celery_app.worker_main(["worker", "-Q", queues, "-c", str(concurrency), "-P", pool, "--loglevel", loglevel,
                            *WORKER_WITHOUT])


@app.command()
def beat(schedule: Annotated[Path, typer.Option(help="Beat schedule state file.")] = Path(
        ".tierbatch/celerybeat-schedule"),
         loglevel: Annotated[str, typer.Option()] = "INFO", log_format: LogFormatOption = None,
         metrics_port: Annotated[int | None, typer.Option(help=METRICS_PORT_HELP)] = None,
         metrics_host: Annotated[str, typer.Option(help="Interface of --metrics-port.")] = "127.0.0.1") -> None:
    """Run the periodic scheduler (reconciler, batch assembly and polling)."""
    chosen_log_format(log_format)
    settings, config = load_settings_and_config()
    start_metrics_server(metrics_port, metrics_host)
    from tierbatch.worker.app import create_celery_app
    from tierbatch.worker.beat import CountingScheduler

    schedule.parent.mkdir(parents=True, exist_ok=True)
    celery_app = create_celery_app(settings, config)
    celery_app.Beat(schedule=str(schedule), loglevel=loglevel, scheduler=CountingScheduler).run()


def wait_for_database(database_url: str, timeout: float) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(database_url, poolclass=sqlalchemy.pool.NullPool)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with engine.connect() as connection:
                    connection.execute(sqlalchemy.text("SELECT 1"))
                return
            except sqlalchemy.exc.OperationalError as exc:
                if time.monotonic() > deadline:
                    fail(f"database not reachable after {timeout:.0f}s: {exc.orig}")
                time.sleep(0.5)
    finally:
        engine.dispose()


@app.command()
def migrate(wait: Annotated[float, typer.Option(help="Seconds to wait for the database.")] = 30.0) -> None:
    """Wait for the database, then apply migrations up to head."""
    from tierbatch.migrations.runner import upgrade_to_head

    settings, _ = load_settings_and_config()
    wait_for_database(settings.database_url, wait)
    upgrade_to_head(settings.database_url, settings.secret_key)
    err.print("database migrated to head")


@app.command()
def simulator(host: Annotated[str, typer.Option()] = "127.0.0.1",
              port: Annotated[int, typer.Option()] = 8100,
              config: Annotated[Path | None, typer.Option(help="Simulator TOML config.")] = None,
              log_format: LogFormatOption = None) -> None:
    """Run the OpenAI-compatible provider simulator."""
    from tierbatch.simulator.server import serve

    serve(host, port, config, chosen_log_format(log_format))


@tenants_app.command("create")
def tenants_create(name: str,
                   budget: Annotated[str | None, typer.Option(help="Monthly budget in USD.")] = None,
                   as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False
                   ) -> None:
    """Create a tenant and print its API key (shown once)."""
    from tierbatch.db.engine import make_engine, make_session_factory
    from tierbatch.tenants.store import create_tenant

    monthly_budget = None
    if budget is not None:
        try:
            monthly_budget = Decimal(budget)
        except InvalidOperation:
            fail(f"--budget: {budget!r} is not a number")
        if monthly_budget < 0:
            fail("--budget: must not be negative")
    settings, config = load_settings_and_config()
    engine = make_engine(settings.database_url, pgbouncer=config.database.pgbouncer)
    try:
        with make_session_factory(engine).begin() as session:
            tenant = create_tenant(session, name, monthly_budget, box=settings.secret_box())
    finally:
        engine.dispose()
    if as_json:
        sys.stdout.write(json.dumps({"id": str(tenant.id), "name": tenant.name, "api_key": tenant.api_key,
                                     "webhook_secret": tenant.webhook_secret}) + "\n")
    else:
        secret = (f"[green]{tenant.webhook_secret}[/] (both shown once)" if tenant.webhook_secret
                  else "none (TIERBATCH_SECRET_KEY is not set: webhooks are off)")
        Console().print(f"tenant [bold]{tenant.name}[/] ({tenant.id})\napi key: [green]{tenant.api_key}[/]"
                        f"\nwebhook secret: {secret}")


@app.command("secret-key")
def secret_key() -> None:
    """Print a new key for TIERBATCH_SECRET_KEY (it encrypts the webhook secrets at rest)."""
    from tierbatch.base.secretbox import generate_key

    sys.stdout.write(generate_key() + "\n")


@app.command()
def up(directory: Annotated[Path, typer.Option("--dir", help="State directory (embedded data, logs, keys).")]
       = Path(".tierbatch"),
       api_port: Annotated[int, typer.Option(help="API port.")] = 8000,
       simulator_port: Annotated[int, typer.Option(help="Simulator port.")] = 8100,
       concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 2,
       simulator: Annotated[bool, typer.Option("--simulator",
                                               help="Start the simulator even when TIERBATCH_CONFIG is set.")]
       = False,
       open_model: Annotated[bool, typer.Option("--open-model", help="Serve the light tier with a real open model "
                                                                     "(llama-server + SmolLM2-135M).")] = False,
       log_format: LogFormatOption = None) -> None:
    """All-in-one local stack: embedded Postgres/Redis, simulator, migrations, API, worker, beat."""
    from tierbatch.cli.stack.up import run_up

    chosen_log_format(log_format)  # the children inherit it through the environment
    raise typer.Exit(run_up(directory, api_port, simulator_port, concurrency, simulator, open_model))


@app.command()
def demo(directory: Annotated[Path, typer.Option("--dir", help="State directory of the demo stack.")]
         = Path(".tierbatch/demo"),
         api_port: Annotated[int, typer.Option(help="API port (0: a free one).")] = 0,
         simulator_port: Annotated[int, typer.Option(help="Simulator port (0: a free one).")] = 0,
         concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 2,
         simulator: Annotated[bool, typer.Option("--simulator",
                                                 help="Start the simulator even when TIERBATCH_CONFIG is set.")]
         = False,
         wait: Annotated[float, typer.Option(help="Seconds to wait for the tasks.")] = 60.0,
         batch_wait: Annotated[float, typer.Option(
             help="Stop waiting after this when no non-urgent task has reached a provider batch.")] = 15.0,
         as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
         open_model: Annotated[bool, typer.Option("--open-model", help="Serve the light tier with a real open "
                                                                       "model (llama-server + SmolLM2-135M).")]
         = False) -> None:
    """Start the stack, run a mixed sample workload, print the savings report, stop."""
    from tierbatch.cli.demo.run import run_demo

    raise typer.Exit(run_demo(directory, api_port or None, simulator_port or None, concurrency, simulator,
                              wait, batch_wait, as_json, open_model))


# --- bulk jobs: thin wrappers over tierbatch/cli/jobs.py ----------------------------------------------------
jobs_app = typer.Typer(help="Bulk jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

ApiUrlOption = Annotated[str, typer.Option("--api-url", envvar="TIERBATCH_API_URL", help="The tierbatch API.")]
ApiKeyOption = Annotated[str | None, typer.Option("--api-key", envvar="TIERBATCH_API_KEY",
                                                  help="Tenant API key.", show_default=False)]


@app.command()
def submit(file: Annotated[Path, typer.Argument(help="Items: FILE.jsonl or FILE.csv.", show_default=False)],
           name: Annotated[str | None, typer.Option(help="Job name; the same name adds to that job.")] = None,
           task_type: Annotated[str | None, typer.Option(help="Task type (default: classification with "
                                                              "--labels, else general).")] = None,
           tier: Annotated[str | None, typer.Option(help="light, complex or auto.")] = None,
           urgent: Annotated[bool, typer.Option("--urgent", help="Call immediately, not by batch.")] = False,
           labels: Annotated[str | None, typer.Option(help="Classification labels: a,b,c.")] = None,
           system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
           template: Annotated[str | None, typer.Option(help="User message with {text}.")] = None,
           id_field: Annotated[str, typer.Option(help="Field or column of the item id.")] = "id",
           text_field: Annotated[str, typer.Option(help="Field or column of the item text.")] = "text",
           file_format: Annotated[str, typer.Option("--format", help="auto, jsonl or csv.")] = "auto",
           chunk: Annotated[int, typer.Option(help="Items per request (each streamed as NDJSON and stored "
                                                   "whole or not at all).")] = 1_000_000,
           wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for every task to finish.")] = True,
           poll: Annotated[float, typer.Option(help="Seconds between progress polls.")] = 1.0,
           as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
           api_url: ApiUrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """Submit a JSONL or CSV file of items as one bulk job, with progress bars."""
    from tierbatch.cli.jobs import SubmitOptions, guarded, run_submit

    if file_format not in ("auto", "jsonl", "csv"):
        fail(f"--format: {file_format!r} is not auto, jsonl or csv")
    options = SubmitOptions(file, name, task_type, tier, urgent, labels, system, template, id_field, text_field,
                            file_format, chunk, wait, poll, as_json, api_url, api_key)
    guarded(lambda: run_submit(options))


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument(help="Job id.", show_default=False)],
              as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
              api_url: ApiUrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """A job's counts per status, cost, baseline and savings."""
    from tierbatch.cli.jobs import guarded, run_show

    guarded(lambda: run_show(job_id, as_json, api_url, api_key))
# --- end bulk jobs -----------------------------------------------------------------------------------


# --- costs: thin wrapper over tierbatch/cli/costs.py -----------------------------------------------------------
@app.command()
def costs(by: Annotated[str, typer.Option("--by", help="Group by any of day, hour, model, provider, tier, "
                                                       "task_type, mode, job, tenant (comma-separated).")] = "day",
          since: Annotated[str | None, typer.Option(help="Start: 7d, 24h, a date or RFC 3339.")] = None,
          until: Annotated[str | None, typer.Option(help="End (exclusive; a date includes that day).")] = None,
          task_type: Annotated[str | None, typer.Option(help="Only this task type.")] = None,
          job_id: Annotated[str | None, typer.Option(help="Only this job.")] = None,
          mode: Annotated[str | None, typer.Option(help="Only immediate, batch, shadow or cache.")] = None,
          tenant_id: Annotated[str | None, typer.Option(help="Only this tenant (admin token).")] = None,
          report: Annotated[bool, typer.Option("--report", help="Token report per task type: input vs output "
                                                                "cost, cached share, verbose answers.")] = False,
          limit: Annotated[int, typer.Option(help="At most this many rows.")] = 10_000,
          as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
          as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV rows.")] = False,
          api_url: ApiUrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """Spend, baseline and savings grouped as asked, with totals (tenant key or admin token)."""
    from tierbatch.cli.costs import CostsOptions, run_costs
    from tierbatch.cli.jobs import guarded

    options = CostsOptions(by, since, until, task_type, job_id, mode, tenant_id, as_json, as_csv, report, limit,
                           api_url, api_key)
    guarded(lambda: run_costs(options))
# --- end costs ---------------------------------------------------------------------------------------


# --- quality-aware routing: thin wrapper over tierbatch/cli/quality.py -------------------------------------------
@app.command()
def quality(as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
            api_url: ApiUrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """Per task type: tier, agreement, samples, promotions and demotions; latency per model."""
    from tierbatch.cli.jobs import guarded
    from tierbatch.cli.quality import run_quality

    guarded(lambda: run_quality(api_url, api_key, as_json))
# --- end quality-aware routing -----------------------------------------------------------------------


# --- audit of existing call logs: thin wrapper over tierbatch/cli/audit.py ---------------------------------------
@app.command()
def audit(logfile: Annotated[Path, typer.Argument(help="A call log (JSONL of {request, response}), or a Batch "
                                                        "API input file with --output.", show_default=False)],
          output: Annotated[Path | None, typer.Option("--output", help="The Batch API output file of the input "
                                                                       "file LOGFILE (joined by custom_id).")]
          = None,
          config: Annotated[Path | None, typer.Option("--config", help="Config TOML (default: TIERBATCH_CONFIG, "
                                                                       "else the embedded default).")] = None,
          non_urgent_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of light calls that "
                                                                                  "could wait for a batch.")]
          = 0.5,
          days: Annotated[float | None, typer.Option(help="Days the log covers (default: from the responses' "
                                                          "`created`).")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """What logged calls cost, routed to the light model and batched, and the monthly savings; offline."""
    from tierbatch.cli.audit import AuditCliOptions, run_audit
    from tierbatch.cli.jobs import guarded

    guarded(lambda: run_audit(AuditCliOptions(logfile, output, config, non_urgent_share, days, as_json)))
# --- end audit ---------------------------------------------------------------------------------------


# --- scheduled classification: thin wrappers over tierbatch/cli/schedules.py ---------------------------------
schedules_app = typer.Typer(help="Scheduled bulk classification.", no_args_is_help=True)
app.add_typer(schedules_app, name="schedules")


@schedules_app.command("add")
def schedules_add(
        name: Annotated[str | None, typer.Argument(help="Schedule name (or in --file).", show_default=False)] = None,
        cron: Annotated[str | None, typer.Option(help="Cron expression, e.g. '0 2 * * *'.")] = None,
        timezone: Annotated[str, typer.Option(help="IANA time zone of the cron expression.")] = "UTC",
        source: Annotated[str | None, typer.Option(help="File source: a path or glob (CSV or JSONL), relative "
                                                        "to the tenant's files directory on the server.")] = None,
        source_format: Annotated[str, typer.Option("--format", help="auto, csv or jsonl.")] = "auto",
        id_field: Annotated[str, typer.Option(help="Field or column of the item id.")] = "id",
        text_field: Annotated[str, typer.Option(help="Field or column of the item text.")] = "text",
        labels: Annotated[str | None, typer.Option(help="Classification labels: a,b,c.")] = None,
        task_type: Annotated[str | None, typer.Option(help="Task type (default classification).")] = None,
        tier: Annotated[str | None, typer.Option(help="light, complex or auto.")] = None,
        urgent: Annotated[bool, typer.Option("--urgent", help="Call immediately, not by batch.")] = False,
        system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
        template: Annotated[str | None, typer.Option(help="User message with {text}.")] = None,
        sink: Annotated[str | None, typer.Option(help="Write results to this path, relative to the tenant's "
                                                      "files directory ({run_id} …; .jsonl/.csv).")] = None,
        webhook_url: Annotated[str | None, typer.Option(help="POST a signed summary when a run finishes.")] = None,
        disabled: Annotated[bool, typer.Option("--disabled", help="Create it disabled.")] = False,
        body_file: Annotated[Path | None, typer.Option("--file", help="A whole schedule as JSON (e.g. a SQL "
                                                                       "source); options override it.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the schedule as JSON.")] = False,
        api_url: ApiUrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """Create a schedule; prints its webhook signing secret once."""
    from tierbatch.cli.jobs import guarded
    from tierbatch.cli.schedules import AddOptions, run_add

    options = AddOptions(name, cron, timezone, source, source_format, id_field, text_field, labels, task_type, tier,
                         urgent, system, template, sink, webhook_url, disabled, body_file, as_json)
    guarded(lambda: run_add(options, api_url, api_key))


@schedules_app.command("list")
def schedules_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
                   api_url: ApiUrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """The tenant's schedules with their next fire time."""
    from tierbatch.cli.jobs import guarded
    from tierbatch.cli.schedules import run_list

    guarded(lambda: run_list(as_json, api_url, api_key))


@schedules_app.command("run")
def schedules_run(schedule: Annotated[str, typer.Argument(help="Schedule name or id.", show_default=False)],
                  wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the run to its end.")] = True,
                  poll: Annotated[float, typer.Option(help="Seconds between progress polls.")] = 1.0,
                  timeout: Annotated[float, typer.Option(help="Give up waiting after this many seconds.")] = 3600.0,
                  as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON.")] = False,
                  api_url: ApiUrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """Run a schedule now (also a disabled one)."""
    from tierbatch.cli.jobs import guarded
    from tierbatch.cli.schedules import run_now

    guarded(lambda: run_now(schedule, wait, poll, timeout, as_json, api_url, api_key))


@schedules_app.command("disable")
def schedules_disable(schedule: Annotated[str, typer.Argument(help="Schedule name or id.", show_default=False)],
                      as_json: Annotated[bool, typer.Option("--json", help="Print the schedule as JSON.")] = False,
                      api_url: ApiUrlOption = "http://127.0.0.1:8000", api_key: ApiKeyOption = None) -> None:
    """Stop a schedule from firing (runs in progress finish)."""
    from tierbatch.cli.jobs import guarded
    from tierbatch.cli.schedules import run_disable

    guarded(lambda: run_disable(schedule, as_json, api_url, api_key))
# --- end scheduled classification --------------------------------------------------------------------


def main() -> None:
    app()
