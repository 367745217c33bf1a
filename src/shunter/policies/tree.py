"""An approximate radix tree over routing text, one per model, for ``cache_aware``.

Each node holds an edge label (a run of characters) and, per tenant (worker URL), the last
time that tenant was routed text through it. A match walks down as far as the text agrees
with the tree; the tenants found there are the workers whose caches likely hold that prefix.

Costs: a match or insert is a walk of at most one step per edge, each step one C-level
``startswith``; a partial edge costs a binary search of ``startswith`` calls. Characters per
tenant are counted so eviction can keep each tenant within ``max_tree_size`` characters.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator


class Node:
    __slots__ = ("children", "parent", "tenants", "text")

    def __init__(self, text: str, parent: Node | None) -> None:
        self.text = text
        self.parent = parent
        self.children: dict[str, Node] = {}
        self.tenants: dict[str, float] = {}  # tenant -> last access (monotonic seconds)


def _common_length(text: str, start: int, edge: str) -> int:
    """How many leading characters of ``edge`` equal ``text[start:]``."""
    if text.startswith(edge, start):
        return len(edge)
    low, high = 0, min(len(edge), len(text) - start)
    while low < high:  # largest n with text[start:start+n] == edge[:n]
        mid = (low + high + 1) // 2
        if text.startswith(edge[:mid], start):
            low = mid
        else:
            high = mid - 1
    return low


class Tree:
    def __init__(self) -> None:
        self.root = Node("", None)
        self.tenant_chars: dict[str, int] = {}

    # --- reads -----------------------------------------------------------------------------

    def match(self, text: str) -> tuple[int, dict[str, float]]:
        """(matched characters, the tenants at the deepest node the text reaches)."""
        node, position = self.root, 0
        tenants: dict[str, float] = {}
        length = len(text)
        while position < length:
            child = node.children.get(text[position])
            if child is None:
                break
            common = _common_length(text, position, child.text)
            position += common
            if child.tenants:
                tenants = child.tenants
            if common < len(child.text):
                break
            node = child
        return position, tenants

    def held(self, text: str, tenant: str) -> tuple[int, float]:
        """How much of ``text`` ``tenant`` was routed (characters), and when it last was
        (its stamp at the deepest node it holds on the path; -1.0 when it holds none)."""
        node, position = self.root, 0
        held, stamp = 0, -1.0
        length = len(text)
        while position < length:
            child = node.children.get(text[position])
            if child is None:
                break
            common = _common_length(text, position, child.text)
            position += common
            seen = child.tenants.get(tenant)
            if seen is None:
                break  # a tenant on a node is on all its ancestors: none deeper either
            held, stamp = position, seen
            if common < len(child.text):
                break
            node = child
        return held, stamp

    # --- writes ------------------------------------------------------------------------------

    def insert(self, text: str, tenant: str, now: float | None = None) -> None:
        """Record that ``tenant`` was routed ``text``: every node on its path gets the tenant."""
        stamp = time.monotonic() if now is None else now
        node, position = self.root, 0
        self._touch(node, tenant, stamp)
        length = len(text)
        while position < length:
            child = node.children.get(text[position])
            if child is None:
                leaf = Node(text[position:], node)
                node.children[text[position]] = leaf
                self._touch(leaf, tenant, stamp)
                return
            common = _common_length(text, position, child.text)
            if common < len(child.text):
                child = self._split(child, common)
            self._touch(child, tenant, stamp)
            position += common
            node = child

    def _split(self, node: Node, at: int) -> Node:
        """Cut ``node``'s edge after ``at`` characters; returns the new upper half."""
        parent = node.parent
        assert parent is not None
        upper = Node(node.text[:at], parent)
        upper.tenants = dict(node.tenants)
        parent.children[upper.text[0]] = upper
        node.text = node.text[at:]
        node.parent = upper
        upper.children[node.text[0]] = node
        return upper

    def _touch(self, node: Node, tenant: str, stamp: float) -> None:
        if tenant not in node.tenants:
            self.tenant_chars[tenant] = self.tenant_chars.get(tenant, 0) + len(node.text)
        node.tenants[tenant] = stamp

    def forget(self, text: str, tenant: str, keep: int) -> int:
        """``tenant`` lost ``text`` beyond its first ``keep`` characters (its engine evicted
        them): drop the tenant from the path past that point and from everything below it
        (an engine's prefix cache holds no extension of a prefix it lost). Returns the
        characters dropped from the tenant."""
        found = self._branch(text, keep, tenant)
        return 0 if found is None else self._drop_below(found[0], tenant)

    def move(self, text: str, cut: int, source: str, target: str, stamp: float) -> int:
        """Hand ``source``'s holdings below the branch ``text`` enters at character ``cut``
        to ``target`` (a prompt moved between workers, ``policies/rebalance.py``): every node
        of that subtree ``source`` holds gets ``target`` at ``stamp`` and loses ``source``,
        and ``target`` also gets the path down to it (it is routed that text from now on).
        ``text`` needs only reach past ``cut``: the branch is the one holding
        ``text[cut]``. Returns the characters moved (0: nothing of ``source`` there)."""
        branch = self._branch(text, cut)
        if branch is None or source not in branch[0].tenants:
            return 0
        top, path = branch
        found = self._subtree_of(top, source)
        for ancestor in path:
            self._touch(ancestor, target, stamp)
        for held in found:
            self._touch(held, target, stamp)
        return self._drop_all(found, source)

    def _branch(
        self, text: str, at: int, tenant: str | None = None
    ) -> tuple[Node, list[Node]] | None:
        """The node that ``text`` continues into past its first ``at`` characters (the edge
        straddling ``at`` split there), and the nodes on the path down to it, the root
        first; None when the tree parts from ``text`` before that point or ``text`` stops
        short of it, or, given ``tenant``, a node on the way is not ``tenant``'s (``forget``
        and ``move`` walk down alike)."""
        node, position = self.root, 0
        path = [node]
        while position < len(text):
            child = node.children.get(text[position])
            if child is None or (tenant is not None and tenant not in child.tenants):
                return None
            common = _common_length(text, position, child.text)
            if position + common > at:
                if position < at:  # the edge straddles ``at``: its upper part stays above
                    upper = self._split(child, at - position)
                    path.append(upper)
                    child = upper.children[text[at]]
                return child, path
            if common < len(child.text):
                return None
            position += common
            node = child
            path.append(node)
        return None

    def _subtree_of(self, top: Node, tenant: str) -> list[Node]:
        """The nodes of ``top``'s subtree ``tenant`` holds, each after its parent."""
        found: list[Node] = []
        stack = [top]
        while stack:
            node = stack.pop()
            if tenant in node.tenants:
                found.append(node)
                stack.extend(node.children.values())
        return found

    def _drop_below(self, top: Node, tenant: str) -> int:
        """Drop ``tenant`` from ``top`` and its whole subtree."""
        return self._drop_all(self._subtree_of(top, tenant), tenant)

    def _drop_all(self, found: list[Node], tenant: str) -> int:
        """Drop ``tenant`` from ``found`` (``_subtree_of``'s list), deepest nodes first;
        returns the characters dropped."""
        before = self.tenant_chars.get(tenant, 0)
        for node in reversed(found):  # children after their parents in ``found``
            self._drop(node, tenant)
        return before - self.tenant_chars.get(tenant, 0)

    def remove_tenant(self, tenant: str) -> None:
        for node in list(self._nodes_of(tenant)):
            self._drop(node, tenant)
        self.tenant_chars.pop(tenant, None)

    def _nodes_of(self, tenant: str) -> Iterator[Node]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            if tenant in node.tenants:
                yield node
            stack.extend(node.children.values())

    def _drop(self, node: Node, tenant: str) -> None:
        if node.tenants.pop(tenant, None) is not None:
            self.tenant_chars[tenant] = self.tenant_chars.get(tenant, 0) - len(node.text)
        # A node no tenant uses and with no children goes; its parent may follow.
        while node is not self.root and not node.tenants and not node.children:
            parent = node.parent
            assert parent is not None
            if parent.children.get(node.text[0]) is node:
                del parent.children[node.text[0]]
            node = parent

    # --- eviction ---------------------------------------------------------------------------

    def evict(self, max_chars: int) -> bool:
        """Trim every tenant to ``max_chars`` in one go (tests, tools); True when all fit."""
        for _ in self.eviction_work(max_chars):
            pass
        return all(chars <= max_chars for chars in self.tenant_chars.values())

    def eviction_work(self, max_chars: int, step: int = 64) -> Iterator[None]:
        """Drop each over-size tenant's least recently used leaves until it fits.

        A generator that yields every ``step`` operations, so the caller can hand the event
        loop back between slices; requests may insert into the tree meanwhile, so every
        candidate is checked again before it goes.
        """
        over = {t for t, chars in self.tenant_chars.items() if chars > max_chars}
        if not over:
            return
        heap: list[tuple[float, int, str, Node]] = []
        counter = visited = 0
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            for tenant, stamp in node.tenants.items():
                if tenant in over:
                    heapq.heappush(heap, (stamp, counter, tenant, node))
                    counter += 1
            visited += 1
            if visited % step == 0:
                yield
        done = 0
        while heap:
            stamp, _, tenant, node = heapq.heappop(heap)
            done += 1
            if done % step == 0:
                yield
            if self.tenant_chars.get(tenant, 0) <= max_chars:
                continue
            if node.tenants.get(tenant) != stamp or any(
                tenant in child.tenants for child in node.children.values()
            ):
                continue  # touched since, or not this tenant's leaf (yet)
            parent = node.parent
            self._drop(node, tenant)
            if (
                parent is not None
                and parent is not self.root
                and tenant in parent.tenants
                and not any(tenant in c.tenants for c in parent.children.values())
            ):
                heapq.heappush(heap, (parent.tenants[tenant], counter, tenant, parent))
                counter += 1
