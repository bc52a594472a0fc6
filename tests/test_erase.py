"""The edit math against the independent float64 oracle, fed the same embeddings (≤ 1e-6)."""

from __future__ import annotations

import pytest
import torch

from rece_tool import erase
from rece_tool.erase import ConceptSetMath, EditScales, EraseTarget
from rece_tool.errors import NumericError

import oracle

D = 24
TOL = 1e-6


def _weights(gen, count=6):
    return [torch.randn(out, D, generator=gen, dtype=torch.float64) / D ** 0.5
            for out in [16, 32, 16, 48, 32, 16][:count]]


def _emb(gen):
    return torch.randn(77, D, generator=gen, dtype=torch.float64)


def _tool(source, twins, sets):
    s = erase.gram(source)
    t = torch.eye(D, dtype=torch.float64)
    for spec in sets:
        t = erase.concept_set_transform(s, t, spec).transform
    edit = erase.kv_edit(t)
    return [edit.apply(w) for w in source], [edit.apply(w) for w in twins]


def _pair(gen, tokens, guide_tokens, name="c", guide="g"):
    e, g = _emb(gen), _emb(gen)
    return (EraseTarget(name, e, tokens, guide, g, guide_tokens),
            oracle.OracleConcept(e, tokens, g, guide_tokens))


def _check(source, twins, tool_sets, oracle_sets):
    got, got_twins = _tool(source, twins, tool_sets)
    want, want_twins = oracle.run(source, twins, oracle_sets)
    for a, b in zip(got + got_twins, want + want_twins):
        assert oracle.rel_max_error(a, b) <= TOL


def test_nudity_preset_shape_matches_oracle():
    gen = torch.Generator().manual_seed(1)
    source, twins = _weights(gen), _weights(gen, 2)
    target, ref = _pair(gen, tokens=4, guide_tokens=2)  # "nudity" = 2 word tokens, guide " "
    empty = _emb(gen)
    spec = ConceptSetMath("nudity", [target], [empty], EditScales(0.5, 1.0, None),
                          EditScales(0.1, 1.0, 0.1), epochs=3, reg=0.1)
    _check(source, twins, [spec], [oracle.OracleSet([ref], [empty], epochs=3, reg=0.1)])


def test_multi_concept_set_with_own_guides_and_preserve_matches_oracle():
    gen = torch.Generator().manual_seed(2)
    source = _weights(gen)
    pairs = [_pair(gen, 3, 2), _pair(gen, 6, 4), _pair(gen, 5, 7)]  # guide longer than erase too
    preserve = [_emb(gen) for _ in range(4)]
    uce, rece = EditScales(0.7, 1.3, 0.2), EditScales(0.3, 0.9, 0.05)
    spec = ConceptSetMath("custom", [p[0] for p in pairs], preserve, uce, rece, epochs=2, reg=0.01)
    ref = oracle.OracleSet([p[1] for p in pairs], preserve, epochs=2, reg=0.01,
                           uce=(0.7, 1.3, 0.2), rece=(0.3, 0.9, 0.05))
    _check(source, [], [spec], [ref])


def test_two_sets_in_sequence_match_oracle():
    gen = torch.Generator().manual_seed(3)
    source, twins = _weights(gen), _weights(gen, 1)
    a, a_ref = _pair(gen, 4, 2)
    b1, b1_ref = _pair(gen, 5, 3)
    b2, b2_ref = _pair(gen, 3, 3)
    pa, pb = [_emb(gen)], [_emb(gen), _emb(gen), _emb(gen)]
    first = ConceptSetMath("a", [a], pa, EditScales(0.5, 1.0, None), EditScales(0.1, 1.0, 0.1), 3, 0.1)
    second = ConceptSetMath("b", [b1, b2], pb, EditScales(0.5, 1.0, None), EditScales(0.1, 1.0, 0.1), 1, 1e-3)
    _check(source, twins, [first, second],
           [oracle.OracleSet([a_ref], pa, 3, 0.1), oracle.OracleSet([b1_ref, b2_ref], pb, 1, 1e-3)])


def test_plain_uce_with_zero_epochs_matches_oracle():
    gen = torch.Generator().manual_seed(4)
    source = _weights(gen)
    t, ref = _pair(gen, 4, 2)
    p = [_emb(gen), _emb(gen)]
    spec = ConceptSetMath("uce", [t], p, EditScales(0.5, 1.0, None), EditScales(0.1, 1.0, 0.1), 0, 0.1)
    _check(source, [], [spec], [oracle.OracleSet([ref], p, 0, 0.1)])


def test_apply_keeps_dtype_and_device():
    t = torch.eye(D, dtype=torch.float64) * 2
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.ones(4, D, dtype=dtype)
        out = erase.apply_transform(w, t)
        assert out.dtype == dtype and torch.all(out == 2)


def test_audit_metrics_match_their_definitions_on_weights():
    """erase_residual etc. via S and T equal the §5 definitions computed on explicit weights."""
    gen = torch.Generator().manual_seed(5)
    source = _weights(gen)
    target, _ = _pair(gen, 4, 2)
    p = _emb(gen)
    spec = ConceptSetMath("n", [target], [p], EditScales(0.5, 1.0, None), EditScales(0.1, 1.0, 0.1), 2, 0.1)
    s = erase.gram(source)
    t = erase.concept_set_transform(s, torch.eye(D, dtype=torch.float64), spec).transform
    new = [w @ t for w in source]

    def r(ws, x):
        return torch.cat([(x @ w.T).flatten() for w in ws])

    c, g = erase.uce_rows(target)
    want = (r(new, c) - r(source, g)).norm() ** 2 / (r(source, c) - r(source, g)).norm() ** 2
    assert erase.erase_residual(target, t, s) == pytest.approx(float(want), rel=1e-9)
    drift = (r(new, p) - r(source, p)).norm() ** 2 / r(source, p).norm() ** 2
    assert erase.preserve_drift(p, t, s) == pytest.approx(float(drift), rel=1e-9)
    m1 = 0.1 * torch.eye(D, dtype=torch.float64) + sum(w.T @ w for w in new)
    m2 = sum(wn.T @ w0 for wn, w0 in zip(new, source))
    attack = target.embedding @ (torch.linalg.inv(m1) @ m2).T
    e = target.embedding
    rec = 1 - (r(new, attack) - r(source, e)).norm() ** 2 / r(source, e).norm() ** 2
    assert erase.attack_recovery(target, t, s, 0.1) == pytest.approx(float(rec), rel=1e-7)
    assert 0 <= erase.erase_residual(target, t, s) < 1


def test_ill_conditioned_solve_is_refused_naming_the_setting():
    gen = torch.Generator().manual_seed(6)
    source = _weights(gen)
    rank_one = torch.ones(77, D, dtype=torch.float64)  # one direction: C^T C is singular
    target = EraseTarget("c", rank_one, 4, "g", _emb(gen), 2)
    spec = ConceptSetMath("n", [target], [torch.zeros(77, D, dtype=torch.float64)],
                          EditScales(1e-300, 1.0, 0.0), EditScales(0.1, 1.0, 0.1), 0, 0.1)
    with pytest.raises(NumericError, match="uce.lamb"):
        erase.concept_set_transform(erase.gram(source), torch.eye(D, dtype=torch.float64), spec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(dtype, bad):
    w = torch.zeros(1000, dtype=dtype)
    w[7] = bad
    with pytest.raises(NumericError, match="non-finite"):
        erase.check_finite(w, "w")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_huge_finite_weights_whose_sum_overflows_are_accepted(dtype):
    erase.check_finite(torch.full((100,), 3e38, dtype=dtype), "w")
