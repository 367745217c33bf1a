"""Any other OpenAI-compatible server: it reports no load and has no way to flush."""

from __future__ import annotations

from shunter.backends.base import Runtime
from shunter.backends.http.engines.base import Engine


class OpenAIEngine(Engine):
    runtime = Runtime.OPENAI
