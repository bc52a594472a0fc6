"""Tokenizer and text encoder(s) of a checkpoint; one embedding per distinct text (DESIGN.md §3).

The text encoder always comes from the checkpoint itself. Single files carry no text-encoder
config, so it is derived from the tensor shapes (attention heads = width / 64 in every SD
family); OpenCLIP towers (SD 2.x, SDXL's second encoder) are renamed into transformers'
CLIPTextModel layout by the tables below and run as that model. The tokenizer is the CLIP BPE:
a manifest override, else the diffusers folder's own, else the vocabulary file the `openai-clip`
package ships (located, never imported); its pad token is always the text encoder's own.
Nothing here touches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint.layout import Checkpoint, TextEncoderSource
from .clip_text import ClipTextTransformer, ClipTokenizer, expected_keys
from .clip_text import shape_of as clip_shape_of
from .checkpoint.safetensors_format import read_tensor
from .errors import CheckpointError, TokenizerError
from .erase import check_finite

MAX_TOKENS = 77
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
HEAD_DIM = 64
BATCH = 64
# The two pads SD text encoders were trained with: CLIP's `<|endoftext|>`, OpenCLIP's id 0 ("!").
PAD_TOKENS = {"eos": "<|endoftext|>", "zero": "!"}


# --- tokenizer ---------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """The byte → printable-character table byte-level BPE vocabularies are written in."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("clip")
    for base in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(base) / BPE_FILE
        if candidate.is_file():
            return candidate
    raise TokenizerError(f"the CLIP BPE vocabulary ({BPE_FILE}) is not installed",
                         hint="pip install openai-clip, or set `tokenizer` in the manifest to a tokenizer folder")


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary, built as OpenAI's simple_tokenizer builds it.

    The 256 byte symbols, the same with `</w>`, the merges, then the two special tokens:
    49,408 entries. (Callers get copies: the cache must not be mutated.)
    """
    lines = gzip.open(clip_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


@lru_cache(maxsize=2)
def clip_tokenizer(pad: str = "eos"):
    """The CLIP BPE tokenizer from the vocabulary `openai-clip` ships; pad `eos` or `zero` (id 0).

    Built from `vocab=`/`merges=`: in transformers 5 `CLIPTokenizer(vocab_file=...)` is
    silently ignored and yields a 3-token tokenizer.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=PAD_TOKENS[pad],
                         model_max_length=MAX_TOKENS)


def load_tokenizer(folder: Path | None, pad: str):
    """A tokenizer folder (vocab.json + merges.txt), or the shipped CLIP BPE when `folder` is None.

    The pad token is the text encoder's (a property of the family, not of the vocabulary), so a
    manifest override such as SD 1.x's tokenizer folder used for SD 2.x still pads with id 0.
    Real diffusers folders already carry their family's pad, so this changes nothing for them.
    """
    if folder is None:
        return clip_tokenizer(pad)
    from transformers import CLIPTokenizer

    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise TokenizerError("not a CLIP tokenizer folder (vocab.json and merges.txt expected)", path=folder)
    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds for a broken folder
        raise TokenizerError(f"unreadable tokenizer ({type(exc).__name__}: {str(exc)[:100]})",
                             path=folder) from None
    if len(tok) < 49408:
        raise TokenizerError(f"tokenizer has {len(tok)} tokens, expected the 49,408 of CLIP's BPE", path=folder)
    if tok.pad_token != PAD_TOKENS[pad]:
        tok.pad_token = PAD_TOKENS[pad]
    return tok


