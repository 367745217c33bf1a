"""The route receipt and cache_aware's self-correction against real simulated engines whose
small prefix caches evict."""

from __future__ import annotations

import httpx

from support.harness import Gateway, Proc, Sim

SYSTEM = " ".join(f"rule{i} keep answers short and kind" for i in range(50))  # 300 words


def chat(system: str, question: str, max_tokens: int = 1) -> dict[str, object]:
    return {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
    }


def receipt(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return dict(part.split("=", 1) for part in response.headers["x-shunter-route"].split("; "))


def test_a_worker_that_evicted_a_prefix_stops_getting_it_on_trust(procs: list[Proc]) -> None:
    # 512 tokens of cache: the 300-token system prompt, then evicted by two other prompts.
    sims = [Sim(f"rc-{n}", "--cache-tokens", "512", "--block-size", "16") for n in "ab"]
    procs += sims
    gateway = Gateway("--route-receipt", workers=[s.url for s in sims])
    procs.append(gateway)
    with httpx.Client(timeout=30) as client:
        url = gateway.url + "/v1/chat/completions"
        first = receipt(client.post(url, json=chat(SYSTEM, "one")))
        again = client.post(url, json=chat(SYSTEM, "two"))
        second = receipt(again)
        assert second["reason"] == "prefix_match" and second["worker"] == first["worker"]
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 288
        home = next(s for s in sims if s.url == first["worker"])
        for n in range(2):  # other traffic on that engine evicts the system prompt
            other = " ".join(f"other{n} topic{i} entirely" for i in range(100))
            assert (
                client.post(
                    home.url + "/v1/chat/completions", json=chat(other, "x", 40)
                ).status_code
                == 200
            )
        stale = client.post(url, json=chat(SYSTEM, "three"))
        trusted = receipt(stale)
        assert trusted["reason"] == "prefix_match" and trusted["worker"] == home.url
        assert int(trusted["predicted_cached"]) > 200  # what the tree still believed
        assert stale.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        after = receipt(client.post(url, json=chat(SYSTEM, "four")))
        assert after["reason"] == "new_prefix"  # the tree forgot: no stale trust
        metrics = httpx.get(gateway.metrics_url, timeout=5).text
        assert 'shunter_routing_precision_count{direction="over",model=' in metrics
