"""The engines served over HTTP, one module each; ``ENGINES`` maps a runtime to its engine.

Adding an engine: a module with an ``Engine`` subclass (its ``runtime``, the ``owned_by``
its ``/v1/models`` reports, and whatever it does differently), a ``Runtime`` member in
``backends/base.py``, and a line here.
"""

from __future__ import annotations

from shunter.backends.base import Runtime
from shunter.backends.http.engines.base import Engine
from shunter.backends.http.engines.llamacpp import LlamaCppEngine
from shunter.backends.http.engines.openai import OpenAIEngine
from shunter.backends.http.engines.sglang import SGLangEngine
from shunter.backends.http.engines.vllm import VllmEngine

ENGINES: dict[Runtime, Engine] = {
    engine.runtime: engine
    for engine in (SGLangEngine(), VllmEngine(), LlamaCppEngine(), OpenAIEngine())
}


def engine_owning(owned_by: str) -> Engine:
    """The engine whose ``/v1/models`` reports ``owned_by``; a generic one if none does."""
    for engine in ENGINES.values():
        if engine.owned_by and engine.owned_by == owned_by:
            return engine
    return ENGINES[Runtime.OPENAI]
