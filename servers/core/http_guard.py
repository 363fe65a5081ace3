"""Fetching a URL a person (or a model) supplied, without letting it reach inside the network.

The SSRF guard, applied on every hop including each redirect:

- only ``http`` and ``https``; no credentials in the URL;
- the host is resolved once and *every* address it resolves to must be public: loopback,
  private, link-local, multicast, reserved, unspecified, shared (CGNAT) and cloud metadata
  addresses are refused, for IPv4 and IPv6, including IPv4-mapped / 6to4 / Teredo IPv6 forms;
- the connection goes to the vetted IP itself (the Host header and TLS SNI carry the name), so a
  second DNS answer (DNS rebinding) cannot swap the address after the check;
- no proxies from the environment (a proxy would make its own DNS lookup);
- a deadline for the whole fetch, a byte limit while streaming, and an allowed content-type list.

Tests need to fetch from a page server on 127.0.0.1. That is a test-only allowance, off by
default, for 127.0.0.1 on named ports only (never other loopback, private or metadata addresses):
``allow_loopback_ports_for_tests(port)`` in-process, or, for a server started as a subprocess,
``VALOR_TEST_ONLY_LOOPBACK_PORTS=<ports>`` *together with* a file ``ALLOW_LOOPBACK_FOR_TESTS`` in
the data directory whose content is the same port list. The variable is read from the process
environment only (not from ``.env``), so a production configuration cannot switch it on.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from servers.core.errors import Category, ValorError

if TYPE_CHECKING:
    import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

LOOPBACK_TEST_ENV = "VALOR_TEST_ONLY_LOOPBACK_PORTS"
LOOPBACK_TEST_MARKER = "ALLOW_LOOPBACK_FOR_TESTS"
TEST_LOOPBACK_ADDRESS = ipaddress.ip_address("127.0.0.1")

# Cloud metadata endpoints (AWS/GCP/Azure/OpenStack, AWS IPv6, Alibaba, Oracle).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
METADATA_HOSTNAMES = frozenset({"metadata.google.internal", "metadata", "instance-data"})

INFLATE_STEP = 256 * 1024  # most bytes inflated at once: a bomb's chunk never lands whole
HTML_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
USER_AGENT = "Valor/0.1 (+link saver)"

_test_loopback_ports: set[int] = set()


@contextmanager
def allow_loopback_ports_for_tests(*ports: int) -> Iterator[None]:
    """Test-only: let fetches reach 127.0.0.1 on exactly these ports while the block runs."""
    added = {int(p) for p in ports} - _test_loopback_ports
    _test_loopback_ports.update(added)
    try:
        yield
    finally:
        _test_loopback_ports.difference_update(added)


def _parse_ports(text: str) -> set[int] | None:
    try:
        ports = {int(part) for part in text.replace(" ", "").split(",") if part}
    except ValueError:
        return None
    return ports if ports and all(0 < p < 65536 for p in ports) else None


def loopback_ports_allowed_for_tests(data_dir: Path | None = None) -> frozenset[int]:
    """Ports on 127.0.0.1 the test-only allowance opens now (empty in production)."""
    ports = set(_test_loopback_ports)
    declared = os.environ.get(LOOPBACK_TEST_ENV, "").strip()
    if declared:
        if data_dir is None:
            from servers.core.settings import get_settings

            data_dir = get_settings().data_dir
        marker = Path(data_dir) / LOOPBACK_TEST_MARKER
        env_ports = _parse_ports(declared)
        try:
            marker_ports = _parse_ports(marker.read_text().strip())
        except OSError:
            marker_ports = None
        if env_ports is not None and env_ports == marker_ports:
            ports |= env_ports
    return frozenset(ports)


def refusal_reason(address: IPAddress) -> str | None:
    """Why this address must not be fetched, or None for a public address."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is not None:
            inner = refusal_reason(embedded)
            return f"{inner} (inside an IPv6 address)" if inner else None
    checks = (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_private", "a private-network address"),
    )
    for attribute, reason in checks:
        if getattr(address, attribute):
            return reason
    if not address.is_global:
        return "not a public internet address"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host (A and AAAA)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValorError(
            Category.INPUT, f"The host {host!r} could not be resolved ({exc.strerror})."
        ) from None
    except (UnicodeError, OSError) as exc:  # e.g. a label too long for IDNA
        raise ValorError(
            Category.INPUT, f"The host {host!r} could not be resolved ({type(exc).__name__})."
        ) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass
