"""The pod watcher against the fake API server, through the real client (lightkube).

Each test runs ``PodWatcher.run`` in the test's loop and drives the fake from the test:
what the watcher's cache holds, which requests it makes, how many watches it keeps open,
what it logs and what it reports.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx2
import pytest
from lightkube import ApiError, AsyncClient
from lightkube.models.meta_v1 import Status

from shunter.discovery import watcher as watcher_module
from shunter.discovery.config import DiscoveryConfig
from shunter.discovery.pods import PodView
from shunter.discovery.watcher import Failure, PodWatcher, _failure, kube_client

from support.fake_kube import FakeKube
from support.harness import free_port

SELECTOR = {"app": "worker"}


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        yield fake


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Failures wait 20 ms, doubling to 80 ms (0.5 s to 30 s in service); info is logged."""
    caplog.set_level(logging.INFO, "shunter.discovery")
    monkeypatch.setattr(watcher_module, "FIRST_BACKOFF_SECS", 0.02)
    monkeypatch.setattr(watcher_module, "MAX_BACKOFF_SECS", 0.08)
    monkeypatch.setattr(watcher_module, "PROBATION_SECS", 0.1)


class Watching:
    """A running watcher and what it has told."""

    def __init__(self, watcher: PodWatcher) -> None:
        self.watcher = watcher
        self.changes = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def names(self) -> set[str]:
        return {pod.name for pod in self.watcher.pods.values()}

    def start(self) -> Watching:
        self.task = asyncio.get_running_loop().create_task(self.watcher.run())
        return self

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)


def watching(
    config: DiscoveryConfig,
    client: Callable[[], AsyncClient],
    changed: Callable[[], None] = lambda: None,
) -> Watching:
    pods: dict[str, PodView] = {}
    box: list[Watching] = []

    def on_change() -> None:
        box[0].changes += 1
        changed()

    running = Watching(PodWatcher(config, pods, on_change, client))
    box.append(running)
    return running


def config(**fields: Any) -> DiscoveryConfig:
    values: dict[str, Any] = {"enabled": True, "selector": SELECTOR, "resync_secs": 30.0}
    return DiscoveryConfig(**{**values, **fields})


def client_of(kube: FakeKube, tmp_path: Path) -> Callable[[], AsyncClient]:
    path = kube.kubeconfig(tmp_path / "kubeconfig")
    return lambda: kube_client(str(path))


@pytest.fixture
async def started(kube: FakeKube, tmp_path: Path) -> AsyncIterator[Callable[[], Watching]]:
    """Starts a watcher of every namespace (once the test has made its first pods)."""
    running: list[Watching] = []

    def start() -> Watching:
        running.append(watching(config(), client_of(kube, tmp_path)).start())
        return running[-1]

    yield start
    for watch in running:
        await watch.stop()


async def opened(kube: FakeKube, count: int = 1) -> None:
    await asyncio.to_thread(kube.wait_until, lambda: kube.watch_count == count)


def watches(kube: FakeKube) -> list[str | None]:
    """The resourceVersion of each WATCH request, in order."""
    return [r.query.get("resourceVersion") for r in kube.requests if "watch" in r.query]


def lists(kube: FakeKube) -> int:
    return sum(1 for r in kube.requests if "watch" not in r.query)


async def test_the_cache_follows_the_list_and_the_watch(
    kube: FakeKube, started: Callable[[], Watching]
) -> None:
    kube.add_pod("w1", labels=SELECTOR)
    kube.add_pod("web", labels={"app": "web"})  # not selected: never crosses the wire
    running = started()
    await opened(kube)
    assert running.names == {"w1"} and running.watcher.listed
    assert kube.requests[0].query == {"labelSelector": "app=worker"}
    assert kube.requests[0].path == "/api/v1/pods"  # no namespace: every namespace
    assert watches(kube) == [kube.resource_version]  # from the list's version

    kube.add_pod("w2", namespace="other", labels=SELECTOR, ready=False)
    await running.until(lambda: running.names == {"w1", "w2"})
    kube.set_ready("w2", True, namespace="other")
    await running.until(lambda: all(p.ready for p in running.watcher.pods.values()))
    kube.delete("w1")  # terminating, then gone
    await running.until(lambda: running.names == {"w2"})
    kube.set_labels("w2", {"app": "other"}, namespace="other")  # no longer selected
    await running.until(lambda: running.names == set())
    assert running.changes >= 6 and running.watcher.failure is None
    assert lists(kube) == 1 and kube.watch_count == 1


