"""Exact mode: prove ReLU stability over an input box (samples, interval/linear bounds, MILP) and
compress with the same passes as the statistical mode."""
from .certify import Certificate, CertifyOptions, LayerCertificate, certify
from .domain import Domain, parse_domain

__all__ = ["Certificate", "CertifyOptions", "LayerCertificate", "certify", "Domain", "parse_domain"]
