"""``secfl attack``: run what a threat model's adversary can do against a configuration.

The threat model's guarantees that apply to the configuration's protection mode decide which
attack families run (``inversion.*``, ``membership.*``, ``dp_audit.*`` / ``audit_power.*``,
``secagg.*``, ``poisoning.*``); each guarantee becomes one check of the report. Everything
runs through the real machinery: the configuration's own run (``secfl.runner.run``: the
final model for membership inference, ``ledger.json`` for the claimed epsilons, the clean
reference for poisoning), probe rounds of the real protection mode for gradient inversion and
the black-box canaries, the real DP-SGD and user-level mechanisms for the white-box canaries,
and the real SecAgg state machines for the integrity probes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secfl.attack_suite import dp_audit, report
from secfl.attack_suite.inversion import OptimisationSettings
from secfl.attack_suite.probes import ProbeSpec, inversion_metrics, run_probe
from secfl.audit.threat_model import Guarantee, ThreatModel, load_threat_model
from secfl.config import RunConfig, load_config
from secfl.data.datasets import Dataset
from secfl.data.federated import FederatedData, build_federated_data
from secfl.errors import ConfigError
from secfl.randomness import Randomness

#: White-box power: the lower bound must reach this share of a DP level's epsilon ...
POWER_SHARE_DP = 0.3
#: ... and this absolute figure where the level has no DP.
POWER_NO_DP = 1.0


@dataclass(frozen=True)
class SuiteSettings:
    """Sizes of the suite (``quick`` for a shorter run, ``tiny`` for tests)."""

    fedsgd1_repetitions: int = 8
    fedsgd8_repetitions: int = 2
    fedavg_repetitions: int = 2
    fedavg_records: int = 8
    optimisation_iterations: int = 200
    optimisation_targets: int = 4
    optimisation_max_records: int = 16
    record_canaries: int = 4000
    record_repetitions: int = 8
    client_trials: int = 20000
    black_box_canaries: int = 128
    black_box_rounds: int = 10
    #: Members and non-members each (at most; digits has 540 test records).
    membership_records: int = 2000
    shadows: int = 8
    shadow_epochs: int = 20
    poisoning_attacks: tuple[str, ...] = ("sign_flip", "alie", "backdoor")
    #: Override the configuration's rounds everywhere (tests); None keeps them.
    rounds: int | None = None

    @classmethod
    def quick(cls) -> SuiteSettings:
        return cls(
            fedsgd1_repetitions=3,
            fedsgd8_repetitions=1,
            fedavg_repetitions=1,
            optimisation_iterations=100,
            optimisation_targets=2,
            record_repetitions=4,
            client_trials=12000,
            black_box_canaries=64,
            black_box_rounds=5,
            membership_records=1000,
            shadows=4,
            shadow_epochs=10,
            poisoning_attacks=("sign_flip", "backdoor"),
        )


def _family(metric: str) -> str:
    return metric.split(".", 1)[0]


def applicable_guarantees(model: ThreatModel, protection: str) -> list[Guarantee]:
    modes = {scope.protection for scope in model.applies_to}
    if protection not in modes:
        raise ConfigError(
            f"threat model {model.name!r} does not speak about aggregation.protection="
            f"{protection!r}; it covers {sorted(modes)}"
        )
    return [g for g in model.guarantees if not g.modes or protection in g.modes]


def claimed_epsilons(run_dir: Path, model: ThreatModel) -> dict[str, dict[str, Any]]:
    """Per level: the ledger's epsilon (the largest client's at sample level) or, without
    DP at that level, the threat model's ``required_epsilon``."""
    ledger_path = run_dir / "ledger.json"
    cumulative: dict[str, Any] = {}
    if ledger_path.exists():
        cumulative = json.loads(ledger_path.read_text(encoding="utf-8")).get("cumulative", {})
    clients = cumulative.get("clients") or {}
    sample = [float(c["epsilon"]) for c in clients.values() if c.get("epsilon") is not None]
    user = (cumulative.get("user_level") or {}).get("epsilon")
    required = model.required_epsilon
    out: dict[str, dict[str, Any]] = {}
    for level, ledger_value, required_value in (
        ("sample_level", max(sample) if sample else None, required.sample_level),
        ("user_level", float(user) if user is not None else None, required.user_level),
    ):
        if ledger_value is not None:
            out[level] = {"epsilon": ledger_value, "source": "ledger", "dp": True}
        else:
            out[level] = {
                "epsilon": required_value if required_value is not None else math.inf,
                "source": "required_epsilon (the configuration has no DP at this level)",
                "dp": False,
            }
    return out


