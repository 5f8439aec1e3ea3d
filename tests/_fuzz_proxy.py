"""Fuzz target: the proxy's HTTP front door (``tests/test_fuzz_proxy.py``, ``benchmarks/fuzz_all.py``).

Why a live proxy: the request path reads, decodes, validates, tokenizes and forwards the body,
and each stage can fail differently (aiohttp's parser, msgspec, the prompt checks, the
tokenizer's chat template, the upstream client's header checks). So the target is the real
proxy process (``python -m scheduler``) on a real socket, in P/D mode over two real upstream
engines (:class:`~scheduler.testing.MiniEngine`), attacked with raw HTTP. The oracle: every
answer is a 4xx (a JSON error body when the request reached our handlers) or a normal answer,
within the bound; never a 5xx, a hang, a body the upstream cannot parse, a request left
counted in flight, or a proxy that stops serving.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web
from hypothesis import strategies as st

from _fuzz import CALL_BOUND_S, FuzzHang, FuzzViolation, Harness, deep_json, hostile_ints
from _fuzz import json_scalars, json_values

MAX_BODY = 256 << 10
"""The harness proxy's body limit: small, so the 413 path is reached by ordinary cases."""
MAX_TOKENS = 64
"""What the upstream accepts, like an engine refusing more tokens than its context."""
REPO = Path(__file__).resolve().parent.parent


@dataclass
class HttpCase:
    raw: bytes
    json_error: bool
    """A well-formed request to a completion endpoint: a 4xx answer must be our JSON error."""


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def _refuse(message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "BadRequestError",
                                        "code": 400}}, status=400)


HOLD_KEY = "fuzz_hold_7c1e"
"""A request carrying this key is held by the prefill engine until the harness releases it."""
DECODE_HOLD_KEY = "fuzz_hold_decode_7c1e"
"""The same, held by the decode engine (past the prefill engine's count)."""


