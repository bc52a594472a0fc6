"""The RECE edit as pure tensor math (DESIGN.md §2). No files, no model objects.

Every UCE/RECE edit of a cross-attention key/value projection `W` has the form

    W_new = (λ·W + es·Σ W g cᵀ + ps·Σ W p pᵀ) · (λ·I + es·Σ c cᵀ + ps·Σ p pᵀ)⁻¹  =  W · A

with one `d×d` matrix `A` shared by every layer, because each target `W g` is the same layer's
projection of the guide. A whole run is therefore `W_final = W0 · T`, `T` a product of such `A`s,
and everything the RECE rounds need of the weights collapses into the source Gram matrix
`S = Σ_l W0_lᵀ W0_l`: the current weights are `W0 T`, so `Σ W'ᵀW' = Tᵀ S T` and
`Σ W'ᵀ W0 = Tᵀ S`. All of it is computed in float64 and costs O(d³), independent of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import NumericError

F64 = torch.float64
# Past this condition number a float64 solve loses more than ~4 of its 16 digits: refuse
# rather than write weights nobody can trust.
MAX_CONDITION = 1e12
TOKENS = 77


@dataclass(frozen=True)
class EditScales:
    lamb: float
    erase_scale: float
    preserve_scale: float | None  # None: UCE's default max(0.1, 1/len(preserve))


@dataclass(frozen=True)
class EraseTarget:
    """One erase concept with its guide: full `[77, d]` embeddings and token counts (BOS/EOS included)."""

    concept: str
    embedding: torch.Tensor
    tokens: int
    guide: str
    guide_embedding: torch.Tensor
    guide_tokens: int


@dataclass(frozen=True)
class ConceptSetMath:
    """What the math needs of a resolved concept set."""

    name: str
    targets: list[EraseTarget]
    preserve: list[torch.Tensor]  # `[77, d]` each; the empty prompt first
    uce: EditScales
    rece: EditScales
    epochs: int
    reg: float


@dataclass
class SetResult:
    transform: torch.Tensor                 # T after this set (cumulative over earlier sets)
    rounds: list[torch.Tensor] = field(default_factory=list)  # T after the UCE pass, then each round


def gram(weights) -> torch.Tensor:
    """S = Σ_l W_lᵀ W_l in float64."""
    s = None
    for w in weights:
        w64 = w.to(F64)
        s = w64.T @ w64 if s is None else s.addmm_(w64.T, w64)
    if s is None:
        raise ValueError("no weights")
    return s


def uce_rows(target: EraseTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows from the last word token to the end, the erase and guide aligned to equal length."""
    i_e, i_g = target.tokens - 2, target.guide_tokens - 2
    far = max(i_e, i_g)
    c = target.embedding[i_e:TOKENS - (far - i_e)]
    g = target.guide_embedding[i_g:TOKENS - (far - i_g)]
    return c.to(F64), g.to(F64)


def preserve_gram(preserve: list[torch.Tensor], d: int) -> torch.Tensor:
    if not preserve:
        return torch.zeros(d, d, dtype=F64)
    rows = torch.cat([e.to(F64) for e in preserve])  # one large product beats many small ones
    return rows.T @ rows


def _check_conditioned(shift: float, psd: torch.Tensor, what: str, setting: str) -> None:
    """Refuse `shift·I + psd` (psd positive semi-definite) if its condition number is too large.

    Its eigenvalues lie in [shift, shift + trace(psd)], so the cheap bound 1 + trace/shift
    settles almost every case; only when it is inconclusive are the eigenvalues computed.
    """
    if shift > 0 and 1 + float(torch.trace(psd)) / shift <= MAX_CONDITION:
        return
    eig = torch.linalg.eigvalsh(shift * torch.eye(psd.shape[0], dtype=F64) + psd)
    lo, hi = eig[0].item(), eig[-1].item()
    if not (lo > 0 and hi / lo <= MAX_CONDITION):
        cond = "infinite" if lo <= 0 else f"{hi / lo:.3g}"
        raise NumericError(f"{what} is ill-conditioned (condition number {cond} > {MAX_CONDITION:g})",
                           field=setting, hint=f"raise {setting}")


def edit_transform(cross: torch.Tensor, erase_gram: torch.Tensor, keep_gram: torch.Tensor,
                   scales: EditScales, preserve_count: int, setting: str) -> torch.Tensor:
    """A = (λI + es·GᵀC + ps·PᵀP)(λI + es·CᵀC + ps·PᵀP)⁻¹ from the Gram blocks."""
    d = cross.shape[0]
    ps = scales.preserve_scale
    if ps is None:
        ps = max(0.1, 1.0 / max(preserve_count, 1))
    eye = torch.eye(d, dtype=F64)
    lhs = scales.lamb * eye + scales.erase_scale * cross + ps * keep_gram
    spread = scales.erase_scale * erase_gram + ps * keep_gram
    _check_conditioned(scales.lamb, spread, "the edit's normal matrix", f"{setting}.lamb")
    rhs = scales.lamb * eye + spread
    # X · B⁻¹ = solve(Bᵀ, Xᵀ)ᵀ — no explicit inverse.
    return torch.linalg.solve(rhs.T, lhs.T).T


