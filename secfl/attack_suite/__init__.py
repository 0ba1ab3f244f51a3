"""The attack-evaluation suite (``secfl attack``): what a threat model's adversary can do
against a configuration, checked against the threat model's guarantees.

The flow: :mod:`~secfl.attack_suite.observe` (what the server receives, through the real
protection modes), :mod:`~secfl.attack_suite.inversion` and :mod:`~secfl.attack_suite.probes`
(gradient inversion), :mod:`~secfl.attack_suite.membership` (membership inference),
:mod:`~secfl.attack_suite.dp_audit` (canaries and the empirical epsilon lower bound),
:mod:`~secfl.attack_suite.integrity` (SecAgg against a malicious server),
:mod:`~secfl.attack_suite.poisoning` (the trust benchmark's attacks), and
:mod:`~secfl.attack_suite.report` (``attack_report.json`` / ``.html``), driven by
:mod:`~secfl.attack_suite.suite`.
"""

from secfl.attack_suite.suite import SuiteSettings, run_attack_suite

__all__ = ["SuiteSettings", "run_attack_suite"]
