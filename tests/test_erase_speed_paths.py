"""The fast paths of the edit math: the triangular gram and the low-rank K/V apply (kv_edit).

Each is held to the plain float64 computation it replaces, and kv_edit's low-rank path to the
independent oracle.
"""

from __future__ import annotations

import pytest
import torch

from rece_tool import erase
from rece_tool.erase import ConceptSetMath, EditScales, EraseTarget

import oracle

F64 = torch.float64
TOL = 1e-6  # the oracle tolerance (DESIGN §2.4)
# Round-to-nearest relative error of the result's own dtype: a 16-bit output may differ from
# the exact product by this much of each element, on top of the computation's TOL.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
                 torch.float64: 2.0 ** -53}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _emb(gen, d):
    return torch.randn(77, d, generator=gen, dtype=F64)


def _weights(gen, d, outs, dtype=F64):
    return [(torch.randn(o, d, generator=gen, dtype=F64) / d ** 0.5).to(dtype) for o in outs]


def _assert_is_rounded_product(out: torch.Tensor, weight: torch.Tensor, transform: torch.Tensor):
    """out is W·T (exact, float64) rounded to W's dtype, up to TOL of the largest element."""
    assert out.dtype == weight.dtype and out.device == weight.device and out.shape == weight.shape
    exact = weight.cpu().to(F64) @ transform.cpu().to(F64)
    err = (out.cpu().to(F64) - exact).abs()
    allowed = exact.abs() * UNIT_ROUNDOFF[weight.dtype] + TOL * exact.abs().max()
    assert bool((err <= allowed).all()), float((err - allowed).max())


def _uce_only(gen, d):
    """A real UCE-only transform: one concept, 4 tokens ("nudity"), guide " " → 75 erase rows."""
    target = EraseTarget("c", _emb(gen, d), 4, "g", _emb(gen, d), 2)
    spec = ConceptSetMath("uce", [target], [_emb(gen, d)], EditScales(0.5, 1.0, None),
                          EditScales(0.1, 1.0, 0.1), epochs=0, reg=0.1)
    source = _weights(gen, d, [96, 160, 96])
    return erase.concept_set_transform(erase.gram(source), torch.eye(d, dtype=F64), spec).transform


# --- gram ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, block", [(None, None), (50, 7), (120, 5), (1000, 24)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_gram_is_exactly_symmetric_and_equals_the_naive_sum(monkeypatch, dtype, rows, block):
    """Buffer flushes, layers taller than the buffer, blocks that do not divide d: all exact."""
    if rows is not None:
        monkeypatch.setattr(erase, "GRAM_ROWS", rows)
        monkeypatch.setattr(erase, "GRAM_BLOCK", block)
    gen = torch.Generator().manual_seed(10)
    weights = _weights(gen, 24, [16, 130, 48, 7, 50, 1], dtype)
    s = erase.gram(iter(weights))  # any iterable, consumed once (sanitize passes dict values)
    naive = sum(w.to(F64).T @ w.to(F64) for w in weights)
    assert torch.equal(s, s.T)
    assert float((s - naive).abs().max() / naive.abs().max()) <= 1e-12


def test_gram_at_a_real_width_spans_several_blocks():
    gen = torch.Generator().manual_seed(11)
    weights = _weights(gen, 600, [320, 640, 9000], torch.float16)  # a partial last block; 9000 > GRAM_ROWS
    s = erase.gram(weights)
    naive = sum(w.to(F64).T @ w.to(F64) for w in weights)
    assert torch.equal(s, s.T)
    assert float((s - naive).abs().max() / naive.abs().max()) <= 1e-12


def test_gram_refuses_no_weights_and_mixed_widths():
    with pytest.raises(ValueError, match="no weights"):
        erase.gram([])
    with pytest.raises(ValueError, match="width"):
        erase.gram([torch.ones(3, 4), torch.ones(3, 5)])


# --- kv_edit ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_kv_edit_of_a_uce_transform_takes_the_low_rank_path_and_equals_w_t(dtype):
    gen = torch.Generator().manual_seed(12)
    d = 256
    t = _uce_only(gen, d)
    edit = erase.kv_edit(t)
    assert edit.u is not None and edit.rank == 75  # exactly the erase rows: the rank of A − I
    assert edit.u.shape == (d, 75) and edit.v.shape == (75, d)
    for w in _weights(gen, d, [320, 64], dtype):
        _assert_is_rounded_product(edit.apply(w), w, t)


