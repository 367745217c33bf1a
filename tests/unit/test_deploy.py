"""The deployment artifacts under ``deploy/``, checked without a cluster or a Docker daemon.

Every Kubernetes manifest is validated strictly against the official client's models: an
unknown key (a typo), a value of the wrong type or a missing required field fails, where
kubectl would either refuse the object or, worse, drop the misspelt field and apply the rest.
The objects are then checked against each other (a Service and the pods it selects, a
RoleBinding and the gateway's ServiceAccount, the discovery selectors and the example
workers' labels), and the gateway's args against its own CLI, its probes, its ports and its
shutdown timing. The Dockerfile is parsed and checked for what holds without building it:
the user the image runs as, its entrypoint, its build argument, its installs, and that what
it copies exists and reaches the builder.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import json
import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from shunter.cli import build_parser, serve, serve_config
from shunter.config import GatewayConfig

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
# BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile, in place of a root one.
DOCKERIGNORE = REPO / "deploy" / "Dockerfile.dockerignore"

Doc = dict[str, Any]

# The client's models, looked up by name from its own type strings. Imported by name so that
# mypy does not follow the client's thousands of typed models: that doubled its run over the
# whole project (21 s of CPU to 35 s).
models: Any = importlib.import_module("kubernetes.client.models")

# What a gateway still needs once its shutdown grace period is over: the requests that
# arrived last finish, and the process exits. terminationGracePeriodSeconds must cover the
# grace period plus this, or the kubelet's SIGKILL cuts those requests.
DRAIN_MARGIN_SECS = 30

# The gateway Deployments: (file, Deployment name).
GATEWAYS = [("gateway.yaml", "shunter"), ("pd.yaml", "shunter-pd")]


def load(name: str) -> list[Doc]:
    """The documents of ``deploy/kubernetes/<name>`` (empty ones, as before a first ``---``,
    left out)."""
    docs = [doc for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{name}: a document that is not a mapping: {doc!r}"
    return docs


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        doc
        for doc in docs
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# --- a strict validator over the client's models ----------------------------------------------


class ManifestError(ValueError):
    """A manifest the Kubernetes API would refuse (or silently take less of)."""


# The kinds the manifests use, by apiVersion: a Deployment under "v1" is as wrong as a typo.
KINDS: dict[tuple[str, str], str] = {
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Service"): "V1Service",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
}
# How the client's openapi_types name containers.
_LIST = re.compile(r"List\[(.+)\]")
_DICT = re.compile(r"Dict\[str, (.+)\]")
_SCALARS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "float": (int, float),
}


def validate(doc: object) -> Any:
    """The client's model object for one manifest document.

    Each mapping is walked against its model's ``attribute_map`` (the JSON keys it has) and
    ``openapi_types`` (what each holds), so an unknown key or a wrong type is refused with
    its path; then the model is constructed from the checked fields, which refuses a
    missing required field. The client's own ways in are not this strict: its deserializer
    and ``from_dict`` drop unknown keys, and all of them take the Python attribute names
    (``working_dir``) besides the JSON ones (``workingDir``), which the API server does not.
    """
    if not isinstance(doc, dict):
        raise ManifestError(f"a document must be a mapping, not {type(doc).__name__}")
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    model_name = KINDS.get((str(api_version), str(kind)))
    if model_name is None:
        known = ", ".join(f"{v} {k}" for v, k in KINDS)
        raise ManifestError(f"no kind {kind!r} in apiVersion {api_version!r} (known: {known})")
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{kind}: metadata.name is required")
    return _build(doc, model_name, f"{kind}/{name}")


def _build(value: object, type_name: str, path: str) -> Any:
    if value is None:
        raise ManifestError(f"{path}: a key with no value: remove it or give it one")
    if match := _LIST.fullmatch(type_name):
        if not isinstance(value, list):
            raise _wrong_type(path, "a list", value)
        return [_build(item, match[1], f"{path}[{i}]") for i, item in enumerate(value)]
    if match := _DICT.fullmatch(type_name):
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise _wrong_type(path, "a mapping with string keys", value)
        return {key: _build(item, match[1], f"{path}.{key}") for key, item in value.items()}
    if type_name == "object":
        # In the kinds above, "object" is Kubernetes' IntOrString (ports, minAvailable, maxSurge).
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise _wrong_type(path, "an integer or a string", value)
        return value
    if type_name in _SCALARS:
        a_bool = isinstance(value, bool)  # YAML's yes/no/true; Python's bool is an int
        if a_bool != (type_name == "bool") or not isinstance(value, _SCALARS[type_name]):
            raise _wrong_type(path, type_name, value)
        return value
    model = getattr(models, type_name, None)
    if model is None:  # "datetime" and the like: set by the API server, not in a manifest
        raise ManifestError(f"{path}: a field of type {type_name} has no place in a manifest")
    return _build_model(value, model, path)


def _build_model(value: object, model: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise _wrong_type(path, f"a mapping ({model.__name__})", value)
    attribute_of = {key: attribute for attribute, key in model.attribute_map.items()}
    fields: dict[str, Any] = {}
    for key, item in value.items():
        attribute = attribute_of.get(key)
        if attribute is None:
            near = difflib.get_close_matches(str(key), list(attribute_of), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ManifestError(f"{path}: {model.__name__} has no field {key!r}{hint}")
        fields[attribute] = _build(item, model.openapi_types[attribute], f"{path}.{key}")
    try:
        return model(**fields)
    except ValidationError as exc:  # the types were checked above: a required field is missing
        why = "; ".join(
            f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors()
        )
        raise ManifestError(f"{path}: {model.__name__}: {why}") from None


def _wrong_type(path: str, expected: str, value: object) -> ManifestError:
    return ManifestError(f"{path}: expected {expected}, got {type(value).__name__} {value!r}")


MANIFEST_FILES = ["gateway.yaml", "cluster-wide.yaml", "sglang-worker.yaml", "pd.yaml"]


def test_the_manifests_are_the_expected_files() -> None:
    assert sorted(p.name for p in KUBERNETES.glob("*.yaml")) == sorted(MANIFEST_FILES)


@pytest.mark.parametrize("name", MANIFEST_FILES)
def test_every_manifest_document_is_valid_for_the_kubernetes_client(name: str) -> None:
    docs = load(name)
    assert docs
    for doc in docs:
        model = validate(doc)
        assert type(model).__name__ == KINDS[(doc["apiVersion"], doc["kind"])]


MINIMAL_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: example
  annotations:
    note: "8998"
spec:
  replicas: 1
  selector:
    matchLabels: {app: example}
  strategy:
    rollingUpdate: {maxSurge: 1}
  template:
    metadata:
      labels: {app: example}
    spec:
      containers:
        - name: example
          args: ["--port", "30000"]
          ports: [{containerPort: 30000}]
          readinessProbe:
            httpGet: {path: /readiness, port: 30000}
"""


