"""Channel groups (read-only analysis) and the shared channel applier, on small hand-built graphs.

Each coupling gets a graph with planted channels that are exactly zero (or constant) at every consumer;
the analysis must group them, the applier must delete them, and the rewritten model must pass the full
checker and compute what the original computes (onnxruntime, CPU, optimisations off, atol 1e-5).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import assert_same_outputs, init, make_model, run, shared_path, vinfo
from onnx_lincomp.analysis.channel_groups import (
    ChannelMap,
    TiedDepthwise,
    TiedParam,
    TiedWindow,
    find_channel_groups,
    group_of_producer,
    group_of_relu,
    groups_of_relu,
)
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.errors import PassError
from onnx_lincomp.graph_edit import NameSource, refresh_shapes
from onnx_lincomp.linear_layer import write_linear_layer
from onnx_lincomp.model_io import load_model, model_from_proto, to_model_proto
from onnx_lincomp.rewrite import removal_problem, remove_channels


class Net:
    """A tiny graph builder for tests: nodes, seeded initializers, fresh tensor names."""

    def __init__(self, rng: np.random.Generator, opset: int = 17):
        self.rng, self.opset = rng, opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, value, name: str | None = None) -> str:
        self.count += 1
        name = name or f"k{self.count}"
        self.inits.append(init(name, np.asarray(value)))
        return name

    def op(self, op: str, inputs: list[str], name: str | None = None, outputs: int = 1, **attrs):
        self.count += 1
        name = name or f"{op.lower()}{self.count}"
        outs = [f"{name}_out{i}" if outputs > 1 else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs if outputs > 1 else outs[0]

    def conv(self, x: str, cin: int, cout: int, k: int = 1, *, name: str, group: int = 1, pad: int = 0,
             dead=(), bias: bool = True, bias_value: float | None = None) -> str:
        """Conv with zero weight rows and zero bias at ``dead`` (its output channel is exactly 0)."""
        w = self.rng.normal(0, 0.5, (cout, cin // group, k, k)).astype(np.float32)
        b = self.rng.normal(0, 0.2, cout).astype(np.float32)
        w[list(dead)], b[list(dead)] = 0.0, 0.0 if bias_value is None else bias_value
        inputs = [x, self.const(w, f"{name}_w")] + ([self.const(b, f"{name}_b")] if bias else [])
        return self.op("Conv", inputs, name, group=group, pads=[pad] * 4, kernel_shape=[k, k])

    def bn(self, x: str, c: int, *, name: str, negative=()) -> str:
        """BatchNormalization whose output is -1 at channels ``negative`` when its input there is 0."""
        scale = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        bias = self.rng.normal(0, 0.2, c).astype(np.float32)
        mean = self.rng.normal(0, 0.2, c).astype(np.float32)
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        bias[list(negative)], mean[list(negative)] = -1.0, 0.0
        params = [self.const(v, f"{name}_{k}") for k, v in (("s", scale), ("b", bias), ("m", mean), ("v", var))]
        return self.op("BatchNormalization", [x] + params, name)

    def gemm(self, x: str, fin: int, fout: int, *, name: str) -> str:
        w = self.rng.normal(0, 0.3, (fout, fin)).astype(np.float32)
        return self.op("Gemm", [x, self.const(w, f"{name}_w"), self.const(np.zeros(fout, np.float32))], name, transB=1)

    def model(self, inputs: dict[str, list], outputs: list[str]) -> onnx.ModelProto:
        return make_model(self.nodes, [vinfo(k, v) for k, v in inputs.items()], [vinfo(o, None) for o in outputs],
                          self.inits, opset=self.opset)


def relu_dead(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """Per Relu, the channels that are exactly 0 on ``feeds`` (channel axis 1, last for 3-D tensors)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    relus = [n for n in probe.graph.node if n.op_type == "Relu"]
    listed = {o.name for o in probe.graph.output}
    probe.graph.output.extend(vinfo(n.output[0], None) for n in relus if n.output[0] not in listed)
    values = dict(zip([o.name for o in probe.graph.output], run(probe, feeds), strict=True))
    out = {}
    for n in relus:
        a = values[n.output[0]]
        axis = 2 if a.ndim == 3 else 1
        out[n.name] = np.all(a == 0, axis=tuple(i for i in range(a.ndim) if i != axis))
    return out


