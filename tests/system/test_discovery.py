"""Kubernetes service discovery end to end: a gateway process watching the fake API server
(``support/fake_kube.py``, the real LIST/WATCH protocol) through its kubeconfig, and pods
whose address is a real ``shunter sim`` on 127.0.0.1.

Every pod's IP is 127.0.0.1, so a pod names its sims by port (``smg.ai/worker-ports``).
Most scenarios share one gateway, its fake API server and four sims (module fixtures);
each test adds its own pods and the ``pods`` fixture deletes them afterwards and waits
until the gateway has let their workers go, so the next test starts from the manual
worker alone. Scenarios that break the API server for a gateway (RBAC, an unreachable
server) or need PD mode get a gateway and a fake of their own. What the gateway did is
read through its HTTP API (``GET /workers``, ``/readiness``), its metrics and its log.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import pytest

from support.fake_kube import FakeKube
from support.harness import Gateway, Proc, Sim, free_port, wait_for

SELECTED = {"app": "sglang"}
WORKER_PORTS = "smg.ai/worker-ports"
BOOTSTRAP_PORT = "sglang.ai/bootstrap-port"
POD_NAME = "smg.ai/pod-name"
POD_UID = "smg.ai/pod-uid"
REGISTRATIONS = "smg_discovery_registrations_total"
MODEL = "disco"  # what the pods' sims serve; the manual worker serves another model
T = TypeVar("T")


def started(*makers: Callable[[], T]) -> list[T]:
    """Start (or stop) processes two at a time, one per core: each waits for its own
    readiness, and more at once only slow each other's start past its deadline."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda make: make(), makers))


def sim(name: str, *extra: str, port: int | None = None) -> Sim:
    return Sim(name, "--served-model-name", MODEL, "--itl-ms", "10", *extra, port=port)


def discovery_gateway(kubeconfig: Path, *extra: str, workers: tuple[str, ...] = ()) -> Gateway:
    return Gateway(
        "--service-discovery",
        "--kubeconfig",
        str(kubeconfig),
        "--policy",
        "round_robin",
        *extra,
        workers=workers,
        ready=False,
    )


# --- reading the gateway -------------------------------------------------------------------


def workers(gateway: Gateway) -> dict[str, dict[str, Any]]:
    """The gateway's workers by URL."""
    return {w["url"]: w for w in gateway.workers()}


def url(sim: Sim) -> str:
    return f"http://127.0.0.1:{sim.port}"


def discovered(gateway: Gateway) -> dict[str, str]:
    """The discovered workers' URL -> pod name (manual workers carry no pod labels)."""
    return {
        u: w["metadata"][POD_NAME]
        for u, w in workers(gateway).items()
        if POD_NAME in w.get("metadata", {})
    }


def healthy(gateway: Gateway) -> dict[str, str]:
    """The healthy discovered workers' URL -> pod name."""
    found = workers(gateway)
    return {
        u: w["metadata"][POD_NAME]
        for u, w in found.items()
        if POD_NAME in w.get("metadata", {}) and w["is_healthy"]
    }


def of(pod: str, found: dict[str, str]) -> set[str]:
    """The URLs of ``pod``'s workers among ``found``."""
    return {u for u, name in found.items() if name == pod}


def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    wait_for(predicate, timeout, what)


