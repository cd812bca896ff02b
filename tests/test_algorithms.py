"""Algorithm registry, shape rules, consistency checks, scale conventions and the SVD approximation (no torch)."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

from lorafmt.algorithms import BUILTIN_ALGORITHMS, algorithm_for_params, get_algorithm
from lorafmt.algorithms.lokr import factorization
from lorafmt.algorithms.svd import approximate_as_lora, low_rank
from lorafmt.errors import UnsupportedFeatureError
from lorafmt.schema import Module, TensorRef

RNG = np.random.default_rng(0)


def _m(algorithm: str, alpha=None, **shapes) -> Module:
    tensors = {}
    for role, shape in shapes.items():
        if role == "on_input":
            tensors[role] = TensorRef.from_array(role, np.asarray(shape), "I64")
        else:
            tensors[role] = TensorRef.from_array(role, RNG.standard_normal(shape).astype(np.float32))
    return Module(path="unet.x", algorithm=algorithm, tensors=tensors, alpha=alpha)


@pytest.mark.parametrize("name", ["loha", "lokr", "full", "norm", "ia3", "oft", "boft", "dora", "svd", "_base"])
def test_docstring_examples(name):
    mod = importlib.import_module(f"lorafmt.algorithms.{name}")
    failures, _ = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert failures == 0


def test_registry_has_every_schema_algorithm():
    from lorafmt.schema import ALGORITHMS

    assert set(BUILTIN_ALGORITHMS) == set(ALGORITHMS)
    for name in ALGORITHMS:
        assert get_algorithm(name).name == name


@pytest.mark.parametrize(
    ("params", "algo"),
    [
        ({"lora_down.weight", "lora_up.weight", "lora_mid.weight"}, "lora"),
        ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}, "loha"),
        ({"lokr_w1", "lokr_w2"}, "lokr"),
        ({"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}, "lokr"),
        ({"diff", "diff_b"}, "full"),
        ({"w_norm", "b_norm"}, "norm"),
        ({"weight", "on_input"}, "ia3"),
        ({"oft_blocks", "rescale"}, "oft"),
        ({"oft_diag"}, "oft"),
    ],
)
def test_detection_by_parameter_names(params, algo):
    assert algorithm_for_params(params).name == algo


def test_boft_is_classified_by_block_rank():
    oft = get_algorithm("oft")
    assert oft.classify({"blocks": TensorRef(key="b", dtype="F32", shape=(4, 2, 2))}) == "oft"
    assert oft.classify({"blocks": TensorRef(key="b", dtype="F32", shape=(2, 4, 2, 2))}) == "boft"


def test_rank_rules_and_scales():
    loha = _m("loha", alpha=2.0, w1_a=(6, 4), w1_b=(4, 5), w2_a=(6, 4), w2_b=(4, 5))
    assert loha.rank == 4 and loha.scale == 0.5
    lokr_w2 = _m("lokr", alpha=1.0, w1=(2, 2), w2_a=(3, 2), w2_b=(2, 4))
    assert lokr_w2.rank == 2 and lokr_w2.scale == 0.5
    lokr_w1 = _m("lokr", alpha=1.0, w1_a=(2, 1), w1_b=(1, 2), w2=(3, 4))
    assert lokr_w1.rank == 1 and lokr_w1.scale == 1.0
    full_lokr = _m("lokr", alpha=123.0, w1=(2, 2), w2=(3, 4))
    assert full_lokr.rank is None and full_lokr.scale == 1.0  # full-matrix rule: alpha ignored
    for algo, shapes in [("full", {"diff": (3, 4)}), ("norm", {"w_norm": (4,)}), ("oft", {"blocks": (2, 2, 2)})]:
        m = _m(algo, alpha=0.5, **shapes)
        assert m.rank is None and m.scale == 1.0


def test_weight_shapes():
    assert get_algorithm("loha").weight_shape(_m("loha", w1_a=(6, 4), w1_b=(4, 72), w2_a=(6, 4), w2_b=(4, 72))) == (6, 72)
    assert get_algorithm("loha").weight_shape(
        _m("loha", w1_a=(4, 16), w1_b=(4, 8), w2_a=(4, 16), w2_b=(4, 8), t1=(4, 4, 3, 3), t2=(4, 4, 3, 3))
    ) == (16, 8, 3, 3)
    assert get_algorithm("lokr").weight_shape(_m("lokr", w1=(4, 2), w2=(4, 4, 3, 3))) == (16, 8, 3, 3)
    assert get_algorithm("lokr").weight_shape(_m("lokr", w1=(4, 4), w2_a=(2, 8), w2_b=(2, 4), t2=(2, 2, 3, 3))) == (32, 16, 3, 3)
    assert get_algorithm("full").weight_shape(_m("full", diff=(5, 3, 1, 1))) == (5, 3, 1, 1)
    assert get_algorithm("ia3").weight_shape(_m("ia3", weight=(5,), on_input=0)) is None


def test_lokr_delta_is_kron_times_scale():
    m = _m("lokr", alpha=1.0, w1=(2, 3), w2_a=(4, 2), w2_b=(2, 5))
    t = {k: v.float32() for k, v in m.tensors.items()}
    expected = np.kron(t["w1"], t["w2_a"] @ t["w2_b"]) * 0.5
    np.testing.assert_allclose(get_algorithm("lokr").delta(m), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("module", "fragment"),
    [
        (lambda: _m("loha", w1_a=(6, 4), w1_b=(3, 5), w2_a=(6, 4), w2_b=(4, 5)), "do not fit"),
        (lambda: _m("loha", w1_a=(6, 4), w1_b=(4, 5)), "missing"),
        (lambda: _m("loha", w1_a=(4, 6), w1_b=(4, 5), w2_a=(4, 6), w2_b=(4, 5), t1=(4, 4, 3, 3)), "both hada_t1"),
        (lambda: _m("lokr", w1=(2, 2)), "missing 'w2'"),
        (lambda: _m("lokr", w1=(2, 2), w2_a=(3, 2), w2_b=(3, 4)), "ranks differ"),
        (lambda: _m("lokr", w1_a=(2, 1), w1_b=(2, 2), w2=(3, 4)), "ranks differ"),
        (lambda: _m("oft", rescale=(4, 1)), "missing 'blocks'"),
        (lambda: _m("oft", blocks=(2, 3)), "must be"),
        (lambda: _m("full"), "missing"),
    ],
)
def test_check_reports_inconsistent_modules(module, fragment):
    m = module()
    problems = get_algorithm(m.algorithm).check(m)
    assert problems and fragment in " ".join(problems)


def test_factorization_matches_lycoris():
    lycoris = pytest.importorskip("lycoris.functional")
    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(dim, factor) == lycoris.factorization(dim, factor)


def test_ia3_and_oft_need_the_base():
    for m in (_m("ia3", weight=(4,), on_input=1), _m("oft", blocks=(2, 2, 2)), _m("boft", blocks=(2, 2, 2, 2))):
        algo = get_algorithm(m.algorithm)
        assert algo.needs_base
        with pytest.raises(UnsupportedFeatureError, match="use apply"):
            algo.delta(m)
        out = algo.apply(m, np.ones((4, 4), np.float32))
        assert out.shape == (4, 4) and np.isfinite(out).all()


def test_oft_rotation_is_orthogonal_and_constraint_caps_it():
    m = _m("oft", blocks=(4, 3, 3))
    base = RNG.standard_normal((12, 5)).astype(np.float32)
    new = get_algorithm("oft").apply(m, base)
    # a rotation of each output block keeps the column norms of that block
    for k in range(4):
        np.testing.assert_allclose(np.linalg.norm(new[3 * k : 3 * k + 3], axis=0), np.linalg.norm(base[3 * k : 3 * k + 3], axis=0), rtol=1e-4)
    capped = get_algorithm("oft").apply(m.model_copy(update={"alpha": 1e-6}), base)
    assert np.abs(capped - base).max() < np.abs(new - base).max()


def test_apply_multiplier_and_bias_delta():
    m = _m("full", diff=(3, 2), diff_b=(3,))
    algo = get_algorithm("full")
    base = np.zeros((3, 2), np.float32)
    np.testing.assert_allclose(algo.apply(m, base, multiplier=0.5), 0.5 * m.tensors["diff"].float32())
    np.testing.assert_allclose(algo.bias_delta(m), m.tensors["diff_b"].float32())
    assert get_algorithm("lora").bias_delta(_m("lora", down=(1, 2), up=(3, 1))) is None


@pytest.mark.parametrize("shape", [(20, 30), (16, 8, 3, 3)])
def test_svd_approximation(shape):
    delta = RNG.standard_normal(shape).astype(np.float32)
    m = Module(path="unet.x", algorithm="full", tensors={"diff": TensorRef.from_array("d", delta)})
    lora, err = approximate_as_lora(m, 4)
    assert lora.algorithm == "lora" and lora.rank == 4 and lora.scale == 1.0
    assert lora.tensors["down"].shape[0] == 4 and len(lora.tensors["down"].shape) == len(shape)
    approx = get_algorithm("lora").delta(lora, shape)
    measured = np.linalg.norm(approx - delta) / np.linalg.norm(delta)
    assert measured == pytest.approx(err, rel=1e-4)
    _, _, best = low_rank(delta, 4)  # Eckart–Young optimum
    assert err == pytest.approx(best, rel=1e-4)
    exact, err0 = approximate_as_lora(m, 10_000)
    assert err0 < 1e-6


def test_svd_refuses_what_it_cannot_approximate():
    with pytest.raises(UnsupportedFeatureError, match="without the base weight"):
        approximate_as_lora(_m("ia3", weight=(4,), on_input=0), 2)
    with pytest.raises(UnsupportedFeatureError, match="no low-rank form"):
        approximate_as_lora(_m("norm", w_norm=(4,)), 2)


@pytest.mark.parametrize(("down", "mid"), [((3, 5, 1, 1), (3, 3, 3, 3)), ((3, 5), (3, 3, 1, 1))])
def test_fold_tucker_is_exact(down, mid):
    from lorafmt.algorithms.svd import fold_tucker

    m = _m("lora", alpha=1.5, down=down, mid=mid, up=(4, 3, 1, 1) if len(down) == 4 else (4, 3))
    f = fold_tucker(m)
    assert "mid" not in f.tensors and f.tensors["down"].shape == (3, 5, *mid[2:]) if len(down) == 4 else (3, 5)
    lora = get_algorithm("lora")
    np.testing.assert_allclose(lora.delta(f).reshape(-1), lora.delta(m).reshape(-1), rtol=1e-5, atol=1e-6)
