"""HTTPS for clients, and mutual TLS to workers, with certificates made for the test."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from support.harness import Gateway, Proc, Sim, wait_for

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all from the CA."""
    d = tmp_path_factory.mktemp("certs")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=shunter-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return d


def test_the_gateway_serves_https(certs: Path, procs: list[Proc]) -> None:
    sim = Sim("plain")
    procs.append(sim)
    gateway = Gateway(
        "--tls-cert-path",
        str(certs / "server.pem"),
        "--tls-key-path",
        str(certs / "server.key"),
        workers=[sim.url],
    )
    procs.append(gateway)
    assert gateway.url.startswith("https://")
    trust = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    response = httpx.post(gateway.url + "/v1/completions", json={"prompt": "x"}, verify=trust)
    assert response.status_code == 200
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets nowhere
        httpx.get(gateway.url.replace("https", "http") + "/health")


def test_mutual_tls_to_a_worker_that_demands_a_client_certificate(
    certs: Path, procs: list[Proc]
) -> None:
    sim = Sim(
        "locked",
        "--tls-cert-path",
        str(certs / "server.pem"),
        "--tls-key-path",
        str(certs / "server.key"),
        "--tls-client-ca-path",
        str(certs / "ca.pem"),
    )
    procs.append(sim)
    gateway = Gateway(
        "--client-cert-path",
        str(certs / "client.pem"),
        "--client-key-path",
        str(certs / "client.key"),
        "--ca-cert-paths",
        str(certs / "ca.pem"),
        workers=[sim.url],
    )
    procs.append(gateway)
    response = httpx.post(gateway.url + "/v1/completions", json={"prompt": "x"})
    assert response.status_code == 200
    assert response.headers["x-worker-id"] == "locked"

    # Without the client certificate the worker never becomes reachable.
    outsider = Gateway(
        "--ca-cert-paths", str(certs / "ca.pem"), "--worker-startup-timeout-secs", "1"
    )
    procs.append(outsider)
    httpx.post(outsider.url + "/workers", json={"url": sim.url})

    def failed() -> bool:
        job = httpx.get(
            outsider.url + "/workers/" + sim.url.replace("/", "%2F").replace(":", "%3A")
        ).json()
        return bool(job.get("job_status", {}).get("status") == "failed")

    wait_for(failed, 15, "the registration without a client certificate to fail")
