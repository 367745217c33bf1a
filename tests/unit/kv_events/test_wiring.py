"""Precise mode's wiring: the flags and POST /workers fields that name a worker's events,
the tokenizer choice, and cache_aware reading a scorer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest

from shunter.cli import main, serve_config
from shunter.fleet.spec import SpecError, WorkerSpec
from shunter.gateway import _rank_endpoint
from shunter.kv_events.hub import tokenizer_from
from shunter.policies import cache_aware
from shunter.policies.base import RouteRequest
from shunter.policies.cache_aware import CacheAwarePolicy
from shunter.sim.tokenizer import sim_tokenizer, tokenizer_config
from shunter.tokenizer.words import text_ids, word_id

from support.fakes import WithoutUnits, make_worker


def test_the_flag_names_a_worker_its_endpoint_and_replay_endpoint() -> None:
    config = serve_config(
        [
            "--worker-urls",
            "http://w1:1",
            "http://w2:2",
            "--kv-events-endpoint",
            "http://w1:1=tcp://w1:5557,tcp://w1:6557",
            "--kv-events-endpoint",
            "http://w2:2=ipc:///tmp/w2",
        ]
    )
    assert config.kv_events_endpoints == {
        "http://w1:1": ("tcp://w1:5557", "tcp://w1:6557"),
        "http://w2:2": ("ipc:///tmp/w2", None),
    }
    assert config.kv_events_tokenizer == "words"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kv-events-endpoint", "tcp://w:5557"], "give WORKER_URL=ENDPOINT"),
        (["--kv-events-endpoint", "http://other:1=tcp://w:5557"], "not in --worker-urls"),
        (["--kv-events-endpoint", "http://w:1=http://w:5557"], "tcp:// or ipc://"),
        (["--kv-events-tokenizer", "/no/such/tokenizer"], "no such file"),
    ],
)
def test_bad_kv_events_flags_are_refused_with_a_reason(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--worker-urls", "http://w:1", *argv])
    assert message in capsys.readouterr().err


def test_post_workers_takes_the_endpoints_as_labels() -> None:
    spec = WorkerSpec.from_json(
        {
            "url": "http://w:1",
            "kv_events_endpoint": "tcp://w:5557",
            "kv_events_replay_endpoint": "tcp://w:6557",
        }
    )
    assert spec.labels["kv_events_endpoint"] == "tcp://w:5557"
    assert spec.labels["kv_events_replay_endpoint"] == "tcp://w:6557"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kv_events_endpoint": 5557}, "must be a string"),
        ({"kv_events_endpoint": "w:5557"}, "tcp:// or ipc://"),
        ({"kv_events_replay_endpoint": "tcp://w:6557"}, "needs 'kv_events_endpoint'"),
    ],
)
def test_post_workers_refuses_bad_endpoints(fields: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        WorkerSpec.from_json({"url": "http://w:1", **fields})


def test_a_dp_rank_publishes_on_the_base_port_plus_its_rank() -> None:
    assert _rank_endpoint("tcp://w:5557", 0) == "tcp://w:5557"
    assert _rank_endpoint("tcp://w:5557", 2) == "tcp://w:5559"
    assert _rank_endpoint("ipc:///tmp/x", 2) == "ipc:///tmp/x"


def test_the_words_tokenizer_keeps_numbers_and_hashes_words() -> None:
    assert text_ids("12 the  12") == [12, word_id("the"), 12]
    assert word_id("the") != word_id("fox") and word_id(str(2**40)) < 2**32
    assert tokenizer_from("words")("a b") == text_ids("a b")


def test_a_tokenizer_directory_encodes_as_the_engine(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(sim_tokenizer().to_str())
    (tmp_path / "tokenizer_config.json").write_text(str(tokenizer_config()))
    encode = tokenizer_from(str(tmp_path))
    assert encode("the quick fox") == sim_tokenizer().encode("the quick fox").ids
    assert tokenizer_from(str(tmp_path / "tokenizer.json"))("fox") == encode("fox")


class Scorer(WithoutUnits):
    """What the events say, set by the test."""

    def __init__(
        self,
        tracked: set[str],
        cached: dict[str, int],
        total: int = 100,
        held: dict[str, int] | None = None,
    ) -> None:
        self.total = total
        self.held = held or {}
        self.says(tracked, cached)

    def says(self, tracked: set[str], cached: dict[str, int]) -> None:
        """The events change: ``tracked`` publish, and hold ``cached`` of the prompt."""
        self.active = bool(tracked)
        self.tracked = tracked
        self.cached = cached

    def held_tokens(self, model: str, url: str) -> int:
        return self.held.get(url, 0)

    def tracks(self, url: str) -> bool:
        return url in self.tracked

    def cached_tokens(
        self, model: str, text: str, chat: bytes | None = None
    ) -> tuple[int, Mapping[str, int]]:
        return self.total, self.cached


def _request(text: str = "some prompt " * 10) -> RouteRequest:
    return RouteRequest(model="m", text=text)


def test_precise_mode_picks_the_longest_cached_run_then_the_less_loaded() -> None:
    a, b, c = (make_worker(f"http://{n}:1") for n in "abc")
    engines = Scorer({a.url, b.url, c.url}, {a.url: 48, b.url: 64})
    policy = CacheAwarePolicy(scorer=engines)
    assert policy.select((a, b, c), _request()) is b
    engines.says({a.url, b.url}, {a.url: 64, b.url: 64})
    a.state.in_flight = 3
    assert policy.select((a, b, c), _request()) is b  # a tie: the less loaded
    b.state.exclude(True)
    assert policy.select((a, b, c), _request()) is a  # an unavailable holder is skipped


def test_precise_mode_below_the_threshold_places_the_prompt_as_new() -> None:
    a, b = make_worker("http://a:1"), make_worker("http://b:1")
    policy = CacheAwarePolicy(scorer=Scorer({a.url, b.url}, {a.url: 16}))  # 16 of 100 tokens
    chosen = {policy.select((a, b), _request(f"prompt {i} " * 10)) for i in range(4)}
    assert chosen == {a, b}  # spread as new prefixes, not all to a


def test_precise_mode_places_a_new_prompt_by_what_the_engines_hold() -> None:
    """Independent gateways subscribed to the same engines agree on their sizes, though
    each tree holds only its own routes."""
    a, b = make_worker("http://a:1"), make_worker("http://b:1")
    engines = Scorer({a.url, b.url}, {}, held={a.url: 1000})  # a holds 1,000 tokens, b none
    for n in range(20):  # fresh gateways: their trees are empty
        chosen = CacheAwarePolicy(scorer=engines).select((a, b), _request(f"prompt {n} " * 10))
        assert chosen is b


def test_precise_placement_counts_what_it_placed_before_the_engines_published_it() -> None:
    workers = tuple(make_worker(f"http://w{i}:1") for i in range(4))
    engines = Scorer({w.url for w in workers}, {})  # nothing published yet
    policy = CacheAwarePolicy(scorer=engines)
    placed = [policy.select(workers, _request(f"prompt {n} " * 10)) for n in range(8)]
    assert sorted(Counter(w.url for w in placed if w is not None).values()) == [2, 2, 2, 2]


def test_a_route_not_yet_in_the_engines_events_is_taken_from_the_tree() -> None:
    """The engine publishes a prompt once prefilled: a second request arriving meanwhile
    follows the first, rather than being placed as new on another worker."""
    a, b = make_worker("http://a:1"), make_worker("http://b:1")
    policy = CacheAwarePolicy(scorer=Scorer({a.url, b.url}, {}))  # nothing published yet
    text = "a shared system prompt " * 10
    first = policy.decide((a, b), _request(text + "user 1"))
    second = policy.decide((a, b), _request(text + "user 2"))
    assert first.reason == "new_prefix" and second.reason == "prefix_match"
    assert second.worker is first.worker


def test_the_tree_speaks_only_for_workers_without_events(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every route here is older than the events' lag: the engines have had time to speak.
    monkeypatch.setattr(cache_aware, "EVENTS_LAG_SECS", 0.0)
    a, b = make_worker("http://a:1"), make_worker("http://b:1")
    engines = Scorer(set(), {})  # no worker publishes events yet: the tree decides
    policy = CacheAwarePolicy(scorer=engines)
    text = "a shared system prompt " * 10
    first = policy.select((a, b), _request(text))
    assert first is not None
    other = b if first is a else a
    # Now the first worker's engine says it holds nothing (evicted), the other all of it.
    engines.says({a.url, b.url}, {other.url: 100})
    assert policy.select((a, b), _request(text)) is other
    # A worker without events keeps its tree match.
    engines.says({other.url}, {})
    assert policy.select((a, b), _request(text)) is first
