"""A PyTorch re-creation of the reference LAMP training and evaluation loops (the baseline).

Written by us from the paper and the reference code (DRSY/LAMP: ``model.py``, ``probe.py``,
``utils.py``), used only to time lamp-jax against the same algorithm on the same machine. What
the reference does, and so what this does:

Training, per step, for each relation r one after another (``probe.probing`` +
``SelfMaskingModel.feed_batch_straight_through`` / ``feed_batch``)::

    r's optimiser.zero_grad()
    masks = hard threshold of sigmoid(G_r) with a straight-through estimator
            (or a binary-concrete sample at tau = 0.1 in the stochastic mode)
    weight surgery: torch.nn.utils.prune re-parametrises every pruned Linear as
                    weight_orig * mask (a forward pre-hook recomputes it on every call)
    forward with MLM labels (-100 everywhere but [MASK]), backward
    clip r's logit gradients at global norm 5
    restore: prune.remove on every pruned Linear, then load the full frozen state dict
    r's Adam step, r's linear warmup/decay scheduler step

Evaluation (``probe.validate``), one prompt at a time: for every prompt, build the hard masks of
its relation, do the surgery, run the pruned model, restore (full state-dict reload), then run
the full model on the same prompt. ``surgery="per_relation"`` is a kinder variant that prunes
once per relation instead of once per prompt; the benchmarks report both.

The model is loaded as the reference loads it, with ``output_hidden_states=True`` and
``output_attentions=True`` (which needs the eager attention implementation). Tokenisation and
string decoding, which the reference also does per prompt, are left out: both sides get token
ids, and predictions are compared by id.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

# Our matrix names -> the BertForMaskedLM Linear inside encoder layer i.
HF_LINEARS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}


class GivenMaskPruning(prune.BasePruningMethod):
    """The reference's ``FoobarPruning``: a pruning method whose mask is given, not computed."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.given_mask = mask

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return self.given_mask


def straight_through_masks(logits: Sequence[torch.Tensor], threshold: float = 0.5
                           ) -> list[torch.Tensor]:
    """The reference's ``feed_batch_straight_through`` masks: hard forward, identity backward."""
    out = []
    for g in logits:
        probs = torch.sigmoid(g)
        probs[probs > threshold] = 1
        probs[probs <= threshold] = 0
        out.append((probs - g).detach() + g)
    return out


def concrete_masks(logits: Sequence[torch.Tensor], tau: float = 0.1) -> list[torch.Tensor]:
    """The reference's ``bernoulli_soft_sampler`` (its tau is hard-coded to 0.1)."""
    out = []
    for g in logits:
        u = torch.rand(g.shape, device=g.device)
        out.append(torch.sigmoid((g + torch.log(u) - torch.log(1 - u)) / tau))
    return out


@torch.no_grad()
def hard_masks(logits: Sequence[torch.Tensor], threshold: float = 0.5) -> list[torch.Tensor]:
    """The reference's evaluation masks (``use_expectation=False``): 1[sigmoid(G) > t]."""
    out = []
    for g in logits:
        probs = torch.sigmoid(g)
        probs[probs > threshold] = 1
        probs[probs <= threshold] = 0
        out.append(probs)
    return out


def hf_linear_warmup_decay(total: int, warmup_fraction: float) -> Callable[[int], float]:
    """``transformers.get_linear_schedule_with_warmup`` (the reference's scheduler)."""
    warmup = warmup_fraction * total

    def factor(k: int) -> float:
        if k < warmup:
            return k / max(1.0, warmup)
        return max(0.0, (total - k) / max(1.0, total - warmup))

    return factor


def lamp_jax_warmup_decay(total: int, warmup_fraction: float) -> Callable[[int], float]:
    """lamp_jax.optim.linear_warmup_decay as a LambdaLR factor (for the equivalence test:
    Hugging Face's schedule spends its first update at lr 0, ours does not)."""
    warmup = max(math.ceil(warmup_fraction * total), 1)
    decay = max(total - warmup, 1)
    return lambda k: (k + 1) / warmup if k < warmup else min(1.0, max(0.0, (total - k) / decay))


SCHEDULES = {"reference": hf_linear_warmup_decay, "lamp_jax": lamp_jax_warmup_decay}


def reference_bert(config_kwargs: dict[str, Any]) -> nn.Module:
    """A randomly initialised ``BertForMaskedLM`` configured as the reference loads its model."""
    import transformers

    config = transformers.BertConfig(output_hidden_states=True, output_attentions=True,
                                     **config_kwargs)
    config._attn_implementation = "eager"  # output_attentions needs the attention probabilities
    return transformers.BertForMaskedLM(config)


def mlm_labels(input_ids: torch.Tensor, mask_pos: torch.Tensor, obj_id: torch.Tensor
               ) -> torch.Tensor:
    """The reference collator's labels: -100 everywhere except the object at [MASK]."""
    labels = torch.full_like(input_ids, -100)
    labels[torch.arange(input_ids.shape[0], device=input_ids.device), mask_pos] = obj_id
    return labels