def test_the_validator_takes_a_minimal_deployment() -> None:
    """The baseline the refusals below are variations of: each fails for its one change."""
    deployment = validate(yaml.safe_load(MINIMAL_DEPLOYMENT))
    assert deployment.spec.template.spec.containers[0].ports[0].container_port == 30000


@pytest.mark.parametrize(
    ("old", "new", "refusal"),
    [
        # Unknown keys: a typo, and the Python client's own snake_case name.
        (
            "replicas: 1",
            "replica: 1",
            "Deployment/example.spec: V1DeploymentSpec has no field 'replica'; "
            "did you mean 'replicas'?",
        ),
        ("readinessProbe:", "readiness_probe:", "V1Container has no field 'readiness_probe'"),
        # Wrong types.
        ("replicas: 1", 'replicas: "1"', "spec.replicas: expected int, got str '1'"),
        ("replicas: 1", "replicas: yes", "spec.replicas: expected int, got bool True"),
        ('"30000"]', "30000]", "args[1]: expected str, got int 30000"),
        ('note: "8998"', "note: 8998", "annotations.note: expected str, got int 8998"),
        ("labels: {app: example}", "labels: [app]", "labels: expected a mapping"),
        ("maxSurge: 1", "maxSurge: [1]", "maxSurge: expected an integer or a string"),
        ("port: 30000}", "port: true}", "httpGet.port: expected an integer or a string"),
        ("ports: [{containerPort: 30000}]", "ports: {containerPort: 1}", "ports: expected a list"),
        ("port: 30000}", "port: }", "httpGet.port: a key with no value"),
        # Missing required fields: the models refuse them when constructed.
        (
            "- name: example\n          args:",
            "- args:",
            "containers[0]: V1Container: name: Field required",
        ),
        (
            "  selector:\n    matchLabels: {app: example}\n",
            "",
            "spec: V1DeploymentSpec: selector: Field required",
        ),
        # The kind must exist in its apiVersion.
        ("apiVersion: apps/v1", "apiVersion: v1", "no kind 'Deployment' in apiVersion 'v1'"),
        ("name: example\n  annotations", "annotations", "metadata.name is required"),
    ],
)
def test_the_validator_refuses(old: str, new: str, refusal: str) -> None:
    assert old in MINIMAL_DEPLOYMENT
    bad = yaml.safe_load(MINIMAL_DEPLOYMENT.replace(old, new, 1))
    with pytest.raises(ManifestError) as refused:
        validate(bad)
    assert refusal in str(refused.value)


