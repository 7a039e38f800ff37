"""deploy/k8s: every overlay renders with kustomize, kubernetes-validate --strict accepts it, and the
rendered objects are hardened, probed and wired the way the services expect.

Kubernetes versions: the oldest we claim (1.30: grpc probes, autoscaling/v2, policy/v1, Job TTL are all
GA there) and the newest kubernetes-validate bundles.
"""

import base64
import re

import pytest
import yaml

from duplex.common.server import LIVENESS
from tests.deploy.deploy_files import (
    DEFAULT_PORTS,
    ENVOY_CONFIG,
    HEALTH_NAMES,
    K8S,
    OVERLAYS,
    PLACEHOLDERS,
    ROOT,
    SECRET_LIKE_NAME,
    app_name,
    envoy_listener_port,
    envoy_release,
    envoy_upstreams,
    image_is_pinned,
    labels,
    load_documents,
    pod_spec,
    render_overlay,
    require_tool,
    run,
)

KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
NAMESPACE = "duplex"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
DUPLEX_DEPLOYMENTS = {  # Deployment -> python -m module
    "gateway": "gateway",
    "llm-service": "llm_service",
    "session-service": "session_service",
    "history-service": "history_service",
}
INNER_SERVICES = ("llm-service", "session-service", "history-service")
# Who may open connections to whom (ingress), besides Envoy being open to everyone.
ALLOWED_CALLERS = {
    "gateway": {"envoy"},
    "llm-service": {"gateway", "history-service"},  # history_service asks it for session summaries
    "session-service": {"gateway"},
    "history-service": {"gateway", "session-service"},  # session_service records ended sessions
    "redis": {"session-service"},
    "postgres": {"history-service", "migrate"},
}
# Secrets the overlays reference but never ship: created in the cluster by whoever deploys.
EXTERNAL_SECRETS = {"duplex-secrets": {"DUPLEX_JWT_SECRET", "OPENAI_API_KEY"}}
MANAGED_DATA_SECRET = "duplex-managed-data"
ENV_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class Rendered:
    def __init__(self, overlay: str, text: str):
        self.overlay = overlay
        self.text = text
        self.documents = load_documents(text)

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.documents if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        matches = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(matches) == 1, f"{self.overlay}: expected one {kind} {name}, found {len(matches)}"
        return matches[0]

    def generated(self, kind: str, base_name: str) -> dict:
        """A generated object (ConfigMap, Secret) by its name before kustomize's hash suffix."""
        matches = [d for d in self.of_kind(kind) if re.fullmatch(rf"{base_name}-[a-z0-9]{{10}}", d["metadata"]["name"])]
        assert len(matches) == 1, f"{self.overlay}: expected one generated {kind} {base_name}"
        return matches[0]

    def workloads(self) -> list[dict]:
        return [d for d in self.documents if d["kind"] in WORKLOAD_KINDS]

    def containers(self):
        for workload in self.workloads():
            spec = pod_spec(workload)
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield workload, container

    def duplex_config(self) -> dict:
        return self.generated("ConfigMap", "duplex-config")["data"]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> Rendered:
    return Rendered(request.param, render_overlay(request.param))


@pytest.fixture(scope="module")
def all_rendered() -> dict[str, Rendered]:
    return {overlay: Rendered(overlay, render_overlay(overlay)) for overlay in OVERLAYS}


