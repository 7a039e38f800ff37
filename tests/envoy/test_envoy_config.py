"""deploy/envoy/envoy.yaml is a valid config for the Envoy we pin, as shipped and as the tests render it."""

import subprocess

import yaml

from tests.envoy.envoy_edge import SHIPPED_CONFIG, envoy_command, render_config, virtual_host


def validate(config_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        envoy_command(config_path, "--mode", "validate"), capture_output=True, text=True, timeout=30, check=False
    )


def test_shipped_config_validates():
    result = validate(SHIPPED_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_rendered_test_config_validates_and_keeps_the_shipped_routes(tmp_path):
    rendered = render_config(grpc_port=50051, http_port=8080, allowed_origins=["http://127.0.0.1:3000"])
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(rendered))

    result = validate(path)

    assert result.returncode == 0, result.stdout + result.stderr
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    assert virtual_host(rendered)["routes"] == virtual_host(shipped)["routes"]
