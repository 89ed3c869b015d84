"""Server optimisers on a group's aggregate (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The server keeps, per sharing group and per tensor of the group's aggregate, its own model x (the group's
previous output) and the optimiser's moments. Each round the group's aggregate `agg` gives the pseudo-gradient
Δ = agg − x, and the server's new x is what the group's members receive:

- avgm (FedAvgM, Hsu et al. 2019, as Flower's): g = x − agg, v ← μ·v + g (v = g the first time), x ← x − η·v;
  `sgd` is avgm at μ = 0, i.e. x ← x − η·(x − agg).
- adam: m ← β1·m + (1−β1)·Δ, v ← β2·v + (1−β2)·Δ², x ← x + η_t·m/(√v + τ),
  η_t = η·√(1−β2^t)/(1−β1^t) with t the tensor's step count, 1 at its first step (Kingma & Ba's t).
- yogi: m as adam, v ← v − (1−β2)·Δ²·sign(v − Δ²), x ← x + η·m/(√v + τ) (no bias correction, as Flower).

m and v start at zero. A tensor the server has not seen yet (the first round: the server never holds the
clients' seeded start, which on Flower is built on the SuperNodes) passes through unchanged and becomes x.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
# The server learning rate each optimiser has unless --server-lr says otherwise: sgd 1 (plain FedAvg), avgm 0.1
# (with momentum 0.9, an effective step η/(1−μ) = 1: FedAvg's pace, smoothed), adam and yogi Flower 1.42's.
DEFAULT_LR = {"sgd": 1.0, "avgm": 0.1, "adam": 0.1, "yogi": 0.01}
SLOTS = ("x", "m", "v", "t")


@dataclass(frozen=True)
class ServerRule:
    """One server optimiser and its constants."""

    name: str
    lr: float
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    @classmethod
    def of(cls, cfg) -> ServerRule | None:
        """The run's rule; None where the server takes the aggregate as it is (sgd at lr 1: today's path)."""
        lr = cfg.server_lr if cfg.server_lr is not None else DEFAULT_LR[cfg.server_optimizer]
        if cfg.server_optimizer == "sgd":
            return None if lr == 1.0 else cls("avgm", lr)
        return cls(cfg.server_optimizer, lr, momentum=cfg.server_momentum if cfg.server_optimizer == "avgm" else 0.0,
                   beta1=cfg.server_beta1, beta2=cfg.server_beta2, tau=cfg.server_tau)


def avgm_step(x: Tensor, agg: Tensor, v: Tensor | None, *, lr: float, momentum: float) -> tuple[Tensor, Tensor]:
    """(new x, new v) of FedAvgM."""
    g = x - agg
    v = g if v is None or momentum == 0 else momentum * v + g
    return x - lr * v, v


def adaptive_step(rule: ServerRule, x: Tensor, agg: Tensor, m: Tensor, v: Tensor, t: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(new x, new m, new v) of adam or yogi at step t (1 at the first)."""
    delta = agg - x
    square = delta * delta
    m = rule.beta1 * m + (1 - rule.beta1) * delta
    if rule.name == "adam":
        v = rule.beta2 * v + (1 - rule.beta2) * square
        lr = rule.lr * math.sqrt(1 - rule.beta2 ** t) / (1 - rule.beta1 ** t)
    else:
        v = v - (1 - rule.beta2) * square * torch.sign(v - square)
        lr = rule.lr
    return x + lr * m / (v.sqrt() + rule.tau), m, v


def _padded(t: Tensor, shape: torch.Size) -> Tensor:
    """`t` zero-padded at the end of each axis to `shape`."""
    if t.shape == shape:
        return t
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


class ServerOptimizer:
    """The server's x and moments for every group (`group`: its client ids joined by commas) and tensor key.

    Shapes are fixed per key except along the rank axis of zero-padded factors (hetlora, `--aggregation fedavg`
    at mixed ranks), where the group's largest replying rank may change: state and aggregate are then both
    zero-padded to the larger shape, as the zero-padded mean itself treats missing ranks."""

    def __init__(self, rule: ServerRule):
        self.rule = rule
        self.state: dict[str, dict[str, dict[str, Tensor]]] = {}

    def step(self, group: str, key: str, agg: Tensor) -> Tensor:
        """The server's new x for one tensor of the group's aggregate: what the group's members receive."""
        slots = self.state.setdefault(group, {})
        if key not in slots:
            slots[key] = {"x": agg.clone(), "t": torch.tensor(0)}
            return agg
        s, rule = slots[key], self.rule
        shape = torch.Size(max(a, b) for a, b in zip(agg.shape, s["x"].shape))
        x, agg = _padded(s["x"], shape), _padded(agg, shape)
        t = int(s["t"]) + 1
        if rule.name == "avgm":
            x, v = avgm_step(x, agg, _padded(s["v"], shape) if "v" in s else None, lr=rule.lr, momentum=rule.momentum)
            slots[key] = {"x": x, "v": v, "t": torch.tensor(t)}
        else:
            zero = torch.zeros_like(x)
            x, m, v = adaptive_step(rule, x, agg, _padded(s.get("m", zero), shape), _padded(s.get("v", zero), shape),
                                    t)
            slots[key] = {"x": x, "m": m, "v": v, "t": torch.tensor(t)}
        return x.clone()

    def tensors(self) -> dict[str, Tensor]:
        """Every group's state as flat tensors `<group>/<key>/<slot>` (for a checkpoint)."""
        return {f"{group}/{key}/{slot}": value for group, keys in self.state.items()
                for key, slots in keys.items() for slot, value in slots.items()}

    def load(self, tensors: dict[str, Tensor]) -> None:
        """Take up the state `tensors` wrote (empty: a fresh start)."""
        self.state = {}
        for name, value in tensors.items():
            group, rest = name.split("/", 1)
            key, slot = rest.rsplit("/", 1)
            self.state.setdefault(group, {}).setdefault(key, {})[slot] = value