def readiness(gateway: Gateway) -> tuple[int, dict[str, Any]]:
    answer = httpx.get(gateway.url + "/readiness", timeout=5)
    return answer.status_code, answer.json()


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    """One sample of the gateway's /metrics (0 when it has none yet)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(gateway.metrics_url, timeout=5).text.splitlines():
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sample == name and found == wanted:
            return float(value)
    return 0.0


def passes(gateway: Gateway) -> float:
    """Reconcile passes the gateway has finished."""
    return metric(gateway, "smg_discovery_sync_duration_seconds_count")


def log_lines(gateway: Gateway, text: str) -> list[str]:
    return [line for line in gateway.output().splitlines() if text in line]


# --- the shared gateway and its pods ----------------------------------------------------------


class Pods:
    """The pods a test makes on the shared fake; each names its sims by port."""

    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube
        self.names: set[str] = set()

    def add(
        self,
        name: str,
        *sims: Sim,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        ports = {WORKER_PORTS: ",".join(str(s.port) for s in sims)} if sims else {}
        self.names.add(name)
        return self.kube.add_pod(
            name,
            labels=SELECTED if labels is None else labels,
            annotations={**ports, **(annotations or {})},
            **fields,
        )

    def uid(self, name: str) -> str:
        return str(self.kube.pod(name)["metadata"]["uid"])

    def clear(self) -> None:
        for name in self.names:
            with contextlib.suppress(KeyError):  # the test deleted it
                self.kube.force_delete(name)
        self.names.clear()


class Shared:
    def __init__(self, kube: FakeKube, sims: list[Sim], manual: Sim, gateway: Gateway) -> None:
        self.kube = kube
        self.sims = sims
        self.manual = manual  # given by --worker-urls
        self.gateway = gateway


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One gateway selecting app=sglang, its fake API server, four sims for pods and a
    manual worker; one pod (on the first sim) exists before the gateway starts."""
    with FakeKube() as kube:
        *sims, manual = started(
            *(lambda i=i: sim(f"pod-sim-{i}") for i in range(4)),
            lambda: Sim("manual", "--served-model-name", "manual"),
        )
        kube.add_pod("early", labels=SELECTED, annotations={WORKER_PORTS: str(sims[0].port)})
        gateway = discovery_gateway(
            kube.kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig"),
            "--selector",
            *(f"{k}={v}" for k, v in SELECTED.items()),
            "--service-discovery-resync-secs",
            "2",
            "--worker-startup-check-interval",  # an engine not up: given up on in 1 s
            "0.05",
            "--health-success-threshold",
            "1",
            workers=(manual.url,),
        )
        try:
            yield Shared(kube, sims, manual, gateway)
        finally:
            gateway.stop()
            started(*(proc.stop for proc in [manual, *sims]))


@pytest.fixture
def pods(shared: Shared) -> Iterator[Pods]:
    """The test's pods; deleted afterwards (and the "early" pod the module made), and the
    gateway back to its manual worker alone."""
    made = Pods(shared.kube)
    made.names.add("early")
    yield made
    made.clear()
    until(lambda: discovered(shared.gateway) == {}, "the test's workers to go")
    assert url(shared.manual) in workers(shared.gateway)


# --- pods come and go --------------------------------------------------------------------


def test_pods_from_before_and_after_the_start_register(shared: Shared, pods: Pods) -> None:
    gateway, (first, second, *_) = shared.gateway, shared.sims
    until(lambda: healthy(gateway) == {url(first): "early"}, "the pod made before the start")
    pods.add("late", second)
    until(lambda: len(healthy(gateway)) == 2, "the pod made after the start")
    assert healthy(gateway) == {url(first): "early", url(second): "late"}
    assert readiness(gateway)[0] == 200


def test_workers_carry_the_pod_name_and_uid(shared: Shared, pods: Pods) -> None:
    pod = pods.add("labelled", shared.sims[1])
    until(lambda: url(shared.sims[1]) in discovered(shared.gateway), "the pod's worker")
    metadata = workers(shared.gateway)[url(shared.sims[1])]["metadata"]
    assert metadata[POD_NAME] == "labelled"
    assert metadata[POD_UID] == pod["metadata"]["uid"]
    assert metadata["smg.ai/pod-namespace"] == "default"


def test_a_pod_registers_only_once_it_is_ready(shared: Shared, pods: Pods) -> None:
    gateway, target = shared.gateway, shared.sims[1]
    before = passes(gateway)
    pods.add("slow", target, ready=False)
    # A pass that saw the pod has finished (it counts it, as a worker to be), and did not
    # queue its registration.
    until(
        lambda: (
            passes(gateway) > before and metric(gateway, "smg_discovery_workers_discovered") >= 1
        ),
        "a pass over the NotReady pod",
    )
    assert url(target) not in workers(gateway)
    assert not log_lines(gateway, "queued for registration pod=default/slow")
    shared.kube.set_ready("slow", True)
    until(lambda: url(target) in healthy(gateway), "the pod's worker once Ready")


def test_every_port_of_a_multi_port_pod_registers_and_leaves(shared: Shared, pods: Pods) -> None:
    gateway, ports = shared.gateway, shared.sims[1:4]
    pods.add("multi", *ports)
    until(lambda: len(of("multi", healthy(gateway))) == 3, "a worker per port")
    assert of("multi", healthy(gateway)) == {url(s) for s in ports}
    shared.kube.delete("multi")
    until(lambda: not of("multi", discovered(gateway)), "every port's worker to go")


