"""What an engine is to the driver (`federation.driver`): a `Transport` that moves work to the clients and their
results back, and the records it answers with: the `Roster` of the clients, a round's `Trained` and `Evaluated`
replies, with the clients that failed."""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from atlasfl.data.batching import Tally
from atlasfl.data.tasks import TaskData
from atlasfl.federation.server import ClientInfo, Plan
from atlasfl.phases.devices import ModelFacts


@dataclass
class Roster:
    """What the server side knows of the clients and the model: each client's shard (`client_id`, `task`, sized
    `train` and `val`), the tasks (labels, metric), each client's reference scores
    (`records.client_references`), the adapted modules, their shapes and the model's facts, and each client's
    tokens in one epoch of its training set (the simulated clock's work, `federation.cohort`)."""

    shards: list
    tasks: dict[str, TaskData]
    references: dict[int, dict]
    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    facts: ModelFacts
    train_tokens: dict[int, int]

    def clients(self) -> list[ClientInfo]:
        return [ClientInfo(s.client_id, s.task, len(s.train), self.tasks[s.task].num_labels) for s in self.shards]


@dataclass
class Trained:
    """A round's training as the server received it: each trained client's mean loss, the uploads of the sharing
    clients (as they arrived, at the wire dtype) and their bytes, the clients left out of the round and why, the
    work counted, and the seconds the clients measured themselves (None where the server's clock is theirs)."""

    losses: dict[int, float] = field(default_factory=dict)
    uploads: dict[int, dict] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    missing: dict[int, str] = field(default_factory=dict)
    work: Tally = field(default_factory=Tally)
    clients_s: float | None = None
    within_clip: dict[int, bool] = field(default_factory=dict)  # under DP: whether each upload's update was unclipped


@dataclass
class Evaluated:
    """A round's evaluation: each client's test scores (`evaluation.test_scores`), its local-validation scores
    when asked for, the clients that failed, the work counted and the clients' own seconds (None: the server's)."""

    tests: dict[int, dict] = field(default_factory=dict)
    val: dict[int, dict] = field(default_factory=dict)
    missing: dict[int, str] = field(default_factory=dict)
    work: Tally = field(default_factory=Tally)
    clients_s: float | None = None


CHOICE_BYTES = 4  # an offer's reply: the index of the adopted candidate, an int32


@dataclass
class Offered:
    """An offer's replies (`Transport.offer`): the candidate each client adopted, the bytes each was sent and sent
    back (the choice), and the clients that failed."""

    choices: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    missing: dict[int, str] = field(default_factory=dict)


@dataclass
class CaughtUp:
    """The replies to `Transport.catch_up` (and, in the driver, to the offers made to clients that missed one): the
    bytes each client was sent and sent back, and the clients that failed."""

    bytes_down: dict[int, int] = field(default_factory=dict)
    missing: dict[int, str] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)


class Transport(Protocol):
    """An engine, as the driver uses it. Client ids are those of the roster; states are flat trainable states."""

    clock_note: str  # where the round's phase clocks run, for the result's time_metrics
    stop_hint: str  # what to do when the run stops for lack of replies
    device: str  # where the clients train (read when the result is built)

    def fingerprint(self) -> tuple[Roster, dict[int, dict]]:
        """Phase 1: every client's fingerprint upload, with the roster learnt on the way."""

    def restore(self, meta: dict) -> Roster:
        """Take up a checkpoint's own part (`checkpoint_extra`) and say the roster."""

    def build(self, plan: Plan) -> None:
        """Give every client its adapter at its planned ranks."""

    def start_eta(self, eta: float, states: dict[int, dict] | None) -> None:
        """Clients start the eta from their initial states (None) or from `states` (an eta resumed after a round)."""

    def train(self, round_idx: int, cohort: set[int], sharing: set[int], advance: Callable[[int], None],
              clips: dict[int, float] | None = None) -> Trained:
        """The clients of `cohort` train (the others are sent nothing and keep their state); those in `sharing`
        (a subset) upload their trained state (the method's `uploads`), under DP (`clips`: each sharing client's
        clip this round) clipped by `federation.privacy.client_upload`. `advance(n)`: n more clients are done
        (a progress bar)."""

    def reject(self, clients: set[int]) -> None:
        """These clients' replies of the round just trained were rejected (`federation.replies`): each goes back to
        its state before the round, as a client whose training failed."""

    def deliver(self, states: dict[int, dict], round_idx: int) -> dict[int, int]:
        """Send each client its new state (the method's `downloads`, which it adopts by `Method.receive`); the bytes
        each was sent."""

    def catch_up(self, missed: dict[int, list[tuple[int, dict]]]) -> CaughtUp:
        """Send each client the downloads of the rounds it took no part in (`Server.take_missed`), which it adopts
        in order, each as `deliver` would have in its round, before it next trains or is tested."""

    def offer(self, round_idx: int, candidates: dict[int, list[dict]]) -> Offered:
        """Send each client its candidate states; it scores each on its training data and adopts the one with the
        lowest loss (`evaluation.adopt_lowest`), and sends back which one (`Method.offers`: ifca)."""

    def evaluate(self, round_idx: int, clients: set[int], validate: bool, test: bool = True) -> Evaluated:
        """The `clients` score their test sets if `test` (and their local validation if `validate`); one that has
        not trained in this eta yet scores its initial state. The call also carries the states `deliver` sent, so it
        is made every round, with or without a test."""

    def states(self, clients: Collection[int] | None = None) -> dict[int, dict]:
        """Every client's current state, or those of `clients` (the server's exact copy, where the clients hold
        theirs): a round asks only for the clients it concerns."""

    def checkpoint_extra(self) -> dict:
        """The engine's own bookkeeping for a checkpoint."""

    def eta_done(self, eta_index: int) -> None:
        """An eta's rounds and validation are over."""

    def finish(self, result: dict, runs: list[dict]) -> None:
        """Add the engine's own parts to the result dictionary (measured memory, transport sizes, devices)."""
