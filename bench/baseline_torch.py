"""A PyTorch re-creation of the reference LAMP training and evaluation loops (the baseline).

Written by us from the paper and the reference's description (DRSY/LAMP), used only to time
lamp-jax against the same algorithm on the same machine. What the reference does, and so what
this does, per training step:

    for each relation r (one after another):
        masks_r = hard threshold (straight-through) or concrete sample of r's logits
        weight surgery: every pruned Linear's weight := frozen weight * masks_r
        forward + backward on r's batch, clip r's logit gradients at norm 5,
        Adam step with r's own optimiser, step r's own linear warmup/decay scheduler
        restore: reload the full frozen state dict

Evaluation runs one prompt at a time with the relation's hard masks applied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# Our matrix names -> the BertForMaskedLM Linear inside encoder layer i.
HF_LINEARS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, threshold_logit):
        return (logits > threshold_logit).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def relation_masks(logits: dict[str, torch.Tensor], mode: str, tau: float = 0.1,
                   threshold: float = 0.5) -> dict[str, torch.Tensor]:
    t = math.log(threshold / (1 - threshold))
    if mode == "deterministic":
        return {k: _StraightThrough.apply(g, t) for k, g in logits.items()}
    if mode == "threshold":
        return {k: (g > t).to(g.dtype) for k, g in logits.items()}
    out = {}
    for k, g in logits.items():
        u = torch.rand_like(g).clamp(1e-6, 1 - 1e-6)
        out[k] = torch.sigmoid((g + torch.log(u) - torch.log1p(-u)) / tau)
    return out


def linear_warmup_decay(total: int, warmup_fraction: float):
    """The same schedule as lamp_jax.training.linear_warmup_decay, as a LambdaLR factor."""
    warmup = max(math.ceil(warmup_fraction * total), 1)
    decay = max(total - warmup, 1)
    return lambda k: (k + 1) / warmup if k < warmup else max(0.0, (total - k) / decay)


class ReferenceLAMP:
    """The reference algorithm over a ``transformers.BertForMaskedLM``."""

    def __init__(self, model: nn.Module, relations: int, layers: Sequence[int],
                 matrices: Sequence[str], init_logits: list[dict[str, torch.Tensor]] | None = None,
                 lr: float = 3e-4, total_steps: int = 100, warmup_fraction: float = 0.2,
                 clip_norm: float = 5.0, eps: float = 1e-8, mode: str = "deterministic"):
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.frozen_state = {k: v.clone() for k, v in model.state_dict().items()}
        self.linears = {f"{i}/{m}": model.get_submodule(f"bert.encoder.layer.{i}.{HF_LINEARS[m]}")
                        for i in layers for m in matrices}
        self.mode, self.clip_norm = mode, clip_norm
        self.logits, self.optimizers, self.schedulers = [], [], []
        for r in range(relations):
            if init_logits is None:
                g = {k: nn.Parameter(torch.zeros_like(lin.weight)) for k, lin in
                     self.linears.items()}
            else:
                g = {k: nn.Parameter(v.clone()) for k, v in init_logits[r].items()}
            opt = torch.optim.Adam(g.values(), lr=lr, eps=eps)
            self.logits.append(g)
            self.optimizers.append(opt)
            self.schedulers.append(torch.optim.lr_scheduler.LambdaLR(
                opt, linear_warmup_decay(total_steps, warmup_fraction)))

    def _surgery(self, masks: dict[str, torch.Tensor]) -> None:
        for k, lin in self.linears.items():
            frozen = lin.weight.detach()
            del lin.weight
            lin.weight = frozen * masks[k]  # a plain tensor: gradients flow to the logits

    def _restore(self) -> None:
        for lin in self.linears.values():
            shape = lin.weight.shape
            del lin.weight
            lin.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.model.load_state_dict(self.frozen_state)  # the reference's full reload

    def _logits_at_mask(self, ids, attention, mask_pos) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=attention).logits
        return out[torch.arange(ids.shape[0]), mask_pos]

    def train_step(self, batches: Sequence[dict[str, torch.Tensor]]) -> list[float]:
        """One update of every relation, one after another; ``batches[r]`` is r's batch."""
        losses = []
        for r, batch in enumerate(batches):
            self._surgery(relation_masks(self.logits[r], self.mode))
            logits = self._logits_at_mask(batch["input_ids"], batch["attention_mask"],
                                          batch["mask_pos"])
            loss = nn.functional.cross_entropy(logits, batch["obj_id"])
            self.optimizers[r].zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.logits[r].values(), self.clip_norm)
            self.optimizers[r].step()
            self.schedulers[r].step()
            self._restore()
            losses.append(float(loss))
        return losses

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[Sequence[dict[str, torch.Tensor]]],
                 subnetwork: bool = True) -> list[float]:
        """P@1 per relation, one prompt at a time (``prompts[r]`` = r's single prompts)."""
        result = []
        for r, items in enumerate(prompts):
            if subnetwork:
                self._surgery(relation_masks(self.logits[r], "threshold"))
            correct = 0
            for p in items:
                logits = self._logits_at_mask(p["input_ids"][None], p["attention_mask"][None],
                                              p["mask_pos"][None])
                correct += int(logits.argmax(-1).item() == int(p["obj_id"]))
            if subnetwork:
                self._restore()
            result.append(correct / max(len(items), 1))
        return result
