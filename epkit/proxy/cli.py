"""``epkit proxy``: the router of a disaggregated prefill/decode deployment (docs/proxy.md)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from epkit.proxy.config import POLICY_NAMES, ProxyConfig, ProxyError

EXIT_USAGE = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epkit proxy",
        description="OpenAI-compatible router over prefill and decode instances (vLLM's kv_transfer_params "
                    "protocol): each request is prefilled on one instance (max_tokens=1, the KV kept for a remote "
                    "decode), then decoded on another from the returned kv_transfer_params.")
    p.add_argument("--prefill", nargs="+", required=True, metavar="URL",
                   help="prefill instances' base URLs (http://HOST:PORT; a trailing /v1 is fine)")
    p.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode instances' base URLs")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: every interface, as vLLM)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000, as vLLM)")
    p.add_argument("--policy", default="round_robin", choices=POLICY_NAMES,
                   help="how each side's instance is picked (default: round_robin; least_outstanding: fewest "
                        "requests in flight, ties in round-robin order)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests; the "
                                                    "header is passed on to the instances")
    p.add_argument("--model", default=None, help="the served model name: filled into requests without one; "
                                                  "requests for another model get a 404")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="give up connecting to an instance after this long and try the next (default: 10)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="log level of the router and its HTTP server (default: info)")
    return p


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    return ProxyConfig(prefill=tuple(args.prefill), decode=tuple(args.decode), host=args.host, port=args.port,
                       policy=args.policy, api_key=args.api_key, model=args.model,
                       connect_timeout_s=args.connect_timeout)


def main(argv: list[str] | None = None) -> int:
    """Run the router until SIGINT / SIGTERM; 2 (with one line naming the flag) on bad arguments."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config_from_args(args)
    except ProxyError as exc:
        print(f"epkit proxy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    import uvicorn

    from epkit.proxy.app import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))  # no line per call

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """SIGTERM is the normal way a launcher stops the router: shut down gracefully and exit 0 rather
            than re-raise it (uvicorn's default); Ctrl-C still ends as an interrupt (130)."""
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    uv_config = uvicorn.Config(build_app(config), host=config.host, port=config.port, log_level=args.log_level,
                               access_log=False)
    Server(uv_config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
