"""The memory model (an estimate) against a measured peak: one LoRA training step on a small BERT on CPU.

Measured in a fresh subprocess as the growth of peak RSS over one forward/backward/AdamW step, so the
numbers are the process's own and nothing else's."""
from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import json, resource, torch
from atlasfl.models.registry import _make_config
from atlasfl.models.lora import FederatedLoRAModel
from atlasfl.models.registry import Backbone
from atlasfl.phases.devices import estimate_training_memory
from atlasfl.phases.ranks import adapter_params
from transformers import AutoModel
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = _make_config(dict(model_type="bert", vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=1024, max_position_embeddings=512))
model = AutoModel.from_config(cfg).requires_grad_(False)
fm = FederatedLoRAModel(Backbone("probe", model, None, "bert", "random"), alpha=16, dropout=0.0, seed=0)
ranks = {m: 8 for m in fm.modules}
fm.add_client(0, ranks, 2)
batch, seq = 48, 128
data = dict(input_ids=torch.randint(0, 1000, (batch, seq)), attention_mask=torch.ones(batch, seq, dtype=torch.long))
labels = torch.randint(0, 2, (batch,))
fm.activate(0, train=True)
params = fm.trainable_parameters(0)
opt = torch.optim.AdamW(params, lr=1e-3)
def step(n):  # a warm-up step first, so library code and allocator pools loaded on first use are not counted
    loss = torch.nn.functional.cross_entropy(fm.logits(0, {k: v[:n] for k, v in data.items()}), labels[:n])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
step(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
step(batch)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
est = estimate_training_memory(fm.facts(), batch_size=batch, seq_len=seq,
                               lora_params=adapter_params(ranks, fm.module_shapes()), head_params=256 * 2 + 2)
print(json.dumps(dict(measured=after - before, estimate=est["total_estimate"] - est["frozen_weights"])))
"""


def test_memory_estimate_is_within_a_factor_of_the_measured_step_peak():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = figures["estimate"] / figures["measured"]
    # The RSS high-water mark of the same step varied between 532 and 898 MB across runs on this
    # machine (allocator state), so the band is wide: an estimate off by more than 2x fails.
    assert 0.6 <= ratio <= 2.0, figures