async def test_a_namespace_is_listed_and_watched_there(kube: FakeKube, tmp_path: Path) -> None:
    kube.add_pod("w1", labels=SELECTOR)
    kube.add_pod("w2", namespace="other", labels=SELECTOR)
    watch = watching(config(namespace="other"), client_of(kube, tmp_path)).start()
    await opened(kube)
    assert watch.names == {"w2"}
    assert {r.path for r in kube.requests} == {"/api/v1/namespaces/other/pods"}
    await watch.stop()


async def test_every_resync_lists_again_and_closes_the_old_watch(
    kube: FakeKube, tmp_path: Path
) -> None:
    kube.add_pod("w1", labels=SELECTOR)
    watch = watching(config(resync_secs=0.1), client_of(kube, tmp_path)).start()
    peak = 0

    def watched_three_times() -> bool:
        nonlocal peak
        peak = max(peak, kube.watch_count)
        return len(watches(kube)) >= 3 and kube.watch_count == 1

    await asyncio.to_thread(kube.wait_until, watched_three_times)
    assert lists(kube) >= 3 and peak == 1
    kube.force_delete("w1")  # between two lists or during a watch: either way it is seen
    await watch.until(lambda: watch.names == set())
    await watch.stop()
    await opened(kube, 0)  # cancelled: the watch and the client are closed


async def test_a_410_lists_again_at_once_and_converges(
    kube: FakeKube, started: Callable[[], Watching], caplog: pytest.LogCaptureFixture
) -> None:
    kube.add_pod("kept", labels=SELECTOR)
    kube.add_pod("gone", labels=SELECTOR)
    running = started()
    await opened(kube)
    listed = kube.resource_version
    # The watch ends; lightkube re-opens it from its last version, which is now too old.
    kube.compact(end_watches=True)
    await asyncio.to_thread(kube.wait_until, lambda: lists(kube) == 2 and kube.watch_count == 1)
    assert watches(kube) == [listed, listed, kube.resource_version]  # the second answered 410
    assert "pod watch expired (410 Gone); listing again" in caplog.messages
    assert running.watcher.failure is None
    kube.force_delete("gone")  # the new watch works
    await running.until(lambda: running.names == {"kept"})


@pytest.mark.parametrize("reset", [False, True])
async def test_a_severed_watch_lists_again_and_misses_nothing(
    kube: FakeKube, started: Callable[[], Watching], reset: bool, caplog: pytest.LogCaptureFixture
) -> None:
    kube.add_pod("kept", labels=SELECTOR)
    kube.add_pod("gone", labels=SELECTOR)
    running = started()
    await opened(kube)
    kube.forbid()  # keeps the watcher away while things change
    assert kube.sever_watches(reset=reset) == 1
    kube.force_delete("gone")
    kube.add_pod("new", labels=SELECTOR)
    kube.compact()
    kube.forbid(False)
    await running.until(lambda: running.names == {"kept", "new"})
    await opened(kube)  # one: the severed one is not left open
    error = "RemoteProtocolError" if not reset else "ReadError"
    assert any(error in str(getattr(r, "error", "")) for r in caplog.records)
    kube.set_ready("kept", False)  # an event: the watch is healthy again
    await running.until(lambda: running.watcher.failure is None)
    assert caplog.messages.count("service discovery recovered") >= 1


