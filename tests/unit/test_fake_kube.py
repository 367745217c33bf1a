"""The fake Kubernetes API server behaves as the real one, as lightkube (the real client) sees it.

Each test also pins down what lightkube 1.0 does in that case (which exception, which
attribute), since the gateway's pod reconciler relies on it: see ``support/fake_kube.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path

import httpx
import httpx2
import pytest
from lightkube import AsyncClient, Client, KubeConfig
from lightkube.core.exceptions import ApiError, NotReadyError
from lightkube.operators import in_, not_equal, not_in
from lightkube.resources.core_v1 import Pod
from lightkube.types import on_error_retry

from support.fake_kube import FakeKube, SelectorError, parse_selector, selects

Event = tuple[str, str, int]  # type, pod name, resourceVersion


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        yield fake


@pytest.fixture
async def client(kube: FakeKube, tmp_path: Path) -> AsyncIterator[AsyncClient]:
    client = AsyncClient(config=KubeConfig.from_file(kube.kubeconfig(tmp_path / "kubeconfig")))
    yield client
    await client.close()


def described(kind: str, pod: Pod) -> Event:
    assert pod.metadata is not None and pod.metadata.name is not None
    assert pod.metadata.resourceVersion is not None
    return kind, pod.metadata.name, int(pod.metadata.resourceVersion)


async def take(watch: AsyncIterable[tuple[str, Pod]], count: int) -> list[tuple[str, Pod]]:
    """The first ``count`` events of ``watch`` (5 s at most)."""
    events: list[tuple[str, Pod]] = []
    async with asyncio.timeout(5):
        async for event in watch:
            events.append(event)
            if len(events) == count:
                break
    return events


async def opened(kube: FakeKube, count: int = 1) -> None:
    """Wait until ``count`` watches are open on the fake."""
    await asyncio.to_thread(kube.wait_until, lambda: kube.watch_count == count)


# --- label selectors ---


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", {}, True),
        ("app=worker", {"app": "worker"}, True),
        ("app==worker", {"app": "worker"}, True),
        ("app=worker", {"app": "other"}, False),
        ("app!=worker", {}, True),
        ("app!=worker", {"app": "worker"}, False),
        ("app", {"app": ""}, True),
        ("app", {}, False),
        ("!app", {}, True),
        ("! app", {"app": "x"}, False),
        ("app=worker, tier in (a, b)", {"app": "worker", "tier": "b"}, True),
        ("app=worker,tier in (a,b)", {"app": "worker", "tier": "c"}, False),
        ("tier notin (a,b)", {}, True),
        ("tier notin (a,b)", {"tier": "a"}, False),
        ("shunter.io/role=decode", {"shunter.io/role": "decode"}, True),
        ("app=", {"app": ""}, True),
    ],
)
def test_selector_grammar(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert selects(parse_selector(selector), labels) is expected


@pytest.mark.parametrize(
    "selector", ["a b", "app=worker,", "tier in ()", "tier in (a", "=x", "app=a b", "bad key!=x"]
)
def test_malformed_selectors_are_refused(selector: str) -> None:
    with pytest.raises(SelectorError):
        parse_selector(selector)


# --- LIST ---


async def test_list_filters_by_selector_and_namespace(kube: FakeKube, client: AsyncClient) -> None:
    kube.add_pod("w1", labels={"app": "worker", "tier": "a"})
    kube.add_pod("w2", labels={"app": "worker", "tier": "b"}, ready=False)
    kube.add_pod("web", labels={"app": "web"})
    kube.add_pod("w3", namespace="other", labels={"app": "worker", "tier": "a"})

    pods = client.list(Pod, labels={"app": "worker"})
    with pytest.raises(NotReadyError):
        pods.resourceVersion  # noqa: B018  (readable only once the iteration started)
    names = [pod.metadata.name async for pod in pods if pod.metadata]
    # The kubeconfig's namespace ("default") unless told otherwise; "*" is every namespace.
    assert names == ["w1", "w2"]
    assert pods.resourceVersion == kube.resource_version
    every = client.list(Pod, namespace="*", labels={"app": "worker", "tier": in_(["a"])})
    assert [pod.metadata.name async for pod in every if pod.metadata] == ["w1", "w3"]
    others = client.list(Pod, labels={"app": not_equal("worker"), "tier": not_in(["b"])})
    assert [pod.metadata.name async for pod in others if pod.metadata] == ["web"]

    (w2,) = [pod async for pod in client.list(Pod, labels={"tier": "b"})]
    assert w2.status is not None and w2.status.conditions is not None
    assert w2.status.phase == "Running" and w2.status.podIP == "127.0.0.1"
    ready = [c.status for c in w2.status.conditions if c.type == "Ready"]
    assert ready == ["False"]
    assert kube.requests[0].query == {"labelSelector": "app=worker"}


async def test_malformed_selector_is_a_400_status(kube: FakeKube, client: AsyncClient) -> None:
    with pytest.raises(ApiError) as raised:
        [pod async for pod in client.list(Pod, labels={"bad key": "x"})]
    assert raised.value.status.code == 400 and raised.value.status.reason == "BadRequest"
    assert raised.value.status.message is not None
    assert "unable to parse requirement" in raised.value.status.message


# --- WATCH ---


async def test_watch_from_the_list_version_sees_every_change_in_order(
    kube: FakeKube, client: AsyncClient
) -> None:
    kube.add_pod("w1", labels={"app": "worker"})
    kube.add_pod("web", labels={"app": "web"})
    pods = client.list(Pod, labels={"app": "worker"})
    assert [pod.metadata.name async for pod in pods if pod.metadata] == ["w1"]
    listed = int(pods.resourceVersion)
    kube.set_ready("w1", False)  # before the watch opens: replayed from the version
    kube.add_pod("other", namespace="other", labels={"app": "worker"})  # not this namespace

    watch = client.watch(Pod, labels={"app": "worker"}, resource_version=str(listed))
    events = asyncio.create_task(take(watch, 7))
    await opened(kube)
    kube.add_pod("w2", labels={"app": "worker"})
    kube.set_labels("w1", {"app": "drained"})  # stops matching: DELETED to this watch
    kube.set_annotations("web", {"note": "x"})  # never matched: nothing
    kube.set_labels("w1", {"app": "worker"})  # matches again: ADDED
    kube.set_ip("w2", "127.0.0.2")
    kube.terminate("w2")
    kube.delete("w2")  # already terminating: straight to DELETED

    received = await events
    seen = [described(kind, pod) for kind, pod in received]
    assert [(kind, name) for kind, name, _ in seen] == [
        ("MODIFIED", "w1"),
        ("ADDED", "w2"),
        ("DELETED", "w1"),
        ("ADDED", "w1"),
        ("MODIFIED", "w2"),
        ("MODIFIED", "w2"),
        ("DELETED", "w2"),
    ]
    versions = [rv for _, _, rv in seen]
    assert versions == sorted(set(versions)) and versions[0] > listed
    moved, terminating = received[4][1], received[5][1]
    assert moved.status is not None and moved.status.podIP == "127.0.0.2"
    assert terminating.metadata is not None and terminating.metadata.deletionTimestamp is not None


async def test_delete_terminates_first_force_delete_does_not(
    kube: FakeKube, client: AsyncClient
) -> None:
    kube.add_pod("graceful")
    kube.add_pod("forced")
    start = kube.resource_version
    kube.delete("graceful")
    kube.force_delete("forced")
    events = await take(client.watch(Pod, resource_version=start), 3)
    assert [described(kind, pod)[:2] for kind, pod in events] == [
        ("MODIFIED", "graceful"),
        ("DELETED", "graceful"),
        ("DELETED", "forced"),
    ]
    forced = events[2][1].metadata
    assert forced is not None and forced.deletionTimestamp is None


async def test_replace_is_deleted_then_added_with_a_new_uid(
    kube: FakeKube, client: AsyncClient
) -> None:
    old = kube.add_pod("w-0", ip="127.0.0.5", labels={"app": "worker"})
    start = kube.resource_version
    new = kube.replace("w-0", "uid-2", ready=False)
    events = await take(client.watch(Pod, resource_version=start), 2)
    assert [(kind, pod.metadata.uid if pod.metadata else None) for kind, pod in events] == [
        ("DELETED", old["metadata"]["uid"]),
        ("ADDED", "uid-2"),
    ]
    assert new["status"]["podIP"] == "127.0.0.5" and new["metadata"]["labels"] == {"app": "worker"}


async def test_watch_without_a_version_starts_with_the_current_state(
    kube: FakeKube, client: AsyncClient
) -> None:
    kube.add_pod("w1", labels={"app": "worker"})
    kube.add_pod("w2", labels={"app": "worker"})
    kube.force_delete("w1")
    kube.add_pod("w3", labels={"app": "worker"})
    events = asyncio.create_task(take(client.watch(Pod, labels={"app": "worker"}), 3))
    await opened(kube)
    kube.set_ready("w3", False)
    seen = [described(kind, pod)[:2] for kind, pod in await events]
    assert seen == [("ADDED", "w2"), ("ADDED", "w3"), ("MODIFIED", "w3")]
    assert "resourceVersion" not in kube.requests[-1].query


async def test_watch_from_a_compacted_version_raises_api_error_410(
    kube: FakeKube, client: AsyncClient
) -> None:
    kube.add_pod("w1")
    listed = kube.resource_version
    kube.compact()
    with pytest.raises(ApiError) as raised:
        await take(client.watch(Pod, resource_version=listed), 1)
    status = raised.value.status
    assert (status.code, status.reason) == (410, "Expired")
    assert status.message == f"too old resource version: {listed} ({kube.resource_version})"
    assert raised.value.response is None  # from an ERROR event, not an HTTP status
    # The version a LIST gives after compaction can be watched.
    relisted = kube.resource_version
    kube.add_pod("w2")
    events = await take(client.watch(Pod, resource_version=relisted), 1)
    assert described(*events[0])[:2] == ("ADDED", "w2")


async def test_compact_ending_watches_brings_lightkube_back_with_an_expired_version(
    kube: FakeKube, client: AsyncClient
) -> None:
    kube.add_pod("w1")
    start = kube.resource_version
    failure = asyncio.create_task(take(client.watch(Pod, resource_version=start), 1))
    await opened(kube)
    kube.compact(end_watches=True)
    with pytest.raises(ApiError) as raised:
        await failure
    assert raised.value.status.code == 410
    # lightkube re-opened the cleanly ended watch by itself, from the same version.
    watches = [r.query.get("resourceVersion") for r in kube.requests if "watch" in r.query]
    assert watches == [start, start]


async def test_on_error_retry_after_410_restarts_from_now_and_misses_deletions(
    kube: FakeKube, client: AsyncClient
) -> None:
    kube.add_pod("kept")
    kube.add_pod("gone")
    listed = kube.resource_version
    kube.force_delete("gone")
    kube.compact()
    watch = client.watch(Pod, resource_version=listed, on_error=on_error_retry)
    events = await take(watch, 1)
    # The 410 is swallowed; the watch starts over with the living as ADDED: "gone" was
    # deleted in the gap and is never reported, hence the reconciler's re-LIST.
    assert described(*events[0])[:2] == ("ADDED", "kept")
    watches = [r.query.get("resourceVersion") for r in kube.requests if "watch" in r.query]
    assert watches == [listed, None]


@pytest.mark.parametrize(
    ("reset", "error"), [(False, httpx2.RemoteProtocolError), (True, httpx2.ReadError)]
)
async def test_severed_watch_raises(
    kube: FakeKube, client: AsyncClient, reset: bool, error: type[Exception]
) -> None:
    kube.add_pod("w1")
    failure = asyncio.create_task(take(client.watch(Pod), 2))
    await opened(kube)
    assert kube.sever_watches(reset=reset) == 1
    assert kube.watch_count == 0
    with pytest.raises(error):
        await failure


async def test_on_error_retry_resumes_a_severed_watch_from_its_last_version(
    kube: FakeKube, client: AsyncClient
) -> None:
    kube.add_pod("w1")
    start = kube.resource_version
    kube.set_ready("w1", False)
    events = asyncio.create_task(
        take(client.watch(Pod, resource_version=start, on_error=on_error_retry), 3)
    )
    await opened(kube)
    last_seen = kube.resource_version
    kube.sever_watches()
    kube.set_ready("w1", True)  # while the watch is down
    kube.add_pod("w2")
    seen = [described(kind, pod)[:2] for kind, pod in await events]
    assert seen == [("MODIFIED", "w1"), ("MODIFIED", "w1"), ("ADDED", "w2")]
    watches = [r.query.get("resourceVersion") for r in kube.requests if "watch" in r.query]
    assert watches == [start, last_seen]


async def test_lightkube_reopens_a_cleanly_ended_watch_from_its_last_version(
    kube: FakeKube, client: AsyncClient
) -> None:
    kube.add_pod("w1")
    events = asyncio.create_task(take(client.watch(Pod), 2))
    await opened(kube)
    last_seen = kube.resource_version
    assert kube.end_watches() == 1
    await opened(kube)
    kube.add_pod("w2")
    assert [described(kind, pod)[:2] for kind, pod in await events] == [
        ("ADDED", "w1"),
        ("ADDED", "w2"),
    ]
    watches = [r.query.get("resourceVersion") for r in kube.requests if "watch" in r.query]
    assert watches == [None, last_seen]


# --- errors from the server ---


async def test_forbidden_surfaces_as_api_error_on_list_and_status_error_on_watch(
    kube: FakeKube, client: AsyncClient
) -> None:
    kube.forbid()
    with pytest.raises(ApiError) as raised:
        [pod async for pod in client.list(Pod, namespace="*")]
    assert raised.value.status.code == 403 and raised.value.status.reason == "Forbidden"
    assert raised.value.status.message == (
        'pods is forbidden: User "system:serviceaccount:default:shunter" cannot list resource '
        '"pods" in API group "" at the cluster scope'
    )
    # A watch's error status is not decoded: a plain HTTPStatusError, not an ApiError.
    with pytest.raises(httpx2.HTTPStatusError) as watch_raised:
        await take(client.watch(Pod), 1)
    assert not isinstance(watch_raised.value, ApiError)
    assert watch_raised.value.response.status_code == 403
    kube.forbid(False)
    assert [pod async for pod in client.list(Pod)] == []


async def test_a_configured_token_is_required(tmp_path: Path) -> None:
    with FakeKube(token="s3cret") as kube:
        kube.add_pod("w1")
        config = KubeConfig.from_file(kube.kubeconfig(tmp_path / "kubeconfig"))
        client = AsyncClient(config=config)
        assert [pod.metadata.name async for pod in client.list(Pod) if pod.metadata] == ["w1"]
        await client.close()
        async with httpx.AsyncClient(base_url=kube.url) as raw:
            refused = await raw.get("/api/v1/pods")
            wrong = await raw.get("/api/v1/pods", headers={"Authorization": "Bearer nope"})
        assert refused.status_code == wrong.status_code == 401
        assert refused.json()["reason"] == "Unauthorized"


# --- the wire ---


async def test_wire_format_is_chunked_newline_delimited_json(kube: FakeKube) -> None:
    kube.add_pod("w1", labels={"app": "worker"})
    reader, writer = await asyncio.open_connection("127.0.0.1", kube.port)
    request = "GET /api/v1/namespaces/default/pods?watch=1&labelSelector=app%3Dworker HTTP/1.1"
    writer.write(f"{request}\r\nHost: fake\r\n\r\n".encode())
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Transfer-Encoding: chunked" in head and b"Content-Type: application/json" in head
        await opened(kube)
        kube.set_ready("w1", False)
        kube.end_watches()
        chunks = []
        while (size := int(await reader.readline(), 16)) > 0:
            chunks.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n"
        assert await reader.readexactly(2) == b"\r\n"  # the final, empty chunk
        # One event per chunk, each a JSON object and a newline.
        assert all(chunk.endswith(b"\n") and chunk.count(b"\n") == 1 for chunk in chunks)
        events = [json.loads(chunk) for chunk in chunks]
        assert [event["type"] for event in events] == ["ADDED", "MODIFIED"]
        assert events[1]["object"]["metadata"]["resourceVersion"] == kube.resource_version
        # The connection is kept alive for the next request.
        writer.write(b"GET /api/v1/nodes HTTP/1.1\r\nHost: fake\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 404")
    writer.close()


async def test_bookmarks_only_for_watches_that_ask(kube: FakeKube, client: AsyncClient) -> None:
    kube.add_pod("w1")
    async with httpx.AsyncClient(base_url=kube.url) as raw:
        params = {"watch": "true", "resourceVersion": kube.resource_version}
        asking = {**params, "allowWatchBookmarks": "true"}
        async with (
            raw.stream("GET", "/api/v1/pods", params=asking) as with_bookmarks,
            raw.stream("GET", "/api/v1/pods", params=params) as without,
        ):
            await opened(kube, 2)
            kube.bookmark()
            kube.add_pod("w2")
            lines = [with_bookmarks.aiter_lines(), without.aiter_lines()]
            async with asyncio.timeout(5):
                first = [json.loads(await anext(line)) for line in lines]
        assert first[0] == {
            "type": "BOOKMARK",
            "object": {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(int(kube.resource_version) - 1)},
            },
        }
        assert first[1]["type"] == "ADDED"  # the bookmark was not sent here
    # The client closed both streams: the fake no longer counts them.
    await asyncio.to_thread(kube.wait_until, lambda: kube.watch_count == 0)
    # lightkube's watch() has no way to ask for bookmarks.
    await take(client.watch(Pod), 1)
    assert "allowWatchBookmarks" not in kube.requests[-1].query


async def test_timeout_seconds_ends_the_stream_cleanly(kube: FakeKube) -> None:
    async with httpx.AsyncClient(base_url=kube.url) as raw:
        params = {"watch": "true", "timeoutSeconds": "1"}
        async with asyncio.timeout(5), raw.stream("GET", "/api/v1/pods", params=params) as stream:
            assert [line async for line in stream.aiter_lines()] == []
        assert (await raw.get("/api/v1/pods")).json()["kind"] == "PodList"


def test_stop_drops_open_watches(kube: FakeKube) -> None:
    with (
        httpx.Client(base_url=kube.url) as raw,
        raw.stream("GET", "/api/v1/pods", params={"watch": "true"}) as stream,
    ):
        kube.wait_until(lambda: kube.watch_count == 1)
        kube.stop()
        with pytest.raises(httpx.RemoteProtocolError):
            stream.read()


def test_sync_client_from_the_kubeconfig_env(
    kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "kubeconfig", "workers")))
    kube.add_pod("w1", namespace="workers", ip=None, phase="Pending", ready=False)
    with Client() as client:
        pods = list(client.list(Pod))
    assert len(pods) == 1 and pods[0].status is not None
    assert pods[0].status.phase == "Pending" and pods[0].status.podIP is None
    assert kube.requests[0].path == "/api/v1/namespaces/workers/pods"
