"""Exact mode's part of an ``optimize`` run: certify, re-check witnesses, check on the box, stamp.

The proven sets become unit evidence (:meth:`Certificate.unit_evidence`) for the ordinary passes, so exact and
statistical modes share every rewrite and one orchestrator (:func:`onnx_lincomp.optimize.optimize`). Before
anything is returned the result is compared with the original on random points of the box in onnxruntime; a
mismatch raises :class:`~onnx_lincomp.errors.NumericalMismatchError` and nothing is written. The domain and
what was proven travel with the model in ``metadata_props`` (``onnx_lincomp.exact.*``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx

from ..calibration import input_specs
from ..calibration.data_source import CalibrationSource
from ..errors import NumericalMismatchError
from ..model_io import LoadedModel
from ..recipe import ExactSettings
from ..verify import Verification, compare_models
from .certify import Certificate, CertifyOptions, certify
from .domain import Domain, parse_domain
from .witness_check import WitnessCheck, check_witnesses


@dataclass(frozen=True)
class ExactOutcome:
    """What exact mode adds to a run: the certificate, its witnesses re-checked, the domain's sampler."""

    certificate: Certificate
    witness_check: WitnessCheck
    check_points: int
    seed: int
    tolerance: float = 1e-5

    @property
    def metadata(self) -> dict[str, str]:
        return certificate_metadata(self.certificate, self.witness_check)

    def as_dict(self) -> dict:
        return {"certificate": self.certificate.as_dict(), "witness_check": self.witness_check.as_dict()}


def box_source(graph, domain: Domain, points: int, seed: int) -> CalibrationSource:
    x = domain.sample(np.random.default_rng(seed + 1), points)
    return CalibrationSource(input_specs(graph), arrays=domain.feeds(x),
                             description=f"{points} random points of the box")


def certificate_metadata(cert: Certificate, witness: WitnessCheck) -> dict[str, str]:
    proven = {lc.relu: {"stably_active": np.flatnonzero(lc.stably_active).tolist(),
                        "stably_inactive": np.flatnonzero(lc.stably_inactive).tolist()} for lc in cert.layers}
    return {
        "onnx_lincomp.exact.domain": json.dumps(cert.domain.as_dict()),
        "onnx_lincomp.exact.certificate": json.dumps({"complete": cert.complete, "proven_in_original": proven,
                                                      "not_certified": list(cert.not_certified),
                                                      "witnesses_confirmed": witness.confirmed}),
    }


def certify_for(loaded: LoadedModel, source: CalibrationSource | None, settings: ExactSettings,
                input_shapes: dict | None = None, certificate: Certificate | None = None, *, jobs: int = 1,
                unit_time_limit: float | None = None, method: str = "units") -> ExactOutcome:
    """Certify the canonical graph over the settings' domain (unless ``certificate`` is given) and re-check
    every witness in onnxruntime. ``unit_time_limit``: CPU seconds per unit MILP (default: 60, at most the
    stage's wall budget ``settings.milp_time_limit``); ``jobs``: processes for the per-unit stage."""
    limit = min(60.0, settings.milp_time_limit) if unit_time_limit is None else unit_time_limit
    options = CertifyOptions(milp=settings.milp, time_limit=settings.milp_time_limit, solve_limit=limit, jobs=jobs,
                             method=method)
    domain = parse_domain(settings.input_range, input_specs(loaded.graph), calib=source, overrides=input_shapes or {})
    cert = certificate if certificate is not None else certify(loaded.graph, loaded.ctx, domain, source, options)
    witness = check_witnesses(loaded.graph, loaded.ctx, cert)
    return ExactOutcome(cert, witness, settings.check_points, options.seed)


def stamp_and_check(original: onnx.ModelProto, optimized: onnx.ModelProto, graph,
                    outcome: ExactOutcome) -> Verification:
    """Compare the result with the original on random points of the domain; a mismatch raises and nothing is written."""
    source = box_source(graph, outcome.certificate.domain, outcome.check_points, outcome.seed)
    check = compare_models(original, optimized, graph, source, batch_size=256)
    if not check.within(outcome.tolerance):
        raise NumericalMismatchError(f"exact compression differs from the original on random points of the box "
                                     f"(max abs error {check.max_abs:.3g}, relative {check.rel_max:.3g}); "
                                     "nothing written")
    return check
