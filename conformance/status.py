"""The statuses of a conformance case, what each means, and how they rank."""

PASS = "PASS"
QUALITY_WARNING = "QUALITY_WARNING"
FAIL = "FAIL"
ERROR = "ERROR"
XFAIL = "XFAIL"
XPASS = "XPASS"
UNSUPPORTED = "UNSUPPORTED"
NOT_RUN = "NOT_RUN"
INFRA_ERROR = "INFRA_ERROR"

MEANING = {
    PASS: "within the strict tolerance band (or raised the specified error)",
    QUALITY_WARNING: "outside the strict band, inside the relaxed one",
    FAIL: "outside the relaxed band, a NaN/Inf mismatch, wrong bytes, shape, dtype or device, an input "
          "it must not touch changed, or a wrong or missing error",
    ERROR: "the backend raised on valid input (also: a claimed op it does not implement)",
    XFAIL: "a known failure (listed in known_failures.json with its reason) that still fails",
    XPASS: "a known failure that now passes: remove its entry",
    UNSUPPORTED: "outside the backend's claims (op, dtype or feature): not run",
    NOT_RUN: "the backend cannot run on this machine (the probe's reason)",
    INFRA_ERROR: "the backend is available but failed to activate, or the harness itself failed",
}

# Worst first: a group of cases (a cell of the matrix) shows its worst status.
SEVERITY = (INFRA_ERROR, ERROR, FAIL, XPASS, QUALITY_WARNING, XFAIL, PASS, UNSUPPORTED, NOT_RUN)

# Exit-code bits of `apt-hal conformance` (2 is argparse's usage error).
EXIT_FAILED = 1  # a FAIL or ERROR
EXIT_INFRA = 4  # an INFRA_ERROR
EXIT_REQUIRED_NOT_RUN = 8  # a backend named in --require did not run


def worst(statuses) -> str:
    present = set(statuses)
    return next(s for s in SEVERITY if s in present)
