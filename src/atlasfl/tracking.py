"""Live curves: with `--tensorboard DIR` a run writes TensorBoard event files as it goes, one point per round.

    DIR/<run name>/            (with --lambda-sweep: DIR/<run name>/eta-<eta>/, one TensorBoard run per eta)

Scalars, x = round: `summary/mean_task_score`, `summary/mean_accuracy`, `task_score/<task>`,
`train_loss/c<k>`, `test_loss/c<k>`, `test_score/c<k>` (the task's GLUE metric), `test_accuracy/c<k>`,
`communication/MB_up` and `MB_down` (that round) and their `_cumulative` totals, `time/round_s`, and
`time/phase_s/<phase>` (seconds spent so far in each timed phase). The run's config is its `config` text.
A round without a test (--eval-every) adds no point to the summary, task and test curves.
A resumed run continues its curves in the same folder.
Tracking only reads the round records both engines already keep: the result JSON is the same with or
without it. `torch.utils.tensorboard` needs the `tensorboard` package (`pip install 'atlasfl[tensorboard]'`).
"""
from __future__ import annotations

from pathlib import Path

from atlasfl.config import RunConfig
from atlasfl.config_file import config_file_text
from atlasfl.errors import AtlasError


class Tracker:
    """What the engines call after each round; this base class records nothing (no --tensorboard)."""

    def round(self, eta: float, entry: dict, phases_s: dict[str, float] | None = None) -> None:
        """One round's record (federation.records.round_summary) of the eta being trained."""

    def resume(self, eta: float, rounds: list[dict]) -> None:
        """A resumed run continues `eta` after its checkpoint's `rounds` (records as in `round`)."""

    def close(self) -> None:
        """Flush and close whatever the tracker holds."""


class TensorBoardTracker(Tracker):
    def __init__(self, cfg: RunConfig, etas: tuple[float, ...]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise AtlasError("--tensorboard needs the tensorboard package: pip install 'atlasfl[tensorboard]' "
                             "(or pip install tensorboard)") from None
        self._writer_class = SummaryWriter
        self.cfg = cfg
        self.root = Path(cfg.tensorboard) / cfg.run_name
        self.per_eta = len(etas) > 1
        self.writers: dict[float, object] = {}
        self.sent: dict[float, list[float]] = {}  # eta -> cumulative MB up, down

    def _writer(self, eta: float, purge_step: int | None = None):
        if eta not in self.writers:
            folder = self.root / f"eta-{eta:g}" if self.per_eta else self.root
            try:
                writer = self._writer_class(log_dir=str(folder), purge_step=purge_step)
            except OSError as exc:
                raise AtlasError(f"cannot write TensorBoard logs to {folder} ({exc.strerror}); "
                                 "choose another --tensorboard folder") from None
            text = config_file_text(self.cfg.model_dump(mode="json"), source=self.cfg.run_name)
            writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))  # markdown code
            self.writers[eta], self.sent[eta] = writer, [0.0, 0.0]
        return self.writers[eta]

    def round(self, eta: float, entry: dict, phases_s: dict[str, float] | None = None) -> None:
        w, step = self._writer(eta), entry["round"]
        tested = entry.get("evaluated", True)  # a round without a test (--eval-every) adds no test point
        if tested:
            w.add_scalar("summary/mean_task_score", entry["mean_task_score"], step)
            w.add_scalar("summary/mean_accuracy", entry["mean_accuracy"], step)
            for task, score in entry["task_scores"].items():
                w.add_scalar(f"task_score/{task}", score, step)
        for c in entry["clients"]:
            k = c["client_id"]
            if c["train_loss"] is not None:  # None: not trained yet (client sampling)
                w.add_scalar(f"train_loss/c{k}", c["train_loss"], step)
            if tested:
                w.add_scalar(f"test_loss/c{k}", c["test_loss"], step)
                w.add_scalar(f"test_score/c{k}", c["test_metric"], step)
                w.add_scalar(f"test_accuracy/c{k}", c["test_accuracy"], step)
        sent = self.sent[eta]
        for i, (direction, key) in enumerate((("up", "bytes_up_total"), ("down", "bytes_down_total"))):
            sent[i] += entry[key] / 1e6
            w.add_scalar(f"communication/MB_{direction}", entry[key] / 1e6, step)
            w.add_scalar(f"communication/MB_{direction}_cumulative", sent[i], step)
        w.add_scalar("time/round_s", entry["time_s"], step)
        if entry.get("participants") is not None:
            w.add_scalar("participation/participants", len(entry["participants"]), step)
            w.add_scalar("time/simulated_round_s", entry["simulated"]["round_s"], step)
        if "privacy" in entry:  # --dp-clip: the ε spent so far (∞ drawn as inf)
            eps = entry["privacy"]["epsilon"]
            w.add_scalar("privacy/epsilon", float("inf") if eps is None else eps, step)
            for group, clip in (entry["privacy"].get("clips") or {}).items():  # --dp-target-quantile
                w.add_scalar(f"privacy/clip/{group}", clip["clip"], step)
        for phase, seconds in (phases_s or {}).items():
            w.add_scalar(f"time/phase_s/{phase}", seconds, step)
        w.flush()  # live: TensorBoard sees each round as it ends

    def resume(self, eta: float, rounds: list[dict]) -> None:
        """Points the interrupted run logged after its checkpoint are hidden (TensorBoard's purge_step), and
        the cumulative traffic goes on from the checkpoint's rounds instead of from zero."""
        self._writer(eta, purge_step=len(rounds) + 1)
        self.sent[eta] = [sum(r[key] for r in rounds) / 1e6 for key in ("bytes_up_total", "bytes_down_total")]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def open_tracker(cfg: RunConfig, etas: tuple[float, ...]) -> Tracker:
    """The run's tracker: TensorBoard event files with --tensorboard, else one that records nothing."""
    return TensorBoardTracker(cfg, etas) if cfg.tensorboard else Tracker()
