"""docker-compose.yml: `docker-compose config` accepts it, and what it resolves to is the system we mean.

Runs the real docker-compose (Debian's `docker-compose` package; .ci/run installs it). `config` needs no
Docker engine. The environment is controlled, so defaults and pass-through secrets are checked both ways.
"""

import os

import pytest
import yaml

from tests.deploy.deploy_files import (
    COMPOSE_FILE,
    DEFAULT_PORTS,
    ENVOY_CONFIG,
    HEALTH_NAMES,
    SECRET_LIKE_NAME,
    envoy_listener_port,
    envoy_release,
    envoy_upstreams,
    image_is_pinned,
    require_tool,
    run,
)

DUPLEX_SERVICES = {  # compose service -> python -m module
    "gateway-1": "gateway",
    "gateway-2": "gateway",
    "llm-service": "llm_service",
    "session-service": "session_service",
    "history-service": "history_service",
}
SECRETS_FROM_HOST = ("DUPLEX_JWT_SECRET", "OPENAI_API_KEY", "OPENAI_BASE_URL", "POSTGRES_PASSWORD")


def compose_config(**environment: str) -> dict:
    tool = require_tool("docker-compose", hint="apt-get install docker-compose (Debian's package; .ci/run does)")
    # Only PATH and HOME from this machine: no DUPLEX_*, OPENAI_* or POSTGRES_* leaks in from the shell.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **environment}
    command = [tool, "--file", str(COMPOSE_FILE), "--project-directory", str(COMPOSE_FILE.parent), "config"]
    result = run(command, env=env)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def config() -> dict:
    return compose_config()


@pytest.fixture(scope="module")
def services(config) -> dict:
    return config["services"]


def environment(service: dict) -> dict:
    return service.get("environment") or {}


def test_the_whole_system_is_there(services):
    assert set(services) == {*DUPLEX_SERVICES, "migrate", "envoy", "redis", "postgres"}


def test_images_are_pinned_and_duplex_is_one_image(services):
    for name, service in services.items():
        assert image_is_pinned(service["image"]), f"{name}: {service['image']}"
    duplex = [services[name] for name in (*DUPLEX_SERVICES, "migrate")]
    assert {s["image"] for s in duplex} == {"duplex:0.1.0"}
    for service in duplex:
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    # The Envoy that runs is the Envoy that validated envoy.yaml in the tests.
    assert services["envoy"]["image"] == f"envoyproxy/envoy:distroless-v{envoy_release()}"


def test_each_service_runs_its_module_with_a_grpc_healthcheck(services):
    for name, module in DUPLEX_SERVICES.items():
        service = services[name]
        assert service["command"] == ["python", "-m", module], name
        test = service["healthcheck"]["test"]
        assert test == ["CMD", "duplex-healthcheck", f"127.0.0.1:{DEFAULT_PORTS[module]}", HEALTH_NAMES[module]], name
    assert services["migrate"]["command"] == ["duplex", "migrate"]
    assert services["migrate"]["restart"] == "no"


