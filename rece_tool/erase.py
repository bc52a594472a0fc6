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

import math
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


# Gram of the K/V weights (measured on 2 cores, SD1.5 and SDXL shapes): column blocks of this
# width keep each upper block row a long, efficient product while computing only ~(1 + b/d)/2
# of the full one; layers are gathered into this many float64 rows per pass, so the products
# have a long inner dimension while memory stays one buffer, not all layers at once.
GRAM_BLOCK = 192
GRAM_ROWS = 4096


def gram(weights) -> torch.Tensor:
    """S = Σ_l W_lᵀ W_l in float64, exactly symmetric.

    S is symmetric, so only its upper block rows are computed, then mirrored.
    """
    s = buffer = None
    fill = 0
    for w in weights:
        if s is None:
            d = w.shape[1]
            s = torch.zeros(d, d, dtype=F64, device=w.device)
            buffer = torch.empty(GRAM_ROWS, d, dtype=F64, device=w.device)
        elif w.shape[1] != s.shape[0]:
            raise ValueError(f"weight width {w.shape[1]} differs from the first weight's {s.shape[0]}")
        for part in w.split(GRAM_ROWS):
            if fill + part.shape[0] > GRAM_ROWS:
                _add_upper_gram(s, buffer[:fill])
                fill = 0
            buffer[fill:fill + part.shape[0]].copy_(part)
            fill += part.shape[0]
    if s is None:
        raise ValueError("no weights")
    if fill:
        _add_upper_gram(s, buffer[:fill])
    # Only the upper triangle holds the sum (diagonal blocks also wrote below it): mirror it.
    return torch.triu(s) + torch.triu(s, 1).T


def _add_upper_gram(s: torch.Tensor, rows: torch.Tensor) -> None:
    for i in range(0, s.shape[0], GRAM_BLOCK):
        s[i:i + GRAM_BLOCK, i:].addmm_(rows[:, i:i + GRAM_BLOCK].T, rows[:, i:])


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


