"""One ``/metrics`` for ``--workers N``: the children's expositions, fetched and merged.

Each gateway process hands its own exposition out on a private Unix socket
(supervisor/control.py); the supervisor serves ``--prometheus-port`` and, at each scrape,
reads every child's and merges them:

- counters and histograms are summed, sample by sample (a histogram bucket by bucket:
  a sum of cumulative counts is the cumulative count of the sum), so a rate over the
  merged series is the whole gateway's rate, as one process's would have been;
- the gauges that count things in flight (``ADDITIVE_GAUGES``) are summed too: the
  gateway's open connections are the sum of its processes';
- every other gauge is a state each process holds for itself (a breaker's state and
  counts, a pool's size, a panic flag): summing those means nothing, so each is kept per
  process with a ``process`` label (0 .. N-1), and ``max by (worker)`` or the like
  reads them whole.

Counters must not go down when a process does: a child that cannot be read (it is
restarting) counts with its last exposition, and the counts of a child that crashed
are carried into every later merge (``retire``), as prometheus-client's multiprocess mode
keeps a dead process's files. A child's exposition that does not parse is skipped for
that scrape, with a log line; the rest of the scrape is served.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("shunter.metrics")

ADDITIVE_GAUGES = frozenset(
    {
        "smg_http_connections_active",
        "smg_worker_requests_active",
        "smg_worker_connections_active",
    }
)
PROCESS_LABEL = "process"
FETCH_TIMEOUT_SECS = 2.0
_SUMMED_TYPES = frozenset({"counter", "histogram", "gaugehistogram", "summary"})

LabelKey = tuple[tuple[str, str], ...]


def parse_exposition(text: str) -> list[Metric]:
    """The metric families of a text exposition; ValueError when it is malformed."""
    try:
        return list(text_string_to_metric_families(text))
    except (ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"malformed exposition: {exc}") from None


def _summed(metric: Metric) -> bool:
    return metric.type in _SUMMED_TYPES or metric.name in ADDITIVE_GAUGES


def merge_expositions(parts: Sequence[tuple[str, Sequence[Metric]]]) -> list[Metric]:
    """Merge ``(process, families)`` parts as the module docstring says."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, LabelKey], float]] = {}
    for process, metrics in parts:
        for metric in metrics:
            merged = families.get(metric.name)
            if merged is None:
                merged = families[metric.name] = Metric(
                    metric.name, metric.documentation, metric.type
                )
                values[metric.name] = {}
            elif merged.type != metric.type:
                log.warning(
                    "metric types differ between gateway processes; skipped",
                    extra={"metric": metric.name, "process": process},
                )
                continue
            summed = _summed(metric)
            table = values[metric.name]
            for sample in metric.samples:
                labels = dict(sample.labels)
                if not summed:
                    labels[PROCESS_LABEL] = process
                key = (sample.name, tuple(labels.items()))
                if sample.name.endswith("_created"):  # a start time: the earliest
                    table[key] = min(table.get(key, sample.value), sample.value)
                else:
                    table[key] = table.get(key, 0.0) + sample.value
    for name, merged in families.items():
        for (sample_name, label_pairs), value in values[name].items():
            merged.add_sample(sample_name, dict(label_pairs), value)
    return list(families.values())


def fetch_exposition(path: str, timeout: float = FETCH_TIMEOUT_SECS) -> str:
    """Read a child's exposition from its control socket (asked ``metrics``, it writes the
    exposition whole and closes)."""
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"metrics\n")
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


class ChildrenCollector:
    """A prometheus-client collector whose ``collect`` merges the children's expositions.

    ``fetch(index)`` returns child ``index``'s exposition text (raises OSError when it
    cannot be read). Scrapes run in the exporter's thread; ``retire`` comes from the
    supervisor's loop: a lock keeps the carried counts whole.
    """

    def __init__(self, count: int, fetch: Callable[[int], str]) -> None:
        self.count = count
        self.fetch = fetch
        # Each child's last counters and histograms (not gauges: a process that cannot be
        # read has nothing in flight that anyone waits for).
        self._last: dict[int, list[Metric]] = {}
        self._carried: list[list[Metric]] = []  # those of children that crashed
        # Bumped by each retire: a scrape that read a child before it was retired must not
        # store that child's counts as the next one's (they would count twice).
        self._generation: dict[int, int] = {}
        self._lock = threading.Lock()

    def retire(self, index: int) -> None:
        """Child ``index`` is gone (a new one takes its slot): keep its last counts."""
        with self._lock:
            self._generation[index] = self._generation.get(index, 0) + 1
            last = self._last.pop(index, None)
            if last:
                self._carried.append(last)

    def collect(self) -> Iterator[Metric]:
        parts: list[tuple[str, Sequence[Metric]]] = []
        for index in range(self.count):
            generation = self._generation.get(index, 0)
            fresh = self._read(index)
            with self._lock:
                if generation != self._generation.get(index, 0):
                    fresh = None  # read from the child just retired: its counts are carried
                if fresh is not None:
                    self._last[index] = [m for m in fresh if m.type in _SUMMED_TYPES]
                    parts.append((str(index), fresh))
                elif index in self._last:
                    parts.append((str(index), self._last[index]))
        with self._lock:
            parts += [("retired", metrics) for metrics in self._carried]
        yield from merge_expositions(parts)

    def _read(self, index: int) -> list[Metric] | None:
        try:
            return parse_exposition(self.fetch(index))
        except OSError as exc:
            log.warning(
                "could not read a gateway process's metrics; its last counts stand in",
                extra={"index": index, "error": repr(exc)},
            )
        except ValueError as exc:
            log.warning(
                "a gateway process's metrics did not parse; skipped for this scrape",
                extra={"index": index, "error": str(exc)},
            )
        return None