async def test_a_forbidden_list_is_reported_once_and_retried_with_backoff(
    kube: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kube.add_pod("w1", namespace="prod", labels=SELECTOR)
    kube.forbid()
    watch = watching(config(namespace="prod"), client_of(kube, tmp_path)).start()
    await asyncio.to_thread(kube.wait_until, lambda: len(kube.requests) >= 4)
    failure = watch.watcher.failure
    assert failure is not None and failure.denied and failure.step == "list"
    assert failure.message.startswith("the API server forbids the gateway to list pods (403 pods")
    assert "list and watch on pods in namespace prod (a Role and RoleBinding)" in failure.message
    assert not watch.watcher.listed
    failed = [r for r in caplog.records if r.getMessage() == "service discovery failed; retrying"]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR  # once, however often
    assert watch.watcher._backoff == watcher_module.MAX_BACKOFF_SECS  # not a tight loop
    kube.forbid(False)
    await opened(kube)
    assert watch.names == {"w1"} and watch.watcher.failure is None
    assert caplog.messages.count("service discovery recovered") == 1
    await watch.stop()


class WatchForbidden:
    """A client whose RBAC grants list but not watch (the fake forbids everything or
    nothing: it is told before each request)."""

    allowed = False  # set: the role now grants watch too

    def __init__(self, kube: FakeKube, client: AsyncClient) -> None:
        self.kube = kube
        self.client = client

    def list(self, *args: Any, **kwargs: Any) -> Any:
        self.kube.forbid(False)
        return self.client.list(*args, **kwargs)

    def watch(self, *args: Any, **kwargs: Any) -> Any:
        self.kube.forbid(not WatchForbidden.allowed)
        return self.client.watch(*args, **kwargs)

    async def close(self) -> None:
        await self.client.close()


async def test_a_forbidden_watch_is_a_denial_not_a_crash_loop(
    kube: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kube.add_pod("w1", labels=SELECTOR)
    connect = client_of(kube, tmp_path)
    clients: list[WatchForbidden] = []
    WatchForbidden.allowed = False

    def forbidden_watch() -> AsyncClient:
        clients.append(WatchForbidden(kube, connect()))
        return cast(AsyncClient, clients[-1])

    watch = watching(config(), forbidden_watch).start()
    await asyncio.to_thread(kube.wait_until, lambda: len(watches(kube)) >= 4)
    # The LIST works, so the pods are known, but the refusal stays reported.
    assert watch.names == {"w1"} and watch.watcher.listed
    failure = watch.watcher.failure
    assert failure is not None and failure.denied and failure.step == "watch"
    assert failure.message == (
        "the API server forbids the gateway to watch pods (403 Forbidden); grant its service "
        "account list and watch on pods cluster-wide (a ClusterRole and ClusterRoleBinding)"
    )
    failed = [r for r in caplog.records if r.getMessage() == "service discovery failed; retrying"]
    assert len(failed) == 1
    assert "service discovery recovered" not in caplog.messages  # a LIST is not a watch
    assert watch.watcher._backoff == watcher_module.MAX_BACKOFF_SECS
    assert len(clients) >= 4  # each try on a fresh client
    # Granted: a quiet watch proves itself within its probation, not at the resync (30 s).
    WatchForbidden.allowed = True
    await watch.until(lambda: watch.watcher.failure is None)
    assert caplog.messages.count("service discovery recovered") == 1
    await watch.stop()
    await opened(kube, 0)  # stopped: its watch is closed


async def test_rejected_credentials_name_the_token(tmp_path: Path) -> None:
    with FakeKube(token="right") as kube:
        client = client_of(kube, tmp_path)
        kube.token = "rotated"  # the kubeconfig's token is no longer accepted
        watch = watching(config(), client).start()
        await watch.until(lambda: watch.watcher.failure is not None)
        failure = watch.watcher.failure
        assert failure is not None and failure.denied
        assert failure.message.startswith(
            "the API server refused the gateway's credentials (401 Unauthorized) when it "
            "tried to list pods"
        )
        await watch.stop()


async def test_an_unreachable_api_server_is_reported_and_retried(tmp_path: Path) -> None:
    closed = free_port()
    with FakeKube() as kube:
        path = kube.kubeconfig(tmp_path / "kubeconfig")
    text = path.read_text().replace(f":{kube.port}", f":{closed}")
    path.write_text(text)
    made = 0

    def client() -> AsyncClient:
        nonlocal made
        made += 1
        return kube_client(str(path))

    watch = watching(config(), client).start()
    await watch.until(lambda: made >= 3)
    failure = watch.watcher.failure
    assert failure is not None and not failure.denied and failure.step == "list"
    assert failure.message.startswith(
        f"cannot reach the Kubernetes API server at http://127.0.0.1:{closed}/api/v1/pods: "
        "ConnectError("
    )
    assert not watch.watcher.listed and watch.changes == 0
    await watch.stop()


async def test_a_kubeconfig_that_cannot_be_read_is_reported(tmp_path: Path) -> None:
    watch = watching(config(), lambda: kube_client(str(tmp_path / "missing"))).start()
    await watch.until(lambda: watch.watcher.failure is not None)
    failure = watch.watcher.failure
    assert failure is not None and failure.step == "list"
    assert failure.message.startswith("the pod list failed: ConfigError(") and "missing" in (
        failure.message
    )
    await watch.stop()


async def test_an_error_in_the_watch_loop_closes_the_watch_before_listing_again(
    kube: FakeKube, tmp_path: Path
) -> None:
    kube.add_pod("w1", labels=SELECTOR)
    calls = 0
    # Kept here, as a log handler keeps a record's exc_info: its traceback holds the watch
    # loop's frame, so only an explicit close ends the watch, not the garbage collector.
    bug = RuntimeError("a bug in a listener")

    def changed() -> None:  # the first change after the first LIST fails once
        nonlocal calls
        calls += 1
        if calls == 2:
            raise bug

    watch = watching(config(), client_of(kube, tmp_path), changed).start()
    await opened(kube)
    peak = 0

    def relisted() -> bool:
        nonlocal peak
        peak = max(peak, kube.watch_count)
        return len(watches(kube)) == 2 and kube.watch_count == 1

    kube.set_ready("w1", False)
    await asyncio.to_thread(kube.wait_until, relisted)
    failure = watch.watcher.failure
    assert failure is not None and failure.message == (
        "the pod watch failed: RuntimeError('a bug in a listener')"
    )
    assert peak == 1  # the first watch was closed before the second opened
    assert bug.__traceback__ is not None
    await watch.stop()


async def test_other_status_errors_are_reported_with_their_code(
    kube: FakeKube, tmp_path: Path
) -> None:
    # A selector the API server refuses (a 400); the flags' check keeps it from the CLI.
    watch = watching(config(selector={"bad key": "x"}), client_of(kube, tmp_path)).start()
    await watch.until(lambda: watch.watcher.failure is not None)
    failure = watch.watcher.failure
    assert failure is not None and not failure.denied
    assert failure.message.startswith("the API server answered 400 to a list of pods: ")
    await watch.stop()


class ErrorEvents:
    """A client whose every watch yields a BOOKMARK then an ERROR event that is not a 410
    (the API server sends a 500 so when its watch cache fails)."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    def list(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.list(*args, **kwargs)

    def watch(self, *args: Any, **kwargs: Any) -> Any:
        async def events() -> AsyncIterator[tuple[str, Any]]:
            yield "BOOKMARK", None  # lightkube never asks for them; skipped if sent
            status = Status(code=500, reason="InternalError", message="etcd is gone")
            raise ApiError(status=status)

        return events()

    async def close(self) -> None:
        await self.client.close()


async def test_an_error_event_other_than_410_is_a_failure(kube: FakeKube, tmp_path: Path) -> None:
    kube.add_pod("w1", labels=SELECTOR)
    connect = client_of(kube, tmp_path)
    watch = watching(config(), lambda: cast(AsyncClient, ErrorEvents(connect()))).start()
    await watch.until(lambda: watch.watcher.failure is not None)
    assert watch.watcher.failure == Failure(
        "watch", "the API server answered 500 to a watch of pods: etcd is gone"
    )
    assert watch.names == {"w1"}  # the bookmark was skipped (read, it would have failed)
    await watch.stop()


def test_a_transport_error_without_a_request_has_no_address() -> None:
    failure = _failure("list", httpx2.ConnectError("refused"), None)
    assert failure.message == "cannot reach the Kubernetes API server: ConnectError('refused')"
