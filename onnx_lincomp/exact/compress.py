"""Exact compression: certify, rewrite with the proven sets, check on random points of the box, stamp.

The proven sets become statistics (:meth:`Certificate.stats_set`) for the ordinary passes at exact
rates, so exact and statistical modes share every rewrite. Before anything is returned the result is
compared with the original on random points of the box in onnxruntime; a mismatch raises
:class:`~onnx_lincomp.errors.NumericalMismatchError` and nothing is written. The domain and what was
proven travel with the model in ``metadata_props`` (``onnx_lincomp.exact.*``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx

from ..calibration import input_specs, open_calibration
from ..calibration.data_source import CalibrationSource
from ..canonicalize import CanonicalizeReport, canonicalize
from ..errors import NumericalMismatchError
from ..model_io import LoadedModel, to_model_proto
from ..passes import PassContext
from ..pipeline import PassRecord, run_passes
from ..verify import Verification, compare_models
from .certify import Certificate, CertifyOptions, certify
from .domain import Domain, parse_domain
from .witness_check import WitnessCheck, check_witnesses


@dataclass(frozen=True)
class ExactResult:
    model: onnx.ModelProto
    original: onnx.ModelProto
    certificate: Certificate
    witness_check: WitnessCheck
    box_check: Verification
    passes: tuple[PassRecord, ...]
    canonicalize: CanonicalizeReport

    def as_dict(self) -> dict:
        return {"certificate": self.certificate.as_dict(), "witness_check": self.witness_check.as_dict(),
                "box_check": self.box_check.as_dict()}


def box_source(graph, domain: Domain, points: int, seed: int) -> CalibrationSource:
    x = domain.sample(np.random.default_rng(seed + 1), points).astype(np.float32)
    return CalibrationSource(input_specs(graph), arrays={domain.input: x}, description=f"{points} random points of the box")


def certificate_metadata(cert: Certificate, witness: WitnessCheck) -> dict[str, str]:
    proven = {lc.relu: {"stably_active": np.flatnonzero(lc.stably_active).tolist(),
                        "stably_inactive": np.flatnonzero(lc.stably_inactive).tolist()} for lc in cert.layers}
    return {
        "onnx_lincomp.exact.domain": json.dumps(cert.domain.as_dict()),
        "onnx_lincomp.exact.certificate": json.dumps({"complete": cert.complete, "proven_in_original": proven,
                                                      "not_certified": list(cert.not_certified),
                                                      "witnesses_confirmed": witness.confirmed}),
    }


def compress_exact(loaded: LoadedModel, domain_spec: tuple[str, ...], *, calib: str | None = None,
                   options: CertifyOptions = CertifyOptions(), passes=("remove-dead", "fold-linear", "merge-affine"),
                   layer_threshold="auto", check_points: int = 10000, tolerance: float = 1e-5,
                   input_shapes: dict | None = None, certificate: Certificate | None = None) -> ExactResult:
    """Certify (unless ``certificate`` for this model and domain is given), compress, check, stamp."""
    original = to_model_proto(loaded.graph, loaded.ctx)
    canon = canonicalize(loaded.graph, ctx=loaded.ctx)
    specs = input_specs(loaded.graph)
    source = open_calibration(calib, specs, shape_overrides=input_shapes) if calib else None
    domain = parse_domain(domain_spec, specs, calib=source, overrides=input_shapes)
    cert = certificate if certificate is not None else certify(loaded.graph, loaded.ctx, domain, source, options)
    witness = check_witnesses(loaded.graph, loaded.ctx, cert)
    graph = loaded.graph.copy()
    records = run_passes(graph, tuple(passes), PassContext(cert.stats_set(), exact=True), layer_threshold)
    ctx = loaded.ctx.with_metadata(certificate_metadata(cert, witness))
    model = to_model_proto(graph, ctx)
    check = compare_models(original, model, loaded.graph, box_source(loaded.graph, domain, check_points, options.seed),
                           batch_size=256)
    if not check.within(tolerance):
        raise NumericalMismatchError(f"exact compression differs from the original on random points of the box "
                                     f"(max abs error {check.max_abs:.3g}, relative {check.rel_max:.3g}); nothing written")
    return ExactResult(model, original, cert, witness, check, tuple(records), canon)
