"""The run configuration: one YAML file validated by pydantic (DESIGN 7).

Unknown keys, wrong types and out-of-range values raise :class:`~secfl.errors.ConfigError`
before anything runs; the message names the key, the value and what is allowed. Later
capabilities add their own blocks here (``aggregation.masking``, ``privacy``, ...).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from secfl.errors import ConfigError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(gt=0, le=1)]


class StrictModel(BaseModel):
    """Base of every config block: unknown keys are errors, values are never coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)


# ---------------------------------------------------------------------------- data


class IidPartition(StrictModel):
    kind: Literal["iid"] = "iid"


class DirichletPartition(StrictModel):
    """Label skew: each class is split across clients by Dirichlet(alpha) proportions."""

    kind: Literal["dirichlet"] = "dirichlet"
    alpha: PositiveFloat = 0.5
    min_samples: Annotated[int, Field(ge=1)] = 2


class ShardsPartition(StrictModel):
    """Pathological label skew: each client receives ``classes_per_client`` label shards."""

    kind: Literal["shards"] = "shards"
    classes_per_client: PositiveInt = 2


class QuantityPartition(StrictModel):
    """Quantity skew: client sizes ~ Dirichlet(alpha) over clients, labels IID within."""

    kind: Literal["quantity"] = "quantity"
    alpha: PositiveFloat = 1.0
    min_samples: Annotated[int, Field(ge=1)] = 2


Partition = Annotated[
    IidPartition | DirichletPartition | ShardsPartition | QuantityPartition,
    Field(discriminator="kind"),
]


class SharedDataConfig(StrictModel):
    """The public shared dataset the server may use; removed from every client's partition."""

    per_class: Annotated[int, Field(ge=0, le=1000)] = 5


class DataConfig(StrictModel):
    dataset: Literal["digits", "breast_cancer", "mnist1d", "npz", "csv", "idx"] = "digits"
    #: Path of a user dataset (``npz``: arrays ``x``, ``y``; ``csv``: label in the last
    #: column unless ``label_column``; ``idx``: ``path`` is the images file, ``labels_path``).
    path: str | None = None
    labels_path: str | None = None
    label_column: int = -1
    #: MNIST-1D samples to generate (cached on disk by a hash of the generator's arguments).
    num_samples: Annotated[int, Field(ge=100, le=2_000_000)] = 5000
    num_clients: Annotated[int, Field(ge=1, le=100_000)] = 10
    partition: Partition = Field(default_factory=DirichletPartition)
    shared: SharedDataConfig = Field(default_factory=SharedDataConfig)
    #: Per-feature standardisation with statistics of the public shared set only (never of
    #: client or test data): ``auto`` standardises tabular data (1-D inputs) and leaves
    #: images and signals as loaded; ``shared`` standardises every dataset; ``none`` never.
    standardize: Literal["auto", "shared", "none"] = "auto"
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _user_data_needs_path(self) -> DataConfig:
        if self.standardize == "shared" and self.shared.per_class < 1:
            raise ValueError(
                "data.standardize 'shared' takes its statistics from the public shared set; "
                "it needs data.shared.per_class >= 1"
            )
        if self.dataset in ("npz", "csv", "idx") and not self.path:
            raise ValueError(f"data.path is required for dataset {self.dataset!r}")
        if self.dataset == "idx" and not self.labels_path:
            raise ValueError("data.labels_path is required for dataset 'idx'")
        return self


# ---------------------------------------------------------------------------- model


class ModelConfig(StrictModel):
    kind: Literal["mlp", "cnn"] = "mlp"
    hidden: list[PositiveInt] = Field(default_factory=lambda: [64])
    channels: list[PositiveInt] = Field(default_factory=lambda: [16, 32])
    #: GroupNorm groups (never BatchNorm: DP-SGD needs per-sample independence).
    groups: PositiveInt = 4
    activation: Literal["relu", "tanh", "gelu"] = "relu"


# ---------------------------------------------------------------------------- client


class DistillConfig(StrictModel):
    """``client.distill``: the client trains its local model as a student of the broadcast
    global model, a frozen teacher (US20210182661A1, claim 2). The per-record objective is
    ``(1 - alpha) * CE(student, label) + alpha * temperature^2 *
    KL(softmax(teacher / temperature) || softmax(student / temperature))``."""

    temperature: Annotated[float, Field(gt=0, le=100)] = 2.0
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5