class _StrictEngine:
    """A MiniEngine that refuses what a real engine refuses (400) instead of crashing, and
    counts bodies that are not JSON objects: the proxy must never forward one.

    ``hold_key``: requests with that key set to true wait until :meth:`release` (``holding``
    counts them), so the harness can keep requests in flight inside the proxy on purpose."""

    def __init__(self, hold_key: str | None = None) -> None:
        from scheduler.testing import MiniEngine

        self.engine = MiniEngine()
        self.broken_bodies: list[bytes] = []
        self.holding = 0
        self._held: collections.deque[asyncio.Future[None]] = collections.deque()
        self.loop = asyncio.get_running_loop()
        original = self.engine._complete

        async def complete(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                self.broken_bodies.append(raw[:300])
                return _refuse("bad json")
            if not isinstance(body, dict):
                self.broken_bodies.append(raw[:300])
                return _refuse("not an object")
            n = body.get("max_tokens") or body.get("max_completion_tokens") or 1
            params = body.get("kv_transfer_params")
            interval = body.get("mini_token_interval")
            if (type(n) is not int or not 0 < n <= MAX_TOKENS
                    or not isinstance(params, dict | None) or interval is not None):
                return _refuse("invalid request")
            if hold_key is not None and body.get(hold_key) is True:
                held = self.loop.create_future()
                self._held.append(held)
                self.holding += 1
                try:
                    await held
                finally:
                    self.holding -= 1
                    with contextlib.suppress(ValueError):
                        self._held.remove(held)
            try:
                return await original(request)
            finally:
                # MiniEngine records every request; a bulk run would keep 100k bodies.
                self.engine.requests.clear()
                self.engine.headers.clear()

        self.engine._complete = complete  # type: ignore[method-assign]

    def release(self, n: int | None = 1) -> None:
        """Let the ``n`` oldest held requests go on, all of them if ``None`` (thread-safe:
        called from the harness's threads; releasing more than are held releases those)."""
        def go() -> None:
            for _ in range(len(self._held) if n is None else min(n, len(self._held))):
                self._held.popleft().set_result(None)

        self.loop.call_soon_threadsafe(go)


MAX_IN_FLIGHT = 64
"""The proxy's in-flight limit: well above the lanes, and small enough for ``healthy`` to fill
it (which is how it proves, from outside the process, that no request stays counted)."""



class ProxyHarness(Harness):
    """The real proxy (``python -m scheduler``) in a process of its own, in P/D mode over two
    upstream engines on an event loop in a thread of this process.

    Why its own process: its crashes are its own, and its memory is the proxy's alone (not
    hypothesis's, the lanes' or the upstreams'), so ``rss`` says whether the decoder's is
    bounded.
    """

    # A request the proxy cannot complete costs a case the whole ``patience`` of
    # http_exchange (most of a serial run's time); lanes overlap those waits.
    lanes = 16

    def __init__(self, tokenizer: Path | None) -> None:
        self.tokenizer = tokenizer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-upstreams",
                                       daemon=True)
        self.engines: list[_StrictEngine] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile("wb", prefix="fuzz-proxy-", suffix=".log")
        self.port = 0

    def _run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        from transfer.testing import free_port, wait_for_port

        self.thread.start()

        async def up() -> None:
            self.engines = [_StrictEngine(HOLD_KEY), _StrictEngine(DECODE_HOLD_KEY)]
            for e in self.engines:
                await e.engine.start()

        self._run(up(), timeout=60)
        self.port = free_port()
        # A small body limit: the 413 path is then reached by ordinary cases, not 16 MiB ones.
        args = [sys.executable, "-m", "scheduler", "--max-body-bytes", str(MAX_BODY),
                "--port", str(self.port),
                "--prefill", self.engines[0].engine.url, "--decode", self.engines[1].engine.url,
                "--request-timeout", str(CALL_BOUND_S), "--health-interval", "0.5",
                "--max-in-flight", str(MAX_IN_FLIGHT), "--log-level", "ERROR"]
        if self.tokenizer is not None:
            ns = {"model": "tiny", "kv_dtype": "float16", "kv_layout": "nhd", "block_size": 16}
            args += ["--tokenizer", str(self.tokenizer), "--namespace", json.dumps(ns)]
        # aiohttp logs refused requests with a traceback: to a file, shown if the proxy dies.
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 60  # the tokenizer loads before the port is bound
        while True:
            try:
                wait_for_port("127.0.0.1", self.port, timeout=0.5)
                break
            except TimeoutError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"the proxy did not start: {self._tail()}") from None
        deadline = time.monotonic() + 20
        while self._send(_post("/v1/models", b"", method=b"GET")).body.count(b"mini") == 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"proxy never saw its upstreams healthy: {self._tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        from transfer.testing import stop_process

        if self.proc is not None:
            stop_process(self.proc, timeout=5)

        async def down() -> None:
            for e in self.engines:
                await e.engine.stop()
            # Connections aiohttp still drains end here, not as "Task was destroyed but it is
            # pending" when the loop closes.
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                self._run(down())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.loop.close()
        self.log.close()

    def _tail(self, n: int = 2000) -> str:
        with open(self.log.name, "rb") as f:
            f.seek(max(0, os.path.getsize(self.log.name) - n))
            return f.read().decode(errors="replace")

    def _send(self, raw: bytes) -> HttpAnswer:
        return http_exchange(self.port, raw)

    def rss(self) -> int:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).memory_info().rss

    def check(self, case: HttpCase) -> None:
        t0 = time.monotonic()
        answer = self._send(case.raw)
        if time.monotonic() - t0 > CALL_BOUND_S:
            raise FuzzHang(f"proxy took {time.monotonic() - t0:.1f}s for {case.raw[:200]!r}")
        if answer.status >= 500:
            raise FuzzViolation(f"HTTP {answer.status} {answer.body[:200]!r} for "
                                f"{case.raw[:300]!r}")
        if case.json_error and 400 <= answer.status < 500:
            try:
                err = json.loads(answer.body)["error"]
                assert isinstance(err["message"], str) and err["code"] == answer.status
            except Exception:
                raise FuzzViolation(f"HTTP {answer.status} without a JSON error body: "
                                    f"{answer.body[:200]!r} for {case.raw[:300]!r}") from None
        for e in self.engines:
            if e.broken_bodies:
                raise FuzzViolation(f"the proxy forwarded a broken body {e.broken_bodies[0]!r} "
                                    f"for {case.raw[:300]!r}")
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise FuzzViolation(f"the proxy exited with {self.proc.returncode}: {self._tail()}")

    def healthy(self) -> None:
        for path, body in (("/v1/completions", {"prompt": "hello there", "max_tokens": 3}),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
                           ("/v1/completions", {"prompt": "stream me", "max_tokens": 3,
                                                "stream": True})):
            answer = self._send(_post(path, json.dumps({"model": "mini", **body}).encode()))
            if answer.status != 200 or b"tok" not in answer.body:
                raise FuzzViolation(f"good request to {path} got {answer.status} "
                                    f"{answer.body[:200]!r}")
        self._none_counted_in_flight()

    def _none_counted_in_flight(self, patience: float = 10.0) -> None:
        """Raise unless the proxy counts exactly the requests it holds as in flight.

        Seen from outside through its overload check: with :data:`MAX_IN_FLIGHT` requests held
        inside it (the prefill engine sits on them, :data:`HOLD_KEY`) a good request is refused
        (503); with one of them released it is served. A request the proxy kept counting after
        its end (a leak that would end in refusing everything) leaves the good request refused.
        """
        good = _post("/v1/completions", b'{"model":"mini","prompt":"probe","max_tokens":1}')
        hold = _post("/v1/completions", json.dumps(
            {"model": "mini", "prompt": "hold", "max_tokens": 1, HOLD_KEY: True}).encode())
        prefill = self.engines[0]
        sockets: list[socket.socket] = []

        def wait(cond: Any, what: Callable[[], str]) -> None:
            deadline = time.monotonic() + patience
            while not cond():
                if time.monotonic() > deadline:
                    raise FuzzViolation(what())
                time.sleep(0.02)

        try:
            for _ in range(MAX_IN_FLIGHT):
                s = socket.create_connection(("127.0.0.1", self.port), timeout=CALL_BOUND_S)
                sockets.append(s)
                s.sendall(hold)
            wait(lambda: prefill.holding == MAX_IN_FLIGHT,
                 lambda: f"only {prefill.holding} of {MAX_IN_FLIGHT} held requests reached the "
                         f"engine (the rest were refused: more is counted in flight)")
            for want, wrong in ((503, "the held requests are not counted"),
                                (200, "it still counts requests that are over")):
                deadline = time.monotonic() + patience
                while (status := self._send(good).status) != want:
                    if time.monotonic() > deadline:
                        raise FuzzViolation(f"with {prefill.holding} requests held the proxy "
                                            f"answers {status}, not {want}: {wrong}")
                    time.sleep(0.05)
                if want == 503:
                    prefill.release(1)
                    wait(lambda: prefill.holding == MAX_IN_FLIGHT - 1,
                         lambda: "a released request did not leave the engine")
        finally:
            for s in sockets:
                s.close()
            # Let go of every held request, late arrivals included: none may stay behind
            # counted in flight for the next probe.
            quiet_since = time.monotonic()
            deadline = quiet_since + patience
            while time.monotonic() - quiet_since < 0.3 and time.monotonic() < deadline:
                if prefill.holding:
                    prefill.release(None)
                    quiet_since = time.monotonic()
                time.sleep(0.02)


