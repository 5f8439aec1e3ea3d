"""The client host of the serving fault tests: sends OpenAI requests, reports JSON lines.

Why a process: in a network-namespace lab the test process cannot reach the hosts' addresses,
so everything that talks HTTP to the stack runs inside the lab's client host. The same script
serves the loopback variant, so both measure alike.

``wait SPEC``: poll ``GET`` each of ``spec["urls"]`` until 200 (bounded); exit 0 or 1.
``run SPEC``: send requests and print one JSON line per event, times as ``time.time()``:

- ``{"ev": "start", "id", "t"}``, ``{"ev": "first", "id", "t", "first_id"}`` (first SSE chunk;
  ``first_id`` is the chunk's ``id``, which tells the engine apart),
- ``{"ev": "end", "id", "t0", "t", "status", "chunks", "done", "error", "hung"}``: ``done`` when
  the stream ended with ``[DONE]`` or a JSON answer came, ``error`` the error message an engine
  or the proxy sent (a status or an SSE error event), ``hung`` when the client's own bound
  (``spec["timeout"]``) fired first: the proxy let the request hang,
- ``{"ev": "health", "t", "instances"}`` whenever the proxy's ``/health`` changes (with
  ``spec["watch"]``), then ``{"ev": "finished"}``.

Requests: ``spec["mode"]`` is ``rate`` (``rate`` per second for ``duration`` s) or ``batch``
(``count`` at once); each sends ``spec["body"]`` to ``spec["proxy"] + spec["path"]`` with
``X-Request-Id: <id_prefix>-<n>``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import aiohttp


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _one(session: aiohttp.ClientSession, spec: dict[str, Any], rid: str) -> None:
    t0 = time.time()
    _emit(ev="start", id=rid, t=t0)
    end: dict[str, Any] = {"status": None, "chunks": 0, "done": False, "error": None,
                           "hung": False}
    try:
        async with asyncio.timeout(spec["timeout"]):
            async with session.post(spec["proxy"] + spec["path"], json=spec["body"],
                                    headers={"X-Request-Id": rid}) as r:
                end["status"] = r.status
                if r.status != 200 or not r.headers.get("Content-Type", "").startswith(
                        "text/event-stream"):
                    payload = await r.read()
                    try:
                        answer = json.loads(payload)
                    except ValueError:
                        answer = {"error": {"message": payload[:200].decode(errors="replace")}}
                    if r.status == 200 and isinstance(answer, dict) and "error" not in answer:
                        end["done"] = True
                    else:
                        end["error"] = str(answer.get("error", answer))[:300]
                else:
                    async for raw in r.content:
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            end["done"] = end["error"] is None
                            break
                        event = json.loads(data)
                        if "error" in event:
                            end["error"] = str(event["error"].get("message"))[:300]
                            continue
                        if end["chunks"] == 0:
                            _emit(ev="first", id=rid, t=time.time(), first_id=event.get("id"))
                        end["chunks"] += 1
                    else:
                        end["error"] = end["error"] or "stream closed without [DONE]"
    except TimeoutError:
        end["hung"] = True
    except (aiohttp.ClientError, ValueError) as exc:
        end["error"] = f"{type(exc).__name__}: {exc}"[:300]
    _emit(ev="end", id=rid, t0=t0, t=time.time(), **end)


async def _watch(session: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> None:
    last: Any = None
    while not stop.is_set():
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                state = (await r.json()).get("instances")
        except (aiohttp.ClientError, TimeoutError, ValueError):
            state = None
        if state != last and state is not None:
            _emit(ev="health", t=time.time(), instances=state)
            last = state
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def _run(spec: dict[str, Any]) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop = asyncio.Event()
        watcher = (asyncio.create_task(_watch(session, spec["proxy"] + "/health", stop))
                   if spec.get("watch") else None)
        tasks = []
        prefix = spec.get("id_prefix", "r")
        if spec["mode"] == "batch":
            tasks = [asyncio.create_task(_one(session, spec, f"{prefix}-{n}"))
                     for n in range(spec["count"])]
        else:
            interval = 1.0 / spec["rate"]
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < spec["duration"]:
                tasks.append(asyncio.create_task(_one(session, spec, f"{prefix}-{n}")))
                n += 1
                await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
        await asyncio.gather(*tasks)
        stop.set()
        if watcher is not None:
            await watcher
    _emit(ev="finished", t=time.time())


async def _wait(spec: dict[str, Any]) -> int:
    deadline = time.monotonic() + spec.get("timeout", 60)
    pending = list(spec["urls"])
    async with aiohttp.ClientSession() as session:
        while pending and time.monotonic() < deadline:
            url = pending[0]
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        pending.pop(0)
                        continue
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    if pending:
        print(f"not ready: {pending}", flush=True)
    return 1 if pending else 0


def main(argv: list[str]) -> int:
    command, spec = argv[0], json.loads(argv[1])
    if command == "wait":
        return asyncio.run(_wait(spec))
    asyncio.run(_run(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
