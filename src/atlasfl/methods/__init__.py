"""The federated methods, one small class each (`methods.base.Method`); adding one is a module here, its import
and its line in METHODS."""
from __future__ import annotations

from atlasfl.methods.atlas import Atlas
from atlasfl.methods.atlas_no_laplacian import AtlasNoLaplacian
from atlasfl.methods.base import Method
from atlasfl.methods.cfl import CFL
from atlasfl.methods.ditto import Ditto
from atlasfl.methods.fedavg_cluster import FedAvgCluster
from atlasfl.methods.fedprox import FedProx
from atlasfl.methods.fedrep import FedRep
from atlasfl.methods.fedsa_lora import FedSALoRA
from atlasfl.methods.ffa_lora import FFALoRA
from atlasfl.methods.flexlora import FlexLoRA
from atlasfl.methods.flora import FLoRA
from atlasfl.methods.hetlora import HetLoRA
from atlasfl.methods.ifca import IFCA
from atlasfl.methods.local_only import LocalOnly
from atlasfl.methods.standard_fl import StandardFL

# Baselines first, atlas last: the order of help texts and report tables.
METHODS: dict[str, type[Method]] = {m.name: m for m in (
    LocalOnly,
    StandardFL,
    FedAvgCluster,
    FedProx,
    FFALoRA,
    FedSALoRA,
    FlexLoRA,
    HetLoRA,
    IFCA,
    CFL,
    FLoRA,
    FedRep,
    Ditto,
    AtlasNoLaplacian,
    Atlas,
)}


def method_for(cfg) -> Method:
    """The method object of a run config."""
    return METHODS[cfg.method](cfg)


def method_settings() -> dict:
    """Every method's own settings, for `config.RunConfig`; a name two methods declare must be declared alike."""
    out: dict = {}
    for method in METHODS.values():
        for name, declaration in method.settings.items():
            if name in out and out[name] is not declaration:
                raise TypeError(f"setting {name!r} is declared by two methods")
            out[name] = declaration
    return out


def second_look_applies(cfg) -> bool:
    """A run the second look (`phases.second_look`) can serve: its groups are phase 1's discovered clusters
    (`Method.clusters_from`) and its clients upload B, the update's geometry (`fedsa_lora` sends A alone, whose
    start the server never holds)."""
    method = METHODS[cfg.method]
    return (cfg.clusters == "fingerprint" and method.clusters_from(cfg.model_dump()) == "phase 1"
            and "lora_B" in method.uploads)
