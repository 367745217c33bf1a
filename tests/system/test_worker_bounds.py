"""What a worker can make the gateway hold, through a real gateway and sim."""

from __future__ import annotations

from support.harness import Gateway, Proc, Sim


def test_the_gateway_answers_502_for_a_response_over_max_response_bytes(
    procs: list[Proc],
) -> None:
    """``shunter serve --max-response-bytes`` reaches the worker clients: a reply bigger
    than it is a 502 saying so (not retried, the worker's pool kept), while streams flow."""
    sim = Sim("w0")
    procs.append(sim)
    gateway = Gateway("--max-response-bytes", "64", workers=[sim.url])
    procs.append(gateway)
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with gateway.client() as http:
        whole = http.post("/v1/chat/completions", json=request)
        assert whole.status_code == 502
        assert whole.json()["error"]["code"] == "upstream_response_too_large"
        assert "larger than the gateway accepts" in whole.json()["error"]["message"]
        assert len(sim.requests()) == 1  # not retried: any worker would answer as much
        streamed = {**request, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=streamed) as stream:
            assert stream.status_code == 200
            assert b"[DONE]" in b"".join(stream.iter_bytes())
