"""Property-based fuzzing of the exact passes on random ONNX graphs (hypothesis).

Generated graphs (opset 17, IR version 8, weights from a seeded ``np.random.Generator``, every choice drawn by
hypothesis so failures shrink):

* MLP DAGs on ``(N, D)`` or flattened ``(N, 2, D)`` inputs: dense layers (Gemm with transB, alpha, beta and a bias
  absent, ``[out]``, ``[1, out]`` or a broadcast ``[1]``; or MatMul+Add in either operand order), optionally an
  unfolded BatchNormalization before the Relu, affine layers without a Relu (merge-affine candidates), residual
  blocks ``Relu(x + D2(Relu(D1(x))))``, two-branch Concat blocks (sometimes both branches read the same
  initializers: a must-not-fire case), a final dense layer, sometimes followed by a Relu;
* CNN DAGs on ``(N, C, H, W)`` inputs: Conv (kernel 1 or 3, asymmetric pads or auto_pad SAME_UPPER / SAME_LOWER /
  VALID, stride 1 or 2, dilation 1 or 2, group 1, depthwise, depthwise x2 or 2 groups, bias or none, kernel_shape
  written or left out), optionally an unfolded BatchNormalization, MaxPool / AveragePool before the Relu, pools
  after it (with or without padding, count_include_pad 0 or 1), residual blocks, channel Concat blocks (axis 1 or
  -3), GlobalAveragePool, then Flatten or Reshape and a dense layer;
* plain Conv->Relu->Conv chains (group 1 on both sides, optional pool after), with at least one planted dead
  channel in the first Conv, which must be removed.

Every layer that feeds a Relu gets dead units (weights <= 0 and a very negative bias: never active) and linear
units (weights >= 0 and a positive bias: always active) from a per-layer mix. Every tensor entering a layer is
non-negative (the input is in [0, 1), the rest are Relus, pools and concats of Relus), so the planted fates hold
exactly. Sometimes an intermediate Relu is also a graph output, which the passes must leave as it is.

Each graph is calibrated on 64 uniform samples and optimised with the exact recipe through the public API (no
held-out split, no latency). The result must pass the full ONNX checker, match the original in onnxruntime on the
calibration samples to 1e-4 of the output scale, and name every skip with a non-empty reason. A
``LincompError`` fails the test with its message: on these graphs the passes should skip, not raise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from conftest import init, make_model, run, vinfo
from onnx_lincomp.errors import LincompError
from onnx_lincomp.optimize import OptimizeOptions, optimize
from onnx_lincomp.recipe import CalibrationSettings, Recipe

SETTINGS = settings()  # the conftest profile: 25 derandomised examples in CI, HYPOTHESIS_PROFILE=long for 500
IR_VERSION = 8
SAMPLES = 64  # at least OptimizeOptions.min_samples (32)
DEAD_BIAS, LINEAR_BIAS = -10.0, 2.0
OPTIONS = OptimizeOptions(Recipe(calibration=CalibrationSettings(0.0)), latency=False, allow_larger=True)

Shape = tuple[int, ...]


@dataclass
class Net:
    """A graph under construction: nodes, initializers, the Relus made so far, and a log of what was drawn."""

    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    relus: list[tuple[str, Shape]] = field(default_factory=list)  # Relu outputs and their shapes without N
    log: list[str] = field(default_factory=list)
    count: int = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, prefix: str, value: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.inits.append(init(name, np.asarray(value, np.float32)))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def relu(self, x: str, shape: Shape) -> str:
        out = self.op("Relu", [x])
        self.relus.append((out, shape))
        return out


@dataclass(frozen=True)
class Case:
    model: onnx.ModelProto
    input_shape: Shape
    seed: int
    log: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Case(seed={self.seed}, input={self.input_shape}, layers={list(self.log)})"


FATE_MIXES = ["kkdl", "k", "kd", "kl", "dl", "kddd", "klll", "d", "l"]


def draw_fates(draw, width: int) -> str:
    """One letter per unit: k (kept as drawn), d (planted dead), l (planted linear), from a per-layer mix."""
    mix = draw(st.sampled_from(FATE_MIXES))
    return "".join(draw(st.lists(st.sampled_from(mix), min_size=width, max_size=width)))


def plant(w: np.ndarray, b: np.ndarray, fates: str) -> None:
    """Dead units: weights <= 0, bias very negative; linear units: weights >= 0, bias positive (axis 0 = units)."""
    for unit, fate in enumerate(fates):
        if fate == "d":
            w[unit], b[unit] = -np.abs(w[unit]), DEAD_BIAS
        elif fate == "l":
            w[unit], b[unit] = np.abs(w[unit]), LINEAR_BIAS


def batch_norm(draw, net: Net, x: str, width: int, fates: str) -> str:
    """Unfolded BatchNormalization; planted channels get mean 0 and beta 0 so their sign survives."""
    rng = net.rng
    scale = rng.uniform(0.5, 1.5, width)
    beta = rng.normal(0, 0.1, width)
    mean = rng.normal(0, 0.1, width)
    var = rng.uniform(0.5, 1.5, width)
    planted = np.array([f != "k" for f in fates])
    mean[planted], beta[planted] = 0.0, 0.0
    epsilon = draw(st.sampled_from([1e-5, 1e-3]))
    net.log.append(f"BatchNormalization(eps={epsilon})")
    return net.op("BatchNormalization", [x] + [net.const("bn", v) for v in (scale, beta, mean, var)],
                  epsilon=epsilon)


# --- dense layers (Gemm or MatMul+Add) -----------------------------------------------------------------------

def dense(draw, net: Net, x: str, din: int, dout: int, fates: str = "") -> str:
    """``y = W x + b`` with ``W`` of shape (dout, din), written as one of the Gemm/MatMul forms."""
    w = net.rng.normal(0, 1 / np.sqrt(din), (dout, din))
    b = net.rng.normal(0, 0.1, dout)
    plant(w, b, fates)
    if draw(st.booleans()):
        return _gemm(draw, net, x, w, b, fates)
    swap = draw(st.booleans())
    form = draw(st.sampled_from(["vector", "vector", "row", "scalar"]))
    net.log.append(f"MatMul+Add({din}->{dout}, bias={form}, bias first={swap}, fates={fates or '-'})")
    mm = net.op("MatMul", [x, net.const("w", w.T)])
    bias = net.const("b", _bias_as(b, form, fates))
    return net.op("Add", [bias, mm] if swap else [mm, bias])


def _bias_as(b: np.ndarray, form: str, fates: str) -> np.ndarray:
    """The bias as a vector [out], a row [1, out], or a broadcast scalar [1] (0 when units are planted: the
    weight signs alone keep dead units at <= 0 and linear units at >= 0)."""
    if form == "row":
        return b[None, :]
    if form == "scalar":
        return np.array([0.0 if fates.strip("k") else b[0]])
    return b


def _gemm(draw, net: Net, x: str, w: np.ndarray, b: np.ndarray, fates: str) -> str:
    trans_b = draw(st.booleans())
    alpha, beta = draw(st.sampled_from([1.0, 0.5, 2.0])), draw(st.sampled_from([1.0, 0.5, 2.0]))
    form = draw(st.sampled_from(["vector", "vector", "row", "scalar", "none"]))
    net.log.append(f"Gemm({w.shape[1]}->{w.shape[0]}, transB={int(trans_b)}, alpha={alpha}, beta={beta}, "
                   f"bias={form}, fates={fates or '-'})")
    weight = net.const("w", (w if trans_b else w.T) / alpha)
    inputs = [x, weight]
    if form != "none":
        inputs.append(net.const("b", _bias_as(b, form, fates) / beta))
    return net.op("Gemm", inputs, transB=int(trans_b), alpha=alpha, beta=beta)


def dense_relu(draw, net: Net, x: str, din: int, dout: int) -> str:
    fates = draw_fates(draw, dout)
    y = dense(draw, net, x, din, dout, fates)
    if draw(st.booleans()):
        y = batch_norm(draw, net, y, dout, fates)
    return net.relu(y, (dout,))


def mlp_block(draw, net: Net, x: str, width: int) -> tuple[str, int]:
    kind = draw(st.sampled_from(["dense", "dense", "affine", "residual", "concat"]))
    if kind == "dense":
        dout = draw(st.integers(2, 12))
        return dense_relu(draw, net, x, width, dout), dout
    if kind == "affine":  # no Relu: the next layer may be merged into this one
        dout = draw(st.integers(2, 12))
        net.log.append("(affine, no Relu)")
        y = dense(draw, net, x, width, dout)
        return net.relu(y, (dout,)) if draw(st.booleans()) else y, dout
    if kind == "residual":
        hidden = draw(st.integers(2, 12))
        net.log.append("residual[")
        h = dense_relu(draw, net, x, width, hidden)
        z = dense(draw, net, h, hidden, width, draw_fates(draw, width))
        first = draw(st.booleans())
        net.log.append(f"]Add(skip first={first})+Relu")
        return net.relu(net.op("Add", [x, z] if first else [z, x]), (width,)), width
    axis = draw(st.sampled_from([1, -1]))
    net.log.append(f"concat[axis={axis}")
    start, da = len(net.nodes), draw(st.integers(1, 8))
    a = dense_relu(draw, net, x, width, da)
    if draw(st.integers(0, 3)) == 0:  # must not fire: both branches read the same initializers
        net.log.append("second branch shares the first one's initializers")
        b, db = clone_nodes(net, start), da
    else:
        db = draw(st.integers(1, 8))
        b = dense_relu(draw, net, x, width, db)
    net.log.append("]")
    return net.op("Concat", [a, b], axis=axis), da + db


def clone_nodes(net: Net, start: int) -> str:
    """Repeat the nodes from ``start`` on with fresh tensor names, reading the same initializers."""
    renamed: dict[str, str] = {}
    shapes = dict(net.relus)
    for node in list(net.nodes[start:]):
        out = net.fresh(node.op_type.lower())
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name, copy.output[0] = f"{out}_node", out
        del copy.input[:]
        copy.input.extend(renamed.get(i, i) for i in node.input)
        renamed[node.output[0]] = out
        net.nodes.append(copy)
        if node.op_type == "Relu":
            net.relus.append((out, shapes[node.output[0]]))
    return out


@st.composite
def mlp_case(draw) -> Case:
    seed = draw(st.integers(0, 2**31 - 1))
    net = Net(np.random.default_rng(seed))
    width = draw(st.integers(2, 10))
    in_shape: Shape = (width,)
    x, d = "x", width
    if draw(st.integers(0, 3)) == 0:  # a (N, 2, W) input flattened first
        in_shape, d = (2, width), 2 * width
        net.log.append("Flatten")
        x = net.op("Flatten", [x], axis=1)
    for _ in range(draw(st.integers(1, 5))):
        x, d = mlp_block(draw, net, x, d)
    dout = draw(st.integers(1, 4))
    y = final_relu(draw, net, dense(draw, net, x, d, dout), dout)
    return finish(draw, net, y, (dout,), in_shape, seed)


def final_relu(draw, net: Net, y: str, width: int) -> str:
    """Sometimes the graph output itself is a Relu."""
    if draw(st.integers(0, 4)):
        return y
    net.log.append("final Relu")
    return net.relu(y, (width,))


def finish(draw, net: Net, y: str, out_shape: Shape, input_shape: Shape, seed: int, expose: bool = True) -> Case:
    """Rename the last tensor to ``y``; sometimes expose an intermediate Relu as a second graph output."""
    net.nodes[-1].output[0] = "y"
    outputs = [vinfo("y", ["N", *out_shape])]
    hidden = [(name, shape) for name, shape in net.relus if name != y]
    if expose and hidden and draw(st.booleans()) and draw(st.booleans()):
        name, shape = hidden[draw(st.integers(0, len(hidden) - 1))]
        net.log.append(f"graph output {name}")
        outputs.append(vinfo(name, ["N", *shape]))
    model = make_model(net.nodes, [vinfo("x", ["N", *input_shape])], outputs, net.inits, ir_version=IR_VERSION)
    return Case(model, input_shape, seed, tuple(net.log))


# --- convolutional layers ----------------------------------------------------------------------------------------

def conv_out(size: int, k: int, pad: int, stride: int, dilation: int = 1) -> int:
    return (size + pad - dilation * (k - 1) - 1) // stride + 1


@dataclass(frozen=True)
class ConvSpec:
    cout: int
    k: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    stride: int = 1
    dilation: int = 1
    group: int = 1
    auto_pad: str = "NOTSET"  # SAME_UPPER / SAME_LOWER / VALID replace ``pads``

    def out_shape(self, shape: Shape) -> Shape:
        _, h, w = shape
        if self.auto_pad.startswith("SAME"):
            return self.cout, -(-h // self.stride), -(-w // self.stride)
        p = (0, 0, 0, 0) if self.auto_pad == "VALID" else self.pads
        return (self.cout, conv_out(h, self.k, p[0] + p[2], self.stride, self.dilation),
                conv_out(w, self.k, p[1] + p[3], self.stride, self.dilation))


def draw_group(draw, c: int) -> tuple[int, int]:
    """(group, output channels): dense, depthwise, depthwise with channel multiplier 2, or two groups."""
    kind = draw(st.sampled_from(["dense", "dense", "dense", "depthwise", "depthwise x2", "grouped"]))
    if kind == "depthwise" and c > 1:
        return c, c
    if kind == "depthwise x2" and c > 1:
        return c, 2 * c
    if kind == "grouped" and c % 2 == 0:
        return 2, 2 * draw(st.integers(1, 6))
    return 1, draw(st.integers(2, 12))


def draw_conv_spec(draw, shape: Shape, same: bool = False) -> ConvSpec:
    """Kernel, pads, stride, dilation and group for an input of ``shape``; ``same``: keep C, H and W."""
    c = shape[0]
    k = draw(st.sampled_from([1, 3]))
    if same:
        p = (k - 1) // 2
        return ConvSpec(c, k, (p, p, p, p), group=c if c > 1 and draw(st.booleans()) else 1)
    group, cout = draw_group(draw, c)
    pads = tuple(draw(st.lists(st.integers(0, 1), min_size=4, max_size=4)))
    stride, dilation = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 1, 2]))
    auto_pad = draw(st.sampled_from(["NOTSET"] * 5 + ["SAME_UPPER", "SAME_LOWER", "VALID"]))
    if auto_pad.startswith("SAME"):
        dilation = 1  # onnxruntime rejects dilations with SAME padding
    spec = ConvSpec(cout, k, pads, stride, dilation, group, auto_pad)
    if min(spec.out_shape(shape)[1:]) < 1:
        return ConvSpec(cout, 1, group=group)
    return spec


def conv(draw, net: Net, x: str, shape: Shape, spec: ConvSpec, fates: str = "") -> tuple[str, Shape]:
    cin, group = shape[0], spec.group
    w = net.rng.normal(0, 1 / np.sqrt(cin // group * spec.k**2), (spec.cout, cin // group, spec.k, spec.k))
    b = net.rng.normal(0, 0.1, spec.cout)
    plant(w, b, fates)
    has_bias = draw(st.integers(0, 5)) > 0  # without a bias the planted signs still hold (>= 0 / <= 0)
    attrs = {"strides": [spec.stride] * 2, "dilations": [spec.dilation] * 2, "group": group}
    if spec.auto_pad == "NOTSET":
        attrs["pads"] = list(spec.pads)
    else:
        attrs["auto_pad"] = spec.auto_pad
    if draw(st.integers(0, 3)):  # exporters may leave kernel_shape out (it follows from the weight)
        attrs["kernel_shape"] = [spec.k] * 2
    net.log.append(f"Conv({cin}->{spec.cout}, {attrs}, bias={has_bias}, fates={fates or '-'})")
    inputs = [x, net.const("w", w)] + ([net.const("b", b)] if has_bias else [])
    return net.op("Conv", inputs, **attrs), spec.out_shape(shape)


def conv_relu(draw, net: Net, x: str, shape: Shape, spec: ConvSpec, plain: bool = False,
              keep_size: bool = False) -> tuple[str, Shape]:
    """Conv (+ BatchNormalization) (+ MaxPool before the Relu) + Relu, with planted units.

    ``plain``: neither BatchNormalization nor MaxPool; ``keep_size``: no MaxPool (residual and concat branches).
    """
    fates = draw_fates(draw, spec.cout)
    y, out = conv(draw, net, x, shape, spec, fates)
    if not plain and draw(st.booleans()):
        y = batch_norm(draw, net, y, spec.cout, fates)
    if not (plain or keep_size) and min(out[1:]) >= 2 and draw(st.integers(0, 4)) == 0:
        op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
        net.log.append(f"{op}(k=2, s=2) before Relu")
        y = net.op(op, [y], kernel_shape=[2, 2], strides=[2, 2])
        out = (out[0], out[1] // 2, out[2] // 2)
    return net.relu(y, out), out


POOLS = [(2, 2, 0), (3, 1, 1), (3, 2, 1), (2, 1, 0)]  # kernel, stride, pad


def pool(draw, net: Net, x: str, shape: Shape) -> tuple[str, Shape]:
    c, h, w = shape
    k, s, p = draw(st.sampled_from(POOLS))
    if min(h, w) + 2 * p < k:
        return x, shape
    out = (c, conv_out(h, k, 2 * p, s), conv_out(w, k, 2 * p, s))
    attrs = {"kernel_shape": [k, k], "strides": [s, s], "pads": [p] * 4}
    if draw(st.booleans()):
        net.log.append(f"MaxPool(k={k}, s={s}, p={p})")
        return net.op("MaxPool", [x], **attrs), out
    include = int(draw(st.booleans()))
    net.log.append(f"AveragePool(k={k}, s={s}, p={p}, count_include_pad={include})")
    return net.op("AveragePool", [x], count_include_pad=include, **attrs), out


def conv_block(draw, net: Net, x: str, shape: Shape) -> tuple[str, Shape]:
    kind = draw(st.sampled_from(["conv", "conv", "affine", "pool", "residual", "concat", "global"]))
    if kind == "conv":
        return conv_relu(draw, net, x, shape, draw_conv_spec(draw, shape))
    if kind == "affine":  # no Relu: merge-affine candidates (Conv∘Conv with a 1x1 on one side)
        net.log.append("(affine, no Relu)")
        return conv(draw, net, x, shape, draw_conv_spec(draw, shape))
    if kind == "pool":
        return pool(draw, net, x, shape)
    if kind == "global":
        net.log.append("GlobalAveragePool")
        return net.op("GlobalAveragePool", [x]), (shape[0], 1, 1)
    if kind == "residual":
        net.log.append("residual[")
        h, _ = conv_relu(draw, net, x, shape, draw_conv_spec(draw, shape, same=True), keep_size=True)
        z, _ = conv(draw, net, h, shape, draw_conv_spec(draw, shape, same=True), draw_fates(draw, shape[0]))
        first = draw(st.booleans())
        net.log.append(f"]Add(skip first={first})+Relu")
        return net.relu(net.op("Add", [x, z] if first else [z, x]), shape), shape
    net.log.append("concat[")
    branches, width = [], 0
    for _ in range(2):
        k = draw(st.sampled_from([1, 3]))
        p = (k - 1) // 2
        y, out = conv_relu(draw, net, x, shape, ConvSpec(draw(st.integers(1, 8)), k, (p, p, p, p)), keep_size=True)
        branches.append(y)
        width += out[0]
    axis = draw(st.sampled_from([1, -3]))
    net.log.append(f"]Concat(axis={axis})")
    return net.op("Concat", branches, axis=axis), (width, shape[1], shape[2])


def flatten_dense(draw, net: Net, x: str, shape: Shape) -> tuple[str, int]:
    features = int(np.prod(shape))
    how = draw(st.sampled_from(["Flatten", "Flatten", "Reshape(-1, F)", "Reshape(0, -1)"]))
    net.log.append(how)
    if how == "Flatten":
        flat = net.op("Flatten", [x], axis=1)
    else:
        target = np.array([-1, features] if how == "Reshape(-1, F)" else [0, -1], np.int64)
        flat = net.op("Reshape", [x, _int64_const(net, target)])
    dout = draw(st.integers(1, 5))
    return dense(draw, net, flat, features, dout), dout


def _int64_const(net: Net, value: np.ndarray) -> str:
    name = net.fresh("shape")
    net.inits.append(init(name, value))
    return name


@st.composite
def cnn_case(draw) -> Case:
    seed = draw(st.integers(0, 2**31 - 1))
    net = Net(np.random.default_rng(seed))
    in_shape = (draw(st.integers(1, 3)), draw(st.integers(4, 9)), draw(st.integers(4, 9)))
    x, shape = conv_relu(draw, net, "x", in_shape, draw_conv_spec(draw, in_shape))
    for _ in range(draw(st.integers(0, 4))):
        x, shape = conv_block(draw, net, x, shape)
    y, dout = flatten_dense(draw, net, x, shape)
    return finish(draw, net, final_relu(draw, net, y, dout), (dout,), in_shape, seed)


def plain_spec(spec: ConvSpec, cout: int, shape: Shape) -> ConvSpec:
    """``spec`` with group 1 and ``cout`` outputs (a 1x1 Conv if that would leave no output positions)."""
    plain = ConvSpec(cout, spec.k, spec.pads, spec.stride, spec.dilation, 1, spec.auto_pad)
    return plain if min(plain.out_shape(shape)[1:]) >= 1 else ConvSpec(cout)


@st.composite
def conv_chain_case(draw) -> Case:
    """Conv->Relu->Conv(group 1)->Relu [-> pool] -> Flatten -> dense, at least one dead channel in the first conv."""
    seed = draw(st.integers(0, 2**31 - 1))
    net = Net(np.random.default_rng(seed))
    in_shape = (draw(st.integers(1, 3)), draw(st.integers(4, 9)), draw(st.integers(4, 9)))
    first = draw_conv_spec(draw, in_shape)
    first = plain_spec(first, max(first.cout, 2), in_shape)
    fates = draw_fates(draw, first.cout)
    dead_at = draw(st.integers(0, first.cout - 1))
    fates = fates[:dead_at] + "d" + fates[dead_at + 1:]
    y, shape = conv(draw, net, "x", in_shape, first, fates)
    x = net.relu(y, shape)
    second = draw_conv_spec(draw, shape)
    second = plain_spec(second, second.cout if second.group == 1 else draw(st.integers(2, 8)), shape)
    x, shape = conv_relu(draw, net, x, shape, second, plain=True)
    if draw(st.booleans()):
        x, shape = pool(draw, net, x, shape)
    y, dout = flatten_dense(draw, net, x, shape)
    return finish(draw, net, y, (dout,), in_shape, seed, expose=False)  # an exposed Relu could not shrink


# --- the property ------------------------------------------------------------------------------------------------

def optimize_and_check(case: Case, tmp_path: Path):
    """Calibrate on uniform samples, run the exact passes, and check the result; returns the optimize result."""
    onnx.checker.check_model(case.model, full_check=True)  # the generator itself must build valid graphs
    x = np.random.default_rng(case.seed).random((SAMPLES, *case.input_shape), dtype=np.float32)
    expected = run(case.model, {"x": x})  # the generator's graph runs as it is
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    try:
        res = optimize(case.model, str(calib), OPTIONS)
    except LincompError as err:
        pytest.fail(f"optimize raised {type(err).__name__} (exit {err.exit_code}) on {case!r}: {err}")
    onnx.checker.check_model(res.model, full_check=True)
    for before, after in zip(expected, run(res.model, {"x": x}), strict=True):
        assert before.shape == after.shape
        err = float(np.abs(before - after).max(initial=0.0))
        assert err <= 1e-4 * max(1.0, float(np.abs(before).max(initial=0.0))), f"max abs error {err:.3g}"
    for record in res.report.passes:
        for reason in record.result.skipped:
            assert isinstance(reason, str) and reason.strip(), f"{record.result.name}: empty skip reason"
    return res


@SETTINGS
@given(case=mlp_case())
def test_fuzz_mlp_graphs(case, tmp_path):
    optimize_and_check(case, tmp_path)


@SETTINGS
@given(case=cnn_case())
def test_fuzz_cnn_graphs(case, tmp_path):
    optimize_and_check(case, tmp_path)


@SETTINGS
@given(case=conv_chain_case())
def test_fuzz_conv_chains_remove_planted_dead(case, tmp_path):
    res = optimize_and_check(case, tmp_path)
    assert sum(p.result.neurons_removed for p in res.report.passes) > 0
