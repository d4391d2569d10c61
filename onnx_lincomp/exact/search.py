"""Witness search: inputs of the box that flip stability candidates, before any MILP is built.

A ReLU network is affine on each activation region, so at a point ``x`` the gradient of a unit's
pre-activation is ``g = e_i W_k D_{k-1} W_{k-1} ... D_1 W_1`` (``D`` the active masks at ``x``, and the
argmax selections of max-pools; summed over the paths of a DAG: :meth:`.AffineChain.gradient`). Within
the box the affine function is extreme at the corner ``where(s g > 0, upper, lower)`` (``s = +1`` to make
the unit positive, ``-1`` negative). The search starts from the sampled point where the unit came
closest to flipping and alternates corner jumps and line searches between the point and the corner.
Every witness is a real input: its flip is checked by a forward pass (and later in onnxruntime).
"""
from __future__ import annotations

import numpy as np

from .chain import AffineChain


def search_witness(chain: AffineChain, lo: np.ndarray, hi: np.ndarray, k: int, i: int, sign: float,
                   start: np.ndarray, steps: int = 12) -> np.ndarray | None:
    """An input with ``sign * z_{k,i} > 0``, or None when the search does not find one."""
    x = start.copy()
    best = sign * chain.forward(x[None, :])[k][0, i]
    ts = np.linspace(0.0, 1.0, 9)[1:]
    for _ in range(steps):
        if best > 0:
            return x
        g = chain.gradient(k, i, x)
        if not np.any(g):
            return None
        corner = np.where(sign * g > 0, hi, lo)
        cand = x[None, :] + ts[:, None] * (corner - x)[None, :]
        vals = sign * chain.forward(cand)[k][:, i]
        j = int(np.argmax(vals))
        if vals[j] <= best + 1e-12:
            return x if best > 0 else None
        x, best = cand[j], vals[j]
    return x if best > 0 else None
