"""The third-party models in ../shared/models and the data each is calibrated with (used by tests and benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conftest import read_idx, shared_path


@dataclass(frozen=True)
class RealModel:
    path: str
    data: str  # "mnist", "fmnist", "crepe", "digits", "text-lines", "text-pages" or "random"
    samples: int
    input_shapes: dict = field(default_factory=dict)
    feeds_extra: dict = field(default_factory=dict)


REAL_MODELS = [
    RealModel("exact-compression/serra_mnist_100x100.onnx", "mnist-flat", 2000),
    RealModel("exact-compression/serra_mnist_200x200.onnx", "mnist-flat", 2000),
    RealModel("exact-compression/serra_cifar10_400x400_l1_pruned.onnx", "random", 256),
    RealModel("exact-compression/serra_cifar100_400x400_l1_pruned.onnx", "random", 256),
    RealModel("real/onnxzoo_mnist-8.onnx", "mnist-raw", 200),
    RealModel("real/ortexamples_ultraface_RFB-320_bnfolded.onnx", "random", 4),
    RealModel("real/ultraface_version-RFB-320.onnx", "random", 4),
    # the PP-OCR models on MNIST digits set as text: uniform noise gives the detector an all-zero output
    RealModel("real/ch_PP-OCRv4_det_infer.onnx", "text-pages", 2, {"x": (1, 3, 96, 96)}),
    RealModel("real/ch_ppocr_mobile_v2.0_cls_infer.onnx", "text-lines", 8, {"x": (1, 3, 48, 192)}),
    RealModel("real/crepe_tiny.onnx", "crepe", 96),
    RealModel("real/silero_vad.onnx", "silero", 4),
    RealModel("real/basic_pitch_nmp.onnx", "random", 1, {"serving_default_input_2:0": (1, 43844, 1)}),
    RealModel("trained/own_fmnist_cnn_bn.onnx", "fmnist-4d", 500),
    RealModel("trained/own_fmnist_mlp_l1.onnx", "fmnist", 2000),
    RealModel("trained/skl_digits_mlp_nozipmap.onnx", "digits", 540),
]


def calibration_file(model: RealModel, out_dir: Path, start: int = 0) -> str:
    """Write the model's calibration data to an .npz (or return 'random:N')."""
    n = model.samples
    if model.data.startswith("mnist") or model.data.startswith("fmnist"):
        folder = "mnist" if model.data.startswith("mnist") else "fashion-mnist"
        images = read_idx(shared_path("data", folder, "t10k-images-idx3-ubyte.gz"))[start:start + n]
        labels = read_idx(shared_path("data", folder, "t10k-labels-idx1-ubyte.gz"))[start:start + n].astype(np.int64)
        x = images.astype(np.float32)
        name = {"mnist-flat": "input", "mnist-raw": "Input3", "fmnist": "input", "fmnist-4d": "input"}[model.data]
        if model.data == "mnist-flat":
            x = x.reshape(n, 784) / 255.0
        elif model.data == "mnist-raw":
            x = x.reshape(n, 1, 28, 28)
        elif model.data == "fmnist-4d":
            x = x.reshape(n, 1, 28, 28) / 255.0
        else:
            x = x / 255.0
        arrays = {name: x.astype(np.float32), "y": labels}
    elif model.data == "crepe":
        d = np.load(shared_path("data", "crepe_sine_eval.npz"))
        arrays = {"frames": d["X"][start:start + n].astype(np.float32)}
    elif model.data == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        arrays = {"X": (d.data[start:start + n] / 16.0).astype(np.float32),
                  "y": d.target[start:start + n].astype(np.int64)}
    elif model.data == "silero":
        rng = np.random.default_rng(0)
        arrays = {"input": rng.normal(0, 0.1, (n, 1, 512)).astype(np.float32),
                  "state": np.zeros((n, 2, 1, 128), np.float32), "sr": np.full(n, 16000, np.int64)}
    elif model.data == "text-lines":  # PP-OCR cls: MNIST digits as text lines, label 1 = turned 180 degrees
        from text_images import text_lines

        x, y = text_lines(n, seed=start)
        arrays = {"x": x, "y": y}
    elif model.data == "text-pages":  # PP-OCR det: pages of such lines at the model's input side
        from text_images import text_pages

        arrays = {"x": text_pages(n, model.input_shapes.get("x", (1, 3, 160, 160))[-1], seed=start)}
    else:
        return f"random:{n}"
    path = out_dir / (Path(model.path).stem + ".npz")
    np.savez(path, **arrays)
    return str(path)