def http_exchange(port: int, raw: bytes, patience: float = 0.3) -> HttpAnswer:
    """Send raw HTTP/1.1 (``Connection: close``) and read the whole answer.

    No answer within ``patience`` means the server waits for more body: our EOF is sent and it
    must then answer or close within :data:`CALL_BOUND_S`. An interim answer (``100 Continue``
    to an ``Expect``) is no answer: the final one after it is what the oracle judges. An answer
    to ``HEAD`` is whole with its headers: it never has a body, whatever its Content-Length.
    """
    deadline = time.monotonic() + CALL_BOUND_S
    data = b""
    head_request = raw.startswith(b"HEAD ")
    with socket.create_connection(("127.0.0.1", port), timeout=CALL_BOUND_S) as s:
        with contextlib.suppress(OSError):
            s.sendall(raw)
        s.settimeout(patience)
        while True:
            if time.monotonic() > deadline:
                raise FuzzHang(f"no complete answer within {CALL_BOUND_S}s to {raw[:200]!r}")
            try:
                chunk = s.recv(1 << 16)
            except TimeoutError:
                if not _final(data):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_WR)
                s.settimeout(max(0.01, deadline - time.monotonic()))
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            if _complete(_final(data), head_request):
                break  # a whole answer: what the server does with the rest is its business
    data = _final(data)
    if not data:
        return HttpAnswer(0, {}, b"")  # closed without an answer (after our EOF): allowed
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise FuzzViolation(f"not an HTTP reply: {data[:100]!r}")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
    if head_request:
        body = b""
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return HttpAnswer(int(parts[1]), headers, body)


def _final(data: bytes) -> bytes:
    """``data`` without the interim (1xx) answers it starts with ("" while only those came)."""
    while data[:10] in (b"HTTP/1.1 1", b"HTTP/1.0 1"):
        _, sep, data = data.partition(b"\r\n\r\n")
        if not sep:
            return b""
    return data


