"""Tokenizer and text encoder(s) of a checkpoint; one embedding per distinct text (DESIGN.md §3).

The text encoder always comes from the checkpoint itself. Single files carry no text-encoder
config, so it is derived from the tensor shapes (attention heads = width / 64 in every SD
family). The tokenizer is the CLIP BPE: a manifest override, else the diffusers folder's own,
else the vocabulary file the `openai-clip` package ships (located, never imported).
Nothing here touches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint.layout import Checkpoint, TextEncoderSource
from .checkpoint.safetensors_format import read_tensor
from .errors import CheckpointError, TokenizerError
from .erase import check_finite

MAX_TOKENS = 77
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
HEAD_DIM = 64
BATCH = 64


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
    pad_token = "<|endoftext|>" if pad == "eos" else "!"  # "!" is id 0, OpenCLIP's pad
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token,
                         model_max_length=MAX_TOKENS)


def load_tokenizer(folder: Path | None, pad: str):
    """A tokenizer folder (vocab.json + merges.txt), or the shipped CLIP BPE when `folder` is None."""
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
    return tok


# --- text encoders -----------------------------------------------------------------------------

def _hf_clip_weights(source: TextEncoderSource) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys (no `text_model.` level in transformers 5)."""
    out = {}
    for key in source.header.tensors:
        if not key.startswith(source.prefix):
            continue
        name = key[len(source.prefix):]
        if name.startswith("text_model."):
            name = name[len("text_model."):]
        if name.endswith("position_ids"):  # a buffer some exporters saved; recomputed on load
            continue
        out[name] = read_tensor(source.header, key)
    return out


WEIGHT_CONVERTERS = {"hf_clip": _hf_clip_weights}


def _derived_config(weights: dict[str, torch.Tensor], source: TextEncoderSource):
    from transformers import CLIPTextConfig

    def shape(key: str) -> tuple[int, ...]:
        if key not in weights:
            raise CheckpointError("text encoder tensor missing", path=source.header.path,
                                  field=source.prefix + key)
        return tuple(weights[key].shape)

    vocab, width = shape("embeddings.token_embedding.weight")
    positions, _ = shape("embeddings.position_embedding.weight")
    layers = len({k.split(".")[2] for k in weights if k.startswith("encoder.layers.")})
    intermediate = shape("encoder.layers.0.mlp.fc1.weight")[0]
    if width % HEAD_DIM and width >= HEAD_DIM:
        raise CheckpointError(f"text encoder width {width} is not a multiple of {HEAD_DIM}",
                              path=source.header.path, field=source.prefix + "embeddings.token_embedding.weight")
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=max(width // HEAD_DIM, 1),
                          max_position_embeddings=positions, hidden_act=source.layout.hidden_act,
                          bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407 if source.layout.pad == "eos" else 0)


def load_text_encoder(source: TextEncoderSource, device: torch.device):
    from transformers import CLIPTextConfig, CLIPTextModel

    convert = WEIGHT_CONVERTERS.get(source.layout.weights_format)
    if convert is None:
        raise CheckpointError(f"text encoder format {source.layout.weights_format!r} is not supported yet",
                              path=source.header.path)
    weights = convert(source)
    for name, tensor in weights.items():
        if tensor.is_floating_point():
            check_finite(tensor, f"{source.header.path}: text encoder tensor {name}")
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


def encoder_fingerprint(source: TextEncoderSource) -> str:
    """Identifies a text encoder by its tensors' header entries and the file's identity.

    Two checkpoints share embeddings only if their text encoder tensors are byte-identical,
    which `embedding_cache_key` checks by hashing the tensor bytes.
    """
    h = hashlib.sha256()
    for key in sorted(k for k in source.header.tensors if k.startswith(source.prefix)):
        h.update(key[len(source.prefix):].encode())
        h.update(tensor_digest(source, key))
    return h.hexdigest()


def tensor_digest(source: TextEncoderSource, key: str) -> bytes:
    e = source.header.tensors[key]
    with open(source.header.path, "rb") as f:
        f.seek(source.header.data_start + e.begin)
        return hashlib.sha256(f.read(e.nbytes)).digest()


# --- embeddings --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Embedding:
    rows: torch.Tensor   # [77, d] float32, CPU
    tokens: int          # real tokens including BOS and EOS


class TextEmbedder:
    """Embeds texts with a checkpoint's text encoder(s); every distinct text is encoded once."""

    def __init__(self, checkpoint: Checkpoint, tokenizer_override: Path | None = None,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.layouts = [s.layout for s in checkpoint.text_encoders]
        self.tokenizers = [load_tokenizer(tokenizer_override or folder, s.layout.pad)
                           for s, folder in zip(checkpoint.text_encoders, checkpoint.tokenizer_dirs)]
        self.encoders = [load_text_encoder(s, self.device) for s in checkpoint.text_encoders]
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
        for layout, tokenizer, encoder in zip(self.layouts, self.tokenizers, self.encoders):
            ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                            return_tensors="pt")
            if tokens is None:
                tokens = ids["attention_mask"].sum(dim=1).tolist()
            out = encoder(ids["input_ids"].to(self.device), output_hidden_states=layout.hidden_state != "last")
            if layout.hidden_state == "last":
                hidden = out.last_hidden_state
            elif layout.hidden_state == "penultimate_norm":
                hidden = encoder.final_layer_norm(out.hidden_states[-2])
            else:
                hidden = out.hidden_states[-2]
            parts.append(hidden.float())
        rows = torch.cat(parts, dim=-1).cpu()
        check_finite(rows, f"{self.path}: text embeddings")
        return [Embedding(rows[i].clone(), int(tokens[i])) for i in range(len(texts))]
