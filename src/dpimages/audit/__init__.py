"""Empirical privacy audit: one-run canary audits of dpimages' mechanisms (a lower bound on epsilon)."""

from dpimages.audit.bounds import epsilon_lower_bound, p_value
from dpimages.audit.one_run import (
    METHOD_TARGETS,
    TARGETS,
    VARIANTS,
    AuditResult,
    audit_once,
    audit_passed,
    resolve_target,
    run_audit,
)

__all__ = [
    "METHOD_TARGETS",
    "TARGETS",
    "VARIANTS",
    "AuditResult",
    "audit_once",
    "audit_passed",
    "epsilon_lower_bound",
    "p_value",
    "resolve_target",
    "run_audit",
]
