"""The worker registry: copy-on-write snapshots, upserts, indexes."""

from __future__ import annotations

import threading

from shunter.fleet.registry import WorkerRegistry
from shunter.fleet.worker import Worker, WorkerType

from support.fakes import make_worker


def make(url: str, model: str = "m", kind: WorkerType = WorkerType.REGULAR) -> Worker:
    return make_worker(url, models=(model,), worker_type=kind)


def test_get_by_model_returns_the_same_tuple_without_copying() -> None:
    registry = WorkerRegistry()
    for i in range(3):
        registry.register(make(f"http://w{i}"))
    first = registry.get_by_model("m")
    assert isinstance(first, tuple)
    assert first is registry.get_by_model("m")
    assert [w.url for w in first] == ["http://w0", "http://w1", "http://w2"]
    assert registry.get_by_model("missing") == ()


def test_writes_publish_a_new_tuple_and_leave_old_readers_alone() -> None:
    registry = WorkerRegistry()
    registry.register(make("http://a"))
    before = registry.get_by_model("m")
    registry.register(make("http://b"))
    assert [w.url for w in before] == ["http://a"]
    assert [w.url for w in registry.get_by_model("m")] == ["http://a", "http://b"]


def test_reregistering_a_url_is_an_upsert_with_no_duplicates_in_any_index() -> None:
    registry = WorkerRegistry()
    registry.register(make("http://a"))
    registry.register(make("http://b"))
    replacement = make("http://a")
    old = registry.register(replacement)
    assert old is not None and old is not replacement
    assert registry.get_by_model("m") == (replacement, registry.get_by_url("http://b"))
    assert len(registry.get_by_type(WorkerType.REGULAR)) == 2
    assert len(registry.get_native_by_model("m")) == 2
    assert len(registry.all()) == 2
    assert registry.get_by_url("http://a") is replacement


def test_upsert_that_changes_model_moves_the_worker_between_indexes() -> None:
    registry = WorkerRegistry()
    registry.register(make("http://a", "m1"))
    registry.register(make("http://a", "m2"))
    assert registry.get_by_model("m1") == ()
    assert [w.url for w in registry.get_by_model("m2")] == ["http://a"]
    assert registry.models() == ("m2",)


def test_remove_updates_every_index() -> None:
    registry = WorkerRegistry()
    a, b = make("http://a"), make("http://b", kind=WorkerType.DECODE)
    registry.register(a)
    registry.register(b)
    assert registry.remove("http://a") is a
    assert registry.get_by_model("m") == (b,)
    assert registry.get_by_type(WorkerType.REGULAR) == ()
    assert registry.remove("http://a") is None


def test_remove_base_url_takes_every_dp_rank() -> None:
    registry = WorkerRegistry()
    for rank in range(3):
        registry.register(make_worker(f"http://a@{rank}", models=("m",), dp_rank=rank, dp_size=3))
    registry.register(make("http://b"))
    removed = registry.remove_base_url("http://a")
    assert sorted(w.url for w in removed) == ["http://a@0", "http://a@1", "http://a@2"]
    assert [w.url for w in registry.all()] == ["http://b"]


def test_only_model_is_set_for_a_single_model_fleet() -> None:
    registry = WorkerRegistry()
    assert registry.only_model() is None
    registry.register(make("http://a", "m1"))
    assert registry.only_model() == ("m1", registry.get_by_model("m1"))
    registry.register(make("http://b", "m2"))
    assert registry.only_model() is None


def test_stats() -> None:
    registry = WorkerRegistry()
    registry.register(make("http://a", "m1"))
    registry.register(make("http://p", "m1", WorkerType.PREFILL))
    sick = make("http://d", "m2", WorkerType.DECODE)
    sick.state.retired()
    sick.state.in_flight = 3
    registry.register(sick)
    assert registry.stats() == {
        "total_workers": 3,
        "total_models": 2,
        "healthy_workers": 2,
        "total_load": 3,
        "regular_workers": 1,
        "prefill_workers": 1,
        "decode_workers": 1,
    }


def test_readers_always_see_a_consistent_snapshot_while_a_thread_writes() -> None:
    registry = WorkerRegistry()
    stable = [make(f"http://stable{i}") for i in range(4)]
    for worker in stable:
        registry.register(worker)
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            registry.register(make(f"http://churn{i % 8}"))
            registry.remove(f"http://churn{(i + 4) % 8}")
            i += 1

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for _ in range(20000):
            snapshot = registry.get_by_model("m")
            urls = [w.url for w in snapshot]
            assert urls[:4] == [w.url for w in stable]
            assert len(urls) == len(set(urls))
    finally:
        stop.set()
        writer.join()
