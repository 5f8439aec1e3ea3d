"""Subprocess body of :func:`run_offline`: read a JSON spec on stdin, print ``RESULT <json>``.

Kept as its own module because vLLM's engine spawns workers that re-import ``__main__``; the
``if __name__ == "__main__"`` guard below is what keeps that from recursing.
"""
from __future__ import annotations

import json
import sys


def main() -> None:
    spec = json.load(sys.stdin)
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["engine_args"])
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in spec["prompts"]]
    results = []
    for _ in range(spec["repeats"]):
        outs = llm.generate(prompts, params, use_tqdm=False)
        results.append([list(o.outputs[0].token_ids) for o in outs])
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