def _complete(data: bytes, head_request: bool = False) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    if head_request:
        return True
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length" and v.strip().isdigit():
            return len(body) >= int(v)
    return False


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        try:
            n = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2:]
    return out


def _post(path: str, body: bytes, *, method: bytes = b"POST",
          headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: 127.0.0.1",
             b"Connection: close"]
    hs = headers if headers is not None else [(b"Content-Type", b"application/json")]
    lines += [k + b": " + v for k, v in hs]
    if not any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in hs):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# -- cases -----------------------------------------------------------------------------------

_text = st.one_of(st.text(max_size=40), st.sampled_from(
    ["", "\x00", "\ud7ff\ue000", "💥" * 20, "\u202e" + "x", "a" * 5000, "<|eot_id|>",
     "{{ raise_exception('x') }}", "{% for %}"]))
_role = st.sampled_from(["user", "assistant", "system", "tool", "developer", "", "x"]) | \
    hostile_ints | st.none() | st.lists(st.text(max_size=3), max_size=2)
_content = st.one_of(
    _text, st.none(), hostile_ints,
    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]) | _text},
                                   optional={"text": _text | json_scalars,
                                             "image_url": json_values}), max_size=3),
    json_values)
_message = st.one_of(
    st.fixed_dictionaries({"role": _role}, optional={"content": _content, "name": _text,
                                                      "tool_calls": json_values}),
    json_values)
_prompt = st.one_of(
    _text, st.lists(st.integers(0, 50000), min_size=1, max_size=40), hostile_ints,
    st.lists(hostile_ints, max_size=5), st.lists(_text, max_size=3), st.none(), json_values,
    st.integers(1, 200_000).map(lambda n: "ab " * n))
_common = {
    "max_tokens": hostile_ints | json_scalars | st.integers(1, MAX_TOKENS),
    "max_completion_tokens": hostile_ints | json_scalars,
    "stream": st.booleans() | json_scalars,
    "stream_options": json_values, "temperature": json_scalars, "n": hostile_ints,
    "cache_salt": json_scalars, "kv_transfer_params": json_values, "user": _text,
}
_completion = st.fixed_dictionaries(
    {"model": st.just("mini")}, optional={"prompt": _prompt, **_common})
_chat = st.fixed_dictionaries(
    {"model": st.just("mini")},
    optional={"messages": st.lists(_message, max_size=4) | json_values, **_common})
_model = st.sampled_from(["mini", "", "other"]) | hostile_ints | st.none() | json_values


def _body(shape: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    def encode(v: dict[str, Any], model: Any, replace_model: bool) -> bytes:
        if replace_model:
            v = dict(v, model=model)
        return json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")

    valid_json = st.builds(encode, shape, _model, st.sampled_from([False, False, False, True]))
    return st.one_of(
        valid_json, valid_json, valid_json,
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=300),
        st.builds(deep_json, st.integers(100, 20000), st.sampled_from(["list", "dict"])),
        st.builds(lambda d, chat: (b'{"model":"mini","' + (b'messages":[{"role":"user",'
                                                           b'"content":' if chat else
                                                           b'prompt":') + b"[" * d + b"]" * d
                                   + (b"}]}" if chat else b"}")),
                  st.integers(50, 20000), st.booleans()),
        st.builds(lambda n: b'{"model":"mini","prompt":"' + b"x" * n + b'"}',
                  st.sampled_from([MAX_BODY - 40, MAX_BODY, MAX_BODY + 1, 2 * MAX_BODY])),
        valid_json.map(lambda b: b.replace(b'"', b"'", 1)),
        st.builds(lambda b, cut: b[:cut], valid_json, st.integers(0, 200)),
        st.just(b'{"model":"mini","prompt":"x","max_tokens":1e400}'),
        st.just(b'{"model":"mini","prompt":"x"} trailing'),
        st.just(b'\xef\xbb\xbf{"model":"mini","prompt":"x"}'),
        st.just(b'{"model":"mini","prompt":"\\ud800"}'),
        st.just(b'{"model":"mini","prompt":"x","prompt":[1,2]}'),
        st.just(b'{"model":"mini","prompt":NaN}'),
    )