def test_kv_edit_low_rank_path_matches_the_oracle_through_a_rece_round():
    """gram → UCE + one RECE round → kv_edit(T).apply, against the per-layer float64 oracle."""
    gen = torch.Generator().manual_seed(13)
    d = 448
    source, twins = _weights(gen, d, [64, 128, 64]), _weights(gen, d, [32])
    e, g, empty = _emb(gen, d), _emb(gen, d), _emb(gen, d)
    spec = ConceptSetMath("n", [EraseTarget("c", e, 4, "g", g, 2)], [empty], EditScales(0.5, 1.0, None),
                          EditScales(0.1, 1.0, 0.1), epochs=1, reg=0.1)
    t = erase.concept_set_transform(erase.gram(source), torch.eye(d, dtype=F64), spec).transform
    edit = erase.kv_edit(t)
    assert edit.u is not None and edit.rank == 75 + 77  # UCE's erase rows + the round's 77
    want, want_twins = oracle.run(source, twins, [oracle.OracleSet(
        [oracle.OracleConcept(e, 4, g, 2)], [empty], epochs=1, reg=0.1)])
    for w, expected in zip(source + twins, want + want_twins):
        assert oracle.rel_max_error(edit.apply(w), expected) <= TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_kv_edit_of_a_full_rank_transform_falls_back_to_the_full_product(dtype):
    gen = torch.Generator().manual_seed(14)
    d = 64
    t = torch.eye(d, dtype=F64) + 0.1 * torch.randn(d, d, generator=gen, dtype=F64)
    edit = erase.kv_edit(t)
    assert edit.u is None and edit.v is None and edit.rank is None
    for w in _weights(gen, d, [48, 80], dtype):
        out = edit.apply(w)
        _assert_is_rounded_product(out, w, t)
        assert torch.equal(out, erase.apply_transform(w, t))  # the very same computation


def test_kv_edit_takes_low_rank_up_to_the_break_even_rank_only():
    gen = torch.Generator().manual_seed(15)
    d = 128
    most = int(erase.LOW_RANK_MAX_RATIO * d / 2)

    def low_rank(r):
        return torch.randn(d, r, generator=gen, dtype=F64) @ torch.randn(r, d, generator=gen, dtype=F64) / d

    assert erase.kv_edit(torch.eye(d, dtype=F64) + low_rank(most)).rank == most
    assert erase.kv_edit(torch.eye(d, dtype=F64) + low_rank(most + 1)).u is None


def test_kv_edit_of_the_identity_returns_the_weight_unchanged():
    edit = erase.kv_edit(torch.eye(32, dtype=F64))
    assert edit.rank == 0
    gen = torch.Generator().manual_seed(16)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        w = _weights(gen, 32, [40], dtype)[0]
        assert torch.equal(edit.apply(w), w)


def test_kv_edit_is_deterministic():
    gen = torch.Generator().manual_seed(17)
    t = _uce_only(gen, 256)
    w = _weights(gen, 256, [128], torch.float16)[0]
    a, b = erase.kv_edit(t), erase.kv_edit(t.clone())
    assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
    assert a.apply(w).view(torch.int16).equal(b.apply(w).view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
def test_kv_edit_applies_on_the_weights_device(device):
    gen = torch.Generator().manual_seed(18)
    t = _uce_only(gen, 256)
    edit = erase.kv_edit(t)
    for dtype in (torch.float16, torch.float32):
        w = _weights(gen, 256, [64], dtype)[0].to(device)
        _assert_is_rounded_product(edit.apply(w), w, t)


def test_kv_edit_of_a_non_finite_transform_applies_it_in_full():
    t = torch.eye(16, dtype=F64)
    t[3, 5] = float("nan")
    edit = erase.kv_edit(t)
    assert edit.u is None  # never a silent rank-0 "no change"
    assert torch.isnan(edit.apply(torch.ones(2, 16))[:, 5]).all()
