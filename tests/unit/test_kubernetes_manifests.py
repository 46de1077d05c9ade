"""The Kubernetes manifests under deploy/kubernetes/, checked offline.

* Every Kubernetes object in a manifest file, and every object the kustomizations build, is
  validated strictly (unknown fields rejected) against the Kubernetes OpenAPI schemas bundled by
  the PyPI package ``kubernetes-validate``, for the oldest and the newest Kubernetes version pinned
  below. The objects without a bundled schema are custom resources: the Prometheus Operator's
  ServiceMonitor is checked against the Service it must select, and the multi-node
  LeaderWorkerSet's two pod templates are validated strictly as Kubernetes PodTemplates.
* The kustomizations are built twice: by a small renderer here (resources, RFC 6902 patches,
  images: the only features they may use) and by ``kubectl kustomize`` (kustomize built into
  kubectl); both results must be equal.
* The container arguments and the ConfigMap's ``--config`` file are parsed by the installed
  vLLM's own ``vllm serve`` parser with the plugin loaded (no engine, no server).
* The dashboard ConfigMap must be what deploy/kubernetes/make-dashboard-configmap.py writes from
  deploy/grafana/dashboards/vllm-snapkv.json.

No cluster and no network: nothing here applies a manifest anywhere.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "vllm-snapkv.json"
GENERATOR = K8S / "make-dashboard-configmap.py"

#: Newest Kubernetes whose schemas kubernetes-validate 1.37.0 bundles.
KUBERNETES_VERSION = "1.37.0"
#: Oldest Kubernetes the manifests are meant for (still in wide use on managed clusters).
OLDEST_KUBERNETES_VERSION = "1.29.0"
VERSIONS = (OLDEST_KUBERNETES_VERSION, KUBERNETES_VERSION)

BASE = "base"
OVERLAYS = ("overlays/cpu", "overlays/gpu")
MULTINODE = "multinode"
ROOTS = ("common", BASE, *OVERLAYS, MULTINODE, "prometheus-operator")
LWS = ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "vllm-snapkv")
#: Objects whose schema is a CRD's, not bundled by kubernetes-validate.
CRD_OBJECTS = {("monitoring.coreos.com/v1", "ServiceMonitor", "vllm-snapkv"), LWS}
#: The fields of a LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) these manifests may use.
LWS_SPEC_KEYS = {"replicas", "leaderWorkerTemplate", "startupPolicy", "rolloutStrategy",
                 "networkConfig"}
LWS_TEMPLATE_KEYS = {"size", "restartPolicy", "leaderTemplate", "workerTemplate"}
#: What the LeaderWorkerSet controller puts into every container's environment (a sample).
LWS_ENV = {"LWS_GROUP_SIZE": "2", "LWS_LEADER_ADDRESS": "vllm-snapkv-0.vllm-snapkv.ns"}

#: What the renderer below implements; a kustomization using anything else fails the tests.
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}
PATCH_KEYS = {"path", "target"}
TARGET_KEYS = {"group", "version", "kind", "name"}
IMAGE_KEYS = {"name", "newName", "newTag"}
JSON_PATCH_OPS = {"add", "remove", "replace", "test"}

CONFIG_MAP = "vllm-snapkv-config"
CONFIG_KEY = "config.yaml"
CPU_IMAGE_ROOT = "/opt/vllm-snapkv"  # docker/Dockerfile.cpu's WORKDIR


# --- reading --------------------------------------------------------------------------------

def load_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def kustomization(root: Path) -> dict[str, Any]:
    (doc,) = load_docs(root / "kustomization.yaml")
    return doc


def all_yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in {".yaml", ".yml"})


def resource_files() -> list[Path]:
    """Files named in some kustomization's ``resources`` (directories excluded)."""
    files: set[Path] = set()
    for root in ROOTS:
        for entry in kustomization(K8S / root).get("resources", []):
            path = (K8S / root / entry).resolve()
            if path.is_file():
                files.add(path)
    return sorted(files)


