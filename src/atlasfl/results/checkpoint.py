"""Per-round checkpoints: a kill at any instant leaves the last complete one readable.

A checkpoint is a folder `checkpoints/<run name>/round-<eta index>-<round>/` with the clients'
trainable states (`states.safetensors`) and everything else needed to continue (`state.json`:
config, plan, round metrics so far, finished lambda-sweep runs, RNG states, digests). It is built
in a temporary folder and renamed into place, so it either exists whole or not at all.
The clients' optimizers are created afresh each round (see federation.training.train_local), so there are
no client moments to keep; a server optimiser's x and moments (`phases.server_optimizer`) travel in the
safetensors file under `__server__/`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from atlasfl.errors import AtlasError
from atlasfl.models.lora import state_digest

KEEP_LAST = 2
# What a checkpoint's state.json holds; 2: written by the one driver (local validation in the payload).
FORMAT = 2
TORCH_RNG_KEY = "__rng__/torch"
# The server's own tensors: "optimizer/..." (the server optimiser's), "clustering/..." (the method's clusters).
SERVER_PREFIX = "server/"
# Config keys that say where files go, how many to keep or when to give up, not what is computed: a resume
# may change them (e.g. a lower min_replies_per_group to continue a run that stopped for lack of replies).
NON_RESULT_KEYS = ("output_dir", "log_dir", "checkpoint_dir", "keep_checkpoints", "save_adapters",
                   "tensorboard", "min_replies_per_group")


def _folder_name(eta_index: int, round_idx: int) -> str:
    return f"round-{eta_index:02d}-{round_idx:04d}"


def save_checkpoint(folder: Path, *, eta_index: int, round_idx: int, states: dict[int, dict[str, torch.Tensor]],
                    payload: dict, keep: int = KEEP_LAST, server_tensors: dict[str, torch.Tensor] | None = None
                    ) -> Path:
    """Write one checkpoint atomically (temp folder + rename), then prune all but the newest `keep`;
    `server_tensors` (the method's own) come back in the loaded meta's `server_tensors`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / _folder_name(eta_index, round_idx)
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        flat = {f"{cid}/{key}": t.contiguous() for cid, state in states.items() for key, t in state.items()}
        flat[TORCH_RNG_KEY] = torch.get_rng_state()
        flat.update({SERVER_PREFIX + key: t.contiguous() for key, t in (server_tensors or {}).items()})
        save_file(flat, str(tmp / "states.safetensors"))
        meta = dict(payload, eta_index=eta_index, round=round_idx, rng=_host_rng_state())
        with open(tmp / "state.json", "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(complete_checkpoints(folder))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (their names sort by eta index, then round)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("round-"))


def clear_checkpoints(folder: Path) -> None:
    """Remove a run's old checkpoints before it starts afresh."""
    for old in complete_checkpoints(folder):
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """The checkpoint's state.json (with the server optimiser's tensors as `server_optimizer`) and per-client
    states; a damaged one is a one-line AtlasError."""
    try:
        meta = json.loads((path / "state.json").read_text())
        flat = load_file(str(path / "states.safetensors"))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise AtlasError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); delete that folder "
                         "to resume from an older one, or rerun without --resume") from None
    torch_rng = flat.pop(TORCH_RNG_KEY, None)
    if torch_rng is not None:
        meta["rng"]["torch"] = torch_rng
    meta["server_tensors"] = {name[len(SERVER_PREFIX):]: flat.pop(name) for name in list(flat)
                              if name.startswith(SERVER_PREFIX)}
    states: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        cid, key = name.split("/", 1)
        states.setdefault(int(cid), {})[key] = tensor
    return meta, states


def latest_checkpoint(cfg) -> tuple[dict, dict[int, dict[str, torch.Tensor]]] | None:
    """The newest complete checkpoint of this run (`cfg`: a RunConfig), or None (with a notice) when there is
    none; one made with other settings is refused, naming the keys that differ."""
    found = complete_checkpoints(cfg.checkpoint_path)
    if not found:
        print(f"no checkpoint of {cfg.run_name} under {cfg.checkpoint_dir}/: starting from the beginning",
              file=sys.stderr)
        return None
    meta, states = load_checkpoint(found[-1])
    why = _not_this_run(meta, cfg)
    if why:
        raise AtlasError(f"checkpoint {found[-1]} {why}; rerun with the same flags, or without --resume to start "
                         "afresh")
    return meta, states


def stale_checkpoint(cfg) -> str | None:
    """Why the newest complete checkpoint of this run cannot be resumed (another ATLAS version's, or other
    settings': an older demo's), or None when there is none or it can be."""
    found = complete_checkpoints(cfg.checkpoint_path)
    return _not_this_run(load_checkpoint(found[-1])[0], cfg) if found else None


def _not_this_run(meta: dict, cfg) -> str | None:
    if meta.get("format") != FORMAT:
        return (f"was written by an earlier version of ATLAS (format {meta.get('format', 1)}, this one reads "
                f"{FORMAT})")
    fields = type(cfg).model_fields
    defaults = type(cfg).model_construct(**{k: getattr(cfg, k) for k, f in fields.items() if f.is_required()})
    differing = config_differences(meta["config"], cfg.model_dump(mode="json"), defaults.model_dump(mode="json"))
    return f"was made with a different config ({', '.join(differing)} differ)" if differing else None


def checkpoint_label(meta: dict) -> str:
    return f"round {meta['round']}" + (f" of eta #{meta['eta_index']}" if meta["eta_index"] else "")


def checkpoint_payload(cfg, plan, rounds: list[dict], runs: list[dict], states: dict[int, dict[str, torch.Tensor]],
                       **extra) -> dict:
    """What the driver keeps beside the states: config, plan, the current eta's rounds so far, the finished
    etas' runs and the states' digests; `extra` holds the current eta's local validation and an engine's own
    bookkeeping (the Flower server's)."""
    return dict(format=FORMAT, config=cfg.model_dump(mode="json"), plan=asdict(plan), rounds=rounds,
                runs=[dict(run, val={str(c): v for c, v in run["val"].items()}) for run in runs],
                digests={str(c): state_digest(st) for c, st in states.items()},
                optimizer="AdamW is created afresh each round: no moments to keep", **extra)


def restored_runs(meta: dict) -> list[dict]:
    """The finished etas' runs of a checkpoint, client ids back to ints."""
    return [dict(run, val={int(c): v for c, v in run["val"].items()}) for run in meta["runs"]]


def config_differences(saved: dict, current: dict, defaults: dict) -> list[str]:
    """Keys whose values differ between a checkpoint's config and this run's, NON_RESULT_KEYS aside. A key the
    checkpoint lacks is an option added since it was written; every option is added off by default (the run
    without it unchanged), so it differs only where this run sets it away from its default."""
    keys = (set(saved) | set(current)) - set(NON_RESULT_KEYS)
    return sorted(k for k in keys if saved.get(k, defaults.get(k)) != current.get(k))


def _host_rng_state() -> dict:
    """Python's and numpy's global RNG states (torch's travels in the safetensors file)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=list(random.getstate()[1]), numpy=[kind, keys.tolist(), pos, has_gauss, gauss])


def restore_rng(rng: dict) -> None:
    """Put the global RNGs back as they were at the checkpoint (training also reseeds per round and client)."""
    random.setstate((3, tuple(rng["python"]), None))
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
