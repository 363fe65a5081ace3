# ruff: noqa: F811 - pytest fixtures imported from tests.social_fakes are parameters here
"""The SSRF guard: address rules, every redirect hop, pinned connections, limits."""

from __future__ import annotations

import gzip
import ipaddress

import pytest

from servers.core import http_guard
from servers.core.errors import ValorError
from servers.core.http_guard import FetchLimits, allow_loopback_ports_for_tests, fetch, vet_url
from tests.fakes.base import Reply
from tests.social_fakes import (  # noqa: F401 - fixtures
    SpyTransport,
    article,
    only_loopback_connections,
    pages,
    stub_resolver,
)

NO_PORTS: frozenset[int] = frozenset()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.5", "private"),
        ("172.16.3.4", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("169.254.10.10", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "public"),  # carrier-grade NAT: not global
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:10.1.2.3", "private"),
        ("2002:7f00:0001::1", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"),  # Teredo wrapping 10.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address, reason):
    found = http_guard.refusal_reason(ipaddress.ip_address(address))
    assert found is not None
    assert reason in found


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
def test_public_addresses_pass(address):
    assert http_guard.refusal_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "not file"),
        ("ftp://example.com/x", "not ftp"),
        ("gopher://example.com/", "not gopher"),
        ("javascript:alert(1)", "not javascript"),
        ("http://user:pw@example.com/", "user name or password"),
        ("http://127.0.0.1:8080/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://10.0.0.8/admin", "private"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[::ffff:169.254.169.254]/", "metadata"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
        ("http://0x7f000001/", "loopback"),  # integer spellings resolve to loopback too
    ],
)
def test_bad_urls_are_refused_before_any_lookup_or_connect(url, message, only_loopback_connections):
    resolver = stub_resolver({"0x7f000001": ["127.0.0.1"]})
    with pytest.raises(ValorError) as caught:
        vet_url(url, resolver, loopback_ports=NO_PORTS)
    assert caught.value.category == "input"
    assert message in str(caught.value)
    assert only_loopback_connections.attempts == []


def test_a_name_with_any_private_address_is_refused():
    resolver = stub_resolver({"mixed.example": ["93.184.215.14", "10.0.0.1"]})
    with pytest.raises(ValorError, match=r"10\.0\.0\.1, a private"):
        vet_url("https://mixed.example/", resolver, loopback_ports=NO_PORTS)


def test_the_connection_goes_to_the_vetted_address():
    resolver = stub_resolver({"news.example": ["93.184.215.14"]})
    target = vet_url("https://news.example:8443/a?b=1", resolver, loopback_ports=NO_PORTS)
    assert str(target.connect_url) == "https://93.184.215.14:8443/a?b=1"
    assert target.url.host == "news.example"


@pytest.mark.parametrize(
    ("host", "addresses"),
    [
        ("internal.example", ["10.0.0.1"]),
        ("metadata.example", ["169.254.169.254"]),
        ("loop.example", ["127.0.0.1"]),
        ("loop6.example", ["::1"]),
    ],
)
async def test_private_names_are_refused_before_connecting(host, addresses):
    spy = SpyTransport()
    resolver = stub_resolver({host: addresses})
    with pytest.raises(ValorError) as caught:
        await fetch(f"http://{host}/page", resolver=resolver, transport=spy)
    assert caught.value.category == "input"
    assert spy.sent == []
    assert resolver.calls == [host]


