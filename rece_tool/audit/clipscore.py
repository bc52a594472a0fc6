"""CLIP score of an image against its prompt: 100 · max(cos(image, text), 0) (torchmetrics' form).

The CLIP model is a local folder named in the manifest, loaded with `local_files_only` and
safetensors only (a pickle could run code). The image side uses the PIL image processor
explicitly: transformers 5's default CLIP image processor wants torchvision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..checkpoint.safetensors_format import file_sha256
from ..errors import BadInput

WEIGHT_FILES = ("model.safetensors",)


class ClipScorer:
    def __init__(self, folder: Path, device: torch.device):
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        self.folder, self.device = Path(folder), device
        try:
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True,
                                                   use_safetensors=True).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.processor = CLIPImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BadInput(f"cannot load a CLIP model from this folder offline ({str(exc)[:200]})",
                           path=folder, field="audit.images.clip_model",
                           hint="a transformers CLIPModel folder with model.safetensors, the tokenizer "
                                "and preprocessor_config.json") from None
        weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
        self.metadata = {
            "model": str(folder), "class": type(self.model).__name__,
            "weights_sha256": file_sha256(weights) if weights else None,
            "score": "100 * max(cos(image embedding, prompt embedding), 0)",
        }

    @torch.no_grad()
    def scores(self, images: list[np.ndarray], prompts: list[str]) -> list[float]:
        """One score per (image, prompt) pair."""
        from PIL import Image

        pixels = self.processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")
        words = self.tokenizer(list(prompts), padding=True, truncation=True,
                               max_length=self.tokenizer.model_max_length, return_tensors="pt")
        img = _features(self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device)))
        txt = _features(self.model.get_text_features(**{k: v.to(self.device) for k, v in words.items()}))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return [float(100.0 * max(c, 0.0)) for c in cos.tolist()]


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output
