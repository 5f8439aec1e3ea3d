"""The block-key scheme is a wire contract between engines and the Conductor: pin it."""
from __future__ import annotations

import pytest

from store.keys import (
    MAX_KEY_BYTES,
    KeyNamespace,
    MultiModalSpan,
    RequestExtras,
    block_digests,
    block_keys,
    validate_key,
)

NS = KeyNamespace(model="tiny-llama", kv_dtype="bfloat16", kv_layout="cpu-LBHNC", block_size=4)
TOKENS = list(range(10))  # two full blocks, a partial tail


def test_pinned_output_for_fixed_inputs():
    """If this changes, every stored block becomes unreachable: bump the scheme version instead."""
    keys = block_keys(NS, TOKENS)
    assert keys == [
        "mc1/_/" + NS.namespace_id + "/" + d.hex() for d in block_digests(NS, TOKENS)
    ]
    assert NS.namespace_id == PINNED_NS_ID
    assert [k.rsplit("/", 1)[1] for k in keys] == PINNED_DIGESTS


PINNED_NS_ID = "80aaa09b410c8220"
PINNED_DIGESTS = [
    "63d16bb102da5a257810765a13a18f64760db01460cf0996a0dd35bc70efe1dc",
    "6fedf9dcd378acfa14332a500704617e319115dab4e19b00624d830f2e6337c4",
]


def test_only_full_blocks_get_keys():
    assert len(block_keys(NS, TOKENS)) == 2
    assert block_keys(NS, TOKENS[:3]) == []


def test_keys_identify_the_whole_prefix():
    a = block_keys(NS, [1, 2, 3, 4, 5, 6, 7, 8])
    b = block_keys(NS, [1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9])
    c = block_keys(NS, [0, 2, 3, 4, 5, 6, 7, 8])
    assert b[:2] == a  # a shared prefix shares keys
    assert c[1] != a[1]  # same second block after a different first block: different key


@pytest.mark.parametrize("change", [
    {"model": "other"}, {"revision": "r2"}, {"kv_dtype": "float16"}, {"kv_layout": "NHD"},
    {"tp_size": 2, "tp_rank": 1}, {"pp_rank": 1}, {"tenant": "acme"},
])
def test_every_namespace_field_separates_keys(change):
    from dataclasses import replace

    other = replace(NS, **change)
    assert set(block_keys(NS, TOKENS)).isdisjoint(block_keys(other, TOKENS))


@pytest.mark.parametrize("extras", [
    RequestExtras(lora_name="adapter"), RequestExtras(cache_salt="s"),
    RequestExtras(prompt_embeds_digest="e"),
])
def test_request_extras_separate_every_block(extras):
    assert set(block_keys(NS, TOKENS)).isdisjoint(block_keys(NS, TOKENS, extras))


def test_multimodal_input_changes_only_blocks_from_where_it_appears():
    plain = block_keys(NS, TOKENS)
    image = block_keys(NS, TOKENS, RequestExtras(mm_spans=[MultiModalSpan("img0", 5, 2)]))
    assert image[0] == plain[0]
    assert image[1] != plain[1]
    other = block_keys(NS, TOKENS, RequestExtras(mm_spans=[MultiModalSpan("img1", 5, 2)]))
    assert other[1] != image[1]


def test_extending_a_chain_matches_hashing_from_scratch():
    tokens = list(range(100, 120))
    full = block_digests(NS, tokens)
    head = block_digests(NS, tokens[:8])
    tail = block_digests(NS, tokens, start_block=2, prev_digest=head[-1])
    assert head + tail == full


def test_tenant_is_visible_in_the_key_and_keys_fit_the_limit():
    ns = KeyNamespace(model="m" * 500, kv_dtype="bf16", kv_layout="x", block_size=4, tenant="acme")
    (key, *_) = block_keys(ns, TOKENS)
    assert key.startswith("mc1/acme/")
    assert len(key.encode()) <= MAX_KEY_BYTES


@pytest.mark.parametrize("bad", [
    dict(model=""), dict(block_size=0), dict(tp_size=2, tp_rank=2), dict(pp_rank=-1),
    dict(tenant="a/b"), dict(hash_algo="md5"),
])
def test_bad_namespaces_are_clear_errors(bad):
    args = dict(model="m", kv_dtype="bf16", kv_layout="x", block_size=4) | bad
    with pytest.raises(ValueError):
        KeyNamespace(**args)


def test_bad_tokens_and_keys_are_clear_errors():
    with pytest.raises(ValueError, match="token ids"):
        block_keys(NS, [-1, 2, 3, 4])
    with pytest.raises(ValueError, match="prev_digest"):
        block_digests(NS, TOKENS, start_block=1)
    with pytest.raises(ValueError, match="empty"):
        validate_key("")
    with pytest.raises(ValueError, match="256"):
        validate_key("k" * 257)


def test_namespace_round_trips_through_a_dict():
    assert KeyNamespace.from_dict(NS.to_dict()) == NS
    with pytest.raises(ValueError, match="unknown"):
        KeyNamespace.from_dict(NS.to_dict() | {"colour": "red"})