def analyse(model: onnx.ModelProto, fold_bn: bool = False):
    loaded = model_from_proto(model)
    if fold_bn:
        canonicalize(loaded.graph)
    return loaded, find_channel_groups(loaded.graph)


def finish(loaded, model: onnx.ModelProto, feeds: dict) -> onnx.ModelProto:
    loaded.graph.cleanup().toposort()
    refresh_shapes(loaded.graph)
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(model, out, feeds)
    return out


def rewrite(model: onnx.ModelProto, feeds: dict, producer: str, remove=None, shift=None, fold_bn: bool = False):
    """Remove ``remove`` (default: every channel all consumers read as 0) from ``producer``'s group."""
    loaded, groups = analyse(model, fold_bn)
    group = group_of_producer(groups, producer)
    assert group is not None, groups.skips
    if remove is None:
        zero = group.zero_channels(relu_dead(model, feeds))
        assert zero is not None
        remove = group.admissible(zero)
    result = remove_channels(loaded.graph, NameSource(loaded.graph), group, remove, shift=shift)
    return finish(loaded, model, feeds), group, result


def remove_all_dead(model: onnx.ModelProto, feeds: dict, fold_bn: bool = False) -> tuple[onnx.ModelProto, int]:
    """Remove dead channels group by group (fresh analysis after each rewrite) until none is left."""
    current, total = model, 0
    if fold_bn:
        loaded, _ = analyse(model, True)
        current = finish(loaded, model, feeds)
    while True:
        loaded, groups = analyse(current)
        dead = relu_dead(current, feeds)
        for group in groups.groups:
            zero = group.zero_channels(dead)
            remove = group.admissible(zero) if zero is not None else np.zeros(group.width, bool)
            if remove.any() and not remove.all():
                total += remove_channels(loaded.graph, NameSource(loaded.graph), group, remove).removed
                current = finish(loaded, model, feeds)
                break
        else:
            return current, total


def removable_now(model: onnx.ModelProto, feeds: dict, fold_bn: bool = False) -> int:
    """Channels the first analysis finds removable in all groups together (groups are disjoint)."""
    _, groups = analyse(model, fold_bn)
    dead = relu_dead(model, feeds)
    masks = [g.zero_channels(dead) for g in groups.groups]
    pairs = [(g, m) for g, m in zip(groups.groups, masks, strict=True) if m is not None and not m.all()]
    return sum(int(g.admissible(m).sum()) for g, m in pairs)


def weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == name)
    return onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[1]))


def initializer(model: onnx.ModelProto, prefix: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name.startswith(prefix)))


def image(rng, n=4, c=3, side=6):
    return {"x": rng.normal(0, 1, (n, c, side, side)).astype(np.float32)}


def test_elementwise_chain_is_one_group_with_tied_constant(rng):
    net = Net(rng)
    h = net.op("Relu", [net.conv("x", 3, 6, 3, name="conv1", pad=1, dead=[1, 4])], "relu1")
    h = net.op("Mul", [h, net.const(rng.uniform(0.5, 2, (6, 1, 1)).astype(np.float32), "scale")], "mul")
    h = net.op("LeakyRelu", [h], "leaky", alpha=0.1)
    h = net.op("Clip", [h, net.const(np.float32(0)), net.const(np.float32(6))], "clip")
    h = net.op("Dropout", [net.op("Identity", [h], "ident")], "drop")
    h = net.op("Div", [h, net.const(np.float32(2.0))], "div")
    h = net.op("HardSwish", [net.op("Tanh", [h], "tanh")], "hswish")
    model = net.model({"x": ["N", 3, 6, 6]}, [net.conv(h, 6, 4, name="conv2")])
    _, groups = analyse(model)
    g = group_of_producer(groups, "conv1")
    assert g.width == 6 and len(g.producers) == 1 and [c.layer.name for c in g.consumers] == ["conv2"]
    assert [(t.node.name, t.index, t.axis) for t in g.tied] == [("mul", 1, 0)]
    assert g.relus == ("relu1",) and g.consumers[0].zero_sources == ("relu1",)
    assert group_of_relu(groups, "relu1") is g and g.period == 6
    feeds = image(rng)
    out, _, result = rewrite(model, feeds, "conv1")
    assert result.removed == 2 and list(result.kept) == [0, 2, 3, 5] and result.params_removed == 2 * (27 + 1 + 1 + 4)
    assert weight(out, "conv1").shape == (4, 3, 3, 3) and weight(out, "conv2").shape == (4, 4, 1, 1)


