"""The text-like images built from MNIST digits for the PP-OCR models: reproducible, and text to the models
(where uniform noise is not)."""
import numpy as np
import onnxruntime as ort

from conftest import shared_path
from text_images import text_lines, text_pages


def _session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(shared_path("models", "real", name)), providers=["CPUExecutionProvider"])


def test_lines_are_reproducible_and_labelled():
    x, y = text_lines(6, seed=3)
    again, _ = text_lines(6, seed=3)
    other, _ = text_lines(6, seed=4)
    assert x.shape == (6, 3, 48, 192) and x.dtype == np.float32 and np.array_equal(x, again)
    assert not np.array_equal(x, other) and list(y) == [0, 1, 0, 1, 0, 1]
    assert x.min() >= -1.0 and x.max() == 1.0  # (paper - 0.5) / 0.5: white paper is 1, ink goes towards -1
    # a turned line is the upright one rotated by 180 degrees: its ink sits in the mirrored rows
    ink = (x[:, 0] < 0).sum(axis=2)
    assert ink[0, :4].sum() == 0 and ink[1, -4:].sum() == 0


def test_the_direction_classifier_reads_the_lines():
    x, y = text_lines(200)
    scores = _session("ch_ppocr_mobile_v2.0_cls_infer.onnx").run(None, {"x": x})[0]
    assert (scores.argmax(axis=1) == y).mean() > 0.65  # chance is 0.5; measured 0.74


def test_the_detector_finds_text_on_pages_and_none_in_noise():
    det = _session("ch_PP-OCRv4_det_infer.onnx")
    pages = text_pages(2, 160)
    assert pages.shape == (2, 3, 160, 160)
    text = np.concatenate([det.run(None, {"x": p[None]})[0] for p in pages])
    noise = det.run(None, {"x": np.random.default_rng(0).random((1, 3, 160, 160), dtype=np.float32)})[0]
    assert (text > 0.3).mean() > 0.05 and (noise > 0.3).mean() == 0.0
