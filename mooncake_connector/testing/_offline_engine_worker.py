"""Subprocess body of :class:`OfflineEngine`: one ``LLM``, JSON commands in, ``RESULT`` lines out."""
from __future__ import annotations

import json
import sys
import time


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["engine_args"])
    print("RESULT " + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        kvp = cmd.get("kv_transfer_params") or [None] * len(cmd["prompts"])
        params = [SamplingParams(temperature=0.0, max_tokens=cmd["max_tokens"], ignore_eos=True,
                                 extra_args={"kv_transfer_params": p} if p else None) for p in kvp]
        prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in cmd["prompts"]]
        start = time.perf_counter()
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - reported to the test, engine stays inspectable
            print("ERROR " + repr(exc).replace("\n", " "), flush=True)
            continue
        elapsed = time.perf_counter() - start
        print("RESULT " + json.dumps([{
            "token_ids": list(o.outputs[0].token_ids),
            "num_cached_tokens": o.num_cached_tokens,
            "kv_transfer_params": o.kv_transfer_params,
            "ttft_s": elapsed,
        } for o in outs]), flush=True)


if __name__ == "__main__":
    main()
