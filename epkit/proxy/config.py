"""``ProxyConfig``: what ``epkit proxy`` routes to and how, checked when it is made."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from epkit.errors import EpkitError

POLICY_NAMES = ("round_robin", "least_outstanding")  # the words of --policy; pool.POLICIES implements them
FLAGS = {"prefill": "--prefill", "decode": "--decode", "host": "--host", "port": "--port", "policy": "--policy",
         "api_key": "--api-key", "model": "--model", "connect_timeout_s": "connect_timeout_s"}


class ProxyError(EpkitError, ValueError):
    """A router setting is invalid; raised before anything listens."""


def _bad(field: str, value, allowed: str) -> ProxyError:
    flag = FLAGS[field]
    name = field if flag == field else f"{field} ({flag})"
    return ProxyError(f"{name}={value!r}: {allowed}")


def normalize_url(field: str, url: str) -> str:
    """``http(s)://host[:port]`` without a trailing slash; a trailing ``/v1`` (an OpenAI client's base URL) is
    dropped, since the router appends the API paths itself. Anything else is refused, naming the flag."""
    if not isinstance(url, str) or not url:
        raise _bad(field, url, "an instance URL is http://HOST:PORT (or https://…)")
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/")
    if path == "/v1":
        path = ""
    if parts.scheme not in ("http", "https") or not parts.hostname or path or parts.query or parts.fragment:
        raise _bad(field, url, "an instance URL is http://HOST:PORT or https://HOST:PORT, optionally ending in /v1")
    try:
        parts.port  # noqa: B018 -- raises on a port outside 0..65535 or not a number
    except ValueError:
        raise _bad(field, url, "the port must be a number in 1..65535") from None
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class ProxyConfig:
    """The router of a disaggregated deployment (``epkit proxy``).

    ``prefill`` / ``decode``: the instances' base URLs (``http://host:port``; at least one each, no repeats
    within a side; a URL may be on both sides). ``policy``: ``round_robin`` or ``least_outstanding`` (fewest
    requests in flight on that instance through this router; ties in round-robin order), applied to each side
    on its own. ``api_key``: clients must send ``Authorization: Bearer KEY`` on ``/v1`` paths (401 otherwise,
    as vLLM); the header is passed on to the instances. ``model``: the served model name; a request without
    ``model`` gets it, a request naming another model gets a 404 without reaching an instance.
    ``connect_timeout_s``: how long to wait for an instance to accept a connection before trying another."""

    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    host: str = "0.0.0.0"
    port: int = 8000
    policy: str = "round_robin"
    api_key: str | None = None
    model: str | None = None
    connect_timeout_s: float = 10.0

    def __post_init__(self):
        for field in ("prefill", "decode"):
            urls = getattr(self, field)
            if isinstance(urls, str):
                urls = (urls,)
            if not urls:
                raise _bad(field, list(urls), f"at least one {field} instance URL is needed")
            normal = tuple(normalize_url(field, u) for u in urls)
            repeated = sorted({u for u in normal if normal.count(u) > 1})
            if repeated:
                raise _bad(field, list(urls), f"{', '.join(repeated)} is given more than once; name each instance once")
            object.__setattr__(self, field, normal)
        if self.policy not in POLICY_NAMES:
            raise _bad("policy", self.policy, f"not a routing policy; allowed: {', '.join(POLICY_NAMES)}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise _bad("port", self.port, "a TCP port in 1..65535")
        if not isinstance(self.host, str) or not self.host:
            raise _bad("host", self.host, "an address to listen on (0.0.0.0: every interface)")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise _bad("api_key", self.api_key, "a non-empty string (or leave it out for no key)")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise _bad("model", self.model, "a non-empty model name (or leave it out)")
        if not isinstance(self.connect_timeout_s, (int, float)) or not self.connect_timeout_s > 0:
            raise _bad("connect_timeout_s", self.connect_timeout_s, "a positive number of seconds")

    @property
    def url(self) -> str:
        """The router's own base URL as a client on this machine reaches it."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"