class FetchedPage:
    url: str  # where the content finally came from, after redirects
    status: int
    content_type: str
    charset: str | None
    body: bytes
    redirects: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        try:
            return self.body.decode(self.charset or "utf-8", errors="replace")
        except LookupError:  # an unknown charset name from the server
            return self.body.decode("utf-8", errors="replace")


@dataclass
class FetchLimits:
    max_bytes: int = 5 * 1024 * 1024
    timeout_seconds: float = 20.0
    max_redirects: int = 5
    allowed_types: tuple[str, ...] = HTML_TYPES

    @classmethod
    def from_settings(cls, allowed_types: tuple[str, ...] = HTML_TYPES) -> FetchLimits:
        from servers.core.settings import get_settings

        settings = get_settings()
        return cls(
            max_bytes=settings.link_fetch_max_bytes,
            timeout_seconds=settings.link_fetch_timeout_seconds,
            max_redirects=settings.link_max_redirects,
            allowed_types=allowed_types,
        )


@dataclass(frozen=True)
class VettedTarget:
    url: httpx.URL  # the URL as given
    address: IPAddress  # the address the connection will go to
    connect_url: httpx.URL  # url with the host replaced by that address


def _refuse(message: str) -> ValorError:
    return ValorError(Category.INPUT, message)


def vet_url(
    url: str | httpx.URL, resolver: Resolver | None = None, *, loopback_ports: frozenset[int]
) -> VettedTarget:
    """Check a URL and pick the address to connect to; raises before any connection."""
    import httpx

    try:
        parsed = httpx.URL(str(url)) if not isinstance(url, httpx.URL) else url
        host = parsed.host  # decoded from IDNA (xn--…) here; a bad one raises
    except UnicodeError as exc:  # idna.IDNAError and its kinds
        raise _refuse(
            f"The link's host name is not a valid internationalized domain name ({exc})."
        ) from None
    except (httpx.InvalidURL, ValueError) as exc:
        raise _refuse(f"That is not a valid URL ({exc}).") from None
    if parsed.scheme not in ("http", "https"):
        shown = parsed.scheme or "no scheme"
        raise _refuse(f"Only http and https links can be fetched, not {shown}.")
    if parsed.userinfo:
        raise _refuse("Links with a user name or password in them are not fetched.")
    if not host:
        raise _refuse("The link has no host name.")
    if host.rstrip(".").lower() in METADATA_HOSTNAMES:
        raise _refuse(f"The host {host} is a cloud metadata service and is never fetched.")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = _literal_address(host)
    if addresses is None:
        resolve = resolver or system_resolver
        addresses = []
        for text in resolve(host.rstrip("."), port):
            parsed_address = _literal_address(text.split("%")[0])
            if parsed_address is None:
                raise ValorError(Category.INTERNAL, f"The resolver gave a non-address for {host}.")
            addresses += parsed_address
        if not addresses:
            raise ValorError(Category.INPUT, f"The host {host!r} has no addresses.")
    for address in addresses:
        if address == TEST_LOOPBACK_ADDRESS and port in loopback_ports:
            continue
        reason = refusal_reason(address)
        if reason:
            raise _refuse(
                f"Refused to fetch {host}: it resolves to {address}, {reason}. Only public "
                "web pages can be saved."
            )
    chosen = addresses[0]
    connect_host = str(chosen)
    return VettedTarget(url=parsed, address=chosen, connect_url=parsed.copy_with(host=connect_host))


def _literal_address(text: str) -> list[IPAddress] | None:
    try:
        return [ipaddress.ip_address(text)]
    except ValueError:
        return None


