"""``/engine_metrics``: the workers' own ``/metrics``, merged, each sample labelled with its
worker (as smg's metrics aggregator does).

Each worker's Prometheus text is read sample by sample; a ``worker_addr="<url>"`` label is
added to every sample, ``:`` in names becomes ``_`` (as smg), and samples of the same family
from different workers are listed together under one ``# HELP``/``# TYPE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Family:
    help: str | None = None
    type: str | None = None
    samples: list[str] = field(default_factory=list)


def _label_sample(line: str, worker: str) -> str | None:
    """``name{a="b"} 1`` -> ``name{a="b",worker_addr="w"} 1``; None for a malformed line."""
    escaped = worker.replace("\\", "\\\\").replace('"', '\\"')
    brace = line.find("{")
    space = line.find(" ")
    if space < 0:
        return None
    if 0 <= brace < space:
        name, rest = line[:brace], line[brace + 1 :]
        close = rest.rfind("}")
        if close < 0:
            return None
        labels, tail = rest[:close], rest[close + 1 :]
        joined = (
            f'{labels},worker_addr="{escaped}"' if labels.strip() else f'worker_addr="{escaped}"'
        )
        return f"{name.replace(':', '_')}{{{joined}}}{tail}"
    name, tail = line[:space], line[space:]
    return f'{name.replace(":", "_")}{{worker_addr="{escaped}"}}{tail}'


def merge(texts: dict[str, str]) -> str:
    """Merge ``worker url -> /metrics text`` into one exposition."""
    families: dict[str, _Family] = {}
    for worker, text in texts.items():
        current: _Family | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                parts = line.split(" ", 3)
                if len(parts) < 4:
                    continue
                name = parts[2].replace(":", "_")
                current = families.setdefault(name, _Family())
                if parts[1] == "HELP":
                    current.help = current.help or parts[3]
                else:
                    current.type = current.type or parts[3]
                continue
            if line.startswith("#"):
                continue
            sample = _label_sample(line, worker)
            if sample is None:
                continue
            if current is None:
                current = families.setdefault(sample.split("{", 1)[0], _Family())
            current.samples.append(sample)
    out: list[str] = []
    for name, family in families.items():
        if family.help:
            out.append(f"# HELP {name} {family.help}")
        if family.type:
            out.append(f"# TYPE {name} {family.type}")
        out.extend(family.samples)
    return "\n".join(out) + "\n"
