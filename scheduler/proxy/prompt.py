"""From an OpenAI request body to the block keys its prompt's KV is stored under.

The Conductor routes by prefix blocks, and the only blocks that matter are the ones the
connector really stores: so the proxy tokenizes exactly as the engine will (the model's own
tokenizer, its chat template for chat requests) and hashes with :mod:`store.keys`. Without a
tokenizer the proxy still routes, by an estimated length and with no cache awareness.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from store.keys import KeyNamespace, RequestExtras, block_keys

__all__ = ["PromptInfo", "PromptHasher", "BadRequest"]

log = logging.getLogger(__name__)
CHARS_PER_TOKEN = 4  # rough estimate when no tokenizer is configured


class BadRequest(ValueError):
    """The client's body is not a valid request; answered with HTTP 400."""


@dataclass(frozen=True)
class PromptInfo:
    token_count: int
    block_keys: tuple[str, ...]


MAX_TOKEN_ID = 0x7FFFFFFF
"""The block-key scheme hashes token ids as int32 (:mod:`store.keys`); larger is no token."""


def _check_message(m: Any) -> None:
    if not isinstance(m, dict):
        raise BadRequest("each message must be an object")
    role = m.get("role")
    if not isinstance(role, str) or not role:
        raise BadRequest("each message needs a 'role' string")
    content = m.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise BadRequest("a message's 'content' must be a string or a list of content parts")


def _prompt_of(body: dict[str, Any], chat: bool) -> Any:
    """The prompt part of ``body``, checked as far as routing needs (the engine checks the rest).

    Also the fields the proxy itself acts on (``stream``, ``cache_salt``): a wrong type there
    would make it relay the wrong way or hash garbage, so it is a 400 here rather than later.
    """
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise BadRequest("'stream' must be a boolean")
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise BadRequest("'cache_salt' must be a string")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        for m in messages:
            _check_message(m)
        return messages
    if "prompt" not in body:
        raise BadRequest("'prompt' is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        if not all(0 <= t <= MAX_TOKEN_ID for t in prompt):
            raise BadRequest(f"token ids must be between 0 and {MAX_TOKEN_ID}")
        return prompt
    raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)")


def _estimate_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text in chat messages, for the length estimate without a tokenizer.

    Walks only the documented shapes (string content, text parts), so any nesting the client
    sends costs nothing here.
    """
    n = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            n += len(content)
        elif isinstance(content, list):
            n += sum(len(p["text"]) for p in content if isinstance(p.get("text"), str))
    return n


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
        """The prompt's token ids as the engine will see them, or None when they cannot be
        known here (no tokenizer, or the tokenizer cannot render this request)."""
        prompt = _prompt_of(body, chat)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return list(prompt)
        tok = self._tok()
        if tok is None:
            return None
        try:
            if chat:
                # As vLLM does: render the template to text, then tokenize without specials.
                text = tok.apply_chat_template(prompt, tokenize=False,
                                               add_generation_prompt=True)
                return list(tok.encode(text, add_special_tokens=False))
            return list(tok.encode(prompt))
        except Exception as exc:  # noqa: BLE001 - any template/tokenizer failure, see below
            # The template may refuse what the engine's own checks judge (roles out of order,
            # parts it cannot render). Routing is an optimisation: route this request without
            # cache awareness and let the engine give the client its answer.
            log.debug("cannot tokenize a request for routing: %s", exc)
            return None

    def analyze(self, body: dict[str, Any], chat: bool) -> PromptInfo:
        """Token count and block keys (empty without tokenizer or namespace).

        Raises :class:`BadRequest` for a body the proxy cannot route.
        """
        ids = self.token_ids(body, chat)
        if ids is None:
            prompt = _prompt_of(body, chat)
            chars = _estimate_chars(prompt) if chat else len(prompt)
            return PromptInfo(max(1, chars // CHARS_PER_TOKEN), ())
        extras = RequestExtras(cache_salt=body.get("cache_salt") or None, lora_name=None)
        keys = tuple(block_keys(self.namespace, ids, extras)) if self.namespace else ()
        return PromptInfo(max(1, len(ids)), keys)
