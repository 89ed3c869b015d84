"""One validated run configuration, built from the model's preset, the mode and the user's overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atlasfl.errors import AtlasError
from atlasfl.presets import preset_for

METHODS = ("atlas", "atlas_no_laplacian", "fedavg_cluster", "standard_fl", "local_only")
DEFAULT_ETA = 0.1
LAMBDA_GRID = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)

# `--mode quick`: a smoke configuration that exercises every phase in seconds to minutes.
# Fingerprints keep a realistic sample count: clustering needs it (phases/clustering.py) and it is cheap.
QUICK = dict(rounds=2, max_samples=80, fingerprint_samples=64, max_test_samples=64, local_epochs=1)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    seed: int = Field(ge=0)
    method: Literal["atlas", "atlas_no_laplacian", "fedavg_cluster", "standard_fl", "local_only"]
    rounds: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    local_epochs: int = Field(gt=0)
    max_samples: int | None = Field(default=None, gt=0)
    fingerprint_samples: int = Field(gt=0)
    rank_candidates: tuple[int, ...]
    tasks: tuple[str, ...]
    clients_per_task: int = Field(gt=0)
    mode: Literal["quick", "full"] = "full"
    max_test_samples: int | None = Field(default=None, gt=0)
    max_length: int = Field(default=128, gt=8)
    dirichlet_alpha: float | None = Field(default=None, gt=0)
    data_dir: str | None = None
    init: Literal["pretrained", "random"] = "pretrained"
    device: str = "auto"
    lora_alpha: float = Field(default=16.0, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    aggregation: Literal["svd", "fedavg"] | None = None  # None: the method's default
    eta: float = Field(default=DEFAULT_ETA, ge=0, le=1)
    lambda_sweep: bool = False
    lambda_grid: tuple[float, ...] = LAMBDA_GRID
    clusters: Literal["fingerprint", "oracle"] = "fingerprint"
    fingerprint: Literal["representation", "gradient"] = "representation"
    fingerprint_layers: int = Field(default=2, gt=0)
    fingerprint_dim: int = Field(default=64, gt=0)
    devices: tuple[str, ...] | None = None
    engine: Literal["inprocess", "flower"] = "inprocess"
    wire_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    output_dir: str = "results"
    log_dir: str = "logs"
    checkpoint_dir: str = "checkpoints"
    keep_checkpoints: int = Field(default=2, gt=0)

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
        return self

    @property
    def model_label(self) -> str:
        """The model as it appears in file names: an alias, or a local folder's last part."""
        return Path(self.model.rstrip("/")).name if "/" in self.model else self.model

    @property
    def run_name(self) -> str:
        """The seed's name; a non-default eta (without a sweep) is added so runs on an eta grid do not collide."""
        name = f"atlas_{self.model_label}_{self.method}_seed{self.seed}_r{self.rounds}"
        if self.method == "atlas" and not self.lambda_sweep and self.eta != DEFAULT_ETA:
            name += f"_eta{self.eta:g}"
        return name

    @property
    def result_path(self) -> Path:
        return Path(self.output_dir) / f"{self.run_name}.json"

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) / self.run_name

    @property
    def homogeneous_rank(self) -> int:
        """The preset's median rank candidate (lower middle), used where ranks are homogeneous."""
        return self.rank_candidates[(len(self.rank_candidates) - 1) // 2]


def build_config(model: str, seed: int, method: str, **overrides) -> RunConfig:
    """Preset for `model`, then `--mode quick` sizes, then every override that is not None."""
    if method not in METHODS:
        raise AtlasError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    preset = preset_for(model)
    values = dict(
        model=model, seed=seed, method=method, rounds=preset.rounds, batch_size=preset.batch_size, lr=preset.lr,
        local_epochs=preset.local_epochs, max_samples=preset.max_samples,
        fingerprint_samples=preset.fingerprint_samples, rank_candidates=preset.rank_candidates,
        tasks=preset.tasks, clients_per_task=preset.clients_per_task,
    )
    if overrides.get("mode") == "quick":
        values.update(QUICK)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise AtlasError(describe_validation_error(exc)) from exc


def describe_validation_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "config"
    msg = err["msg"].removeprefix("Value error, ")
    return f"invalid {field}: {msg} (got {err.get('input')!r})"
