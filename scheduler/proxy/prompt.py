"""From an OpenAI request body to the block keys its prompt's KV is stored under.

The Conductor routes by prefix blocks, and the only blocks that matter are the ones the
connector really stores: so the proxy tokenizes exactly as the engine will (the model's own
tokenizer, its chat template for chat requests) and hashes with :mod:`store.keys`. Without a
tokenizer the proxy still routes, by an estimated length and with no cache awareness.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from store.keys import KeyNamespace, RequestExtras, block_keys

__all__ = ["PromptInfo", "PromptHasher", "BadRequest"]

CHARS_PER_TOKEN = 4  # rough estimate when no tokenizer is configured


class BadRequest(ValueError):
    """The client's body is not a valid request; answered with HTTP 400."""


@dataclass(frozen=True)
class PromptInfo:
    token_count: int
    block_keys: tuple[str, ...]


def _prompt_of(body: dict[str, Any], chat: bool) -> Any:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise BadRequest("each message needs a 'role'")
        return messages
    if "prompt" not in body:
        raise BadRequest("'prompt' is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(isinstance(t, int) for t in prompt)):
        return prompt
    raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)")


class PromptHasher:
    """Tokenize and hash prompts. ``tokenizer`` is a local path or name (loaded lazily)."""

    def __init__(self, namespace: KeyNamespace | None, tokenizer: str | None = None) -> None:
        self.namespace = namespace
        self._tokenizer_path = tokenizer
        self._tokenizer: Any = None

    @property
    def block_tokens(self) -> int:
        return self.namespace.block_size if self.namespace else 512

    def _tok(self) -> Any:
        if self._tokenizer is None and self._tokenizer_path:
            from transformers import AutoTokenizer  # noqa: PLC0415 - heavy, only when configured

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
        return self._tokenizer

    def token_ids(self, body: dict[str, Any], chat: bool) -> list[int] | None:
        prompt = _prompt_of(body, chat)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return list(prompt)
        tok = self._tok()
        if tok is None:
            return None
        if chat:
            # As vLLM does: render the template to text, then tokenize without extra specials.
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return list(tok.encode(text, add_special_tokens=False))
        return list(tok.encode(prompt))

    def analyze(self, body: dict[str, Any], chat: bool) -> PromptInfo:
        """Token count and block keys (empty without tokenizer or namespace)."""
        ids = self.token_ids(body, chat)
        if ids is None:
            text = json.dumps(_prompt_of(body, chat)) if chat else str(_prompt_of(body, chat))
            return PromptInfo(max(1, len(text) // CHARS_PER_TOKEN), ())
        extras = RequestExtras(cache_salt=body.get("cache_salt") or None,
                               lora_name=None)
        keys = tuple(block_keys(self.namespace, ids, extras)) if self.namespace else ()
        return PromptInfo(max(1, len(ids)), keys)