@pytest.mark.parametrize("op", ["Sigmoid", "HardSigmoid"])
def test_constant_channels_fold_into_unpadded_consumer_bias(rng, op):
    net = Net(rng)
    h = net.op(op, [net.conv("x", 3, 6, 3, name="conv1", pad=1, dead=[0, 3])], "act")  # act(0) = 0.5
    model = net.model({"x": ["N", 3, 6, 6]}, [net.conv(h, 6, 4, 3, name="conv2")])
    _, groups = analyse(model)
    g = group_of_producer(groups, "conv1")
    assert g.consumers[0].zero_sources is None and g.zero_channels({}) is None
    out, _, result = rewrite(model, image(rng), "conv1", remove=[0, 3], shift=np.full(6, 0.5))
    assert result.removed == 2 and weight(out, "conv2").shape == (4, 4, 3, 3)


def test_constant_add_folds_its_value(rng):
    net = Net(rng)
    h = net.op("Relu", [net.conv("x", 3, 5, 3, name="conv1", pad=1, dead=[2])], "relu1")
    offset = rng.normal(0, 1, (5, 1, 1)).astype(np.float32)
    h = net.op("Add", [h, net.const(offset, "offset")], "add")
    model = net.model({"x": ["N", 3, 6, 6]}, [net.conv(h, 5, 4, name="conv2")])
    _, groups = analyse(model)
    g = group_of_producer(groups, "conv1")
    assert g.consumers[0].zero_sources is None and isinstance(g.tied[0], TiedParam)
    out, _, _ = rewrite(model, image(rng), "conv1", remove=[2], shift=offset.reshape(-1))
    assert initializer(out, "offset").shape == (4, 1, 1)


def test_padding_consumer_refuses_a_shift_and_leaves_the_graph_alone(rng):
    net = Net(rng)
    h = net.op("Sigmoid", [net.conv("x", 3, 6, 3, name="conv1", pad=1, dead=[0])], "act")
    model = net.model({"x": ["N", 3, 6, 6]}, [net.conv(h, 6, 4, 3, name="conv2", pad=1)])
    loaded, groups = analyse(model)
    g = group_of_producer(groups, "conv1")
    assert "pads" in removal_problem(g, [0], np.full(6, 0.5))
    with pytest.raises(PassError, match="pads"):
        remove_channels(loaded.graph, NameSource(loaded.graph), g, [0], shift=np.full(6, 0.5))
    assert to_model_proto(loaded.graph, loaded.ctx).graph.initializer == model.graph.initializer
    assert removal_problem(g, np.arange(6)) == "cannot remove every channel of a group (keep at least one)"
    assert "out of range" in removal_problem(g, [6])


