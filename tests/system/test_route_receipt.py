"""The route receipt and cache_aware's self-correction against real simulated engines whose
small prefix caches evict."""

from __future__ import annotations

import httpx

from support.harness import Gateway, Proc, Sim

SHORT = "be brief " * 25  # a 50-word system prompt
DOCUMENT = " ".join(f"clause{i} of the pasted document" for i in range(60))  # 300 words


def chat(user: str, system: str = SHORT, max_tokens: int = 1) -> dict[str, object]:
    return {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
    }


def receipt(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return dict(part.split("=", 1) for part in response.headers["x-shunter-route"].split("; "))


def test_a_worker_that_evicted_a_document_no_longer_pulls_its_follow_up(
    procs: list[Proc],
) -> None:
    # 512 tokens of cache: two 300-word prompts of other traffic evict the document.
    sims = [Sim(f"rc-{n}", "--cache-tokens", "512", "--block-size", "16") for n in "ab"]
    procs += sims
    gateway = Gateway("--route-receipt", workers=[s.url for s in sims])
    procs.append(gateway)
    url = gateway.url + "/v1/chat/completions"
    with httpx.Client(timeout=30) as client:
        document = receipt(client.post(url, json=chat(DOCUMENT)))
        home = document["worker"]
        for n in range(2):  # other traffic on that engine evicts everything it held
            other = " ".join(f"other{n} topic{i} entirely" for i in range(100))
            direct = client.post(home + "/v1/chat/completions", json=chat("x", other, 40))
            assert direct.status_code == 200
        answer = client.post(url, json=chat("hello there " * 10))  # mostly the system prompt
        talk = receipt(answer)
        assert talk["reason"] == "prefix_match" and talk["worker"] == home
        # The 50-word system prompt, the tree believed (in tokens at the ratio the first
        # answer showed: the sim's tokens are words).
        assert int(talk["predicted_cached"]) > 25
        assert answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        follow_up = receipt(client.post(url, json=chat(DOCUMENT + " next question")))
        # The tree forgot the document on that worker: the follow-up is placed afresh
        # instead of being pulled there by a match the engine no longer holds.
        assert follow_up["reason"] == "new_prefix", follow_up
        assert int(follow_up["predicted_cached"]) < 100
    metrics = httpx.get(gateway.metrics_url, timeout=5).text
    assert 'shunter_routing_precision_count{direction="over",model=' in metrics
