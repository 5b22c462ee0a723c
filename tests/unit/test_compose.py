"""docker-compose.yml, Dockerfile and the compose config are consistent with each other and with the CLI.

No Docker engine here: the YAML is parsed and every `tierbatch …` command is checked against the real CLI
(`tierbatch.cli.main.app`, a typer.Typer, introspected as a click command). Where the `docker compose` CLI plugin is
installed (it needs no engine for `config`), the file is also resolved by compose itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_CONFIG = REPO_ROOT / "deploy" / "tierbatch.compose.toml"

INFRA = {"postgres", "redis"}
APP_SERVICES = {"migrate", "api", "worker", "beat", "simulator"}
# the processes that hold the database, the broker and the secrets; the simulator is only a provider stand-in
TRUSTED = APP_SERVICES - {"simulator"}
ONE_SHOT = {"migrate"}
# `docker compose --profile observability up`: metrics and dashboards, off by default
OBSERVABILITY = {"prometheus", "grafana"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# what an operator must set: compose refuses to start without each, and none has a default
SECRETS = ("TIERBATCH_ADMIN_TOKEN", "TIERBATCH_SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD")
OPERATOR_ENV = {
    "TIERBATCH_ADMIN_TOKEN": "a" * 16 + "b" * 16 + "c" * 8,
    "TIERBATCH_SECRET_KEY": "secret-key-for-the-compose-test",
    "POSTGRES_PASSWORD": "pgpass1234",
    "REDIS_PASSWORD": "redispass5678",
}
APP_ENV = {
    "DATABASE_URL": "postgresql+psycopg://tierbatch:pgpass1234@postgres:5432/tierbatch",
    "REDIS_URL": "redis://:redispass5678@redis:6379/0",
    "TIERBATCH_CONFIG": "/app/tierbatch.toml",
    "TIERBATCH_ADMIN_TOKEN": OPERATOR_ENV["TIERBATCH_ADMIN_TOKEN"],
    "TIERBATCH_SECRET_KEY": OPERATOR_ENV["TIERBATCH_SECRET_KEY"],
}
_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data["services"]


def _argv(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list), value
    return [str(item) for item in value]


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {target: condition}; the short list form means service_started."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return {str(name): "service_started" for name in raw}
    return {str(name): (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment with the operator's variables put in (OPERATOR_ENV)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = dict(str(item).split("=", 1) for item in raw)
    else:
        pairs = {str(key): str(value) for key, value in raw.items()}
    return {key: _interpolate(value) for key, value in pairs.items()}


def _interpolate(value: str) -> str:
    """Compose's `${NAME}` / `${NAME:?message}` substitution, for the variables the tests set."""
    return _REFERENCE.sub(lambda match: OPERATOR_ENV[match.group("name")], value)


def _has_healthcheck(service: dict[str, Any]) -> bool:
    check: dict[str, Any] = service.get("healthcheck") or {}
    return not check.get("disable", False) and bool(check.get("test"))


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def test_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == INFRA | APP_SERVICES | OBSERVABILITY
    assert str(services["postgres"]["image"]).split(":")[0] == "postgres"
    assert str(services["postgres"]["image"]).split(":")[1].startswith("16")
    assert str(services["redis"]["image"]).split(":")[0] == "redis"
    assert str(services["redis"]["image"]).split(":")[1].startswith("7")


def test_depends_on_names_defined_services_with_valid_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, condition in _depends_on(service).items():
            assert target in services, f"{name} depends on undefined service {target!r}"
            assert target != name, f"{name} depends on itself"
            assert condition in CONDITIONS, f"{name} -> {target}: invalid condition {condition!r}"


def test_dependency_graph_has_no_cycle(services: dict[str, dict[str, Any]]) -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for target in _depends_on(services[name]):
            visit(target, (*path, name))
        done.add(name)

    for name in services:
        visit(name, ())


def test_conditions_match_what_the_target_offers(services: dict[str, dict[str, Any]]) -> None:
    """service_healthy needs a healthcheck; one-shot services are waited for until they complete;
    a long-running service without a healthcheck is only ever depended on with service_started."""
    for name, service in services.items():
        for target, condition in _depends_on(service).items():
            if target in ONE_SHOT:
                assert condition == "service_completed_successfully", f"{name} -> {target}: {condition}"
            elif condition == "service_completed_successfully":
                pytest.fail(f"{name} waits for long-running {target} to complete")
            if condition == "service_healthy":
                assert _has_healthcheck(services[target]), f"{name} -> {target}: target has no healthcheck"
    for name in ONE_SHOT:
        assert services[name].get("restart", "no") == "no", f"one-shot {name} must not restart"
    for name, service in services.items():
        if name not in ONE_SHOT:
            assert service.get("restart") in {"unless-stopped", "always"}, f"{name} has no restart policy"


