"""Shared helpers: small golden models built in code, onnxruntime runs, paths to ../shared."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():
    SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the third-party models and data live in ../shared next to the repository (CI "
                    "has them)")
    return path


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as fh:
        data = fh.read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(dims)


def make_model(nodes, inputs, outputs, inits, opset: int = OPSET, ir_version: int | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def vinfo(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, value: np.ndarray):
    return numpy_helper.from_array(np.asarray(value), name)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict, rtol: float = 1e-5, atol: float = 1e-5):
    """Both models on the same feeds; error relative to the output scale."""
    for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
        scale = max(float(np.abs(x).max(initial=0.0)), 1.0)
        np.testing.assert_allclose(y, x, rtol=rtol, atol=atol * scale)


def unit_square(n: int = 301) -> np.ndarray:
    """An ``n x n`` grid of points of [0, 1]^2 (brute force for exact-mode claims on 2-input nets)."""
    return np.stack(np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n)), -1).reshape(-1, 2)


def check_claims(chain, out, zs: list[np.ndarray]) -> None:
    """Every exact-mode claim holds on the pre-activations ``zs`` of a grid: proven units never flip there,
    witnesses flip their unit, and the bounds a stage ends with (where it reports them) contain the grid."""
    for k, i in out.proven_inactive:
        assert zs[k][:, i].max() <= 1e-9, (k, i)
    for k, i in out.proven_active:
        assert zs[k][:, i].min() >= -1e-9, (k, i)
    for (k, i), w in out.flipped_positive.items():
        assert chain.forward(out.witnesses[w][None])[k][0, i] > 0
    for (k, i), w in out.flipped_negative.items():
        assert chain.forward(out.witnesses[w][None])[k][0, i] < 0
    for z, b in zip(zs, out.bounds or (), strict=bool(out.bounds)):
        assert np.all(z <= b.upper + 1e-9) and np.all(z >= b.lower - 1e-9)


def mlp_model(rng: np.random.Generator, widths: list[int], *, kind: str = "gemm", dead: dict | None = None,
              linear: dict | None = None, input_name: str = "x") -> onnx.ModelProto:
    """Gemm/MatMul+Add + Relu chain. ``dead``/``linear``: layer index -> unit indices to plant.

    Dead units get non-positive weights and bias -1, linear units non-negative weights and bias +1: for
    non-negative inputs (x in [0, 1], Relu outputs) they are never / always active.
    """
    nodes, inits, x = [], [], input_name
    dead, linear = dead or {}, linear or {}
    for i in range(len(widths) - 1):
        w = rng.normal(0, 1 / np.sqrt(widths[i]), (widths[i + 1], widths[i])).astype(np.float32)
        b = rng.normal(0, 0.1, widths[i + 1]).astype(np.float32)
        for u in dead.get(i, []):
            w[u] = -np.abs(w[u])
            b[u] = -1.0
        for u in linear.get(i, []):
            w[u] = np.abs(w[u])
            b[u] = 1.0
        out = f"z{i}" if i < len(widths) - 2 else "y"
        if kind == "gemm":
            inits += [init(f"w{i}", w), init(f"b{i}", b)]
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
        else:
            inits += [init(f"w{i}", w.T.copy()), init(f"b{i}", b)]
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"mm{i}"),
                      helper.make_node("Add", [f"mm{i}", f"b{i}"], [out], name=f"add{i}")]
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    return make_model(nodes, [vinfo(input_name, ["N", widths[0]])], [vinfo("y", ["N", widths[-1]])], inits)


def cnn_model(rng: np.random.Generator, *, dead: list[int] = (), linear: list[int] = (), flatten: str = "Flatten",
              pool: bool = True) -> onnx.ModelProto:
    """Conv(1->6,3x3,pad1)-Relu-[MaxPool]-Conv(6->8,1x1)-Relu-Flatten/Reshape-Gemm(4), input (N,1,6,6)."""
    w1 = rng.normal(0, 0.5, (6, 1, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 6).astype(np.float32)
    for c in dead:
        b1[c] = -100.0
    for c in linear:
        w1[c] = np.abs(w1[c])
        b1[c] = 100.0
    w2 = rng.normal(0, 0.4, (8, 6, 1, 1)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 8).astype(np.float32)
    side = 3 if pool else 6
    w3 = rng.normal(0, 0.2, (4, 8 * side * side)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    x = "r1"
    if pool:
        nodes.append(helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]))
        x = "p1"
    nodes += [helper.make_node("Conv", [x, "w2", "b2"], ["c2"], name="conv2"),
              helper.make_node("Relu", ["c2"], ["r2"], name="relu2")]
    inits = [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2), init("w3", w3),
             init("b3", np.zeros(4, np.float32))]
    if flatten == "Flatten":
        nodes.append(helper.make_node("Flatten", ["r2"], ["f"], name="flatten", axis=1))
    else:
        inits.append(init("shape", np.array([-1, 8 * side * side], np.int64)))
        nodes.append(helper.make_node("Reshape", ["r2", "shape"], ["f"], name="reshape"))
    nodes.append(helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1))
    return make_model(nodes, [vinfo("x", ["N", 1, 6, 6])], [vinfo("y", ["N", 4])], inits)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# Hypothesis: a derandomised, bounded profile by default (CI is reproducible: a failure names its example
# and fails every run); HYPOTHESIS_PROFILE=long runs more examples from random seeds locally.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
