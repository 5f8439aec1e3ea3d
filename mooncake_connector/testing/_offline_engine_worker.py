"""Subprocess body of :class:`OfflineEngine`: one ``LLM``, JSON commands in, ``RESULT`` lines out.

Each result carries ``tokens_by_source``: the change of vLLM's own ``vllm:prompt_tokens_by_source``
counters over the call (``local_compute``, ``local_cache_hit``, ``external_kv_transfer``). Why:
``RequestOutput.num_cached_tokens`` of a P/D decode request is, by vLLM's design, the *prefill*
side's cache hits (``remote_prefill_cached_tokens`` in its ``kv_transfer_params``), so it cannot
show what the decode engine loaded; these counters can. They need ``disable_log_stats=False``.
A ``kv_transfer_config`` dict becomes a real ``KVTransferConfig`` object, the offline form users
write.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any


def _counters(llm: Any, prefix: str) -> dict[str, float]:
    """Current values of the engine's metrics named ``prefix...`` (summed over labels)."""
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name.startswith(prefix) and hasattr(m, "value"):
            out[m.name] = out.get(m.name, 0) + float(m.value)
    return out


def _tokens_by_source(llm: Any) -> dict[str, float]:
    try:
        metrics = llm.get_metrics()
    except Exception:  # noqa: BLE001 - stats disabled: report nothing rather than fail
        return {}
    out: dict[str, float] = {}
    for m in metrics:
        if m.name == "vllm:prompt_tokens_by_source":
            src = m.labels.get("source", "")
            out[src] = out.get(src, 0) + float(m.value)
    return out


def _decode_step_s(out: Any) -> float | None:
    """Seconds per decode step of one request, from the engine core's own token timestamps.

    Why: (last token - first token) / (tokens - 1) is pure decoding - no prefill, lookup, save
    or front-end time - so a connector's per-step cost shows without the noise of subtracting
    two whole ``generate`` calls. ``None`` when vLLM gives no timings (stats disabled).
    """
    m = getattr(out, "metrics", None)
    n = getattr(m, "num_generation_tokens", 0) if m is not None else 0
    if n < 2 or not m.first_token_ts or not m.last_token_ts:
        return None
    return (m.last_token_ts - m.first_token_ts) / (n - 1)


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    from vllm import LLM, SamplingParams

    args = dict(spec["engine_args"])
    if isinstance(args.get("kv_transfer_config"), dict):
        # The documented offline form: LLM(..., kv_transfer_config=KVTransferConfig(...)).
        from vllm.config import KVTransferConfig

        args["kv_transfer_config"] = KVTransferConfig(**args["kv_transfer_config"])
    llm = LLM(model=spec["model"], **args)
    print("RESULT " + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if "metrics" in cmd:
            print("RESULT " + json.dumps(_counters(llm, str(cmd["metrics"]))), flush=True)
            continue
        kvp = cmd.get("kv_transfer_params") or [None] * len(cmd["prompts"])
        params = [SamplingParams(temperature=0.0, max_tokens=cmd["max_tokens"], ignore_eos=True,
                                 extra_args={"kv_transfer_params": p} if p else None) for p in kvp]
        prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in cmd["prompts"]]
        before = _tokens_by_source(llm)
        start = time.perf_counter()
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - reported to the test, engine stays inspectable
            print("ERROR " + repr(exc).replace("\n", " "), flush=True)
            continue
        elapsed = time.perf_counter() - start
        after = _tokens_by_source(llm)
        delta = {k: int(after[k] - before.get(k, 0)) for k in after}
        print("RESULT " + json.dumps([{
            "token_ids": list(o.outputs[0].token_ids),
            "num_cached_tokens": o.num_cached_tokens,
            "kv_transfer_params": o.kv_transfer_params,
            "ttft_s": elapsed,
            "tokens_by_source": delta,
            "decode_step_s": _decode_step_s(o),
        } for o in outs]), flush=True)


if __name__ == "__main__":
    main()
