"""Server logic of one federation, independent of transport.

The in-process loop and the Flower ServerApp both hand it what the clients uploaded (fingerprints
before round 1, trainable states after each round) and send back what it returns; it never
touches a model, a socket or a file.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import torch

from atlasfl.config import RunConfig
from atlasfl.errors import AtlasError
from atlasfl.federation.replies import Spec, upload_spec
from atlasfl.federation.wire import WIRE_DTYPES
from atlasfl.methods import Method, second_look_applies
from atlasfl.methods.base import Group, select
from atlasfl.phases.clustering import (
    SIGNIFICANCE,
    SamplingNoise,
    adjusted_rand,
    canonical_labels,
    centred_unit_rows,
    cluster_fingerprints,
)
from atlasfl.phases.devices import PROFILES, ModelFacts, draw_devices, estimate_training_memory, fits
from atlasfl.phases.fingerprint import NOISE_KEYS
from atlasfl.phases.privacy import count_noise, gaussian, next_clip, noise_seed, update_noise
from atlasfl.phases.ranks import adapter_params, allocate_ranks, rank_budget_for_memory
from atlasfl.phases.server_optimizer import ServerOptimizer, ServerRule

log = logging.getLogger("atlasfl")
State = dict[str, torch.Tensor]
FINGERPRINT_KINDS = ("representation", "gradient")


@dataclass(frozen=True)
class ClientInfo:
    cid: int
    task: str
    num_train: int
    num_labels: int


@dataclass
class Plan:
    """Who aggregates with whom and at which ranks: the outcome of phases 1 and 2."""

    cluster_labels: list[int]
    cluster_source: str
    ranks: dict[int, dict[str, int]]
    devices: list[str]
    phase1: dict
    phase2: dict
    fingerprint_bytes: dict[int, int] = field(default_factory=dict)
    second_look: dict | None = None  # after round 1 (`Server.look`): the partition from round 2 on, and its tests

    @classmethod
    def from_json(cls, d: dict) -> Plan:
        """Inverse of dataclasses.asdict after a JSON trip (which turns int keys into strings)."""
        return cls(**dict(d, ranks={int(c): r for c, r in d["ranks"].items()},
                          fingerprint_bytes={int(c): b for c, b in d["fingerprint_bytes"].items()}))


def sampling_noise(uploads: list[dict]) -> SamplingNoise:
    """The clients' noise figures and per-label means (label spaces padded with empty labels to the largest)."""
    width = max(len(u["label_counts"]) for u in uploads)

    def padded(key: str) -> np.ndarray:
        rows = [np.asarray(u[key], dtype=np.float64) for u in uploads]
        return np.stack([np.pad(x, [(0, width - len(x))] + [(0, 0)] * (x.ndim - 1)) for x in rows])

    return SamplingNoise.of(*([float(u[key]) for u in uploads] for key in NOISE_KEYS), len(uploads),
                            label_means=padded("label_means"), label_counts=padded("label_counts"))