def _solve_positive_definite(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """matrix⁻¹ · rhs for a symmetric matrix that passed _check_conditioned.

    Cholesky costs half an LU; LU remains for the rounding-level case where a matrix that is
    positive definite in exact arithmetic fails to factor.
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.solve(matrix, rhs)


def edit_factors(erase_rows: torch.Tensor, guide_rows: torch.Tensor, keep_gram: torch.Tensor,
                 scales: EditScales, preserve_count: int, setting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A − I as the pair (left, right), A = I + left·right, of the edit

        A = (λI + es·GᵀC + ps·PᵀP)(λI + es·CᵀC + ps·PᵀP)⁻¹.

    Numerator and normal matrix B share λI and the preserve term, so A − I = es·(G − C)ᵀ·C·B⁻¹:
    rank ≤ the erase rows, and only as many right-hand sides as rows need solving.
    """
    ps = scales.preserve_scale
    if ps is None:
        ps = max(0.1, 1.0 / max(preserve_count, 1))
    spread = scales.erase_scale * (erase_rows.T @ erase_rows) + ps * keep_gram
    _check_conditioned(scales.lamb, spread, "the edit's normal matrix", f"{setting}.lamb")
    normal = spread
    normal.diagonal().add_(scales.lamb)  # λI + spread without a d×d identity
    # C·B⁻¹ = (B⁻¹·Cᵀ)ᵀ, B symmetric — no explicit inverse.
    right = scales.erase_scale * _solve_positive_definite(normal, erase_rows.T).T
    return (guide_rows - erase_rows).T, right


def attack_rows(source_gram: torch.Tensor, transform: torch.Tensor, reg: float, rows: torch.Tensor,
                setting: str = "reg") -> torch.Tensor:
    """The closed-form attack `c' = D e` on each row e: D = M1⁻¹ M2, M1 = reg·I + Tᵀ S T, M2 = Tᵀ S.

    Applied to the rows rather than formed: M1 is solved for their few right-hand sides only.
    """
    m2 = transform.T @ source_gram
    spread = m2 @ transform
    spread = 0.5 * (spread + spread.T)  # symmetric by construction; remove rounding asymmetry
    _check_conditioned(reg, spread, "the RECE derivation matrix", setting)
    m1 = spread
    m1.diagonal().add_(reg)
    return _solve_positive_definite(m1, m2 @ rows.to(F64).T).T


def concept_set_transform(source_gram: torch.Tensor, start: torch.Tensor,
                          spec: ConceptSetMath) -> SetResult:
    """One concept set: the UCE pass, then `epochs` RECE rounds, composed onto `start`."""
    if not spec.targets:
        raise ValueError(f"concept set {spec.name!r} has no erase targets")
    d = source_gram.shape[0]
    keep = preserve_gram(spec.preserve, d)

    def compose(t: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        left, right = factors  # T·A = T + (T·left)·right: O(d²·rows), not a d×d product
        return torch.addmm(t, t @ left, right)

    pairs = [uce_rows(target) for target in spec.targets]
    t = compose(start, edit_factors(torch.cat([c for c, _ in pairs]), torch.cat([g for _, g in pairs]),
                                    keep, spec.uce, len(spec.preserve), "uce"))
    result = SetResult(t, [t])

    guides = torch.cat([tg.guide_embedding.to(F64) for tg in spec.targets])
    concepts = torch.cat([tg.embedding.to(F64) for tg in spec.targets])
    keep_repeated = keep * len(spec.targets)  # the reference adds the preserve list once per concept
    for _ in range(spec.epochs):
        attacked = attack_rows(source_gram, t, spec.reg, concepts)
        t = compose(t, edit_factors(attacked, guides, keep_repeated, spec.rece, len(spec.preserve), "rece"))
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


@dataclass(frozen=True, eq=False)  # tensors have no truth value; identity is what matters
class KVEdit:
    """What applying T to one K/V weight needs: T, and T − I = u·v when that is cheaper.

    T − I has the rank of the edit rows (each factor A − I has rank ≤ its erase rows), far below
    d for the usual sets, so W + (W·u)·v costs ~2r/d of the full W·T.
    """

    transform: torch.Tensor          # T, d×d float64
    u: torch.Tensor | None           # [d, r]; None: apply T in full
    v: torch.Tensor | None           # [r, d], orthonormal rows spanning the row space of T − I
    _cast: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rank(self) -> int | None:
        return None if self.v is None else self.v.shape[0]

    def _on(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # Cast once per device and precision, not once per tensor: T alone is 16 MB at d = 2048.
        key = (name, device, dtype)
        if key not in self._cast:
            self._cast[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._cast[key]

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W · T, computed and returned as apply_transform does (same precision, dtype, device)."""
        compute = APPLY_DTYPE.get(weight.dtype, F64)
        w = weight.to(compute)
        if self.u is None:
            return (w @ self._on("transform", weight.device, compute)).to(weight.dtype)
        u = self._on("u", weight.device, compute)
        v = self._on("v", weight.device, compute)
        return torch.addmm(w, w @ u, v).to(weight.dtype)


# The low-rank factors are searched in batches of this many random samples of the row space.
RANGE_BATCH = 64
# A sample direction counts when its singular value exceeds this fraction of ‖T − I‖_F·√batch
# (the size of a batch of samples): far above float64 rounding, far below any real direction.
RANGE_TOLERANCE = 1e-13
# u·v must reproduce T − I to this fraction of its largest element, or T is applied in full.
FACTOR_TOLERANCE = 1e-12
# Low rank only while 2r/d stays below this. Measured on 2 cores (fp16 weights, d = 768 and
# 2048): the two thin products cost as much as the full one near 2r/d ≈ 0.9; below 0.75 they
# save enough to also pay for kv_edit's own search at SD1.5's 32 matrices.
LOW_RANK_MAX_RATIO = 0.75


def kv_edit(transform: torch.Tensor) -> KVEdit:
    """T with the factors of T − I when its rank makes the low-rank product worth it.

    The row space of M = T − I comes from an adaptive randomized range finder (seeded: reruns
    give identical bytes), then u = M·vᵀ is checked elementwise against M in float64.
    """
    t = transform.to(F64)
    d = t.shape[0]
    m = t.clone()
    m.diagonal().sub_(1.0)
    largest = _max_abs(m)
    if not math.isfinite(largest):  # nothing to factor; the full product carries it through
        return KVEdit(t, None, None)
    v = _row_space(m, int(LOW_RANK_MAX_RATIO * d / 2))
    if v is None:
        return KVEdit(t, None, None)
    u = m @ v.T
    if _max_abs(m.addmm_(u, v, alpha=-1)) > FACTOR_TOLERANCE * largest:  # m is not needed after
        return KVEdit(t, None, None)
    return KVEdit(t, u, v)


def _max_abs(x: torch.Tensor) -> float:
    low, high = torch.aminmax(x)  # no |x| temporary: a tenth of the time at d = 2048
    return float(torch.maximum(-low, high))


def _row_space(m: torch.Tensor, max_rank: int) -> torch.Tensor | None:
    """Orthonormal rows spanning the row space of m, or None past max_rank rows."""
    d = m.shape[1]
    generator = torch.Generator().manual_seed(0)
    floor = RANGE_TOLERANCE * float(torch.linalg.norm(m)) * RANGE_BATCH ** 0.5
    basis = m.new_zeros(0, d)
    while True:
        # Drawn in float32 (six times faster); the sketch needs no more than random directions.
        omega = torch.randn(RANGE_BATCH, m.shape[0], generator=generator).to(device=m.device, dtype=F64)
        sample = omega @ m
        for _ in range(2):  # one projection loses orthogonality to rounding; twice is enough
            sample -= (sample @ basis.T) @ basis
        # The SVD of the sample through its QR: the same singular values, a third of the time.
        q, r = torch.linalg.qr(sample.T)
        _, sigma, rotation = torch.linalg.svd(r.T)
        new = (rotation @ q.T)[sigma > floor]
        basis = torch.cat([basis, new])
        if basis.shape[0] > max_rank:
            return None
        # Random samples of what is left span all of it unless it has more directions than
        # samples: a batch that comes back short has found the whole row space.
        if new.shape[0] < sample.shape[0]:
            break
    # The weakest directions pick up rounding noise that leaves them slightly oblique to the
    # rest (~1e-11): re-orthonormalise. Already near orthonormal, so Cholesky-QR is as accurate
    # as Householder QR here, at a fraction of its cost.
    factor, info = torch.linalg.cholesky_ex(basis @ basis.T)
    if int(info) != 0:
        return None
    return torch.linalg.solve_triangular(factor, basis, upper=False)


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
    attack = attack_rows(source_gram, transform, reg, e)
    return 1.0 - (response_energy(attack @ transform.T - e, source_gram)
                  / max(response_energy(e, source_gram), 1e-300))


def preserve_drift(embedding: torch.Tensor, transform: torch.Tensor, source_gram: torch.Tensor) -> float:
    e = embedding.to(F64)
    return (response_energy(e @ transform.T - e, source_gram)
            / max(response_energy(e, source_gram), 1e-300))