def _folder_vocab(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json + merges.txt of a tokenizer folder (what SD releases ship)."""
    try:
        vocab = json.loads((folder / "vocab.json").read_text("utf-8"))
        lines = (folder / "merges.txt").read_text("utf-8").splitlines()
    except FileNotFoundError:
        raise TokenizerError("not a CLIP tokenizer folder (vocab.json and merges.txt expected)",
                             path=folder) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TokenizerError(f"unreadable tokenizer files ({exc})", path=folder) from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError("vocab.json is not a map of token to id", path=folder / "vocab.json")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    if any(len(m) != 2 for m in merges):
        raise TokenizerError("merges.txt has a line that is not two symbols", path=folder / "merges.txt")
    return vocab, merges


def load_clip_tokenizer(folder: Path | None, pad: str) -> ClipTokenizer:
    """The tokenizer the embeddings use: a folder's vocab.json + merges.txt, else the shipped BPE.

    The pad token is the text encoder's own (see `load_tokenizer`).
    """
    vocab, merges = clip_vocab_and_merges() if folder is None else _folder_vocab(folder)
    if len(vocab) < 49408:
        raise TokenizerError(f"tokenizer has {len(vocab)} tokens, expected the 49,408 of CLIP's BPE",
                             path=folder)
    try:
        return ClipTokenizer(dict(vocab), list(merges), PAD_TOKENS[pad], MAX_TOKENS)
    except (KeyError, Exception) as exc:  # tokenizers raises its own types for bad merges
        raise TokenizerError(f"cannot build the BPE tokenizer ({type(exc).__name__}: {str(exc)[:100]})",
                             path=folder) from None


# --- text encoders -----------------------------------------------------------------------------

# Tensors the hidden states never use: buffers recomputed on load, and the pooled/contrastive
# heads (a diffusers SDXL text_encoder_2 is a CLIPTextModelWithProjection; OpenCLIP towers keep
# their projection and logit scale). The edit needs token rows only.
HF_CLIP_UNUSED = {"embeddings.position_ids", "text_projection.weight"}
OPEN_CLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}

# OpenCLIP text tower (`cond_stage_model.model.*`, `conditioner.embedders.1.model.*`) →
# transformers CLIPTextModel names. Whole keys first, then the sub-keys of each residual block
# `transformer.resblocks.N.*` (→ `encoder.layers.N.*`); OpenCLIP's fused attention input
# projection (nn.MultiheadAttention's in_proj) holds q, k, v stacked along rows, in that order.
OPEN_CLIP_TO_HF = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
OPEN_CLIP_BLOCK = "transformer.resblocks."
HF_CLIP_BLOCK = "encoder.layers."
OPEN_CLIP_BLOCK_TO_HF = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
OPEN_CLIP_FUSED_TO_HF = {
    "attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
}


def _hf_clip_weights(source: TextEncoderSource) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys (no `text_model.` level in transformers 5)."""
    out = {}
    for key in source.header.tensors:
        if not key.startswith(source.prefix):
            continue
        name = key[len(source.prefix):].removeprefix("text_model.")
        if name in HF_CLIP_UNUSED:
            continue
        out[name] = read_tensor(source.header, key)
    return out


def _open_clip_weights(source: TextEncoderSource) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower → transformers CLIPTextModel keys, by the tables above."""
    out = {}
    for key in source.header.tensors:
        if not key.startswith(source.prefix):
            continue
        name = key[len(source.prefix):]
        if name in OPEN_CLIP_UNUSED:
            continue
        if name in OPEN_CLIP_TO_HF:
            out[OPEN_CLIP_TO_HF[name]] = read_tensor(source.header, key)
            continue
        block, _, sub = name.removeprefix(OPEN_CLIP_BLOCK).partition(".")
        if name.startswith(OPEN_CLIP_BLOCK) and block.isdigit():
            layer = f"{HF_CLIP_BLOCK}{block}."
            if sub in OPEN_CLIP_BLOCK_TO_HF:
                out[layer + OPEN_CLIP_BLOCK_TO_HF[sub]] = read_tensor(source.header, key)
                continue
            if sub in OPEN_CLIP_FUSED_TO_HF:
                fused = read_tensor(source.header, key)
                if fused.shape[0] % 3:
                    raise CheckpointError(f"fused q/k/v projection has {fused.shape[0]} rows, not a multiple "
                                          "of 3", path=source.header.path, field=key)
                for part, tensor in zip(OPEN_CLIP_FUSED_TO_HF[sub], fused.chunk(3, dim=0)):
                    out[layer + part] = tensor.contiguous()
                continue
        raise CheckpointError("not an OpenCLIP text-tower tensor rece-tool knows", path=source.header.path,
                              field=key)
    return out


WEIGHT_CONVERTERS = {"hf_clip": _hf_clip_weights, "open_clip": _open_clip_weights}


def _derived_config(weights: dict[str, torch.Tensor], source: TextEncoderSource):
    """A transformers CLIPTextConfig for a single file's encoder, from `clip_text.shape_of`."""
    from transformers import CLIPTextConfig

    try:
        shape = clip_shape_of(weights, source.layout.hidden_act)
    except KeyError as exc:
        raise CheckpointError("text encoder tensor missing", path=source.header.path,
                              field=source.prefix + str(exc.args[0])) from None
    except ValueError as exc:
        raise CheckpointError(f"text encoder shape unusable ({exc})", path=source.header.path,
                              field=source.prefix + "embeddings.token_embedding.weight") from None
    if shape.width % HEAD_DIM and shape.width >= HEAD_DIM:
        raise CheckpointError(f"text encoder width {shape.width} is not a multiple of {HEAD_DIM}",
                              path=source.header.path, field=source.prefix + "embeddings.token_embedding.weight")
    return CLIPTextConfig(vocab_size=shape.vocab, hidden_size=shape.width,
                          intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                          num_attention_heads=shape.heads, max_position_embeddings=shape.positions,
                          hidden_act=shape.hidden_act, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407 if source.layout.pad == "eos" else 0)


def load_text_encoder(source: TextEncoderSource, device: torch.device):
    """A transformers CLIPTextModel, for diffusers pipelines (the image audit); embeddings use
    the lighter `load_clip_transformer`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    weights = _checked_weights(source)
    if source.config_dir is not None:
        config = CLIPTextConfig.from_pretrained(str(source.config_dir), local_files_only=True)
    else:
        config = _derived_config(weights, source)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    try:
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"text encoder weights do not fit a CLIP text model ({str(exc)[:160]})",
                              path=source.header.path, field=source.prefix or None) from None
    # Buffers not in the state dict (position_ids) are still on meta: rebuild them.
    model.embeddings.register_buffer(
        "position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0), persistent=False)
    return model.to(device).eval()


def _read_weights(source: TextEncoderSource) -> dict[str, torch.Tensor]:
    convert = WEIGHT_CONVERTERS.get(source.weights_format)
    if convert is None:
        raise CheckpointError(f"text encoder format {source.weights_format!r} is not supported",
                              path=source.header.path)
    return convert(source)


def _check_weights(source: TextEncoderSource, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name, tensor in weights.items():
        if tensor.is_floating_point():
            check_finite(tensor, f"{source.header.path}: text encoder tensor {name}")
    return weights


def _checked_weights(source: TextEncoderSource) -> dict[str, torch.Tensor]:
    return _check_weights(source, _read_weights(source))


def _folder_config(source: TextEncoderSource) -> dict:
    try:
        config = json.loads((source.config_dir / "config.json").read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"unreadable text encoder config ({exc})",
                              path=source.config_dir / "config.json") from None
    return config if isinstance(config, dict) else {}


def load_clip_transformer(source: TextEncoderSource, weights: dict[str, torch.Tensor],
                          device: torch.device) -> ClipTextTransformer:
    """The embedding path's text encoder: our transformers-free forward over `weights`."""
    act, heads = source.layout.hidden_act, None
    if source.config_dir is not None:
        config = _folder_config(source)
        act, heads = config.get("hidden_act", act), config.get("num_attention_heads")
    try:
        shape = clip_shape_of(weights, act, heads if isinstance(heads, int) else None)
        expected = expected_keys(shape)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"text encoder tensors do not form a CLIP text model ({exc})",
                              path=source.header.path, field=source.prefix or None) from None
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError("text encoder tensor missing", path=source.header.path,
                              field=source.prefix + missing[0])
    for name, tensor in weights.items():
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"shape {list(tensor.shape)} does not fit a width-{shape.width} CLIP "
                                  f"text model (expected {list(expected[name])})",
                                  path=source.header.path, field=source.prefix + name)
    return ClipTextTransformer(weights, shape).to(device)


