"""Start real vLLM engines: OpenAI HTTP servers and offline ``LLM`` runs, each in its own process.

Why subprocesses: a vLLM engine owns process-wide state (its engine core, its KV cache, its
connector), takes ~2 GB and ~20-30 s to start on CPU, and must be killable to test failures. Tests
share one server per session through fixtures; offline runs are for one-shot checks.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from transfer.testing import free_port, stop_process_group, tail_file, wait_for_http

__all__ = ["VllmServer", "cpu_engine_env", "run_offline", "DEFAULT_ENGINE_ARGS",
           "external_kv_tokens"]

# Flags every CPU test engine shares: block_size a multiple of 32 (CPU attention), eager mode
# (no graph capture to wait for), a short context so the 1 GiB KV space holds many blocks.
DEFAULT_ENGINE_ARGS: dict[str, Any] = {
    "block_size": 64,
    "max_model_len": 4096,
    "enforce_eager": True,
    "seed": 0,
}


def cpu_engine_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """Environment for a CPU vLLM engine: small KV space, quiet logs, no hub downloads."""
    env = dict(os.environ if base is None else base)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    # With a KV connector vLLM reserves one more core than these hosts have and then reserves
    # none: the worker's OpenMP threads take every core (see mooncake_connector.vllm.compat).
    # 1 is what vLLM reserves without a connector, so engines with and without one compare.
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    env.update(extra)
    if env.get("VLLM_CPU_NUM_OF_RESERVED_CPU") == "auto":  # vLLM's own choice, for comparisons
        del env["VLLM_CPU_NUM_OF_RESERVED_CPU"]
    return env


_EXTERNAL_KV = re.compile(r'^vllm:prompt_tokens_by_source_total\{[^}]*source="external_kv_transfer"'
                          r'[^}]*\} ([0-9.e+]+)$', re.M)


def external_kv_tokens(metrics_text: str) -> float:
    """Prompt tokens an engine loaded through its KV connector, from its Prometheus text.

    vLLM's own counter ``vllm:prompt_tokens_by_source{source="external_kv_transfer"}`` is the
    honest proof that a connector loaded KV (``num_cached_tokens`` does not say it under P/D).
    Raises LookupError when the engine does not export it (no connector configured).
    """
    m = _EXTERNAL_KV.search(metrics_text)
    if m is None:
        raise LookupError("vllm:prompt_tokens_by_source_total{source=external_kv_transfer} "
                          "not exported")
    return float(m.group(1))


def _cli_flags(args: dict[str, Any]) -> list[str]:
    """Turn ``{"block_size": 64, "enforce_eager": True}`` into ``vllm serve`` style flags."""
    flags: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (dict, list)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


@dataclass
class VllmServer:
    """A real OpenAI-compatible vLLM server (``python -m vllm.entrypoints.openai.api_server``).

    vllm-cpu's ``vllm`` console script cannot start (it looks up a distribution named ``vllm``),
    so we run the module with the same flags ``vllm serve`` takes. Output goes to ``log_path``
    so a failed start can show why.
    """

    model: str | os.PathLike
    engine_args: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _log: Any = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        args = {**DEFAULT_ENGINE_ARGS, **self.engine_args}
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model), "--host", self.host, "--port", str(self.port),
                *_cli_flags(args)]

    def start(self, timeout: float = 240.0) -> "VllmServer":
        self.port = self.port or free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log = open(self.log_path, "wb")
        self._proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT,
            env=cpu_engine_env(**self.env), start_new_session=True,
        )
        if wait_for_http(f"{self.url}/health", timeout, proc=self._proc, interval=0.5):
            return self
        exited = self._proc.poll() is not None
        self.stop()
        if exited:
            raise RuntimeError(
                f"vLLM server exited with {self._proc.returncode}; last log lines:\n{self.log_tail()}"
            )
        raise TimeoutError(f"vLLM server not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        return tail_file(self.log_path, n)

    def external_kv_tokens(self) -> float:
        """See :func:`external_kv_tokens`; read from this server's ``/metrics``."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            return external_kv_tokens(r.read().decode())

    def stop(self) -> None:
        if self._proc is not None:
            stop_process_group(self._proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_offline(model: str | os.PathLike, prompts: Sequence[str | list[int]], *,
                max_tokens: int = 16, engine_args: dict[str, Any] | None = None,
                env: dict[str, str] | None = None, repeats: int = 1,
                timeout: float = 300.0) -> list[list[list[int]]]:
    """Run an offline ``vllm.LLM`` in a fresh process and return greedy output token ids.

    The result is indexed ``[repeat][prompt] -> token ids``; prompts may be text or token ids.
    ``engine_args`` go to ``LLM(...)`` (e.g. ``kv_transfer_config`` as a dict).
    """
    spec = {
        "model": str(model),
        "prompts": list(prompts),
        "max_tokens": max_tokens,
        "engine_args": {**DEFAULT_ENGINE_ARGS, **(engine_args or {})},
        "repeats": repeats,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mooncake_connector.testing._offline_worker"],
        input=json.dumps(spec).encode(), capture_output=True, timeout=timeout,
        env=cpu_engine_env(**(env or {})),
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"offline vLLM run failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')[-4000:]}"
        )
    for line in reversed(proc.stdout.decode().splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"offline vLLM run printed no result:\n{proc.stdout.decode()[-2000:]}")