class Server:
    def __init__(self, cfg: RunConfig, method: Method, clients: list[ClientInfo], *, modules: list[str],
                 shapes: dict[str, tuple[int, int]], facts: ModelFacts):
        self.cfg = cfg
        self.method = method
        self.clients = {c.cid: c for c in clients}
        self.modules = modules
        self.shapes = shapes
        self.facts = facts
        self.eta = cfg.eta
        self.cluster_labels: list[int] = [0] * len(clients)
        self.affinity_space: np.ndarray | None = None
        self.planned: Plan | None = None
        self.looking = False  # this round (an eta's first) every client uploads for the second look
        rule = ServerRule.of(cfg)
        self.optimizer = None if rule is None else ServerOptimizer(rule)
        self.clips: dict[int, float] = {}  # under DP: each client's clip for its next upload
        self.expected: dict[int, Spec] = {}  # each client's upload keys and shapes, by the plan (`adopt`)
        # What each absent member of a sharing group missed (`aggregate`, `Method.catch_up`): (round, download) in
        # order, handed to it before it next trains or is tested (`take_missed`)
        self.missed: dict[int, list[tuple[int, State]]] = {}
        self.round_clips: dict[str, dict] = {}  # under adaptive clipping: each group's clip of the last aggregate

    def start_eta(self, eta: float, optimizer_state: dict[str, torch.Tensor] | None = None, done: int = 0,
                  clip_state: dict[str, torch.Tensor] | None = None,
                  missed_state: dict[str, torch.Tensor] | None = None) -> None:
        """An eta's federation begins (`done` rounds of it already run, on a resume): its step size, the server
        optimiser's state, the clients' DP clips and the downloads absent clients missed afresh or as a checkpoint of
        this eta left them (`ServerOptimizer.tensors`, `clip_state`, `missed_tensors`), and its groups: phase 1's
        in round 1, the second look's from round 2 on."""
        self.eta = eta
        self.missed = _missed_from(missed_state or {})
        if self.optimizer is not None:
            self.optimizer.load(optimizer_state or {})
        if self.cfg.dp_clip is not None:
            saved = (clip_state or {}).get("clips")
            self.clips = {c: self.cfg.dp_clip if saved is None else float(saved[i])
                          for i, c in enumerate(sorted(self.clients))}
            self.round_clips = {}
        if self.planned is None:
            return
        look = self.planned.second_look
        refined = done >= 1 and look is not None and look["labels"] is not None
        self.cluster_labels = list(look["labels"] if refined else self.planned.cluster_labels)
        self.looking = done == 0 and self.second_look_wanted()

    def second_look_wanted(self) -> bool:
        """Whether this eta's round 1 ends with the second look (`--second-look`; auto: phase 1 is ambiguous),
        for a method that shares in phase 1's clusters at this step size."""
        mode = self.cfg.second_look
        if mode == "off" or not second_look_applies(self.cfg) or not self.method.shares(self.eta):
            return False
        return mode == "on" or bool(self.planned.phase1.get("ambiguous"))

    # ---- phases 1 and 2: before round 1 ---------------------------------------------------------
    def plan(self, uploads: dict[int, dict]) -> Plan:
        """Cluster the clients' fingerprints, draw devices, allocate per-module ranks."""
        cids = sorted(self.clients)
        tasks = list(dict.fromkeys(self.clients[c].task for c in cids))
        truth = [tasks.index(self.clients[c].task) for c in cids]
        by_kind = {}
        for kind in FINGERPRINT_KINDS:
            F = np.stack([np.asarray(uploads[c][kind], dtype=np.float64) for c in cids])
            noise = sampling_noise([uploads[c] for c in cids]) if kind == "representation" else None
            result = cluster_fingerprints(F, seed=self.cfg.seed, noise=noise)
            by_kind[kind] = (F, result, adjusted_rand(result.labels, truth))
        F, chosen, ari = by_kind[self.cfg.fingerprint]
        labels = chosen.labels if self.cfg.clusters == "fingerprint" else truth
        phase1 = dict(
            fingerprint=self.cfg.fingerprint, k=chosen.k, labels=chosen.labels, silhouette=chosen.silhouette,
            ari=ari, method=chosen.method, silhouette_by_k={str(k): v for k, v in chosen.silhouette_by_k.items()},
            dispersion=chosen.dispersion, spread_to_noise=chosen.spread_to_noise,
            tightness_by_k={str(k): v for k, v in chosen.tightness_by_k.items()},
            threshold_by_k={str(k): v for k, v in chosen.threshold_by_k.items()},
            dof_by_k={str(k): list(v) for k, v in chosen.dof_by_k.items()}, margin=chosen.margin,
            margin_units=chosen.margin_units, significance=SIGNIFICANCE if chosen.tightness_by_k else None,
            passing_k=chosen.passing_k, ambiguous=chosen.ambiguous, split=chosen.split,
            similarity=chosen.similarity, fingerprints=F.tolist(),
            true_tasks=[self.clients[c].task for c in cids],
            ari_by_fingerprint={k: v[2] for k, v in by_kind.items()},
            k_by_fingerprint={k: v[1].k for k, v in by_kind.items()},
            margin_by_fingerprint={k: v[1].margin for k, v in by_kind.items()},
        )
        devices = draw_devices(len(cids), self.cfg.seed, self.cfg.devices)
        importance = self._cluster_importance(uploads, labels)
        ranks, clients2 = {}, {}
        for cid, device in zip(cids, devices):
            ranks[cid], clients2[str(cid)] = self._allocate(cid, device, importance[labels[cid]])
        phase2 = dict(
            heterogeneous=self.method.heterogeneous_ranks, rank_candidates=list(self.cfg.rank_candidates),
            memory_model="ESTIMATE from the model config (docs/design.md §3.2), not a measurement", clients=clients2,
        )
        plan = Plan(cluster_labels=list(labels), cluster_source="fingerprint" if self.cfg.clusters == "fingerprint"
                    else "oracle", ranks=ranks, devices=devices, phase1=phase1, phase2=phase2,
                    fingerprint_bytes={c: self._fingerprint_bytes(self.clients[c].num_labels) for c in cids})
        self.adopt(plan)
        return plan

    def adopt(self, plan: Plan) -> None:
        """Take a plan (fresh, or restored from a checkpoint) as the federation's grouping, and the shapes of what
        each client uploads at its planned ranks (`replies.upload_spec`)."""
        from atlasfl.models.lora import head_has_bias

        self.planned = plan
        self.cluster_labels = list(plan.cluster_labels)
        self.affinity_space = centred_unit_rows(np.asarray(plan.phase1["fingerprints"], dtype=np.float64))
        self.expected = {cid: upload_spec(plan.ranks[cid], self.shapes, info.num_labels, self.facts.hidden_size,
                                          head_bias=head_has_bias(self.facts.family), parts=self.method.uploads)
                         for cid, info in self.clients.items() if cid in plan.ranks}

    def _fingerprint_bytes(self, num_labels: int) -> int:
        """Float32 bytes one client uploads for the configured fingerprint kind: its `fingerprint_dim` sketch,
        plus, for the representation rule, the sampling-noise numbers (`phases.fingerprint.NOISE_KEYS`: σ², n, effective
        dimensions) and a sketched mean and a count per label of its label space (`LABEL_KEYS` there), plus one
        importance per module where ranks follow importance. Counted only where the method uses it (clusters or
        importance-driven ranks)."""
        m = self.method
        if not m.uses_fingerprints:
            return 0
        dim = self.cfg.fingerprint_dim
        representation = len(NOISE_KEYS) + num_labels * (dim + 1) if self.cfg.fingerprint == "representation" else 0
        return 4 * (dim + representation + (len(self.modules) if m.heterogeneous_ranks else 0))

    def _cluster_importance(self, uploads, labels) -> dict[int, dict[str, float]]:
        """Mean over each cluster of its clients' layer importances, each client's normalised to sum 1."""
        out = {}
        for label in set(labels):
            members = [c for c in sorted(self.clients) if labels[c] == label]
            rows = []
            for c in members:
                imp = np.array([uploads[c]["importance"][m] for m in self.modules])
                rows.append(imp / imp.sum() if imp.sum() > 0 else np.full(len(imp), 1 / len(imp)))
            out[label] = dict(zip(self.modules, np.mean(rows, axis=0).tolist()))
        return out

    def _allocate(self, cid: int, device: str, importance: dict[str, float]) -> tuple[dict[str, int], dict]:
        profile = PROFILES[device]
        cands = self.cfg.rank_candidates
        head = self.facts.hidden_size * self.clients[cid].num_labels + self.clients[cid].num_labels
        base = estimate_training_memory(self.facts, batch_size=self.cfg.batch_size, seq_len=self.cfg.max_length,
                                        lora_params=0, head_params=head)
        feasible = fits(self.facts, profile, batch_size=self.cfg.batch_size, seq_len=self.cfg.max_length)
        if self.method.heterogeneous_ranks:
            # The device caps the mean rank over modules (budget = mean cap × modules); a single module
            # may go up to the largest candidate, so important layers get more than unimportant ones.
            mean_cap = max([c for c in cands if c <= profile.mean_rank_cap], default=cands[0])
            max_rank = max(cands)
            budget = min(mean_cap * len(self.modules),
                         rank_budget_for_memory(profile.memory_bytes - base["total_estimate"], self.shapes))
            ranks = allocate_ranks(self.modules, importance, cap=max_rank, candidates=cands, total_budget=budget)
        else:
            mean_cap = max_rank = budget = None
            ranks = {m: self.cfg.homogeneous_rank for m in self.modules}
        estimate = estimate_training_memory(self.facts, batch_size=self.cfg.batch_size, seq_len=self.cfg.max_length,
                                            lora_params=adapter_params(ranks, self.shapes), head_params=head)
        info = dict(device=device, feasible=feasible, mean_rank_cap=mean_cap, max_module_rank=max_rank,
                    rank_budget=budget, ranks=ranks, total_rank=sum(ranks.values()),
                    memory_budget_bytes=profile.memory_bytes, memory_estimate_bytes=estimate)
        return ranks, info

    # ---- phases 3 and 4: after each round -------------------------------------------------------
    def groups(self) -> list[list[int]]:
        """Client ids aggregated together, by the method's grouping (`Method.groups`)."""
        return self.method.groups(sorted(self.clients), self.cluster_labels)

    def sharing_groups(self) -> list[list[int]]:
        """The groups in which anything changes hands this round: those of two clients or more (or of one, for a
        method that keeps its models on the server: `Method.shares_alone`), and none
        where the method shares nothing at this step size (`Method.shares`: atlas at η = 0, its identity). A
        client outside them has nobody to share with: it uploads nothing, receives nothing and keeps its own
        state untouched, so `atlas --eta 0` is `local_only` at every wire dtype."""
        if not self.method.shares(self.eta):
            return []
        return [group for group in self.groups() if len(group) >= (1 if self.method.shares_alone else 2)]

    def participation_rate(self) -> float:
        """The sampling rate the privacy accountant may claim amplification for: 1, none. A client that fails is no
        random sample; a cohort of `--clients-per-round` is drawn without replacement at a fixed size, not by the
        Poisson sampling the accountant's subsampled Gaussian assumes, so ε is stated as if every client took part
        in every round, an upper bound for the sampled run (docs/privacy.md)."""
        return 1.0

    def sharing_clients(self) -> list[int]:
        """Client ids that upload their trained state this round (the members of `sharing_groups`; every client
        in a round that ends with the second look, which compares all of them)."""
        if self.looking and self.planned.second_look is None:
            return sorted(self.clients)
        return sorted(c for group in self.sharing_groups() for c in group)

    def regroup(self, round_idx: int, uploads: dict[int, State], starts: dict[int, State]) -> None:
        """A method that finds clusters during training updates them from the round's uploads, once they are
        aggregated (`Method.regroup`): the clients that upload in a round are always those it aggregates. After
        a round 1 that asked for it, the second look regroups phase 1's clusters."""
        self.method.regroup(round_idx, sorted(self.clients), uploads, starts)
        if self.looking:
            self.look(uploads)

    def look(self, uploads: dict[int, State]) -> None:
        """The second look (`phases.second_look`) on round 1's uploads: its partition groups the clients from
        round 2 on, recorded in the plan (the first eta's; a later eta of a sweep takes it up after its own
        round 1, whose uploads are the same). Skipped, saying why, when a client did not reply."""
        from atlasfl.phases.second_look import cosine_matrix, refine, round1_updates

        self.looking = False
        t0 = time.perf_counter()
        plan, cids = self.planned, sorted(self.clients)
        if plan.second_look is None:
            sharing = set(self._phase1_sharing())
            extra = {c: uploads[c] for c in cids if c in uploads and c not in sharing}
            base = dict(mode=self.cfg.second_look, phase1_labels=list(plan.cluster_labels),
                        phase1_ari=self._ari(plan.cluster_labels), extra_rounds=0, effective_from_round=2,
                        extra_bytes_up=sum(_wire_bytes(s, self.cfg.wire_dtype) for s in extra.values()),
                        extra_uploaders=sorted(extra))
            absent = [c for c in cids if c not in uploads]
            if absent:
                plan.second_look = dict(base, labels=None, ari=None, changed=False,
                                        skipped=f"client(s) {absent} did not reply in round 1")
            else:
                S = cosine_matrix(list(round1_updates({c: uploads[c] for c in cids}, self.cfg.lora_alpha).values()))
                found = refine(S, plan.cluster_labels)
                plan.second_look = dict(base, **found, ari=self._ari(found["labels"]), similarity=S.tolist(),
                                        changed=found["labels"] != canonical_labels(plan.cluster_labels),
                                        skipped=None)
            plan.second_look["server_s"] = time.perf_counter() - t0
            log.info("second look after round 1: clusters %s -> %s (ARI %s -> %s)%s", plan.cluster_labels,
                     plan.second_look["labels"], _fmt(plan.second_look["phase1_ari"]), _fmt(plan.second_look["ari"]),
                     f"; skipped: {plan.second_look['skipped']}" if plan.second_look["skipped"] else "")
        if plan.second_look["labels"] is not None:
            self.cluster_labels = list(plan.second_look["labels"])

    def _phase1_sharing(self) -> list[int]:
        """The clients that would upload in round 1 without the second look (phase 1's sharing groups)."""
        groups = self.method.groups(sorted(self.clients), list(self.planned.cluster_labels))
        return [c for g in groups if len(g) >= (1 if self.method.shares_alone else 2) for c in g]

    def _ari(self, labels: list[int]) -> float:
        """Adjusted Rand index of `labels` (client id order) against the clients' true tasks."""
        tasks = list(dict.fromkeys(self.clients[c].task for c in sorted(self.clients)))
        return adjusted_rand(labels, [tasks.index(self.clients[c].task) for c in sorted(self.clients)])

    def round_clusters(self) -> dict | None:
        """The round record of such a method's clusters: a label per client id, their ARI against the true tasks
        (beside phase 1's, in `phase1_clustering`) and what its rule saw; None for the other methods."""
        found = self.method.round_clusters(sorted(self.clients))
        if found is None:
            return None
        labels, seen = found
        return dict(labels=labels, ari=self._ari(labels), **seen)

    def aggregate(self, uploads: dict[int, State], missing: frozenset[int] = frozenset(),
                  absent: frozenset[int] = frozenset(), round_idx: int = 0,
                  within_clip: dict[int, bool] | None = None) -> dict[int, State]:
        """New trainable state for every replying client of every sharing group, at each client's own shapes.

        `uploads` must hold the state of every client in `sharing_clients()` but those in `missing` (clients
        that failed this round: they keep their last state and get nothing) and those `absent` (not taking part
        this round: `federation.cohort`; they keep their state too). A group aggregates over its replying members
        only, so a lost or absent client never enters its group's aggregate, though an absent one is owed it
        (`_stand_for`, `take_missed`); a group none of whose members takes part is left as it is; one left with
        fewer than `min_replies_per_group` replies of the members taking part (or none) raises TooFewReplies.
        Under client-level DP (`--dp-clip`, the uploads already clipped by their clients) a group's mean is
        uniform and, centrally, noised (`_private_step`) with noise drawn from the run seed and `round_idx`; with
        --dp-target-quantile each group's clip then moves toward that quantile of its members' update norms
        (`_adapt_clip`, from `within_clip`: whether each upload was unclipped)."""
        unsent = [c for c in self.sharing_clients() if c not in uploads and c not in missing and c not in absent]
        if unsent:
            raise ValueError(f"no upload from sharing client(s) {unsent}")
        out: dict[int, State] = {}
        self.round_clips = {}
        for full in self.sharing_groups():
            taking_part = [c for c in full if c not in absent]
            if not taking_part:
                continue
            group = [c for c in taking_part if c not in missing]
            needed = min(self.cfg.min_replies_per_group, len(taking_part))
            if len(group) < max(1, needed):
                raise TooFewReplies(group=taking_part, missing=[c for c in taking_part if c in missing], needed=needed)
            stepped: list[str] = []
            name = ",".join(map(str, full))
            dp = self.cfg.dp_clip is not None
            step = self._step(name, stepped)
            if dp and self.cfg.dp_mode == "central" and self.cfg.dp_noise > 0:
                std = self._update_noise(len(group)) * self._group_clip(group)
                step = self._private_step(step, [uploads[c] for c in group], round_idx, name, std)
            if dp and self.cfg.dp_target_quantile is not None:
                self._adapt_clip(full, group, within_clip or {}, round_idx, name)
            stand_for = self._stand_for([c for c in full if c in absent])
            behind = list(dict.fromkeys(stand_for.values()))  # one stand-in per shape: the first absent member's
            members = group + behind
            states = [uploads[c] for c in group]
            new = self.method.aggregate(states + [self._stand_in(b, states[0]) for b in behind], Group(
                clients=members, sizes=[1 if dp else self.clients[c].num_train for c in group] + [0] * len(behind),
                fingerprints=self.affinity_space[members], cfg=self.cfg, eta=self.eta, step=step))
            if self.optimizer is not None and not stepped:
                raise AtlasError(f"{self.method.name}'s rule never handed its group average to the server optimiser; "
                                 "it must pass Group.step on, or declare group_average = False")
            out.update(zip(group, new))
            owed = {b: self._owed(state, states) for b, state in zip(behind, new[len(group):])}
            for c, b in stand_for.items():
                earlier = self.missed.get(c, []) if self.method.catch_up == "each" else []
                self.missed[c] = [*earlier, (round_idx, owed[b])]  # one object per shape, shared
        return out if self.method.downloads else {}  # a method that sends nothing back delivers nothing

    def _stand_for(self, absent: list[int]) -> dict[int, int]:
        """Each of a group's `absent` members that catches up (`Method.catch_up`), mapped to the first of them with
        its upload's shapes, whose zero stand-in (`_stand_in`) is aggregated with weight zero beside the
        participants: it adds nothing to the group's aggregate and receives it at those shapes (with any rule that
        weighs its members: the mean, the SVD route, HetLoRA's norms, FLoRA's stacking; a robust rule leaves it
        out). "latest" keeps the newest download alone, "each" keeps them all, in order (`aggregate`)."""
        if self.method.catch_up == "none":
            return {}
        first: dict[tuple, int] = {}
        return {c: first.setdefault(tuple(sorted(self.expected[c].items())), c) for c in absent}

    def _stand_in(self, cid: int, like: State) -> State:
        """A zero state of client `cid`'s upload shapes, in the dtypes of the participants' uploads (`like`)."""
        return {key: torch.zeros(size, dtype=like[key].dtype) for key, size in self.expected[cid].items()}

    def _owed(self, received: State, uploads: list[State]) -> State:
        """What a stand-in received, as its absent members are owed it: the parts the method sends down, and no head
        that no participant's head has the shape of (there the group has no head to give)."""
        shared = {(key, tuple(t.shape)) for state in uploads for key, t in state.items() if key.startswith("head::")}
        return {key: t for key, t in select(received, self.method.downloads).items()
                if not key.startswith("head::") or (key, tuple(t.shape)) in shared}

    def take_missed(self, clients: Collection[int]) -> dict[int, list[tuple[int, State]]]:
        """The downloads each of `clients` missed, oldest first, now handed to it (a client that fails to take them
        gets them back: `give_back_missed`)."""
        return {c: self.missed.pop(c) for c in sorted(clients) if c in self.missed}

    def give_back_missed(self, missed: dict[int, list[tuple[int, State]]]) -> None:
        """Downloads handed out that a failing client did not take: queued again, before anything missed since."""
        for c, entries in missed.items():
            self.missed[c] = [*entries, *self.missed.get(c, [])]

    def missed_tensors(self) -> dict[str, torch.Tensor]:
        """The queued downloads for a checkpoint, each distinct one once (absent members of one shape share theirs):
        `download/<n>/<key>`, and per client `queue/<client>`, its (round, n) pairs in order."""
        numbered: dict[int, int] = {}
        out: dict[str, torch.Tensor] = {}
        saved: set[int] = set()  # a file holds a tensor once: one shared by two downloads (flora's stack) is copied
        for c, entries in sorted(self.missed.items()):
            pairs = []
            for r, state in entries:
                if id(state) not in numbered:
                    numbered[id(state)] = n = len(numbered)
                    for key, t in state.items():
                        out[f"download/{n}/{key}"] = t.clone() if id(t) in saved else t
                        saved.add(id(t))
                pairs.append((r, numbered[id(state)]))
            out[f"queue/{c}"] = torch.tensor(pairs, dtype=torch.int64)
        return out

    def offers(self, clients: set[int]) -> dict[int, list[State]] | None:
        """The candidate states each of `clients` is offered (`Method.offers`), or None."""
        return self.method.offers({c: info.num_labels for c, info in sorted(self.clients.items()) if c in clients})

    def chose(self, choices: dict[int, int], round_idx: int) -> None:
        self.method.chose(choices, round_idx)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The server optimiser's state for a checkpoint (empty where there is none)."""
        return {} if self.optimizer is None else self.optimizer.tensors()

    def clips_for(self, clients: set[int]) -> dict[int, float] | None:
        """Each of `clients`' clip for this round's upload under DP (None without)."""
        return {c: self.clips[c] for c in clients} if self.cfg.dp_clip is not None else None

    def clip_state(self) -> dict[str, torch.Tensor]:
        """The clients' clips (client-id order) for a checkpoint; empty without DP."""
        if not self.clips:
            return {}
        return {"clips": torch.tensor([self.clips[c] for c in sorted(self.clips)], dtype=torch.float64)}

    def _group_clip(self, group: list[int]) -> float:
        """A group's clip: its members' largest, which bounds each member's update (each clipped to its own)."""
        return max(self.clips[c] for c in group)

    def _count_noise(self, members: int) -> float:
        return self.cfg.dp_count_noise if self.cfg.dp_count_noise is not None else count_noise(members,
                                                                                               self.cfg.dp_noise)

    def _update_noise(self, members: int) -> float:
        """The update's noise multiplier: z, or under adaptive clipping z_Δ, what the noised count leaves of z."""
        if self.cfg.dp_target_quantile is None:
            return self.cfg.dp_noise
        return update_noise(self.cfg.dp_noise, self._count_noise(members))

    def _adapt_clip(self, full: list[int], group: list[int], within: dict[int, bool], round_idx: int, name: str):
        """Adaptive clipping (Andrew et al. 2021): the group's clip (its members' largest) moves geometrically by
        the noised fraction of its replying members whose update was within it; every member takes the new clip.
        Recorded in `round_clips` for the round's `privacy` entry."""
        clip = self._group_clip(group)
        generator = torch.Generator().manual_seed(noise_seed(self.cfg.seed, round_idx, f"clip count {name}"))
        new, fraction = next_clip(clip, sum(bool(within.get(c)) for c in group), len(group),
                                  target=self.cfg.dp_target_quantile, lr=self.cfg.dp_clip_lr,
                                  count_std=self._count_noise(len(group)), generator=generator)
        self.clips.update(dict.fromkeys(full, new))
        self.round_clips[name] = dict(clip=clip, within_fraction=fraction, next_clip=new,
                                      update_noise_multiplier=self._update_noise(len(group)))

    def _private_step(self, step, states: list[State], round_idx: int, group: str, std: float):
        """Central DP-FedAvg's Gaussian mechanism on one group's uniform mean: N(0, (std/m)²) on every coordinate of
        each key's mean, m the members averaged into it (all of the group for adapters; those whose head has that
        shape for a head: `head::<param>@<shape>`): `std` = z·C on each sum of clipped updates, so one client's
        whole update (norm <= C over all keys) meets noise multiplier z. The server optimiser, if any, steps the
        noised mean (post-processing)."""
        generator = torch.Generator().manual_seed(noise_seed(self.cfg.seed, round_idx, group))

        def members(key: str) -> int:
            name, _, shape = key.partition("@")
            if not shape:
                return len(states)
            return sum("x".join(map(str, st[name].shape)) == shape for st in states if name in st)

        def noised(key: str, mean: torch.Tensor) -> torch.Tensor:
            mean = (mean.to(torch.float64) + gaussian(mean.shape, std / members(key), generator)).to(mean.dtype)
            return mean if step is None else step(key, mean)
        return noised

    def _step(self, group: str, stepped: list[str]):
        """The server optimiser's step for one sharing group (its state is the group's, under every round's
        replying subset), noting each key it steps; None when the server takes the average as it is."""
        if self.optimizer is None:
            return None

        def step(key: str, aggregate: torch.Tensor) -> torch.Tensor:
            stepped.append(key)
            return self.optimizer.step(group, key, aggregate)
        return step


def _missed_from(tensors: dict[str, torch.Tensor]) -> dict[int, list[tuple[int, State]]]:
    """The inverse of `Server.missed_tensors`."""
    downloads: dict[int, State] = {}
    for name, t in tensors.items():
        kind, n, *key = name.split("/", 2)
        if kind == "download":
            downloads.setdefault(int(n), {})[key[0]] = t
    return {int(name.split("/")[1]): [(int(r), downloads[int(n)]) for r, n in t.tolist()]
            for name, t in sorted(tensors.items()) if name.startswith("queue/")}


def _wire_bytes(state: State, dtype: str) -> int:
    return sum(v.numel() * WIRE_DTYPES[dtype].itemsize for v in state.values())


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


class TooFewReplies(AtlasError):
    """A sharing group had fewer replying clients than `min_replies_per_group` allows in a round."""

    def __init__(self, group: list[int], missing: list[int], needed: int):
        self.group, self.missing = group, missing
        super().__init__(f"group {group} had {len(group) - len(missing)} replying client(s), fewer than "
                         f"--min-replies-per-group {needed} (missing: {missing})")