class ClientConfig(StrictModel):
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: Annotated[float, Field(gt=0, le=10)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 32
    #: Distillation from the global model as teacher (docs/strategies.md), or None.
    distill: DistillConfig | None = None
    #: ``weights``: the update is the trained weights minus the global weights.
    #: ``gradients``: the mean gradient of the local objective at the global weights over
    #: the client's records (one pass, no local step); the server steps against it with
    #: its optimiser at ``server.lr``.
    update_kind: Literal["weights", "gradients"] = "weights"

    @model_validator(mode="after")
    def _distill_needs_local_steps(self) -> ClientConfig:
        if self.distill is not None and self.update_kind == "gradients":
            raise ValueError(
                "client.distill with client.update_kind='gradients' is refused: the gradient "
                "is taken at the global weights, where the student equals the teacher and the "
                "distillation term's gradient is exactly zero (it would only scale the "
                "cross-entropy gradient by 1 - alpha); distillation needs local steps, "
                "use update_kind 'weights'"
            )
        return self


# ---------------------------------------------------------------------------- server


class FixedSampling(StrictModel):
    """Exactly ``clients_per_round`` clients (or ``fraction`` of them), uniformly."""

    kind: Literal["fixed"] = "fixed"
    clients_per_round: PositiveInt | None = None
    fraction: Probability | None = None

    @model_validator(mode="after")
    def _one_of(self) -> FixedSampling:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("give server.sampling.clients_per_round or .fraction, not both")
        return self


class PoissonSampling(StrictModel):
    """Each client participates independently with probability ``rate`` (DP amplification)."""

    kind: Literal["poisson"] = "poisson"
    rate: Probability = 0.1


Sampling = Annotated[FixedSampling | PoissonSampling, Field(discriminator="kind")]


class DevicePopulationConfig(StrictModel):
    """``server.strategy.devices``: the simulated device population (``secfl.strategies``).

    Compute speed (FLOP/s) and upload bandwidth (bytes/s) are log-normal around their
    medians with the given sigmas, drawn once from the seed (experiment design); each device
    is available in a round with probability ``availability``, drawn per round.
    """

    count: Annotated[int, Field(ge=1, le=100_000)] = 200
    speed_median: PositiveFloat = 2e7
    speed_sigma: Annotated[float, Field(ge=0, le=5)] = 1.0
    bandwidth_median: PositiveFloat = 1.25e5
    bandwidth_sigma: Annotated[float, Field(ge=0, le=5)] = 1.0
    availability: Probability = 0.8


class PoolModelConfig(StrictModel):
    """One base model of the random model sharing pool: its name, architecture and
    initialisation (``init_seed``; None: the model's position in the pool), drawn from the
    run's seed as a design choice, so two entries with one architecture start apart."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")]
    model: ModelConfig = Field(default_factory=ModelConfig)
    init_seed: Annotated[int, Field(ge=0, le=2**31)] | None = None


class PoolConvergenceConfig(StrictModel):
    """``server.strategy.convergence``: a base model has converged once its test error
    (1 - accuracy) is at most ``error_bound``, or once its test error moved by less than
    ``tolerance`` (max - min) over its last ``window`` evaluations."""

    error_bound: Annotated[float, Field(ge=0, le=1)] = 0.1
    tolerance: Annotated[float, Field(ge=0, le=1)] = 0.01
    window: Annotated[int, Field(ge=2, le=1000)] = 3


class PoolStrategy(StrictModel):
    """``server.strategy: {kind: pool}``: the random model sharing pool (CN119005361B).

    Each round at most ``models_per_round`` base models are drawn and the round's
    participants are dealt among them by randomness every participant recomputes (from a
    hash of the keys they advertised); each drawn model is securely aggregated over its own
    cohort of at least ``aggregation.min_cohort``. After convergence the acceptable set holds
    the models whose test-accuracy Clopper-Pearson interval at ``confidence`` overlaps the
    best model's; near-duplicates (cosine of the weights above ``duplicate_cosine``) are
    eliminated."""

    kind: Literal["pool"] = "pool"
    models: Annotated[list[PoolModelConfig], Field(min_length=1, max_length=32)]
    #: At most this many models are drawn a round (fewer when the participants cannot
    #: form that many cohorts of ``aggregation.min_cohort``).
    models_per_round: Annotated[int, Field(ge=1, le=32)] = 2
    #: Participants sampled uniformly each round (None: every client).
    participants_per_round: Annotated[int, Field(ge=1, le=100_000)] | None = None
    convergence: PoolConvergenceConfig = Field(default_factory=PoolConvergenceConfig)
    #: Stop before ``rounds`` once every base model has converged (S402 / S406).
    stop_when_converged: bool = True
    #: Two-sided confidence level of the Clopper-Pearson intervals.
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    #: Cosine similarity of two models' weights above which the worse one is eliminated
    #: (models of different sizes are never duplicates).
    duplicate_cosine: Annotated[float, Field(gt=0, le=1)] = 0.99

    @model_validator(mode="after")
    def _models_are_distinct(self) -> PoolStrategy:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"server.strategy.models names must be distinct, got {names}")
        if self.models_per_round > len(self.models):
            raise ValueError(
                f"server.strategy.models_per_round={self.models_per_round} exceeds the "
                f"{len(self.models)} base models; allowed 1..{len(self.models)}"
            )
        return self


class SchedulerTaskConfig(StrictModel):
    """One federated task the scheduler runs beside the others: its data (one client per
    device: ``data.num_clients`` must equal ``devices.count``), model, local training, DP
    (None: the run's ``privacy`` block) and devices per round."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")]
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    privacy: PrivacyConfig | None = None
    devices_per_round: Annotated[int, Field(ge=1, le=100_000)] = 10


class SchedulerStrategy(StrictModel):
    """``server.strategy: {kind: scheduler}``: several tasks at once over one simulated
    device population; each round ``policy`` assigns available devices to tasks
    (``resource``: from speed, bandwidth, workload, model size, remaining DP budget and a
    fairness term; ``random``: the same number of random available devices per task)."""

    kind: Literal["scheduler"] = "scheduler"
    policy: Literal["resource", "random"] = "resource"
    devices: DevicePopulationConfig = Field(default_factory=DevicePopulationConfig)
    tasks: Annotated[list[SchedulerTaskConfig], Field(min_length=1, max_length=32)]
    #: Weight of a device's participation deficit against its log relative round time.
    fairness_weight: Annotated[float, Field(ge=0, le=100)] = 1.0
    #: A device whose compute plus upload time for a task exceeds this many simulated
    #: seconds is never assigned to that task (None: no limit).
    max_device_time: PositiveFloat | None = None

    @model_validator(mode="after")
    def _tasks_fit_population(self) -> SchedulerStrategy:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"server.strategy.tasks names must be distinct, got {names}")
        for i, task in enumerate(self.tasks):
            if task.data.num_clients != self.devices.count:
                raise ValueError(
                    f"server.strategy.tasks[{i}].data.num_clients={task.data.num_clients} "
                    f"must equal server.strategy.devices.count={self.devices.count} "
                    "(each device holds one client's data for every task)"
                )
        wanted = sum(t.devices_per_round for t in self.tasks)
        if wanted > self.devices.count:
            raise ValueError(
                f"server.strategy.tasks ask for {wanted} devices per round in all; allowed "
                f"at most devices.count={self.devices.count} (a device trains one task a round)"
            )
        return self


class TierConfig(StrictModel):
    """One hardware tier: its name and the width multiplier of the run's ``model`` it
    trains (hidden units and channels scaled, at least one each)."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")]
    width: Annotated[float, Field(gt=0, le=4)]


class TierTransferConfig(StrictModel):
    """``server.strategy.transfer``: after each round every tier's model is distilled from
    the ensemble of the other tiers' models on public inputs (``shared``: ``data.shared``;
    ``synthetic``: inputs inverted from all tiers' models; ``both``), KL at ``temperature``
    plus ``prox / 2 * ||w - w_aggregate||^2``."""

    source: Literal["shared", "synthetic", "both"] = "shared"
    #: A light touch each round: stronger transfer (20 steps at lr 0.05, temperature 2)
    #: pulled the tiers together and cost them 4-21 points on MNIST-1D (docs/strategies.md).
    steps: Annotated[int, Field(ge=1, le=100_000)] = 5
    lr: Annotated[float, Field(gt=0, le=10)] = 0.02
    optimizer: Literal["sgd", "adam"] = "sgd"
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 32
    temperature: Annotated[float, Field(gt=0, le=100)] = 1.0
    prox: Annotated[float, Field(ge=0, le=1e6)] = 0.01
    #: First round after which models are transferred (early models teach little).
    start_round: Annotated[int, Field(ge=1, le=100_000)] = 5
    #: Synthetic inputs per class and inversion steps (``source`` synthetic or both).
    synthetic_per_class: Annotated[int, Field(ge=1, le=10_000)] = 10
    synthetic_steps: Annotated[int, Field(ge=1, le=100_000)] = 100


class TiersStrategy(StrictModel):
    """``server.strategy: {kind: tiers}``: clients declare a hardware profile (memory,
    compute, bandwidth: simulated from ``devices`` and ``memory_*``), are grouped by a
    capacity score into ``tiers`` (ordered smallest model first) by ``rule`` (``quantiles``
    of the score, equal counts by default, or absolute ``thresholds`` on it); each tier runs
    its own federation of a width variant of ``model``; a tier below
    ``aggregation.min_cohort`` is merged into a neighbour and trains the smaller model."""

    kind: Literal["tiers"] = "tiers"
    devices: DevicePopulationConfig = Field(default_factory=DevicePopulationConfig)
    #: Device memory in MiB, log-normal around the median.
    memory_median: PositiveFloat = 2048.0
    memory_sigma: Annotated[float, Field(ge=0, le=5)] = 1.0
    rule: Literal["quantiles", "thresholds"] = "quantiles"
    #: ``len(tiers) - 1`` increasing cut points: quantiles in (0, 1) of the capacity score
    #: (None: equal counts), or score thresholds (required with ``thresholds``).
    cuts: list[float] | None = None
    tiers: Annotated[list[TierConfig], Field(min_length=1, max_length=8)] = Field(
        default_factory=lambda: [
            TierConfig(name="small", width=0.25),
            TierConfig(name="medium", width=0.5),
            TierConfig(name="large", width=1.0),
        ]
    )
    #: Fraction of a tier's available members that train each round (at least
    #: ``aggregation.min_cohort``).
    fraction: Probability = 1.0
    #: Cross-tier knowledge transfer (None: the tiers never exchange knowledge).
    transfer: TierTransferConfig | None = Field(default_factory=TierTransferConfig)

    @model_validator(mode="after")
    def _tiers_are_ordered(self) -> TiersStrategy:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"server.strategy.tiers names must be distinct, got {names}")
        widths = [t.width for t in self.tiers]
        if any(widths[i + 1] <= widths[i] for i in range(len(widths) - 1)):
            raise ValueError(
                f"server.strategy.tiers widths must increase (smallest model first), got {widths}"
            )
        if self.cuts is None:
            if self.rule == "thresholds" and len(self.tiers) > 1:
                raise ValueError("server.strategy.rule 'thresholds' needs server.strategy.cuts")
            return self
        if len(self.cuts) != len(self.tiers) - 1:
            raise ValueError(
                f"server.strategy.cuts has {len(self.cuts)} values; allowed exactly "
                f"len(tiers) - 1 = {len(self.tiers) - 1}"
            )
        if any(self.cuts[i + 1] <= self.cuts[i] for i in range(len(self.cuts) - 1)):
            raise ValueError(f"server.strategy.cuts must increase, got {self.cuts}")
        if self.rule == "quantiles" and not all(0 < c < 1 for c in self.cuts):
            raise ValueError(f"server.strategy.cuts are quantiles: allowed (0, 1), got {self.cuts}")
        return self


#: ``server.strategy``: tagged by ``kind``.
Strategy = Annotated[SchedulerStrategy | TiersStrategy | PoolStrategy, Field(discriminator="kind")]


class ServerConfig(StrictModel):
    optimizer: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    lr: Annotated[float, Field(gt=0, le=100)] = 1.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.99
    tau: Annotated[float, Field(gt=0, le=1)] = 1e-3
    sampling: Sampling = Field(default_factory=FixedSampling)
    #: An orchestration strategy (``secfl.strategies``); None: one task, ``sampling``.
    strategy: Strategy | None = None


# ---------------------------------------------------------------------------- protection


class MaskingConfig(StrictModel):
    """``aggregation.masking``: SecAgg (complete graph) / SecAgg+ (random k-regular graph).

    See ``protocols/secagg.md`` for what each key means for security and for the sum's
    precision; :func:`secfl.secagg.params.derive_params` turns these into one round's
    parameters and refuses combinations that could overflow or under-protect.
    """

    graph: Literal["complete", "k_regular"] = "complete"
    #: k for ``k_regular`` (even); default 2*ceil(log2(n)) (Bell et al. 2020). A k >= n - 1
    #: is the complete graph.
    neighbors: PositiveInt | None = None
    #: Shamir threshold t; default max(min_cohort, floor(k/2)+1), floor(2k/3)+1 if active.
    threshold: PositiveInt | None = None
    #: Modulus bits b of Z_{2^b}; default the smallest that cannot overflow.
    bits: Annotated[int, Field(ge=8, le=64)] | None = None
    #: Per-coordinate clip range C: updates are clipped to [-C, C] before quantisation.
    clip_range: PositiveFloat = 1.0
    variant: Literal["semi-honest", "active"] = "semi-honest"
    #: Quantisation resolution r: a clipped value times its weight is rounded to a multiple
    #: of C / 2^(r-1) (stochastic rounding, unbiased).
    resolution_bits: Annotated[int, Field(ge=2, le=30)] = 16
    #: ``samples``: the sum is weighted by each client's sample count (capped at
    #: ``max_weight``); the server learns only the total weight. ``uniform``: weight 1.
    weighting: Literal["samples", "uniform"] = "samples"
    #: Upper bound on one client's weight; a client with more samples uses this weight.
    max_weight: Annotated[int, Field(ge=1, le=2**24)] = 1024
    #: Mask PRG seed length in bytes: 16 (AES-128-CTR) or 32 (AES-256-CTR).
    seed_bytes: Literal[16, 32] = 32
    #: Threads of the mask expansion engine; default every core the process may use.
    threads: Annotated[int, Field(ge=1, le=256)] | None = None

    @model_validator(mode="after")
    def _even_neighbours(self) -> MaskingConfig:
        if self.neighbors is not None and self.neighbors % 2:
            raise ValueError(
                f"aggregation.masking.neighbors must be even (a Harary graph H(k, n)), "
                f"got {self.neighbors}"
            )
        return self


class FloodingConfig(StrictModel):
    """Noise flooding of every CKKS release (Li-Micciancio 2021; Li, Micciancio, Schultz,
    Sorrell 2022): s statistical bits for ``query_budget`` decryption queries per key; the
    decryptor rotates keys before the budget is spent. The preset's precision is checked for
    these values when the run is built (``docs/ckks.md``)."""

    statistical_bits: Annotated[int, Field(ge=40, le=128)] = 40
    query_budget: Annotated[int, Field(ge=1, le=2**40)] = 2**16


class CkksConfig(StrictModel):
    """``aggregation.ckks``: TenSEAL CKKS with a policy-enforcing decryptor."""

    preset: str = "aggregation"
    flooding: FloodingConfig = Field(default_factory=FloodingConfig)
    #: No participant's weight may exceed this share of a released weighted sum.
    max_weight_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    #: Per-coordinate range C the decryptor's error bound is stated for.
    clip_range: PositiveFloat = 1.0


class AggregationConfig(StrictModel):
    protection: Literal["none", "masking", "ckks"] = "none"
    #: The smallest set of participants whose sum may ever be revealed (DESIGN 7b).
    min_cohort: Annotated[int, Field(ge=1, le=100_000)] = 3
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    ckks: CkksConfig = Field(default_factory=CkksConfig)


#: Protocol stages at which simulated dropouts can happen (``fit`` is mode ``none``).
DropoutStage = Literal[
    "fit",
    "advertise_keys",
    "share_keys",
    "masked_input",
    "consistency_check",
    "unmask",
    "encrypted_input",
]
DROPOUT_STAGES: tuple[str, ...] = get_args(DropoutStage)


class SimulationConfig(StrictModel):
    """``simulation``: dropouts and device behaviour in simulation (DESIGN 7b).

    At every listed stage, each client still in the round drops with probability
    ``dropout_rate`` (independently; reproducible in ``seeded`` mode); every dropout is
    recorded in the event log as ``simulated_dropout``.
    """

    dropout_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0
    dropout_stages: list[DropoutStage] = Field(default_factory=list)
    #: torch intra-op threads while the run simulates its parties in this process. 1 (the
    #: default) is the fastest for the small per-client models: measured on the 2-core dev
    #: machines, one MNIST-1D CNN step took 4.6 ms with 1 thread and 37 ms with 2 while
    #: other processes ran (OpenMP threads oversubscribe). ``null`` keeps torch's default.
    torch_threads: Annotated[int, Field(ge=1, le=256)] | None = 1
    #: Where the simulated clients run: in this process, or in Ray actors
    #: (``secfl.deploy.ray_transport``; needs ``security.randomness: seeded``).
    transport: Literal["inprocess", "ray"] = "inprocess"
    #: Ray cluster to join (``auto``, ``ray://HOST:10001``); None starts a local instance.
    ray_address: str | None = None
    #: Ray actors hosting the clients (None: one per CPU of the cluster, at most one per client).
    ray_workers: Annotated[int, Field(ge=1, le=100_000)] | None = None

    @model_validator(mode="after")
    def _stages_for_rate(self) -> SimulationConfig:
        if self.dropout_rate > 0 and not self.dropout_stages:
            raise ValueError(
                f"simulation.dropout_rate={self.dropout_rate} needs simulation.dropout_stages "
                f"(any of {list(DROPOUT_STAGES)})"
            )
        if len(set(self.dropout_stages)) != len(self.dropout_stages):
            raise ValueError("simulation.dropout_stages lists a stage twice")
        return self


# ---------------------------------------------------------------------------- privacy

#: Accountants in :mod:`secfl.privacy.accountants` (libraries, never hand-written maths).
AccountantName = Literal["opacus_prv", "opacus_rdp", "dpa_pld", "dpa_rdp", "secfl_rdp"]
Delta = Annotated[float, Field(gt=0, lt=1)]


class _NoiseChoice(StrictModel):
    """Exactly one of ``noise_multiplier`` or ``target_epsilon`` (calibrated by the
    accountant for the worst case: the party takes part in every round)."""

    noise_multiplier: PositiveFloat | None = None
    target_epsilon: PositiveFloat | None = None

    @model_validator(mode="after")
    def _one_noise_setting(self) -> _NoiseChoice:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier or target_epsilon")
        return self


class SampleLevelConfig(_NoiseChoice):
    """``privacy.sample_level``: DP-SGD on every client (Abadi et al. 2016).

    Each step includes every record independently with probability ``sample_rate`` (Poisson
    sampling; an epoch is round(1/sample_rate) steps, ``client.epochs`` epochs a round), clips
    each per-sample gradient to L2 norm ``max_grad_norm`` and adds Gaussian noise of standard
    deviation ``noise_multiplier * max_grad_norm``; ``client.batch_size`` is not used.
    ``delta`` must be at most 1/(10 n) for every client's record count n.
    """

    delta: Delta = 1e-5
    max_grad_norm: PositiveFloat = 1.0
    sample_rate: Probability = 0.25
    #: Layers Opacus cannot use with DP-SGD (BatchNorm, ...): ``error``, or ``fix`` applies
    #: Opacus' ``ModuleValidator.fix`` to the whole federation's model with a logged notice.
    incompatible_layers: Literal["error", "fix"] = "error"


class UserLevelConfig(_NoiseChoice):
    """``privacy.user_level``: each update clipped to L2 norm ``clip_norm``, noise on the sum.

    Mode ``none``: central Gaussian noise added by the (trusted) server. ``masking``: every
    client adds a Skellam share in the integer domain before masking; ``ckks``: a Gaussian
    share before encryption (``secfl.privacy.distributed``). ``weighting: uniform`` gives
    every client weight 1 (sensitivity ``clip_norm``); ``capped`` gives min(records /
    ``weight_unit``, ``max_weight``) (sensitivity ``clip_norm * max_weight``). ``delta`` must
    be at most 1/(10 n), n = number of clients.
    """

    delta: Delta = 1e-5
    clip_norm: PositiveFloat = 1.0
    weighting: Literal["uniform", "capped"] = "uniform"
    max_weight: PositiveFloat = 1.0
    weight_unit: PositiveFloat = 1.0
    #: Distributed noise only: how many contributors to a sum the threat model lets collude
    #: with the server (they know their own shares); every client adds enough noise for the
    #: threshold minus these. Must be below ``aggregation.min_cohort``.
    colluding_clients: Annotated[int, Field(ge=0)] = 0


class BudgetConfig(StrictModel):
    """``privacy.budget``: fail closed. A client over ``client_epsilon`` does not train; a
    round that would take the global user-level epsilon over ``global_epsilon`` does not
    start and the run stops with its checkpoint saved."""

    client_epsilon: PositiveFloat | None = None
    global_epsilon: PositiveFloat | None = None


class AccountantConfig(StrictModel):
    sample_level: AccountantName = "opacus_prv"
    user_level: AccountantName = "dpa_pld"


class PrivacyConfig(StrictModel):
    """``privacy``: sample-level DP-SGD, user-level DP, their accountants and budgets."""

    sample_level: SampleLevelConfig | None = None
    user_level: UserLevelConfig | None = None
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    accountant: AccountantConfig = Field(default_factory=AccountantConfig)

    @model_validator(mode="after")
    def _budgets_need_mechanisms(self) -> PrivacyConfig:
        if self.budget.client_epsilon is not None and self.sample_level is None:
            raise ValueError("privacy.budget.client_epsilon needs privacy.sample_level")
        if self.budget.global_epsilon is not None and self.user_level is None:
            raise ValueError("privacy.budget.global_epsilon needs privacy.user_level")
        return self


class AdversaryConfig(StrictModel):
    """``adversary``: simulated malicious clients that poison the model (DESIGN 7b,
    ``docs/attacks.md``).

    ``attack`` names a registered attack (:func:`secfl.attacks.registered_attacks`) built
    with ``params``; ``plugin: "package.module:factory"`` imports an auditor's attack factory
    here, at config time, and registers it under ``attack``. The malicious clients are the
    first f of a permutation of the client ids drawn from the run's ``adversary.select``
    stream, f = ``count`` or floor(``fraction`` * ``data.num_clients``), 1 <= f <= n/2.
    ``collusion``: they craft together; ``omniscient``: they see the round's honest updates;
    ``rounds: [first, last]``: the inclusive window in which they attack (null: always).
    """

    attack: str
    fraction: Annotated[float, Field(gt=0, le=0.5)] | None = None
    count: PositiveInt | None = None
    collusion: bool = True
    omniscient: bool = True
    rounds: list[PositiveInt] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    plugin: str | None = None

    @model_validator(mode="after")
    def _attack_is_known(self) -> AdversaryConfig:
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give exactly one of adversary.fraction or adversary.count")
        if self.rounds is not None and (len(self.rounds) != 2 or self.rounds[0] > self.rounds[1]):
            raise ValueError(
                f"adversary.rounds={self.rounds} is not allowed: [first, last] with "
                "1 <= first <= last, or null for every round"
            )
        try:
            json.dumps(self.params, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"adversary.params must hold JSON values: {exc}") from None
        from secfl.attacks.base import get_attack, load_plugin

        if self.plugin is not None:
            load_plugin(self.plugin, self.attack)
        get_attack(self.attack, self.params)
        return self


class SecurityConfig(StrictModel):
    randomness: Literal["os", "seeded"] = "os"
    #: The server's Ed25519 audit key (PEM) signing the event log and receipts; None: the
    #: per-user default key (``secfl.audit.keys``). Never derived from the seed.
    audit_key: str | None = None


class EvaluationConfig(StrictModel):
    every: PositiveInt = 1
    per_client: bool = True
    batch_size: PositiveInt = 1024


# ---------------------------------------------------------------------------- trust

#: Metrics the trust module compares each participant with the trusted party on.
TrustMetric = Literal["cosine", "distance", "norm_ratio"]


class TrustVoteConfig(StrictModel):
    """``trust.vote``: the rules scoring each participant and their weights (DESIGN 4).

    Rules come from :mod:`secfl.trust.vote`'s registry (built in: ``reference``, ``peer``,
    ``reputation``); a rule left out of ``weights`` keeps its default weight. The defaults
    let the server's reference dominate and peer agreement only break ties, so colluders
    who agree with each other cannot elect one of themselves."""

    rules: list[str] = Field(default_factory=lambda: ["reference", "peer", "reputation"])
    weights: dict[str, Annotated[float, Field(ge=0, le=1000)]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_rules(self) -> TrustVoteConfig:
        from secfl.trust.vote import registered_vote_rules

        known = registered_vote_rules()
        if not self.rules:
            raise ValueError(f"trust.vote.rules must name at least one of {sorted(known)}")
        if len(set(self.rules)) != len(self.rules):
            raise ValueError("trust.vote.rules lists a rule twice")
        for name in self.rules:
            if name not in known:
                raise ValueError(
                    f"trust.vote.rules: unknown rule {name!r}; allowed {sorted(known)}"
                )
        for name in self.weights:
            if name not in self.rules:
                raise ValueError(
                    f"trust.vote.weights names {name!r}, which is not in trust.vote.rules "
                    f"{self.rules}"
                )
        return self


class TrustCompareConfig(StrictModel):
    """``trust.compare``: what each participant is measured on against the trusted party."""

    metrics: list[TrustMetric] = Field(default_factory=lambda: list(get_args(TrustMetric)))

    @model_validator(mode="after")
    def _some_metric(self) -> TrustCompareConfig:
        if not self.metrics or len(set(self.metrics)) != len(self.metrics):
            raise ValueError(
                "trust.compare.metrics must list each of cosine, distance, norm_ratio at most "
                "once, and at least one"
            )
        return self


class TrustThresholdConfig(StrictModel):
    """``trust.threshold``: ``mad`` flags a participant whose metric lies beyond median
    +- k * 1.4826 * MAD over the round (cosine below, distance and norm ratio above), the
    spread floored at ``min_spread`` (absolute for cosine, relative to the median for the
    others); ``fixed`` uses ``cosine_min``, ``distance_max``, ``norm_ratio_max``."""

    kind: Literal["mad", "fixed"] = "mad"
    k: Annotated[float, Field(gt=0, le=100)] = 4.0
    min_spread: Annotated[float, Field(ge=0, le=10)] = 0.1
    cosine_min: Annotated[float, Field(ge=-1, le=1)] | None = None
    distance_max: PositiveFloat | None = None
    norm_ratio_max: PositiveFloat | None = None

    @model_validator(mode="after")
    def _keys_for_kind(self) -> TrustThresholdConfig:
        fixed = {
            "cosine_min": self.cosine_min,
            "distance_max": self.distance_max,
            "norm_ratio_max": self.norm_ratio_max,
        }
        given = sorted(k for k, v in fixed.items() if v is not None)
        if self.kind == "mad" and given:
            raise ValueError(f"trust.threshold {given} need kind 'fixed', got kind 'mad'")
        if self.kind == "fixed" and not given:
            raise ValueError(
                "trust.threshold kind 'fixed' needs at least one of cosine_min, distance_max, "
                "norm_ratio_max"
            )
        return self


class TrustReputationConfig(StrictModel):
    """``trust.reputation``: per-client score in [0, 1]; times ``decay`` when flagged, plus
    ``recovery`` (capped at 1) when kept."""

    initial: Annotated[float, Field(ge=0, le=1)] = 1.0
    decay: Annotated[float, Field(ge=0, lt=1)] = 0.5
    recovery: Annotated[float, Field(ge=0, le=1)] = 0.05


class TrustReferenceConfig(StrictModel):
    """``trust.reference``: the server's update on ``data.shared`` (FLTrust's root update):
    ``steps`` plain SGD steps of ``batch_size`` from the global model; ``lr`` defaults to
    ``client.lr``."""

    steps: Annotated[int, Field(ge=1, le=10_000)] = 10
    lr: Annotated[float, Field(gt=0, le=10)] | None = None
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 32


class TrustSybilConfig(StrictModel):
    """``trust.sybil``: clients whose updates have pairwise cosine >= ``cosine`` form a
    near-duplicate cluster: their vote score is zero and, with ``flag``, they are flagged."""

    cosine: Annotated[float, Field(gt=0, le=1)] = 0.99
    flag: bool = True


class TrustRobustConfig(StrictModel):
    """Parameters of the baseline robust aggregators (``secfl.trust.baselines``): ``f``
    assumed Byzantine clients (Krum; default the most the round tolerates, (n - 3) // 2),
    ``multi_krum_m`` selected updates (default n - f), ``trim_beta`` trimmed per side,
    centered clipping's radius ``clip_tau`` (default the round's median distance to the
    centre) and ``clip_iterations``."""

    f: Annotated[int, Field(ge=0, le=100_000)] | None = None
    multi_krum_m: PositiveInt | None = None
    trim_beta: Annotated[float, Field(ge=0, lt=0.5)] = 0.1
    clip_tau: PositiveFloat | None = None
    clip_iterations: Annotated[int, Field(ge=1, le=100)] = 1


class TrustSuspicionConfig(StrictModel):
    """``trust.suspicion`` (mode ``masking`` only, ``secfl.trust.reputation.Suspicion``):
    a member of a flagged sub-cohort gains ``step``; a member of a kept one has its
    suspicion multiplied by ``forgive``; a client whose suspicion reaches ``bound`` is
    excluded before masking in later rounds. A sub-cohort whose mean is longer than
    ``norm_ratio_max`` times the trusted sub-cohort's is flagged (``null``: no bound)."""

    step: Annotated[float, Field(gt=0, le=1e6)] = 1.0
    forgive: Annotated[float, Field(ge=0, le=1)] = 0.5
    bound: Annotated[float, Field(gt=0, le=1e6)] = 6.0
    norm_ratio_max: Annotated[float, Field(gt=1, le=1e6)] | None = 4.0


