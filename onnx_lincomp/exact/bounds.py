"""Sound pre-activation bounds over an input box: interval arithmetic, then a linear relaxation.

Interval: with ``W = W+ + W-`` (positive and negative parts), ``z in [W+ l + W- u + b, W+ u + W- l + b]``.

Linear relaxation (CROWN / DeepPoly back-substitution): every Relu with bounds ``l < 0 < u`` is
enclosed by ``alpha z <= relu(z) <= lam (z - l)`` with ``lam = u / (u - l)`` and ``alpha = 1`` when
``u >= -l`` else 0; stable units are exact (identity or zero). The bound on a layer's pre-activation
is written as a linear function of the input by substituting the relaxations layer by layer
(upper bounds use the upper relaxation where the coefficient is positive and the lower one where it is
negative; lower bounds the opposite), then maximised or minimised over the box in closed form.
Each layer keeps the tighter of the interval and the relaxed bound, and the next layer's relaxation is
built from those tightened bounds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chain import AffineChain


@dataclass(frozen=True, eq=False)
class LayerBounds:
    lower: np.ndarray
    upper: np.ndarray


def interval_layer(weight: np.ndarray, bias: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> LayerBounds:
    wp, wn = np.maximum(weight, 0), np.minimum(weight, 0)
    return LayerBounds(wp @ lo + wn @ hi + bias, wp @ hi + wn @ lo + bias)


def interval_bounds(chain: AffineChain, lo: np.ndarray, hi: np.ndarray) -> list[LayerBounds]:
    out = []
    for layer in chain.layers:
        b = interval_layer(layer.weight, layer.bias, lo, hi)
        out.append(b)
        lo, hi = np.maximum(b.lower, 0), np.maximum(b.upper, 0)
    return out


def _relaxation(b: LayerBounds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(upper slope, upper offset, lower slope) of relu(z) per unit."""
    lo, u = b.lower, b.upper
    active, inactive = lo >= 0, u <= 0
    unstable = ~(active | inactive)
    lam = np.where(active, 1.0, 0.0)
    mu = np.zeros_like(lo)
    denom = np.where(unstable, u - lo, 1.0)
    lam = np.where(unstable, u / denom, lam)
    mu = np.where(unstable, -lam * lo, mu)
    alpha = np.where(active, 1.0, np.where(unstable & (u >= -lo), 1.0, 0.0))
    return lam, mu, alpha


def _back_substitute(chain: AffineChain, k: int, relax: list, lo: np.ndarray, hi: np.ndarray,
                     upper: bool) -> np.ndarray:
    layer = chain.layers[k]
    coef, const = layer.weight.copy(), layer.bias.copy()
    for j in range(k - 1, -1, -1):
        lam, mu, alpha = relax[j]
        pos, neg = np.maximum(coef, 0), np.minimum(coef, 0)
        if upper:
            const = const + pos @ mu
            coef = pos * lam + neg * alpha
        else:
            const = const + neg @ mu
            coef = pos * alpha + neg * lam
        const = const + coef @ chain.layers[j].bias
        coef = coef @ chain.layers[j].weight
    pos, neg = np.maximum(coef, 0), np.minimum(coef, 0)
    return const + (pos @ hi + neg @ lo if upper else pos @ lo + neg @ hi)


def relaxed_bounds(chain: AffineChain, lo: np.ndarray, hi: np.ndarray) -> tuple[list[LayerBounds], list[LayerBounds]]:
    """(interval bounds, tightened bounds) per layer; tightened = interval intersected with the relaxation."""
    interval = interval_bounds(chain, lo, hi)
    tight: list[LayerBounds] = []
    relax = []
    h_lo, h_hi = lo, hi
    for k, layer in enumerate(chain.layers):
        ib = interval_layer(layer.weight, layer.bias, h_lo, h_hi)
        if k == 0:
            b = ib
        else:
            up = _back_substitute(chain, k, relax, lo, hi, upper=True)
            low = _back_substitute(chain, k, relax, lo, hi, upper=False)
            b = LayerBounds(np.maximum(ib.lower, low), np.minimum(ib.upper, up))
        tight.append(b)
        relax.append(_relaxation(b))
        h_lo, h_hi = np.maximum(b.lower, 0), np.maximum(b.upper, 0)
    return interval, tight