def test_a_terminating_pod_drains_before_its_worker_goes(shared: Shared, pods: Pods) -> None:
    gateway, target = shared.gateway, shared.sims[1]
    pods.add("draining", target)
    until(lambda: url(target) in healthy(gateway), "the pod's worker")
    removed = metric(gateway, "smg_discovery_deregistrations_total", reason="pod_terminating")
    chunks: list[str] = []
    first = threading.Event()
    done = threading.Event()

    def stream() -> None:  # 150 tokens, 10 ms apart: 1.5 s in flight
        body = {"model": MODEL, "prompt": "drain me", "max_tokens": 150, "stream": True}
        with (
            gateway.client() as http,
            http.stream("POST", "/v1/completions", json=body) as answer,
        ):
            for line in answer.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    first.set()
        done.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(10), "the stream never started"
    shared.kube.terminate("draining")
    # Out of the registry, listed as draining while its stream finishes.
    until(
        lambda: workers(gateway).get(url(target), {}).get("status") == "draining",
        "the terminating pod's worker to go",
    )
    assert not done.is_set(), "the stream ended before the worker was taken out"
    reader.join(15)
    assert url(target) not in workers(gateway)  # drained: gone
    assert chunks[-1] == "[DONE]"
    tokens = [json.loads(c) for c in chunks[:-1] if json.loads(c)["choices"]]
    assert sum(1 for c in tokens if c["choices"][0]["text"]) == 150  # every token arrived
    after = metric(gateway, "smg_discovery_deregistrations_total", reason="pod_terminating")
    assert after == removed + 1


@pytest.mark.parametrize("force", [False, True], ids=["graceful", "forced"])
def test_a_deleted_pod_loses_its_worker(shared: Shared, pods: Pods, force: bool) -> None:
    gateway, target = shared.gateway, shared.sims[2]
    pods.add("doomed", target)
    until(lambda: url(target) in healthy(gateway), "the pod's worker")
    (shared.kube.force_delete if force else shared.kube.delete)("doomed")
    until(lambda: url(target) not in workers(gateway), "the deleted pod's worker to go")


def test_a_pod_that_loses_the_selector_loses_its_worker(shared: Shared, pods: Pods) -> None:
    gateway, target = shared.gateway, shared.sims[2]
    pods.add("relabelled", target)
    until(lambda: url(target) in healthy(gateway), "the pod's worker")
    shared.kube.set_labels("relabelled", {"app": "something-else"})
    until(lambda: url(target) not in workers(gateway), "the unselected pod's worker to go")
    shared.kube.set_labels("relabelled", SELECTED)  # selected again: back
    until(lambda: url(target) in healthy(gateway), "the reselected pod's worker")


def test_a_pod_replaced_on_its_address_registers_again_with_its_new_uid(
    shared: Shared, pods: Pods
) -> None:
    gateway, target = shared.gateway, shared.sims[3]
    old = pods.add("stateful-0", target)["metadata"]["uid"]
    until(lambda: url(target) in healthy(gateway), "the pod's worker")
    new = shared.kube.replace("stateful-0", "uid-of-the-new-pod")["metadata"]["uid"]
    assert new != old

    def new_uid() -> bool:
        worker = workers(gateway).get(url(target))  # a pending addition has no metadata yet
        return worker is not None and worker.get("metadata", {}).get(POD_UID) == new

    until(new_uid, "the worker of the new pod")


def test_a_changed_port_annotation_moves_the_worker(shared: Shared, pods: Pods) -> None:
    gateway, (_, before, after, _) = shared.gateway, shared.sims
    pods.add("moving", before)
    until(lambda: url(before) in healthy(gateway), "the worker on the first port")
    shared.kube.set_annotations("moving", {WORKER_PORTS: str(after.port)})
    until(
        lambda: url(after) in healthy(gateway) and url(before) not in workers(gateway),
        "the worker on the new port alone",
    )


# --- the watch breaks -----------------------------------------------------------------------


def test_a_410_and_a_deletion_missed_while_disconnected_converge(
    shared: Shared, pods: Pods
) -> None:
    gateway, kube, (_, one, two, three) = shared.gateway, shared.kube, shared.sims
    pods.add("stays", one)
    pods.add("missed", two)
    until(lambda: {url(one), url(two)} <= set(healthy(gateway)), "the pods' workers")
    # Disconnected (the LIST refused meanwhile), a pod is deleted and the history compacted.
    kube.forbid()
    assert kube.sever_watches() == 1
    kube.force_delete("missed")
    kube.compact()
    kube.forbid(False)
    until(lambda: url(two) not in workers(gateway), "the missed deletion to be found")
    assert url(one) in workers(gateway)
    # An expired watch: the watch ends, lightkube re-opens it from a compacted version.
    kube.wait_until(lambda: kube.watch_count == 1)
    kube.compact(end_watches=True)
    until(lambda: bool(log_lines(gateway, "pod watch expired (410 Gone)")), "the 410")
    pods.add("after", three)  # the watch after the re-LIST works
    until(lambda: url(three) in healthy(gateway), "a pod made after the 410")


