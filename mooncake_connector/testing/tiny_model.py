"""Build small Llama models with real random weights and a locally trained tokenizer.

Why: models cannot be downloaded on our CI machines, yet the connector must be proven with real
vLLM engines. Random weights (not vLLM's ``load_format=dummy``) keep logits peaked enough that a
corrupted KV block changes greedy output, so identity tests mean something. Building is
deterministic for a seed and cached on disk, so every test run and benchmark reuses one copy.

Run ``python -m mooncake_connector.testing.tiny_model --size tiny`` to print the path.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ModelSpec", "SIZES", "build_tiny_model", "default_cache_dir"]

# A deliberately simple chat template so /v1/chat/completions works with the tiny models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}</s>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
BUILD_FORMAT = 1  # bump when the builder changes what it writes


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a generated model. head_dim must be 64: vLLM's CPU attention rejects 16."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 2048
    max_position_embeddings: int = 16384
    initializer_range: float = 0.05  # above HF's 0.02 so logits are not flat

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


SIZES: dict[str, ModelSpec] = {
    # Most tests: starts fast, tiny KV pages (2 layers x 2 KV heads x 64 dims).
    "tiny": ModelSpec(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=512),
    # Benchmarks: prefill takes visible time (the connector issue's measurements used this shape).
    "bench": ModelSpec(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4,
                       intermediate_size=2816),
}


def default_cache_dir() -> Path:
    """Where built models live: ``$MOONCAKE_MODEL_CACHE`` or ``~/.cache/mooncake-connector/models``."""
    env = os.environ.get("MOONCAKE_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mooncake-connector" / "models"


def _corpus(seed: int, n_lines: int = 4000) -> list[str]:
    """A deterministic pseudo-English corpus to train the tokenizer on."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "so", "vi", "de", "ma", "po", "li", "an",
                 "er", "in", "on", "th", "st", "qu", "ze", "ba", "co", "fu", "gi", "ho", "ju"]
    words = ["the", "a", "of", "and", "to", "in", "is", "cache", "token", "block", "store",
             "prefill", "decode", "moon", "cake", "model", "request", "hello", "world"]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(1500)]
    lines = []
    for _ in range(n_lines):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
        lines.append(line.capitalize() + rng.choice([".", "?", "!", ",", ";"]) + " " + str(rng.randint(0, 9999)))
    return lines


def _train_tokenizer(spec: ModelSpec, seed: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="</s>", model_max_length=spec.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _build_weights(spec: ModelSpec, seed: int, vocab_size: int, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)


def build_tiny_model(size: str | ModelSpec = "tiny", *, seed: int = 0,
                     cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Return the directory of a built model, building it first if it is not cached.

    The directory name hashes the spec, seed and builder format, so a change to any of them
    builds a fresh model instead of reusing a stale one. Building is atomic (temp dir + rename),
    so concurrent test processes never see a half-written model.
    """
    spec = SIZES[size] if isinstance(size, str) else size
    name = size if isinstance(size, str) else "custom"
    key = json.dumps({"spec": asdict(spec), "seed": seed, "format": BUILD_FORMAT}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"llama-{name}-{digest}"
    if (target / "DONE").exists() and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        _train_tokenizer(spec, seed, tmp)
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(tmp))
        _build_weights(spec, seed, vocab, tmp)
        (tmp / "DONE").write_text(key)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", "--cache_dir", default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args()
    print(build_tiny_model(args.size, seed=args.seed, cache_dir=args.cache_dir, force=args.force))


if __name__ == "__main__":
    main()
