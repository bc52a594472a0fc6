"""SD 1.x embeddings: the tool's TextEmbedder against diffusers' own `encode_prompt` (DESIGN §3).

The reference pipeline for the single file is built by diffusers' single-file loader with the
config folder of a *different* seed, so only the weights read from the file can make the two
agree.
"""

from __future__ import annotations

import torch

from rece_tool.checkpoint.layout import open_checkpoint
from rece_tool.text import TextEmbedder

TOL = 1e-5
# Short, two-token, empty, the guide " ", punctuation, and one past 77 tokens (truncation).
TEXTS = ["nudity", " ", "", "a photo of a cat!", "golden retriever", "x " * 100]


def diffusers_embeddings(pipe, texts):
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(texts, "cpu", 1, False)
    mask = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True).attention_mask
    return embeds, [sum(m) for m in mask]


def tool_embeddings(path, texts):
    emb = TextEmbedder(open_checkpoint(path)).embed(texts)
    return torch.stack([emb[t].rows for t in texts]), [emb[t].tokens for t in texts]


def _assert_same(tool, reference):
    (rows, tokens), (want_rows, want_tokens) = tool, reference
    assert rows.shape == want_rows.shape == (len(TEXTS), 77, 64)
    assert float((rows - want_rows).abs().max()) <= TOL
    assert tokens == want_tokens
    assert tokens[:3] == [4, 2, 2] and tokens[-1] == 77  # "nudity" is two BPE tokens


def test_single_file_matches_diffusers_from_single_file(models):
    from diffusers import StableDiffusionPipeline

    path = models("fp32", seed=1)
    config = models("fp32", seed=0, diffusers=True)
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True)
    reference = diffusers_embeddings(pipe, TEXTS)
    other_seed = diffusers_embeddings(StableDiffusionPipeline.from_pretrained(config, local_files_only=True), TEXTS)
    assert float((reference[0] - other_seed[0]).abs().max()) > 1e-2  # the weights came from the file
    _assert_same(tool_embeddings(path, TEXTS), reference)
    # Files without transformers' `text_model.` level (which diffusers' loader does not read)
    # hold the same tensors and give the same rows.
    _assert_same(tool_embeddings(models("fp32", old_text=True, seed=1), TEXTS), reference)


def test_diffusers_folder_matches_encode_prompt(models):
    from diffusers import StableDiffusionPipeline

    folder = models("fp32", diffusers=True)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    _assert_same(tool_embeddings(folder, TEXTS), diffusers_embeddings(pipe, TEXTS))


def test_single_file_and_folder_of_one_model_agree(models):
    a = tool_embeddings(models("fp32"), TEXTS)
    b = tool_embeddings(models("fp32", diffusers=True), TEXTS)
    assert float((a[0] - b[0]).abs().max()) <= TOL and a[1] == b[1]


def test_folder_saved_with_transformers_4_key_names(models, tmp_path):
    """Hub SD 1.x folders keep transformers 4's `text_model.` level in text_encoder/ weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(models("fp32", diffusers=True), tmp_path / "hub-style")
    weights = folder / "text_encoder" / "model.safetensors"
    save_file({"text_model." + k: v for k, v in load_file(weights).items()}, str(weights), metadata={"format": "pt"})
    a = tool_embeddings(folder, TEXTS)
    b = tool_embeddings(models("fp32", diffusers=True), TEXTS)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