def encoder_fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """Names and bytes of a text encoder's tensors: equal fingerprints, equal embeddings."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().data)  # the tensor's own memory, no copy
    return h.hexdigest()


# --- embeddings --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Embedding:
    rows: torch.Tensor   # [77, d] float32, CPU
    tokens: int          # real tokens including BOS and EOS


class TextEmbedder:
    """Embeds texts with a checkpoint's text encoder(s); every distinct text is encoded once.

    Several encoders (SDXL) each tokenize the text with their own tokenizer and their rows are
    concatenated along the width, in the checkpoint's encoder order.
    """

    def __init__(self, checkpoint: Checkpoint, tokenizer_override: Path | None = None,
                 device: torch.device | str = "cpu",
                 weights: list[dict[str, torch.Tensor]] | None = None):
        self.device = torch.device(device)
        self.rules = [s.hidden_state for s in checkpoint.text_encoders]
        self.tokenizers = [load_clip_tokenizer(tokenizer_override or folder, s.layout.pad)
                           for s, folder in zip(checkpoint.text_encoders, checkpoint.tokenizer_dirs)]
        weights = weights or [_checked_weights(s) for s in checkpoint.text_encoders]
        self.encoders = [load_clip_transformer(s, w, self.device)
                         for s, w in zip(checkpoint.text_encoders, weights)]
        self.path = checkpoint.path
        self._cache: dict[str, Embedding] = {}

    def embed(self, texts: Iterable[str], progress=None) -> dict[str, Embedding]:
        wanted = list(dict.fromkeys(texts))
        todo = [t for t in wanted if t not in self._cache]
        for start in range(0, len(todo), BATCH):
            batch = todo[start:start + BATCH]
            for text, emb in zip(batch, self._encode(batch)):
                self._cache[text] = emb
            if progress:
                progress(len(batch))
        return {t: self._cache[t] for t in wanted}

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> list[Embedding]:
        parts, tokens = [], None
        for rule, tokenizer, encoder in zip(self.rules, self.tokenizers, self.encoders):
            ids, mask = tokenizer(texts)
            # The attention mask marks padding by position, not by id, so the count is right
            # whether the pad is `<|endoftext|>` (= EOS) or id 0; every encoder shares the BPE.
            if tokens is None:
                tokens = mask.sum(dim=1).tolist()
            parts.append(encoder.encode(ids.to(self.device), rule).float())
        rows = torch.cat(parts, dim=-1).cpu()
        check_finite(rows, f"{self.path}: text embeddings")
        return [Embedding(rows[i].clone(), int(tokens[i])) for i in range(len(texts))]


def embedder_for(checkpoint: Checkpoint, tokenizer_override: Path | None, device: torch.device,
                 shared: dict[tuple, TextEmbedder] | None) -> TextEmbedder:
    """One TextEmbedder per distinct text encoder in a run (fine-tunes of one base share it).

    Keyed by the encoders' tensor bytes, tokenizers and device, so embeddings are reused only
    when they would come out identical. `shared=None` (a run of one checkpoint) skips hashing.
    """
    if shared is None:
        return TextEmbedder(checkpoint, tokenizer_override, device)
    weights = [_read_weights(s) for s in checkpoint.text_encoders]
    key = (tuple(encoder_fingerprint(w) for w in weights),
           tuple(str(tokenizer_override or folder) for folder in checkpoint.tokenizer_dirs),
           tuple((s.layout.pad, s.hidden_state, s.layout.hidden_act) for s in checkpoint.text_encoders),
           str(device))
    if key not in shared:  # byte-identical encoders were checked when first seen
        checked = [_check_weights(s, w) for s, w in zip(checkpoint.text_encoders, weights)]
        shared[key] = TextEmbedder(checkpoint, tokenizer_override, device, checked)
    return shared[key]