class TrustDormantConfig(StrictModel):
    """``trust.dormant`` (``secfl.trust.prune``, after Fine-Pruning): a unit is dormant
    when its mean absolute activation on the public shared set (``data.shared``) is at most
    ``tau`` times its layer's median, over the input units of the model's Linear layers
    (``first``: the first one, an MLP's input features; ``all``). ``reset``: after every
    round zero the weights those units feed in the new global model (acts on the revealed
    model only; ``masking``: under protection ``masking`` only, where a sub-cohort mean can
    hide an attacker's share in early rounds; ``always``; ``never``). ``flag_share``: flag
    a participant (mode ``none``) or sub-cohort (``masking``) whose update puts more than
    this share of its norm on those weights (``null``: off); under ``ckks`` the share is
    computed from a fourth released scalar, the squared norm on those weights."""

    reset: Literal["never", "masking", "always"] = "masking"
    flag_share: Annotated[float, Field(gt=0, le=1)] | None = 0.15
    layers: Literal["first", "all"] = "first"
    tau: Annotated[float, Field(ge=0, lt=1)] = 0.05


class TrustConfig(StrictModel):
    """``trust``: the server's defense against poisoned updates (DESIGN 4, ``docs/trust.md``).

    ``vote`` elects a trusted party and flags outliers against it; the others are baseline
    robust aggregators; ``none`` turns the module off."""

    defense: Literal[
        "vote",
        "krum",
        "multi_krum",
        "median",
        "trimmed_mean",
        "centered_clipping",
        "fltrust",
        "none",
    ] = "vote"
    vote: TrustVoteConfig = Field(default_factory=TrustVoteConfig)
    compare: TrustCompareConfig = Field(default_factory=TrustCompareConfig)
    threshold: TrustThresholdConfig = Field(default_factory=TrustThresholdConfig)
    reputation: TrustReputationConfig = Field(default_factory=TrustReputationConfig)
    reference: TrustReferenceConfig = Field(default_factory=TrustReferenceConfig)
    sybil: TrustSybilConfig = Field(default_factory=TrustSybilConfig)
    robust: TrustRobustConfig = Field(default_factory=TrustRobustConfig)
    suspicion: TrustSuspicionConfig = Field(default_factory=TrustSuspicionConfig)
    dormant: TrustDormantConfig = Field(default_factory=TrustDormantConfig)


