"""``epkit proxy``: the router of a disaggregated prefill/decode deployment (docs/proxy.md).

An OpenAI-compatible front (``/v1/completions``, ``/v1/chat/completions``, streamed or not, ``/v1/models``,
``/health``, ``/metrics``) that runs the seed's client orchestration for every request: a 1-token prefill with
``kv_transfer_params: {do_remote_decode: true, …}`` on one prefill instance, then the original request plus the
returned ``kv_transfer_params`` on one decode instance, under one ``X-Request-Id``.
"""

from epkit.proxy.app import build_app
from epkit.proxy.cli import main
from epkit.proxy.config import POLICY_NAMES, ProxyConfig, ProxyError
from epkit.proxy.pool import POLICIES

__all__ = ["POLICIES", "POLICY_NAMES", "ProxyConfig", "ProxyError", "build_app", "main"]