def patch_files() -> list[Path]:
    return sorted({(K8S / root / p["path"]).resolve()
                   for root in ROOTS for p in kustomization(K8S / root).get("patches", [])})


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [o for o in objs
            if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def container(deployment: dict[str, Any], name: str = "vllm") -> dict[str, Any]:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def arg_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} must appear exactly once in {args}"
    return args[args.index(flag) + 1]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    names = [e["name"] for e in c.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# --- the renderer: the subset of kustomize the kustomizations use ------------------------------

def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"JSON pointer must start with '/': {path!r}"
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container_: list[Any], token: str, *, for_add: bool) -> int:
    if for_add and token == "-":
        return len(container_)
    assert re.fullmatch(r"0|[1-9][0-9]*", token), f"bad array index {token!r}"
    i = int(token)
    assert i <= len(container_) if for_add else i < len(container_), f"index {i} out of range"
    return i


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 add/remove/replace/test (move/copy are not used here and not accepted)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] in JSON_PATCH_OPS, f"unsupported JSON patch op {op}"
        *parents, last = _pointer(op["path"])
        target = doc
        for token in parents:
            target = target[_index(target, token, for_add=False)] if isinstance(target, list) \
                else target[token]
        if op["op"] == "test":
            value = target[_index(target, last, for_add=False)] if isinstance(target, list) \
                else target[last]
            assert value == op["value"], f"JSON patch test failed at {op['path']}: {value!r}"
        elif op["op"] == "add":
            if isinstance(target, list):
                target.insert(_index(target, last, for_add=True), copy.deepcopy(op["value"]))
            else:
                target[last] = copy.deepcopy(op["value"])
        elif op["op"] == "replace":
            if isinstance(target, list):
                target[_index(target, last, for_add=False)] = copy.deepcopy(op["value"])
            else:
                assert last in target, f"replace of a missing member {op['path']}"
                target[last] = copy.deepcopy(op["value"])
        else:  # remove
            if isinstance(target, list):
                del target[_index(target, last, for_add=False)]
            else:
                del target[last]
    return doc