def test_a_severed_watch_reconnects(shared: Shared, pods: Pods) -> None:
    gateway, kube, target = shared.gateway, shared.kube, shared.sims[1]
    kube.wait_until(lambda: kube.watch_count == 1)
    watches = sum(1 for r in kube.requests if "watch" in r.query)
    assert kube.sever_watches(reset=True) == 1
    kube.wait_until(
        lambda: (
            kube.watch_count == 1 and sum(1 for r in kube.requests if "watch" in r.query) > watches
        )
    )
    pods.add("after-the-break", target)
    until(lambda: url(target) in healthy(gateway), "a pod made after the reconnection")
    # The old watch is closed, not left behind (a leaked one would keep the count at 2).
    kube.wait_until(lambda: kube.watch_count == 1)


def test_an_engine_not_up_yet_is_retried_until_it_is(shared: Shared, pods: Pods) -> None:
    gateway, port = shared.gateway, free_port()
    address = f"http://127.0.0.1:{port}"

    def failures() -> float:
        return metric(gateway, REGISTRATIONS, source="kubernetes", result="failure")

    failed = failures()
    pods.add("loading", annotations={WORKER_PORTS: str(port)})  # Ready, nothing listens
    until(lambda: failures() > failed, "a registration to give up")
    # Not registered: at most listed as pending, the next registration under way.
    assert workers(gateway).get(address, {"status": "pending"})["status"] == "pending"
    engine = sim("late-engine", port=port)  # the engine has loaded its model
    try:
        until(lambda: address in healthy(gateway), "the engine, once up")
    finally:
        engine.stop()


def test_manual_workers_survive_every_pass(shared: Shared, pods: Pods) -> None:
    gateway, manual, added = shared.gateway, shared.manual, shared.sims[2]
    with gateway.client() as http:
        assert http.post("/workers", json={"url": url(added)}).status_code == 202
    until(lambda: url(added) in workers(gateway), "the worker added through the API")
    # A pod on the manual worker's address: the manual worker is not registered over.
    pods.add("squatter", manual)
    pods.add("churn", shared.sims[3])
    until(lambda: url(shared.sims[3]) in healthy(gateway), "the churning pod's worker")
    for change in (
        lambda: shared.kube.set_ready("churn", False),
        lambda: shared.kube.set_ready("churn", True),
        lambda: shared.kube.delete("squatter"),  # the pod on the manual worker's address
    ):
        start = passes(gateway)
        change()
        until(lambda: passes(gateway) > start, "a pass")  # noqa: B023  (waited on at once)
    for worker in (url(manual), url(added)):
        assert POD_UID not in workers(gateway)[worker].get("metadata", {})
    with gateway.client() as http:
        assert http.delete("/workers/" + quote(url(added), safe="")).status_code == 202


def test_a_malformed_annotation_skips_the_pod_with_its_name(shared: Shared, pods: Pods) -> None:
    gateway, target, refused = shared.gateway, shared.sims[1], shared.sims[2]
    pods.add("bad-port", annotations={WORKER_PORTS: f"{refused.port},70000"})
    pods.add("good", target)
    until(lambda: url(target) in healthy(gateway), "the good pod's worker")
    until(lambda: bool(log_lines(gateway, "pod skipped: bad annotation")), "the skip logged")
    (line,) = log_lines(gateway, "pod skipped: bad annotation")
    assert "pod=default/bad-port" in line and "'70000' is not a port (1-65535)" in line
    assert not of("bad-port", discovered(gateway)) and url(refused) not in workers(gateway)


def test_the_discovery_metrics_move(shared: Shared, pods: Pods) -> None:
    gateway, target = shared.gateway, shared.sims[2]
    ok = (REGISTRATIONS, {"source": "kubernetes", "result": "success"})
    gone = ("smg_discovery_deregistrations_total", {"reason": "pod_gone"})
    before = {name: metric(gateway, name, **labels) for name, labels in (ok, gone)}
    wanted = metric(gateway, "smg_discovery_workers_discovered")
    synced = passes(gateway)
    pods.add("counted", target)
    until(lambda: url(target) in healthy(gateway), "the pod's worker")
    assert metric(gateway, ok[0], **ok[1]) == before[ok[0]] + 1
    assert metric(gateway, "smg_discovery_workers_discovered") == wanted + 1
    assert passes(gateway) > synced
    shared.kube.force_delete("counted")
    until(lambda: url(target) not in workers(gateway), "the pod's worker to go")
    assert metric(gateway, gone[0], **gone[1]) == before[gone[0]] + 1
    until(lambda: metric(gateway, "smg_discovery_workers_discovered") == wanted, "the gauge")


