"""The onnx package's model-zoo test graphs (``onnx/backend/test/data/light``): weights built by
``ConstantOfShape``, so every layer was skipped as "weight is not a constant" before constant folding.

Fast: re-serialising an unchanged model does not grow it; canonicalisation folds the weights so that every
linear layer is matched, except those whose folded weight is over the 64 MiB limit. Slower (``real``): the
full optimisation on ``random:8`` keeps the outputs on the calibration inputs (relative 1e-4). A model
missing from the installed onnx is skipped.
"""
import time
from pathlib import Path

import onnx
import pytest

from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.linear_layer import LinearLayer, Skip, match_linear_layer
from onnx_lincomp.model_io import load_model, to_model_proto
from onnx_lincomp.optimize import OptimizeOptions, optimize
from onnx_lincomp.recipe import CalibrationSettings, Recipe

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
NAMES = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
         "vgg19", "zfnet512"]
OVER_LIMIT = "result larger than the size limit of 64 MiB (stays computed)"


def light_path(name: str) -> Path:
    path = LIGHT / f"light_{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is not part of the installed onnx package")
    return path


def _layers(graph):
    found = [match_linear_layer(graph, n) for n in graph.nodes]
    return [x for x in found if isinstance(x, LinearLayer)], [x for x in found if isinstance(x, Skip)]


@pytest.mark.parametrize("name", NAMES)
def test_unchanged_light_model_reserialises_no_larger(name):
    path = light_path(name)
    loaded = load_model(path)
    size = len(to_model_proto(loaded.graph, loaded.ctx).SerializeToString())
    assert size <= path.stat().st_size * 1.01, (name, size, path.stat().st_size)


@pytest.mark.parametrize("name", NAMES)
def test_light_model_weights_are_folded_and_layers_matched(name):
    loaded = load_model(light_path(name))
    matched_before, skipped_before = _layers(loaded.graph)
    assert not matched_before and skipped_before
    report = canonicalize(loaded.graph, ctx=loaded.ctx)
    folding = report.folding
    assert folding.nodes_folded > 0 and folding.bytes_folded > 0 and folding.error == ""
    matched, skipped = _layers(loaded.graph)
    over_limit = folding.skipped.get(OVER_LIMIT, 0)
    assert set(folding.skipped) <= {OVER_LIMIT}
    assert len(skipped) == over_limit and all("is not a constant" in s.reason for s in skipped)
    assert len(matched) + len(skipped) == len(matched_before) + len(skipped_before)
    ops = {n.op for n in loaded.graph.nodes}
    assert "ConstantOfShape" not in ops or over_limit
    if "BatchNormalization" in {n.op_type for n in onnx.load(light_path(name)).graph.node} and name != "densenet121":
        assert report.batchnorms_folded > 0 and not report.skipped  # densenet's BNs follow Concat/pools


@pytest.mark.real
@pytest.mark.parametrize("name", NAMES)
def test_light_model_optimises_with_unchanged_outputs(name, record_property):
    path = light_path(name)
    options = OptimizeOptions(Recipe(calibration=CalibrationSettings(0.0)), latency=False, allow_larger=True,
                              min_samples=8)
    start = time.perf_counter()
    result = optimize(path, "random:8", options)
    seconds = time.perf_counter() - start
    record_property("optimize_seconds", round(seconds, 2))
    print(f"{name}: optimize {seconds:.1f} s, parameters {result.report.before.params:,} -> "
          f"{result.report.after.params:,}")
    onnx.checker.check_model(result.model)
    v = result.report.on_calibration
    assert v.samples == 8 and v.non_finite == 0 and v.within(1e-4), (name, v.as_dict())
