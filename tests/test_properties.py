"""Property tests: random chains with planted dead and linear units."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from conftest import assert_same_outputs, init, make_model, mlp_model, vinfo
from test_passes import compress

SETTINGS = settings()  # the profile (conftest) sets examples: 25 derandomised in CI, HYPOTHESIS_PROFILE=long for 500


@st.composite
def mlp_case(draw):
    depth = draw(st.integers(2, 4))
    widths = ([draw(st.integers(2, 10))] + [draw(st.integers(2, 16)) for _ in range(depth - 1)]
              + [draw(st.integers(1, 4))])
    dead, linear = {}, {}
    for layer in range(depth - 1):
        units = list(range(widths[layer + 1]))
        picked = draw(st.lists(st.sampled_from(units), unique=True, max_size=len(units)))
        split = draw(st.integers(0, len(picked)))
        dead[layer], linear[layer] = picked[:split], picked[split:]
    return widths, dead, linear, draw(st.sampled_from(["gemm", "matmul"])), draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(mlp_case())
def test_random_mlp_chains(case):
    widths, dead, linear, kind, seed = case
    rng = np.random.default_rng(seed)
    model = mlp_model(rng, widths, kind=kind, dead=dead, linear=linear)
    x = rng.random((32, widths[0]), dtype=np.float32)
    out, res, stats = compress(model, x, layer_threshold=0.0)
    for layer, s in enumerate(stats.layers):
        assert s.dead[dead[layer]].all() and s.always_active[linear[layer]].all()
    expected_removed = sum(min(int(s.dead.sum()), s.channels - 1) for s in stats.layers)
    assert res["remove-dead"].neurons_removed == expected_removed
    expected_folded = sum(int((s.always_active & ~s.dead).sum()) for s in stats.layers)
    assert res["fold-linear"].neurons_folded == expected_folded
    assert_same_outputs(model, out, {"x": x}, rtol=1e-4, atol=1e-5)


@st.composite
def conv_case(draw):
    c0, c1, c2 = draw(st.integers(1, 3)), draw(st.integers(2, 8)), draw(st.integers(2, 8))
    dead1 = draw(st.lists(st.integers(0, c1 - 1), unique=True, max_size=c1))
    dead2 = draw(st.lists(st.integers(0, c2 - 1), unique=True, max_size=c2))
    k = draw(st.sampled_from([1, 3]))
    stride, pad, dil = draw(st.sampled_from([1, 2])), draw(st.sampled_from([0, 1])), draw(st.sampled_from([1, 2]))
    return c0, c1, c2, dead1, dead2, k, stride, pad, dil, draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(conv_case())
def test_random_conv_chains(case):
    c0, c1, c2, dead1, dead2, k, stride, pad, dil, seed = case
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (c1, c0, k, k)).astype(np.float32)
    b1 = rng.normal(0, 0.1, c1).astype(np.float32)
    b1[dead1] = -100
    w2 = rng.normal(0, 0.5, (c2, c1, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, c2).astype(np.float32)
    b2[dead2] = -100
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[pad] * 4, strides=[stride] * 2,
                              dilations=[dil] * 2),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1)]
    model = make_model(nodes, [vinfo("x", ["N", c0, 9, 9])], [vinfo("y", ["N", 3])],
                       [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2),
                        init("w3", rng.normal(size=(3, c2)).astype(np.float32))])
    x = rng.random((8, c0, 9, 9), dtype=np.float32)
    out, res, stats = compress(model, x)
    expected = sum(min(int(s.dead.sum()), s.channels - 1) for s in stats.layers)
    assert res["remove-dead"].neurons_removed == expected >= min(len(dead1), c1 - 1)
    assert_same_outputs(model, out, {"x": x}, rtol=1e-4, atol=1e-5)
