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

Part = Literal["lora_A", "lora_B", "head"]
PARTS: tuple[Part, ...] = ("lora_A", "lora_B", "head")


def part_of(key: str) -> Part:
    """Which part of a client's state a key of the flat state (`lora::<module>::A|B`, `head::<param>`) is."""
    return "head" if key.startswith("head::") else ("lora_A" if key.endswith("::A") else "lora_B")


def select(state: State, parts: Sequence[Part]) -> State:
    """The tensors of `state` that belong to `parts`, in the state's own order."""
    return {key: value for key, value in state.items() if part_of(key) in parts}


@dataclass(frozen=True)
class Range:
    """One hyperparameter's search range for tuning: [low, high], sampled on a log scale if `log`."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Group:
    """One aggregation group of a round as a method's rule sees it: the members' ids, their training-shard sizes
    (the weights of a mean), their rows of the centred, unit-length fingerprints (the space of the Laplacian
    graph), the run config and the round's step size."""

    clients: list[int]
    sizes: list[int]
    fingerprints: np.ndarray
    cfg: Any
    eta: float


class Method:
    """The defaults are plain FedAvg of every trained part inside each discovered cluster at the preset's median
    rank; a method overrides what differs."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what the method does (help text, docs)
    heterogeneous_ranks: ClassVar[bool] = False  # per-device, per-module ranks; else the preset's median everywhere
    default_aggregation: ClassVar[str] = "fedavg"  # the `--aggregation` it uses unless told otherwise
    uses_fingerprints: ClassVar[bool] = True  # phase 1's upload serves it (clusters or ranks), so it is traffic
    personalises: ClassVar[bool] = False  # a personal step instead of a mean: its step size is recorded per round
    trains: ClassVar[tuple[Part, ...]] = PARTS  # what the client's optimizer updates
    uploads: ClassVar[tuple[Part, ...]] = PARTS  # what a sharing client sends after training
    downloads: ClassVar[tuple[Part, ...]] = PARTS  # what the server's rule sends back (the rest stays the client's)
    shares_alone: ClassVar[bool] = False  # a group of one still uploads and is aggregated (a model kept on the server)
    settings: ClassVar[dict[str, tuple[Any, Any]]] = {}  # name -> (type, settings.setting(...)): its own flags
    search_space: ClassVar[dict[str, Range]] = {"lr": Range(1e-5, 1e-2, log=True)}

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
    def name_suffix(cls, cfg) -> str:
        """What the result's file name adds to `atlas_<model>_<method>_seed<s>_r<rounds>` for this config, so two
        variants of the method in one grid never share (and skip) one file."""
        return ""

    @classmethod
    def variant(cls, config: dict) -> str | None:
        """The report's label of this config's variant (a result's `config` block), or None for the method itself."""
        return None

    # ---- the client ------------------------------------------------------------------------
    def extra_loss(self) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor] | None:
        """An extra term of the client's training loss, as f(trained parameters, their values at the start of the
        round), added to each batch's cross-entropy; None: cross-entropy alone."""
        return None

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
        """Each member's new state from the group's uploads: the shard-weighted mean (`phases.aggregation`)."""
        from atlasfl.phases.aggregation import aggregate_states

        return aggregate_states(states, group.sizes, alpha=group.cfg.lora_alpha,
                                mode=group.cfg.aggregation or self.default_aggregation)

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

    def chose(self, choices: dict[int, int]) -> None:
        """Which candidate of `offers` each client adopted."""

    def round_clusters(self, clients: list[int]) -> tuple[list[int], dict] | None:
        """The clusters of `clients` at the end of a round (a label per client, in their order) and what the rule
        saw; None for a method whose clusters are phase 1's."""
        return None

    def clustering_state(self) -> tuple[dict, State]:
        """The method's own server state for a checkpoint: a JSON part and tensors (nothing here)."""
        return {}, {}

    def restore_clustering(self, saved: dict, tensors: State) -> None:
        """Take up what `clustering_state` returned (a resumed run continues as the uninterrupted one)."""
