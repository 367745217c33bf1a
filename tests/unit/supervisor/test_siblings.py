"""One /workers for ``--workers N``: each process's rows, asked over real Unix sockets
(supervisor/control.py) and merged (supervisor/siblings.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from shunter.supervisor.control import METRICS, WORKERS, ControlSocket
from shunter.supervisor.siblings import Siblings, ask, merge_rows

A, B, C = "http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"


def row(url: str, **fields: Any) -> dict[str, Any]:
    base = {"url": url, "load": 0, "processed": 0, "errors": 0, "is_healthy": True}
    return base | {"circuit_state": "closed", "priority": 50} | fields


def test_counts_are_summed_and_health_and_breakers_are_the_worst_of_the_processes() -> None:
    own = [row(A, load=2, processed=10, errors=1), row(B, processed=4)]
    sibling = [
        row(A, load=1, processed=5, circuit_state="half_open"),
        row(B, processed=6, is_healthy=False, circuit_state="open"),
    ]
    third = [row(A, processed=1, circuit_state="open")]
    merged = {r["url"]: r for r in merge_rows(own, [sibling, third])}
    assert merged[A] == row(A, load=3, processed=16, errors=1, circuit_state="open")
    assert merged[B] == row(B, processed=10, is_healthy=False, circuit_state="open")
    assert own[0]["processed"] == 10  # the process's own rows are not changed


def test_a_worker_one_process_finds_unhealthy_is_not_ready_for_the_gateway() -> None:
    own = [row(A, status="ready"), row(B, status="draining")]
    sibling = [row(A, status="not_ready", is_healthy=False), row(B, is_healthy=False)]
    merged = {r["url"]: r for r in merge_rows(own, [sibling])}
    assert (merged[A]["is_healthy"], merged[A]["status"]) == (False, "not_ready")
    assert merged[B]["status"] == "draining"  # leaving, whatever its health


def test_a_worker_only_a_sibling_knows_yet_is_listed_after_the_own_ones() -> None:
    merged = merge_rows([row(A)], [[row(C, load=1), row(A)]])
    assert [r["url"] for r in merged] == [A, C]
    assert merged[1]["load"] == 1


def test_dp_ranks_of_one_url_stay_separate_workers() -> None:
    own = [row(A, dp_rank=0, load=1), row(A, dp_rank=1, load=2)]
    merged = merge_rows(own, [[row(A, dp_rank=1, load=5)]])
    assert [(r["dp_rank"], r["load"]) for r in merged] == [(0, 1), (1, 7)]


def test_siblings_are_asked_over_their_control_sockets_and_a_silent_one_is_left_out(
    tmp_path: Path,
) -> None:
    paths = [str(tmp_path / f"{i}.sock") for i in range(3)]
    answers = {0: [row(A, processed=3)], 1: [row(A, processed=4), row(B)]}

    def rows_of(index: int) -> Callable[[], bytes]:
        return lambda: orjson.dumps(answers[index])

    async def scenario() -> list[dict[str, Any]]:
        sockets = [ControlSocket(paths[i], {WORKERS: (rows_of(i), False)}) for i in (0, 1)]
        for control in sockets:
            control.start()
        try:
            # paths[2] has no process behind it (restarting, say): left out, not waited on.
            siblings = Siblings(paths, timeout=0.5)
            return await siblings.merged([row(A, processed=1)])
        finally:
            for control in sockets:
                await control.close()

    merged = asyncio.run(scenario())
    assert [(r["url"], r["processed"]) for r in merged] == [(A, 8), (B, 0)]


def test_a_question_the_socket_does_not_know_gets_nothing_and_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "c.sock")

    async def scenario() -> tuple[bytes, bytes]:
        control = ControlSocket(path, {METRICS: (lambda: b"m 1\n", True)})
        control.start()
        try:
            return await ask(path, b"shutdown"), await ask(path, METRICS)
        finally:
            await control.close()

    with caplog.at_level(logging.WARNING, "shunter.supervisor"):
        unknown, metrics = asyncio.run(scenario())
    assert (unknown, metrics) == (b"", b"m 1\n")
    assert "unknown question on the control socket" in caplog.text


def test_an_answer_that_fails_costs_the_asker_its_answer_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "c.sock")

    def broken() -> bytes:
        raise RuntimeError("bug")

    async def scenario() -> tuple[list[list[dict[str, Any]]], bytes]:
        control = ControlSocket(path, {WORKERS: (broken, False), METRICS: (lambda: b"ok", True)})
        control.start()
        try:
            rows = await Siblings([path], timeout=0.5).worker_rows()
            return rows, await ask(path, METRICS)  # still serving
        finally:
            await control.close()

    with caplog.at_level(logging.WARNING, "shunter.supervisor"):
        rows, metrics = asyncio.run(scenario())
    assert (rows, metrics) == ([], b"ok")
    assert "a control socket answer failed" in caplog.text