def test_app_services_wait_for_migrations_and_brokers(services: dict[str, dict[str, Any]]) -> None:
    assert _depends_on(services["migrate"]).get("postgres") == "service_healthy"
    for name in ("api", "worker", "beat"):
        deps = _depends_on(services[name])
        assert deps.get("migrate") == "service_completed_successfully", name
        assert deps.get("redis") == "service_healthy", name
        assert deps.get("postgres") == "service_healthy", name


def test_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    assert "pg_isready" in _healthcheck_text(services["postgres"])
    assert "redis-cli ping" in _healthcheck_text(services["redis"])
    for name, path in (("api", "/healthz"), ("simulator", "/v1/models")):
        argv = _argv(services[name]["command"])
        port = argv[argv.index("--port") + 1]
        assert f"127.0.0.1:{port}{path}" in _healthcheck_text(services[name]), name


def test_redis_is_durable_and_never_evicts(services: dict[str, dict[str, Any]]) -> None:
    argv = _argv(services["redis"]["command"])
    assert argv[0] == "redis-server"
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert options.get("--appendonly") == "yes"
    assert options.get("--maxmemory-policy") == "noeviction"
    assert any(str(volume).endswith(":/data") for volume in services["redis"].get("volumes", []))


def test_app_services_share_image_environment_and_config(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        assert services[name].get("build"), f"{name} is not built from the Dockerfile"
    for name in TRUSTED:
        service = services[name]
        env = _environment(service)
        for key, value in APP_ENV.items():
            assert env.get(key) == value, f"{name}: {key}"
        mounts = [str(volume).split(":") for volume in service.get("volumes", [])]
        sources = {mount[1]: mount[0] for mount in mounts if len(mount) >= 2}
        assert "/app/tierbatch.toml" in sources, f"{name} does not mount the config"
        assert (REPO_ROOT / sources["/app/tierbatch.toml"]).resolve() == COMPOSE_CONFIG.resolve()


def test_no_secret_has_a_default_and_each_is_required() -> None:
    """Every secret is `${NAME:?…}` (compose stops when it is unset or empty) or a plain `${NAME}` beside such a
    reference; a `:-`/`-` default (a well-known value) or a literal secret is nowhere in the file."""
    text = COMPOSE_FILE.read_text()
    references = [match.groupdict() for match in _REFERENCE.finditer(text)]
    for secret in SECRETS:
        mine = [ref for ref in references if ref["name"] == secret]
        assert any(ref["op"] == ":?" and ref["arg"].strip() for ref in mine), f"{secret} is not required"
        assert all(ref["op"] in (None, ":?") for ref in mine), f"{secret} has a default: {mine}"
    assert "change-me" not in text
    # no variable at all gets a fallback value in this file
    assert not [ref for ref in references if ref["op"] in (":-", "-")], "a variable with a default"


def test_redis_requires_the_password_every_url_carries(services: dict[str, dict[str, Any]]) -> None:
    argv = [_interpolate(arg) for arg in _argv(services["redis"]["command"])]
    assert "--requirepass" in argv
    password = argv[argv.index("--requirepass") + 1]
    assert password == OPERATOR_ENV["REDIS_PASSWORD"]
    # the healthcheck's redis-cli authenticates through REDISCLI_AUTH
    assert _environment(services["redis"]).get("REDISCLI_AUTH") == password
    for name in TRUSTED:
        url = urlsplit(_environment(services[name])["REDIS_URL"])
        assert (url.hostname, url.password) == ("redis", password), name
    postgres_password = _environment(services["postgres"])["POSTGRES_PASSWORD"]
    assert postgres_password == OPERATOR_ENV["POSTGRES_PASSWORD"]
    for name in TRUSTED:
        assert urlsplit(_environment(services[name])["DATABASE_URL"]).password == postgres_password, name


def test_only_the_api_is_published_on_the_host(services: dict[str, dict[str, Any]]) -> None:
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"api", "grafana"}
    # the dashboards on the host's loopback only
    assert [str(port) for port in services["grafana"]["ports"]] == ["127.0.0.1:3000:3000"]
    assert "ports" not in services["simulator"]
    assert [str(port) for port in services["simulator"].get("expose", [])] == ["8100"]


def test_the_simulator_gets_no_secret_and_no_database(services: dict[str, dict[str, Any]]) -> None:
    env = _environment(services["simulator"])
    assert not set(env) & {*SECRETS, "DATABASE_URL", "REDIS_URL"}, env
    assert not any(value in " ".join(env.values()) for value in OPERATOR_ENV.values())


