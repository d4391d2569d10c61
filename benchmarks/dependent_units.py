"""dependent_units: the pivoted-QR basis against the previous greedy matrix_rank loop (one SVD per row).

    python benchmarks/dependent_units.py

Prints seconds per row-matrix shape (linear units x features); writes benchmarks/results/dependent_units.json.
"""
import json
import time
from pathlib import Path

import numpy as np

from onnx_lincomp.passes.fold_linear_relu import dependent_units


def old(rows):
    """The previous implementation: a greedy basis, one matrix_rank per candidate row."""
    if rows.shape[0] <= 1:
        return None
    rank = np.linalg.matrix_rank(rows)
    if rank >= rows.shape[0]:
        return None
    basis = []
    for i in range(rows.shape[0]):
        if np.linalg.matrix_rank(rows[basis + [i]]) > len(basis):
            basis.append(i)
        if len(basis) == rank:
            break
    b = np.array(basis)
    d = np.setdiff1d(np.arange(rows.shape[0]), b)
    k, *_ = np.linalg.lstsq(rows[b].T, rows[d].T, rcond=None)
    return b, d, k.T


rng = np.random.default_rng(0)
results = []
for n, f in ((300, 784), (900, 784), (1200, 400)):
    rows = rng.normal(size=(n, f))
    for name, fn in (("old greedy matrix_rank", old), ("pivoted QR", dependent_units)):
        t = time.perf_counter()
        r = fn(rows)
        dt = time.perf_counter() - t
        results.append({"rows": n, "features": f, "method": name, "seconds": dt,
                        "dependent": 0 if r is None else len(r[1])})
        print(f"{n}x{f:<5} {name:<24} {dt:8.3f} s  dependent={results[-1]['dependent']}")
out = Path(__file__).resolve().parent / "results" / "dependent_units.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(results, indent=2))
