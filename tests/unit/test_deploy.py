"""The deployment artifacts under ``deploy/``, checked without a cluster or a Docker daemon.

Every Kubernetes manifest is validated strictly against the official client's models: an
unknown key (a typo), a value of the wrong type or a missing required field fails, where
kubectl would either refuse the object or, worse, drop the misspelt field and apply the rest.
The gateway's args are read by Shunter's own CLI, and the example workers' pods by its own
discovery rules, so a flag or a label that drifts from the code fails here. The objects are
then checked against each other (a Service and the pods it selects, a RoleBinding and the
gateway's ServiceAccount, the probes and the ports, the shutdown grace period and the pod's
termination grace). The Dockerfile is parsed and checked for what holds without building
it: the user the image runs as, its entrypoint, its pinned base, its build argument, its
installs, and that what it copies exists and reaches the builder.
"""

from __future__ import annotations

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

from shunter.cli import serve_config
from shunter.config import GatewayConfig
from shunter.discovery.pods import DesiredWorker, PodView, desired_state

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

# libyaml's safe loader where PyYAML has it: the pure-Python one took 1.5 s of this file's 2.5.
SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# The gateway Deployments: (file, Deployment name).
GATEWAYS = [("gateway.yaml", "shunter"), ("pd.yaml", "shunter-pd")]


def load(name: str) -> list[Doc]:
    """The documents of ``deploy/kubernetes/<name>`` (empty ones, as before a first ``---``,
    left out)."""
    text = (KUBERNETES / name).read_text()
    docs = [doc for doc in yaml.load_all(text, Loader=SAFE_LOADER) if doc is not None]
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


# --- the gateway's args, as its own CLI reads them -----------------------------------------


NAMESPACE = "inference"  # the namespace the manifests are applied in, for the checks


class ArgsRefused(AssertionError):
    """``shunter serve`` refuses a container's args."""


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
        return NAMESPACE  # what the downward API gives

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, arg) for arg in args]


def gateway_config(box: Doc) -> GatewayConfig:
    """The config ``shunter serve`` runs with on the container's args (the image's
    entrypoint); ArgsRefused with the CLI's message when it would exit instead."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return serve_config(expand(list(box["args"]), box))
        except SystemExit:
            lines = err.getvalue().strip().splitlines()
            raise ArgsRefused(lines[-1] if lines else "shunter serve exited") from None


def gateway(name: str, deployment_name: str) -> tuple[list[Doc], Doc, Doc, GatewayConfig]:
    """A file's documents, its gateway Deployment, the gateway container and its config."""
    docs = load(name)
    deployment = one(docs, "Deployment", deployment_name)
    box = container(deployment)
    return docs, deployment, box, gateway_config(box)


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


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_the_gateway_args_parse_with_the_cli(name: str, deployment_name: str) -> None:
    _docs, _deployment, box, config = gateway(name, deployment_name)
    assert "command" not in box  # the image's entrypoint, `shunter serve`, takes the args
    assert config.discovery.enabled
    assert config.discovery.namespace == NAMESPACE  # $(POD_NAMESPACE): the Role's namespace
    assert config.pd_disaggregation is (name == "pd.yaml")
    ports = {p["name"]: p["containerPort"] for p in box["ports"]}
    assert (config.port, config.prometheus_port) == (ports["http"], ports["metrics"])


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--enable-igw"], "--enable-igw is not supported yet"),
        (["--selector", "app=x"], "--selector selects ordinary workers"),
        (["--service-discovery-port", "0"], "--service-discovery-port must be between"),
    ],
)
def test_the_cli_check_refuses(change: list[str], refusal: str) -> None:
    """The PD gateway's args with one change the CLI refuses: the check above can fail."""
    _docs, _deployment, box, _config = gateway("pd.yaml", "shunter-pd")
    with pytest.raises(ArgsRefused, match=re.escape(refusal)):
        gateway_config({**box, "args": [*box["args"], *change]})


def test_an_unknown_variable_in_the_args_is_refused() -> None:
    _docs, _deployment, box, _config = gateway("gateway.yaml", "shunter")
    with pytest.raises(AssertionError, match=r"\$\(NAMESPACE\) names no env var"):
        expand([*box["args"], "$(NAMESPACE)"], box)


