"""``secfl attack``: the command's printing; the suite is :mod:`secfl.attack_suite.suite`."""

from __future__ import annotations

import argparse
from pathlib import Path

from secfl.attack_suite.report import REPORT_HTML, REPORT_JSON
from secfl.attack_suite.suite import SuiteSettings, run_attack_suite


def attack_command(args: argparse.Namespace) -> int:
    """Run the suite; print each check; exit 0 when every check passed, 1 otherwise."""
    settings = SuiteSettings.quick() if args.quick else SuiteSettings()
    document = run_attack_suite(
        args.threat_model, args.config, args.out, settings=settings, progress=not args.no_progress
    )
    for check in document["checks"]:
        value = check["value"]
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        verdict = "PASS" if check["passed"] else "FAIL"
        print(f"{verdict}  {check['metric']} = {shown} ({check['op']} {check['threshold']:.4g})")
    out = Path(args.out)
    failed = sum(1 for c in document["checks"] if not c["passed"])
    print(
        f"{len(document['checks']) - failed} of {len(document['checks'])} checks passed in "
        f"{document['timings_s']['total']:.0f} s; {out / REPORT_JSON}, {out / REPORT_HTML}"
    )
    return 0 if failed == 0 else 1
