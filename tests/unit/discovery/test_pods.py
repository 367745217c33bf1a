"""From pods to the workers they should be: the rules of one pass, without a watch."""

from __future__ import annotations

from typing import Any

import pytest

from shunter.discovery.config import DiscoveryConfig, DiscoveryConfigError, parse_selector
from shunter.discovery.pods import PodView, desired_state

REGULAR = DiscoveryConfig(enabled=True, selector={"app": "w"}, port=8000)
PD = DiscoveryConfig(
    enabled=True,
    prefill_selector={"app": "w", "role": "prefill"},
    decode_selector={"app": "w", "role": "decode"},
    port=8000,
)


def pod(name: str = "p", **fields: Any) -> PodView:
    values: dict[str, Any] = {
        "namespace": "ns",
        "uid": f"uid-{name}",
        "ip": "10.0.0.1",
        "labels": {"app": "w"},
        "running": True,
        "ready": True,
        **fields,
    }
    return PodView(name, **values)


def test_a_running_ready_pod_is_one_addable_worker_on_the_port() -> None:
    desired = desired_state([pod()], REGULAR, pd_mode=False)
    (worker,) = desired.workers.values()
    assert worker.address == "10.0.0.1:8000" and worker.addable and worker.role == "regular"
    assert worker.labels() == {
        "smg.ai/pod-name": "p",
        "smg.ai/pod-uid": "uid-p",
        "smg.ai/pod-namespace": "ns",
    }


@pytest.mark.parametrize(
    "fields",
    [{"ready": False}, {"running": False}, {"terminating": True}],
    ids=["not ready", "not running", "terminating"],
)
def test_a_pod_that_cannot_serve_is_known_but_not_addable(fields: dict[str, Any]) -> None:
    (worker,) = desired_state([pod(**fields)], REGULAR, pd_mode=False).workers.values()
    assert not worker.addable


def test_pods_the_selector_does_not_match_or_without_an_ip_are_left_out() -> None:
    pods = [pod("other", labels={"app": "x"}), pod("new", ip=None)]
    assert desired_state(pods, REGULAR, pd_mode=False).workers == {}


def test_worker_ports_make_one_worker_per_port() -> None:
    many = pod(annotations={"smg.ai/worker-ports": "8001, 8002"})
    desired = desired_state([many], REGULAR, pd_mode=False)
    assert sorted(desired.workers) == ["10.0.0.1:8001", "10.0.0.1:8002"]


def test_pd_roles_and_bootstrap_ports_single_or_aligned() -> None:
    prefill = pod(
        "pre",
        ip="10.0.0.2",
        labels={"app": "w", "role": "prefill"},
        annotations={"smg.ai/worker-ports": "8001,8002", "sglang.ai/bootstrap-port": "9001,9002"},
    )
    one = pod(
        "one",
        ip="10.0.0.3",
        labels={"app": "w", "role": "prefill"},
        annotations={"sglang.ai/bootstrap-port": "8998"},
    )
    decode = pod("dec", ip="10.0.0.4", labels={"app": "w", "role": "decode"})
    neither = pod("no", ip="10.0.0.5", labels={"app": "w"})
    workers = desired_state([prefill, one, decode, neither], PD, pd_mode=True).workers
    found = {a: (w.role, w.bootstrap_port) for a, w in workers.items()}
    assert found == {
        "10.0.0.2:8001": ("prefill", 9001),
        "10.0.0.2:8002": ("prefill", 9002),
        "10.0.0.3:8000": ("prefill", 8998),
        "10.0.0.4:8000": ("decode", None),
    }


@pytest.mark.parametrize(
    ("annotations", "error"),
    [
        ({"smg.ai/worker-ports": "8001,70000"}, "'70000' is not a port"),
        ({"smg.ai/worker-ports": "eighty"}, "'eighty' is not a port"),
        (
            {"smg.ai/worker-ports": "8001,8002,8003", "sglang.ai/bootstrap-port": "1,2"},
            "lists 2 ports for 3 worker ports",
        ),
    ],
)
def test_a_bad_annotation_skips_the_pod_and_says_why(
    annotations: dict[str, str], error: str
) -> None:
    bad = pod("bad", labels={"app": "w", "role": "prefill"}, annotations=annotations)
    good = pod("good", ip="10.0.0.9", labels={"app": "w", "role": "prefill"})
    desired = desired_state([bad, good], PD, pd_mode=True)
    assert list(desired.workers) == ["10.0.0.9:8000"]
    assert error in desired.refused["ns/bad"]


def test_an_address_two_pods_claim_goes_to_the_one_that_can_serve() -> None:
    leaving = pod("old", terminating=True)
    coming = pod("new")
    for order in ([leaving, coming], [coming, leaving]):
        (worker,) = desired_state(order, REGULAR, pd_mode=False).workers.values()
        assert worker.pod.name == "new"


def test_model_id_sources_and_ipv6() -> None:
    labelled = pod(ip="fd00::1", labels={"app": "w", "model": "llama"}, annotations={"m": "qwen"})
    for source, model in (
        ("namespace", "ns"),
        ("label:model", "llama"),
        ("annotation:m", "qwen"),
        ("label:absent", None),
        (None, None),
    ):
        config = DiscoveryConfig(enabled=True, selector={"app": "w"}, model_id_from=source)
        (worker,) = desired_state([labelled], config, pd_mode=False).workers.values()
        assert (worker.address, worker.model_id) == ("[fd00::1]:80", model)


@pytest.mark.parametrize(
    ("config", "pd_mode", "error"),
    [
        (DiscoveryConfig(selector={"a": "b"}), False, "need --service-discovery"),
        (DiscoveryConfig(enabled=True, port=0), False, "--service-discovery-port must be"),
        (DiscoveryConfig(enabled=True, namespace="Bad_NS"), False, "is not a namespace name"),
        (DiscoveryConfig(enabled=True, model_id_from="label:"), False, "--model-id-from"),
        (DiscoveryConfig(enabled=True, selector={"a": "b"}), True, "use --prefill-selector"),
        (DiscoveryConfig(enabled=True, prefill_selector={"a": "b"}), True, "needs --prefill"),
        (DiscoveryConfig(enabled=True, decode_selector={"a": "b"}), False, "need --pd-disag"),
    ],
)
def test_bad_settings_name_the_flag(config: DiscoveryConfig, pd_mode: bool, error: str) -> None:
    with pytest.raises(DiscoveryConfigError, match=error):
        config.validate(pd_mode)


def test_selectors_parse_and_refuse_what_the_api_server_would() -> None:
    assert parse_selector("--selector", ["app=w", "tier=", "x.io/role=a-b"]) == {
        "app": "w",
        "tier": "",
        "x.io/role": "a-b",
    }
    for bad in ("app", "app=w=x", "=w", "app=has space"):
        with pytest.raises(DiscoveryConfigError, match="--selector"):
            parse_selector("--selector", [bad])
    shared = PD.server_selector()
    assert shared == {"app": "w"}  # the labels both roles share go to the API server