async def test_a_redirect_to_a_private_address_is_refused_at_that_hop(pages):
    pages.redirect("go-meta", "http://169.254.169.254/latest/meta-data/iam/")
    pages.redirect("go-internal", "http://internal.example/admin")
    pages.redirect("go-loop6", "http://[::1]:8080/")
    pages.redirect("go-other-port", "http://127.0.0.1:1/")
    resolver = stub_resolver({"public.example": ["127.0.0.1"], "internal.example": ["10.20.30.40"]})
    port = int(pages.url.rsplit(":", 1)[1])
    with allow_loopback_ports_for_tests(port):
        for path, reason in [
            ("go-meta", "metadata"),
            ("go-internal", "private"),
            ("go-loop6", "loopback"),
            ("go-other-port", "loopback"),
        ]:
            spy = SpyTransport()
            with pytest.raises(ValorError, match=reason):
                await fetch(
                    f"http://public.example:{port}/{path}", resolver=resolver, transport=spy
                )
            assert len(spy.sent) == 1  # the first hop only; the redirect never connected
            assert spy.sent[0].url.host == "127.0.0.1"
            assert spy.sent[0].headers["host"] == f"public.example:{port}"


async def test_dns_is_asked_once_per_hop_and_the_answer_is_pinned(pages):
    """A rebinding resolver changes its answer; the connection uses the first, vetted one."""
    pages.html("article", article("Pinned"))
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])
    calls = []

    def rebinding(host, port):
        calls.append(host)
        return next(answers)

    port = int(pages.url.rsplit(":", 1)[1])
    spy = SpyTransport()
    with allow_loopback_ports_for_tests(port):
        page = await fetch(
            f"http://rebind.example:{port}/article", resolver=rebinding, transport=spy
        )
    assert calls == ["rebind.example"]
    assert "Pinned" in page.text
    assert [str(r.url) for r in spy.sent] == [f"http://127.0.0.1:{port}/article"]
    assert pages.requests[-1].headers["host"] == f"rebind.example:{port}"


async def test_redirects_are_followed_and_counted(pages):
    pages.html("final", article("Final page"))
    pages.redirect("one", "/two", 301)
    pages.redirect("two", "final", 307)
    port = int(pages.url.rsplit(":", 1)[1])
    with allow_loopback_ports_for_tests(port):
        page = await fetch(f"{pages.url}/one")
        assert page.url == f"{pages.url}/final"
        assert page.redirects == [f"{pages.url}/two", f"{pages.url}/final"]
        pages.redirect("loop", "/loop")
        with pytest.raises(ValorError, match="redirected more than 2 times") as caught:
            await fetch(f"{pages.url}/loop", limits=FetchLimits(max_redirects=2))
    assert caught.value.category == "upstream_api"


async def test_size_type_status_and_time_limits(pages):
    port = int(pages.url.rsplit(":", 1)[1])
    pages.html("big", "<html>" + "x" * 50_000 + "</html>")
    pages.pages["bomb"] = Reply(
        body=gzip.compress(b"<html>" + b"a" * 2_000_000 + b"</html>"),
        headers={"Content-Type": "text/html", "Content-Encoding": "gzip"},
    )
    pages.pages["zip"] = Reply(body=b"PK\x03\x04", headers={"Content-Type": "application/zip"})
    pages.pages["limited"] = Reply(429, b"slow down", {"Content-Type": "text/plain"})
    pages.pages["broken"] = Reply(502, b"bad gateway", {"Content-Type": "text/plain"})
    small = FetchLimits(max_bytes=10_000, timeout_seconds=5)
    with allow_loopback_ports_for_tests(port):
        with pytest.raises(ValorError, match="larger than 10,000 bytes") as big:
            await fetch(f"{pages.url}/big", limits=small)
        with pytest.raises(ValorError, match="larger than 10,000 bytes"):
            await fetch(f"{pages.url}/bomb", limits=small)  # counted after decompression
        with pytest.raises(ValorError, match="application/zip") as wrong_type:
            await fetch(f"{pages.url}/zip")
        with pytest.raises(ValorError, match="HTTP 404") as missing:
            await fetch(f"{pages.url}/nothing")
        with pytest.raises(ValorError) as limited:
            await fetch(f"{pages.url}/limited")
        with pytest.raises(ValorError, match="HTTP 502") as broken:
            await fetch(f"{pages.url}/broken")
        pages.html("slow", article("Slow"))
        pages.fail_next("timeout", path="/slow")
        with pytest.raises(ValorError) as slow:
            await fetch(f"{pages.url}/slow", limits=FetchLimits(timeout_seconds=0.5))
    assert big.value.category == "input"
    assert wrong_type.value.category == "input"
    assert missing.value.category == "input"
    assert limited.value.category == "rate_limit"
    assert broken.value.category == "upstream_api"
    assert slow.value.category == "timeout"


