"""An independent float64 implementation of DESIGN.md §2.1–2.2, written from the equations.

Per layer, explicit sums over rows, explicit inverses; nothing factored, nothing shared with
`rece_tool.erase`. Slow by design: it is the reference the tool is held to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass
class OracleConcept:
    embedding: torch.Tensor        # [77, d]
    tokens: int                    # BOS + word tokens + EOS
    guide_embedding: torch.Tensor  # [77, d]
    guide_tokens: int


@dataclass
class OracleSet:
    concepts: list[OracleConcept]
    preserve: list[torch.Tensor]   # [77, d] each, the empty prompt first
    epochs: int
    reg: float
    uce: tuple[float, float, float | None] = (0.5, 1.0, None)   # lamb, erase scale, preserve scale
    rece: tuple[float, float, float] = (0.1, 1.0, 0.1)


def edit_layer(w, pairs, preserve, lamb, es, ps):
    """W_new = (λW + es Σ (W g) cᵀ + ps Σ (W p) pᵀ)(λI + es Σ c cᵀ + ps Σ p pᵀ)⁻¹, row by row."""
    w = w.to(F64)
    d = w.shape[1]
    num = lamb * w.clone()
    den = lamb * torch.eye(d, dtype=F64)
    for c_rows, g_rows in pairs:
        for c, g in zip(c_rows.to(F64), g_rows.to(F64)):
            num += es * torch.outer(w @ g, c)
            den += es * torch.outer(c, c)
    for p_rows in preserve:
        for p in p_rows.to(F64):
            num += ps * torch.outer(w @ p, p)
            den += ps * torch.outer(p, p)
    return num @ torch.linalg.inv(den)


def uce_pairs(concepts):
    pairs = []
    for c in concepts:
        i_e, i_g = c.tokens - 2, c.guide_tokens - 2
        far = max(i_e, i_g)
        pairs.append((c.embedding[i_e:77 - (far - i_e)], c.guide_embedding[i_g:77 - (far - i_g)]))
    return pairs


def run_set(source, current, twins, spec: OracleSet):
    """One concept set on `current` (the layers in L) and `twins` (EMA copies, edited alike)."""
    lamb, es, ps = spec.uce
    if ps is None:
        ps = max(0.1, 1.0 / len(spec.preserve))
    pairs = uce_pairs(spec.concepts)
    current = [edit_layer(w, pairs, spec.preserve, lamb, es, ps) for w in current]
    twins = [edit_layer(w, pairs, spec.preserve, lamb, es, ps) for w in twins]
    lamb, es, ps = spec.rece
    for _ in range(spec.epochs):
        d = source[0].shape[1]
        m1 = spec.reg * torch.eye(d, dtype=F64)
        m2 = torch.zeros(d, d, dtype=F64)
        for w_now, w_src in zip(current, source):
            m1 += w_now.T @ w_now
            m2 += w_now.T @ w_src.to(F64)
        mapping = torch.linalg.inv(m1) @ m2
        pairs = [(c.embedding.to(F64) @ mapping.T, c.guide_embedding) for c in spec.concepts]
        preserve = spec.preserve * len(spec.concepts)
        current = [edit_layer(w, pairs, preserve, lamb, es, ps) for w in current]
        twins = [edit_layer(w, pairs, preserve, lamb, es, ps) for w in twins]
    return current, twins


def run(source, twins, sets: list[OracleSet]):
    """Every set in order, each on the previous output; `source` stays W0 for the derivation."""
    source = [w.to(F64) for w in source]
    current, twins = list(source), [w.to(F64) for w in twins]
    for spec in sets:
        current, twins = run_set(source, current, twins, spec)
    return current, twins


def rel_max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.to(F64), expected.to(F64)
    return float((a - e).abs().max() / e.abs().max())