def derive_embedding_map(source_gram: torch.Tensor, transform: torch.Tensor, reg: float,
                         setting: str = "reg") -> torch.Tensor:
    """D = M1⁻¹ M2 with M1 = reg·I + Tᵀ S T, M2 = Tᵀ S: the closed-form attack `c' = D e`."""
    d = source_gram.shape[0]
    m2 = transform.T @ source_gram
    spread = m2 @ transform
    spread = 0.5 * (spread + spread.T)  # symmetric by construction; remove rounding asymmetry
    _check_conditioned(reg, spread, "the RECE derivation matrix", setting)
    return torch.linalg.solve(reg * torch.eye(d, dtype=F64) + spread, m2)


def concept_set_transform(source_gram: torch.Tensor, start: torch.Tensor,
                          spec: ConceptSetMath) -> SetResult:
    """One concept set: the UCE pass, then `epochs` RECE rounds, composed onto `start`."""
    d = source_gram.shape[0]
    keep = preserve_gram(spec.preserve, d)
    cross = torch.zeros(d, d, dtype=F64)
    erase = torch.zeros(d, d, dtype=F64)
    for target in spec.targets:
        c, g = uce_rows(target)
        cross.addmm_(g.T, c)
        erase.addmm_(c.T, c)
    t = start @ edit_transform(cross, erase, keep, spec.uce, len(spec.preserve), "uce")
    result = SetResult(t, [t])

    guides = [tg.guide_embedding.to(F64) for tg in spec.targets]
    concepts = [tg.embedding.to(F64) for tg in spec.targets]
    keep_repeated = keep * len(spec.targets)  # the reference adds the preserve list once per concept
    for _ in range(spec.epochs):
        derive = derive_embedding_map(source_gram, t, spec.reg)
        cross.zero_()
        erase.zero_()
        for e, g in zip(concepts, guides):
            c = e @ derive.T
            cross.addmm_(g.T, c)
            erase.addmm_(c.T, c)
        t = t @ edit_transform(cross, erase, keep_repeated, spec.rece,
                               len(spec.preserve), "rece")
        result.rounds.append(t)
    result.transform = t
    return result


# The precision W · T is computed in, by the weight's dtype: float32 already carries 13 more
# bits than a 16-bit result keeps; wider weights get float64.
APPLY_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def apply_transform(weight: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """W · T, returned in the weight's own dtype and device."""
    compute = APPLY_DTYPE.get(weight.dtype, F64)
    t = transform.to(device=weight.device, dtype=compute)
    return (weight.to(compute) @ t).to(weight.dtype)


def check_finite(tensor: torch.Tensor, what: str) -> None:
    # NaN and ±Inf propagate through a sum, so a finite sum proves every element finite; the
    # sum is several times cheaper than an elementwise test on 16-bit tensors. A non-finite sum
    # may only be an overflow, so it is confirmed elementwise before refusing.
    accumulate = torch.float32 if tensor.element_size() <= 2 else F64
    if torch.isfinite(tensor.sum(dtype=accumulate)):
        return
    if not torch.isfinite(tensor).all():
        raise NumericError(f"{what} holds non-finite values (NaN or Inf)",
                           hint="the checkpoint is corrupt; re-export it")


# --- weight-space audit quantities (DESIGN.md §5), all in terms of S and T -------------------

def response_energy(rows: torch.Tensor, source_gram: torch.Tensor) -> float:
    """‖R(W0, X)‖² = Σ_l ‖X W0_lᵀ‖² = tr(X S Xᵀ)."""
    x = rows.to(F64)
    return float(((x @ source_gram) * x).sum())


def erase_residual(target: EraseTarget, transform: torch.Tensor, source_gram: torch.Tensor) -> float:
    c, g = uce_rows(target)
    return (response_energy(c @ transform.T - g, source_gram)
            / max(response_energy(c - g, source_gram), 1e-300))


def attack_recovery(target: EraseTarget, transform: torch.Tensor, source_gram: torch.Tensor,
                    reg: float) -> float:
    e = target.embedding.to(F64)
    attack = e @ derive_embedding_map(source_gram, transform, reg).T
    return 1.0 - (response_energy(attack @ transform.T - e, source_gram)
                  / max(response_energy(e, source_gram), 1e-300))


def preserve_drift(embedding: torch.Tensor, transform: torch.Tensor, source_gram: torch.Tensor) -> float:
    e = embedding.to(F64)
    return (response_energy(e @ transform.T - e, source_gram)
            / max(response_energy(e, source_gram), 1e-300))
