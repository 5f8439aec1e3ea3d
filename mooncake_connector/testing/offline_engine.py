"""A long-lived offline ``vllm.LLM`` in its own process, driven request by request.

Why not :func:`run_offline`: connector tests need an engine that stays up while the test kills
the store, and results richer than token ids (``num_cached_tokens`` shows how much of a prompt
came from caches, ``kv_transfer_params`` carries the P/D protocol). Commands and results are
JSON lines over the child's stdin/stdout, each read bounded by a timeout.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mooncake_connector.testing.vllm_engines import DEFAULT_ENGINE_ARGS, cpu_engine_env
from transfer.testing import stop_process_group, tail_file

__all__ = ["OfflineEngine"]

_MAX_LINE = 64 << 20


@dataclass
class OfflineEngine:
    """``with OfflineEngine(model, engine_args) as e: e.generate([...])`` -> list of result dicts.

    Each result: ``token_ids``, ``num_cached_tokens``, ``kv_transfer_params``, ``ttft_s`` (the
    wall time of the ``generate`` call, which with one output token is the time to first token),
    ``tokens_by_source`` (the change of vLLM's ``vllm:prompt_tokens_by_source`` counters over the
    whole call - ``local_compute``, ``local_cache_hit``, ``external_kv_transfer`` - when the
    engine runs with ``disable_log_stats=False``; see ``_offline_engine_worker``).
    """

    model: str | os.PathLike
    engine_args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _log: Any = field(default=None, init=False, repr=False)
    _buf: bytes = field(default=b"", init=False, repr=False)

    def start(self, timeout: float = 240.0) -> "OfflineEngine":
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-offline-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log = open(self.log_path, "wb")
        spec = {"model": str(self.model), "engine_args": {**DEFAULT_ENGINE_ARGS, **self.engine_args}}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mooncake_connector.testing._offline_engine_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            env=cpu_engine_env(**self.env), start_new_session=True)
        self._send(spec)
        self._read(timeout)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _send(self, obj: Any) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self._proc.stdin.flush()

    def _read(self, timeout: float) -> Any:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.startswith(b"RESULT "):
                    return json.loads(line[7:])
                if line.startswith(b"ERROR "):
                    raise RuntimeError(f"engine error: {line[6:].decode(errors='replace')}")
                if self._log is not None:  # vLLM logs to stdout: keep it with the stderr log
                    self._log.write(line + b"\n")
                    self._log.flush()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"offline engine gave no answer in {timeout:.0f}s:\n{self.log_tail()}")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"offline engine exited ({self._proc.poll()}):\n{self.log_tail()}")
                self._buf += chunk
                if len(self._buf) > _MAX_LINE:
                    raise RuntimeError("offline engine output line over 64 MiB")

    def generate(self, prompts: Sequence[str | list[int]], *, max_tokens: int = 8,
                 kv_transfer_params: Sequence[dict[str, Any] | None] | None = None,
                 timeout: float = 120.0) -> list[dict[str, Any]]:
        self._send({"prompts": list(prompts), "max_tokens": max_tokens,
                    "kv_transfer_params": list(kv_transfer_params) if kv_transfer_params else None})
        return self._read(timeout)

    def counters(self, prefix: str = "vllm:pymooncake_", timeout: float = 30.0) -> dict[str, float]:
        """The engine's counters named ``prefix...`` now (vLLM updates them as the engine core
        reports stats, so a transfer that just finished may show a step later)."""
        self._send({"metrics": prefix})
        return self._read(timeout)

    def log_tail(self, n: int = 40) -> str:
        return tail_file(self.log_path, n)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process_group(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "OfflineEngine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