# --- the objects agree with each other -----------------------------------------------------


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_the_service_and_budget_select_the_gateway_pods(name: str, deployment_name: str) -> None:
    docs, deployment, box, config = gateway(name, deployment_name)
    labels = pod_labels(deployment)
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    service = one(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert selects(service["spec"]["selector"], labels)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"]["port"] == 80
    assert port_number(box, ports["http"]["targetPort"]) == config.port
    assert port_number(box, ports["metrics"]["targetPort"]) == config.prometheus_port
    budget = one(docs, "PodDisruptionBudget")
    assert selects(budget["spec"]["selector"]["matchLabels"], labels)
    assert deployment["spec"]["replicas"] == 2
    assert budget["spec"]["minAvailable"] == 1  # one gateway may be evicted, never both


def test_no_service_selects_pods_of_another_deployment() -> None:
    """A Service whose selector also matched the workers would send clients to them."""
    deployments = [doc for name in MANIFEST_FILES for doc in find(load(name), "Deployment")]
    for name in MANIFEST_FILES:
        for service in find(load(name), "Service"):
            selected = [
                d["metadata"]["name"]
                for d in deployments
                if selects(service["spec"]["selector"], pod_labels(d))
            ]
            assert len(selected) == 1, f"Service {service['metadata']['name']}: {selected}"


def assert_reads_pods_only(role: Doc) -> None:
    assert len(role["rules"]) == 1, role["rules"]
    rule = role["rules"][0]
    assert rule["apiGroups"] == [""]
    assert rule["resources"] == ["pods"]
    assert sorted(rule["verbs"]) == ["get", "list", "watch"]
    assert set(rule) == {"apiGroups", "resources", "verbs"}


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_rbac_lets_the_gateway_read_pods_and_nothing_else(name: str, deployment_name: str) -> None:
    docs, deployment, _box, _config = gateway(name, deployment_name)
    account = pod_spec(deployment)["serviceAccountName"]
    one(docs, "ServiceAccount", account)
    binding = one(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert binding["roleRef"]["kind"] == "Role"
    assert_reads_pods_only(one(docs, "Role", binding["roleRef"]["name"]))


@pytest.mark.parametrize(
    "rules",
    [
        [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]}],
        [{"apiGroups": [""], "resources": ["pods", "secrets"], "verbs": ["get", "list", "watch"]}],
        [{"apiGroups": ["*"], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        ],
    ],
)
def test_the_rbac_check_refuses_more_or_less_than_reading_pods(rules: list[Doc]) -> None:
    with pytest.raises(AssertionError):
        assert_reads_pods_only({"rules": rules})


def test_the_cluster_wide_variant_binds_the_gateway_service_account() -> None:
    _docs, deployment, box, _config = gateway("gateway.yaml", "shunter")
    docs = load("cluster-wide.yaml")
    binding = one(docs, "ClusterRoleBinding")
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount"
    assert subject["name"] == pod_spec(deployment)["serviceAccountName"]
    assert subject["namespace"]  # a ClusterRoleBinding's subject must name it
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert_reads_pods_only(one(docs, "ClusterRole", binding["roleRef"]["name"]))
    # Its step 3: without --service-discovery-namespace, discovery watches every namespace.
    args = list(box["args"])
    at = args.index("--service-discovery-namespace")
    del args[at : at + 2]
    assert gateway_config({**box, "args": args}).discovery.namespace is None


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_the_probes_hit_liveness_and_readiness_on_the_api_port(
    name: str, deployment_name: str
) -> None:
    _docs, _deployment, box, config = gateway(name, deployment_name)
    for probe, path in (("livenessProbe", "/liveness"), ("readinessProbe", "/readiness")):
        action = box[probe]["httpGet"]
        assert action["path"] == path
        assert port_number(box, action["port"]) == config.port
        assert action.get("scheme", "HTTP") == ("HTTPS" if config.tls_cert_path else "HTTP")


# What a gateway does once its shutdown grace period is over: it closes its worker
# connections and the discovery watch, and exits. terminationGracePeriodSeconds must leave it
# at least this long after the grace period (and any preStop sleep) before SIGKILL.
EXIT_MARGIN_SECS = 10


def required_termination_grace(box: Doc, config: GatewayConfig) -> float:
    """The least terminationGracePeriodSeconds for the gateway ``box`` runs: a preStop sleep
    (it comes before SIGTERM), the shutdown grace period, and the margin to exit."""
    pre_stop = box.get("lifecycle", {}).get("preStop")
    sleep = 0
    if pre_stop is not None:
        assert set(pre_stop) == {"sleep"}, "a preStop hook other than sleep: its time is unknown"
        sleep = int(pre_stop["sleep"]["seconds"])
    return sleep + config.shutdown_grace_secs + EXIT_MARGIN_SECS


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_termination_grace_covers_the_shutdown_grace_period(
    name: str, deployment_name: str
) -> None:
    _docs, deployment, box, config = gateway(name, deployment_name)
    assert config.shutdown_grace_secs == 180  # passed explicitly, and the default
    granted = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert granted >= required_termination_grace(box, config)


def test_the_termination_grace_check_counts_a_pre_stop_sleep() -> None:
    _docs, deployment, box, config = gateway("gateway.yaml", "shunter")
    granted = pod_spec(deployment)["terminationGracePeriodSeconds"]
    slept = {**box, "lifecycle": {"preStop": {"sleep": {"seconds": 60}}}}
    assert granted < required_termination_grace(slept, config)
    shell = {**box, "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}}}
    with pytest.raises(AssertionError, match="other than sleep"):
        required_termination_grace(shell, config)
    longer = {**box, "args": [*box["args"], "--shutdown-grace-period-secs", str(granted)]}
    assert granted < required_termination_grace(longer, gateway_config(longer))


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_the_gateway_runs_as_the_image_user_on_a_read_only_root(
    name: str, deployment_name: str
) -> None:
    _docs, deployment, box, _config = gateway(name, deployment_name)
    image = parse_dockerfile(DOCKERFILE.read_text())
    pod = pod_spec(deployment)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == image_uid(image)
    security = box["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {p["containerPort"] for p in box["ports"]} == exposed_ports(image)


@pytest.mark.parametrize(("name", "deployment_name"), GATEWAYS)
def test_the_default_image_has_the_extras_the_gateway_args_need(
    name: str, deployment_name: str
) -> None:
    _docs, _deployment, _box, config = gateway(name, deployment_name)
    needed = {"kubernetes"} if config.discovery.enabled else set()
    needed |= {"trace"} if config.enable_trace else set()
    assert needed <= default_extras(parse_dockerfile(DOCKERFILE.read_text()))


# --- discovery finds the example workers -----------------------------------------------------


def sglang_port(worker: Doc) -> int:
    """The port an SGLang worker serves on: its ``--port``, declared as the ``http`` port
    its readiness probe uses."""
    box = container(worker)
    assert box["command"] == ["python3", "-m", "sglang.launch_server"]
    given = sglang_arg(worker, "--port")
    assert given is not None, "an SGLang worker without --port serves on 30000: say so"
    port = int(given)
    assert port_number(box, "http") == port
    assert box["readinessProbe"]["httpGet"]["path"] == "/health"
    assert port_number(box, box["readinessProbe"]["httpGet"]["port"]) == port
    return port


def sglang_arg(worker: Doc, flag: str) -> str | None:
    """The value of one of an SGLang worker's flags (None when it is not given)."""
    args: list[str] = container(worker)["args"]
    found = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]
    assert len(found) <= 1, f"{flag} given {len(found)} times"
    return found[0] if found else None


def discovered(config: GatewayConfig, workers: list[Doc]) -> dict[str, list[DesiredWorker]]:
    """What the gateway's discovery makes of one ready pod of each worker Deployment (by
    the Deployment's name): Shunter's own rules, selectors and annotations included."""
    pods = {
        f"10.0.0.{i}": PodView(
            name=f"{worker['metadata']['name']}-0",
            namespace=NAMESPACE,
            uid=f"uid-{i}",
            ip=f"10.0.0.{i}",
            labels=pod_labels(worker),
            annotations=worker["spec"]["template"]["metadata"].get("annotations", {}),
            running=True,
            ready=True,
        )
        for i, worker in enumerate(workers, start=1)
    }
    desired = desired_state(list(pods.values()), config.discovery, config.pd_disaggregation)
    assert not desired.refused, desired.refused
    found: dict[str, list[DesiredWorker]] = {w["metadata"]["name"]: [] for w in workers}
    for worker in desired.workers.values():
        assert worker.addable
        found[worker.pod.name.removesuffix("-0")].append(worker)
    return found


def ports_of(workers: list[DesiredWorker]) -> list[int]:
    return sorted(int(worker.address.rpartition(":")[2]) for worker in workers)


def test_discovery_registers_the_example_workers_at_their_sglang_port() -> None:
    _docs, _deployment, _box, config = gateway("gateway.yaml", "shunter")
    worker = one(load("sglang-worker.yaml"), "Deployment", "sglang-worker")
    assert sglang_arg(worker, "--disaggregation-mode") is None
    (found,) = discovered(config, [worker]).values()
    assert ports_of(found) == [sglang_port(worker)]
    assert [w.role for w in found] == ["regular"]


def test_pd_discovery_finds_each_leg_by_its_selector() -> None:
    docs, _deployment, _box, config = gateway("pd.yaml", "shunter-pd")
    legs = [one(docs, "Deployment", f"sglang-{role}") for role in ("prefill", "decode")]
    found = discovered(config, legs)
    for worker in legs:
        role = sglang_arg(worker, "--disaggregation-mode")
        (leg,) = found[worker["metadata"]["name"]]
        assert leg.role == role
        assert ports_of([leg]) == [sglang_port(worker)]
        bootstrap = sglang_arg(worker, "--disaggregation-bootstrap-port")
        assert leg.bootstrap_port == (None if bootstrap is None else int(bootstrap))
        if role == "prefill":
            assert port_number(container(worker), "bootstrap") == leg.bootstrap_port


def test_each_gateway_finds_only_its_own_workers() -> None:
    """gateway.yaml and pd.yaml may share a namespace: neither registers the other's."""
    _docs, _deployment, _box, plain = gateway("gateway.yaml", "shunter")
    docs, _deployment, _box, pd = gateway("pd.yaml", "shunter-pd")
    pd_workers = [d for d in find(docs, "Deployment") if d["metadata"]["name"] != "shunter-pd"]
    workers = find(load("sglang-worker.yaml"), "Deployment")
    assert not any(discovered(plain, pd_workers).values())
    assert not any(discovered(pd, workers).values())


def test_the_discovery_check_sees_a_worker_the_selector_misses() -> None:
    _docs, _deployment, _box, config = gateway("gateway.yaml", "shunter")
    worker = one(load("sglang-worker.yaml"), "Deployment", "sglang-worker")
    relabelled = json.loads(json.dumps(worker))
    relabelled["spec"]["template"]["metadata"]["labels"] = {"app": "sglang"}
    assert discovered(config, [relabelled]) == {"sglang-worker": []}
    moved = json.loads(json.dumps(worker))
    moved["spec"]["template"]["metadata"]["annotations"]["smg.ai/worker-ports"] = "30001"
    (found,) = discovered(config, [moved]).values()
    assert ports_of(found) != [sglang_port(moved)]


# --- the Dockerfile ---------------------------------------------------------------------------


@dataclass
class Stage:
    base: str  # the FROM image, build args resolved
    name: str | None  # FROM ... AS name
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest)

    def all(self, instruction: str) -> list[str]:
        return [rest for name, rest in self.instructions if name == instruction]

    def arg_default(self, arg: str) -> str | None:
        """The default of ``ARG arg`` in this stage (None when it declares none)."""
        for rest in self.all("ARG"):
            name, equals, default = rest.partition("=")
            if name == arg:
                return default.strip('"') if equals else ""
        return None


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
            words = rest.split()
            image = words[0]
            for arg, default in global_args.items():
                image = image.replace(f"${{{arg}}}", default).replace(f"${arg}", default)
            named = len(words) == 3 and words[1].upper() == "AS"
            stages.append(Stage(image, words[2] if named else None))
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


_INSTALL = re.compile(r"\bpip (?:--python (\S+) )?install\b")


def installs(stage: Stage) -> list[str]:
    """The stage's RUNs that pip-install."""
    return [rest for rest in stage.all("RUN") if _INSTALL.search(rest)]


def shunter_installs(stage: Stage) -> list[str]:
    """The stage's RUNs that pip-install Shunter itself (with the EXTRAS build arg)."""
    return [rest for rest in installs(stage) if "EXTRAS" in rest]


def build_stage(stages: list[Stage]) -> Stage:
    """The one stage that pip-installs Shunter."""
    (stage,) = [stage for stage in stages if shunter_installs(stage)]
    return stage


def default_extras(stages: list[Stage]) -> set[str]:
    """The extras the image has when built without --build-arg EXTRAS."""
    stage = build_stage(stages)
    default = stage.arg_default("EXTRAS")
    assert default is not None, "the stage that installs shunter declares no ARG EXTRAS"
    return {extra.strip() for extra in default.split(",") if extra.strip()}


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


# A pinned base: a Python minor, the slim variant, a Debian release by name, and optionally
# a digest. Not "python:3-slim" or "python:3.11-slim", which move to the next release.
_PINNED_BASE = re.compile(r"python:(\d+)\.(\d+)(?:\.\d+)?-slim-([a-z]+)(@sha256:[0-9a-f]{64})?")
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
    env = env_of(final)
    if env.get("PYTHONUNBUFFERED") != "1":
        problems.append("PYTHONUNBUFFERED=1 is not set: logs would reach kubectl late")
    oldest = oldest_python()
    for stage in stages:
        match = _PINNED_BASE.fullmatch(stage.base)
        if match is None:
            problems.append(f"a base must be pinned as python:X.Y-slim-<debian>: {stage.base}")
        elif (int(match[1]), int(match[2])) < oldest:
            problems.append("a base older than Python {}.{}: {}".format(*oldest, stage.base))
    if len({stage.base for stage in stages}) > 1:  # what is installed is for that Python
        problems.append("the stages have different bases")
    for stage in stages:
        declared = False
        for name, rest in stage.instructions:
            declared |= name == "ARG" and rest.partition("=")[0] == "EXTRAS"
            if name == "RUN" and "EXTRAS" in rest and not declared:
                problems.append("a RUN uses EXTRAS in a stage that does not declare ARG EXTRAS")
        for rest in installs(stage):
            if "--no-cache-dir" not in rest:
                problems.append(f"pip install without --no-cache-dir: {rest}")
    build = [stage for stage in stages[:-1] if shunter_installs(stage)]
    if len(build) != 1:
        problems.append("no build stage pip-installs shunter with the EXTRAS build arg")
    else:
        problems += runtime_copy_problems(build[0], final, env)
        problems += build_input_problems(build[0])
    if installs(final) or any(_BUILD_TOOLS.search(rest) for rest in final.all("RUN")):
        problems.append("the final stage installs packages or build tools (the build stage does)")
    for stage in stages:
        for rest in stage.all("COPY") + stage.all("ADD"):
            words = rest.split()
            if any(word.startswith("--from") for word in words):
                continue
            for source in copied(rest):
                if not (REPO / source).exists():
                    problems.append(f"COPY {source}: no such file in the repository")
                elif ignored(source, patterns):
                    problems.append(f"COPY {source}: left out of the context by the dockerignore")
    return problems


def copied(rest: str) -> list[str]:
    """The sources of a COPY or ADD (its last word is the destination)."""
    return [word for word in rest.split() if not word.startswith("--")][:-1]


def build_input_problems(build: Stage) -> list[str]:
    """``pip install .`` runs pyproject.toml's build backend, from ``backend-path``, and
    setup.py: the build stage must copy them, or the image fails to build."""
    build_system = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    needed = ["pyproject.toml", "setup.py", *build_system.get("backend-path", [])]
    sources = {
        source.rstrip("/")
        for rest in build.all("COPY") + build.all("ADD")
        for source in copied(rest)
    }
    return [f"the build stage does not COPY {name}" for name in needed if name not in sources]


def runtime_copy_problems(build: Stage, final: Stage, env: dict[str, str]) -> list[str]:
    """The build stage installs into a virtualenv; the final stage must copy that and put
    its ``bin`` first on PATH, or ``shunter`` is not found."""
    (install,) = shunter_installs(build)
    match = _INSTALL.search(install)
    assert match is not None
    if match[1] is None or not match[1].endswith("/bin/python"):
        return ["the build stage's pip install names no --python VENV/bin/python"]
    venv = match[1].removesuffix("/bin/python")
    copy = f"--from={build.name} {venv} {venv}"
    problems = []
    if copy not in final.all("COPY"):
        problems.append(f"the final stage does not COPY {copy}")
    if not env.get("PATH", "").startswith(f"{venv}/bin:"):
        problems.append(f"the final stage's PATH does not start with {venv}/bin")
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
        (r"^ARG PYTHON_IMAGE=.*$", "ARG PYTHON_IMAGE=python:3.11-slim", "must be pinned"),
        (r"^ARG PYTHON_IMAGE=.*$", "ARG PYTHON_IMAGE=python:latest", "must be pinned"),
        (r"^ARG PYTHON_IMAGE=.*$", "ARG PYTHON_IMAGE=python:3.10-slim-bookworm", "older than"),
        (r"^FROM \$\{PYTHON_IMAGE\}$", "FROM python:3.12-slim-bookworm", "different bases"),
        (r"--python \S+", "--python /opt/x/bin/python", "does not COPY --from=build /opt/x"),
        (r"^ENV PATH=\S+", "ENV PATH=$PATH:/opt/shunter/bin", "PATH does not start with"),
        (r"--no-cache-dir", "", "without --no-cache-dir"),
        (r"^ARG EXTRAS\b.*\n", "", "does not declare ARG EXTRAS"),
        (r'"\.\$\{EXTRAS[^"]*"', ".", "with the EXTRAS build arg"),
        (r"^EXPOSE", "RUN apt-get install -y gcc\nEXPOSE", "build tools"),
        (r"^EXPOSE", "RUN pip install --no-cache-dir pyyaml\nEXPOSE", "installs packages"),
        (r"^COPY (\S+) (\S+)$", r"COPY \1 notes.txt \2", "notes.txt: no such file"),
        (r"^COPY (\S+) (\S+)$", r"COPY \1 tests/ \2", "tests/: left out of the context"),
        (r" setup\.py ", " ", "does not COPY setup.py"),
        (r"^COPY build_backend/ build_backend/\n", "", "does not COPY build_backend"),
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


def test_the_image_has_the_kubernetes_extra_by_default_and_takes_others() -> None:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    assert default_extras(stages) == {"kubernetes"}
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {"kubernetes", "grpc", "trace"} <= set(extras["optional-dependencies"])


def test_the_image_is_the_compiled_build_unless_asked_otherwise() -> None:
    """COMPILE=1 by default: the install runs with SHUNTER_COMPILE set from it, and the C
    compiler it needs is installed, in the build stage alone, only when compiling."""
    build = build_stage(parse_dockerfile(DOCKERFILE.read_text()))
    assert build.arg_default("COMPILE") == "1"
    (install,) = shunter_installs(build)
    assert install.startswith("SHUNTER_COMPILE=$COMPILE ")
    (compiler,) = [rest for rest in build.all("RUN") if _BUILD_TOOLS.search(rest)]
    assert compiler.startswith('if [ "$COMPILE" = 1 ]; then')


def test_the_build_context_holds_only_what_the_image_needs() -> None:
    patterns = dockerignore_patterns()
    needed = ("pyproject.toml", "README.md", "setup.py", "build_backend/shunter_build.py")
    for path in (*needed, "src/shunter/cli/serve.py"):
        assert not ignored(path, patterns), path
    for path in (".git/config", ".venv/bin/python", "tests/unit/test_deploy.py", ".coverage"):
        assert ignored(path, patterns), path
    assert ignored("src/shunter/__pycache__/cli.cpython-311.pyc", patterns)


def test_the_image_exposes_the_gateway_default_ports() -> None:
    defaults = GatewayConfig()
    assert exposed_ports(parse_dockerfile(DOCKERFILE.read_text())) == {
        defaults.port,
        defaults.prometheus_port,
    }
