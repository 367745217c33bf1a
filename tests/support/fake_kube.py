"""A fake Kubernetes API server for pods that speaks the real wire protocol over HTTP.

No cluster can run here, so the gateway's pod discovery is tested against this: plain HTTP
on 127.0.0.1, served from a background thread with its own event loop, so that sync tests
(driving a gateway subprocess through ``kubeconfig(path)``) and async tests alike can use
it. It serves the two pod collections, ``/api/v1/pods`` and
``/api/v1/namespaces/{ns}/pods``, as the API server does:

* LIST answers a ``PodList`` of the current state (a ``resourceVersion`` on the request is
  ignored) filtered by ``labelSelector``; a malformed selector is a 400 ``Status``.
* WATCH (``watch=true``) answers 200 with a chunked stream, one JSON event and a newline
  per chunk, of every change after ``resourceVersion`` in order. Without a version (or
  with "0") it first sends an ADDED for every pod that matches now. A pod that stops
  matching the selector reaches that watch as DELETED (its previous content, the new
  version), one that starts matching as ADDED. ``allowWatchBookmarks=true`` asks for
  BOOKMARK events (sent when the test calls ``bookmark()``); ``timeoutSeconds`` ends the
  stream cleanly. A version older than the compaction point answers 200 and a single
  ERROR event (``Status`` 410, reason ``Expired``), then ends the stream.
* Every change bumps one global resourceVersion (a string of an integer), which the pod
  carries in ``metadata.resourceVersion``. Empty ``labels``/``annotations`` are left out
  of the object, as the API server leaves them out.
* With a token configured, a request without ``Authorization: Bearer <token>`` is a 401;
  ``forbid()`` answers every request 403 with the message RBAC gives.

What the real client, lightkube 1.0 (``AsyncClient``), makes of it (proven in
``tests/unit/test_fake_kube.py`` unless marked as read from its source):

* ``client.list(Pod, namespace=..., labels=...)`` returns an iterable whose
  ``.resourceVersion`` is readable only once the iteration has started (``NotReadyError``
  before); ``namespace="*"`` lists every namespace. ``client.watch(Pod,
  resource_version=rv, labels=...)`` yields ``(type, Pod)`` pairs.
* An error status on a LIST raises ``ApiError`` (``e.status.code``, ``e.status.message``).
  On a WATCH it raises a plain ``httpx2.HTTPStatusError`` (``e.response.status_code``):
  lightkube checks the streamed response before reading its body, so the ``Status`` is
  not decoded. (Its source decodes an error body only if the Content-Type is exactly
  ``application/json``, which is what this fake and the API server send.)
* The 410 ERROR event raises ``ApiError`` with ``status.code == 410`` and ``status.reason
  == "Expired"``; it comes from the stream, not an HTTP status, so ``e.response`` is None
  (and reading ``e.request`` raises ``RuntimeError``).
* A watch connection dropped mid-stream raises ``httpx2.RemoteProtocolError`` ("peer
  closed connection without sending complete message body"), or ``httpx2.ReadError``
  when the peer resets it (``sever_watches(reset=True)``).
* A stream that ends cleanly (``timeoutSeconds``, ``end_watches()``) is re-opened by
  lightkube by itself, from the last version it yielded: the iteration never ends. Errors
  go to ``on_error``: the default raises; ``on_error_retry`` re-opens from the last
  version, except after a 410 where it re-opens with no version, so the pods deleted in
  the gap are never reported (the ADDED replay shows only the living). A reconciler
  therefore lets the error raise and re-LISTs.
* ``watch()`` has no way to ask for bookmarks (it never sends ``allowWatchBookmarks``), and
  (from its source) a watch has no read timeout: a silent connection blocks it forever, so
  a reconciler passes ``server_timeout`` or keeps its own deadline.

Use it as a context manager (``with FakeKube() as kube:``) or ``start()``/``stop()``. The
test controls are plain thread-safe methods; those that act on open connections
(``sever_watches``, ``end_watches``) block until done, so they must not be called from the
fake's own loop (nothing in a test runs there).
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import json
import re
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qsl, urlsplit

Pod = dict[str, Any]
T = TypeVar("T")

# --- label selectors --------------------------------------------------------------------

_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = rf"(?:[a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}"
_VALUE = rf"(?:{_NAME})?"
_EXISTS = re.compile(rf"\s*(!?)\s*({_KEY})\s*")
_COMPARE = re.compile(rf"\s*({_KEY})\s*(==|=|!=)\s*({_VALUE})\s*")
_SET = re.compile(rf"\s*({_KEY})\s+(in|notin)\s*\(([^()]*)\)\s*")
_SPLIT = re.compile(r",(?![^()]*\))")  # commas outside parentheses


class SelectorError(ValueError):
    """A label selector the API server would refuse (it answers 400)."""


@dataclass(frozen=True)
class Requirement:
    """One comma-separated term of a label selector: ``key op values``."""

    key: str
    op: str  # "exists", "!", "=", "!=", "in", "notin"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "!":
            return value is None
        if self.op in ("=", "in"):
            return value is not None and value in self.values
        return value is None or value not in self.values  # "!=" and "notin"


def parse_selector(text: str) -> tuple[Requirement, ...]:
    """The requirements of ``text`` (all must hold; empty text selects everything)."""
    if not text.strip():
        return ()
    return tuple(_parse_requirement(term) for term in _SPLIT.split(text))


def _parse_requirement(term: str) -> Requirement:
    if match := _EXISTS.fullmatch(term):
        return Requirement(match[2], "!" if match[1] else "exists")
    if match := _COMPARE.fullmatch(term):
        op = "=" if match[2] == "==" else match[2]
        return Requirement(match[1], op, frozenset([match[3]]))
    if match := _SET.fullmatch(term):
        values = [value.strip() for value in match[3].split(",")]
        if values == [""]:
            raise SelectorError(f"unable to parse requirement: {term!r}: values set can't be empty")
        if any(not re.fullmatch(_VALUE, value) for value in values):
            raise SelectorError(f"unable to parse requirement: {term!r}: invalid label value")
        return Requirement(match[1], match[2], frozenset(values))
    raise SelectorError(f"unable to parse requirement: {term!r}")


def selects(selector: tuple[Requirement, ...], labels: Mapping[str, str]) -> bool:
    return all(requirement.matches(labels) for requirement in selector)


def _selected(pod: Pod | None, namespace: str | None, selector: tuple[Requirement, ...]) -> bool:
    """Whether a LIST or WATCH of ``namespace`` (None: all) with ``selector`` shows ``pod``."""
    if pod is None:
        return False
    meta = pod["metadata"]
    in_namespace = namespace is None or meta["namespace"] == namespace
    return in_namespace and selects(selector, meta.get("labels", {}))


# --- the store's history and the watches that follow it --------------------------------


@dataclass(frozen=True)
class _Change:
    """One entry of the history: the object after (None when deleted) and before."""

    rv: int
    type: str  # ADDED, MODIFIED, DELETED, or BOOKMARK (neither object)
    obj: Pod | None
    prev: Pod | None


@dataclass(eq=False)
class _Watch:
    namespace: str | None
    selector: tuple[Requirement, ...]
    bookmarks: bool
    writer: asyncio.StreamWriter
    cursor: int  # index of the next history entry to send
    wake: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    ended: bool = False

    def selects(self, pod: Pod | None) -> bool:
        return _selected(pod, self.namespace, self.selector)

    def wake_up(self) -> None:
        if not self.wake.done():
            self.wake.set_result(None)

    def event_for(self, change: _Change) -> tuple[str, Pod] | None:
        """What this watch sees of ``change``, as the API server's watch cache decides."""
        if change.type == "BOOKMARK":
            if not self.bookmarks:
                return None
            return "BOOKMARK", {"kind": "Pod", "apiVersion": "v1", "metadata": _rv_meta(change.rv)}
        now = change.type != "DELETED" and self.selects(change.obj)
        before = self.selects(change.prev)
        if now and change.obj is not None:
            return ("MODIFIED" if before else "ADDED"), change.obj
        if before and change.prev is not None:  # gone, or no longer selected
            gone = copy.deepcopy(change.prev)
            gone["metadata"]["resourceVersion"] = str(change.rv)
            return "DELETED", gone
        return None


