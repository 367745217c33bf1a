"""Settings of Kubernetes service discovery, with smg's flag names and defaults."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field

# A label key (an optional DNS-subdomain prefix and a name) and value, as Kubernetes
# validates them: a selector the API server would refuse is refused at start instead.
_NAME = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"^([a-z0-9]([a-z0-9.-]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MODEL_ID_SOURCES = ("namespace", "label:<key>", "annotation:<key>")

Selector = dict[str, str]


def discovery_available() -> bool:
    """Whether the Kubernetes client (the ``kubernetes`` extra: lightkube) is installed."""
    return importlib.util.find_spec("lightkube") is not None


class DiscoveryConfigError(ValueError):
    """A discovery setting is invalid; the message names the flag."""


def parse_selector(flag: str, pairs: list[str]) -> Selector:
    """``k=v`` pairs as a selector; raises DiscoveryConfigError naming what is wrong."""
    selector: Selector = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _KEY.match(key) or not _VALUE.match(value):
            raise DiscoveryConfigError(
                f"{flag} {pair!r}: give label selectors as key=value with Kubernetes label "
                "syntax (letters, digits, '-', '_', '.'; a key may have a 'prefix/')"
            )
        selector[key] = value
    return selector


@dataclass
class DiscoveryConfig:
    enabled: bool = False
    selector: Selector = field(default_factory=dict)  # regular workers
    prefill_selector: Selector = field(default_factory=dict)  # PD mode
    decode_selector: Selector = field(default_factory=dict)
    port: int = 80  # the workers' port, unless a pod's smg.ai/worker-ports says otherwise
    namespace: str | None = None  # None: every namespace (needs a ClusterRole)
    model_id_from: str | None = None  # namespace | label:<key> | annotation:<key>
    kubeconfig: str | None = None  # None: in-cluster, else $KUBECONFIG, else ~/.kube/config
    resync_secs: float = 60.0  # a full re-LIST and reconcile at least this often
    # The other gateways' pods (replicas peer with them); empty: peers by --peer-urls only.
    # Shares the namespace, kubeconfig and resync settings, with or without --service-discovery.
    router_selector: Selector = field(default_factory=dict)

    def validate(self, pd_mode: bool) -> DiscoveryConfig:
        given = [
            flag
            for flag, value in (
                ("--selector", self.selector),
                ("--prefill-selector", self.prefill_selector),
                ("--decode-selector", self.decode_selector),
                ("--service-discovery-namespace", self.namespace),
                ("--model-id-from", self.model_id_from),
                ("--kubeconfig", self.kubeconfig),
            )
            if value
        ]
        if not self.enabled:
            # The API server's settings serve --router-selector too.
            shared = ("--service-discovery-namespace", "--kubeconfig")
            given = [f for f in given if not (self.router_selector and f in shared)]
            if given:
                raise DiscoveryConfigError(
                    f"{', '.join(given)}: service discovery settings need --service-discovery"
                )
            if self.router_selector:
                self._validate_api_settings()
            return self
        if not 0 < self.port < 65536:
            raise DiscoveryConfigError(
                f"--service-discovery-port must be between 1 and 65535, got {self.port}"
            )
        self._validate_api_settings()
        source = self.model_id_from
        if source is not None and not (
            source == "namespace"
            or (source.startswith(("label:", "annotation:")) and source.split(":", 1)[1])
        ):
            raise DiscoveryConfigError(
                f"--model-id-from {source!r}: use one of {', '.join(MODEL_ID_SOURCES)}"
            )
        if pd_mode:
            if self.selector:
                raise DiscoveryConfigError(
                    "--selector selects ordinary workers; with --pd-disaggregation use "
                    "--prefill-selector and --decode-selector"
                )
            if not self.prefill_selector or not self.decode_selector:
                raise DiscoveryConfigError(
                    "--pd-disaggregation with --service-discovery needs --prefill-selector "
                    "and --decode-selector (k=v ...), so each pod's role is known"
                )
        elif self.prefill_selector or self.decode_selector:
            raise DiscoveryConfigError(
                "--prefill-selector and --decode-selector need --pd-disaggregation"
            )
        return self

    def _validate_api_settings(self) -> None:
        if self.namespace is not None and not _NAMESPACE.match(self.namespace):
            raise DiscoveryConfigError(
                f"--service-discovery-namespace {self.namespace!r} is not a namespace name "
                "(lower-case letters, digits and '-', at most 63)"
            )
        if self.resync_secs <= 0:
            raise DiscoveryConfigError("--service-discovery-resync-secs must be > 0")

    def server_selector(self) -> Selector:
        """What the API server filters on: the selector, or in PD mode the labels both
        role selectors share (the roles are told apart here)."""
        if self.selector:
            return dict(self.selector)
        shared = self.prefill_selector.items() & self.decode_selector.items()
        return dict(shared)
