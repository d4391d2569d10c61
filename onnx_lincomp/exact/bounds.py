"""Sound pre-activation bounds over an input box: interval arithmetic, then a linear relaxation.

Interval: with ``W = W+ + W-`` (positive and negative parts), ``z in [W+ l + W- u + b, W+ u + W- l + b]``.

Linear relaxation (CROWN / DeepPoly back-substitution): every Relu with bounds ``l < 0 < u`` is
enclosed by ``alpha z <= relu(z) <= lam (z - l)`` with ``lam = u / (u - l)`` and ``alpha = 1`` when
``u >= -l`` else 0; stable units are exact (identity or zero). The bound on a layer's pre-activation
is written as a linear function of the input by substituting the relaxations layer by layer
(upper bounds use the upper relaxation where the coefficient is positive and the lower one where it is
negative; lower bounds the opposite), then maximised or minimised over the box in closed form.
Each layer keeps the tighter of the interval and the relaxed bound, and the next layer's relaxation is
built from those tightened bounds. Layers form a DAG (residual ``Add``, ``Concat``): the substitution
accumulates one coefficient matrix per source and visits the sources latest first. A max-pool output ``m``
of inputs ``z_p`` is bounded below by ``z_{p*}`` (``p*`` the input with the largest lower bound) and above
by the constant ``max_p u_p``, or equals ``z_{p*}`` when ``l_{p*}`` is at least every other input's upper bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chain import AffineChain, ChainLayer


@dataclass(frozen=True, eq=False)
class LayerBounds:
    lower: np.ndarray
    upper: np.ndarray


def interval_layer(weight: np.ndarray, bias: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> LayerBounds:
    wp, wn = np.maximum(weight, 0), np.minimum(weight, 0)
    return LayerBounds(wp @ lo + wn @ hi + bias, wp @ hi + wn @ lo + bias)


def output_bounds(layer: ChainLayer, b: LayerBounds) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the layer's output ``h`` from those of ``z``."""
    if layer.kind == "relu":
        return np.maximum(b.lower, 0), np.maximum(b.upper, 0)
    return b.lower[layer.pools].max(axis=1), b.upper[layer.pools].max(axis=1)


def _interval(layer: ChainLayer, out: dict[int, tuple[np.ndarray, np.ndarray]]) -> LayerBounds:
    lower, upper = layer.bias.copy(), layer.bias.copy()
    for src, w in layer.inputs:
        b = interval_layer(w, np.zeros(w.shape[0]), *out[src])
        lower += b.lower
        upper += b.upper
    return LayerBounds(lower, upper)


def interval_bounds(chain: AffineChain, lo: np.ndarray, hi: np.ndarray) -> list[LayerBounds]:
    out, bounds = {-1: (lo, hi)}, []
    for k, layer in enumerate(chain.layers):
        bounds.append(_interval(layer, out))
        out[k] = output_bounds(layer, bounds[-1])
    return bounds


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


def _max_relaxation(layer: ChainLayer, b: LayerBounds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input p* per output, its upper bound U, exact) for ``z[p*] <= max <= U``; exact: max = z[p*]."""
    lows, ups = b.lower[layer.pools], b.upper[layer.pools]
    pick = lows.argmax(axis=1)
    rows = np.arange(len(pick))
    pstar = layer.pools[rows, pick]
    others = np.where(layer.pools == pstar[:, None], -np.inf, ups).max(axis=1)
    return pstar, ups.max(axis=1), b.lower[pstar] >= others


def _relax_output(layer: ChainLayer, relax, a: np.ndarray, upper: bool) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients on ``z`` and the constant that bound ``a @ h`` from above (``upper``) or below."""
    pos, neg = np.maximum(a, 0), np.minimum(a, 0)
    if layer.kind == "relu":
        lam, mu, alpha = relax
        if upper:
            return pos * lam + neg * alpha, pos @ mu
        return pos * alpha + neg * lam, neg @ mu
    pstar, cap, exact = relax
    # the part bounded by the upper relaxation: the constant cap, or z[p*] itself where that is exact
    by_cap = pos if upper else neg
    by_low = neg if upper else pos
    on_z = by_low + by_cap * exact
    coef = np.zeros((a.shape[0], layer.width))
    np.add.at(coef.T, pstar, on_z.T)
    return coef, (by_cap * ~exact) @ cap


def _back_substitute(chain: AffineChain, k: int, relax: list, lo: np.ndarray, hi: np.ndarray,
                     upper: bool) -> np.ndarray:
    layer = chain.layers[k]
    acc: dict[int, np.ndarray] = {}
    const = layer.bias.copy()
    for src, w in layer.inputs:
        acc[src] = acc[src] + w if src in acc else w.copy()
    for j in range(k - 1, -1, -1):
        if j not in acc:
            continue
        coef, c = _relax_output(chain.layers[j], relax[j], acc.pop(j), upper)
        const = const + c + coef @ chain.layers[j].bias
        for src, w in chain.layers[j].inputs:
            acc[src] = acc[src] + coef @ w if src in acc else coef @ w
    coef = acc.get(-1, np.zeros((layer.width, lo.size)))
    pos, neg = np.maximum(coef, 0), np.minimum(coef, 0)
    return const + (pos @ hi + neg @ lo if upper else pos @ lo + neg @ hi)


def relaxed_bounds(chain: AffineChain, lo: np.ndarray, hi: np.ndarray) -> tuple[list[LayerBounds], list[LayerBounds]]:
    """(interval bounds, tightened bounds) per layer; tightened = interval intersected with the relaxation."""
    interval = interval_bounds(chain, lo, hi)
    tight: list[LayerBounds] = []
    relax = []
    out = {-1: (lo, hi)}
    for k, layer in enumerate(chain.layers):
        ib = _interval(layer, out)
        if all(src == -1 for src, _ in layer.inputs):
            b = ib
        else:
            up = _back_substitute(chain, k, relax, lo, hi, upper=True)
            low = _back_substitute(chain, k, relax, lo, hi, upper=False)
            b = LayerBounds(np.maximum(ib.lower, low), np.minimum(ib.upper, up))
        tight.append(b)
        relax.append(_relaxation(b) if layer.kind == "relu" else _max_relaxation(layer, b))
        out[k] = output_bounds(layer, b)
    return interval, tight
