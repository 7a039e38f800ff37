"""deploy/Dockerfile and .dockerignore, checked without a Docker engine.

The Dockerfile is parsed (multi-stage, pinned base images, non-root final stage holding only the venv),
and the build context .dockerignore leaves is built into a wheel with the same command the builder stage
runs, so a file the image needs but the context or the wheel drops fails here instead of in production.
"""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy.deploy_files import (
    DEFAULT_PORTS,
    DOCKERFILE,
    DOCKERIGNORE,
    HEALTH_NAMES,
    ROOT,
    DockerIgnore,
    env_assignments,
    image_is_pinned,
    parse_dockerfile,
)

PACKAGES = ("duplex", "gateway", "llm_service", "session_service", "history_service")
BUILD_TOOLS = re.compile(r"apt-get|apk |gcc|g\+\+|build-essential|make |cargo|rustc|\bcc\b")


@pytest.fixture(scope="module")
def stages():
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def context() -> list[str]:
    return DockerIgnore(DOCKERIGNORE.read_text()).context_files(ROOT)


def test_multi_stage_on_one_pinned_base_image(stages):
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    for stage in stages:
        assert image_is_pinned(stage.image), f"FROM {stage.image}: pin an exact release tag, never latest"
        assert "$" not in stage.image, "base images are written out, not taken from build args"
        assert re.search(r":\d+\.\d+\.\d+-", stage.image), f"{stage.image}: name the Python patch release"
    # The runtime reuses the builder's interpreter through the venv's symlinks: same image, same paths.
    assert stages[-1].image == stages[0].image


def test_builder_builds_a_wheel_into_a_venv(stages):
    builder = stages[0]
    runs = " ".join(builder.all("RUN"))
    assert "python -m venv /opt/duplex" in runs
    assert "pip wheel" in runs and "pip install --no-deps /tmp/wheels/duplex-" in runs
    # Dependencies come from pyproject.toml's pins (read in the image), before the code for layer caching.
    copies = builder.all("COPY")
    assert copies[0] == "pyproject.toml ./"
    assert "requirements.txt" in builder.all("RUN")[1]


def test_runtime_stage_holds_only_the_venv_and_no_build_tools(stages):
    runtime = stages[-1]
    builder_name = stages[0].name
    assert builder_name, "the builder stage needs a name for COPY --from"
    copies = runtime.all("COPY")
    assert copies == [f"--from={builder_name} /opt/duplex /opt/duplex"], copies
    for command in runtime.all("RUN"):
        assert not BUILD_TOOLS.search(command), f"the runtime stage installs build tools: {command}"


def test_runtime_runs_as_a_fixed_non_root_user(stages):
    runtime = stages[-1]
    users = runtime.all("USER")
    assert users, "the final stage must switch to a non-root USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) == 10001, "a numeric UID lets Kubernetes verify runAsNonRoot"
    assert group == "10001"
    assert "--uid 10001" in " ".join(runtime.all("RUN"))
    # Nothing after USER switches back to root.
    keywords = [i.keyword for i in runtime.instructions]
    assert "RUN" not in keywords[keywords.index("USER") :]


def test_runtime_environment_and_ports(stages):
    runtime = stages[-1]
    env: dict[str, str] = {}
    for arguments in runtime.all("ENV"):
        env.update(env_assignments(arguments))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/duplex/bin:")
    # Every service listens on all interfaces on its usual port, and those ports are exposed.
    listens = {
        "gateway": env["DUPLEX_GATEWAY_LISTEN"], "llm_service": env["DUPLEX_LLM_LISTEN"],
        "session_service": env["DUPLEX_SESSION_LISTEN"], "history_service": env["DUPLEX_HISTORY_LISTEN"],
    }
    for module, listen in listens.items():
        assert listen == f"0.0.0.0:{DEFAULT_PORTS[module]}", module
    assert env["DUPLEX_HTTP_LISTEN"] == "0.0.0.0:8080"
    exposed = {int(port) for arguments in runtime.all("EXPOSE") for port in arguments.split()}
    assert exposed == {*DEFAULT_PORTS.values(), 8080}


def test_default_command_runs_a_service_module(stages):
    runtime = stages[-1]
    assert not runtime.all("HEALTHCHECK"), "orchestrators probe grpc.health.v1; no Docker HEALTHCHECK"
    (command,) = runtime.all("CMD")
    assert command == '["python", "-m", "gateway"]'
    for module in HEALTH_NAMES:
        assert (ROOT / module / "__main__.py").exists(), f"python -m {module} has no __main__"


def test_every_copied_path_is_in_the_build_context(stages, context):
    for stage in stages:
        for arguments in stage.all("COPY"):
            words = arguments.split()
            if any(word.startswith("--from") for word in words):
                continue
            for source in [w for w in words if not w.startswith("--")][:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                inside = [f for f in context if f == source or f.startswith(source.rstrip("/") + "/")]
                assert inside, f"COPY {source}: .dockerignore leaves it out of the build context"


def test_dockerignore_keeps_local_state_and_secrets_out(context):
    for kept_out in (".git/", ".venv/", "node_modules/", "data/", "tests/", ".pytest_cache/", "build/"):
        leaked = [f for f in context if f.startswith(kept_out)]
        assert not leaked, f"{kept_out} reaches the build context: {leaked[:3]}"
    for leaked in context:
        name = leaked.rsplit("/", 1)[-1]
        assert "__pycache__" not in leaked and not name.endswith(".pyc"), leaked
        assert not name.startswith(".env") and ".egg-info" not in leaked, leaked
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    for hypothetical in (".env", "data/history.db", ".git/config", "secrets/key.pem", "gateway/__pycache__/x.pyc"):
        assert ignore.excluded(hypothetical), hypothetical


def test_the_build_context_builds_a_wheel_with_every_package_file(context, tmp_path):
    """What the builder stage does, on exactly the files the build context holds."""
    source = tmp_path / "context"
    for relative in context:
        target = source / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    wheels = tmp_path / "wheels"
    # Without build isolation: the venv's setuptools, no index needed (the image build uses the pinned one).
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(wheels), str(source)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = wheels.glob("duplex-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = set(archive.namelist())
        entry_points = next(n for n in packaged if n.endswith(".dist-info/entry_points.txt"))
        assert "duplex = duplex.cli:main" in archive.read(entry_points).decode()
    # Every file of the service packages (code, stubs, migrations, templates, the web page) is in the wheel.
    needed = [f for f in context if f.split("/", 1)[0] in PACKAGES]
    missing = [f for f in needed if f not in packaged]
    assert not missing, f"the wheel (and so the image) lacks: {missing}"
    assert any(name.startswith("history_service/migrations/versions/") for name in packaged)
    assert "history_service/migrations/script.py.mako" in packaged


def test_healthcheck_script_is_executable_for_the_image():
    script = ROOT / "deploy" / "grpc_healthcheck.py"
    assert script.read_text().startswith("#!/opt/duplex/bin/python\n")
    assert script.stat().st_mode & 0o111, "the image runs it as duplex-healthcheck; keep it executable"
    assert Path(script).name in " ".join(parse_dockerfile(DOCKERFILE.read_text())[0].all("COPY"))