# ---------------------------------------------------------------------------- refine


class RefineSharedConfig(StrictModel):
    """``refine.shared``: fine-tune the aggregate on the public shared set (``data.shared``),
    with a proximal term ``prox`` * ||w - w_aggregate||^2 / 2 so it keeps the federation's
    knowledge."""

    steps: Annotated[int, Field(ge=1, le=100_000)] = 20
    lr: Annotated[float, Field(gt=0, le=10)] = 0.05
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 32
    prox: Annotated[float, Field(ge=0, le=1e6)] = 0.01


class RefineMomentsConfig(StrictModel):
    """``refine.server_inversion.moments``: per-layer activation moments released by the
    clients for feature-statistics matching (clipped per record, Gaussian noise, securely
    aggregated, charged to each client's record-level ledger)."""

    clip: PositiveFloat = 20.0
    noise_multiplier: Annotated[float, Field(ge=0, le=1e4)] = 1.0
    #: Collect every this many rounds (the statistics of the current global model).
    every: Annotated[int, Field(ge=1, le=100_000)] = 5


class InversionSettingsConfig(StrictModel):
    per_class: Annotated[int, Field(ge=1, le=10_000)] = 10
    steps: Annotated[int, Field(ge=1, le=100_000)] = 200
    lr: Annotated[float, Field(gt=0, le=10)] = 0.1
    tv: Annotated[float, Field(ge=0, le=1e6)] = 1e-3
    l2: Annotated[float, Field(ge=0, le=1e6)] = 1e-4
    feature_stats: Annotated[float, Field(ge=0, le=1e6)] = 1.0
    #: The synthetic inputs' per-feature std is matched to this multiple of the released
    #: population std (0: only the mean is matched). At exactly 1 the samples sit as near the
    #: training records as unseen records do (memorisation ratio ~1.0 on MNIST-1D). ``null``
    #: (default): 1.05, or 1.2 when ``refine.shared`` also fine-tunes the model on real
    #: records, which pulls its inversions towards them (see docs/refinement.md).
    input_spread: Annotated[float, Field(ge=0, le=10)] | None = None
    #: Input features whose std is at most this fraction of the median feature's (constant
    #: border pixels) are held at their mean, on the data's support (0: off).
    support_floor: Annotated[float, Field(ge=0, lt=1)] = 0.05
    adversarial: Annotated[float, Field(ge=0, le=1e6)] = 0.0


