"""Train the bundled examples on scikit-learn's digits and write them into onnx_lincomp/examples/.

    python benchmarks/make_examples.py

* digits_mlp.onnx: MLP 64-96-64-10 (Gemm transB=1 + Relu, PyTorch layout), scikit-learn MLPClassifier.
* digits_cnn.onnx: Conv(1->8,3x3,pad1)-Relu-MaxPool-Conv(8->16,3x3,pad1)-Relu-Flatten-Gemm(10), trained
  here with numpy (im2col, Adam), input (N,1,8,8).
Both read pixels scaled to [0, 1]. The calibration .npz files hold the 30% held-out split (seed 0) as
the model input (key = input name) and integer labels ``y``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

OUT = Path(__file__).resolve().parent.parent / "onnx_lincomp" / "examples"
OPSET = 17


def data():
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    return train_test_split(x, d.target.astype(np.int64), test_size=0.3, random_state=0, stratify=d.target)


def save(model: onnx.ModelProto, name: str) -> None:
    model.producer_name = "onnx-lincomp make_examples"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, OUT / name)


def mlp(xtr, xte, ytr, yte) -> None:
    clf = MLPClassifier(hidden_layer_sizes=(96, 64), alpha=1e-3, max_iter=600, random_state=0).fit(xtr, ytr)
    print(f"digits-mlp held-out accuracy {clf.score(xte, yte):.4f}")
    nodes, inits, x = [], [], "input"
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True)):
        inits += [numpy_helper.from_array(w.T.astype(np.float32), f"fc{i}.weight"),
                  numpy_helper.from_array(b.astype(np.float32), f"fc{i}.bias")]
        out = f"fc{i}" if i < len(clf.coefs_) - 1 else "logits"
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [out], name=f"fc{i}", transB=1))
        if i < len(clf.coefs_) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
    graph = helper.make_graph(nodes, "digits_mlp",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), "digits_mlp.onnx")
    np.savez(OUT / "digits_mlp_calib.npz", input=xte, y=yte)


# ---- a tiny numpy CNN ---------------------------------------------------------------------------
def im2col(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(p, (3, 3), axis=(2, 3))  # n,c,h,w,3,3
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n, h * w, c * 9)


def col2im(cols: np.ndarray, shape) -> np.ndarray:
    n, c, h, w = shape
    g = cols.reshape(n, h, w, c, 3, 3)
    out = np.zeros((n, c, h + 2, w + 2), cols.dtype)
    for i in range(3):
        for j in range(3):
            out[:, :, i:i + h, j:j + w] += g[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return out[:, :, 1:-1, 1:-1]


def conv_fwd(x, w, b):
    cols = im2col(x)
    y = cols @ w.reshape(w.shape[0], -1).T + b
    n, _, h, ww = x.shape
    return y.reshape(n, h, ww, -1).transpose(0, 3, 1, 2), cols


def conv_bwd(dy, cols, w, xshape):
    n, f, h, ww = dy.shape
    d = dy.transpose(0, 2, 3, 1).reshape(n, h * ww, f)
    dw = np.einsum("npf,npk->fk", d, cols).reshape(w.shape)
    db = d.sum(axis=(0, 1))
    dx = col2im(d @ w.reshape(f, -1), xshape)
    return dx, dw, db


def cnn_forward(p, x):
    z1, c1 = conv_fwd(x, p["w1"], p["b1"])
    a1 = np.maximum(z1, 0)
    n, c, h, w = a1.shape
    blocks = a1.reshape(n, c, h // 2, 2, w // 2, 2)
    m1 = blocks.max(axis=(3, 5))
    z2, c2 = conv_fwd(m1, p["w2"], p["b2"])
    a2 = np.maximum(z2, 0)
    flat = a2.reshape(n, -1)
    logits = flat @ p["w3"].T + p["b3"]
    return logits, (x, z1, c1, a1, blocks, m1, z2, c2, a2, flat)


def cnn_grads(p, x, y):
    logits, (x, z1, c1, a1, blocks, m1, z2, c2, a2, flat) = cnn_forward(p, x)
    e = np.exp(logits - logits.max(1, keepdims=True))
    prob = e / e.sum(1, keepdims=True)
    prob[np.arange(len(y)), y] -= 1
    dl = prob / len(y)
    g = {"w3": dl.T @ flat, "b3": dl.sum(0)}
    da2 = (dl @ p["w3"]).reshape(a2.shape) * (z2 > 0)
    dm1, g["w2"], g["b2"] = conv_bwd(da2, c2, p["w2"], m1.shape)
    mask = blocks == m1[:, :, :, None, :, None]
    da1 = (mask * dm1[:, :, :, None, :, None]).reshape(a1.shape) * (z1 > 0)
    _, g["w1"], g["b1"] = conv_bwd(da1, c1, p["w1"], x.shape)
    return g


def cnn(xtr, xte, ytr, yte) -> None:
    rng = np.random.default_rng(0)
    p = {"w1": rng.normal(0, np.sqrt(2 / 9), (8, 1, 3, 3)), "b1": np.zeros(8),
         "w2": rng.normal(0, np.sqrt(2 / 72), (16, 8, 3, 3)), "b2": np.zeros(16),
         "w3": rng.normal(0, np.sqrt(1 / 256), (10, 256)), "b3": np.zeros(10)}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    xtr4, xte4 = xtr.reshape(-1, 1, 8, 8).astype(np.float64), xte.reshape(-1, 1, 8, 8)
    step = 0
    for _epoch in range(40):
        order = rng.permutation(len(xtr4))
        for s in range(0, len(order), 32):
            idx = order[s:s + 32]
            g = cnn_grads(p, xtr4[idx], ytr[idx])
            step += 1
            for k in p:
                m[k] = 0.9 * m[k] + 0.1 * g[k]
                v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
                p[k] -= 3e-3 * (m[k] / (1 - 0.9**step)) / (np.sqrt(v[k] / (1 - 0.999**step)) + 1e-8)
    acc = (cnn_forward(p, xte4.astype(np.float64))[0].argmax(1) == yte).mean()
    print(f"digits-cnn held-out accuracy {acc:.4f}")
    f32 = {k: val.astype(np.float32) for k, val in p.items()}
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1"], name="conv1", pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", "conv2.weight", "conv2.bias"], ["conv2"], name="conv2", pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("Flatten", ["relu2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(f32[a], b)
             for a, b in (("w1", "conv1.weight"), ("b1", "conv1.bias"), ("w2", "conv2.weight"),
                          ("b2", "conv2.bias"), ("w3", "fc.weight"), ("b3", "fc.bias"))]
    graph = helper.make_graph(nodes, "digits_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), "digits_cnn.onnx")
    np.savez(OUT / "digits_cnn_calib.npz", input=xte.reshape(-1, 1, 8, 8), y=yte)


if __name__ == "__main__":
    xtr, xte, ytr, yte = data()
    mlp(xtr, xte, ytr, yte)
    cnn(xtr, xte, ytr, yte)