def test_startup_order_follows_health(services):
    for gateway in ("gateway-1", "gateway-2"):
        depends = services[gateway]["depends_on"]
        assert {k: v["condition"] for k, v in depends.items()} == {
            "llm-service": "service_healthy", "session-service": "service_healthy",
            "history-service": "service_healthy",
        }
    history = services["history-service"]["depends_on"]
    assert history["migrate"]["condition"] == "service_completed_successfully"
    assert history["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["session-service"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for store in ("redis", "postgres"):
        assert services[store]["healthcheck"]["test"][0] == "CMD"


def test_envoy_fronts_both_gateways_under_the_name_envoy_yaml_dials(services):
    envoy = services["envoy"]
    assert mounts(envoy) == {(str(ENVOY_CONFIG), "/etc/envoy/envoy.yaml", True)}
    assert set(envoy["depends_on"]) == {"gateway-1", "gateway-2"}
    upstream_hosts = {host for host, _ in envoy_upstreams()}
    upstream_ports = {port for _, port in envoy_upstreams()}
    assert upstream_hosts == {"gateway"}
    for gateway in ("gateway-1", "gateway-2"):
        assert services[gateway]["networks"]["default"]["aliases"] == ["gateway"]
        assert {int(p) for p in services[gateway]["expose"]} == upstream_ports
    # The alias is not also a service name (Docker would then resolve only that one container).
    assert "gateway" not in services


def published_ports(services: dict) -> dict[tuple[str, int], tuple[str, int]]:
    """(service, container port) -> (host address, host port).

    docker-compose v1 prints "ip:host:container/tcp"; Compose v2 prints a mapping.
    """
    found = {}
    for name, service in services.items():
        for spec in service.get("ports", []):
            if isinstance(spec, dict):
                found[(name, int(spec["target"]))] = (spec.get("host_ip", ""), int(spec["published"]))
            else:
                host_ip, host_port, container = spec.removesuffix("/tcp").rsplit(":", 2)
                found[(name, int(container))] = (host_ip, int(host_port))
    return found


def mounts(service: dict) -> set[tuple[str, str, bool]]:
    """(source, target, read-only) of each volume, from v1's "source:target:mode" or v2's mapping."""
    found = set()
    for spec in service.get("volumes", []):
        if isinstance(spec, dict):
            found.add((spec["source"], spec["target"], bool(spec.get("read_only"))))
        else:
            source, target, mode = spec.split(":")
            found.add((source, target, mode == "ro"))
    return found


def test_published_ports_default_to_loopback(services):
    published = published_ports(services)
    assert set(published) == {("envoy", envoy_listener_port()), ("gateway-1", DEFAULT_PORTS["gateway"])}
    for (_, container_port), (host_ip, host_port) in published.items():
        assert host_ip == "127.0.0.1" and host_port == container_port


def test_publish_host_can_be_changed():
    services = compose_config(DUPLEX_PUBLISH_HOST="0.0.0.0")["services"]
    assert published_ports(services)[("envoy", envoy_listener_port())] == ("0.0.0.0", envoy_listener_port())


def test_services_dial_each_other_by_service_name(services):
    targets = {
        "DUPLEX_LLM_TARGET": f"llm-service:{DEFAULT_PORTS['llm_service']}",
        "DUPLEX_SESSION_TARGET": f"session-service:{DEFAULT_PORTS['session_service']}",
        "DUPLEX_HISTORY_TARGET": f"history-service:{DEFAULT_PORTS['history_service']}",
    }
    for name in DUPLEX_SERVICES:
        env = environment(services[name])
        for variable, value in targets.items():
            assert env[variable] == value, (name, variable)
    assert environment(services["session-service"])["DUPLEX_REDIS_URL"] == "redis://redis:6379/0"
    # The page comes through Envoy, so its origin is Envoy's port.
    origins = environment(services["gateway-1"])["DUPLEX_ALLOWED_ORIGINS"].split(",")
    assert f"http://127.0.0.1:{envoy_listener_port()}" in origins


def test_only_history_and_migrate_see_the_database_url(services):
    expected = "postgresql+asyncpg://duplex:duplex@postgres:5432/duplex"
    for name, service in services.items():
        url = environment(service).get("DUPLEX_DATABASE_URL")
        assert url == (expected if name in ("history-service", "migrate") else None), name


def test_secrets_come_from_the_host_environment():
    services = compose_config(
        POSTGRES_PASSWORD="pw-from-host", DUPLEX_JWT_SECRET="jwt-from-host", OPENAI_API_KEY="key-from-host"
    )["services"]
    assert environment(services["postgres"])["POSTGRES_PASSWORD"] == "pw-from-host"
    assert ":pw-from-host@postgres:" in environment(services["history-service"])["DUPLEX_DATABASE_URL"]
    assert ":pw-from-host@postgres:" in environment(services["migrate"])["DUPLEX_DATABASE_URL"]
    assert environment(services["gateway-2"])["DUPLEX_JWT_SECRET"] == "jwt-from-host"
    assert environment(services["llm-service"])["OPENAI_API_KEY"] == "key-from-host"


def test_unset_secrets_stay_unset_in_the_containers(services):
    # A key without a value is passed through from the host only when set there. An empty DUPLEX_JWT_SECRET
    # would not mean "authentication off", and an empty OPENAI_API_KEY is not "no key" for every client.
    # (docker-compose v1 shows such a key as null; Compose v2 leaves it out.)
    assert environment(services["gateway-1"]).get("DUPLEX_JWT_SECRET") is None
    assert environment(services["llm-service"]).get("OPENAI_API_KEY") is None


def test_no_secret_is_written_in_the_file():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())  # anchors merged, nothing interpolated
    for name, service in raw["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if SECRET_LIKE_NAME.search(variable):
                assert value is None or str(value).startswith("${"), f"{name}: {variable} is hard-coded"
            if "://" in str(value) and "@" in str(value):
                credentials = str(value).split("://", 1)[1].split("@", 1)[0]
                password = credentials.partition(":")[2]
                assert password.startswith("${"), f"{name}: {variable} carries a hard-coded password"
    for variable in SECRETS_FROM_HOST:
        assert variable in COMPOSE_FILE.read_text()


def test_duplex_containers_are_hardened(services):
    grace = {float(environment(services[n])["DUPLEX_SHUTDOWN_GRACE_SECONDS"]) for n in DUPLEX_SERVICES}
    (grace_seconds,) = grace
    for name in (*DUPLEX_SERVICES, "migrate"):
        service = services[name]
        assert service["user"] == "10001:10001", name
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"], name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
    for name in DUPLEX_SERVICES:
        assert float(services[name]["stop_grace_period"].rstrip("s")) > grace_seconds, name
    envoy = services["envoy"]
    assert envoy["read_only"] is True and envoy["cap_drop"] == ["ALL"]


def test_data_is_kept_in_named_volumes(config, services):
    assert set(config["volumes"]) == {"redis-data", "postgres-data"}
    assert mounts(services["redis"]) == {("redis-data", "/data", False)}
    assert mounts(services["postgres"]) == {("postgres-data", "/var/lib/postgresql/data", False)}
    assert "--appendonly" in services["redis"]["command"]