def _trials_for(epsilon: float, delta: float, start: int) -> int:
    """Trials whose evaluation part can certify ``epsilon + 0.5`` on a perfect separation."""
    share = (1.0 - dp_audit.CALIBRATION_SHARE) / 2
    trials = start
    while trials < 400_000:
        side = int(trials * share)
        if dp_audit.max_certifiable_epsilon(side, side, delta) >= epsilon + 0.5:
            break
        trials *= 2
    return trials


class AttackSuite:
    def __init__(
        self,
        threat_model: ThreatModel,
        config: RunConfig,
        out: Path,
        settings: SuiteSettings,
        *,
        progress: bool = False,
    ) -> None:
        self.model = threat_model
        self.notes: list[str] = []
        if config.security.randomness == "os":
            config = config.with_overrides(**{"security.randomness": "seeded"})
            self.notes.append(
                "security.randomness os was replaced by seeded for the evaluation: the suite "
                "must know which records each client holds; protocols and mechanisms are the same"
            )
        if settings.rounds is not None:
            config = config.with_overrides(rounds=settings.rounds)
        self.config = config
        self.out = out
        self.settings = settings
        self.progress = progress
        self.randomness = Randomness("seeded", config.seed)
        self.guarantees = applicable_guarantees(threat_model, config.aggregation.protection)
        self.families = {_family(g.metric) for g in self.guarantees}
        self.metrics: dict[str, float] = {}
        self.details: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.figures: list[tuple[str, str]] = []
        self.images: list[tuple[str, list[tuple[np.ndarray, np.ndarray, str, float]]]] = []
        self.epsilons: dict[str, dict[str, Any]] = {}
        #: Clients colluding with the server (threat model role server+clients): T of
        #: privacy.user_level.colluding_clients, else 1.
        self.colluders = 0
        if threat_model.adversary.role == "server+clients":
            user = config.privacy.user_level
            self.colluders = max(1, user.colluding_clients) if user is not None else 1
            self.notes.append(
                f"{self.colluders} client(s) collude with the server: the inversion probes "
                "observe the sums of the honest clients alone (the coalition subtracts its own "
                "updates and noise shares)"
            )

    def _say(self, message: str) -> None:
        if self.progress:
            print(f"[secfl attack] {message}", flush=True)

    def _timed(self, name: str, started: float) -> None:
        self.timings[name] = round(time.perf_counter() - started, 2)
        self._say(f"{name}: {self.timings[name]:.1f} s")

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        data = build_federated_data(
            self.config.data, Randomness(self.config.security.randomness, self.config.seed)
        )
        from secfl.attack_suite.probes import record_space

        self.space = record_space(self.config, data)
        needs_run = bool(self.families & {"membership", "dp_audit", "audit_power", "poisoning"})
        run_result = None
        if needs_run:
            t = time.perf_counter()
            from secfl.runner import run

            run_result = run(self.config, self.out / "run")
            self._timed("run", t)
            self.epsilons = claimed_epsilons(self.out / "run", self.model)
            self.details["run"] = {
                "rounds": len(run_result.history),
                "accuracy": float(run_result.history[-1]["accuracy"]),
                "epsilons": self.epsilons,
            }
        if "inversion" in self.families:
            self._inversion(data)
        if self.families & {"dp_audit", "audit_power"}:
            self._dp_audit(data)
        if "membership" in self.families and run_result is not None:
            self._membership(data, run_result.model)
        if "secagg" in self.families:
            self._integrity(data)
        if "poisoning" in self.families and run_result is not None:
            self._poisoning(data, run_result)
        checks = self._checks()
        document = {
            "format": "secfl-attack-report/1",
            "checks": checks,
            "passed": all(c["passed"] for c in checks),
            "threat_model": self.model.name,
            "adversary": self.model.adversary.model_dump(),
            "config": {
                "name": self.config.name,
                "fingerprint": self.config.fingerprint(),
                "protection": self.config.aggregation.protection,
                "rounds": self.config.rounds,
            },
            "settings": asdict(self.settings),
            "epsilons": self.epsilons,
            "metrics": self.metrics,
            "details": self.details,
            "timings_s": self.timings | {"total": round(time.perf_counter() - started, 2)},
            "notes": self.notes,
        }
        report.write_json(self.out, document)
        report.write_html(
            self.out, document, figures=self.figures, images=self.images, bounds=self.space.bounds
        )
        return document

    # ------------------------------------------------------------------ families

    def _inversion(self, data: FederatedData) -> None:
        t = time.perf_counter()
        s = self.settings
        specs = [
            ProbeSpec("fedsgd_batch1", 1, True, s.fedsgd1_repetitions),
            ProbeSpec("fedsgd_batch8", 8, True, s.fedsgd8_repetitions),
            ProbeSpec("fedavg", s.fedavg_records, False, s.fedavg_repetitions),
        ]
        optimisation = OptimisationSettings(iterations=s.optimisation_iterations)
        outcomes = []
        for spec in specs:
            self._say(f"gradient inversion: {spec.name}")
            outcome = run_probe(
                self.config,
                data,
                spec,
                folder=self.out / "probes" / spec.name,
                optimisation=optimisation,
                space=self.space,
                geiping_targets=s.optimisation_targets,
                geiping_max_records=s.optimisation_max_records,
                colluders=self.colluders,
            )
            outcomes.append(outcome)
            self.images.append((f"{spec.name}: {outcome.observed}", outcome.examples))
        self.metrics.update(inversion_metrics(outcomes))
        self.details["inversion"] = {o.name: o.summary() for o in outcomes}
        self._timed("inversion", t)

    def _dp_audit(self, data: FederatedData) -> None:
        t = time.perf_counter()
        s = self.settings
        config = self.config
        sample = config.privacy.sample_level
        user = config.privacy.user_level
        sample_delta = sample.delta if sample is not None else 1e-5
        user_delta = user.delta if user is not None else 1e-5
        details: dict[str, Any] = {}

        # record canaries, white-box
        self._say("DP audit: white-box record canaries")
        if sample is not None:
            scores, member = dp_audit.record_canary_scores(
                config,
                self.randomness,
                canaries=s.record_canaries,
                repetitions=s.record_repetitions,
            )
        else:
            required = self.epsilons["sample_level"]["epsilon"]
            trials = _trials_for(min(required, 20.0), sample_delta, s.record_canaries)
            scores, member = dp_audit.record_canary_scores(
                config, self.randomness, canaries=trials, repetitions=1, rounds=1
            )
            self.notes.append(
                "no sample-level DP: the white-box record audit uses one round (local training "
                "is deterministic given the canaries, so one round's update already separates them)"
            )
        record = self._bound(scores, member, sample_delta, "record")
        details["record_white_box"] = record.to_dict()
        self.metrics["dp_audit.record.white_box_epsilon_lb"] = record.epsilon_lb
        self.metrics["audit_power.record"] = self._power(record, "sample_level")
        self.figures.append(
            ("record canaries", report.histogram_svg(
                "white-box record canaries: score", {"included": scores[member],
                                                     "excluded": scores[~member]}))
        )  # fmt: skip

        # client canaries, white-box
        self._say("DP audit: white-box client canaries")
        from secfl.attack_suite.observe import initial_weights

        size = int(initial_weights(config, data).size)
        trials = s.client_trials
        if user is None:
            trials = _trials_for(
                min(self.epsilons["user_level"]["epsilon"], 20.0), user_delta, trials
            )
        scores, member = dp_audit.client_canary_scores(
            config, self.randomness, model_size=size, trials=trials
        )
        client = self._bound(scores, member, user_delta, "client")
        details["client_white_box"] = client.to_dict()
        self.metrics["dp_audit.client.white_box_epsilon_lb"] = client.epsilon_lb
        self.metrics["audit_power.client"] = self._power(client, "user_level")
        self.figures.append(
            ("client canaries", report.histogram_svg(
                "white-box client canaries: score", {"included": scores[member],
                                                     "excluded": scores[~member]}))
        )  # fmt: skip

        # record canaries, black-box, through the real protection mode
        self._say("DP audit: black-box record canaries")
        rounds = min(config.rounds, s.black_box_rounds)
        scores, member = dp_audit.black_box_record_scores(
            config,
            data,
            self.randomness,
            folder=self.out / "probes" / "black_box",
            canaries=s.black_box_canaries,
            rounds=rounds,
        )
        black = self._bound(scores, member, sample_delta, "black")
        details["record_black_box"] = black.to_dict() | {"rounds": rounds}
        self.metrics["dp_audit.record.black_box_epsilon_lb"] = black.epsilon_lb
        self.figures.append(
            ("black-box canaries", report.histogram_svg(
                "black-box record canaries: -loss", {"included": scores[member],
                                                     "excluded": scores[~member]}))
        )  # fmt: skip
        self.details["dp_audit"] = details
        self._timed("dp_audit", t)

    def _bound(
        self, scores: np.ndarray, member: np.ndarray, delta: float, name: str
    ) -> dp_audit.AuditResult:
        order = self.randomness.stream(f"audit.order.{name}", party="auditor").permutation(
            len(scores)
        )
        return dp_audit.epsilon_lower_bound(scores, member, delta=delta, order=order)

    def _power(self, result: dp_audit.AuditResult, level: str) -> float:
        """The lower bound over the power it must show: 0.3 epsilon on a DP level (at most
        0.9 of what the audit's size can certify), 1.0 without DP."""
        info = self.epsilons[level]
        if info["dp"]:
            needed = min(POWER_SHARE_DP * info["epsilon"], 0.9 * result.max_certifiable)
        else:
            needed = POWER_NO_DP
        info["power_needed"] = needed
        return result.epsilon_lb / needed if needed > 0 else math.inf

    def _membership(self, data: FederatedData, target: torch.nn.Module) -> None:
        t = time.perf_counter()
        self._say("membership inference")
        from secfl.attack_suite.membership import membership_inference
        from secfl.models import build_model

        members = Dataset(
            "members",
            np.concatenate([c.x for c in data.clients]),
            np.concatenate([c.y for c in data.clients]),
            data.num_classes,
        )
        config = self.config
        result, scores = membership_inference(
            target,
            members,
            data.test,
            make_model=lambda: build_model(config.model, data.input_shape, data.num_classes),
            client=config.client,
            shadows=self.settings.shadows,
            shadow_epochs=self.settings.shadow_epochs,
            limit=self.settings.membership_records,
            randomness=self.randomness,
        )
        self.metrics["membership.auc"] = max(result.loss_auc, result.lira_auc)
        self.metrics["membership.tpr_at_1pct_fpr"] = max(
            result.loss_tpr_at_1pct, result.lira_tpr_at_1pct
        )
        self.details["membership"] = result.to_dict()
        member = scores["member"]
        self.figures.append(
            ("membership ROC", report.curve_svg(
                "membership inference ROC",
                {"loss threshold": report.roc_points(scores["loss"], member),
                 "LiRA offline": report.roc_points(scores["lira"], member)},
                x_label="false positive rate", y_label="true positive rate", diagonal=True))
        )  # fmt: skip
        self._timed("membership", t)

    def _integrity(self, data: FederatedData) -> None:
        t = time.perf_counter()
        self._say("secure-aggregation integrity")
        if self.config.aggregation.protection != "masking":
            self.details["secagg"] = "only mode masking runs the SecAgg integrity probes"
            return
        from secfl.attack_suite.integrity import integrity_probes

        found = integrity_probes(self.config, data, folder=self.out / "probes" / "integrity")
        metrics: dict[str, float] = found["metrics"]  # type: ignore[assignment]
        self.metrics.update(metrics)
        self.details["secagg"] = found["details"]
        self._timed("secagg", t)

    def _poisoning(self, data: FederatedData, clean: Any) -> None:
        t = time.perf_counter()
        self._say("poisoning subset")
        from secfl.attack_suite.poisoning import poisoning_subset

        found = poisoning_subset(
            self.config,
            data,
            clean_model=clean.model,
            clean_accuracy=float(clean.history[-1]["accuracy"]),
            folder=self.out / "poisoning",
            attacks=self.settings.poisoning_attacks,
        )
        self.metrics.update(found["metrics"])
        self.details["poisoning"] = found["details"]
        self._timed("poisoning", t)

    # ------------------------------------------------------------------ checks

    def _checks(self) -> list[dict[str, Any]]:
        checks = []
        for g in self.guarantees:
            reference = None
            if g.relative_to is not None:
                level = g.relative_to.split(".", 1)[1]
                reference = self.epsilons.get(level, {}).get("epsilon")
            value = self.metrics.get(g.metric)
            bound = (
                g.bound(reference) if (g.relative_to is None or reference is not None) else math.nan
            )
            passed = value is not None and not math.isnan(bound) and g.holds(value, reference)
            checks.append(
                {
                    "name": g.description or g.metric,
                    "metric": g.metric,
                    "value": value if value is not None else "not measured",
                    "op": g.op,
                    "threshold": bound,
                    "passed": bool(passed),
                }
            )
        return checks


def run_attack_suite(
    threat_model: str | Path,
    config: str | Path | RunConfig,
    out: str | Path,
    *,
    settings: SuiteSettings | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Load the threat model and configuration, run the suite, write the reports into
    ``out``; returns the JSON document."""
    model = load_threat_model(threat_model)
    run_config = config if isinstance(config, RunConfig) else load_config(config)
    folder = Path(out)
    if (folder / report.REPORT_JSON).exists() or (folder / "run").exists():
        raise ConfigError(f"{folder} already holds an attack report; choose a new --out DIR")
    threads = torch.get_num_threads()
    # small models: one thread is fastest, and far faster on a shared, loaded machine
    torch.set_num_threads(1)
    try:
        suite = AttackSuite(
            model, run_config, folder, settings or SuiteSettings(), progress=progress
        )
        return suite.run()
    finally:
        torch.set_num_threads(threads)
