"""``python -m transfer.metadata``: run the HTTP metadata server on its own.

Mooncake deployments start ``mooncake_http_metadata_server``; this is the drop-in equivalent
(same default port and path). The shared secret comes from ``--secret-file`` or the
``MC_METADATA_HTTP_TOKEN`` environment variable, never from the command line, where ``ps``
would show it to every user of the host.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from transfer.metadata.auth import TOKEN_ENV
from transfer.metadata.base import DEFAULT_MAX_VALUE_SIZE
from transfer.metadata.http_server import DEFAULT_PATH, HttpMetadataServer

logger = logging.getLogger("transfer.metadata")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transfer.metadata",
        description="Mooncake-compatible HTTP metadata server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8080, help="port to bind (0: any free port)")
    parser.add_argument("--path", default=DEFAULT_PATH, help="URL path of the metadata API")
    parser.add_argument(
        "--secret-file", type=Path, default=None,
        help=f"file holding the bearer token clients must send (default: ${TOKEN_ENV}, if set)",
    )
    parser.add_argument(
        "--max-value-size", type=int, default=DEFAULT_MAX_VALUE_SIZE,
        help="largest accepted value in bytes (larger: HTTP 413)",
    )
    parser.add_argument(
        "--max-total-bytes", type=int, default=1 << 30, help="memory budget for keys and values"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    return parser


def read_secret(secret_file: Path | None) -> str | None:
    """The token from ``secret_file``, else from ``$MC_METADATA_HTTP_TOKEN``, else ``None``."""
    if secret_file is not None:
        return secret_file.read_text(encoding="ascii").strip()
    return os.environ.get(TOKEN_ENV) or None


async def serve(server: HttpMetadataServer) -> None:
    """Run ``server`` until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    # One machine-readable line on stdout: scripts (and tests) using --port 0 read the port here.
    print(f"metadata server listening on {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
        logger.info("metadata server stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        server = HttpMetadataServer(
            args.host, args.port, path=args.path, secret=read_secret(args.secret_file),
            max_value_size=args.max_value_size, max_total_bytes=args.max_total_bytes,
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(server))
    except OSError as e:  # e.g. the port is taken
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