def test_the_validator_names_a_missing_required_field() -> None:
    rolebinding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "x"},
        "subjects": [{"kind": "ServiceAccount", "name": "x"}],
    }
    missing = "RoleBinding/x: V1RoleBinding: roleRef: Field required"
    with pytest.raises(ManifestError, match=missing):
        validate(rolebinding)


# --- the objects agree with each other -----------------------------------------------------


def pod_spec(deployment: Doc) -> Doc:
    spec: Doc = deployment["spec"]["template"]["spec"]
    return spec


def pod_labels(deployment: Doc) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def container(deployment: Doc) -> Doc:
    (only,) = pod_spec(deployment)["containers"]
    assert isinstance(only, dict)
    return only


def port_number(box: Doc, port: int | str) -> int:
    """A probe's or Service's port on ``box`` (a container): by number, or by its name."""
    ports = {p.get("name"): p["containerPort"] for p in box["ports"]}
    if isinstance(port, str):
        assert port in ports, f"container {box['name']} has no port named {port!r}"
        return int(ports[port])
    assert port in ports.values(), f"container {box['name']} declares no port {port}"
    return port


def flag_groups(args: list[str]) -> list[tuple[str, list[str]]]:
    """``--flag value…`` groups, in order."""
    groups: list[tuple[str, list[str]]] = []
    for token in args:
        if token.startswith("--"):
            groups.append((token, []))
        else:
            assert groups, f"{token!r} comes before any flag"
            groups[-1][1].append(token)
    return groups


def flag(args: list[str], name: str) -> list[str] | None:
    """The values given to ``name`` (``[]`` for a switch), or None when it is absent."""
    found = [values for flag_name, values in flag_groups(args) if flag_name == name]
    assert len(found) <= 1, f"{name} given {len(found)} times"
    return found[0] if found else None


def one_value(args: list[str], name: str) -> str:
    values = flag(args, name)
    assert values is not None and len(values) == 1, f"{name} needs one value, got {values}"
    return values[0]


_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(rf"({_LABEL_NAME})?")


def label_selector(values: list[str] | None) -> dict[str, str]:
    """``k=v …`` values of a selector flag, each a valid Kubernetes label."""
    assert values, "a selector flag with no k=v value"
    pairs: dict[str, str] = {}
    for value in values:
        key, equals, label = value.partition("=")
        assert equals and _LABEL_KEY.fullmatch(key), f"{value!r}: not a label key=value"
        assert _LABEL_VALUE.fullmatch(label), f"{value!r}: not a label value"
        pairs[key] = label
    return pairs


