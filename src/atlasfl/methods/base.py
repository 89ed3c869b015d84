"""What a federated method is to the driver: a small object that says what each client trains, what travels
each way, an optional extra term of the client's loss, how the server groups clients and turns a group's
uploads into each member's new state, whether it runs a grid of step sizes, its own settings and its search
space. `federation.driver` asks; it never tests a method's name.

Method modules import no torch at module level (the CLI builds its help from their settings without torch):
the math they call lives in `phases/` and is imported where it runs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    import numpy as np
    import torch

    State = dict[str, torch.Tensor]

Part = Literal["lora_A", "lora_B", "head", "residual", "personal"]
PARTS: tuple[Part, ...] = ("lora_A", "lora_B", "head")  # what a method may train and send
RESIDUAL: Part = "residual"  # a frozen dense residual per module (`Method.keeps_residual`): never trained nor sent


def part_of(key: str) -> Part:
    """Which part of a client's state a key of the flat state (`lora::<module>::A|B|R`, `head::<param>`, or a
    personal copy's `personal::<key>`, `models.personal`) is; "residual" and "personal" never travel."""
    if key.startswith("personal::"):
        return "personal"
    if key.startswith("head::"):
        return "head"
    return {"A": "lora_A", "R": RESIDUAL}.get(key.rpartition("::")[2], "lora_B")


def select(state: State, parts: Sequence[Part]) -> State:
    """The tensors of `state` that belong to `parts`, in the state's own order."""
    return {key: value for key, value in state.items() if part_of(key) in parts}


@dataclass(frozen=True)
class Range:
    """One setting's search range for tuning (`atlasfl.tuning`): [low, high], on a log scale if `log`; an integer
    setting draws integers. `why`: where the range comes from (docs/tuning.md lists them)."""

    low: float
    high: float
    log: bool = False
    why: str = ""

    def __post_init__(self):
        if not self.low < self.high:
            raise ValueError(f"a search range needs low < high, got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale search range needs low > 0, got {self.low}")


@dataclass(frozen=True)
class Group:
    """One aggregation group of a round as a method's rule sees it: the members' ids, their training-shard sizes
    (the weights of a mean), their rows of the centred, unit-length fingerprints (the space of the Laplacian
    graph), the run config, the round's step size, and the server optimiser's step on each tensor of the group's
    aggregate (`phases.aggregation.Step`; None: the aggregate as it is), which a rule with a group average applies
    before it shares the average out."""

    clients: list[int]
    sizes: list[int]
    fingerprints: np.ndarray
    cfg: Any
    eta: float
    step: Callable[[str, torch.Tensor], torch.Tensor] | None = None