def only_container(workload: dict) -> dict:
    (container,) = pod_spec(workload)["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


# --- kubernetes-validate ----------------------------------------------------------------------------------


def test_kubernetes_validate_strict_accepts_every_overlay(all_rendered, tmp_path):
    tool = require_tool("kubernetes-validate", hint="pip install the dev extras (kubernetes-validate)")
    files = []
    for overlay, rendered in all_rendered.items():
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(rendered.text)
        files.append(str(path))
    # The example Secret is not rendered (it is for copying) but must still be a valid object.
    files.append(str(K8S / "components" / "managed-data" / "secret.example.yaml"))
    versions = [argument for version in KUBERNETES_VERSIONS for argument in ("-k", version)]
    result = run([tool, "--strict", "--quiet", *versions, *files], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- every object -----------------------------------------------------------------------------------------


def test_every_object_is_labelled_and_namespaced(rendered):
    for document in rendered.documents:
        where = f"{rendered.overlay}: {document['kind']} {document['metadata']['name']}"
        assert labels(document).get("app.kubernetes.io/part-of") == "duplex", where
        assert app_name(document), where
        if document["kind"] != "Namespace":
            assert document["metadata"].get("namespace") == NAMESPACE, where
    for workload in rendered.workloads():
        template_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert template_labels["app.kubernetes.io/name"] == app_name(workload)
        assert template_labels["app.kubernetes.io/part-of"] == "duplex"
        if workload["kind"] != "Job":
            assert workload["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": app_name(workload)}


def test_namespace_enforces_the_restricted_pod_security_standard(rendered):
    namespace = rendered.get("Namespace", NAMESPACE)
    assert labels(namespace)["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_image_is_pinned(rendered):
    for workload, container in rendered.containers():
        assert image_is_pinned(container["image"]), f"{app_name(workload)}: {container['image']}"
    envoy = only_container(rendered.get("Deployment", "envoy"))
    assert envoy["image"] == f"envoyproxy/envoy:distroless-v{envoy_release()}"


# --- pods -------------------------------------------------------------------------------------------------


def test_every_pod_is_hardened(rendered):
    service_accounts = {sa["metadata"]["name"]: sa for sa in rendered.of_kind("ServiceAccount")}
    for workload in rendered.workloads():
        name = f"{rendered.overlay}: {workload['kind']} {workload['metadata']['name']}"
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False, name
        account = service_accounts[spec["serviceAccountName"]]
        assert account["automountServiceAccountToken"] is False, name
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert security.get("runAsNonRoot", True) is True and security.get("privileged", False) is False
            # A writable /tmp on the read-only root: an emptyDir.
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], name
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[bound]), f"{name}: resources.{bound}"


def test_duplex_pods_run_as_the_image_user(rendered):
    for name in (*DUPLEX_DEPLOYMENTS, "migrate"):
        kind = "Job" if name == "migrate" else "Deployment"
        context = pod_spec(rendered.get(kind, name))["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (10001, 10001), name


def test_duplex_deployments_run_their_module_with_grpc_probes(rendered):
    config = rendered.duplex_config()
    for name, module in DUPLEX_DEPLOYMENTS.items():
        deployment = rendered.get("Deployment", name)
        container = only_container(deployment)
        assert container["command"] == ["python", "-m", module], name
        port = DEFAULT_PORTS[module]
        assert {"name": "grpc", "containerPort": port} in container["ports"], name
        # Ready while its dependencies answer; alive (not restarted) while the process answers.
        assert container["readinessProbe"]["grpc"] == {"port": port, "service": HEALTH_NAMES[module]}, name
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port, "service": LIVENESS}, (name, probe)
        # Its configuration comes from the shared ConfigMap, which tells it to listen on that port.
        assert container["envFrom"] == [{"configMapRef": {"name": rendered.generated("ConfigMap", "duplex-config")
                                                          ["metadata"]["name"]}}]
        listen_variable = {"gateway": "DUPLEX_GATEWAY_LISTEN", "llm_service": "DUPLEX_LLM_LISTEN",
                           "session_service": "DUPLEX_SESSION_LISTEN", "history_service": "DUPLEX_HISTORY_LISTEN"}
        assert config[listen_variable[module]] == f"0.0.0.0:{port}"


def test_termination_grace_covers_prestop_and_shutdown_grace(rendered):
    shutdown_grace = float(rendered.duplex_config()["DUPLEX_SHUTDOWN_GRACE_SECONDS"])
    for name in DUPLEX_DEPLOYMENTS:
        spec = pod_spec(rendered.get("Deployment", name))
        pre_stop = only_container(rendered.get("Deployment", name))["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert spec["terminationGracePeriodSeconds"] > float(pre_stop[1]) + shutdown_grace, name


def test_migration_job_runs_duplex_migrate_against_the_database(rendered):
    job = rendered.get("Job", "migrate")
    container = only_container(job)
    assert container["command"] == ["duplex", "migrate"]
    assert pod_spec(job)["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"]["backoffLimit"] >= 3
    history = only_container(rendered.get("Deployment", "history-service"))
    # The Job migrates exactly the database history_service serves.
    assert env_of(container)["DUPLEX_DATABASE_URL"] == env_of(history)["DUPLEX_DATABASE_URL"]


def test_data_stores_are_configured_by_the_component(rendered):
    session = env_of(only_container(rendered.get("Deployment", "session-service")))
    history = env_of(only_container(rendered.get("Deployment", "history-service")))
    assert "DUPLEX_REDIS_URL" in session and "DUPLEX_DATABASE_URL" in history
    in_cluster = rendered.overlay == "in-cluster"
    assert bool(rendered.of_kind("StatefulSet")) == in_cluster
    if in_cluster:
        assert session["DUPLEX_REDIS_URL"]["value"].endswith("@redis:6379/0")
        assert history["DUPLEX_DATABASE_URL"]["value"].endswith("@postgres:5432/duplex")
        assert history["DUPLEX_DATABASE_URL"]["value"].startswith("postgresql+asyncpg://")
    else:
        assert session["DUPLEX_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == MANAGED_DATA_SECRET
        assert history["DUPLEX_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == MANAGED_DATA_SECRET


def test_env_references_are_defined_before_use(rendered):
    """$(VAR) in a value only expands when VAR is an earlier entry of the same env list."""
    for workload, container in rendered.containers():
        defined: set[str] = set()
        for entry in container.get("env", []):
            for referenced in ENV_REFERENCE.findall(entry.get("value", "")):
                assert referenced in defined, f"{app_name(workload)}: {entry['name']} uses $({referenced}) first"
            defined.add(entry["name"])
        for argument in container.get("args", []) + container.get("command", []):
            for referenced in ENV_REFERENCE.findall(argument):
                assert referenced in defined, f"{app_name(workload)}: $({referenced}) in args is undefined"


# --- services and wiring ----------------------------------------------------------------------------------


def test_every_service_has_a_grpc_port_and_selects_a_workload(rendered):
    pods = {app_name(w): w for w in rendered.workloads() if w["kind"] != "Job"}
    for service in rendered.of_kind("Service"):
        name = service["metadata"]["name"]
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        if name not in ("envoy", "redis", "postgres"):
            assert "grpc" in ports, f"Service {name} has no port named grpc"
        selector = service["spec"]["selector"]
        assert selector == {"app.kubernetes.io/name": name}, name
        container_ports = {p["name"] for c in pod_spec(pods[name])["containers"] for p in c["ports"]}
        for port in ports.values():
            assert port["targetPort"] in container_ports, f"Service {name}: targetPort {port['targetPort']}"


def test_gateway_service_is_headless_with_the_ports_envoy_dials(rendered):
    service = rendered.get("Service", "gateway")
    assert service["spec"]["clusterIP"] == "None", "Envoy's STRICT_DNS must see every gateway pod"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"grpc": DEFAULT_PORTS["gateway"], "http": 8080}
    assert envoy_upstreams() == {("gateway", port) for port in ports.values()}


def test_targets_in_the_config_name_existing_services(rendered):
    config = rendered.duplex_config()
    services = {s["metadata"]["name"]: s for s in rendered.of_kind("Service")}
    for variable, name in (("DUPLEX_LLM_TARGET", "llm-service"), ("DUPLEX_SESSION_TARGET", "session-service"),
                           ("DUPLEX_HISTORY_TARGET", "history-service")):
        host, _, port = config[variable].rpartition(":")
        assert host == name
        assert int(port) in {p["port"] for p in services[name]["spec"]["ports"] if p["name"] == "grpc"}
    assert config["DUPLEX_HTTP_LISTEN"] == "0.0.0.0:8080"


def test_envoy_runs_the_shipped_config(rendered):
    config_map = rendered.generated("ConfigMap", "envoy-config")
    assert config_map["data"]["envoy.yaml"] == ENVOY_CONFIG.read_text()
    envoy = rendered.get("Deployment", "envoy")
    volumes = {v["name"]: v for v in pod_spec(envoy)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in only_container(envoy)["volumeMounts"]}
    assert volumes[mounts["/etc/envoy"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert only_container(envoy)["args"][:2] == ["-c", "/etc/envoy/envoy.yaml"]
    service = rendered.get("Service", "envoy")
    assert [p["port"] for p in service["spec"]["ports"]] == [envoy_listener_port()]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "expose it on purpose, once auth is set"


# --- scaling ----------------------------------------------------------------------------------------------


def test_gateway_autoscales_and_has_a_disruption_budget(rendered):
    gateway = rendered.get("Deployment", "gateway")
    assert "replicas" not in gateway["spec"], "the HPA owns the replica count"
    hpa = rendered.get("HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = rendered.get("PodDisruptionBudget", "gateway")
    assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "gateway"}
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable", 0) >= 1


# --- network policies -------------------------------------------------------------------------------------


def test_ingress_is_denied_by_default(rendered):
    deny = rendered.get("NetworkPolicy", "default-deny-ingress")
    assert deny["spec"]["podSelector"] == {}
    assert deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")


def test_only_the_intended_callers_reach_each_service(rendered):
    policies = {app_name(p): p for p in rendered.of_kind("NetworkPolicy") if p["spec"]["podSelector"]}
    pods = {app_name(w): w for w in rendered.workloads()}
    for target, policy in policies.items():
        assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": target}}
        assert target in pods, f"NetworkPolicy for {target}, which does not run here"
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        container_ports = {p["containerPort"] for c in pod_spec(pods[target])["containers"] for p in c["ports"]}
        callers: set[str] = set()
        for rule in policy["spec"]["ingress"]:
            assert {p["port"] for p in rule["ports"]} <= container_ports, target
            sources = rule.get("from")
            if target == "envoy":
                assert sources is None, "Envoy is the edge: open to every client"
                continue
            for source in sources:
                assert set(source) == {"podSelector"}, f"{target}: only pods of this namespace may call it"
                callers.add(source["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
        if target != "envoy":
            assert callers == ALLOWED_CALLERS[target], target
    # Every pod is covered by a policy of its own, so nothing relies on the default deny by accident.
    assert set(pods) - {"migrate"} <= set(policies)
    for inner in INNER_SERVICES:
        assert inner in policies


# --- secrets ----------------------------------------------------------------------------------------------


def test_shipped_secrets_hold_only_placeholders(rendered):
    secrets = rendered.of_kind("Secret")
    if rendered.overlay == "managed":
        assert not secrets, "the managed overlay ships no Secret: the data URLs are created in the cluster"
    for secret in secrets:
        values = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        values.update(secret.get("stringData") or {})
        for key, value in values.items():
            assert value in PLACEHOLDERS, f"Secret {secret['metadata']['name']}: {key} looks like a real value"


def test_example_secret_holds_only_placeholders():
    example = yaml.safe_load((K8S / "components" / "managed-data" / "secret.example.yaml").read_text())
    assert example["metadata"]["name"] == MANAGED_DATA_SECRET
    for key, value in example["stringData"].items():
        password = value.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
        assert password in PLACEHOLDERS, key
    # And it is only an example: no kustomization lists it.
    for kustomization in K8S.rglob("kustomization.yaml"):
        assert "secret.example.yaml" not in yaml.safe_load(kustomization.read_text()).get("resources", [])


def test_secret_references_resolve_or_are_documented_as_external(rendered):
    shipped = {s["metadata"]["name"]: set(s.get("data") or {}) for s in rendered.of_kind("Secret")}
    example = yaml.safe_load((K8S / "components" / "managed-data" / "secret.example.yaml").read_text())
    external = dict(EXTERNAL_SECRETS)
    if rendered.overlay == "managed":
        external[MANAGED_DATA_SECRET] = set(example["stringData"])
    for workload, container in rendered.containers():
        for entry in container.get("env", []):
            reference = entry.get("valueFrom", {}).get("secretKeyRef")
            if not reference:
                continue
            name, key = reference["name"], reference["key"]
            where = f"{rendered.overlay}: {app_name(workload)} {entry['name']}"
            if name in shipped:
                assert key in shipped[name], where
            else:
                assert name in external and key in external[name], f"{where}: unknown Secret {name}"
            if name in EXTERNAL_SECRETS:
                assert reference.get("optional") is True, f"{where}: the app must start without this Secret"


def test_no_secret_value_is_written_in_a_manifest(rendered):
    for workload, container in rendered.containers():
        for entry in container.get("env", []):
            value = entry.get("value")
            if value is None:
                continue
            where = f"{rendered.overlay}: {app_name(workload)} {entry['name']}"
            assert not SECRET_LIKE_NAME.search(entry["name"]), f"{where}: take it from a Secret"
            if "://" in value and "@" in value:
                password = value.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
                assert ENV_REFERENCE.fullmatch(password), f"{where}: the URL's password must come from a Secret"
    for config_map in rendered.of_kind("ConfigMap"):
        for key in config_map["data"]:
            assert not SECRET_LIKE_NAME.search(key), f"ConfigMap {config_map['metadata']['name']}: {key}"


def test_manifests_are_valid_yaml_files_on_their_own():
    # Catches a stray tab or a broken document in a file an overlay does not happen to use.
    for path in [*sorted(K8S.rglob("*.yaml")), ROOT / "deploy" / "envoy" / "kustomization.yaml"]:
        assert load_documents(path.read_text()), path