# --- gateways of their own ----------------------------------------------------------------


def test_pd_selectors_assign_roles_and_bootstrap_ports(
    shared: Shared, tmp_path: Path, procs: list[Proc]
) -> None:
    prefill, decode, wrong = shared.sims[1], shared.sims[2], shared.sims[3]
    with FakeKube() as kube:
        kube.add_pod(
            "prefill-0",
            labels={"app": "pd", "role": "prefill"},
            annotations={WORKER_PORTS: str(prefill.port), BOOTSTRAP_PORT: "8998"},
        )
        kube.add_pod(
            "decode-0",
            labels={"app": "pd", "role": "decode"},
            annotations={WORKER_PORTS: str(decode.port)},
        )
        kube.add_pod(  # two bootstrap ports for one worker port: refused
            "prefill-bad",
            labels={"app": "pd", "role": "prefill"},
            annotations={WORKER_PORTS: str(wrong.port), BOOTSTRAP_PORT: "9001,9002"},
        )
        kube.add_pod("other", labels={"app": "pd", "role": "router"})  # neither role
        gateway = discovery_gateway(
            kube.kubeconfig(tmp_path / "kubeconfig"),
            "--pd-disaggregation",
            "--prefill-selector",
            "app=pd",
            "role=prefill",
            "--decode-selector",
            "app=pd",
            "role=decode",
        )
        procs.append(gateway)
        until(lambda: readiness(gateway)[0] == 200, "a healthy prefill and decode")
        found = workers(gateway)
        assert set(found) == {url(prefill), url(decode)}
        assert found[url(prefill)]["worker_type"] == "prefill"
        assert found[url(prefill)]["bootstrap_port"] == 8998
        assert found[url(decode)]["worker_type"] == "decode"
        assert "bootstrap_port" not in found[url(decode)]
        assert kube.requests[0].query["labelSelector"] == "app=pd"  # what both roles share
        (line,) = log_lines(gateway, "pod skipped: bad annotation")
        assert "pod=default/prefill-bad" in line
        assert "lists 2 ports for 1 worker ports" in line


def test_a_forbidden_api_is_reported_once_and_recovers(
    shared: Shared, tmp_path: Path, procs: list[Proc]
) -> None:
    target = shared.sims[1]
    with FakeKube() as kube:
        kube.add_pod("w", labels=SELECTED, annotations={WORKER_PORTS: str(target.port)})
        kube.forbid()
        gateway = discovery_gateway(
            kube.kubeconfig(tmp_path / "kubeconfig"),
            "--selector",
            "app=sglang",
            "--service-discovery-namespace",
            "default",
        )
        procs.append(gateway)
        until(lambda: len(kube.requests) >= 2, "the LIST to be retried")
        status, body = readiness(gateway)
        assert status == 503
        assert body["reason"] == (
            "the API server forbids the gateway to list pods (403 pods is forbidden: User "
            '"system:serviceaccount:default:shunter" cannot list resource "pods" in API group '
            '"" in the namespace "default"); grant its service account list and watch on pods '
            "in namespace default (a Role and RoleBinding)"
        )
        failed = log_lines(gateway, "service discovery failed; retrying")
        assert len(failed) == 1 and "ERROR" in failed[0] and "403" in failed[0]
        kube.forbid(False)
        until(lambda: readiness(gateway)[0] == 200, "readiness once RBAC allows the LIST")
        assert url(target) in workers(gateway)
        assert log_lines(gateway, "service discovery recovered")


def test_an_unreachable_api_server_is_reported_and_retried(
    shared: Shared, tmp_path: Path, procs: list[Proc]
) -> None:
    target, closed = shared.sims[2], free_port()
    config = tmp_path / "kubeconfig"
    with FakeKube() as kube:
        kube.add_pod("w", labels=SELECTED, annotations={WORKER_PORTS: str(target.port)})
        kube.kubeconfig(config)
        config.write_text(config.read_text().replace(f":{kube.port}", f":{closed}"))
        gateway = discovery_gateway(config, "--selector", "app=sglang")
        procs.append(gateway)
        until(lambda: "reach" in readiness(gateway)[1]["reason"], "the failure on /readiness")
        reason = readiness(gateway)[1]["reason"]
        assert re.fullmatch(
            rf"cannot reach the Kubernetes API server at http://127\.0\.0\.1:{closed}/api/v1/pods"
            r": ConnectError\(.*\)",
            reason,
        ), reason
        kube.kubeconfig(config)  # the server is where the kubeconfig now says: found on retry
        until(lambda: readiness(gateway)[0] == 200, "readiness once the server answers")
        assert url(target) in workers(gateway)
