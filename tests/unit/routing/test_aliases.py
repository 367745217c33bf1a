"""``--model-alias``: requests for an alias are served as the canonical model."""

from __future__ import annotations

import logging

import orjson
import pytest

from shunter.routing.aliases import AliasError, parse_aliases, with_model
from shunter.wire.mock import MockRequest, MockResponse

from support.fakes import Workers, call, gateway, ready


class TwoModels(Workers):
    """``http://a:1`` serves ``llama``, ``http://b:1`` serves ``qwen``."""

    def _control(self, request: MockRequest) -> MockResponse:
        if request.url.endswith(("/server_info", "/get_server_info")):
            model = "llama" if request.url.startswith("http://a:1") else "qwen"
            return MockResponse(200, body=orjson.dumps({"served_model_name": model}))
        return super()._control(request)


async def test_an_alias_is_routed_and_sent_as_its_model() -> None:
    network = TwoModels()
    gw = gateway(("http://a:1", "http://b:1"), network=network, model_aliases={"fast": "qwen"})
    await ready(gw)
    body = b'{"model": "fast", "prompt": "hi", "max_tokens": 3, "extra": {"k": [1, 2.5]}}'
    answer = await call(gw.app, "POST", "/v1/completions", body)
    assert answer.status == 200
    (sent,) = network.requests("http://b:1")
    assert sent.body is not None
    assert orjson.loads(sent.body) == {
        "model": "qwen",
        "prompt": "hi",
        "max_tokens": 3,
        "extra": {"k": [1, 2.5]},
    }
    plain = b'{"model": "llama",  "prompt": "hi"}'
    assert (await call(gw.app, "POST", "/v1/completions", plain)).status == 200
    assert network.requests("http://a:1")[0].body == plain  # not an alias: bytes unchanged
    models = (await call(gw.app, "GET", "/v1/models")).json()["data"]
    assert {m["id"]: m.get("root") for m in models} == {
        "llama": None,
        "qwen": None,
        "fast": "qwen",
    }
    await gw.close()


async def test_a_worker_serving_an_aliased_name_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = gateway(("http://a:1", "http://b:1"), network=TwoModels(), model_aliases={"qwen": "llama"})
    with caplog.at_level(logging.WARNING, logger="shunter.router"):
        await ready(gw)
    warned = [r for r in caplog.records if "named as an alias" in r.getMessage()]
    assert [(r.url, r.alias_of) for r in warned] == [("http://b:1", "llama")]  # type: ignore[attr-defined]
    await gw.close()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["fast"], "give ALIAS=CANONICAL_MODEL"),
        (["=qwen"], "give ALIAS=CANONICAL_MODEL"),
        (["fast=fast"], "its own alias"),
        (["fast=qwen", "fast=llama"], "given twice, for qwen and llama"),
        (["fast=quick", "quick=qwen"], "quick is itself an alias (of qwen)"),
    ],
)
def test_bad_aliases_are_refused_at_start(
    capsys: pytest.CaptureFixture[str], values: list[str], message: str
) -> None:
    with pytest.raises(AliasError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_aliases(values)
    from shunter.cli import main

    argv = ["serve", *(arg for value in values for arg in ("--model-alias", value))]
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_the_rewritten_body_keeps_every_other_value_exactly() -> None:
    body = b'{"model": "fast", "seed": 123456789012345678901234567890, "t": 0.1, "s": "\\u00e9"}'
    rewritten = with_model(body, "qwen")
    assert b"123456789012345678901234567890" in rewritten  # not turned into a float
    assert orjson.loads(rewritten) == {
        "model": "qwen",
        "seed": 1.2345678901234568e29,
        "t": 0.1,
        "s": "\u00e9",
    }
