"""What a request may ask of the server: sizes, counts, and which image URLs may be fetched.

:class:`ServeLimits` holds every limit with a safe default. :class:`URLPolicy` decides whether
an ``image_url`` may be fetched and :func:`fetch_image_url` fetches it:

- only ``http``/``https`` URLs, and only when the operator passed ``--allow-urls``
  (``file:`` URLs and plain paths are always refused: a request never reads a local file);
- with ``allowed_hosts`` given, only those host names (or IP literals) are reached;
- the host is resolved first, and loopback, private, link-local, multicast, reserved and
  unspecified addresses are refused unless the host is allow-listed by name;
- the connection goes to the address that was checked (the host name is kept for the HTTP
  ``Host`` header and TLS), so a second DNS answer cannot redirect it; redirects are followed
  by hand, each one checked the same way;
- at most ``max_url_bytes`` bytes are read, within ``url_timeout_s`` seconds.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import urllib.parse
from dataclasses import dataclass, field

import httpx

from ..errors import InputError, OfflineError

MAX_REDIRECTS = 3


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits of the server (each has a ``--max-...`` option on ``interleaf serve``)."""

    max_body_bytes: int = 20_000_000  # the JSON body, checked before it is parsed
    max_images: int = 8  # images in one request (all messages together)
    max_image_pixels: int = 16_000_000  # width * height of one image, read from its header
    max_prompt_tokens: int = 4096
    max_completion_tokens: int = 512  # the most (and the default) new tokens per choice
    max_n: int = 8  # choices per request
    max_stop: int = 4  # stop strings per request
    url_timeout_s: float = 10.0
    max_url_bytes: int = 10_000_000

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_images", "max_image_pixels", "max_prompt_tokens",
                     "max_completion_tokens", "max_n", "max_stop", "max_url_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"ServeLimits.{name} must be a positive integer, got {value!r}")
        if self.url_timeout_s <= 0:
            raise InputError(f"ServeLimits.url_timeout_s must be positive, got {self.url_timeout_s!r}")


@dataclass(frozen=True)
class URLPolicy:
    """Whether http(s) image URLs are fetched, and from which hosts."""

    allow_urls: bool = False
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_options(cls, allow_urls: bool, allowed_hosts: str | list[str] | None) -> "URLPolicy":
        if isinstance(allowed_hosts, str):
            allowed_hosts = allowed_hosts.split(",")
        hosts = frozenset(h.strip().lower().strip("[]") for h in (allowed_hosts or []) if h.strip())
        return cls(allow_urls=allow_urls, allowed_hosts=hosts)

    def check_url(self, url: str, where: str) -> tuple[urllib.parse.SplitResult, str]:
        """Refuse a URL this policy does not allow; return it parsed and the address to connect to."""
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise InputError(
                f"{where}: unsupported image URL scheme {scheme + ':' if scheme else '(none)'}; send the image "
                "inline as a 'data:image/<type>;base64,...' URL (local files and paths are never read)"
            )
        if not self.allow_urls:
            raise OfflineError(
                f"{where}: this server does not fetch image URLs; send the image inline as a "
                "'data:image/<type>;base64,...' URL (the operator can enable URLs with --allow-urls)"
            )
        host = (parts.hostname or "").lower()
        if not host:
            raise InputError(f"{where}: the image URL {url[:80]!r} has no host")
        listed = host in self.allowed_hosts
        if self.allowed_hosts and not listed:
            raise InputError(
                f"{where}: host {host!r} is not in the server's allowed hosts; ask the operator to add it "
                "with --allowed-hosts, or send the image inline as a data URL"
            )
        port = parts.port or (443 if scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise InputError(f"{where}: cannot resolve the image URL's host {host!r} ({e})") from e
        addresses = [info[4][0] for info in infos]
        if not addresses:
            raise InputError(f"{where}: the image URL's host {host!r} has no address")
        if not listed:
            for address in addresses:
                ip = ipaddress.ip_address(address.split("%")[0])
                if not ip.is_global or ip.is_multicast:
                    raise InputError(
                        f"{where}: host {host!r} resolves to the non-public address {address}; such addresses "
                        "are refused unless the operator allow-lists the host with --allowed-hosts"
                    )
        return parts, addresses[0]


def fetch_image_url(url: str, policy: URLPolicy, limits: ServeLimits, where: str) -> bytes:
    """The bytes at ``url``, if ``policy`` allows it, within the time and size limits."""
    deadline = time.monotonic() + limits.url_timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        parts, address = policy.check_url(url, where)
        host = parts.hostname or ""
        ip_host = f"[{address}]" if ":" in address else address
        port = f":{parts.port}" if parts.port else ""
        pinned = urllib.parse.urlunsplit((parts.scheme, f"{ip_host}{port}", parts.path or "/", parts.query, ""))
        headers = {"Host": f"{host}{port}", "Accept": "image/*"}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with httpx.Client(timeout=remaining, follow_redirects=False, trust_env=False) as client:
                request = client.build_request("GET", pinned, headers=headers, extensions={"sni_hostname": host})
                response = client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = urllib.parse.urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise InputError(f"{where}: fetching the image URL gave HTTP {response.status_code}")
                    data = bytearray()
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > limits.max_url_bytes:
                            raise InputError(
                                f"{where}: the image at the URL is larger than {limits.max_url_bytes:,} bytes"
                            )
                        if time.monotonic() > deadline:
                            raise InputError(f"{where}: fetching the image URL took longer than {limits.url_timeout_s}s")
                    return bytes(data)
                finally:
                    response.close()
        except httpx.HTTPError as e:
            raise InputError(f"{where}: could not fetch the image URL ({type(e).__name__}: {e})") from e
    raise InputError(f"{where}: the image URL redirected more than {MAX_REDIRECTS} times or timed out")
