"""`ifca` (Ghosh, Chung, Yin, Ramchandran, NeurIPS 2020): the server keeps k cluster models; every client scores its
training loss under each, adopts the one with the lowest (`phases.ifca.lowest`), trains it and sends it back with
the cluster's id; the server averages inside each cluster.

A round here: every client trains the model it holds and uploads it (adapter and head; a lone member too: its
cluster's model is its own); the server averages each cluster's uploads, shard-weighted as `fedavg_cluster` (on
equal shards the plain mean of the official code), heads only among same-shape heads; then it offers every client
the k models (the adapter and the head of the client's label space), and the client adopts its argmin and is
tested with it, so round r's scores are of the cluster models and round r + 1 trains from the chosen one (the
paper's broadcast and choice, with the test placed between them). Down: k adapters with heads; up: 1 with the
cluster id (4 bytes, `transport.CHOICE_BYTES`).

Initialisation: LoRA starts with B = 0, so k random initialisations would compute one function (ΔW = 0) and every
client's argmin would tie. Round 1 is therefore each client's training from the common start, and the k models are
k distinct clients' round-1 models, drawn by seeded k-means++ on their flattened factors (`farthest_seeds`, the run
seed); a label space the drawn client lacks gets the shard-weighted mean of that label space's round-1 heads.
With client sampling (docs/scale.md) the seeds are drawn from the first round's participants, or from a later
round's if the first had fewer than k; a client that did not adopt the last offer (absent then) is offered the k
current models before it trains or is tested (`behind`), as the paper's server broadcasts them to each round's
clients; before the k models exist, a client trains and keeps its own model (a cluster of one)."""
from __future__ import annotations

from atlasfl.methods.base import Method, select
from atlasfl.settings import setting


class IFCA(Method):
    name = "ifca"
    summary = ("k cluster models on the server; each client adopts the one with its lowest training loss, trains "
               "it and sends it back; the server averages inside each cluster (Ghosh et al., 2020).")
    uses_fingerprints = False  # it finds its own clusters: phase 1 runs for the report only
    shares_alone = True  # a cluster of one still updates its model on the server
    downloads = ()  # the mean goes back inside the offer of the k models, not as a delivery
    catch_up = "none"  # a client that missed rounds is offered the k current models again instead (`behind`)

    @classmethod
    def dp_refusal(cls, cfg):
        return ("seeds its k models from single clients' states and moves clients by their training losses; "
                "neither is a noised mean")
    settings = {"ifca_k": (int | None, setting(
        "ifca: number k of cluster models; unset: the run's number of tasks, a fair default in this simulator, "
        "which knows them (the paper's k is a fixed hyperparameter: 2 in its CIFAR config).", None, ge=1))}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.choices: dict[int, int] = {}  # client id -> the cluster whose model it holds
        self.adapters: list[dict] = []  # cluster j's LoRA factors
        self.heads: list[dict[int, dict]] = []  # cluster j's head per label count
        self.offered: dict[int, int] = {}  # client id -> the round of the last offer it adopted

    @classmethod
    def clusters_k(cls, cfg) -> int:
        from atlasfl.data.tasks import expand_tasks

        return cfg.ifca_k or len(expand_tasks(cfg.tasks))

    @classmethod
    def check(cls, cfg):
        from atlasfl.data.tasks import expand_tasks

        clients = len(expand_tasks(cfg.tasks)) * cfg.clients_per_task
        if cls.clusters_k(cfg) > clients:
            raise ValueError(f"ifca: --ifca-k {cls.clusters_k(cfg)} exceeds the run's {clients} clients; lower it")

    @classmethod
    def clusters_from(cls, config):
        return "training"

    def groups(self, clients, clusters):
        if not self.choices:
            return [list(clients)]  # round 1: everyone's first model seeds the k clusters
        by_cluster: dict[int, list[int]] = {}
        for cid in clients:
            by_cluster.setdefault(self.choices.get(cid, -1 - cid), []).append(cid)
        return list(by_cluster.values())

    def aggregate(self, states, group):
        if not self.adapters:  # a round with fewer than k participants (client sampling) leaves the seeding to a later
            if len(states) >= self.clusters_k(self.cfg):
                self._seed(states, group)
            return states
        new = super().aggregate(states, group)
        j = self.choices.get(group.clients[0])
        if j is not None:
            self.adapters[j] = select(new[0], ("lora_A", "lora_B"))
            self.heads[j].update({_labels(s): select(s, ("head",)) for s in new})
        return new

    def _seed(self, states, group):
        import numpy as np

        from atlasfl.phases.aggregation import aggregate_states
        from atlasfl.phases.ifca import farthest_seeds

        factors = [select(s, ("lora_A", "lora_B")) for s in states]
        points = np.stack([np.concatenate([t.double().flatten().numpy() for t in f.values()]) for f in factors])
        means = aggregate_states(states, group.sizes, alpha=self.cfg.lora_alpha, mode="fedavg")
        pooled = {_labels(s): select(s, ("head",)) for s in means}
        for i in farthest_seeds(points, self.clusters_k(self.cfg), seed=self.cfg.seed):
            self.adapters.append(factors[i])
            heads = {**pooled, _labels(states[i]): select(states[i], ("head",))}
            # copies: the clusters share the pooled heads' values, not their tensors (a checkpoint stores each apart)
            self.heads.append({n: {key: t.clone() for key, t in head.items()} for n, head in heads.items()})

    def offers(self, labels: dict[int, int]):
        if not self.adapters:
            return None
        return {cid: [{**adapter, **heads[n]} for adapter, heads in zip(self.adapters, self.heads)]
                for cid, n in labels.items()}

    def chose(self, choices, round_idx=0):
        self.choices.update(choices)
        self.offered.update(dict.fromkeys(choices, round_idx))

    def behind(self, clients, last_offer):
        return {c for c in clients if self.adapters and self.offered.get(c) != last_offer}

    def round_clusters(self, clients):
        return [self.choices.get(c, -1) for c in clients], {}

    def clustering_state(self):
        tensors = {f"{j}/{key}": t for j, adapter in enumerate(self.adapters) for key, t in adapter.items()}
        tensors.update({f"{j}/{n}/{key}": t for j, heads in enumerate(self.heads) for n, head in heads.items()
                        for key, t in head.items()})
        return dict(choices={str(c): j for c, j in self.choices.items()}, k=len(self.adapters),
                    offered={str(c): r for c, r in self.offered.items()}), tensors

    def restore_clustering(self, saved, tensors):
        self.choices = {int(c): j for c, j in saved.get("choices", {}).items()}
        self.offered = {int(c): r for c, r in saved.get("offered", {}).items()}
        self.adapters = [{} for _ in range(saved.get("k", 0))]
        self.heads = [{} for _ in range(saved.get("k", 0))]
        for name, t in tensors.items():
            j, rest = name.split("/", 1)
            if "/" not in rest:  # j/<factor key>; a head is j/<label count>/<head key>
                self.adapters[int(j)][rest] = t
            else:
                n, key = rest.split("/", 1)
                self.heads[int(j)].setdefault(int(n), {})[key] = t


def _labels(state) -> int:
    """The label count of a state's head (its weight's rows)."""
    return int(state["head::weight"].shape[0])