class RefineServerInversionConfig(InversionSettingsConfig):
    """``refine.server_inversion``: invert the teachers the protection mode lets the server
    see into a synthetic set, then distil them into the aggregate on it.

    ``teacher``: ``auto`` takes the client models in mode ``none``, the sub-cohort models
    under masking with sub-cohorts (trust), otherwise the aggregate with ``history`` previous
    global models; ``clients`` / ``cohorts`` demand those and are refused where the mode
    hides them; ``aggregate`` always works."""

    teacher: Literal["auto", "clients", "cohorts", "aggregate"] = "auto"
    history: Annotated[int, Field(ge=0, le=100)] = 2
    distill_steps: Annotated[int, Field(ge=1, le=100_000)] = 50
    distill_lr: Annotated[float, Field(gt=0, le=10)] = 0.05
    #: ``sgd`` (momentum 0.9) moves the aggregate in proportion to the teachers'
    #: disagreement with it; ``adam`` moves every weight by about ``distill_lr`` per step.
    distill_optimizer: Literal["sgd", "adam"] = "sgd"
    temperature: PositiveFloat = 3.0
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 64
    prox: Annotated[float, Field(ge=0, le=1e6)] = 0.01
    moments: RefineMomentsConfig | None = Field(default_factory=RefineMomentsConfig)