def _rv_meta(rv: int) -> dict[str, str]:
    return {"resourceVersion": str(rv)}


class Request(NamedTuple):
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]


def _now(offset_seconds: int = 0) -> str:
    moment = datetime.now(UTC) + timedelta(seconds=offset_seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
        **extra,
    }


_COLLECTION = re.compile(r"/api/v1/(?:namespaces/([^/]+)/)?pods")
_WATCH_HEAD = (
    b"HTTP/1.1 200 OK\r\nCache-Control: no-cache, private\r\n"
    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _chunk(event_type: str, obj: Mapping[str, Any]) -> bytes:
    line = json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"
    return b"%x\r\n%s\r\n" % (len(line), line)


# --- the server ---------------------------------------------------------------------------


class FakeKube:
    """A fake API server holding pods; see the module docstring."""

    def __init__(
        self, *, token: str | None = None, user: str = "system:serviceaccount:default:shunter"
    ) -> None:
        self.token = token
        self.user = user
        self.port = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # for wait_until()
        self._pods: dict[tuple[str, str], Pod] = {}
        self._history: list[_Change] = []
        self._rv = 1
        self._compacted = 0  # versions below this are too old to watch from
        self._forbidden = False
        self._requests: list[Request] = []
        self._watches: set[_Watch] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # --- lifecycle ---

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeKube:
        self._thread = threading.Thread(target=self._run, name="fake-kube", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the fake API server did not start in 10 s")
        if self._failure is not None:
            raise RuntimeError("the fake API server failed to start") from self._failure
        return self

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and self._thread is not None:
            loop.call_soon_threadsafe(stopping.set)
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """Write a kubeconfig for this server (JSON, which is YAML) and return its path: for a
        gateway's ``--kubeconfig PATH`` or ``KUBECONFIG``. It has a token if the fake has one."""
        user: dict[str, str] = {"token": self.token} if self.token else {}
        context = {"cluster": "fake", "user": "fake", "namespace": namespace}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": context}],
            "current-context": "fake",
        }
        target = Path(path)
        target.write_text(json.dumps(config, indent=2))
        return target

    # --- observing ---

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    @property
    def watch_count(self) -> int:
        """Watches open now (a client that closed its connection no longer counts)."""
        with self._lock:
            return len(self._watches)

    @property
    def resource_version(self) -> str:
        with self._lock:
            return str(self._rv)

    def pod(self, name: str, namespace: str = "default") -> Pod:
        with self._lock:
            return copy.deepcopy(self._pods[namespace, name])

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate()`` holds, re-checked at every request and change.

        From an async test: ``await asyncio.to_thread(kube.wait_until, predicate)``.
        """
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise TimeoutError(f"the fake API server never saw {predicate} in {timeout} s")

    # --- controls: pods ---

    def add_pod(
        self,
        name: str,
        namespace: str = "default",
        *,
        ip: str | None = "127.0.0.1",
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        ready: bool = True,
        phase: str = "Running",
        uid: str | None = None,
    ) -> Pod:
        """Create a pod (ADDED). ``ip=None`` is a pod not yet given an address."""
        pod: Pod = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": uid or str(uuid.uuid4()),
                "creationTimestamp": _now(),
            },
            "spec": {"containers": [{"name": "worker", "image": "shunter-sim"}]},
            "status": {"phase": phase},
        }
        _set_map(pod, "labels", labels)
        _set_map(pod, "annotations", annotations)
        _set_ip(pod, ip)
        _set_ready(pod, ready)
        with self._lock:
            if (namespace, name) in self._pods:
                raise ValueError(f"pods {name!r} already exists in {namespace!r}")
            self._pods[namespace, name] = pod
            self._record("ADDED", pod, None)
            return copy.deepcopy(pod)

    def set_ready(self, name: str, ready: bool, namespace: str = "default") -> Pod:
        return self._modify(name, namespace, lambda pod: _set_ready(pod, ready))

    def set_phase(self, name: str, phase: str, namespace: str = "default") -> Pod:
        return self._modify(name, namespace, lambda pod: pod["status"].update(phase=phase))

    def set_labels(self, name: str, labels: Mapping[str, str], namespace: str = "default") -> Pod:
        """Replace the pod's labels with ``labels``."""
        return self._modify(name, namespace, lambda pod: _set_map(pod, "labels", labels))

    def set_annotations(
        self, name: str, annotations: Mapping[str, str], namespace: str = "default"
    ) -> Pod:
        """Replace the pod's annotations with ``annotations``."""
        return self._modify(name, namespace, lambda pod: _set_map(pod, "annotations", annotations))

    def set_ip(self, name: str, ip: str | None, namespace: str = "default") -> Pod:
        return self._modify(name, namespace, lambda pod: _set_ip(pod, ip))

    def terminate(self, name: str, namespace: str = "default", grace_seconds: int = 30) -> Pod:
        """Start a graceful deletion: ``deletionTimestamp`` is set (MODIFIED)."""

        def mark(pod: Pod) -> None:
            pod["metadata"]["deletionTimestamp"] = _now(grace_seconds)
            pod["metadata"]["deletionGracePeriodSeconds"] = grace_seconds

        return self._modify(name, namespace, mark)

    def delete(self, name: str, namespace: str = "default") -> None:
        """A graceful deletion: terminating first (unless it already is), then DELETED."""
        with self._lock:
            if "deletionTimestamp" not in self._pods[namespace, name]["metadata"]:
                self.terminate(name, namespace)
            self.force_delete(name, namespace)

    def force_delete(self, name: str, namespace: str = "default") -> None:
        """DELETED at once, with no terminating phase (``--grace-period=0 --force``)."""
        with self._lock:
            pod = self._pods.pop((namespace, name))
            self._record("DELETED", None, pod)

    def replace(
        self,
        name: str,
        new_uid: str | None = None,
        namespace: str = "default",
        *,
        ready: bool | None = None,
    ) -> Pod:
        """The pod comes back as a new one (a StatefulSet's): DELETED, then ADDED with the
        same name, IP, labels and annotations but a new uid."""
        with self._lock:
            old = self.pod(name, namespace)
            self.force_delete(name, namespace)
            return self.add_pod(
                name,
                namespace,
                ip=old["status"].get("podIP"),
                labels=old["metadata"].get("labels"),
                annotations=old["metadata"].get("annotations"),
                ready=_is_ready(old) if ready is None else ready,
                phase=old["status"]["phase"],
                uid=new_uid,
            )

    # --- controls: the server ---

    def forbid(self, forbidden: bool = True) -> None:
        """Answer every request 403, as RBAC does for a service account without the role."""
        with self._lock:
            self._forbidden = forbidden

    def compact(self, *, end_watches: bool = False) -> None:
        """Make every resourceVersion seen so far too old to watch from (410 Expired).

        The global version moves on by one (in a real cluster other objects share it), so a
        LIST after this gives a version that can be watched. ``end_watches`` also ends the
        open watches cleanly, so that their clients come back with an expired version.
        """
        with self._lock:
            self._rv += 1
            self._compacted = self._rv
        if end_watches:
            self.end_watches()

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current version to every watch that asked for them."""
        with self._lock:
            self._history.append(_Change(self._rv, "BOOKMARK", None, None))
            self._notify()

    def end_watches(self) -> int:
        """End every open watch cleanly (final chunk), as ``timeoutSeconds`` does."""
        return self._close_watches(sever=False, reset=False)

    def sever_watches(self, *, reset: bool = False) -> int:
        """Drop every open watch's connection mid-stream, with no final chunk: a close, or
        with ``reset`` a TCP reset. Returns how many were dropped."""
        return self._close_watches(sever=True, reset=reset)

    # --- the store ---

    def _modify(self, name: str, namespace: str, mutate: Callable[[Pod], object]) -> Pod:
        with self._lock:
            pod = self._pods[namespace, name]
            before = copy.deepcopy(pod)
            mutate(pod)
            self._record("MODIFIED", pod, before)
            return copy.deepcopy(pod)

    def _record(self, event_type: str, pod: Pod | None, before: Pod | None) -> None:
        """Bump the version, stamp it on the pod, append the change (lock held)."""
        self._rv += 1
        if pod is not None:
            pod["metadata"]["resourceVersion"] = str(self._rv)
        self._history.append(_Change(self._rv, event_type, copy.deepcopy(pod), before))
        self._notify()

    def _notify(self) -> None:
        self._changed.notify_all()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake_watches)

    def _wake_watches(self) -> None:
        with self._lock:
            for watch in self._watches:
                watch.wake_up()

    def _close_watches(self, *, sever: bool, reset: bool) -> int:
        def close() -> int:
            with self._lock:
                watches = list(self._watches)
                self._watches.clear()
                self._changed.notify_all()
            for watch in watches:
                watch.ended = True
                watch.wake_up()
                if reset:
                    sock = watch.writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if sever:
                    watch.writer.transport.abort()
            return len(watches)

        return self._on_loop(close)

    def _on_loop(self, function: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the fake API server is not running")

        async def call() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(10)

    # --- HTTP ---

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:
            self._failure = error
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        connections: set[asyncio.Task[None]] = set()
        writers: set[asyncio.StreamWriter] = set()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            writers.add(writer)
            try:
                await self._connection(reader, writer)
            finally:
                connections.discard(task)
                writers.discard(writer)
                writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._stopping = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        await self._stopping.wait()
        server.close()
        for writer in list(writers):  # not cancelled: 3.11 logs a cancelled connection task
            writer.transport.abort()
        if connections:
            await asyncio.wait(connections, timeout=5)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests on one connection until either side closes it (keep-alive)."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _version = request_line.split(" ", 2)
                headers = {}
                for line in filter(None, lines):
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                keep_alive = await self._respond(method, target, headers, reader, writer)
                if not keep_alive or headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        except ValueError:  # a request line or header we cannot read
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    async def _respond(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        url = urlsplit(target)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        watching = query.get("watch", "").lower() in ("true", "1")
        with self._lock:
            self._requests.append(Request(method, url.path, query))
            self._changed.notify_all()
            forbidden = self._forbidden
        collection = _COLLECTION.fullmatch(url.path)
        namespace = collection[1] if collection else None
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            return await _send(writer, _status(401, "Unauthorized", "Unauthorized"))
        if forbidden:
            verb = "watch" if watching else "list"
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            message = (
                f'pods is forbidden: User "{self.user}" cannot {verb} resource "pods" '
                f'in API group "" {scope}'
            )
            return await _send(writer, _status(403, "Forbidden", message, details={"kind": "pods"}))
        if collection is None:
            message = "the server could not find the requested resource"
            return await _send(writer, _status(404, "NotFound", message, details={}))
        if method != "GET":
            return await _send(writer, _status(405, "MethodNotAllowed", f"{method} is not served"))
        if "fieldSelector" in query:
            message = "fieldSelector is not supported by the fake API server"
            return await _send(writer, _status(400, "BadRequest", message))
        try:
            selector = parse_selector(query.get("labelSelector", ""))
        except SelectorError as error:
            return await _send(writer, _status(400, "BadRequest", str(error)))
        if watching:
            return await self._watch(query, namespace, selector, reader, writer)
        with self._lock:
            items = [pod for pod in self._pods.values() if _selected(pod, namespace, selector)]
            body = {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": _rv_meta(self._rv),
                "items": sorted(items, key=_key),
            }
            encoded = json.dumps(body).encode()  # under the lock: items are live objects
        return await _send_bytes(writer, 200, encoded)

    async def _watch(
        self,
        query: dict[str, str],
        namespace: str | None,
        selector: tuple[Requirement, ...],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        try:
            since = int(query.get("resourceVersion") or "0")
            timeout = int(query["timeoutSeconds"]) if "timeoutSeconds" in query else None
        except ValueError as error:
            return await _send(writer, _status(400, "BadRequest", f"invalid parameter: {error}"))
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        watch = _Watch(namespace, selector, bookmarks, writer, 0)
        with self._lock:
            expired = 0 < since < self._compacted
            message = f"too old resource version: {since} ({self._compacted})"
            # With no version, "from now": the pods that match now come first, as ADDED.
            current = [pod for pod in self._pods.values() if since == 0 and watch.selects(pod)]
            initial = b"".join(_chunk("ADDED", pod) for pod in sorted(current, key=_key))
            watch.cursor = bisect.bisect_right(self._history, since or self._rv, key=_version)
            if not expired:
                self._watches.add(watch)
                self._changed.notify_all()
        if expired:
            gone = _chunk("ERROR", _status(410, "Expired", message))
            writer.write(_WATCH_HEAD + gone + b"0\r\n\r\n")
            await writer.drain()
            return True
        writer.write(_WATCH_HEAD + initial)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        client_gone = asyncio.ensure_future(reader.read(1))
        try:
            while True:
                watch.wake = loop.create_future()
                with self._lock:
                    changes = self._history[watch.cursor :]
                    watch.cursor += len(changes)
                events = filter(None, map(watch.event_for, changes))
                writer.write(b"".join(_chunk(kind, obj) for kind, obj in events))
                await writer.drain()
                remaining = None if deadline is None else deadline - loop.time()
                if watch.ended or (remaining is not None and remaining <= 0):
                    break
                waiting: set[asyncio.Future[Any]] = {watch.wake, client_gone}
                await asyncio.wait(waiting, timeout=remaining, return_when="FIRST_COMPLETED")
                if client_gone.done():
                    return False
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        finally:
            client_gone.cancel()
            await asyncio.wait({client_gone})  # the reader is free for the next request
            with self._lock:
                self._watches.discard(watch)
                self._changed.notify_all()


def _key(pod: Pod) -> tuple[str, str]:
    """Where etcd keeps the pod: the API server lists in this order."""
    return pod["metadata"]["namespace"], pod["metadata"]["name"]


def _version(change: _Change) -> int:
    return change.rv


def _set_map(pod: Pod, key: str, values: Mapping[str, str] | None) -> None:
    if values:
        pod["metadata"][key] = dict(values)
    else:
        pod["metadata"].pop(key, None)


def _set_ip(pod: Pod, ip: str | None) -> None:
    if ip:
        pod["status"].update(podIP=ip, podIPs=[{"ip": ip}])
    else:
        pod["status"].pop("podIP", None)
        pod["status"].pop("podIPs", None)


def _set_ready(pod: Pod, ready: bool) -> None:
    flag = "True" if ready else "False"
    pod["status"]["conditions"] = [
        {"type": "Initialized", "status": "True"},
        {"type": "Ready", "status": flag},
        {"type": "ContainersReady", "status": flag},
        {"type": "PodScheduled", "status": "True"},
    ]


def _is_ready(pod: Pod) -> bool:
    conditions = pod["status"].get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


async def _send(writer: asyncio.StreamWriter, status: dict[str, Any]) -> bool:
    return await _send_bytes(writer, status["code"], json.dumps(status).encode())


async def _send_bytes(writer: asyncio.StreamWriter, code: int, body: bytes) -> bool:
    head = (
        f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nCache-Control: no-cache, private\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    return True