def _content_type(header: str) -> tuple[str, str | None]:
    main, _, params = header.partition(";")
    charset = None
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.lower() == "charset" and value:
            charset = value.strip("\"'")
    return main.strip().lower(), charset


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """Built once: loading the CA bundle costs tens of milliseconds per client otherwise."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def make_transport() -> httpx.AsyncBaseTransport:
    """The transport fetches go through (tests wrap it to watch connections)."""
    import httpx

    return httpx.AsyncHTTPTransport(verify=_tls_context(), retries=0)


async def fetch(
    url: str,
    *,
    limits: FetchLimits | None = None,
    resolver: Resolver | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FetchedPage:
    """GET a public URL under the guard; every failure is a categorized ValorError."""
    import anyio
    import httpx

    limits = limits or FetchLimits.from_settings()
    loopback_ports = loopback_ports_allowed_for_tests()
    redirects: list[str] = []
    timeout = httpx.Timeout(limits.timeout_seconds)
    # trust_env=False: no proxy from the environment may do its own (unchecked) DNS lookup.
    async with httpx.AsyncClient(
        transport=transport or make_transport(),
        follow_redirects=False,
        trust_env=False,
        timeout=timeout,
    ) as client:
        current: str | httpx.URL = url
        try:
            with anyio.fail_after(limits.timeout_seconds):
                while True:
                    if resolver is None:
                        target = await anyio.to_thread.run_sync(
                            lambda u=current: vet_url(u, None, loopback_ports=loopback_ports)
                        )
                    else:
                        target = vet_url(current, resolver, loopback_ports=loopback_ports)
                    page_or_next = await _one_hop(client, target, limits)
                    if isinstance(page_or_next, FetchedPage):
                        page_or_next.redirects = redirects
                        return page_or_next
                    if len(redirects) >= limits.max_redirects:
                        raise ValorError(
                            Category.UPSTREAM,
                            f"The page redirected more than {limits.max_redirects} times.",
                        )
                    redirects.append(str(page_or_next))
                    current = page_or_next
        except TimeoutError:
            raise ValorError(
                Category.TIMEOUT,
                f"The page did not arrive within {limits.timeout_seconds:g} s; try again later "
                "or raise VALOR_LINK_FETCH_TIMEOUT_SECONDS.",
            ) from None
        except httpx.TimeoutException:
            raise ValorError(
                Category.TIMEOUT, f"The site did not answer within {limits.timeout_seconds:g} s."
            ) from None
        except httpx.HTTPError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise ValorError(
                    Category.UPSTREAM, "The site's TLS certificate could not be verified."
                ) from None
            raise ValorError(
                Category.UPSTREAM, f"The site could not be reached ({type(exc).__name__})."
            ) from None


async def _one_hop(
    client: httpx.AsyncClient, target: VettedTarget, limits: FetchLimits
) -> FetchedPage | httpx.URL:
    """One request to the vetted address: the page, or the next URL when redirected."""
    url = target.url
    host_header = url.host if url.port is None else f"{url.host}:{url.port}"
    if ":" in url.host:  # an IPv6 literal keeps its brackets in the Host header
        host_header = f"[{url.host}]" + ("" if url.port is None else f":{url.port}")
    headers = {
        "Host": host_header,
        "User-Agent": USER_AGENT,
        "Accept": ", ".join(limits.allowed_types) + ";q=0.9, */*;q=0.1",
        "Accept-Encoding": "gzip, deflate",
    }
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    request = client.build_request(
        "GET", target.connect_url, headers=headers, extensions=extensions
    )
    try:
        response = await client.send(request, stream=True)
    except UnicodeError:  # httpx parses a redirect's Location on arrival: a bad IDNA host
        raise ValorError(
            Category.UPSTREAM,
            "The site redirected to a host name that is not a valid internationalized domain name.",
        ) from None
    try:
        if response.is_redirect:
            location = response.headers.get("location", "")
            if not location:
                raise ValorError(Category.UPSTREAM, "The site redirected without a Location.")
            try:
                return url.join(location)
            except (httpx.InvalidURL, ValueError):  # UnicodeError (IDNA) is a ValueError
                raise ValorError(
                    Category.UPSTREAM, "The site redirected to a link that is not a valid URL."
                ) from None
        _check_status(response.status_code)
        media_type, charset = _content_type(response.headers.get("content-type", ""))
        if media_type not in limits.allowed_types:
            allowed = ", ".join(limits.allowed_types)
            raise ValorError(
                Category.INPUT,
                f"The link serves {media_type or 'no content type'}, not a page Valor can read "
                f"({allowed}).",
            )
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            raise _too_large(limits)
        # Decoded here, not by httpx: its decoder inflates a whole network chunk at once (a 64 KB
        # gzip chunk can hold 64 MB of zeros); this one stops one byte past the limit.
        decoder = BoundedDecoder(response.headers.get("content-encoding", ""), limits)
        body = bytearray()
        async for chunk in response.aiter_raw():
            for piece in decoder.decode(chunk, limits.max_bytes - len(body)):
                body += piece
        return FetchedPage(
            url=str(url),
            status=response.status_code,
            content_type=media_type,
            charset=charset,
            body=bytes(body),
        )
    finally:
        await response.aclose()


class BoundedDecoder:
    """A response body's Content-Encoding (identity, gzip or deflate) undone as it streams,
    producing at most one byte beyond the room the caller has left: a page that inflates past
    the limit is refused after inflating about the limit, not the whole bomb."""

    def __init__(self, content_encoding: str, limits: FetchLimits):
        import zlib

        self.limits = limits
        codings = [part.strip().lower() for part in content_encoding.split(",") if part.strip()]
        codings = [coding for coding in codings if coding != "identity"]
        if len(codings) > 1 or (codings and codings[0] not in ("gzip", "x-gzip", "deflate")):
            raise ValorError(
                Category.UPSTREAM,
                f"The site sent its page encoded as {', '.join(codings)!r}; Valor asks for "
                "gzip or deflate only.",
            )
        self.coding = codings[0] if codings else None
        self.gzip = self.coding in ("gzip", "x-gzip")
        self.started = False
        self.inflater = zlib.decompressobj(zlib.MAX_WBITS | 16 if self.gzip else zlib.MAX_WBITS)

    def decode(self, raw: bytes, room: int) -> Iterator[bytes]:
        """The decoded bytes of ``raw`` in pieces of at most ``INFLATE_STEP`` bytes;
        ``_too_large`` as soon as they pass ``room``. Reaching that bound means the page is
        refused, so input left unconsumed then never matters."""
        if self.coding is None:
            if len(raw) > room:
                raise _too_large(self.limits)
            yield raw
            return
        if not raw:
            return
        produced, data = 0, raw
        while True:
            wanted = min(room - produced + 1, INFLATE_STEP)
            piece = self._inflate(data, wanted)
            produced += len(piece)
            if produced > room:
                raise _too_large(self.limits)
            yield piece
            if len(piece) < wanted:  # everything this input holds has come out
                return
            data = self.inflater.unconsumed_tail  # may be empty: zlib can still hold output

    def _inflate(self, raw: bytes, most: int) -> bytes:
        import zlib

        if self.inflater.eof:  # after the end of the stream: trailing bytes are ignored
            return b""
        try:
            try:
                data = self.inflater.decompress(raw, most)
            except zlib.error:
                if self.gzip or self.started:
                    raise
                # "deflate" is sometimes sent raw, without the zlib header (httpx allows it too)
                self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                data = self.inflater.decompress(raw, most)
        except zlib.error:
            raise ValorError(
                Category.UPSTREAM, "The site sent a compressed page that could not be decoded."
            ) from None
        self.started = True
        return data


def _too_large(limits: FetchLimits) -> ValorError:
    return ValorError(
        Category.INPUT,
        f"The page is larger than {limits.max_bytes:,} bytes (VALOR_LINK_FETCH_MAX_BYTES); "
        "it was not saved.",
    )


def _check_status(status: int) -> None:
    if 200 <= status < 300:
        return
    if status == 429:
        raise ValorError(Category.RATE_LIMIT, "The site is rate limiting requests (HTTP 429).")
    if status in (401, 403):
        raise ValorError(
            Category.UPSTREAM, f"The site refused access (HTTP {status}); it may need a login."
        )
    if status in (404, 410):
        raise ValorError(Category.INPUT, f"The page does not exist (HTTP {status}).")
    raise ValorError(Category.UPSTREAM, f"The site answered HTTP {status}.")
