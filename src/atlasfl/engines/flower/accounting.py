"""What the clients' replies report beside their results: the sizes of the messages Flower carried (the
ClientApp's size mod), per phase and client, and where and how much memory they used."""
from __future__ import annotations

from flwr.app import Message

from atlasfl.engines.flower.records import TRANSPORT


class Reports:
    def __init__(self):
        self.fingerprint: dict[str, int] = {}
        self.rounds: dict[str, int] = {}  # of the current eta
        self.rounds_by_eta: dict[float, dict[str, int]] = {}
        self.per_client: dict[str, dict[str, int]] = {}
        self.peak = 0
        self.measured_by: set[str] = set()
        self.devices: set[str] = set()
        self.device_names: set[str] = set()

    def next_eta(self, eta: float) -> None:
        self.rounds = self.rounds_by_eta.setdefault(eta, {})  # kept when a resumed run continues this eta

    def to_json(self) -> dict:
        return dict(self.__dict__, rounds_by_eta=[[eta, sizes] for eta, sizes in self.rounds_by_eta.items()],
                    measured_by=sorted(self.measured_by), devices=sorted(self.devices),
                    device_names=sorted(self.device_names), rounds={})

    @classmethod
    def from_json(cls, saved: dict) -> Reports:
        reports = cls()
        reports.__dict__.update(saved, rounds_by_eta={eta: sizes for eta, sizes in saved["rounds_by_eta"]},
                                measured_by=set(saved["measured_by"]), devices=set(saved["devices"]),
                                device_names=set(saved["device_names"]))
        return reports

    def note_client(self, ev: dict) -> None:
        """A client's evaluate reply: its device and its process's measured peak memory."""
        self.peak = max(self.peak, ev["peak_bytes"])
        self.measured_by.add(ev["peak_measured_by"])
        self.devices.add(ev["device"])
        if ev["device_name"]:
            self.device_names.add(ev["device_name"])

    def add(self, phase: str, cid: int, reply: Message) -> None:
        """Add one reply's size record to its phase ('fingerprint' or 'rounds') and to its client."""
        for bucket in (getattr(self, phase), self.per_client.setdefault(str(cid), {})):
            for key, value in reply.content[TRANSPORT].items():
                bucket[key] = bucket.get(key, 0) + int(value)

    def report(self, ours: dict, eta: float, complete: bool = True) -> dict:
        """Sizes of the chosen eta's run (the one our accounting describes) beside our totals. With clients
        missing from a round (`complete` false) the two are not compared (None): a ClientApp that failed did
        not measure what it was sent."""
        rounds = self.rounds_by_eta[eta]
        return dict(
            measured_by="Flower RecordDict/ArrayRecord.count_bytes() of every message, in the ClientApp mod "
                        "transport_size_mod (as flwr's message_size_mod/arrays_size_mod measure); payload = "
                        "tensor bytes (numel x itemsize) of the carried Arrays",
            phases=dict(fingerprint=self.fingerprint, rounds=rounds),
            per_client=self.per_client,
            rounds_payload_matches_accounting=(rounds.get("up_payload", 0) == ours["total_bytes_up"]
                                               - ours["fingerprint_bytes_up"]
                                               and rounds.get("down_payload", 0) == ours["total_bytes_down"])
            if complete else None,
            note="'rounds' carries the adapters and heads our accounting counts (payload) plus NumPy headers and "
                 "array names (arrays) and control values (message); 'fingerprint' carries both fingerprint kinds "
                 "whatever the method (one is for the report only) and the run config; ranks travel as control "
                 "values of round 1. Control values are not counted as traffic by our accounting. 'phases' holds the "
                 "chosen eta's rounds; 'per_client' every message of a client (all phases, every eta of a sweep). "
                 "survival_payload: the exact float32 states that only make the run survive (BACKUPs of clients "
                 "that share nothing, RESTOREs to nodes that lost theirs), not counted by our accounting.",
        )
