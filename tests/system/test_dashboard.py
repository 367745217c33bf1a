"""The dashboard, driven in headless Chromium (Debian's package) through Playwright."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from support.harness import Gateway, Proc, Sim, free_port

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"


def test_the_dashboard_shows_a_new_worker_within_seconds(procs: list[Proc]) -> None:
    from playwright.sync_api import expect, sync_playwright

    first, second = Sim("dash-a", "--itl-ms", "1"), Sim("dash-b", "--itl-ms", "1")
    procs += [first, second]
    gateway = Gateway(
        "--api-key", "dash-key", "--worker-startup-check-interval", "1", workers=[first.url]
    )
    procs.append(gateway)
    auth = {"authorization": "Bearer dash-key"}
    console: list[str] = []
    assert httpx.get(gateway.url + "/dashboard").status_code == 401  # the sign-in form
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 360})
        page.on("console", lambda message: console.append(message.text))
        page.goto(gateway.url + "/dashboard")  # signs in through the form: no key in a URL
        page.fill('input[name="api_key"]', "dash-key")
        page.click('button[type="submit"]')
        expect(page.locator(f'tr[data-url="{first.url}"]')).to_be_visible(timeout=5000)
        assert page.url == gateway.url + "/dashboard"
        pod = {"smg.ai/pod-name": "sim-b-0", "smg.ai/pod-namespace": "llm"}  # as discovered
        added = httpx.post(
            gateway.url + "/workers", json={"url": second.url, "labels": pod}, headers=auth
        )
        assert added.status_code == 202
        row = page.locator(f'tr[data-url="{second.url}"]')
        expect(row).to_be_visible(timeout=5000)  # no reload: the page refreshes itself
        expect(row).to_contain_text("healthy")
        expect(row.locator("td").nth(3)).to_have_text("llm/sim-b-0")  # the pod column
        for _ in range(20):  # some traffic, so the rates and hit rates have something to show
            httpx.post(
                gateway.url + "/v1/completions",
                headers=auth,
                json={"prompt": "the same long prompt " * 20, "max_tokens": 2},
            )
        expect(page.locator(f'tr[data-url="{first.url}"] td').nth(9)).not_to_have_text(
            "n/a", timeout=5000
        )
        # The Content-Security-Policy admits the page's own script and style: nothing refused.
        assert not [m for m in console if "Content Security Policy" in m], console
        # A link written for smg (key in the query) is exchanged and the key leaves the URL.
        other = browser.new_page()
        other.goto(gateway.url + "/dashboard?api_key=dash-key")
        expect(other.locator(f'tr[data-url="{first.url}"]')).to_be_visible(timeout=5000)
        assert other.url == gateway.url + "/dashboard"
        if os.environ.get("SHUNTER_SCREENSHOT"):
            page.screenshot(path=str(SCREENSHOT))
        browser.close()


def test_the_dashboard_shows_kv_event_subscriptions_and_peers(
    procs: list[Proc], tmp_path: Path
) -> None:
    """A worker whose KV events the gateway follows gets a row (connected); the peers
    section shows the handshakes a peer without the secret failed, in red."""
    import zmq
    from playwright.sync_api import expect, sync_playwright

    events = f"tcp://127.0.0.1:{free_port()}"
    sim = Sim("dash-kv", "--kv-events-endpoint", events)
    procs.append(sim)
    impostor_port = free_port()  # a peer in the clear where the gateway expects a secret
    context = zmq.Context()
    impostor = context.socket(zmq.PUB)
    impostor.bind(f"tcp://127.0.0.1:{impostor_port}")
    secret = tmp_path / "secret"
    secret.write_text("the gateways' shared secret\n")
    gateway = Gateway(
        "--kv-events-endpoint",
        f"{sim.url}={events}",
        "--peer-port",
        str(free_port()),
        "--peer-urls",
        f"127.0.0.1:{impostor_port}",
        "--peer-secret-file",
        str(secret),
        workers=[sim.url],
    )
    procs.append(gateway)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(gateway.url + "/dashboard")
            kv_row = page.locator(f'#kv-rows tr[data-url="{sim.url}"]')
            expect(kv_row).to_be_visible(timeout=5000)
            expect(kv_row.locator("td").nth(1)).to_have_text("connected", timeout=5000)
            expect(page.locator("#peers")).to_be_visible()
            failures = page.locator("#peer-handshake")
            expect(failures).to_have_class("bad", timeout=10000)
            assert failures.inner_text().startswith("handshake failures ")
            browser.close()
    finally:
        impostor.close(linger=0)
        context.term()
