"""One validated run configuration, built from the model's preset, the mode and the user's overrides."""
from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, create_model, field_validator, model_validator

from atlasfl.errors import AtlasError
from atlasfl.methods import METHODS as METHOD_CLASSES
from atlasfl.methods import method_settings, second_look_applies
from atlasfl.phases import AGGREGATIONS, SERVER_OPTIMIZERS
from atlasfl.presets import preset_for
from atlasfl.settings import setting

METHODS = tuple(METHOD_CLASSES)  # baselines first, atlas last (docs/design.md §2)
FROM_PRESET = "model preset"

# `--mode quick`: a smoke configuration that exercises every phase in seconds to minutes.
# Fingerprints keep a realistic sample count: clustering needs it (phases/clustering.py) and it is cheap.
QUICK = dict(rounds=2, max_samples=80, fingerprint_samples=64, max_test_samples=64, local_epochs=1)


class GeneralSettings(BaseModel):
    """The settings every run has; `RunConfig` adds each method's own (`methods.Method.settings`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = setting("distilbert | gpt2 | gpt2-xl | qwen2.5 | minilm | tiny-* | Hugging Face id | folder")
    seed: int = setting("Random seed (non-negative integer).", ge=0)
    method: Literal[METHODS] = setting("The federated method.")
    rounds: int = setting("Federated rounds.", preset=True, gt=0)
    batch_size: int = setting("Training batch size.", preset=True, gt=0)
    lr: float = setting("Learning rate (AdamW).", preset=True, gt=0)
    local_epochs: int = setting("Local epochs per round.", preset=True, gt=0)
    eval_every: int = setting(
        "Test every K rounds, and always in the first and the last round; a round between carries each client's "
        "last test metrics, labelled (`metrics_from_round`). Local validation still runs every round a tuner "
        "prunes on. Final scores and states are those of K = 1 (docs/design.md §1.2).", 1, gt=0)
    max_samples: int | None = setting(
        "Max training examples per client (--val-fraction of them: local validation).", preset=True, gt=0)
    val_fraction: float = setting(
        "Share of each client's examples held out as its local validation, the only data a choice (eta) is "
        "made on; at least 1 example.", 0.1, gt=0, lt=1)
    fingerprint_samples: int = setting(
        "Examples per client for the gradient pass of phase 1 (gradient fingerprint, layer importances).",
        preset=True, gt=0)
    representation_samples: int = setting(
        "Examples per client for the representation fingerprint (forward passes only).", 512, gt=0)
    rank_candidates: tuple[int, ...] = setting("LoRA ranks the allocation may choose from.", preset=True)
    tasks: tuple[str, ...] = setting("Tasks or task sets (glue, offline, generated).", preset=True, min_length=1)
    clients_per_task: int = setting("Clients per task.", preset=True, gt=0)
    mode: Literal["quick", "full"] = setting("quick: smoke sizes (2 rounds, 80 examples per client).", "full")
    max_test_samples: int | None = setting("Cut each task's test set (default: all of it).", None, gt=0)
    max_length: int = setting("Max tokens per example.", 128, gt=8)
    group_by_length: bool = setting(
        "Training batches of similar lengths (seeded: shuffle, sort within groups of 50 batches, shuffle the "
        "batches), so less padding is computed: faster training, scores within seed noise (measured: "
        "docs/performance.md). --no-group-by-length: batches in plain shuffled order.", True)
    client_batching: bool = setting(
        "Train all clients of a round together through the one frozen base, each row through its own client's "
        "adapter and head (in-process engine; Flower trains one client per message). Same results as one client "
        "after another up to float rounding, except dropout masks.", False)
    client_batch_rows: int | None = setting(
        "--client-batching: at most this many rows per forward pass, to cap memory (default: every client's "
        "batch of a step in one pass).", None, gt=0)
    dirichlet_alpha: float | None = setting("Dirichlet label skew within a task (default: IID shards).", None, gt=0)
    labels_per_client: int | None = setting(
        "Pathological label skew: each client holds exactly N of its task's labels, dealt out in turn from a seeded "
        "permutation of them (docs/design.md §1.3; default: every label).", None, gt=0)
    quantity_skew: float | None = setting(
        "Quantity skew: shard sizes by a power law of rank, the k-th largest in proportion to k**-A (seeded order, "
        "at least 2 examples each; with --max-samples the largest holds that many; default: equal shards).",
        None, gt=0)
    data_dir: str | None = setting("Local GLUE folder: DIR/<task>/train.* and validation.*", None, min_length=1)
    init: Literal["pretrained", "random"] = setting(
        "random: full-size random weights (speed and memory benchmarks).", "pretrained")
    device: str = setting("auto | cpu | cuda | cuda:N.", "auto")
    lora_alpha: float = setting("LoRA alpha (the scaling is alpha / rank).", 16.0, gt=0)
    lora_dropout: float = setting("LoRA dropout.", 0.05, ge=0, lt=1)
    aggregation: Literal[AGGREGATIONS] | None = setting(
        "Aggregation of rank-heterogeneous adapters (default: the method's).", None)
    server_optimizer: Literal[SERVER_OPTIMIZERS] = setting(
        "Server optimiser on each group's average (Reddi et al. 2021; docs/methods.md#server-optimisers): sgd "
        "(at --server-lr 1: the average itself), avgm (FedAvgM), adam, yogi.", "sgd")
    server_lr: float | None = setting(
        "Server learning rate (default: sgd 1, avgm 0.1, adam 0.1, yogi 0.01).", None, gt=0)
    server_momentum: float = setting("avgm: server momentum.", 0.9, gt=0, lt=1)
    server_beta1: float = setting("adam, yogi: first-moment decay beta1.", 0.9, ge=0, lt=1)
    server_beta2: float = setting("adam, yogi: second-moment decay beta2.", 0.99, ge=0, lt=1)
    server_tau: float = setting("adam, yogi: adaptivity tau (added to the root of the second moment).", 1e-3, gt=0)
    clusters: Literal["fingerprint", "oracle"] = setting(
        "fingerprint: discovered clusters; oracle: the true task grouping.", "fingerprint")
    second_look: Literal["auto", "on", "off"] = setting(
        "After round 1, test phase 1's clusters against the cosines of the clients' round-1 adapter updates and "
        "split or merge them where the updates disagree beyond their noise, from round 2 on (docs/clustering.md"
        "#the-second-look); round 1 then asks every client for its upload. auto: when phase 1 is ambiguous. For "
        "methods that share in phase 1's clusters (atlas, atlas_no_laplacian, fedavg_cluster, --sharing cluster).",
        "auto")
    fingerprint: Literal["representation", "gradient"] = setting("Which fingerprint clusters the clients.",
                                                                 "representation")
    fingerprint_layers: int = setting("Last blocks whose gradient forms the gradient fingerprint.", 2, gt=0)
    fingerprint_dim: int = setting("Numbers per fingerprint after the count sketch.", 64, gt=0)
    devices: tuple[str, ...] | None = setting(
        "Device profiles to draw from (cpu_2gb tablet_4gb laptop_8gb gpu_16gb; default: all).", None, min_length=1)
    engine: Literal["inprocess", "flower"] = setting(
        "inprocess, or flower (the Flower app on Flower's Simulation Runtime).", "inprocess")
    wire_dtype: Literal["float32", "float16", "bfloat16"] = setting("dtype of the tensors sent each round.",
                                                                    "float32")
    min_replies_per_group: int = setting(
        "Fewest replying clients an aggregation group may have in a round; below it the run stops with "
        "its last checkpoint kept (--resume continues it). A missing client keeps its last state.", 1, gt=0)
    clients_per_round: int | None = setting(
        "Clients sampled per round, uniformly and seeded by the run seed and round (docs/scale.md); the others "
        "neither train nor send and keep their state. Default: every client, every round.", None, gt=0)
    over_select: float | None = setting(
        "Sample ceil(m x (1 + f)) clients per round and keep the first m to finish on the simulated clock "
        "(needs --clients-per-round). Default: no extra clients.", None, gt=0)
    round_deadline: float | None = setting(
        "Simulated seconds a round waits (docs/scale.md): a sampled client whose simulated time from its device "
        "profile is longer is a straggler and its work is discarded. Default: no deadline.", None, gt=0)
    dropout_rate: float | None = setting(
        "Probability that a sampled client drops out of a round (seeded); it keeps its state. Default: none do.",
        None, gt=0, lt=1)
    dp_clip: float | None = setting(
        "Client-level DP (docs/privacy.md): clip each client's update (the change of its upload over the round, all "
        "tensors together) to this L2 norm; group means become uniform. Default: no DP.", None, gt=0)
    dp_noise: float = setting(
        "--dp-clip: Gaussian noise multiplier z (central: N(0, (zC/m)^2) on a group's mean of m; local: "
        "N(0, (zC)^2) on each client's clipped update). 0: clipping only, epsilon = inf.", 1.0, ge=0)
    dp_mode: Literal["central", "local"] = setting(
        "--dp-clip: central (the server noises each group's mean) or local (each client noises its own update).",
        "central")
    dp_delta: float = setting("--dp-clip: the delta at which epsilon is reported.", 1e-5, gt=0, lt=1)
    dp_target_quantile: float | None = setting(
        "--dp-clip: adapt each group's clip, from C, toward this quantile of its members' update norms (Andrew et al. "
        "2021; central mode; docs/privacy.md). Default: the clip stays C.", None, gt=0, lt=1)
    dp_clip_lr: float = setting(
        "--dp-target-quantile: the clip's geometric step eta_C: C <- C·exp(-eta_C·(noised unclipped fraction - "
        "quantile)).", 0.2, gt=0)
    dp_count_noise: float | None = setting(
        "--dp-target-quantile: std sigma_b of the noise on a group's count of unclipped updates; it must exceed "
        "z/2. Default: max(m/20, sqrt(10)·z/2) for a group of m (the paper's m/20, raised so the count spends at "
        "most a tenth of the budget).", None, gt=0)
    dp_epsilon_budget: float | None = setting(
        "--dp-clip: stop cleanly (a result is written, marked so) before a round that would spend more epsilon.",
        None, gt=0)
    reply_norm_bound: float | None = setting(
        "Reject a client's reply whose norm exceeds this many times its group's median reply norm, as a missing "
        "client (docs/security.md); 0: no norm check (keys, shapes, dtype and finite values are always "
        "checked).", 100.0, ge=0)
    robust_aggregation: Literal["median", "trimmed_mean"] | None = setting(
        "Aggregate each group's replies coordinate-wise by their median or trimmed mean (unweighted, as Flower's "
        "FedMedian and FedTrimmedAvg) instead of the shard-weighted mean: methods whose group shares equal-shape "
        "factors (docs/security.md).", None)
    trim_fraction: float = setting(
        "--robust-aggregation trimmed_mean: the fraction of a group's replies cut off each end at every "
        "coordinate (Flower's beta).", 0.2, ge=0, lt=0.5)
    output_dir: str = setting("Folder for result JSONs.", "results")
    log_dir: str = setting("Folder for run logs.", "logs")
    checkpoint_dir: str = setting("Folder for per-round checkpoints.", "checkpoints")
    keep_checkpoints: int = setting("Checkpoints kept per run (the newest).", 2, gt=0)
    save_adapters: str | None = setting(
        "Write each client's final adapter (PEFT format) and head to DIR/<run name>/c<k>/.", None, min_length=1)
    tensorboard: str | None = setting(
        "Write live TensorBoard curves (per round, client and task) to DIR/<run name>/.", None, min_length=1)
    tune: int | None = setting(
        "Tune first: an Optuna study of N trials (docs/tuning.md) on --tune-seed's clients' local validation, then "
        "the run with the best settings; settings set to other than their default are kept.", None, gt=0)
    tune_seed: int | None = setting(
        "--tune: the seed whose clients the trials use (default: the run's own; a sweep's default: 7).", None, ge=0)

    @field_validator("rank_candidates")
    @classmethod
    def _ranks_positive(cls, v):
        if not v or any(r <= 0 for r in v):
            raise ValueError("rank candidates must be positive integers")
        return tuple(sorted(set(v)))

    @field_validator("devices")
    @classmethod
    def _known_devices(cls, v):
        from atlasfl.phases.devices import check_profiles

        if v is not None:
            try:
                check_profiles(v)
            except AtlasError as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ValueError(f"--data-dir {self.data_dir} is not a folder")
        METHOD_CLASSES[self.method].check(self)
        if self.second_look == "on":
            if not second_look_applies(self):
                raise ValueError(f"--second-look on regroups phase 1's discovered clusters by the clients' B updates; "
                                 f"{self.method} (with --clusters {self.clusters}) shares in no such clusters or "
                                 "sends no B: drop it, or use --second-look auto")
        self._check_server_optimizer()
        self._check_skew()
        self._check_privacy()
        self._check_robust_aggregation()
        if self.eta_selection == "per_client" and not self.lambda_sweep:
            raise ValueError("--eta-selection per_client chooses among the etas of a sweep; add --lambda-sweep")
        if self.client_batching and self.engine == "flower":
            raise ValueError("the Flower engine trains one client per message; --client-batching needs "
                             "--engine inprocess")
        if self.over_select is not None and self.clients_per_round is None:
            raise ValueError("--over-select samples extra clients on top of --clients-per-round; set it too")
        if self.clients_per_round is not None:
            from atlasfl.data.tasks import expand_tasks

            population = len(expand_tasks(self.tasks)) * self.clients_per_task
            if self.clients_per_round > population:
                raise ValueError(f"--clients-per-round {self.clients_per_round} exceeds the run's {population} "
                                 "clients; lower it, or drop it to train every client")
        if self.tune is not None and self.engine == "flower":
            raise ValueError("--tune runs its trials in-process; tune with --engine inprocess, then run the Flower "
                             "engine with the study's best settings (--config best.toml)")
        if self.save_adapters is not None and self.engine == "flower":
            raise ValueError("the Flower engine's adapters live on its SuperNodes; --save-adapters needs "
                             "--engine inprocess")
        return self

    def _check_skew(self):
        """Dirichlet shares set both the label mix and the shard sizes, so neither other skew composes with them;
        a client cannot hold more labels than its task has."""
        from atlasfl.data.tasks import TASKS, expand_tasks

        if self.dirichlet_alpha is not None and self.labels_per_client is not None:
            raise ValueError("--labels-per-client and --dirichlet-alpha are two label skews; set one of them")
        if self.dirichlet_alpha is not None and self.quantity_skew is not None:
            raise ValueError("--dirichlet-alpha already draws unequal shard sizes; drop --quantity-skew or "
                             "--dirichlet-alpha")
        if self.labels_per_client is not None:
            task = min(expand_tasks(self.tasks), key=lambda t: len(TASKS[t].labels))
            if self.labels_per_client > len(TASKS[task].labels):
                raise ValueError(f"--labels-per-client {self.labels_per_client} exceeds the {len(TASKS[task].labels)} "
                                 f"labels of task {task}; lower it to at most {len(TASKS[task].labels)}")
    def _check_privacy(self):
        """DP's settings mean something only with --dp-clip, and only for a method whose releases it covers."""
        fields = type(self).model_fields
        if self.dp_clip is None:
            given = [n for n in ("dp_noise", "dp_mode", "dp_delta", "dp_epsilon_budget", "dp_target_quantile",
                                 "dp_clip_lr", "dp_count_noise") if getattr(self, n) != fields[n].default]
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} needs --dp-clip C (the clipping norm)")
            return
        if self.dp_target_quantile is None:
            given = [n for n in ("dp_clip_lr", "dp_count_noise") if getattr(self, n) != fields[n].default]
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} needs --dp-target-quantile (adaptive clipping)")
        else:
            if self.dp_mode == "local":
                raise ValueError("--dp-target-quantile needs --dp-mode central: the server noises the count of "
                                 "unclipped updates that moves the clip")
            if math.isinf(self.dp_clip):
                raise ValueError("--dp-target-quantile needs a finite --dp-clip to start from")
            if self.dp_count_noise is not None and self.dp_noise > 0 and 2 * self.dp_count_noise <= self.dp_noise:
                raise ValueError(f"--dp-count-noise {self.dp_count_noise:g} leaves no privacy budget for the update at "
                                 f"--dp-noise {self.dp_noise:g}: it must exceed z/2 = {self.dp_noise / 2:g}")
        why = METHOD_CLASSES[self.method].dp_refusal(self)
        if why is not None:
            raise ValueError(f"--dp-clip: {self.method} {why}; client-level DP covers methods whose server forms "
                             "a uniform mean (docs/privacy.md)")
    def _check_robust_aggregation(self):
        """A coordinate-wise rule needs every member's factors at one shape, combined as they are."""
        if self.robust_aggregation is None:
            return
        if METHOD_CLASSES[self.method].heterogeneous_ranks:
            why = "its clients' ranks differ, so their factors share no coordinates"
        elif self.aggregation == "svd":
            why = "--aggregation svd refactors the mean ΔW, which a coordinate-wise rule does not form"
        else:
            return
        raise ValueError(f"{self.method} cannot take --robust-aggregation {self.robust_aggregation}: {why}; drop it, "
                         "or use a method at one rank (standard_fl, fedavg_cluster, fedprox, ffa_lora, fedsa_lora)")

    def _check_server_optimizer(self):
        """A server optimiser needs a group average to step, and its constants only mean something to it."""
        opt, fields = self.server_optimizer, type(self).model_fields
        stepping = opt != "sgd" or self.server_lr not in (None, 1.0)
        if stepping and not METHOD_CLASSES[self.method].group_average:
            raise ValueError(f"{self.method} forms no group average for a server optimiser to step; drop "
                             "--server-optimizer/--server-lr, or use a method that averages")
        users = {"server_momentum": ("avgm",), "server_beta1": ("adam", "yogi"), "server_beta2": ("adam", "yogi"),
                 "server_tau": ("adam", "yogi")}
        for name, optimizers in users.items():
            if opt not in optimizers and getattr(self, name) != fields[name].default:
                raise ValueError(f"--{name.replace('_', '-')} applies to --server-optimizer {' or '.join(optimizers)}"
                                 f", not {opt}; drop it or change the optimiser")

    @property
    def model_label(self) -> str:
        """The model as it appears in file names: an alias, or a local folder's last part."""
        return Path(self.model.rstrip("/")).name if "/" in self.model else self.model

    @property
    def run_name(self) -> str:
        """The seed's name, with what the method adds for a variant (`Method.name_suffix`: e.g. atlas's eta or
        sweep), so variants in one grid never share (and skip) one result file."""
        server = server_optimizer_label(self.model_dump())
        return (f"atlas_{self.model_label}_{self.method}_seed{self.seed}_r{self.rounds}"
                + METHOD_CLASSES[self.method].name_suffix(self) + (f"_{server}" if server else "")
                + (f"_tune{self.tune}" if self.tune else "") + self._scale_suffix()
                + (f"_{dp}" if (dp := dp_label(self.model_dump())) else ""))

    def _scale_suffix(self) -> str:
        """What sampling and the simulated clock add to the run name (nothing for the default federation)."""
        parts = [(self.clients_per_round, "m"), (self.over_select, "os"), (self.round_deadline, "dl"),
                 (self.dropout_rate, "do")]
        return "".join(f"_{tag}{value:g}" for value, tag in parts if value is not None)

    @property
    def result_path(self) -> Path:
        return Path(self.output_dir) / f"{self.run_name}.json"

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) / self.run_name

    @property
    def eval_batch_size(self) -> int:
        """Evaluation keeps no activations for a backward pass, so it affords twice the training batch."""
        return self.batch_size * 2

    @property
    def homogeneous_rank(self) -> int:
        """The preset's median rank candidate (lower middle), used where ranks are homogeneous."""
        return self.rank_candidates[(len(self.rank_candidates) - 1) // 2]


RunConfig = create_model(
    "RunConfig", __base__=GeneralSettings, __module__=__name__, __doc__=(
        "Every setting of one run: the general ones and every method's own. Each field is one flag of `atlas run`/"
        "`atlas sweep` and one key of the Flower app's run config, with the field's description as its help."),
    **method_settings())

POSITIONAL = ("model", "seed", "method")
SERVER_CONSTANTS = {"server_lr": "lr", "server_momentum": "mu", "server_beta1": "b1", "server_beta2": "b2",
                    "server_tau": "tau"}


def server_optimizer_label(config: dict) -> str | None:
    """What a server optimiser adds to a run's file name and report label (`adam`, `avgm_lr0.5`), from a run's
    config block; None where the server takes the average as it is (results before server optimisers too)."""
    name = config.get("server_optimizer", "sgd")
    changed = [f"{short}{config[key]:g}" for key, short in SERVER_CONSTANTS.items()
               if config.get(key, RunConfig.model_fields[key].default) != RunConfig.model_fields[key].default]
    if name == "sgd" and config.get("server_lr") in (None, 1.0):
        return None
    return "_".join([name, *changed])


def dp_label(config: dict) -> str | None:
    """What --dp-clip adds to a run's file name and report label (`dpcC0.5z1`, `q0.5` with adaptive clipping, `_eps8`
    with a budget), from a run's config block; None without DP (results before it too)."""
    if config.get("dp_clip") is None:
        return None
    adaptive = "" if config.get("dp_target_quantile") is None else f"q{config['dp_target_quantile']:g}"
    budget = "" if config.get("dp_epsilon_budget") is None else f"_eps{config['dp_epsilon_budget']:g}"
    return f"dp{config['dp_mode'][0]}C{config['dp_clip']:g}z{config['dp_noise']:g}{adaptive}{budget}"


class _Null:
    """An override that sets a setting to None (an override of None means "not given")."""

    def __repr__(self):
        return "NULL"


NULL = _Null()


def overridable_settings() -> dict:
    """The fields a user sets by flag or run-config key: all but the positional model, seed and method."""
    return {name: f for name, f in RunConfig.model_fields.items() if name not in POSITIONAL}


def setting_type(name: str):
    """The field's type without its `| None`: int, float, str, bool, a Literal or a tuple."""
    annotation = RunConfig.model_fields[name].annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def from_preset(name: str) -> bool:
    return bool((RunConfig.model_fields[name].json_schema_extra or {}).get("preset"))


def build_config(model: str, seed: int, method: str, **overrides) -> RunConfig:
    """Preset for `model`, then `--mode quick` sizes, then every override that is not None (NULL: set to None,
    as a config file's "none" does)."""
    if method not in METHODS:
        raise AtlasError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    preset = preset_for(model)
    values = dict(model=model, seed=seed, method=method,
                  **{name: getattr(preset, name) for name in RunConfig.model_fields if from_preset(name)})
    if overrides.get("mode") == "quick":
        values.update(QUICK)
    values.update({k: None if v is NULL else v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise AtlasError(describe_validation_error(exc)) from exc


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the setting, the problem and the value; a rule across settings names no single value."""
    err = exc.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:
        return f"invalid settings: {msg}"
    return f"invalid --{str(err['loc'][0]).replace('_', '-')}: {msg} (got {err.get('input')!r})"