class ReferenceLAMP:
    """The reference algorithm over a ``transformers.BertForMaskedLM``.

    ``init_logits[r]`` maps ``"<layer>/<matrix>"`` to r's initial logits in torch's
    ``[out, in]`` layout; by default they start at 0 (any value times the same FLOPs).
    """

    def __init__(self, model: nn.Module, relations: int, layers: Sequence[int],
                 matrices: Sequence[str], init_logits: list[dict[str, torch.Tensor]] | None = None,
                 lr: float = 3e-4, total_steps: int = 100, warmup_fraction: float = 0.2,
                 clip_norm: float = 5.0, eps: float = 1e-8, mode: str = "deterministic",
                 schedule: str = "reference", surgery: str = "per_prompt"):
        if mode not in ("deterministic", "stochastic"):
            raise ValueError(f"mode must be deterministic or stochastic, not {mode!r}")
        if surgery not in ("per_prompt", "per_relation"):
            raise ValueError(f"surgery must be per_prompt or per_relation, not {surgery!r}")
        self.model = model.eval()  # the reference freezes the model and runs it in eval mode
        for p in model.parameters():
            p.requires_grad_(False)
        self.frozen_state = {k: v.clone() for k, v in model.state_dict().items()}
        self.keys = [f"{i}/{m}" for i in layers for m in matrices]
        self.linears = [model.get_submodule(f"bert.encoder.layer.{k.split('/')[0]}."
                                            f"{HF_LINEARS[k.split('/')[1]]}") for k in self.keys]
        self.mode, self.clip_norm, self.surgery = mode, clip_norm, surgery
        self.logits: list[list[nn.Parameter]] = []
        self.optimizers, self.schedulers = [], []
        device = next(model.parameters()).device
        for r in range(relations):
            if init_logits is None:
                g = [nn.Parameter(torch.zeros_like(lin.weight)) for lin in self.linears]
            else:
                g = [nn.Parameter(init_logits[r][k].clone().to(device)) for k in self.keys]
            opt = torch.optim.Adam(g, lr=lr, eps=eps)
            self.logits.append(g)
            self.optimizers.append(opt)
            self.schedulers.append(torch.optim.lr_scheduler.LambdaLR(
                opt, SCHEDULES[schedule](total_steps, warmup_fraction)))

    def logits_of(self, relation: int) -> dict[str, torch.Tensor]:
        """Relation r's current logits by ``"<layer>/<matrix>"`` (torch layout ``[out, in]``)."""
        return dict(zip(self.keys, self.logits[relation], strict=True))

    def prune(self, masks: Sequence[torch.Tensor]) -> None:
        for lin, mask in zip(self.linears, masks, strict=True):
            GivenMaskPruning.apply(lin, "weight", mask=mask)

    def restore(self) -> None:
        for lin in self.linears:
            prune.remove(lin, "weight")
        self.model.load_state_dict(self.frozen_state)  # the reference's full reload

    def train_step(self, batches: Sequence[dict[str, torch.Tensor]]) -> list[float]:
        """One update of every relation, one after another; ``batches[r]`` holds r's
        ``input_ids``, ``attention_mask`` and ``labels`` (see :func:`mlm_labels`)."""
        losses = []
        for r, batch in enumerate(batches):
            self.optimizers[r].zero_grad()
            if self.mode == "deterministic":
                masks = straight_through_masks(self.logits[r])
            else:
                masks = concrete_masks(self.logits[r])
            self.prune(masks)
            loss = self.model(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            loss.backward()
            nn.utils.clip_grad_norm_(self.logits[r], max_norm=self.clip_norm)
            self.restore()
            losses.append(loss.detach().item())
            self.optimizers[r].step()
            self.schedulers[r].step()
        return losses

    @torch.no_grad()
    def _top_ids(self, prompt: dict[str, torch.Tensor], k: int = 5) -> list[int]:
        """The reference's ``utils.LAMA``: top-k at [MASK] of one prompt (ids, not strings)."""
        logits = self.model(input_ids=prompt["input_ids"][None],
                            attention_mask=prompt["attention_mask"][None]).logits
        probs = torch.softmax(logits[0, prompt["mask_pos"]], dim=-1)
        return torch.topk(probs, k=k).indices.tolist()

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[Sequence[dict[str, torch.Tensor]]]
                 ) -> tuple[list[float], list[float]]:
        """P@1 per relation of (its subnetwork, the full model), one prompt at a time.

        ``prompts[r]`` is relation r's list of single prompts (``input_ids``,
        ``attention_mask``, ``mask_pos``, ``obj_id``).
        """
        pruned, full = [], []
        for r, items in enumerate(prompts):
            hits_pruned = hits_full = 0
            if self.surgery == "per_relation":
                self.prune(hard_masks(self.logits[r]))
                hits_pruned = sum(self._top_ids(p)[0] == int(p["obj_id"]) for p in items)
                self.restore()
                hits_full = sum(self._top_ids(p)[0] == int(p["obj_id"]) for p in items)
            else:
                for p in items:
                    self.prune(hard_masks(self.logits[r]))
                    hits_pruned += self._top_ids(p)[0] == int(p["obj_id"])
                    self.restore()
                    hits_full += self._top_ids(p)[0] == int(p["obj_id"])
            pruned.append(hits_pruned / max(len(items), 1))
            full.append(hits_full / max(len(items), 1))
        return pruned, full
