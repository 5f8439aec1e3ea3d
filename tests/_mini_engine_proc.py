"""``python tests/_mini_engine_proc.py --host H --port P``: a :class:`scheduler.testing.MiniEngine`
as a process of its own, so a fault test can SIGSTOP, SIGKILL or cut it off the network.

It prints ``READY <port>`` once listening and ``REQ <x-request-id> <path>`` for every request it
receives (flushed at once): the test learns which instance served which request from this log.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web  # noqa: E402

from scheduler.testing import MiniEngine  # noqa: E402


class LoggingMiniEngine(MiniEngine):
    """A MiniEngine that prints each request's id before answering it."""

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        print(f"REQ {request.headers.get('X-Request-Id', '-')} {request.path}", flush=True)
        return await super()._complete(request)


async def _main(args: argparse.Namespace) -> None:
    engine = LoggingMiniEngine(model=args.model, host=args.host, port=args.port,
                               tokens=args.tokens)
    await engine.start()
    print(f"READY {engine.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await engine.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tokens", type=int, default=4)
    asyncio.run(_main(parser.parse_args()))
