"""Text-like images built from the MNIST test digits, for the PP-OCR models (which random data cannot exercise).

PP-OCRv4 det gives a text probability of about 5e-10 everywhere on uniform noise, so every output comparison on
random data compares zeros; the PP-OCR direction classifier is at chance on it. Handwritten digits set side by
side on white paper are text to both: the classifier tells upright lines from lines turned 180 degrees on 74-77 % of
them, and the detector marks the lines (about a tenth of a page's pixels above 0.3).

* :func:`text_lines`: ``n x 3 x 48 x 192`` lines of 5-7 digits, half of them turned 180 degrees (label 1),
  normalised as PaddleOCR's classifier expects (``(x - 0.5) / 0.5``).
* :func:`text_pages`: ``n x 3 x side x side`` pages of such lines, normalised as PaddleOCR's detector expects
  (ImageNet mean and standard deviation).

Both are reproducible from ``seed``: a different seed gives different samples (held-out data).
"""
from __future__ import annotations

import numpy as np

from conftest import read_idx, shared_path

LINE_HEIGHT, LINE_WIDTH, GLYPH = 48, 192, 40
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def _digits() -> np.ndarray:
    return read_idx(shared_path("data", "mnist", "t10k-images-idx3-ubyte.gz")).astype(np.float32) / 255.0


def _line(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One ``48 x 192`` line of ink-on-paper digits (1 = white), glyphs scaled to 40 px, spacing jittered."""
    canvas = np.ones((LINE_HEIGHT, LINE_WIDTH), np.float32)
    scale = (np.arange(GLYPH) * 28 / GLYPH).astype(int)
    x = int(rng.integers(2, 12))
    while True:
        glyph = digits[rng.integers(len(digits))][scale][:, scale]
        width = 24 + int(rng.integers(0, 8))
        glyph = glyph[:, (GLYPH - width) // 2:(GLYPH - width) // 2 + width]
        if x + width > LINE_WIDTH:
            return canvas
        window = canvas[4:4 + GLYPH, x:x + width]
        canvas[4:4 + GLYPH, x:x + width] = np.minimum(window, 1.0 - glyph)
        x += width + int(rng.integers(-4, 3))


def text_lines(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images ``n x 3 x 48 x 192``, labels: 1 where the line is turned 180 degrees)."""
    digits, rng = _digits(), np.random.default_rng([seed, 1])
    images, labels = np.empty((n, 3, LINE_HEIGHT, LINE_WIDTH), np.float32), np.zeros(n, np.int64)
    for i in range(n):
        line = _line(digits, rng)
        labels[i] = i % 2
        if labels[i]:
            line = line[::-1, ::-1]
        images[i] = (line - 0.5) / 0.5
    return images, labels


def text_pages(n: int, side: int, seed: int = 0) -> np.ndarray:
    """``n x 3 x side x side`` pages: lines of digits, each cut to a random width, one below the other."""
    digits, rng = _digits(), np.random.default_rng([seed, 2])
    pages = np.empty((n, 3, side, side), np.float32)
    for i in range(n):
        page = np.ones((side, side), np.float32)
        y = int(rng.integers(4, 20))
        while y + LINE_HEIGHT <= side:
            width = int(rng.integers(side // 2, side + 1))
            line = np.ones((LINE_HEIGHT, width), np.float32)
            for x in range(0, width, LINE_WIDTH):  # wide pages: lines side by side
                piece = _line(digits, rng)[:, :width - x]
                line[:, x:x + piece.shape[1]] = piece
            page[y:y + LINE_HEIGHT, :width] = line
            y += LINE_HEIGHT + int(rng.integers(0, 20))
        pages[i] = (page[None] - IMAGENET_MEAN) / IMAGENET_STD
    return pages
