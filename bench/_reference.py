"""The reference-style (UCE / RECE research code) edit, for baselines only.

Written after UCE's `edit_model` and RECE's closed-form embedding derivation: per layer, float32
on CPU, the outer-product sums built explicitly as batched `[n, d_out, 1] @ [n, 1, d]` products
summed over rows, `torch.inverse` of the normal matrix. Nothing factored, nothing shared across
layers. (The research code also recomputes every layer's values inside each layer's loop; here
only the layer's own are computed, which makes the baseline cheaper, i.e. our ratios
conservative.)
"""

from __future__ import annotations

import torch

F32 = torch.float32


def uce_slices(e: torch.Tensor, e_tokens: int, g: torch.Tensor, g_tokens: int):
    i_e, i_g = e_tokens - 2, g_tokens - 2
    far = max(i_e, i_g)
    return e[i_e:77 - (far - i_e)], g[i_g:77 - (far - i_g)]


def edit_layer(w: torch.Tensor, pairs, preserve, lamb: float, es: float, ps: float) -> torch.Tensor:
    """mat1 = λW + es Σ (W g) cᵀ + ps Σ (W p) pᵀ;  mat2 = λI + es Σ c cᵀ + ps Σ p pᵀ;  W ← mat1 mat2⁻¹."""
    w = w.to(F32)
    d = w.shape[1]
    mat1 = lamb * w.clone()
    mat2 = lamb * torch.eye(d, dtype=F32)
    for scale, rows in [(es, pr) for pr in pairs] + [(ps, (p, p)) for p in preserve]:
        context, target = rows
        context = context.to(F32)
        values = target.to(F32) @ w.T                      # layer(new_emb)
        n = context.shape[0]
        context_vector = context.reshape(n, d, 1)
        context_vector_t = context.reshape(n, 1, d)
        value_vector = values.reshape(n, values.shape[1], 1)
        mat1 += scale * (value_vector @ context_vector_t).sum(dim=0)
        mat2 += scale * (context_vector @ context_vector_t).sum(dim=0)
    return mat1 @ torch.inverse(mat2)


def derive(current: list[torch.Tensor], source: list[torch.Tensor], reg: float, emb: torch.Tensor):
    """RECE's closed-form adversarial embedding: (reg I + Σ W'ᵀW')⁻¹ (Σ W'ᵀ W0) applied to emb."""
    d = current[0].shape[1]
    m1 = reg * torch.eye(d, dtype=F32)
    m2 = torch.zeros(d, d, dtype=F32)
    for w, w0 in zip(current, source):
        w = w.to(F32)
        m1 += w.T @ w
        m2 += w.T @ w0.to(F32)
    return (torch.inverse(m1) @ m2 @ emb.to(F32).T).T
