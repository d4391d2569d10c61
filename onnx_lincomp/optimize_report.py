"""The report of one ``optimize`` run (one shape for statistical and exact mode)."""
from __future__ import annotations

from dataclasses import dataclass

from .analysis.model_report import ModelReport
from .canonicalize import CanonicalizeReport
from .evaluate.evaluator import Verification
from .pipeline import PassRecord
from .recipe import Recipe
from .runtime.latency import Latency, RatioEstimate


@dataclass(frozen=True)
class SizeFigures:
    """Size and speed of one model; for the output, latency changes are judged against the original
    in interleaved rounds (``change`` is "no change" inside the noise)."""

    params: int
    macs: int
    size_bytes: int
    nonzeros: int | None = None
    params_by_dtype: tuple[tuple[str, int], ...] = ()
    latency_b1: Latency | None = None
    latency_batch: Latency | None = None
    change_b1: RatioEstimate | None = None
    change_batch: RatioEstimate | None = None

    @staticmethod
    def of(report: ModelReport, lat1: Latency | None = None, latb: Latency | None = None,
           change1: RatioEstimate | None = None, changeb: RatioEstimate | None = None) -> SizeFigures:
        by_dtype = tuple(sorted(getattr(report, "params_by_dtype", {}).items()))
        return SizeFigures(report.params, report.macs, report.size_bytes, getattr(report, "nonzeros", None), by_dtype,
                           lat1, latb, change1, changeb)

    @property
    def latency_verdict(self) -> str | None:
        return self.change_b1.change if self.change_b1 is not None else None

    @property
    def latency_ratio(self) -> float | None:
        return self.change_b1.ratio if self.change_b1 is not None else None

    def as_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "size_bytes": self.size_bytes, "nonzeros": self.nonzeros,
                "params_by_dtype": dict(self.params_by_dtype),
                "latency_batch1": self.latency_b1.as_dict() if self.latency_b1 else None,
                "latency_batch": self.latency_batch.as_dict() if self.latency_batch else None,
                "latency_change_batch1": self.change_b1.as_dict() if self.change_b1 else None,
                "latency_change_batch": self.change_batch.as_dict() if self.change_batch else None}


@dataclass(frozen=True)
class OptimizeReport:
    model: str
    evidence: str
    random_calibration: bool
    calibration_samples: int
    heldout_samples: int
    canonicalize: CanonicalizeReport
    passes: tuple[PassRecord, ...]
    before: SizeFigures
    after: SizeFigures
    on_calibration: Verification | None
    on_heldout: Verification | None
    recipe: Recipe
    exact_on_evidence: bool
    messages: tuple[str, ...] = ()
    not_analysed: tuple[tuple[str, str], ...] = ()
    search: tuple[dict, ...] = ()
    certificate: dict | None = None  # exact mode: the certificate, witness check and box check
    on_all: Verification | None = None  # --gate-on all: every sample (the budget was judged here)
    storage: dict | None = None  # after prune-magnitude: file bytes dense / zipped / sparse (analysis.storage)
    # lossy passes: pass -> layer -> relative error of the layer's output on held-out activations
    layer_errors: dict | None = None

    @property
    def exact_on_calibration(self) -> bool:
        return self.exact_on_evidence

    def as_dict(self) -> dict:
        return {
            "model": self.model, "evidence": self.evidence, "random_calibration": self.random_calibration,
            "calibration_samples": self.calibration_samples, "heldout_samples": self.heldout_samples,
            "canonicalize": self.canonicalize.as_dict(), "passes": [p.as_dict() for p in self.passes],
            "before": self.before.as_dict(), "after": self.after.as_dict(),
            "verification_calibration": self.on_calibration.as_dict() if self.on_calibration else None,
            "verification_heldout": self.on_heldout.as_dict() if self.on_heldout else None,
            "exact_on_evidence": self.exact_on_evidence, "messages": list(self.messages),
            "not_analysed": [list(x) for x in self.not_analysed], "search": list(self.search),
            "verification_all": self.on_all.as_dict() if self.on_all else None,
            "certificate": self.certificate, "recipe": self.recipe.as_dict(), "storage": self.storage,
            "layer_errors_heldout": self.layer_errors,
        }