@pytest.mark.parametrize("global_pool", ["GlobalAveragePool", "GlobalMaxPool"])
def test_pools_resize_and_flatten(rng, global_pool):
    net = Net(rng)
    h = net.op("Relu", [net.conv("x", 3, 6, 3, name="conv1", pad=1, dead=[0, 5])], "relu1")
    h = net.op("MaxPool", [h], "maxpool", kernel_shape=[2, 2], strides=[2, 2])
    h = net.op("Resize", [h, "", net.const(np.array([1, 1, 2, 2], np.float32))], "resize", mode="nearest")
    h = net.op("AveragePool", [h], "avgpool", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = net.op("Relu", [net.conv(h, 6, 5, name="conv2", dead=[3])], "relu2")
    h = net.op("Flatten", [net.op(global_pool, [h], "gpool")], "flat")
    model = net.model({"x": ["N", 3, 6, 6]}, [net.gemm(h, 5, 3, name="fc")])
    _, groups = analyse(model)
    g2 = group_of_producer(groups, "conv2")
    (link,) = g2.consumers
    assert link.layer.name == "fc" and link.block == 1 and [n.name for n in link.path] == ["flat"]
    assert link.zero_sources == ("relu2",)
    feeds = image(rng)
    out, total = remove_all_dead(model, feeds)
    dead = relu_dead(model, feeds)  # relu2 has a channel dead on these feeds besides the planted one
    assert dead["relu1"][[0, 5]].all() and dead["relu2"][3] and total == removable_now(model, feeds) >= 3
    assert total == int(dead["relu1"].sum() + dead["relu2"].sum())
    assert weight(out, "fc").shape == (3, 5 - int(dead["relu2"].sum()))


@pytest.mark.parametrize("norm", ["bn", "bn folded", "instance"])
def test_normalisation_parameters_are_tied(rng, norm):
    net = Net(rng)
    h = net.conv("x", 3, 6, 3, name="conv1", pad=1, dead=[1, 2], bias=False)
    if norm == "instance":  # a zero channel normalises to its bias: -1 at the planted channels
        bias = rng.normal(0, 0.2, 6).astype(np.float32)
        bias[[1, 2]] = -1.0
        scale = net.const(np.ones(6, np.float32), "in_s")
        h = net.op("InstanceNormalization", [h, scale, net.const(bias, "in_b")], "in")
    else:
        h = net.bn(h, 6, name="bn", negative=[1, 2])
    model = net.model({"x": ["N", 3, 6, 6]}, [net.conv(net.op("Relu", [h], "relu1"), 6, 4, name="conv2")])
    fold = norm == "bn folded"
    _, groups = analyse(model, fold)
    g = group_of_producer(groups, "conv1")
    expected = {"bn": [("bn", i) for i in range(1, 5)], "bn folded": [], "instance": [("in", 1), ("in", 2)]}[norm]
    assert [(t.node.name, t.index) for t in g.tied] == expected
    out, _, result = rewrite(model, image(rng), "conv1", fold_bn=fold)
    assert result.removed == 2 and weight(out, "conv2").shape == (4, 4, 1, 1)
    if not fold:
        assert initializer(out, "bn_v" if norm == "bn" else "in_b").shape == (4,)
    loaded, groups = analyse(model)
    empty = remove_channels(loaded.graph, NameSource(loaded.graph), group_of_producer(groups, "conv1"), [])
    assert empty.removed == 0 and to_model_proto(loaded.graph, loaded.ctx).graph.node == model.graph.node


def test_prelu_slope_is_tied(rng):
    net = Net(rng)
    h = net.op("Relu", [net.conv("x", 3, 6, 3, name="conv1", pad=1, dead=[4])], "relu1")
    h = net.op("PRelu", [h, net.const(rng.uniform(0.1, 0.3, (6, 1, 1)).astype(np.float32), "slope")], "prelu")
    model = net.model({"x": ["N", 3, 6, 6]}, [net.conv(h, 6, 4, name="conv2")])
    _, groups = analyse(model)
    g = group_of_producer(groups, "conv1")
    assert [(t.node.name, t.index, t.axis) for t in g.tied] == [("prelu", 1, 0)]
    assert g.consumers[0].zero_sources == ("relu1",)
    out, _, _ = rewrite(model, image(rng), "conv1")
    assert initializer(out, "slope").shape == (5, 1, 1)


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_flatten_block_into_gemm_and_reshape_target_shrinks(rng, flatten):
    net = Net(rng)
    h = net.op("Relu", [net.conv("x", 1, 6, 3, name="conv1", pad=1)], "relu1")
    h = net.op("Relu", [net.conv(h, 6, 8, name="conv2", dead=[2, 5])], "relu2")
    if flatten == "Flatten":
        h = net.op("Flatten", [h], "flat", axis=1)
    else:
        h = net.op("Reshape", [h, net.const(np.array([-1, 8 * 36], np.int64), "target")], "flat")
    model = net.model({"x": ["N", 1, 6, 6]}, [net.gemm(h, 8 * 36, 4, name="fc")])
    _, groups = analyse(model)
    (link,) = group_of_producer(groups, "conv2").consumers
    assert link.block == 36 and list(link.columns(np.array([1]))) == list(range(36, 72))
    assert (link.reshape is not None) == (flatten == "Reshape")
    out, _, _ = rewrite(model, image(rng, c=1), "conv2")
    assert weight(out, "fc").shape == (4, 6 * 36)
    if flatten == "Reshape":
        assert list(initializer(out, "target")) == [-1, 6 * 36]


def test_concat_offsets_and_tied_batchnorm_after_concat(rng):
    net = Net(rng)
    a = net.op("Relu", [net.conv("x", 3, 4, 3, name="convA", pad=1, dead=[1])], "reluA")
    b = net.op("Relu", [net.conv("x", 3, 5, 3, name="convB", pad=1, dead=[2])], "reluB")
    h = net.op("Concat", [a, b], "cat", axis=1)
    h = net.op("Relu", [net.bn(h, 9, name="bn", negative=[1, 6])], "reluC")
    model = net.model({"x": ["N", 3, 6, 6]}, [net.conv(h, 9, 4, name="conv2")])
    _, groups = analyse(model)
    ga, gb = group_of_producer(groups, "convA"), group_of_producer(groups, "convB")
    assert (ga.width, gb.width) == (4, 5) and (ga.consumers[0].offset, gb.consumers[0].offset) == (0, 4)
    assert gb.consumers[0].zero_sources == ("reluC",) and gb.member_channel("reluC", 2) == 6
    assert gb.member_channel("reluB", 2) == 2 and groups_of_relu(groups, "reluC") == (ga, gb)
    assert group_of_relu(groups, "reluC") is None
    assert [(t.node.name, t.map.shift) for t in gb.tied] == [("bn", 4)] * 4
    feeds = image(rng)
    out, total = remove_all_dead(model, feeds)
    assert total == removable_now(model, feeds) == 2
    assert weight(out, "conv2").shape == (4, 7, 1, 1) and initializer(out, "bn_s").shape == (7,)


def test_concat_then_flatten_maps_offset_blocks(rng):
    net = Net(rng)
    a = net.op("Relu", [net.conv("x", 3, 3, name="convA", dead=[0])], "reluA")
    b = net.op("Relu", [net.conv("x", 3, 4, name="convB", dead=[1, 3])], "reluB")
    h = net.op("Flatten", [net.op("MaxPool", [net.op("Concat", [a, b], "cat", axis=1)], "pool", kernel_shape=[2, 2],
                                  strides=[2, 2])], "flat")
    model = net.model({"x": ["N", 3, 4, 4]}, [net.gemm(h, 7 * 4, 2, name="fc")])
    _, groups = analyse(model)
    (link,) = group_of_producer(groups, "convB").consumers
    assert (link.offset, link.block) == (3, 4) and list(link.columns(np.array([1]))) == [16, 17, 18, 19]
    feeds = image(rng, side=4)
    out, total = remove_all_dead(model, feeds)
    assert total == removable_now(model, feeds) >= 3 and weight(out, "fc").shape[1] == 4 * (7 - total)


def _resnet(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv-BN-Relu stem (8), an identity block on 8, a projection block 8 -> 6, an identity block on 6.

    Relu after each Add. Planted: channels 2, 5 of the 8-stream and 1, 4 of the 6-stream are -1 before
    every Relu of their stream; channel 3 of the first block's inner layer likewise.
    """
    net = Net(rng)

    def cbr(x, cin, cout, name, dead, k=3, relu=True):
        h = net.bn(net.conv(x, cin, cout, k, name=name, pad=k // 2, dead=dead, bias=False), cout,
                   name=f"{name}_bn", negative=dead)
        return net.op("Relu", [h], f"{name}_relu") if relu else h

    s1 = cbr("x", 3, 8, "stem", [2, 5])
    h = cbr(cbr(s1, 8, 8, "b1a", [3]), 8, 8, "b1b", [2, 5], relu=False)
    s1 = net.op("Relu", [net.op("Add", [h, s1], "add1")], "relu1")
    h = cbr(cbr(s1, 8, 6, "b2a", []), 6, 6, "b2b", [1, 4], relu=False)
    proj = cbr(s1, 8, 6, "b2p", [1, 4], k=1, relu=False)
    s2 = net.op("Relu", [net.op("Add", [h, proj], "add2")], "relu2")
    h = cbr(cbr(s2, 6, 6, "b3a", []), 6, 6, "b3b", [1, 4], relu=False)
    s2 = net.op("Relu", [net.op("Add", [s2, h], "add3")], "relu3")
    h = net.op("Flatten", [net.op("GlobalAveragePool", [s2], "gap")], "flat")
    return net.model({"x": ["N", 3, 6, 6]}, [net.gemm(h, 6, 3, name="fc")])


@pytest.mark.parametrize("fold_bn", [False, True])
def test_resnet_residual_streams_are_single_groups(rng, fold_bn):
    model = _resnet(rng)
    loaded, _ = analyse(model, fold_bn)
    before = to_model_proto(loaded.graph, loaded.ctx).SerializeToString()
    groups = find_channel_groups(loaded.graph)
    assert to_model_proto(loaded.graph, loaded.ctx).SerializeToString() == before  # read-only
    assert [(s.node, s.reason) for s in groups.skips] == [("fc_out", "a tensor of the group is a graph output")]
    s1, s2 = group_of_producer(groups, "stem"), group_of_producer(groups, "b2b")
    assert {p.name for p in s1.producers} == {"stem", "b1b"} and {p.name for p in s2.producers} == {"b2b", "b2p", "b3b"}
    assert {c.layer.name: c.zero_sources for c in s1.consumers} == {
        "b1a": ("stem_relu",), "b2a": ("relu1",), "b2p": ("relu1",)}
    assert {c.layer.name: c.zero_sources for c in s2.consumers} == {"b3a": ("relu2",), "fc": ("relu3",)}
    assert len(s1.tied) == (0 if fold_bn else 8) and set(s2.relus) == {"relu2", "relu3"}
    assert group_of_producer(groups, "b1a").consumers[0].layer.name == "b1b"
    feeds = image(rng)
    out, total = remove_all_dead(model, feeds, fold_bn)
    assert total == removable_now(model, feeds, fold_bn) == 5
    assert weight(out, "stem").shape[0] == 6 and weight(out, "b1a").shape[0] == 7 and weight(out, "fc").shape == (3, 4)


def test_residual_add_of_relus_needs_every_member_zero(rng):
    net = Net(rng)
    a = net.op("Relu", [net.conv("x", 3, 5, 3, name="convA", pad=1, dead=[1, 2])], "reluA")
    b = net.op("Relu", [net.conv("x", 3, 5, 3, name="convB", pad=1, dead=[1])], "reluB")
    h = net.op("Add", [a, b], "add")
    model = net.model({"x": ["N", 3, 6, 6]}, [net.conv(h, 5, 4, name="conv2")])
    _, groups = analyse(model)
    g = group_of_producer(groups, "convA")
    assert g is group_of_producer(groups, "convB") and g.consumers[0].zero_sources == ("reluA", "reluB")
    feeds = image(rng)
    assert list(np.flatnonzero(g.zero_channels(relu_dead(model, feeds)))) == [1]
    out, _, _ = rewrite(model, feeds, "convA")
    assert weight(out, "convA").shape[0] == 4 and weight(out, "convB").shape[0] == 4


def test_layer_that_reads_and_writes_one_stream(rng):
    net = Net(rng)
    t0 = net.op("Relu", [net.conv("x", 3, 6, 3, name="conv0", pad=1, dead=[3])], "relu0")
    r1 = net.op("Relu", [net.conv(t0, 6, 6, name="conv1", dead=[3])], "relu1")
    h = net.op("Relu", [net.op("Add", [t0, r1], "add")], "relu2")
    model = net.model({"x": ["N", 3, 6, 6]}, [net.conv(h, 6, 4, name="conv2")])
    _, groups = analyse(model)
    g = group_of_producer(groups, "conv0")
    assert [p.name for p in g.producers] == ["conv0", "conv1"]
    assert {c.layer.name: c.zero_sources for c in g.consumers} == {"conv1": ("relu0",), "conv2": ("relu2",)}
    out, _, _ = rewrite(model, image(rng), "conv0")
    assert weight(out, "conv1").shape == (5, 5, 1, 1)


def test_depthwise_conv_continues_the_group(rng):
    net = Net(rng)
    h = net.op("Relu", [net.conv("x", 3, 6, name="conv1", dead=[0, 4])], "relu1")
    dw = net.conv(h, 6, 6, 3, name="dw", group=6, pad=1, dead=[0, 4], bias_value=-1.0)
    model = net.model({"x": ["N", 3, 6, 6]}, [net.conv(net.op("Relu", [dw], "relu2"), 6, 4, name="conv3")])
    _, groups = analyse(model)
    g = group_of_producer(groups, "conv1")
    assert [type(t) for t in g.tied] == [TiedDepthwise] and g.consumers[0].zero_sources == ("relu2",)
    assert group_of_producer(groups, "dw") is None
    out, _, _ = rewrite(model, image(rng), "conv1")
    dw_node = next(n for n in out.graph.node if n.name == "dw")
    assert weight(out, "dw").shape == (4, 1, 3, 3) and helper.get_attribute_value(dw_node.attribute[0]) == 4


def test_grouped_conv_consumer_removes_whole_stripes(rng):
    net = Net(rng)
    h = net.op("Relu", [net.conv("x", 3, 8, name="conv1", dead=[1, 2, 5])], "relu1")
    model = net.model({"x": ["N", 3, 6, 6]}, [net.conv(h, 8, 4, 3, name="gconv", group=2)])
    loaded, groups = analyse(model)
    g = group_of_producer(groups, "conv1")
    assert g.period == 4
    mask = np.zeros(8, bool)
    mask[[1, 2, 5]] = True
    assert list(np.flatnonzero(g.admissible(mask))) == [1, 5]
    assert "stripes" in removal_problem(g, [1])
    with pytest.raises(PassError, match="stripes"):
        remove_channels(loaded.graph, NameSource(loaded.graph), g, [2])
    out, _, _ = rewrite(model, image(rng), "conv1")
    assert weight(out, "gconv").shape == (4, 3, 3, 3) and weight(out, "conv1").shape[0] == 6


@pytest.mark.parametrize("sizes,opset", [("input", 17), ("attr", 11), ("equal", 18)])
def test_split_on_the_channel_axis(rng, sizes, opset):
    net = Net(rng, opset)
    h = net.op("Relu", [net.conv("x", 3, 8, name="conv1", dead=[1, 4, 6])], "relu1")
    split = {"input": {"inputs": [h, net.const(np.array([3, 5], np.int64))]},
             "attr": {"inputs": [h], "split": [3, 5]}, "equal": {"inputs": [h], "num_outputs": 2}}[sizes]
    first, second = net.op("Split", name="split", outputs=2, axis=1, **split)
    wide = 3 if sizes != "equal" else 4
    model = net.model({"x": ["N", 3, 6, 6]}, [net.op("Add", [net.conv(first, wide, 2, name="convA"),
                                                              net.conv(second, 8 - wide, 2, name="convB")], "y")])
    _, groups = analyse(model)
    g = group_of_producer(groups, "conv1")
    (window,) = [t for t in g.tied if isinstance(t, TiedWindow)]
    assert window.bounds == ((0, wide), (wide, 8)) and {c.offset for c in g.consumers} == {0, -wide}
    out, _, result = rewrite(model, image(rng), "conv1")
    assert result.removed == 3
    assert weight(out, "convA").shape[1] + weight(out, "convB").shape[1] == 5


def test_slice_on_the_channel_axis_and_unread_channels(rng):
    net = Net(rng)
    h = net.op("Relu", [net.conv("x", 3, 8, name="conv1", dead=[3])], "relu1")
    bounds = [net.const(np.array([v], np.int64), n) for v, n in ((2, "starts"), (7, "ends"), (1, "axes"))]
    model = net.model({"x": ["N", 3, 6, 6]}, [net.conv(net.op("Slice", [h] + bounds, "slice"), 5, 3, name="conv2")])
    _, groups = analyse(model)
    g = group_of_producer(groups, "conv1")
    assert g.consumers[0].map == ChannelMap(-2, 2, 7)
    feeds = image(rng)
    assert list(np.flatnonzero(g.zero_channels(relu_dead(model, feeds)))) == [0, 1, 3, 7]  # 0, 1, 7: never read
    out, _, _ = rewrite(model, feeds, "conv1")
    assert weight(out, "conv1").shape[0] == 4 and weight(out, "conv2").shape[1] == 4
    assert (initializer(out, "starts")[0], initializer(out, "ends")[0]) == (0, 4)


def test_matmul_on_3d_tensors_uses_the_last_axis(rng):
    net = Net(rng)
    w1 = rng.normal(0, 0.5, (5, 6)).astype(np.float32)
    w1[:, [1, 3]] = 0.0
    b1 = rng.normal(0, 0.2, 6).astype(np.float32)
    b1[[1, 3]] = 0.0
    h = net.op("Add", [net.op("MatMul", ["x", net.const(w1, "w1")], "mm1"), net.const(b1, "b1")], "bias1")
    h = net.op("Mul", [net.op("Relu", [h], "relu1"), net.const(rng.uniform(1, 2, 6).astype(np.float32), "scale")],
               "mul")
    h = net.op("MatMul", [h, net.const(rng.normal(0, 0.5, (6, 3)).astype(np.float32), "w2")], "mm2")
    model = net.model({"x": ["B", 7, 5]}, [h])
    _, groups = analyse(model)
    g = group_of_producer(groups, "mm1")
    assert [(t.node.name, t.axis) for t in g.tied] == [("mul", 0)]
    feeds = {"x": rng.normal(0, 1, (2, 7, 5)).astype(np.float32)}
    out, _, result = rewrite(model, feeds, "mm1")
    assert result.removed == 2 and initializer(out, "w2").shape == (4, 3)


def _reader(rng, kind: str) -> onnx.ModelProto:
    net = Net(rng)
    h = net.op("Relu", [net.conv("x", 3, 8, name="conv1")], "relu1")
    if kind == "Transpose":
        y = net.op("Transpose", [h], "reader", perm=[0, 2, 3, 1])
    elif kind == "Softmax":
        y = net.op("Softmax", [h], "reader", axis=1)
    elif kind == "Shape":
        y = net.op("Shape", [h], "reader")
    elif kind == "Reshape":
        y = net.op("Reshape", [h, net.const(np.array([0, 4, -1], np.int64))], "reader")
    elif kind == "graph output":
        return net.model({"x": ["N", 3, 6, 6]}, [h, net.conv(h, 8, 2, name="conv2")])
    elif kind == "twice":
        y = net.conv(net.op("Concat", [h, h], "reader", axis=1), 16, 2, name="conv2")
    elif kind == "broadcast":
        gate = net.conv("x", 3, 1, name="gate")
        y = net.conv(net.op("Mul", [h, gate], "reader"), 8, 2, name="conv2")
    else:  # a Conv whose weight is a graph input
        y = net.op("Conv", [h, "wx"], "reader")
        model = net.model({"x": ["N", 3, 6, 6], "wx": [2, 8, 1, 1]}, [y])
        return model
    return net.model({"x": ["N", 3, 6, 6]}, [y])


@pytest.mark.parametrize("kind,reason", [
    ("Transpose", "read by Transpose (not channel-wise)"),
    ("Softmax", "read by Softmax (not channel-wise)"),
    ("Shape", "read by Shape"),
    ("Reshape", "Reshape that mixes channels"),
    ("graph output", "graph output"),
    ("twice", "the same tensor enters the Concat more than once"),
    ("broadcast", "channel axes cannot be matched"),
    ("weight input", "is not a constant"),
])
def test_must_not_fire(rng, kind, reason):
    _, groups = analyse(_reader(rng, kind))
    assert group_of_producer(groups, "conv1") is None
    assert any(reason in s.reason for s in groups.skips), groups.skips


def _zero_consumer_columns(loaded, group, remove: np.ndarray) -> None:
    """The reference for a removal: the consumers ignore the channels (weight columns 0), nothing else changes."""
    names = NameSource(loaded.graph)
    for c in group.consumers:
        w = c.layer.weight.copy()
        if c.layer.kind == "conv" and c.layer.group > 1:
            per, rows = w.shape[1], w.shape[0] // c.layer.group
            for col in c.columns(remove):
                g, j = divmod(int(col), per)
                w[g * rows:(g + 1) * rows, j] = 0.0
        else:
            w[:, c.columns(remove)] = 0.0
        write_linear_layer(loaded.graph, names, c.layer, w, c.layer.bias)


@pytest.mark.real
@pytest.mark.parametrize("name,shape", [("trained/own_fmnist_cnn_bn.onnx", None),
                                        ("real/ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192))])
def test_real_model_every_group_removes_consistently(rng, name, shape):
    """Removing random channels of each group equals ignoring them at the consumers (any missed reader breaks it)."""
    path = shared_path("models", *name.split("/"))

    def fresh():
        loaded = load_model(path)
        canonicalize(loaded.graph)
        return loaded, find_channel_groups(loaded.graph)

    loaded, groups = fresh()
    (inp,) = to_model_proto(loaded.graph, loaded.ctx).graph.input
    dims = shape or [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    feeds = {inp.name: rng.normal(0, 1, dims).astype(np.float32)}
    assert groups.groups
    for index in range(len(groups.groups)):
        ref, ref_groups = fresh()
        g = ref_groups.groups[index]
        stripes = rng.random(g.period) < 0.35
        stripes[0] = False
        remove = np.flatnonzero(np.tile(stripes, g.width // g.period))
        _zero_consumer_columns(ref, g, remove)
        new, new_groups = fresh()
        remove_channels(new.graph, NameSource(new.graph), new_groups.groups[index], remove)
        new.graph.cleanup().toposort()
        refresh_shapes(new.graph)
        out = to_model_proto(new.graph, new.ctx)
        onnx.checker.check_model(out, full_check=True)
        assert_same_outputs(to_model_proto(ref.graph, ref.ctx), out, feeds)
