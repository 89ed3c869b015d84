"""Per-client frozen dense residuals on top of the shared frozen base weights, for methods that merge updates
into "the base" (`Method.keeps_residual`, e.g. FLoRA): client k's adapted module computes
base(x) + R_k x + its LoRA delta. One backbone serves every client, so a client's merged updates live here
rather than in the base weights. R_k is d_out×d_in in nn.Linear orientation, as B@A (GPT-2's Conv1D stores its
base weight transposed; the residual never is). Allocated only for the clients that need one."""
from __future__ import annotations

import torch
from torch.nn.functional import linear


def residual_key(module: str) -> str:
    """The residual's key in a client's flat state (`methods.base.part_of` calls it the 'residual' part)."""
    return f"lora::{module}::R"


class Residuals:
    """Each client's residual per adapted module (`of[cid][module]`), added to the forward of its adapter."""

    def __init__(self):
        self.of: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, cid: int, layers: dict[str, torch.nn.Module], shapes: dict[str, tuple[int, int]],
            like: torch.Tensor) -> None:
        """Zero residuals of `shapes` ((d_out, d_in) per module), on the device and in the dtype of `like`; the
        first client's call hooks the PEFT `layers` (by module name) so their forward adds residuals."""
        if not self.of:
            for module, layer in layers.items():
                layer.register_forward_hook(self._hook(module))
        self.of[cid] = {m: like.new_zeros(shape) for m, shape in shapes.items()}

    def tensors(self, cid: int) -> dict[str, torch.Tensor]:
        """The client's residuals by state key (the live tensors; none for a client without one)."""
        return {residual_key(m): t for m, t in self.of.get(cid, {}).items()}

    def add_to(self, output: torch.Tensor, x: torch.Tensor, cid: int, module: str) -> torch.Tensor:
        """`output` plus R x for the client's residual of `module` (unchanged without one)."""
        R = self.of.get(cid, {}).get(module)
        return output if R is None else output + linear(x.to(R.dtype), R).to(output.dtype)

    def _hook(self, module: str):
        """A forward hook for the PEFT layer of `module`: adds the residual of its active adapter (none while PEFT's
        adapters are disabled, or with no adapter active, as in `FederatedLoRAModel.training_together`)."""
        def add_active(layer, args, output):
            if layer.disable_adapters:
                return output
            for name in layer.active_adapters:
                output = self.add_to(output, args[0], int(name[1:]), module)  # adapter c<k>: client k
            return output
        return add_active
