# HTTPS upstreams through real sockets: a local TLS upstream whose certificate the
# test makes (its own CA), reached with SNI and verification on; pooled connections
# reused; clear 502s when verification or the handshake fails; a handshake that never
# finishes is a connect timeout (504).
import asyncio
import datetime
import ipaddress
import json
import ssl

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import HttpReader, Upstream, connect, request, wait_until

CONNECT_TIMEOUT_S = 2


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca():
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("Aforo Test CA")).issuer_name(_name("Aforo Test CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(ca_key, ca_cert, names):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in names]
    cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = make_ca()
    (folder / "ca.pem").write_bytes(pem(ca_cert))
    for label, names in (("right", ["127.0.0.1", "localhost"]), ("wrong", ["elsewhere.example"])):
        key, cert = make_leaf(ca_key, ca_cert, names)
        (folder / f"{label}.pem").write_bytes(pem(cert) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder


def serve_tls(loop_thread, certificates, label):
    """An aiohttp upstream (the tests' usual endpoints) over TLS with `label`'s certificate."""
    upstream = Upstream(loop_thread)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates / f"{label}.pem")

    async def start():
        upstream.runner = web.AppRunner(upstream.app(), access_log=None)
        await upstream.runner.setup()
        site = web.TCPSite(upstream.runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        upstream.port = site._server.sockets[0].getsockname()[1]

    loop_thread.run(start())
    return upstream


def tls_proxy(make_proxy, port, ca_file=None):
    ca = f", ca_file: {ca_file}" if ca_file else ""
    return make_proxy(1, extra_upstreams=f'  api: {{url: "https://127.0.0.1:{port}", connect_timeout_s: '
                                        f'{CONNECT_TIMEOUT_S}{ca}}}\n',
                      routes="  - {name: everything, upstream: api, path_prefix: /}\n")


@pytest.fixture
def tls_upstream(loop_thread, certificates):
    upstream = serve_tls(loop_thread, certificates, "right")
    yield upstream
    loop_thread.run(upstream.runner.cleanup())


def test_requests_reach_an_https_upstream_verified_with_the_ca_file_over_one_pooled_connection(
        make_proxy, tls_upstream, certificates):
    proxy = tls_proxy(make_proxy, tls_upstream.port, certificates / "ca.pem")
    answers = [request(proxy.port, "GET", f"/echo/{index}") for index in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    bodies = [json.loads(body) for _, _, body in answers]
    assert [body["path"] for body in bodies] == ["/echo/0", "/echo/1", "/echo/2"]
    assert len({body["peer_port"] for body in bodies}) == 1          # one TLS connection, reused
    assert proxy.pool("api").connects_total == 1


def test_an_https_upstream_is_sent_its_own_host_and_the_clients_goes_in_x_forwarded_host(
        make_proxy, tls_upstream, certificates):
    # A provider routes by Host and checks it against its certificate's name.
    proxy = tls_proxy(make_proxy, tls_upstream.port, certificates / "ca.pem")
    status, _, body = request(proxy.port, "GET", "/inspect", host="gateway.example.com")
    assert status == 200
    fields = json.loads(body)["raw_headers"]
    assert [value for name, value in fields if name == "host"] == [f"127.0.0.1:{tls_upstream.port}"]
    assert [value for name, value in fields if name == "x-forwarded-host"] == ["gateway.example.com"]


def test_host_header_client_keeps_the_clients_host_for_an_https_upstream(make_proxy, tls_upstream, certificates):
    proxy = make_proxy(1, extra_upstreams=f'  api: {{url: "https://127.0.0.1:{tls_upstream.port}", '
                                          f'ca_file: {certificates / "ca.pem"}, host_header: client}}\n',
                       routes="  - {name: everything, upstream: api, path_prefix: /}\n")
    _, _, body = request(proxy.port, "GET", "/inspect", host="gateway.example.com")
    assert [value for name, value in json.loads(body)["raw_headers"] if name == "host"] == ["gateway.example.com"]


def problem_detail(answer):
    status, headers, body = answer
    assert headers["content-type"] == "application/problem+json"
    return status, json.loads(body)["detail"]


def test_an_upstream_certificate_no_trusted_ca_signed_is_a_502_saying_so(make_proxy, tls_upstream):
    proxy = tls_proxy(make_proxy, tls_upstream.port)                # the system's CAs only
    status, detail = problem_detail(request(proxy.port, "GET", "/echo"))
    assert status == 502
    assert detail.startswith("TLS handshake with upstream 'api' failed: certificate verify failed:")
    assert tls_upstream.requests == []


def test_a_certificate_for_another_host_is_a_502_naming_the_mismatch(make_proxy, loop_thread, certificates):
    wrong = serve_tls(loop_thread, certificates, "wrong")
    try:
        proxy = tls_proxy(make_proxy, wrong.port, certificates / "ca.pem")
        status, detail = problem_detail(request(proxy.port, "GET", "/echo"))
    finally:
        loop_thread.run(wrong.runner.cleanup())
    assert status == 502
    assert "certificate verify failed" in detail and "127.0.0.1" in detail
    assert wrong.requests == []


def test_a_plain_http_upstream_behind_an_https_url_is_a_502_handshake_failure(make_proxy, upstream, certificates):
    proxy = tls_proxy(make_proxy, upstream.port, certificates / "ca.pem")
    status, detail = problem_detail(request(proxy.port, "GET", "/echo"))
    assert status == 502
    assert detail.startswith("TLS handshake with upstream 'api' failed:")
    assert upstream.requests == []


def test_a_handshake_that_never_finishes_is_a_connect_timeout(make_proxy, loop_thread, certificates):
    async def silent(reader, writer):
        await reader.read()                                         # takes the hello, never answers

    server = loop_thread.run(asyncio.start_server(silent, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    proxy = tls_proxy(make_proxy, port, certificates / "ca.pem")
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n")
        wait_until(loop_thread, lambda: len(proxy.pool("api").connecting) == 1)
        proxy.sweep(CONNECT_TIMEOUT_S + 0.5)
        status, _, body, _ = HttpReader(sock).read_response()
    server.close()
    assert status == 504
    assert "timed out" in json.loads(body)["detail"]


def test_a_ca_file_for_a_plain_http_upstream_is_a_settings_error():
    from config.errors import ConfigError
    from config.proxy_settings import parse_proxy_settings
    text = ("upstreams:\n  api: {url: 'http://127.0.0.1:9000', ca_file: ca.pem}\n"
            "routes:\n  - {name: all, upstream: api}\nedge_state: {file: e.yaml}\n")
    with pytest.raises(ConfigError) as error:
        parse_proxy_settings(text, "proxy.yaml")
    assert str(error.value) == ("proxy.yaml:2: `ca_file` is for `https://` upstreams; `http://127.0.0.1:9000` is "
                                "plain HTTP - at `$.upstreams.api`")


@pytest.mark.parametrize("content", [None, b"not a certificate\n"], ids=["missing", "not-pem"])
def test_a_ca_file_that_cannot_be_used_is_found_when_the_settings_are_read(tmp_path, content):
    # So `aforo check-config` reports it, not the first worker to start.
    from config.errors import ConfigError
    from config.proxy_settings import load_proxy_settings
    if content is not None:
        (tmp_path / "ca.pem").write_bytes(content)
    (tmp_path / "proxy.yaml").write_text(
        "upstreams:\n  api: {url: 'https://127.0.0.1:9443', ca_file: ca.pem}\n"
        "routes:\n  - {name: all, upstream: api}\nedge_state: {file: e.yaml}\n")
    with pytest.raises(ConfigError) as error:
        load_proxy_settings(tmp_path / "proxy.yaml")
    assert str(error.value).startswith(f"{tmp_path / 'proxy.yaml'}: upstream `api`: the CA file "
                                       f"{tmp_path / 'ca.pem'} cannot be used: ")
    assert str(error.value).endswith(" - at `$.upstreams.api.ca_file`")