def test_the_subprocess_allowance_needs_both_the_variable_and_the_marker(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    assert http_guard.loopback_ports_allowed_for_tests(data_dir) == frozenset()
    monkeypatch.setenv(http_guard.LOOPBACK_TEST_ENV, "4321")
    assert http_guard.loopback_ports_allowed_for_tests(data_dir) == frozenset()  # no marker
    marker = data_dir / http_guard.LOOPBACK_TEST_MARKER
    marker.write_text("9999")
    assert http_guard.loopback_ports_allowed_for_tests(data_dir) == frozenset()  # mismatch
    marker.write_text("4321\n")
    assert http_guard.loopback_ports_allowed_for_tests(data_dir) == {4321}
    monkeypatch.setenv(http_guard.LOOPBACK_TEST_ENV, "nonsense")
    assert http_guard.loopback_ports_allowed_for_tests(data_dir) == frozenset()


def test_the_allowance_is_not_a_setting_a_dotenv_file_could_switch_on(tmp_path, monkeypatch):
    """The variable is read from the process environment only; a .env line has no effect."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"{http_guard.LOOPBACK_TEST_ENV}=4321\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / http_guard.LOOPBACK_TEST_MARKER).write_text("4321")
    assert http_guard.loopback_ports_allowed_for_tests(data_dir) == frozenset()


def test_the_allowance_opens_only_named_ports_on_127_0_0_1():
    with allow_loopback_ports_for_tests(4321):
        ports = http_guard.loopback_ports_allowed_for_tests()
        vet_url("http://127.0.0.1:4321/", loopback_ports=ports)
        for url in ("http://127.0.0.1:4322/", "http://127.0.0.2:4321/", "http://[::1]:4321/"):
            with pytest.raises(ValorError, match="loopback"):
                vet_url(url, loopback_ports=ports)
    assert http_guard.loopback_ports_allowed_for_tests() == frozenset()


@pytest.fixture
def tls_site(tmp_path):
    """An HTTPS server on 127.0.0.1 whose certificate names secure.example; records SNI and Host."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificate")
    import ssl
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"]
    command += ["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-keyout", str(key)]
    command += ["-out", str(cert), "-subj", "/CN=secure.example"]
    command += ["-addext", "subjectAltName=DNS:secure.example"]
    subprocess.run(command, check=True, capture_output=True)
    seen: dict[str, list[str]] = {"sni": [], "host": []}
    body = article("Over TLS").encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen["host"].append(self.headers["Host"])
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: seen["sni"].append(name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], cert, seen
    server.shutdown()
    server.server_close()


async def test_https_goes_to_the_vetted_address_and_verifies_the_name(tls_site, monkeypatch):
    import ssl

    port, cert, seen = tls_site
    monkeypatch.setattr(http_guard, "_tls_context", lambda: ssl.create_default_context(cafile=cert))
    resolver = stub_resolver({"secure.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
    spy = SpyTransport()
    spy.inner = http_guard.make_transport()
    with allow_loopback_ports_for_tests(port):
        page = await fetch(f"https://secure.example:{port}/", resolver=resolver, transport=spy)
        assert "Over TLS" in page.text
        assert str(spy.sent[0].url) == f"https://127.0.0.1:{port}/"
        assert seen["sni"] == ["secure.example"]
        assert seen["host"] == [f"secure.example:{port}"]
        # Same address, a name the certificate does not cover: verification fails.
        with pytest.raises(ValorError) as caught:
            await fetch(f"https://other.example:{port}/", resolver=resolver)
    assert caught.value.category == "upstream_api"
    assert "certificate could not be verified" in str(caught.value)
