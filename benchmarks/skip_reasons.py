"""remove-dead's skip reasons on every model in ../shared/models (read-only plans, exact rates).

    python benchmarks/skip_reasons.py [--label before|after]

Calibrates each model as tests/real_models.py says, plans remove-dead (nothing is applied) and prints,
per model, the units it would remove and the skip reasons with counts; writes
benchmarks/results/skip_reasons_<label>.json. Used to show which skips the channel-group analysis removed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import SHARED  # noqa: E402
from onnx_lincomp.analysis.unit_sets import UnitEvidence  # noqa: E402
from onnx_lincomp.calibration import CollectOptions, collect_relu_stats, input_specs, open_calibration  # noqa: E402
from onnx_lincomp.canonicalize import canonicalize  # noqa: E402
from onnx_lincomp.model_io import load_model  # noqa: E402
from onnx_lincomp.passes import PassContext  # noqa: E402
from onnx_lincomp.pipeline import plan_pipeline  # noqa: E402
from onnx_lincomp.recipe import PassSpec  # noqa: E402
from real_models import REAL_MODELS, calibration_file  # noqa: E402


def plan_model(spec, tmp: Path) -> dict:
    loaded = load_model(SHARED / "models" / spec.path)
    canonicalize(loaded.graph, ctx=loaded.ctx)
    calib = calibration_file(spec, tmp)
    source = open_calibration(calib, input_specs(loaded.graph), shape_overrides=spec.input_shapes)
    stats = collect_relu_stats(loaded.graph, loaded.ctx, source, CollectOptions(batch_size=8))
    plan = plan_pipeline(loaded.graph, (PassSpec.of("remove-dead"),), PassContext(UnitEvidence.from_stats(stats)))[0]
    return {"model": spec.path, "units": sum(m.units for m in plan.matches), "params_saved": plan.params_saved,
            "skipped": dict(Counter(plan.skipped).most_common())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="now")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: this benchmark needs ../shared/models")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in REAL_MODELS:
            rows.append(plan_model(spec, Path(tmp)))
            r = rows[-1]
            print(f"{r['model']:<58} units {r['units']:>5}  params {r['params_saved']:>9,}")
            for why, n in r["skipped"].items():
                print(f"{'':<6}{n:>4}x {why}")
    totals = Counter()
    for r in rows:
        totals.update(r["skipped"])
    print("\nall models:")
    for why, n in totals.most_common():
        print(f"{n:>5}x {why}")
    out = HERE / "results" / f"skip_reasons_{args.label}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "totals": dict(totals)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