def _matches(obj: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return (target.get("kind", obj["kind"]) == obj["kind"]
            and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
            and target.get("group", group) == group
            and target.get("version", version) == version)


def _set_images(obj: dict[str, Any], images: list[dict[str, str]]) -> None:
    pod = obj.get("spec", {}).get("template", {}).get("spec")
    if pod is None:
        return
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        name, tag = re.fullmatch(r"([^:@]+(?::\d+/[^:@]+)?)(?::([^@]+))?", c["image"]).groups()
        for image in images:
            if image["name"] == name:
                new_tag = image.get("newTag", tag)
                c["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")


def render(root: Path) -> list[dict[str, Any]]:
    k = kustomization(root)
    assert set(k) <= KUSTOMIZATION_KEYS, f"{root}: unsupported keys {set(k) - KUSTOMIZATION_KEYS}"
    objs: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = root / entry
        objs += render(path) if path.is_dir() else load_docs(path)
    objs = copy.deepcopy(objs)
    for patch in k.get("patches", []):
        assert set(patch) == PATCH_KEYS and set(patch["target"]) <= TARGET_KEYS, patch
        hits = [i for i, o in enumerate(objs) if _matches(o, patch["target"])]
        assert len(hits) == 1, f"{root}: patch target {patch['target']} matches {len(hits)} objects"
        objs[hits[0]] = json_patch(objs[hits[0]], load_docs(root / patch["path"])[0])
    for image in k.get("images", []):
        assert set(image) <= IMAGE_KEYS, image
    for obj in objs:
        _set_images(obj, k.get("images", []))
    return objs


@functools.cache
def _rendered(root: str) -> list[dict[str, Any]]:
    return render(K8S / root)


def rendered(root: str) -> list[dict[str, Any]]:
    """What kustomization ``root`` builds (a fresh copy: tests may modify it)."""
    return copy.deepcopy(_rendered(root))


SERVED = (BASE, *OVERLAYS)  # the kustomizations with a Deployment


def lws_templates(root: str = MULTINODE) -> dict[str, dict[str, Any]]:
    """The multi-node LeaderWorkerSet's pod templates, by role (``leader``, ``worker``)."""
    t = find(rendered(root), "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    return {"leader": t["leaderTemplate"], "worker": t["workerTemplate"]}


def pod_templates(root: str) -> dict[str, dict[str, Any]]:
    """Every pod template ``root`` builds: a Deployment's, or the LeaderWorkerSet's two."""
    if root == MULTINODE:
        return lws_templates(root)
    return {"deployment": find(rendered(root), "Deployment")["spec"]["template"]}


def template_container(template: dict[str, Any], name: str = "vllm") -> dict[str, Any]:
    (c,) = [c for c in template["spec"]["containers"] if c["name"] == name]
    return c


# --- Kubernetes quantities (kubernetes-validate's schema takes any string) -------------------

_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "m": Decimal("0.001"), "u": Decimal("0.000001"), "n": Decimal("0.000000001"),
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: Any) -> Decimal:
    """A Kubernetes resource.Quantity as a number; anything the API server would refuse raises."""
    m = re.fullmatch(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([a-zA-Z]*)", str(value))
    assert m and m.group(2) in _SUFFIX, f"not a Kubernetes quantity: {value!r}"
    return Decimal(m.group(1)) * Decimal(_SUFFIX[m.group(2)])


# --- schema validation ------------------------------------------------------------------------

def test_kubernetes_validate_bundles_the_pinned_versions() -> None:
    bundled = all_versions()
    for version in VERSIONS:
        assert version in bundled, (f"kubernetes-validate {kubernetes_validate.version.__version__}"
                                    f" has no schemas for {version}: {bundled}")


def test_every_yaml_file_is_a_kustomization_a_resource_or_a_patch() -> None:
    """No stray manifests: each file is built by some kustomization (or is one)."""
    used = set(resource_files()) | set(patch_files())
    for path in all_yaml_files():
        if path.name == "kustomization.yaml":
            assert path.parent.relative_to(K8S).as_posix() in ROOTS, f"{path}: not tested"
        else:
            assert path.resolve() in used, f"{path} is referenced by no kustomization.yaml"
    for path in resource_files():
        for doc in load_docs(path):
            assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= set(doc), path
    for path in patch_files():
        (ops,) = load_docs(path)
        assert isinstance(ops, list) and ops, f"{path} must be a JSON patch (a list of operations)"
        assert all(op.get("op") in JSON_PATCH_OPS and "path" in op for op in ops), path


RESOURCE_FILES = [path.relative_to(K8S).as_posix() for path in resource_files()]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", RESOURCE_FILES)
def test_manifest_objects_are_valid_strictly(name: str, version: str) -> None:
    docs = load_docs(K8S / name)
    assert docs, f"{name} holds no object"
    for obj in docs:
        if key(obj) not in CRD_OBJECTS:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("root", ROOTS)
def test_rendered_objects_are_valid_strictly(root: str, version: str) -> None:
    objs = rendered(root)
    assert objs, f"{root} renders nothing"
    assert len({key(o) for o in objs}) == len(objs), f"{root}: duplicate objects"
    for obj in objs:
        if key(obj) not in CRD_OBJECTS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_only_the_custom_resources_lack_a_bundled_schema() -> None:
    """kubernetes-validate must know every other kind (a typo'd apiVersion/kind fails here)."""
    without = set()
    for obj in (obj for name in RESOURCE_FILES for obj in load_docs(K8S / name)):
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            without.add(key(obj))
    assert without == CRD_OBJECTS


def test_strict_validation_rejects_unknown_fields_and_wrong_types() -> None:
    """The validator really is strict: the manifests' own Deployment, broken two ways."""
    deployment = find(rendered(BASE), "Deployment")
    typo = copy.deepcopy(deployment)
    c = container(typo)
    c["readinessProbes"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProbes"):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    container(wrong_type)["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


# --- kustomizations ---------------------------------------------------------------------------

@pytest.mark.parametrize("root", ROOTS)
def test_kustomization_references_existing_files(root: str) -> None:
    k = kustomization(K8S / root)
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert set(k) <= KUSTOMIZATION_KEYS, set(k) - KUSTOMIZATION_KEYS
    assert k["resources"], f"{root}: no resources"
    for entry in k["resources"]:
        path = K8S / root / entry
        assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{root}: {entry} missing"
    for patch in k.get("patches", []):
        assert (K8S / root / patch["path"]).is_file(), f"{root}: {patch['path']} missing"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_on_the_base(overlay: str) -> None:
    k = kustomization(K8S / overlay)
    bases = [(K8S / overlay / e).resolve() for e in k["resources"] if (K8S / overlay / e).is_dir()]
    assert bases == [(K8S / BASE).resolve()]
    assert {key(o) for o in rendered(BASE)} <= {key(o) for o in rendered(overlay)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_patches_target_objects_of_the_base(overlay: str) -> None:
    patches = kustomization(K8S / overlay)["patches"]
    assert patches
    for patch in patches:
        hits = [o for o in rendered(BASE) if _matches(o, patch["target"])]
        assert len(hits) == 1, f"{overlay}: {patch['target']} matches {len(hits)} base objects"
        # Every operation applies (paths exist, `test` operations hold) on the base object.
        json_patch(hits[0], load_docs(K8S / overlay / patch["path"])[0])


def kubectl_kustomize(root: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if not (kubectl or kustomize):
        # Neither ships in PyPI, Debian's main archive or npm at a usable version; the same
        # rendering is checked above through the test's renderer, which is always run.
        pytest.skip("neither kubectl nor kustomize is on PATH: the real kustomize cannot "
                    "cross-check the renderer here (install kubectl >= 1.21, which embeds it)")
    cmd = [kubectl, "kustomize"] if kubectl else [kustomize, "build"]
    out = subprocess.run([*cmd, str(K8S / root)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


@pytest.mark.parametrize("root", ROOTS)
def test_kubectl_kustomize_builds_the_same_objects(root: str) -> None:
    built = kubectl_kustomize(root)
    ours = {key(o): o for o in rendered(root)}
    theirs = {key(o): o for o in built}
    assert theirs.keys() == ours.keys()
    for k in ours:
        assert theirs[k] == ours[k], f"{root}: {k} differs (kubectl kustomize vs the renderer)"
    for obj in built:
        if key(obj) not in CRD_OBJECTS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


# --- what the objects say ---------------------------------------------------------------------

@pytest.mark.parametrize("root", SERVED)
def test_probes_hit_health_on_the_named_serving_port(root: str) -> None:
    c = container(find(rendered(root), "Deployment"))
    (port,) = [p for p in c["ports"] if p["name"] == "http"]
    assert port["containerPort"] == int(arg_value(c["args"], "--port"))
    assert arg_value(c["args"], "--host") == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, (root, probe)
    startup = c["startupProbe"]
    budget = (startup.get("initialDelaySeconds", 0)
              + startup["periodSeconds"] * startup["failureThreshold"])
    assert budget >= 10 * 60, f"{root}: model load gets only {budget} s before a restart"
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60, f"{root}: liveness too eager"


@pytest.mark.parametrize("root", SERVED)
def test_service_selects_the_deployment_pods_and_is_scraped(root: str) -> None:
    svc = find(rendered(root), "Service")
    deployment = find(rendered(root), "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = svc["spec"]["selector"]
    assert selector and selector.items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["type"] == "ClusterIP"
    (port,) = svc["spec"]["ports"]
    c = container(deployment)
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port["port"] == 8000 and port["targetPort"] in named
    notes = svc["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(named[port["targetPort"]])
    assert notes["prometheus.io/path"] == "/metrics"


def test_servicemonitor_selects_the_service() -> None:
    monitor = find(rendered("prometheus-operator"), "ServiceMonitor")
    svc = find(rendered(BASE), "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert "namespaceSelector" not in monitor["spec"]  # same namespace as the Service
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}


@pytest.mark.parametrize("root", (*SERVED, MULTINODE))
def test_snapkv_config_is_yaml_mounted_where_config_points(root: str) -> None:
    cm = find(rendered(root), "ConfigMap", CONFIG_MAP)
    config = yaml.safe_load(cm["data"][CONFIG_KEY])
    assert isinstance(config, dict)
    assert config["kv-compression"] == "snapkv"
    assert all(k == "kv-compression" or k.startswith("snapkv-") for k in config), \
        "engine flags belong to the overlays' container args, SnapKV's to this file"
    for template in pod_templates(root).values():
        c = template_container(template)
        config_path = arg_value(c["args"], "--config")
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")]
        source = volumes[mount["name"]]["configMap"]
        assert source["name"] == CONFIG_MAP and mount.get("readOnly") is True
        (item,) = source["items"]
        assert item["key"] == CONFIG_KEY
        assert f"{mount['mountPath']}/{item['path']}" == config_path


@pytest.mark.parametrize("root", (*SERVED, MULTINODE))
def test_security_context_meets_the_restricted_pod_security_standard(root: str) -> None:
    for template in pod_templates(root).values():
        _assert_restricted(root, template["spec"])


def _assert_restricted(root: str, pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert pod["automountServiceAccountToken"] is False
    # Service links would put VLLM_SNAPKV_PORT=tcp://... and the like into vLLM's environment.
    assert pod["enableServiceLinks"] is False
    allowed = {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected",
               "downwardAPI", "csi", "ephemeral"}
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= allowed, f"{root}: volume {volume}"
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged")
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        # With a read-only root, every place the server writes must be a writable volume.
        writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
        env = env_of(c)
        for path in ("/tmp", "/dev/shm", env["HOME"], env["HF_HOME"], env["VLLM_CACHE_ROOT"]):
            assert any(path == w or path.startswith(w + "/") for w in writable), (root, path)
        assert env["USER"], "torch's getpass.getuser() needs USER when uid has no passwd entry"


def test_quantity_parser() -> None:
    assert quantity("8Gi") == 8 * 2**30 and quantity("2G") == 2 * 10**9
    assert quantity("500m") == Decimal("0.5") and quantity(4) == 4
    for bad in ("8GB", "4 Gi", "", "Gi"):
        with pytest.raises(AssertionError):
            quantity(bad)


@pytest.mark.parametrize("root", (*SERVED, MULTINODE))
def test_quantities_parse_and_requests_fit_limits(root: str) -> None:
    for template in pod_templates(root).values():
        _assert_quantities(root, template)


def _assert_quantities(root: str, template: dict[str, Any]) -> None:
    c = template_container(template)
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert "memory" in limits, "an unbounded vLLM process can take the node's memory"
    for name in requests.keys() & limits.keys():
        assert quantity(requests[name]) <= quantity(limits[name]), (root, name)
    for name, value in {**requests, **limits}.items():
        quantity(value)
        if "/" in name:  # extended resources (GPUs): whole numbers, requests == limits
            assert requests.get(name, value) == limits[name] and quantity(value) % 1 == 0
    shm = 0
    for volume in template["spec"]["volumes"]:
        if "emptyDir" in volume:
            size = quantity(volume["emptyDir"]["sizeLimit"])
            if volume["emptyDir"].get("medium") == "Memory":
                shm += size
    assert shm < quantity(limits["memory"]) / 2, "memory-backed /dev/shm counts against the limit"


def test_gpu_cache_claim_holds_a_model() -> None:
    pvc = find(rendered("overlays/gpu"), "PersistentVolumeClaim")
    assert quantity(pvc["spec"]["resources"]["requests"]["storage"]) >= quantity("20Gi")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_cpu_overlay_serves_the_bundled_model_from_the_cpu_image() -> None:
    objs = rendered("overlays/cpu")
    c = container(find(objs, "Deployment"))
    dockerfile = (REPO / "docker" / "Dockerfile.cpu").read_text()
    assert f"WORKDIR {CPU_IMAGE_ROOT}" in dockerfile and "scripts/setup.sh" in dockerfile
    assert c["image"] == "vllm-snapkv:cpu"  # the tag the README's `docker build -t` gives
    assert c["command"] == [f"{CPU_IMAGE_ROOT}/.venv/bin/vllm", "serve"]
    # The model folder scripts/setup.sh builds (vllm_snapkv.models: <repo>/.cache/models/NAME).
    from vllm_snapkv import models
    assert c["args"][0] == f"{CPU_IMAGE_ROOT}/.cache/models/{models.SMOLLM2}"
    # The engine flags of the CPU preset, as container args.
    preset = yaml.safe_load((REPO / "configs" / "smollm2-cpu-snapkv.yaml").read_text())
    for flag in ("served-model-name", "dtype", "max-model-len", "kv-cache-memory-bytes"):
        assert arg_value(c["args"], f"--{flag}") == str(preset[flag]), flag
    assert arg_value(c["args"], "--dtype") == "float32"
    env = env_of(c)
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # --kv-cache-memory-bytes sizes the cache
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert 1 <= int(env["OMP_NUM_THREADS"]) < quantity(c["resources"]["limits"]["cpu"])
    assert not any("nvidia.com/gpu" in r for r in c["resources"].values())


def test_gpu_overlay_requests_a_gpu_and_keeps_the_model_on_a_pvc() -> None:
    objs = rendered("overlays/gpu")
    deployment = find(objs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["command"] == ["vllm", "serve"]  # on PATH in vllm/vllm-openai images
    assert not c["args"][0].startswith("-") and "/" in c["args"][0]  # a Hugging Face id
    assert arg_value(c["args"], "--kv-cache-dtype") == "auto"
    image = c["image"]
    assert image == "registry.example.com/your-org/vllm-snapkv:cuda"
    assert image in (K8S / "README.md").read_text(), "the image placeholder must be documented"
    pvc = find(objs, "PersistentVolumeClaim")
    (cache,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert cache["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == cache["name"]]
    assert env_of(c)["HF_HOME"].startswith(mount["mountPath"] + "/")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one GPU, ReadWriteOnce
    gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert gpu_taint in pod["tolerations"]


# --- the arguments, parsed by vLLM's own `vllm serve` parser ---------------------------------

_PARSE = r"""
import json, sys
from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser
results = []
for argv in json.loads(sys.stdin.read()):
    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(argv)          # what `vllm serve ARGV` parses (incl. --config)
    ServeSubcommand().validate(args)
    if args.model_tag is not None:
        args.model = args.model_tag
    engine = EngineArgs.from_cli_args(args)  # the plugin folds and validates its flags here
    results.append({"host": args.host, "port": args.port, "model": engine.model,
                    "served_model_name": engine.served_model_name, "dtype": engine.dtype,
                    "max_model_len": engine.max_model_len,
                    "kv_cache_memory_bytes": engine.kv_cache_memory_bytes,
                    "tensor_parallel_size": engine.tensor_parallel_size,
                    "pipeline_parallel_size": engine.pipeline_parallel_size,
                    "nnodes": engine.nnodes, "node_rank": engine.node_rank,
                    "master_addr": engine.master_addr,
                    "headless": bool(getattr(args, "headless", False)),
                    "additional_config": engine.additional_config})
print(json.dumps(results, default=str))
"""


def parse_serve(argvs: list[list[str]], cwd: Path) -> list[dict[str, Any]]:
    """What vLLM's own `vllm serve` parser and EngineArgs, with the plugin registered, make of
    each argv (in a fresh interpreter; no engine starts)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "VLLM_NO_USAGE_STATS": "1"}
    out = subprocess.run([sys.executable, "-c", _PARSE], input=json.dumps(argvs), env=env,
                         capture_output=True, text=True, timeout=180, cwd=cwd)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_vllm_serve_accepts_the_container_args_and_the_config(tmp_path: Path) -> None:
    """No engine starts: vLLM's parser and EngineArgs, with the plugin registered, and nothing
    more. A misspelt key in the ConfigMap or a bad SnapKV value fails here."""
    argvs, expected = [], []
    for root in SERVED:
        c = container(find(rendered(root), "Deployment"))
        assert Path(c["command"][0]).name == "vllm" and c["command"][1:] == ["serve"]
        config_text = find(rendered(root), "ConfigMap", CONFIG_MAP)["data"][CONFIG_KEY]
        local = tmp_path / f"{root.replace('/', '-')}.yaml"
        local.write_text(config_text)
        args = list(c["args"])
        args[args.index("--config") + 1] = str(local)
        argvs.append(["serve", *args])
        expected.append((root, c["args"], yaml.safe_load(config_text)))
    results = parse_serve(argvs, tmp_path)
    for (root, args, config), got in zip(expected, results, strict=True):
        assert got["model"] == args[0], root
        assert (got["host"], got["port"]) == ("0.0.0.0", 8000), root
        extra = got["additional_config"]
        assert extra["kv_compression"] == "snapkv", root
        assert extra["snapkv"]["budget"] == config["snapkv-budget"], root
        if "--dtype" in args:
            assert got["dtype"] == arg_value(args, "--dtype")
        if "--max-model-len" in args:
            assert got["max_model_len"] == int(arg_value(args, "--max-model-len"))
    cpu = results[SERVED.index("overlays/cpu")]
    assert cpu["kv_cache_memory_bytes"] == 2 * 2**30 and cpu["served_model_name"] == ["smollm2"]


# --- multi-node: the LeaderWorkerSet ----------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_leaderworkerset_pod_templates_are_valid_strictly(version: str) -> None:
    """No schema is bundled for the custom resource; its pod templates are core PodTemplateSpecs
    and are validated as such, and its own fields are the few this file may use."""
    lws = find(rendered(MULTINODE), "LeaderWorkerSet")
    assert key(lws) == LWS
    assert set(lws["spec"]) <= LWS_SPEC_KEYS
    assert set(lws["spec"]["leaderWorkerTemplate"]) <= LWS_TEMPLATE_KEYS
    for role, template in lws_templates().items():
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": f"vllm-snapkv-{role}"},
                                      "template": template}, version, strict=True)


def _with_lws_env(args: list[str], index: int) -> list[str]:
    """The container args as Kubernetes expands them in pod ``index`` of the group."""
    env = {**LWS_ENV, "LWS_WORKER_INDEX": str(index)}
    out = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]
    assert not any("$(" in a for a in out), out
    return out


def test_leaderworkerset_runs_one_engine_across_the_group() -> None:
    """Every pod runs `vllm serve` with the same engine and SnapKV flags (each builds the plugin's
    scheduler and workers from them); the leader serves HTTP, the workers are headless; the
    group's size is the number of nodes and of pipeline stages."""
    lws = find(rendered(MULTINODE), "LeaderWorkerSet")
    t = lws["spec"]["leaderWorkerTemplate"]
    assert t["size"] >= 2 and t["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader, worker = (template_container(x) for x in lws_templates().values())
    assert leader["command"] == worker["command"] == ["vllm", "serve"]
    assert leader["image"] == worker["image"]
    la, wa = leader["args"], worker["args"]
    assert la[:la.index("--host")] == wa[:wa.index("--headless")], "engine flags differ"
    for args in (la, wa):
        assert arg_value(args, "--pipeline-parallel-size") == "$(LWS_GROUP_SIZE)"
        assert arg_value(args, "--nnodes") == "$(LWS_GROUP_SIZE)"
        assert arg_value(args, "--node-rank") == "$(LWS_WORKER_INDEX)"
        assert arg_value(args, "--master-addr") == "$(LWS_LEADER_ADDRESS)"
        assert quantity(leader["resources"]["limits"]["nvidia.com/gpu"]) == \
            int(arg_value(args, "--tensor-parallel-size"))
    assert "--port" not in wa and "ports" not in worker and "startupProbe" not in worker
    (port,) = leader["ports"]
    assert port["name"] == "http" and port["containerPort"] == int(arg_value(la, "--port"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert leader[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe


def test_leader_service_selects_only_the_leader_pods() -> None:
    svc = find(rendered(MULTINODE), "Service")
    lws = find(rendered(MULTINODE), "LeaderWorkerSet")
    # The controller labels every pod of the set with the set's name.
    pods = {role: {**t["metadata"]["labels"],
                   "leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"]}
            for role, t in lws_templates().items()}
    selector = svc["spec"]["selector"]
    assert selector.items() <= pods["leader"].items()
    assert not selector.items() <= pods["worker"].items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 8000 and port["targetPort"] == "http"
    notes = svc["metadata"]["annotations"]
    assert (notes["prometheus.io/scrape"], notes["prometheus.io/port"],
            notes["prometheus.io/path"]) == ("true", "8000", "/metrics")


def test_vllm_serve_accepts_the_leader_and_worker_args(tmp_path: Path) -> None:
    """vLLM's parser with the plugin, on both pods' args as the group expands them: one engine
    (TP x PP over the nodes), SnapKV on in both, the worker headless with its node rank."""
    config = tmp_path / "config.yaml"
    config.write_text(find(rendered(MULTINODE), "ConfigMap", CONFIG_MAP)["data"][CONFIG_KEY])
    argvs = []
    for index, template in enumerate(lws_templates().values()):
        args = _with_lws_env(template_container(template)["args"], index)
        args[args.index("--config") + 1] = str(config)
        argvs.append(["serve", *args])
    leader, worker = parse_serve(argvs, tmp_path)
    size = int(LWS_ENV["LWS_GROUP_SIZE"])
    for rank, got in enumerate((leader, worker)):
        assert got["tensor_parallel_size"] == 8 and got["pipeline_parallel_size"] == size
        assert (got["nnodes"], got["node_rank"]) == (size, rank)
        assert got["master_addr"] == LWS_ENV["LWS_LEADER_ADDRESS"]
        assert got["additional_config"]["kv_compression"] == "snapkv"
    assert (leader["headless"], worker["headless"]) == (False, True)
    assert (leader["host"], leader["port"]) == ("0.0.0.0", 8000)
    assert leader["model"] == worker["model"]
    assert leader["additional_config"] == worker["additional_config"]


# --- the Grafana dashboard ConfigMap ----------------------------------------------------------

def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_dashboard_configmap", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_dashboard_configmap_is_generated_from_the_dashboard() -> None:
    generator = _generator()
    path = K8S / BASE / "configmap-grafana-dashboard.yaml"
    assert generator.OUTPUT == path and generator.DASHBOARD == DASHBOARD
    expected = generator.render(DASHBOARD.read_text(encoding="utf-8"))
    assert path.read_text(encoding="utf-8") == expected, \
        "stale: run python3 deploy/kubernetes/make-dashboard-configmap.py"
    check = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_dashboard_configmap_carries_the_dashboard_for_grafanas_sidecar() -> None:
    cm = find(rendered(BASE), "ConfigMap", "vllm-snapkv-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name,) = cm["data"]
    assert name.endswith(".json")
    assert json.loads(cm["data"][name]) == json.loads(DASHBOARD.read_text(encoding="utf-8"))
    # `kubectl apply` (client-side) copies the object into an annotation limited to 256 KiB.
    assert len(json.dumps(cm)) < 256 * 1024 - 4096