def gateway(name: str, deployment_name: str) -> tuple[list[Doc], Doc, Doc, list[str]]:
    """A file's documents, its gateway Deployment, the gateway container and its args."""
    docs = load(name)
    deployment = one(docs, "Deployment", deployment_name)
    box = container(deployment)
    return docs, deployment, box, list(box["args"])


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_the_service_and_budget_select_the_gateway_pods(name: str, deployment_name: str) -> None:
    docs, deployment, box, args = gateway(name, deployment_name)
    labels = pod_labels(deployment)
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    service = one(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert selects(service["spec"]["selector"], labels)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"]["port"] == 80
    assert port_number(box, ports["http"]["targetPort"]) == int(one_value(args, "--port"))
    assert port_number(box, ports["metrics"]["targetPort"]) == int(
        one_value(args, "--prometheus-port")
    )
    budget = one(docs, "PodDisruptionBudget")
    assert selects(budget["spec"]["selector"]["matchLabels"], labels)
    assert deployment["spec"]["replicas"] == 2
    assert budget["spec"]["minAvailable"] == 1  # one gateway may be evicted, never both


def assert_reads_pods_only(role: Doc) -> None:
    (rule,) = role["rules"]
    assert rule["apiGroups"] == [""]
    assert rule["resources"] == ["pods"]
    assert sorted(rule["verbs"]) == ["get", "list", "watch"]
    assert set(rule) == {"apiGroups", "resources", "verbs"}


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_rbac_lets_the_gateway_read_pods_and_nothing_else(name: str, deployment_name: str) -> None:
    docs, deployment, _box, _args = gateway(name, deployment_name)
    account = pod_spec(deployment)["serviceAccountName"]
    one(docs, "ServiceAccount", account)
    binding = one(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert binding["roleRef"]["kind"] == "Role"
    assert_reads_pods_only(one(docs, "Role", binding["roleRef"]["name"]))


def test_the_cluster_wide_variant_binds_the_gateway_service_account() -> None:
    _docs, deployment, _box, _args = gateway("gateway.yaml", "shunter")
    docs = load("cluster-wide.yaml")
    binding = one(docs, "ClusterRoleBinding")
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount"
    assert subject["name"] == pod_spec(deployment)["serviceAccountName"]
    assert subject["namespace"]  # a ClusterRoleBinding's subject must name it
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert_reads_pods_only(one(docs, "ClusterRole", binding["roleRef"]["name"]))


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_the_probes_hit_liveness_and_readiness_on_the_api_port(
    name: str, deployment_name: str
) -> None:
    _docs, _deployment, box, args = gateway(name, deployment_name)
    api_port = int(one_value(args, "--port"))
    for probe, path in (("livenessProbe", "/liveness"), ("readinessProbe", "/readiness")):
        action = box[probe]["httpGet"]
        assert action["path"] == path
        assert port_number(box, action["port"]) == api_port


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_termination_grace_covers_the_shutdown_grace_period_and_the_drain(
    name: str, deployment_name: str
) -> None:
    _docs, deployment, _box, args = gateway(name, deployment_name)
    grace = int(one_value(args, "--shutdown-grace-period-secs"))
    assert grace >= 0
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= grace + DRAIN_MARGIN_SECS


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_the_gateway_runs_as_the_image_user_on_a_read_only_root(
    name: str, deployment_name: str
) -> None:
    _docs, deployment, box, _args = gateway(name, deployment_name)
    image = parse_dockerfile(DOCKERFILE.read_text())
    pod = pod_spec(deployment)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == image_uid(image)
    security = box["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {p["containerPort"] for p in box["ports"]} == exposed_ports(image)


# --- the gateway's args and its CLI ---------------------------------------------------------

# Flags of features the CLI may not have yet. While it lacks a feature, that feature's flags
# are left out of the parse below and checked by the structural tests around it; once it
# takes any of them it must take them all (a flag named differently on either side fails),
# and they are parsed with the rest.
FEATURE_FLAGS: dict[str, set[str]] = {
    "Kubernetes service discovery": {
        "--service-discovery",
        "--selector",
        "--prefill-selector",
        "--decode-selector",
        "--service-discovery-port",
        "--service-discovery-namespace",
    },
    "the shutdown grace period": {"--shutdown-grace-period-secs"},
}


def flags_the_cli_takes() -> set[str]:
    """Every option string ``shunter serve`` accepts (those it recognises only to refuse as
    not supported yet left out)."""
    _parser, commands = build_parser()
    serve_flags, _run = commands["serve"]
    parser: argparse.ArgumentParser = serve_flags.parser
    return set(parser._option_string_actions) - set(serve.NOT_YET_SUPPORTED)


def expand(args: list[str], box: Doc) -> list[str]:
    """``$(VAR)`` references replaced as the kubelet would; each must name an env var of the
    container (the kubelet leaves an unknown one as it is, which no flag expects)."""
    env = {var["name"]: var for var in box.get("env", [])}

    def value(match: re.Match[str]) -> str:
        var = env.get(match[1])
        assert var is not None, f"$({match[1]}) names no env var of the container"
        if "value" in var:
            return str(var["value"])
        assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        return "default"  # a namespace, as the downward API would give

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, arg) for arg in args]


def args_the_cli_takes(args: list[str], takes: set[str]) -> list[str]:
    """``args`` less the flags of features the CLI (which takes the flags ``takes``) lacks."""
    landed = {feature for feature, flags in FEATURE_FLAGS.items() if flags & takes}
    for feature in landed:
        missing = FEATURE_FLAGS[feature] - takes
        assert not missing, f"the CLI has {feature} but not {sorted(missing)}"
    kept: list[str] = []
    for name, values in flag_groups(args):
        if name in takes:
            kept += [name, *values]
            continue
        pending = [feature for feature, flags in FEATURE_FLAGS.items() if name in flags]
        assert pending and pending[0] not in landed, f"shunter serve does not take {name}"
    return kept


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_the_gateway_args_parse_with_the_cli(name: str, deployment_name: str) -> None:
    _docs, _deployment, box, args = gateway(name, deployment_name)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            config = serve_config(args_the_cli_takes(expand(args, box), flags_the_cli_takes()))
        except SystemExit:
            pytest.fail(f"shunter serve refuses {name}'s args: {err.getvalue()}")
    ports = {p["name"]: p["containerPort"] for p in box["ports"]}
    assert config.port == ports["http"]
    assert config.prometheus_port == ports["metrics"]
    assert config.pd_disaggregation is (name == "pd.yaml")


def test_the_parse_check_holds_back_only_the_flags_of_features_not_landed() -> None:
    args = ["--port", "1", "--service-discovery", "--selector", "a=b", "--log-json"]
    without = {"--port", "--log-json"}
    assert args_the_cli_takes(args, without) == ["--port", "1", "--log-json"]
    landed = without | FEATURE_FLAGS["Kubernetes service discovery"]
    assert args_the_cli_takes(args, landed) == args
    with pytest.raises(AssertionError, match="does not take --no-such-flag"):
        args_the_cli_takes([*args, "--no-such-flag", "1"], without)
    with pytest.raises(AssertionError, match="has Kubernetes service discovery but not"):
        args_the_cli_takes(args, {*without, "--service-discovery", "--selector"})


def assert_namespace_from_the_downward_api(args: list[str], box: Doc) -> None:
    """Discovery watches the gateway's own namespace, the one its Role grants."""
    assert one_value(args, "--service-discovery-namespace") == "$(POD_NAMESPACE)"
    (var,) = [var for var in box["env"] if var["name"] == "POD_NAMESPACE"]
    assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def worker_port(worker: Doc) -> int:
    """The port an SGLang worker serves on: its ``--port``, declared as the ``http`` port
    its readiness probe uses."""
    box = container(worker)
    port = int(one_value(box["args"], "--port"))
    assert port_number(box, "http") == port
    assert box["readinessProbe"]["httpGet"]["path"] == "/health"
    assert port_number(box, box["readinessProbe"]["httpGet"]["port"]) == port
    assert box["command"] == ["python3", "-m", "sglang.launch_server"]
    return port


def test_discovery_finds_the_example_workers() -> None:
    _docs, _deployment, box, args = gateway("gateway.yaml", "shunter")
    assert flag(args, "--service-discovery") == []
    assert_namespace_from_the_downward_api(args, box)
    worker = one(load("sglang-worker.yaml"), "Deployment", "sglang-worker")
    assert selects(label_selector(flag(args, "--selector")), pod_labels(worker))
    assert int(one_value(args, "--service-discovery-port")) == worker_port(worker)
    assert "--disaggregation-mode" not in container(worker)["args"]


def test_pd_discovery_finds_each_leg_with_its_own_selector() -> None:
    docs, _deployment, box, args = gateway("pd.yaml", "shunter-pd")
    assert flag(args, "--pd-disaggregation") == flag(args, "--service-discovery") == []
    assert flag(args, "--selector") is None
    assert_namespace_from_the_downward_api(args, box)
    legs = {role: one(docs, "Deployment", f"sglang-{role}") for role in ("prefill", "decode")}
    for role, worker in legs.items():
        other = legs["decode" if role == "prefill" else "prefill"]
        selector = label_selector(flag(args, f"--{role}-selector"))
        assert selects(selector, pod_labels(worker))
        assert not selects(selector, pod_labels(other))
        assert pod_labels(worker)["role"] == role
        assert one_value(container(worker)["args"], "--disaggregation-mode") == role
        assert int(one_value(args, "--service-discovery-port")) == worker_port(worker)


def test_the_prefill_annotation_names_its_bootstrap_port() -> None:
    prefill = one(load("pd.yaml"), "Deployment", "sglang-prefill")
    box = container(prefill)
    port = int(one_value(box["args"], "--disaggregation-bootstrap-port"))
    annotations = prefill["spec"]["template"]["metadata"]["annotations"]
    assert annotations["sglang.ai/bootstrap-port"] == str(port)
    assert port_number(box, "bootstrap") == port


# --- the Dockerfile ---------------------------------------------------------------------------


@dataclass
class Stage:
    base: str  # the FROM image, build args resolved
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest)

    def all(self, instruction: str) -> list[str]:
        return [rest for name, rest in self.instructions if name == instruction]


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages, with their instructions (continuations joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue  # Docker drops comment lines, inside continuations too
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending.strip())
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            image = rest.split()[0]
            for arg, default in global_args.items():
                image = image.replace(f"${{{arg}}}", default).replace(f"${arg}", default)
            stages.append(Stage(image))
        elif stages:
            stages[-1].instructions.append((instruction, rest))
        elif instruction == "ARG":
            arg, _, default = rest.partition("=")
            global_args[arg] = default.strip('"')
    return stages