_completion_body = _body(_completion)
_chat_body = _body(_chat)
_endpoint_header = st.tuples(
    st.sampled_from([b"Content-Type", b"X-Request-Id", b"Authorization", b"Accept",
                     b"Content-Encoding", b"Accept-Encoding", b"Expect", b"Cookie",
                     b"X-Forwarded-For", b"Connection", b"Upgrade", b"User-Agent", b"X-Junk"]),
    st.sampled_from([b"application/json", b"text/plain", b"", b"multipart/form-data; boundary=x",
                     b"gzip", b"br", b"deflate", b"identity", b"100-continue", b"close",
                     b"keep-alive", b"websocket", b"a" * 9000, b"\xff\xfe", "\u00e9".encode(),
                     "\u4e2d".encode(), b"x\x7fy", b"req-\x01", b"mc-1", b"../../etc"])
    | st.text(st.characters(codec="ascii", exclude_characters="\r\n"), max_size=30)
    .map(str.encode))
_framing_header = st.tuples(
    st.sampled_from([b"Content-Length", b"Transfer-Encoding"]),
    st.sampled_from([b"-1", b"0", b"99999999999999999999", b"abc", b"5, 6", b"chunked",
                     b"gzip, chunked", b"chunked, gzip", b"identity", b"1"]))


def _headers(n: int) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    # Unique names: aiohttp refuses a repeated single-value header itself (plain-text 400).
    return st.lists(_endpoint_header, max_size=n, unique_by=lambda h: h[0].lower())


def _endpoint_cases() -> st.SearchStrategy[HttpCase]:
    def build(chat: bool, body: bytes, headers: list[tuple[bytes, bytes]],
              framing: list[tuple[bytes, bytes]], cut: int | None) -> HttpCase:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        hs = [(b"Content-Type", b"application/json")] + headers + framing
        raw = _post(path, body, headers=hs)
        # What aiohttp's parser refuses itself (plain-text 400): odd bytes, a second
        # Content-Type, a header line over its 8190-byte limit.
        bad_headers = any(not v or len(v) > 8000 or any(c < 0x20 or c > 0x7e for c in v)
                          or k.lower() == b"content-type" for k, v in headers)
        tricky = {k.lower() for k, _ in headers} & {b"content-encoding", b"expect", b"upgrade",
                                                   b"connection"}
        clean = not framing and cut is None and not bad_headers and not tricky
        return HttpCase(raw if cut is None else raw[:cut], json_error=clean)

    chat = st.booleans()
    return st.one_of(
        st.builds(build, st.just(False), _completion_body, _headers(2),
                  st.just([]), st.none()),
        st.builds(build, st.just(True), _chat_body, _headers(2),
                  st.just([]), st.none()),
        st.builds(build, chat, _completion_body | _chat_body,
                  _headers(3), st.lists(_framing_header, max_size=2),
                  st.none() | st.integers(0, 400)))


_method = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH",
                           b"BREW", b"G\x00T", b"CONNECT"])
_path = st.sampled_from([b"/v1/completions", b"/v1/chat/completions", b"/v1/models", b"/health",
                         b"/metrics", b"/", b"/v1/", b"/v1/completions/", b"//v1/completions",
                         b"/v1/completions?x=%ff", b"/v1/%00", b"*", b"/" + b"a" * 9000,
                         b"http://evil/v1/completions"])


def _other_cases() -> st.SearchStrategy[HttpCase]:
    def build(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]],
              body: bytes) -> HttpCase:
        lines = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
        lines += [k + b": " + v for k, v in headers]
        if body and not any(k.lower() in (b"content-length", b"transfer-encoding")
                            for k, _ in headers):
            lines.append(b"Content-Length: " + str(len(body)).encode())
        return HttpCase(b"\r\n".join(lines) + b"\r\n\r\n" + body, json_error=False)

    return st.one_of(
        st.builds(build, _method, _path, st.lists(_endpoint_header | _framing_header,
                                                  max_size=3),
                  _completion_body | st.binary(max_size=100)),
        st.binary(max_size=400).map(lambda b: HttpCase(b, False)),
        st.sampled_from([b"GET / HTTP/9.9\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\n" * 3,
                         b"\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 200
                         + b"\r\n", b"GET /health HTTP/1.1\r\n" + b"X" * 70000 + b"\r\n\r\n"])
        .map(lambda b: HttpCase(b, False)))


proxy_cases = st.one_of(_endpoint_cases(), _endpoint_cases(), _endpoint_cases(), _other_cases())


@contextlib.contextmanager
def proxy_harness(tokenizer: Path | None = None) -> Iterator[ProxyHarness]:
    """A live proxy; with ``tokenizer`` it tokenizes (chat templates included) and hashes."""
    h = ProxyHarness(tokenizer)
    try:
        h.start()
        yield h
    finally:
        h.stop()