class Method:
    """The defaults are plain FedAvg of every trained part inside each discovered cluster at the preset's median
    rank; a method overrides what differs."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what the method does (help text, docs)
    heterogeneous_ranks: ClassVar[bool] = False  # per-device, per-module ranks; else the preset's median everywhere
    default_aggregation: ClassVar[str] = "fedavg"  # the `--aggregation` it uses unless told otherwise
    uses_fingerprints: ClassVar[bool] = True  # phase 1's upload serves it (clusters or ranks), so it is traffic
    personalises: ClassVar[bool] = False  # a personal step instead of a mean: its step size is recorded per round
    group_average: ClassVar[bool] = True  # its rule shares a group's average out, so a server optimiser can step it
    keeps_personal: ClassVar[bool] = False  # each client also trains a personal copy (`models.personal`), evaluated
    trains: ClassVar[tuple[Part, ...]] = PARTS  # what the client's optimizer updates
    uploads: ClassVar[tuple[Part, ...]] = PARTS  # what a sharing client sends after training
    downloads: ClassVar[tuple[Part, ...]] = PARTS  # what the server's rule sends back (the rest stays the client's)
    keeps_residual: ClassVar[bool] = False  # each client adds a frozen dense residual per module to the base weights
    shares_alone: ClassVar[bool] = False  # a group of one still uploads and is aggregated (a model kept on the server)
    # What a member of a sharing group gets for the aggregates it missed while it took no part (client sampling,
    # dropouts, stragglers: `Server.aggregate`), before it next trains or is tested: "latest", the group's latest
    # model at its own shapes (FedAvg's server sends its current model to every round's cohort); "each", every
    # download it missed, adopted in order (a rule whose downloads add up, flora's merges); "none", nothing (a
    # personal rule: the client keeps its own state).
    catch_up: ClassVar[Literal["latest", "each", "none"]] = "latest"
    settings: ClassVar[dict[str, tuple[Any, Any]]] = {}  # name -> (type, settings.setting(...)): its own flags
    search_space: ClassVar[dict[str, Range]] = {  # setting -> its tuning range (every method tunes these)
        "lr": Range(1e-5, 1e-2, log=True, why="AdamW on LoRA adapters: the presets use 1e-4 to 1e-3; a decade "
                                              "either side reaches a rate too small to move and one that diverges"),
        "local_epochs": Range(1, 3, why="more local work per round against client drift; 3 already triples a "
                                        "trial's training cost"),
    }

    def __init__(self, cfg):
        self.cfg = cfg

    # ---- the run ---------------------------------------------------------------------------
    def etas(self) -> tuple[float, ...]:
        """The step sizes the run trains one federation each for (one unless the method sweeps a grid)."""
        return (self.cfg.eta,)

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ValueError for settings this method cannot honour (a RunConfig validator calls it)."""

    @classmethod
    def dp_refusal(cls, cfg) -> str | None:
        """Why client-level DP (`--dp-clip`, docs/privacy.md) cannot cover this method's releases, or None where it
        can: the server must form a uniform mean of the clipped updates, which a Gaussian of std z·C/m makes
        private. Here: refused without a group average, and under 'svd' (the mean of ΔW = B@A, whose change when
        one client joins is not bounded by clipping the uploaded factors)."""
        if not cls.group_average:
            return "forms no group average for the server to noise"
        if (cfg.aggregation or cls.default_aggregation) == "svd":
            return ("averages ΔW = B@A and refactors it; clipping the uploaded factors does not bound one client's "
                    "effect on that mean; use --aggregation fedavg")
        return None

    @classmethod
    def name_suffix(cls, cfg) -> str:
        """What the result's file name adds to `atlas_<model>_<method>_seed<s>_r<rounds>` for this config, so two
        variants of the method in one grid never share (and skip) one file."""
        return ""

    @classmethod
    def variant(cls, config: dict) -> str | None:
        """The report's label of this config's variant (a result's `config` block), or None for the method itself."""
        return None

    @classmethod
    def clusters_from(cls, config: dict) -> str | None:
        """Where the groups a run of this config (a result's `config` block) shares in come from: "phase 1" (the
        fingerprints' clusters), "training" (a rule that finds them from the updates: `round_clusters`), or None
        where no clusters are used (the report's discovery table)."""
        return "phase 1"

    # ---- the client ------------------------------------------------------------------------
    def local_phases(self) -> tuple[tuple[tuple[Part, ...], int], ...]:
        """A round's local training as (parts trained, epochs) phases, run one after the other over consecutive
        epochs of the client's batches, each with what is not in its parts frozen: here one phase of `trains`
        for `--local-epochs`."""
        return ((self.trains, self.cfg.local_epochs),)

    def personal_loss(self) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor] | None:
        """With `keeps_personal`: the extra term of the personal copy's loss, as f(its trained parameters, the shared
        state's values of them at the start of the round); None: cross-entropy alone."""
        return None

    def extra_loss(self) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor] | None:
        """An extra term of the client's training loss, as f(trained parameters, their values at the start of the
        round), added to each batch's cross-entropy; None: cross-entropy alone."""
        return None

    def receive(self, received: State, residual: State, *, ranks: dict[str, int], cid: int, round_idx: int
                ) -> State:
        """What client `cid` (at `ranks`, holding `residual`) sets in its state after round `round_idx`'s download
        `received`: here the parts received, as they came. Engines and the Flower server's copy call it alike, so
        it must be a pure function of its arguments."""
        return received

    # ---- the server ------------------------------------------------------------------------
    def groups(self, clients: list[int], clusters: list[int]) -> list[list[int]]:
        """Client ids aggregated together: here, the members of each discovered cluster (`clusters[cid]`)."""
        by_cluster: dict[int, list[int]] = {}
        for cid in clients:
            by_cluster.setdefault(clusters[cid], []).append(cid)
        return list(by_cluster.values())

    def shares(self, eta: float) -> bool:
        """Whether anything changes hands in a round at step size `eta` (a client that shares nothing uploads
        nothing and keeps its own state untouched)."""
        return True

    def aggregate(self, states: list[State], group: Group) -> list[State]:
        """Each member's new state from the group's uploads: the shard-weighted mean (`phases.aggregation`), or
        the `--robust-aggregation` rule over equal-shape uploads."""
        from atlasfl.phases.aggregation import aggregate_states, mean_of_parts, robust_rule

        combine = robust_rule(group.cfg.robust_aggregation, group.cfg.trim_fraction)
        if combine is not None:
            return mean_of_parts(states, group.sizes, group.step, combine)
        return aggregate_states(states, group.sizes, alpha=group.cfg.lora_alpha,
                                mode=group.cfg.aggregation or self.default_aggregation, step=group.step)

    # ---- clusters the method finds during training (ifca, cfl) --------------------------------------
    def regroup(self, round_idx: int, clients: list[int], uploads: dict[int, State], starts: dict[int, State]
                ) -> None:
        """After a round's aggregation: update the method's own clusters of `clients` (what `groups` returns from
        the next round on) from the replying clients' uploads and the states they started the round from (none
        before round 1: a Flower server never holds the initial states). Here: the clusters never change."""

    def offers(self, labels: dict[int, int]) -> dict[int, list[State]] | None:
        """After a round's aggregation: the candidate states offered to each client (id -> its head's label count);
        the client scores each on its training data and adopts the lowest loss (`phases.ifca.lowest`). None: none."""
        return None

    def chose(self, choices: dict[int, int], round_idx: int = 0) -> None:
        """Which candidate of `offers` each client adopted in round `round_idx`."""

    def behind(self, clients: set[int], last_offer: int) -> set[int]:
        """Those of `clients` that did not adopt the offer of round `last_offer` (`offers`), and so hold an older
        model than the server offers now: they are offered again before they train or are tested (`catch_up`'s
        counterpart for a method that offers rather than delivers). Here: none."""
        return set()

    def round_clusters(self, clients: list[int]) -> tuple[list[int], dict] | None:
        """The clusters of `clients` at the end of a round (a label per client, in their order) and what the rule
        saw; None for a method whose clusters are phase 1's."""
        return None

    def clustering_state(self) -> tuple[dict, State]:
        """The method's own server state for a checkpoint: a JSON part and tensors (nothing here)."""
        return {}, {}

    def restore_clustering(self, saved: dict, tensors: State) -> None:
        """Take up what `clustering_state` returned (a resumed run continues as the uninterrupted one)."""
