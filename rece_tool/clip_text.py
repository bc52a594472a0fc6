"""The CLIP text transformer and BPE tokenizer, without importing transformers at run time.

Why not transformers' `CLIPTextModel`: importing it pulls in torch._dynamo, torch.distributed
and sympy, several seconds of start-up on every run — more than streaming a 2 GB checkpoint.
What RECE needs is one forward pass of a 12–32 layer pre-LayerNorm transformer, so it is
written here over the transformers-layout state dict (`embeddings.*`, `encoder.layers.N.*`,
`final_layer_norm.*`) and held to transformers and diffusers by the tests (tests/test_clip_text.py,
tests/test_embeddings.py). The tokenizer is the `tokenizers` library's BPE set up exactly as
transformers' `CLIPTokenizer` sets it up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-5
HEAD_DIM = 64
ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
}


@dataclass(frozen=True)
class ClipTextShape:
    vocab: int
    width: int
    intermediate: int
    layers: int
    heads: int
    positions: int
    hidden_act: str


def shape_of(weights: dict[str, torch.Tensor], hidden_act: str, heads: int | None = None) -> ClipTextShape:
    """The architecture, read off the tensor shapes (single files carry no config)."""
    vocab, width = weights["embeddings.token_embedding.weight"].shape
    positions = weights["embeddings.position_embedding.weight"].shape[0]
    intermediate = weights["encoder.layers.0.mlp.fc1.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layers."))
    heads = heads or max(width // HEAD_DIM, 1)
    if width % heads:
        raise ValueError(f"width {width} is not divisible by {heads} heads")
    return ClipTextShape(vocab, width, intermediate, layers, heads, positions, hidden_act)


def expected_keys(shape: ClipTextShape) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads, with its shape."""
    w, m = shape.width, shape.intermediate
    keys = {"embeddings.token_embedding.weight": (shape.vocab, w),
            "embeddings.position_embedding.weight": (shape.positions, w),
            "final_layer_norm.weight": (w,), "final_layer_norm.bias": (w,)}
    for i in range(shape.layers):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[f"{p}self_attn.{proj}.weight"], keys[f"{p}self_attn.{proj}.bias"] = (w, w), (w,)
        for norm in ("layer_norm1", "layer_norm2"):
            keys[f"{p}{norm}.weight"], keys[f"{p}{norm}.bias"] = (w,), (w,)
        keys[f"{p}mlp.fc1.weight"], keys[f"{p}mlp.fc1.bias"] = (m, w), (m,)
        keys[f"{p}mlp.fc2.weight"], keys[f"{p}mlp.fc2.bias"] = (w, m), (w,)
    return keys


class ClipTextTransformer:
    """Forward pass of CLIP's text transformer (causal self-attention, no padding mask)."""

    def __init__(self, weights: dict[str, torch.Tensor], shape: ClipTextShape):
        if shape.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {shape.hidden_act!r}")
        self.w, self.shape = weights, shape
        self.act = ACTIVATIONS[shape.hidden_act]

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "ClipTextTransformer":
        self.w = {k: v.to(device=device, dtype=dtype) for k, v in self.w.items()}
        return self

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[f"{name}.weight"], self.w[f"{name}.bias"],
                            LAYER_NORM_EPS)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def _attention(self, x: torch.Tensor, p: str) -> torch.Tensor:
        b, n, width = x.shape
        h = self.shape.heads

        def split(t):
            return t.view(b, n, h, width // h).transpose(1, 2)

        q, k, v = (split(self._linear(x, f"{p}.{name}")) for name in ("q_proj", "k_proj", "v_proj"))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(width // h))
        return self._linear(out.transpose(1, 2).reshape(b, n, width), f"{p}.out_proj")

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """[embeddings, after layer 1, …] — stops after `upto` layers when given."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (F.embedding(input_ids, self.w["embeddings.token_embedding.weight"])
             + F.embedding(positions, self.w["embeddings.position_embedding.weight"]))
        states = [x]
        for i in range(self.shape.layers if upto is None else upto):
            p = f"encoder.layers.{i}"
            x = x + self._attention(self._norm(x, f"{p}.layer_norm1"), f"{p}.self_attn")
            y = self._norm(x, f"{p}.layer_norm2")
            x = x + self._linear(self.act(self._linear(y, f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
            states.append(x)
        return states

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, "final_layer_norm")

    def encode(self, input_ids: torch.Tensor, hidden_state: str) -> torch.Tensor:
        """`last` (after the final LayerNorm), `penultimate_norm` or `penultimate` (no LayerNorm)."""
        if hidden_state == "last":
            return self.final_norm(self.hidden_states(input_ids)[-1])
        penultimate = self.hidden_states(input_ids, upto=self.shape.layers - 1)[-1]
        return self.final_norm(penultimate) if hidden_state == "penultimate_norm" else penultimate


# --- tokenizer ---------------------------------------------------------------------------------

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenization pattern, as transformers' CLIPTokenizer uses it.
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class ClipTokenizer:
    """CLIP BPE: lower-cased, whitespace-collapsed, BOS … EOS, truncated and padded to `length`."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str,
                 length: int = 77):
        from tokenizers import (AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers,
                                processors)
        from tokenizers.models import BPE

        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]),
                                                          trim_offsets=False, add_prefix_space=False)
        if pad_token not in vocab:
            raise KeyError(pad_token)
        # transformers registers BOS, EOS and the pad token as special tokens, which splits them
        # out of the text before BPE (even OpenCLIP's pad "!"); diffusers' encode_prompt, the
        # reference every family is held to, tokenizes that way, so we do too.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in dict.fromkeys((BOS, EOS, pad_token))])
        self.pad_id = vocab[pad_token]
        tok.enable_truncation(max_length=length)
        tok.enable_padding(length=length, pad_id=self.pad_id, pad_token=pad_token)
        self._tok, self.length, self.vocab_size = tok, length, len(vocab)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each `[len(texts), length]`."""
        encodings = self._tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask
