"""Live interactive generation in the browser: a web server around one streaming session.

    python serve.py --config_path configs/tiny_interactive.yaml          # CPU, random tiny models
    python serve.py --config_path configs/interactive_inference.yaml     # Wan2.1 + MemFlow, GPU
    python serve.py --config_path ... --host 0.0.0.0 --token "$TOKEN"    # reachable from others

The config and its `key=value` overrides are the ones inference.py takes (same schema, same
checks); the models are loaded once, then the URL is printed. Open it, type a prompt, press
start; a new prompt takes effect at the next chunk boundary. One client generates at a time;
others wait in a queue. Protocol, limits and security: docs/live.md.

Binds 127.0.0.1 by default. Another `--host` needs an access token (`--token`, or the
MEMFLOW_LIVE_TOKEN environment variable, which keeps it out of the process list), unless
`--allow-no-token`. `--port 0` picks a free port.

Exit status: 2 bad input (config, token, port), as one `error:` line before serving; 130 after
Ctrl-C and 143 after SIGTERM, once uvicorn has shut down (clients get close code 1012, the
generation thread finishes its chunk, saved files are removed; connections still open after
`shutdown_timeout_s`, 10 s, are cancelled, so a stuck client never holds the server up); 1 an
unexpected error.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from memflow.errors import InputError


def port_number(text: str) -> int:
    """argparse type of --port: 0..65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0: any free port); got {port}")
    return port


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True, help="YAML inference config (see configs/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8000,
                        help="port (default 8000; 0: any free one)")
    parser.add_argument("--token", default=os.environ.get("MEMFLOW_LIVE_TOKEN") or None,
                        help="access token clients must give (default: $MEMFLOW_LIVE_TOKEN)")
    parser.add_argument("--allow-no-token", action="store_true",
                        help="expose a non-loopback --host without a token")
    parser.add_argument("--max-prompt-chars", type=int, default=1000)
    parser.add_argument("--messages-per-second", type=float, default=20.0)
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    return parser.parse_args(argv)


def server_settings(args):
    from pipeline.live import ServerSettings
    from pipeline.live.settings import is_loopback, loopback_host_names

    # A loopback server accepts only loopback Host headers (IPv4 and IPv6 alike): a page of
    # another site whose name is made to resolve to 127.0.0.1 (DNS rebinding) cannot reach it.
    hosts = loopback_host_names(args.host) if is_loopback(args.host) else None
    settings = ServerSettings(host=args.host, port=args.port, token=args.token,
                              allow_no_token=args.allow_no_token, allowed_hosts=hosts,
                              max_prompt_chars=args.max_prompt_chars,
                              messages_per_second=args.messages_per_second)
    settings.check()
    return settings


def url_of(settings, port: int) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    query = f"?token={settings.token}" if settings.token else ""
    return f"http://{host}:{port}/{query}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = server_settings(args)
        from pipeline.live import listening_socket
        from pipeline.session import Session

        print(f"loading {args.config_path} ...", file=sys.stderr, flush=True)
        session = Session.from_config(args.config_path, args.overrides)
        sock = listening_socket(settings.host, settings.port)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    from pipeline.live import create_app

    app = create_app(lambda: session, settings)
    port = sock.getsockname()[1]
    print(f"MemFlow live: open {url_of(settings, port)}", flush=True)
    if settings.host in ("0.0.0.0", "::"):
        print("(listening on every interface: use this machine's address in place of "
              f"{settings.host})", flush=True)
    # a shutdown waits at most shutdown_timeout_s for open connections, then cancels them
    config = uvicorn.Config(app, log_level="warning", ws_max_size=settings.max_message_bytes,
                            lifespan="on", timeout_graceful_shutdown=settings.shutdown_timeout_s)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
