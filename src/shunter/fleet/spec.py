"""What a user says about a worker: ``POST /workers`` (or ``--worker-urls``) and
``PUT /workers/{url}``, parsed and checked, every field accepted either applied or refused.

Health settings given per worker (``health_check_*``, ``health_*_threshold``) replace the
``--health-*`` flags for that worker; ``max_connection_attempts`` bounds how many times
registration probes it before giving up.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from shunter.backends.base import Runtime
from shunter.backends.connect import grpc_available
from shunter.fleet.ids import derived_worker_id
from shunter.fleet.runtime import HealthConfig
from shunter.fleet.urls import WorkerUrlError, validate_worker_url
from shunter.fleet.worker import WorkerType
from shunter.parsers.reasoning import REASONING_PARSERS
from shunter.parsers.tool_calls import TOOL_CALL_PARSERS

RUNTIME_NAMES = {r.value: r for r in Runtime} | {"external": Runtime.OPENAI}
# smg's names for the per-worker health settings, and the HealthConfig field each sets.
HEALTH_FIELDS = {
    "health_check_timeout_secs": "timeout_secs",
    "health_check_interval_secs": "interval_secs",
    "health_success_threshold": "success_threshold",
    "health_failure_threshold": "failure_threshold",
}
# The per-worker circuit-breaker settings (named as the --cb-* flags), and the BreakerConfig
# field each sets.
BREAKER_FIELDS = {
    "cb_failure_threshold": "failure_threshold",
    "cb_success_threshold": "success_threshold",
    "cb_timeout_duration_secs": "timeout_secs",
    "cb_window_duration_secs": "window_secs",
}
UPDATE_FIELDS = frozenset(
    {"priority", "cost", "labels", "api_key", *HEALTH_FIELDS, *BREAKER_FIELDS}
)
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]*")
API_KEY_RULE = "visible ASCII characters only (no space, control or non-ASCII character)"


def valid_api_key(key: str) -> bool:
    """Whether ``key`` can go in an ``Authorization: Bearer`` header as it is. Anything but
    visible ASCII would break the header (CR, LF) or be sent as other bytes than given."""
    return _VISIBLE_ASCII.fullmatch(key) is not None


class SpecError(ValueError):
    """A worker spec from the API or the CLI is invalid; the message names the field."""


@dataclass
class WorkerSpec:
    url: str
    api_key: str | None = None
    model_id: str | None = None
    worker_type: WorkerType = WorkerType.REGULAR
    bootstrap_port: int | None = None
    runtime: Runtime | None = None  # None: detect
    labels: dict[str, str] = field(default_factory=dict)
    probe_grpc: bool = False  # given without a scheme: probe HTTP and gRPC at once
    health: dict[str, float] = field(default_factory=dict)  # HealthConfig fields to override
    breaker: dict[str, float] = field(default_factory=dict)  # BreakerConfig fields to override
    max_connection_attempts: int | None = None  # None: until the start-up timeout
    # Its id (fleet/ids.py): "" derives one from the URL; the API sets a fresh one.
    worker_id: str = ""

    def __post_init__(self) -> None:
        if not self.worker_id:
            self.worker_id = derived_worker_id(self.url)

    @classmethod
    def from_json(cls, payload: Any) -> WorkerSpec:
        if not isinstance(payload, dict):
            raise SpecError("the body must be a JSON object")
        url = payload.get("url")
        if not isinstance(url, str) or not url:
            raise SpecError("'url' is required and must be a string")
        try:
            url = validate_worker_url(url)
        except WorkerUrlError as exc:
            raise SpecError(str(exc)) from None
        if url.startswith("grpc://") and not grpc_available():
            raise SpecError("grpc:// workers need the grpc extra: pip install 'shunter[grpc]'")
        labels = _string_map(payload.get("labels"), "labels")
        _parser_labels(payload, labels)
        _number_labels(payload, labels)
        _kv_events_labels(payload, labels)
        spec = cls(url=url, labels=labels, probe_grpc="://" not in payload["url"])
        spec.api_key = _api_key(payload)
        spec.model_id = _optional_str(payload, "model_id")
        kind = _optional_str(payload, "worker_type") or "regular"
        try:
            spec.worker_type = WorkerType(kind)
        except ValueError:
            raise SpecError("'worker_type' must be regular, prefill or decode") from None
        runtime = _optional_str(payload, "runtime")
        if runtime is not None:
            if runtime not in RUNTIME_NAMES:
                raise SpecError(f"'runtime' must be one of {', '.join(sorted(RUNTIME_NAMES))}")
            spec.runtime = RUNTIME_NAMES[runtime]
        port = payload.get("bootstrap_port")
        if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
            raise SpecError("'bootstrap_port' must be a port number")
        spec.bootstrap_port = port
        spec.health = health_overrides(payload)
        spec.breaker = breaker_overrides(payload)
        attempts = payload.get("max_connection_attempts")
        if attempts is not None:
            if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
                raise SpecError("'max_connection_attempts' must be an integer >= 1")
            spec.max_connection_attempts = attempts
        return spec


def check_update(changes: Any) -> dict[str, Any]:
    """A ``PUT /workers/{url}`` body, checked: only fields that can be applied."""
    if not isinstance(changes, dict):
        raise SpecError("the body must be a JSON object")
    unknown = set(changes) - UPDATE_FIELDS
    if unknown:
        raise SpecError(
            f"unknown fields: {', '.join(sorted(unknown))}; "
            f"a worker's {', '.join(sorted(UPDATE_FIELDS))} can change"
        )
    _number_labels(changes, {})
    _api_key(changes)
    _string_map(changes.get("labels"), "labels")
    health_overrides(changes)
    breaker_overrides(changes)
    return changes


def health_overrides(payload: dict[str, Any]) -> dict[str, float]:
    """The health settings a payload gives, by HealthConfig field, checked."""
    return _overrides(payload, HEALTH_FIELDS)


def breaker_overrides(payload: dict[str, Any]) -> dict[str, float]:
    """The circuit-breaker settings a payload gives, by BreakerConfig field, checked."""
    return _overrides(payload, BREAKER_FIELDS)


def _overrides(payload: dict[str, Any], fields: dict[str, str]) -> dict[str, float]:
    """The settings among ``fields`` a payload gives (thresholds whole numbers, durations
    any number; all > 0), by the config field each sets."""
    given: dict[str, float] = {}
    for name, field_name in fields.items():
        value = payload.get(name)
        if value is None:
            continue
        whole = name.endswith("threshold")
        if isinstance(value, bool) or not isinstance(value, int if whole else int | float):
            raise SpecError(f"'{name}' must be {'an integer' if whole else 'a number'}")
        if value <= 0:
            raise SpecError(f"'{name}' must be > 0")
        given[field_name] = value
    return given


def apply_health(base: HealthConfig, overrides: dict[str, float]) -> HealthConfig | None:
    """A worker's own health settings: the flags' with its overrides; None without any."""
    return dataclasses.replace(base, **overrides) if overrides else None  # type: ignore[arg-type]


def _number_labels(payload: dict[str, Any], labels: dict[str, str]) -> None:
    """``priority`` and ``cost``, kept as labels (smg keeps them there too)."""
    for key in ("priority", "cost"):
        value = payload.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise SpecError(f"'{key}' must be a non-negative number")
            labels[key] = str(value)


KV_EVENTS_SCHEMES = ("tcp://", "ipc://")


def check_kv_events_endpoint(field_name: str, value: str) -> None:
    """An endpoint a ZMQ socket can connect to; raises SpecError."""
    if not value.startswith(KV_EVENTS_SCHEMES) or len(value) <= len("tcp://"):
        raise SpecError(f"'{field_name}' must be a tcp:// or ipc:// ZMQ endpoint, got {value!r}")


def _kv_events_labels(payload: dict[str, Any], labels: dict[str, str]) -> None:
    """The worker's KV-cache event endpoints (its engine's PUB, and its replay ROUTER),
    kept as labels, which the gateway's event subscribers read."""
    endpoint = _optional_str(payload, "kv_events_endpoint")
    replay = _optional_str(payload, "kv_events_replay_endpoint")
    if replay is not None and endpoint is None:
        raise SpecError("'kv_events_replay_endpoint' needs 'kv_events_endpoint'")
    for key, value in (("kv_events_endpoint", endpoint), ("kv_events_replay_endpoint", replay)):
        if value is not None:
            check_kv_events_endpoint(key, value)
            labels[key] = value


def _parser_labels(payload: dict[str, Any], labels: dict[str, str]) -> None:
    """The per-worker output parsers of a gRPC worker (smg's ``reasoning_parser`` and
    ``tool_parser`` fields), kept as labels, which the gRPC pipeline reads."""
    for key, known in (("reasoning_parser", REASONING_PARSERS), ("tool_parser", TOOL_CALL_PARSERS)):
        value = _optional_str(payload, key)
        if value is not None:
            if value not in known:
                raise SpecError(f"'{key}' must be one of {', '.join(known)}")
            labels[key] = value


def _api_key(payload: dict[str, Any]) -> str | None:
    key = _optional_str(payload, "api_key")
    if key is not None and not valid_api_key(key):
        raise SpecError(f"'api_key' must be {API_KEY_RULE}")
    return key


def _optional_str(payload: dict[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is not None and not isinstance(value, str):
        raise SpecError(f"'{key}' must be a string")
    return value


def _string_map(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"'{name}' must be an object of strings")
    return {str(k): str(v) for k, v in value.items()}