def test_the_worker_consumes_every_queue_the_code_routes_to(services: dict[str, dict[str, Any]]) -> None:
    from tierbatch.base.messaging import ALL_QUEUES

    argv = _argv(services["worker"]["command"])
    assert "--queues" in argv, "the worker names its queues"
    queues = argv[argv.index("--queues") + 1].split(",")
    assert len(queues) == len(set(queues))
    assert set(queues) == {*ALL_QUEUES, "webhooks"}


def _compose_cli() -> list[str] | None:
    """`docker compose` (the CLI plugin) or a standalone v2 `docker-compose`, whichever is installed."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for argv in candidates:
        probe = subprocess.run([*argv, "version", "--short"], capture_output=True, text=True, timeout=30,
                               check=False)
        if probe.returncode == 0 and probe.stdout.strip()[:1] >= "2":
            return argv
    return None


def _compose_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = _compose_cli()
    if argv is None:
        pytest.skip("the docker compose CLI plugin (v2) is not installed")
    empty = tmp_path / "empty.env"  # an operator's `.env` in the checkout must not leak into the test
    empty.write_text("")
    base = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}
    return subprocess.run([*argv, "--file", str(COMPOSE_FILE), "--project-directory", str(REPO_ROOT),
                           "--env-file", str(empty), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**base, "DOCKER_CONFIG": str(tmp_path / "docker"), **env})


def test_docker_compose_resolves_the_file_with_the_operator_variables(tmp_path: Path) -> None:
    result = _compose_config(tmp_path, OPERATOR_ENV)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)["services"]
    for name in TRUSTED:
        env = resolved[name]["environment"]
        assert {key: env.get(key) for key in APP_ENV} == APP_ENV, name
    assert "--requirepass" in resolved["redis"]["command"]
    assert OPERATOR_ENV["REDIS_PASSWORD"] in resolved["redis"]["command"]
    assert not resolved["simulator"].get("ports")
    assert [name for name, service in resolved.items() if service.get("ports")] == ["api"]
    assert not set(resolved["simulator"].get("environment") or {}) & set(SECRETS)


@pytest.mark.parametrize("missing", SECRETS)
@pytest.mark.parametrize("how", ["unset", "empty"])
def test_docker_compose_refuses_to_run_without_each_secret(tmp_path: Path, missing: str, how: str) -> None:
    env = {key: value for key, value in OPERATOR_ENV.items() if key != missing}
    if how == "empty":
        env[missing] = ""
    result = _compose_config(tmp_path, env)
    assert result.returncode != 0
    assert missing in result.stderr, result.stderr
    assert not result.stdout.strip()


def test_compose_config_is_valid_and_points_at_the_simulator() -> None:
    from tierbatch.base.config import load_config

    config = load_config(COMPOSE_CONFIG, environ={})
    for ref in config.configured_models():
        url = urlsplit(config.provider(ref.provider).base_url)
        assert (url.hostname, url.port, url.path) == ("simulator", 8100, "/v1")


def test_dockerfile_builds_the_package_on_python_311_slim() -> None:
    text = DOCKERFILE.read_text()
    froms = [line.split()[1] for line in text.splitlines() if line.upper().startswith("FROM ")]
    assert froms and all(image == "python:3.11-slim" for image in froms)
    assert "pip install" in text
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".tierbatch" in ignored
    assert ".env" in ignored  # the operator's secrets stay out of the build context


def test_the_image_user_can_write_the_beat_schedule() -> None:
    """beat writes its state under the working directory; the image runs as an unprivileged user, so that
    directory must be created and handed to that user before USER."""
    beat, _ = _resolve(_cli(), ["beat"])
    schedule = next(param.default for param in beat.params if param.name == "schedule")
    text = DOCKERFILE.read_text()
    workdir = [line.split()[1] for line in text.splitlines() if line.upper().startswith("WORKDIR ")][-1]
    user = [line.split()[1] for line in text.splitlines() if line.upper().startswith("USER ")][-1]
    directory = str(Path(workdir) / Path(schedule).parent)
    before_user = text[:text.rindex("USER ")]
    assert f"mkdir -p {directory}" in before_user
    assert f"chown {user}:{user} {directory}" in before_user


# --------------------------------------------------------------------------------------------
# every `tierbatch …` command exists in the real CLI, with the flags used


def _cli() -> Any:
    from tierbatch.cli.main import app

    return typer.main.get_command(app)


# typer >= 0.2x vendors click (`typer._click`): its commands are not `click.Command` instances, so the
# checks below go by the click interface (groups have `list_commands`, parameters a `param_type_name`).


def _is_group(command: Any) -> bool:
    return hasattr(command, "list_commands") and hasattr(command, "get_command")


def _resolve(root: Any, argv: list[str]) -> tuple[Any, list[str]]:
    """Walk subcommand names through nested groups; returns the leaf command and its arguments."""
    command, rest, path = root, list(argv), ["tierbatch"]
    while _is_group(command) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        ctx = command.context_class(command, info_name=path[-1])
        known = command.list_commands(ctx)
        assert name in known, f"`{' '.join(path)}` has no subcommand {name!r} (has {known})"
        command = command.get_command(ctx, name)
        path.append(name)
    assert not _is_group(command), f"`{' '.join(path)}` needs a subcommand"
    return command, rest


def _options(command: Any) -> set[str]:
    return {opt for param in command.params if param.param_type_name == "option"
            for opt in (*param.opts, *param.secondary_opts)}


def _check_flags(command: Any, args: list[str], where: str) -> None:
    options = _options(command)
    assert options or not args, f"{where}: the command has no options at all"
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert flag in options, f"{where}: unknown option {flag} (has {sorted(options)})"


def test_every_app_service_runs_an_existing_tierbatch_subcommand(services: dict[str, dict[str, Any]]) -> None:
    root = _cli()
    for name in sorted(APP_SERVICES):
        argv = _argv(services[name].get("command") or services[name].get("entrypoint"))
        assert argv[:1] == ["tierbatch"], f"{name} does not run tierbatch: {argv}"
        command, args = _resolve(root, argv[1:])
        _check_flags(command, args, f"{name}: {shlex.join(argv)}")


def test_cli_interface_that_scripts_rely_on() -> None:
    """The CLI flags the README promises (and compose or scripts use), checked against the real CLI."""
    root = _cli()
    promised = {
        "api": ["--host", "--port"],
        "worker": ["--concurrency", "--queues"],
        "beat": [],
        "migrate": [],
        "simulator": ["--host", "--port", "--config"],
        "up": [],
        "demo": [],
        "tenants create": ["--budget", "--json"],
    }
    for words, flags in promised.items():
        command, _ = _resolve(root, words.split())
        _check_flags(command, flags, f"tierbatch {words}")
    create, _ = _resolve(root, ["tenants", "create"])
    arguments = [param for param in create.params if param.param_type_name == "argument"]
    assert [param.name for param in arguments][:1] == ["name"]


def test_observability_services_are_pinned_profiled_and_mount_files_that_exist(
        services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]["environment"]
    # viewers only, and no account to log in with (no admin password left at its default)
    assert grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert grafana["GF_AUTH_DISABLE_LOGIN_FORM"] == "true" and grafana["GF_AUTH_BASIC_ENABLED"] == "false"
    for name in OBSERVABILITY:
        service = services[name]
        assert service.get("profiles") == ["observability"], name
        image, _, tag = str(service["image"]).partition(":")
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: unpinned {image}:{tag}"
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name} mounts {source}, which is missing"
    for name in APP_SERVICES | INFRA:
        assert "profiles" not in services[name], f"{name} must start without a profile"


def test_prometheus_scrapes_the_api_with_the_admin_token_and_the_worker_port(
        services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {job_name: [t for group in job["static_configs"] for t in group["targets"]]
               for job_name, job in jobs.items()}
    assert targets == {"tierbatch-api": ["api:8000"], "tierbatch-worker": ["worker:9100"]}
    token_file = jobs["tierbatch-api"]["authorization"]["credentials_file"]
    entrypoint = " ".join(_argv(services["prometheus"]["entrypoint"]))
    assert f"> {token_file}" in entrypoint and "TIERBATCH_ADMIN_TOKEN" in entrypoint
    worker = _argv(services["worker"]["command"])
    assert worker[worker.index("--metrics-port") + 1] == "9100"
    assert [str(port) for port in services["worker"]["expose"]] == ["9100"]


def test_docker_compose_resolves_the_observability_profile(tmp_path: Path) -> None:
    argv = _compose_cli()
    if argv is None:
        pytest.skip("the docker compose CLI plugin (v2) is not installed")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    base = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}
    result = subprocess.run([*argv, "--file", str(COMPOSE_FILE), "--project-directory", str(REPO_ROOT),
                             "--env-file", str(empty), "--profile", "observability", "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**base, "DOCKER_CONFIG": str(tmp_path / "docker"), **OPERATOR_ENV})
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)["services"]
    assert set(resolved) >= OBSERVABILITY
    grafana = resolved["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer" and grafana["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
    assert resolved["prometheus"]["environment"]["TIERBATCH_ADMIN_TOKEN"] == OPERATOR_ENV["TIERBATCH_ADMIN_TOKEN"]