def image_uid(stages: list[Stage]) -> int:
    """The numeric UID the image runs as (its final stage's last USER)."""
    users = stages[-1].all("USER")
    assert users, "the final stage sets no USER: the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]}: give a numeric UID (runAsNonRoot checks numbers)"
    return int(uid)


def exposed_ports(stages: list[Stage]) -> set[int]:
    return {int(port.split("/")[0]) for rest in stages[-1].all("EXPOSE") for port in rest.split()}


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in stage.all("ENV"):
        words = shlex.split(rest)
        if "=" not in words[0]:  # the old `ENV KEY value` form
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore leaves ``path`` out of the build context: the last pattern
    matching it or one of its parent directories decides, ``!`` taking it back in."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _glob(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def _glob(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def oldest_python() -> tuple[int, int]:
    """The oldest Python the project supports (pyproject's requires-python)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    match = re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"])
    assert match is not None, project["requires-python"]
    return int(match[1]), int(match[2])


_BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cargo|rustc)\b")


def dockerfile_problems(text: str, patterns: list[str]) -> list[str]:
    """What is wrong with a Dockerfile for the gateway's image, built from the repository
    root with the .dockerignore ``patterns`` (empty when nothing is)."""
    problems: list[str] = []
    stages = parse_dockerfile(text)
    if not stages:
        return ["no FROM"]
    final = stages[-1]
    try:
        if image_uid(stages) == 0:
            problems.append("the final stage runs as root (UID 0)")
    except AssertionError as exc:
        problems.append(str(exc))
    entrypoints = final.all("ENTRYPOINT")
    try:
        entrypoint = json.loads(entrypoints[-1]) if entrypoints else None
    except json.JSONDecodeError:
        entrypoint = entrypoints[-1]
    if entrypoint != ["shunter", "serve"]:
        problems.append(f'the entrypoint must be ["shunter", "serve"] (exec form): {entrypoint}')
    if final.all("CMD") or final.all("HEALTHCHECK"):
        problems.append("the final stage sets CMD or HEALTHCHECK (the manifests give args, probes)")
    if env_of(final).get("PYTHONUNBUFFERED") != "1":
        problems.append("PYTHONUNBUFFERED=1 is not set: logs would reach kubectl late")
    oldest = oldest_python()
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim", final.base)
    if match is None or (int(match[1]), int(match[2])) < oldest:
        wanted = "python:{}.{}+-slim".format(*oldest)
        problems.append(f"the runtime base must be {wanted}, not {final.base}")
    for stage in stages:
        declared = False
        for name, rest in stage.instructions:
            declared |= name == "ARG" and rest.partition("=")[0] == "EXTRAS"
            if name == "RUN" and "EXTRAS" in rest and not declared:
                problems.append("a RUN uses EXTRAS in a stage that does not declare ARG EXTRAS")
    installs = [rest for rest in final.all("RUN") if "pip install" in rest]
    if not any("EXTRAS" in rest for rest in installs):
        problems.append("the final stage's pip install does not use the EXTRAS build arg")
    for rest in installs:
        if "--no-cache-dir" not in rest:
            problems.append(f"pip install without --no-cache-dir in the final stage: {rest}")
    if any(_BUILD_TOOLS.search(rest) for rest in final.all("RUN")):
        problems.append("the final stage installs build tools")
    for stage in stages:
        for rest in stage.all("COPY") + stage.all("ADD"):
            words = rest.split()
            if any(word.startswith("--from") for word in words):
                continue
            for source in [w for w in words if not w.startswith("--")][:-1]:
                if not (REPO / source).exists():
                    problems.append(f"COPY {source}: no such file in the repository")
                elif ignored(source, patterns):
                    problems.append(f"COPY {source}: left out of the context by the dockerignore")
    return problems


def test_the_dockerfile_builds_the_image_the_manifests_expect() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text(), dockerignore_patterns()) == []


@pytest.mark.parametrize(
    ("change", "to", "problem"),
    [
        (r"^USER .*$", "USER 0", "runs as root"),
        (r"^USER .*$", "USER shunter", "numeric UID"),
        (r"^USER .*$", "", "sets no USER"),
        (r"^ENTRYPOINT .*$", "ENTRYPOINT shunter serve", "exec form"),
        (r"^EXPOSE .*$", r"\g<0>\nHEALTHCHECK CMD true", "HEALTHCHECK"),
        (r"PYTHONUNBUFFERED=1", "PYTHONUNBUFFERED=0", "PYTHONUNBUFFERED"),
        (r"^FROM python:\$\{PYTHON_VERSION\}-slim$", "FROM python:3.12", "+-slim, not python:3.12"),
        (r"^FROM python:\$\{PYTHON_VERSION\}-slim$", "FROM python:3.10-slim", "not python:3.10"),
        (r"pip install --no-cache-dir", "pip install", "without --no-cache-dir"),
        (r"(?s)\A(.*)^ARG EXTRAS\b[^\n]*\n", r"\1", "does not declare ARG EXTRAS"),
        (r'"shunter\$\{EXTRAS[^"]*"', "shunter", "does not use the EXTRAS"),
        (r"^EXPOSE", "RUN apt-get install -y gcc\nEXPOSE", "build tools"),
        (r"^COPY (\S+) (\S+)$", r"COPY \1 notes.txt \2", "notes.txt: no such file"),
        (r"^COPY (\S+) (\S+)$", r"COPY \1 tests/ \2", "tests/: left out of the context"),
    ],
)
def test_the_dockerfile_check_finds(change: str, to: str, problem: str) -> None:
    """Each change to the real Dockerfile (the last match of ``change``, a regex, becomes
    ``to``) is one the check must name."""
    text = DOCKERFILE.read_text()
    matches = list(re.finditer(change, text, flags=re.M))
    assert matches, change
    last = matches[-1]
    bad = text[: last.start()] + last.expand(to) + text[last.end() :]
    problems = dockerfile_problems(bad, dockerignore_patterns())
    assert any(problem in p for p in problems), problems


def test_the_build_context_holds_only_what_the_image_needs() -> None:
    patterns = dockerignore_patterns()
    for path in ("pyproject.toml", "README.md", "src/shunter/cli/serve.py"):
        assert not ignored(path, patterns), path
    for path in (".git/config", ".venv/bin/python", "tests/unit/test_deploy.py", ".coverage"):
        assert ignored(path, patterns), path
    assert ignored("src/shunter/__pycache__/cli.cpython-312.pyc", patterns)


def test_the_image_exposes_the_gateway_default_ports() -> None:
    defaults = GatewayConfig()
    assert exposed_ports(parse_dockerfile(DOCKERFILE.read_text())) == {
        defaults.port,
        defaults.prometheus_port,
    }


def test_the_wheels_are_built_on_the_runtime_python() -> None:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    assert len(stages) >= 2, "a build stage and a runtime stage"
    assert stages[0].base == stages[-1].base  # the wheels are built for the runtime's Python