class RefineClientInversionConfig(InversionSettingsConfig):
    """``refine.client_inversion``: each client inverts the broadcast global model into
    ``per_class`` samples of every class and trains on its records plus those (labelled by
    their target class)."""

    per_class: Annotated[int, Field(ge=1, le=10_000)] = 2
    steps: Annotated[int, Field(ge=1, le=100_000)] = 100
    feature_stats: Annotated[float, Field(ge=0, le=1e6)] = 0.0


class RefineConfig(StrictModel):
    """``refine``: server-side refinement of each round's aggregate (DESIGN 5)."""

    shared: RefineSharedConfig | None = None
    server_inversion: RefineServerInversionConfig | None = None
    client_inversion: RefineClientInversionConfig | None = None
    #: First round that is refined (the first rounds' models invert poorly).
    start_round: Annotated[int, Field(ge=1, le=100_000)] = 1


# ---------------------------------------------------------------------------- run


class RunConfig(StrictModel):
    name: str = "secfl-run"
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    rounds: Annotated[int, Field(ge=1, le=100_000)] = 20
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    adversary: AdversaryConfig | None = None
    trust: TrustConfig | None = None
    refine: RefineConfig | None = None

    @model_validator(mode="after")
    def _privacy_fits_run(self) -> RunConfig:
        user = self.privacy.user_level
        if user is not None:
            bound = 1.0 / (10.0 * self.data.num_clients)
            if user.delta > bound:
                raise ValueError(
                    f"privacy.user_level.delta={user.delta} is too large for "
                    f"data.num_clients={self.data.num_clients}: allowed (0, 1/(10 n)] = "
                    f"(0, {bound:.3g}]"
                )
            protection = self.aggregation.protection
            if protection == "none" and user.colluding_clients:
                raise ValueError(
                    f"privacy.user_level.colluding_clients={user.colluding_clients} applies to "
                    "distributed noise (protection masking or ckks); with protection 'none' "
                    "the trusted server adds all the noise: allowed 0"
                )
            if protection != "none" and user.colluding_clients >= self.aggregation.min_cohort:
                raise ValueError(
                    f"privacy.user_level.colluding_clients={user.colluding_clients} must be "
                    f"below aggregation.min_cohort={self.aggregation.min_cohort}: a revealed "
                    "sum needs at least one honest noise share"
                )
        return self

    @model_validator(mode="after")
    def _refine_inverts_only_what_is_shown(self) -> RunConfig:
        from secfl.refine.guard import teacher_source

        try:
            teacher_source(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        refine = self.refine
        inversion = None if refine is None else refine.server_inversion
        moments = None if inversion is None else inversion.moments
        if moments is not None and self.privacy.user_level is not None:
            raise ValueError(
                "refine.server_inversion.moments is refused with privacy.user_level: the "
                "activation moments are a release the user-level ledger does not cover; "
                "set refine.server_inversion.moments: null (inversion without feature "
                "statistics) or remove privacy.user_level"
            )
        if (
            moments is not None
            and moments.noise_multiplier == 0
            and self.privacy.sample_level is not None
        ):
            raise ValueError(
                "refine.server_inversion.moments.noise_multiplier=0 releases exact statistics "
                "of the clients' records, which privacy.sample_level cannot account; "
                "allowed: > 0"
            )
        if (
            refine is not None
            and refine.client_inversion is not None
            and self.privacy.sample_level is not None
        ):
            raise ValueError(
                "refine.client_inversion is not available with privacy.sample_level: DP-SGD's "
                "sampling rate and ledger are defined on the client's own records only; "
                "remove one of them"
            )
        if refine is not None and refine.shared is not None and self.data.shared.per_class < 1:
            raise ValueError(
                "refine.shared fine-tunes on the public shared set; it needs "
                "data.shared.per_class >= 1"
            )
        return self

    @model_validator(mode="after")
    def _trust_fits_masking(self) -> RunConfig:
        trust = self.trust
        if trust is None or trust.defense == "none":
            return self
        if self.aggregation.protection == "masking":
            if trust.defense != "vote":
                raise ValueError(
                    f"trust.defense={trust.defense!r} is not available under "
                    "aggregation.protection='masking': the server sees only sub-cohort sums, "
                    "so only the vote over sub-cohorts runs there; allowed: vote, none"
                )
            if self.aggregation.min_cohort < 2:
                raise ValueError(
                    f"aggregation.min_cohort={self.aggregation.min_cohort} with trust under "
                    "masking: a sub-cohort of one client reveals that client's update; "
                    "allowed >= 2"
                )
        return self

    @model_validator(mode="after")
    def _trust_fits_ckks(self) -> RunConfig:
        trust = self.trust
        if trust is None or trust.defense == "none" or self.aggregation.protection != "ckks":
            return self
        if trust.defense != "vote":
            raise ValueError(
                f"trust.defense={trust.defense!r} is not available under "
                "aggregation.protection='ckks': the server sees four flooded scalars per "
                "client, not updates, so only the vote runs there; allowed: vote, none"
            )
        preset = self.aggregation.ckks.preset
        if preset != "trust":
            raise ValueError(
                f"aggregation.ckks.preset={preset!r} cannot compute trust scalars: trust under "
                "ckks needs the evaluation keys of preset 'trust'; allowed: trust"
            )
        return self

    @model_validator(mode="after")
    def _adversary_fits_run(self) -> RunConfig:
        adversary = self.adversary
        if adversary is None:
            return self
        from secfl.attacks.adversary import ADAPTED_MODES, malicious_count

        protection = self.aggregation.protection
        if protection not in ADAPTED_MODES:
            raise ValueError(
                f"adversary is not implemented yet for aggregation.protection={protection!r}; "
                f"allowed: {sorted(ADAPTED_MODES)}"
            )
        malicious_count(self.data.num_clients, fraction=adversary.fraction, count=adversary.count)
        return self

    def with_overrides(self, **dotted: Any) -> RunConfig:
        """A copy with dotted keys replaced (``{"rounds": 3, "data.num_clients": 5}``)."""
        raw = self.to_dict()
        for key, value in dotted.items():
            node = raw
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        return config_from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of this config, identifying a run for ``--resume``.

        ``rounds`` is left out so a run can be extended, except where a noise multiplier is
        calibrated from a target epsilon over ``rounds``: extending such a run would change
        the noise of the rounds still to come, so the fingerprint keeps it.
        """
        raw = self.to_dict()
        privacy = self.privacy
        calibrated = any(
            level is not None and level.target_epsilon is not None
            for level in (privacy.sample_level, privacy.user_level)
        )
        if not calibrated:
            raw.pop("rounds", None)
        # where the audit key lives does not change the experiment (the log binds the key)
        raw.get("security", {}).pop("audit_key", None)
        canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _format_location(loc: tuple[int | str, ...]) -> str:
    # pydantic puts the discriminator tag into the location; users never wrote it.
    parts = [str(p) for p in loc if not (isinstance(p, str) and p in _TAGS)]
    return ".".join(parts) or "<root>"


_TAGS = {"iid", "dirichlet", "shards", "quantity", "fixed", "poisson", "scheduler", "tiers", "pool"}


def _describe(error: Any) -> str:
    where = _format_location(tuple(error["loc"]))
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        return f"unknown key {where!r} (value {value!r}); check the spelling against the docs"
    if kind == "missing":
        return f"missing required key {where!r}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return f"key {where!r}: value {value!r} is not allowed: {message}"


def config_from_dict(raw: Any) -> RunConfig:
    """Validate a parsed YAML mapping; errors name the key, value and allowed range."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a mapping, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError("invalid run config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path) -> RunConfig:
    """Load and validate a run configuration YAML file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(file)!r}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(file)!r} is not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    return config_from_dict(raw)
