"""How much each channel of a channel group matters, and in which order to remove them.

Scores are per group channel, summed over the places the group ties together:

* ``l1`` / ``l2``: the norm of each producer's weight row, divided by that producer's mean row norm
  (producers of one residual stream have different scales), summed over producers;
* ``activation``: ``E|x_c|`` at each consumer input times the norm of the consumer weight columns that
  read it, summed over consumers and kernel offsets (a dead channel scores 0);
* ``reconstruction`` (ThiNet-style): channels are removed greedily, each time the one whose removal adds
  least output error at the consumers on the calibration data. With centred second moments ``S`` of a
  consumer's rows and its weight ``W``, dropping channel set ``R`` (its mean folded into the bias)
  changes the outputs by ``sum_{c,c' in R} M[c, c']`` with ``M = B ((W^T W) o S) B^T`` (``B`` sums
  the columns of each channel), which the greedy order accumulates exactly.

Channels of a grouped-Conv consumer go in stripes (``c mod period``): orders are over stripes.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from ..calibration.moments import Moments
from .channel_groups import ChannelGroup, GroupConsumer

Importance = Literal["l1", "l2", "activation", "reconstruction"]


def consumer_owner(link: GroupConsumer, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(row-space columns of the consumer, the group channel each belongs to) for the channels it reads.

    Row-space columns are input features (Gemm/MatMul) or ``input channel * K + kernel offset`` (Conv).
    """
    present = link.map.present(np.arange(width))
    cols = link.columns(present)
    owner = np.repeat(present, link.block)
    if link.layer.kind == "conv":
        k = link.layer.kernel_size
        cols = (cols[:, None] * k + np.arange(k)[None, :]).reshape(-1)
        owner = np.repeat(owner, k)
    return cols, owner


def _flat_weight(link: GroupConsumer) -> np.ndarray:
    w = link.layer.weight
    return w.reshape(w.shape[0], -1)


def refittable(link: GroupConsumer) -> bool:
    """Whether a consumer's rows can be sampled and refit (every input channel feeds every output)."""
    return not (link.layer.kind == "conv" and link.layer.group > 1)


def weight_scores(group: ChannelGroup, order: int) -> np.ndarray:
    """``l1`` (order 1) or ``l2`` (order 2) producer row norms, each producer scaled by its mean."""
    score = np.zeros(group.width)
    for p in group.producers:
        rows = np.abs(p.weight.reshape(p.weight.shape[0], -1))
        norm = rows.sum(axis=1) if order == 1 else np.sqrt((rows ** 2).sum(axis=1))
        score += norm / max(float(norm.mean()), 1e-30)
    return score


def activation_scores(group: ChannelGroup, moments: dict[str, Moments]) -> np.ndarray:
    """``E|x_c| * ||W[:, cols(c)]||`` summed over consumers (consumers without moments add nothing)."""
    score = np.zeros(group.width)
    for link in group.consumers:
        m = moments.get(link.layer.nodes[0].name)
        if m is None:
            continue
        cols, owner = consumer_owner(link, group.width)
        norms = np.linalg.norm(_flat_weight(link)[:, cols], axis=0)
        np.add.at(score, owner, m.abs_mean[cols] * norms)
    return score


def error_matrix(group: ChannelGroup, moments: dict[str, Moments]) -> np.ndarray:
    """``M[c, c']``: the output-error interaction of dropping channels ``c`` and ``c'`` (per row, all consumers)."""
    out = np.zeros((group.width, group.width))
    for link in group.consumers:
        m = moments.get(link.layer.nodes[0].name)
        if m is None or m.rows == 0:
            continue
        cols, owner = consumer_owner(link, group.width)
        n = float(m.rows)
        mean = m.gram[-1, cols] / n
        cov = m.gram[np.ix_(cols, cols)] / n - np.outer(mean, mean)
        w = _flat_weight(link)[:, cols]
        h = (w.T @ w) * cov
        pool = np.zeros((group.width, cols.size))
        pool[owner, np.arange(cols.size)] = 1.0
        out += pool @ h @ pool.T
    return out


def stripe_of(group: ChannelGroup) -> np.ndarray:
    """Stripe index of each group channel (``c mod period``)."""
    return np.arange(group.width) % group.period


def removal_order(group: ChannelGroup, importance: Importance, moments: dict[str, Moments]) -> np.ndarray:
    """Stripes (``0 .. period-1``) in the order they should go, least important first."""
    stripes = stripe_of(group)
    if importance == "reconstruction":
        m = error_matrix(group, moments)
        pool = np.zeros((group.period, group.width))
        pool[stripes, np.arange(group.width)] = 1.0
        return greedy_order(pool @ m @ pool.T)
    if importance == "activation":
        score = activation_scores(group, moments)
    else:
        score = weight_scores(group, 1 if importance == "l1" else 2)
    per_stripe = np.bincount(stripes, weights=score, minlength=group.period)
    return np.argsort(per_stripe, kind="stable")


def greedy_order(m: np.ndarray) -> np.ndarray:
    """Order in which removing items one at a time adds least to ``sum_{i,j in R} m[i, j]``."""
    n = m.shape[0]
    cost = np.diag(m).copy()
    left = np.ones(n, dtype=bool)
    order = []
    for _ in range(n):
        pick = int(np.flatnonzero(left)[np.argmin(cost[left])])
        order.append(pick)
        left[pick] = False
        cost += 2.0 * m[pick]
    return np.asarray(order, dtype=np.int64)


__all__ = ["Importance", "consumer_owner", "refittable", "weight_scores", "activation_scores", "error_matrix",
           "removal_order", "greedy_order", "stripe_of"]
