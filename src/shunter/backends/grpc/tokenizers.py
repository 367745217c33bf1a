"""The gateway's tokenizer for each model served over gRPC, loaded once per model.

From a directory given at start (``--tokenizer-path``/``--model-path``), or else from the
first worker of the model that is asked (``GetTokenizer`` streams a zip of a few MB). A
failed load is forgotten, so the next request starts afresh, maybe through another worker.
"""

from __future__ import annotations

import asyncio

from shunter.aio.once import OnceCell
from shunter.backends.grpc.scheduler import SchedulerClient, SchedulerError
from shunter.tokenizer.tokenizer import ModelTokenizer, TokenizerError


class Tokenizers:
    def __init__(self, path: str | None, chat_template: str | None, timeout: float) -> None:
        self.path = path
        self.chat_template = chat_template
        self.timeout = timeout  # fetching from a worker
        self._cells: dict[str, OnceCell[ModelTokenizer]] = {}

    async def get(self, model: str, client: SchedulerClient) -> ModelTokenizer:
        cell = self._cells.get(model)
        if cell is None:
            cell = self._cells.setdefault(model, OnceCell(lambda: self._load(client)))
        if cell.value is not None:
            return cell.value
        try:
            return await cell.get()
        except (SchedulerError, TokenizerError):
            if self._cells.get(model) is cell:
                del self._cells[model]
            raise

    async def _load(self, client: SchedulerClient) -> ModelTokenizer:
        if self.path is not None:
            return await asyncio.to_thread(
                ModelTokenizer.from_directory, self.path, self.chat_template
            )
        files = await client.tokenizer_files(self.timeout)
        return await asyncio.to_thread(ModelTokenizer.from_files, files, self.chat_template)
