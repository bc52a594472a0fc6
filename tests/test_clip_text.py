"""Our transformers-free CLIP text transformer and tokenizer, held to transformers itself."""

from __future__ import annotations

import pytest
import torch

from rece_tool.clip_text import ClipTextTransformer, ClipTokenizer, shape_of
from rece_tool.text import clip_vocab_and_merges

TEXTS = ["nudity", " ", "", "a photo of a cat", "Vincent van Gogh's Starry Night, 1889!!",
         "naïve café — ÜBER  spaced\ttext", "a " * 100, "<|endoftext|> inside", "1234 5678 9"]


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_forward_matches_transformers(act):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=77, hidden_act=act)
    ref = CLIPTextModel(config).eval()
    weights = dict(ref.state_dict())
    ours = ClipTextTransformer(weights, shape_of(weights, act))
    ids = torch.randint(0, 1000, (4, 77))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    torch.testing.assert_close(ours.encode(ids, "last"), out.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.encode(ids, "penultimate"), out.hidden_states[-2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.encode(ids, "penultimate_norm"),
                               ref.final_layer_norm(out.hidden_states[-2]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenizer_matches_transformers(pad):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    ref = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad, model_max_length=77)
    ours = ClipTokenizer(dict(vocab), list(merges), pad)
    ids, mask = ours(TEXTS)
    want = ref(TEXTS, padding="max_length", max_length=77, truncation=True)
    assert ids.tolist() == want["input_ids"]
    assert mask.tolist() == want["attention_mask"]
    assert ids[0, :4].tolist() == [49406, 1156, 16436, 49407]  # "nudity": two BPE tokens
    assert ids[6, -1].item() == 49407 and mask[6].sum() == 77    # truncated, still ends in EOS
