import numpy as np
import pytest

from conftest import cnn_model, mlp_model, run
from onnx_lincomp.calibration import (
    CollectOptions,
    ReluStats,
    StatsSet,
    collect_relu_stats,
    input_specs,
    open_calibration,
)
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.errors import CalibrationDataError
from onnx_lincomp.model_io import model_from_proto


def _loaded(model):
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    return loaded


def _reference(model, x, tensors, axis):
    """numpy statistics from the pre-activation tensors dumped as graph outputs."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in tensors:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    outs = run(m, {"x": x})[1:]
    return [ReluStats.from_pre_activation(t, t, z, axis) for t, z in zip(tensors, outs, strict=True)]


def _assert_equal_stats(got: ReluStats, ref: ReluStats):
    for f in ("positive", "sample_active", "sample_linear"):
        np.testing.assert_array_equal(getattr(got, f), getattr(ref, f), err_msg=f)
    np.testing.assert_allclose(got.act_max, ref.act_max, rtol=1e-6)
    np.testing.assert_allclose(got.act_sum, ref.act_sum, rtol=1e-4, atol=1e-4)
    assert (got.positions, got.n_samples) == (ref.positions, ref.n_samples)


@pytest.mark.parametrize("mode", ["auto", "pre"])
def test_conv_stats_match_numpy_reference(tmp_path, rng, mode):
    model = cnn_model(rng, dead=[1], linear=[2])
    x = rng.random((37, 1, 6, 6), dtype=np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    loaded = _loaded(model)
    stats = collect_relu_stats(loaded.graph, loaded.ctx,
                               open_calibration(tmp_path / "d.npz", input_specs(loaded.graph)),
                               CollectOptions(batch_size=8, mode=mode))
    refs = _reference(model, x, ["c1", "c2"], 1)
    assert [s.observed for s in stats.layers] == (["post", "post"] if mode == "auto" else ["pre", "pre"])
    for got, ref in zip(stats.layers, refs, strict=True):
        _assert_equal_stats(got, ref)
    assert stats.layers[0].dead[1] and stats.layers[0].always_active[2]
    if mode == "pre":
        np.testing.assert_allclose(stats.layers[0].pre_min, refs[0].pre_min, rtol=1e-6)


def test_mlp_stats_exact_including_pre_activation(tmp_path, rng):
    model = mlp_model(rng, [6, 9, 5, 3], dead={0: [2]}, linear={1: [0, 4]})
    x = rng.random((50, 6), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    loaded = _loaded(model)
    stats = collect_relu_stats(loaded.graph, loaded.ctx,
                               open_calibration(tmp_path / "x.npy", input_specs(loaded.graph)),
                               CollectOptions(batch_size=7))
    refs = _reference(model, x, ["z0", "z1"], 1)
    for got, ref in zip(stats.layers, refs, strict=True):
        _assert_equal_stats(got, ref)
        np.testing.assert_allclose(got.pre_min, ref.pre_min, rtol=1e-6)
        np.testing.assert_allclose(got.pre_max, ref.pre_max, rtol=1e-6)
    assert stats.layers[0].dead.tolist().count(True) >= 1 and stats.layers[1].always_active[[0, 4]].all()


def test_shards_merge_to_one_pass(tmp_path, rng):
    model = cnn_model(rng)
    x = rng.random((30, 1, 6, 6), dtype=np.float32)
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez_compressed(shards / "a.npz", x=x[:11])
    np.savez(shards / "b.npz", x=x[11:])
    np.savez(tmp_path / "all.npz", x=x)
    loaded = _loaded(model)
    specs = input_specs(loaded.graph)
    one = collect_relu_stats(loaded.graph, loaded.ctx, open_calibration(tmp_path / "all.npz", specs),
                             CollectOptions(batch_size=30))
    sharded = collect_relu_stats(loaded.graph, loaded.ctx, open_calibration(shards, specs),
                                 CollectOptions(batch_size=4))
    a = collect_relu_stats(loaded.graph, loaded.ctx, open_calibration(shards / "a.npz", specs))
    b = collect_relu_stats(loaded.graph, loaded.ctx, open_calibration(shards / "b.npz", specs))
    for merged in (sharded, a.merge(b), b.merge(a)):
        for got, ref in zip(merged.layers, one.layers, strict=True):
            _assert_equal_stats(got, ref)


def test_stats_save_and_load(tmp_path, rng):
    model = mlp_model(rng, [4, 6, 2])
    loaded = _loaded(model)
    stats = collect_relu_stats(loaded.graph, loaded.ctx, open_calibration("random:20", input_specs(loaded.graph)))
    assert stats.random
    stats.save(tmp_path / "s.npz")
    back = StatsSet.load(tmp_path / "s.npz")
    assert back.source == stats.source and back.random
    _assert_equal_stats(back.layers[0], stats.layers[0])
    with pytest.raises(CalibrationDataError):
        StatsSet.load(tmp_path / "missing.npz")


def _open(tmp_path, model, **arrays):
    np.savez(tmp_path / "bad.npz", **arrays)
    loaded = _loaded(model)
    return open_calibration(tmp_path / "bad.npz", input_specs(loaded.graph)), loaded


@pytest.mark.parametrize("arrays,message", [
    ({"wrong": np.zeros((3, 4), np.float32), "other": np.zeros((3, 4), np.float32)}, "no array for input 'x'"),
    ({"x": np.zeros((3, 5), np.float32)}, "expects float32[Nx4], found shape (3, 5)"),
    ({"x": np.zeros((3, 4, 1, 1), np.float32)}, "expects rank 2"),
    ({"x": np.zeros((3, 4, 1), np.float32)}, "found shape (3, 4, 1) (axis 2)"),
    ({"x": np.zeros((3, 4), np.int64)}, "expects float32, found int64"),
    ({"x": np.zeros((0, 4), np.float32)}, "empty"),
])
def test_bad_calibration_data_is_named(tmp_path, rng, arrays, message):
    with pytest.raises(CalibrationDataError) as err:
        _open(tmp_path, mlp_model(rng, [4, 3, 2]), **arrays)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_nan_is_reported_with_sample_index(tmp_path, rng):
    x = rng.random((10, 4), dtype=np.float32)
    x[7, 2] = np.nan
    source, loaded = _open(tmp_path, mlp_model(rng, [4, 3, 2]), x=x)
    with pytest.raises(CalibrationDataError, match=r"input 'x' has NaN or Inf values \(sample 7\)"):
        collect_relu_stats(loaded.graph, loaded.ctx, source, CollectOptions(batch_size=4))


def test_random_calibration_uses_input_shape_override(rng):
    loaded = _loaded(cnn_model(rng))
    source = open_calibration("random:5", input_specs(loaded.graph), shape_overrides={"x": (1, 1, 6, 6)})
    batch = next(iter(source.batches(5)))
    assert batch["x"].shape == (5, 1, 6, 6) and batch["x"].dtype == np.float32
    with pytest.raises(CalibrationDataError, match="random:N"):
        open_calibration("random:abc", input_specs(loaded.graph))


def test_compressed_and_stored_npz_stream_identically(tmp_path, rng):
    x = rng.random((23, 4), dtype=np.float32)
    np.savez(tmp_path / "s.npz", x=x)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    loaded = _loaded(mlp_model(rng, [4, 3, 2]))
    for name in ("s.npz", "c.npz"):
        src = open_calibration(tmp_path / name, input_specs(loaded.graph), max_samples=20)
        got = np.concatenate([b["x"] for b in src.batches(6)])
        np.testing.assert_array_equal(got, x[:20])
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in src.batches(4, 5, 13)]), x[5:13])
