"""The strong PyTorch peer: LAMP as a capable PyTorch user would write it in 2026.

``baseline_torch.py`` re-creates the reference's loop (relations one after another, weight
surgery, a state-dict reload per relation and step, one prompt at a time in evaluation). This
module is the other yardstick: the same algorithm as lamp-jax, written for speed in PyTorch,
so that lamp-jax's speed is measured against the strongest peer, not the weakest. It is our own
code, a bench/test-only dependency; ``lamp_jax`` never imports torch.

What makes it strong (each is what lamp-jax does too, or more):

* **One relation axis.** All mask logits live in ONE flat ``[R, P]`` float32 buffer (P = the
  masked weights of one relation), and so do their gradient and Adam's moments; each masked
  matrix is made from its columns as an ``[R, in, out]`` tensor, and the masked layers run as
  batched matmuls (``torch.baddbmm``, bias included). The gradient clipping norm and Adam are
  then each one op over ``[R, P]`` instead of one per matrix and relation.
* **Q, K and V as one matmul**: their logits and frozen weights are stored side by side
  (``[in, 3 * out]``), so one mask op and one ``baddbmm`` cover the three.
* **Frozen prefix cached**: the embeddings and the frozen layers below the lowest masked one run
  once per prompt (:meth:`PeerLAMP.prefix`), like ``lamp_jax/prefix.py``.
* **The last layer and the MLM head only at [MASK]**: every row still serves as a key and value
  of the last layer's attention; queries, attention output, FFN and the head run on the [MASK]
  row only.
* **Masks fused with the weights**: the straight-through hard threshold is a
  ``torch.autograd.Function`` that turns the flat logits into one masked ``[R, in, out]`` weight
  per matrix (``1[G > logit(t)]`` written straight into the weights' dtype, times W: no mask
  tensor kept) and whose backward is ``grad * W`` (identity through the threshold, lamp-jax's
  default ``ste_grad``) or ``grad * W * sigmoid'(G)``, written per matrix into one ``[R, P]``
  gradient buffer (no split/cat pass); the binary-concrete sample ``sigmoid((G + log(u / (1 -
  u))) / tau)`` is a Function of its own that keeps only the sample for its backward.
* **CPU details a profiler shows**: matmul attention instead of the fused CPU kernel at these
  short prompts, no ``torch.where`` over ``[R, P]`` (10x slower than a comparison and a
  product on the CPU), and :func:`keep_one_heap` in the benchmark processes (glibc otherwise
  maps and zeroes every large tensor afresh in every step).
* **Optimiser**: per-relation clipping by each relation's global norm (one norm over ``[R, P]``)
  and Adam with per-relation state and per-relation linear warmup/decay, exactly as
  ``lamp_jax.step.relation_update``. Eager: ``torch._fused_adam_``, the kernel behind
  ``torch.optim.Adam(fused=True)``, called once per relation on its row of the buffers:
  torch's optimisers take one learning rate per parameter group, and the flat buffer's rows are
  not parameters of their own; calling the op directly gives each relation its own learning
  rate and step count, folds the clipping into the kernel's ``grad_scale`` (no extra pass over
  the gradient) and skips relations without data or with a non-finite loss or gradient through
  its ``found_inf`` (as lamp-jax keeps their state). One pass over logits, gradient and moments.
  Compiled: the same update as plain tensor math over ``[R, P]``, which Inductor fuses into one
  kernel (plus the norm's reduction).
* ``torch.compile`` of the forward (mask formation included; its backward is compiled by
  AOTAutograd) and of the update, or eager; :class:`PeerLAMP` takes ``compile=``.

The model is a post-LayerNorm BERT (exact GELU, tied or untied decoder), loaded from lamp-jax's
Flax parameter tree (:meth:`PeerWeights.from_flax`) or random (:meth:`PeerWeights.random`).
Masks cover all six matrices of a contiguous range of layers (the paper's setting and every
benchmark's). Evaluation (:meth:`PeerLAMP.rank_stats`) ranks a batch of every relation's
prompts with threshold masks (binary subnetworks) or with the full model; rank = 1 + the number
of tokens scored strictly higher, as ``lamp_jax.ranking`` counts it.
``tests/test_bench_peer.py`` checks losses, gradients, one optimiser step and ranks against
lamp-jax.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lamp_jax.models import FAMILIES

MATRICES = FAMILIES["bert"].matrices  # short name -> path inside a layer

# The masked matrices of one layer, in the order of the flat buffer: Q, K and V side by side as
# one [H, 3H] matrix, then the attention output and the FFN. Their paths in lamp-jax's
# parameter tree, which the peer reads its weights from, are lamp-jax's own table.
SEGMENTS = ("qkv", "attn_out", "ffn_in", "ffn_out")
MODES = ("deterministic", "stochastic")


@dataclasses.dataclass(frozen=True)
class PeerShape:
    """A BERT's architecture (``bench.common.SIZES`` entries minus ``layers`` fit it)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12

    def segment_shapes(self) -> dict[str, tuple[int, int]]:
        """``[in, out]`` of each masked segment of one layer, in buffer order."""
        h, f = self.hidden_size, self.intermediate_size
        return {"qkv": (h, 3 * h), "attn_out": (h, h), "ffn_in": (h, f), "ffn_out": (f, h)}

    def masked_size(self, layers: Sequence[int]) -> int:
        """P: the masked weights of one relation."""
        return len(layers) * sum(a * b for a, b in self.segment_shapes().values())


@dataclasses.dataclass
class LayerWeights:
    """One encoder layer's frozen tensors (kernels ``[in, out]``)."""

    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    o_w: torch.Tensor
    o_b: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    in_w: torch.Tensor
    in_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor

    def kernel(self, segment: str) -> torch.Tensor:
        return {"qkv": self.qkv_w, "attn_out": self.o_w, "ffn_in": self.in_w,
                "ffn_out": self.out_w}[segment]


@dataclasses.dataclass
class PeerWeights:
    """The frozen model: embeddings, layers, MLM head (decoder ``[V, H]``, tied or not)."""

    shape: PeerShape
    word: torch.Tensor
    position: torch.Tensor
    token_type0: torch.Tensor
    emb_ln_w: torch.Tensor
    emb_ln_b: torch.Tensor
    layers: list[LayerWeights]
    head_w: torch.Tensor
    head_b: torch.Tensor
    head_ln_w: torch.Tensor
    head_ln_b: torch.Tensor
    decoder: torch.Tensor
    decoder_b: torch.Tensor

    def to(self, device: str | torch.device, dtype: torch.dtype) -> PeerWeights:
        """Every tensor on ``device`` in the compute ``dtype`` (lamp-jax keeps its frozen
        weights in the compute dtype too)."""
        move = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {k: move(v) for k, v in fields.items() if isinstance(v, torch.Tensor)}
        out["layers"] = [LayerWeights(**{f.name: move(getattr(lw, f.name))
                                         for f in dataclasses.fields(lw)})
                         for lw in self.layers]
        return PeerWeights(shape=self.shape, **out)

    @classmethod
    def from_flax(cls, params: Mapping[str, Any], shape: PeerShape) -> PeerWeights:
        """From lamp-jax's Flax tree (``lamp_jax.models.bert.modeling`` names, BERT family: absolute
        positions, token type 0), float32 on the CPU."""
        t = lambda x: torch.from_numpy(np.array(x, dtype=np.float32))  # noqa: E731
        emb = params["embeddings"]
        layers = []
        for i in range(shape.num_layers):
            p = params[f"layer_{i}"]
            att = p["attention"]
            layers.append(LayerWeights(
                qkv_w=torch.cat([t(att[m]["kernel"]) for m in ("query", "key", "value")], 1),
                qkv_b=torch.cat([t(att[m]["bias"]) for m in ("query", "key", "value")]),
                o_w=t(att["output"]["kernel"]), o_b=t(att["output"]["bias"]),
                ln1_w=t(p["attention_norm"]["scale"]), ln1_b=t(p["attention_norm"]["bias"]),
                in_w=t(p["ffn_in"]["kernel"]), in_b=t(p["ffn_in"]["bias"]),
                out_w=t(p["ffn_out"]["kernel"]), out_b=t(p["ffn_out"]["bias"]),
                ln2_w=t(p["ffn_norm"]["scale"]), ln2_b=t(p["ffn_norm"]["bias"])))
        head = params["mlm_head"]
        word = t(emb["word_embeddings"]["embedding"])
        decoder = t(head["decoder"]["kernel"]).T.contiguous() if "decoder" in head else word
        return cls(shape=shape, word=word, position=t(emb["position_embeddings"]["embedding"]),
                   token_type0=t(emb["token_type_embeddings"]["embedding"])[0],
                   emb_ln_w=t(emb["layer_norm"]["scale"]), emb_ln_b=t(emb["layer_norm"]["bias"]),
                   layers=layers, head_w=t(head["transform"]["kernel"]),
                   head_b=t(head["transform"]["bias"]), head_ln_w=t(head["layer_norm"]["scale"]),
                   head_ln_b=t(head["layer_norm"]["bias"]), decoder=decoder,
                   decoder_b=t(head["bias"]))

    @classmethod
    def random(cls, shape: PeerShape, seed: int = 0) -> PeerWeights:
        """Random weights of the right shapes (timing does not depend on their values): kernels
        normal with std 1/sqrt(in) as Flax's ``lecun_normal``, biases 0, embeddings N(0, 1)."""
        gen = torch.Generator().manual_seed(seed)
        h, f, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size

        def kernel(a: int, b: int) -> torch.Tensor:
            return torch.randn(a, b, generator=gen) / math.sqrt(a)

        zeros, ones = torch.zeros, torch.ones
        layers = [LayerWeights(qkv_w=kernel(h, 3 * h), qkv_b=zeros(3 * h), o_w=kernel(h, h),
                               o_b=zeros(h), ln1_w=ones(h), ln1_b=zeros(h), in_w=kernel(h, f),
                               in_b=zeros(f), out_w=kernel(f, h), out_b=zeros(h), ln2_w=ones(h),
                               ln2_b=zeros(h)) for _ in range(shape.num_layers)]
        word = torch.randn(v, h, generator=gen)
        return cls(shape=shape, word=word,
                   position=torch.randn(shape.max_position_embeddings, h, generator=gen),
                   token_type0=torch.randn(h, generator=gen), emb_ln_w=ones(h),
                   emb_ln_b=zeros(h), layers=layers, head_w=kernel(h, h), head_b=zeros(h),
                   head_ln_w=ones(h), head_ln_b=zeros(h), decoder=word, decoder_b=zeros(v))


def keep_one_heap() -> bool:
    """glibc malloc: one arena, no ``mmap`` for large blocks, no trimming (what
    ``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``
    sets, from inside the process). Call it before torch starts its threads. False where there
    is no glibc.

    Why: PyTorch's CPU allocator takes every large tensor from malloc, and glibc maps each one
    fresh and unmaps it on free, so every step's masked weights and gradients are zeroed by the
    kernel page by page on first touch: small config, 2-core CPU, eager peer step 41.0 ms with
    7.5 K page faults and 14 ms of system time per step, 29.0 ms with none. A capable user who
    profiles sees it (``bench/README.md`` has the same story for lamp-jax's large models)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    return bool(mallopt(m_arena_max, 1) and mallopt(m_mmap_max, 0)
                and mallopt(m_trim_threshold, 2**31 - 1))


# --- the flat [R, P] layout and lamp-jax's mask-logit tree ---------------------------------------


def flat_from_tree(tree: Mapping[str, Any], layers: Sequence[int]) -> np.ndarray:
    """lamp-jax's mask-logit tree (leaves ``[R, in, out]``) -> the peer's ``[R, P]`` layout
    (also for the noise ``u`` of the stochastic masks, drawn per leaf)."""
    def leaf(i: int, name: str) -> np.ndarray:
        node = tree[f"layer_{i}"]
        for key in MATRICES[name]:
            node = node[key]
        return np.asarray(node, dtype=np.float32)

    parts = []
    for i in layers:
        qkv = np.concatenate([leaf(i, m) for m in ("query", "key", "value")], axis=-1)
        for block in (qkv, leaf(i, "attn_out"), leaf(i, "ffn_in"), leaf(i, "ffn_out")):
            parts.append(block.reshape(block.shape[0], -1))
    return np.concatenate(parts, axis=1)


def tree_from_flat(flat: np.ndarray, layers: Sequence[int], shape: PeerShape
                   ) -> dict[str, Any]:
    """The inverse of :func:`flat_from_tree`: ``[R, P]`` -> lamp-jax's tree of ``[R, in, out]``
    numpy leaves."""
    flat = np.asarray(flat)
    r, h, at, tree = flat.shape[0], shape.hidden_size, 0, {}
    for i in layers:
        layer: dict[str, Any] = {}
        for seg, (a, b) in shape.segment_shapes().items():
            block = flat[:, at:at + a * b].reshape(r, a, b)
            at += a * b
            names = {"qkv": ("query", "key", "value")}.get(seg, (seg,))
            for k, name in enumerate(names):
                node = layer
                *path, last = MATRICES[name]
                for key in path:
                    node = node.setdefault(key, {})
                node[last] = block[..., k * h:(k + 1) * h] if seg == "qkv" else block
        tree[f"layer_{i}"] = layer
    if at != flat.shape[1]:
        raise ValueError(f"[R, {flat.shape[1]}] is not the layout of layers {list(layers)}")
    return tree


# --- masks fused with the frozen weights --------------------------------------------------------


def hard_masked(logits: torch.Tensor, weights: torch.Tensor, cut: float) -> torch.Tensor:
    """``W * 1[G > cut]`` (``G > logit(t)`` is ``sigmoid(G) > t`` without rounding at the
    boundary, as lamp-jax computes it), ``[R, P]`` in the weights' dtype.

    Eager, the comparison writes 0/1 straight into the output's dtype (``out=``) and the
    product is in place: two light passes. ``torch.where(G > cut, W, 0)`` took 6.5 ms for the
    small config's [8, 393216] on the 2-core CPU against 0.55 ms for these two (torch 2.13);
    under ``torch.compile`` Inductor fuses the plain expression into one pass."""
    if torch.compiler.is_compiling():
        return (logits > cut).to(weights.dtype) * weights
    out = torch.empty(logits.shape, dtype=weights.dtype, device=weights.device)
    torch.gt(logits, cut, out=out)
    return out.mul_(weights)


Layout = tuple[tuple[int, int, int], ...]  # (offset in P, in, out) of every masked matrix


def _segments(flat: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """``[R, P]`` (or ``[P]``) -> a ``[R, n]`` (``[n]``) view per matrix."""
    return [flat[..., off:off + a * b] for off, a, b in layout]


def _gradient(grads: Sequence[torch.Tensor], weights: torch.Tensor, layout: Layout,
              factors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The logits' ``[R, P]`` float32 gradient: per matrix ``grad * W`` (times ``factors``,
    the mask's derivative, where it has one), written straight into the matrix's columns of
    one buffer. Autograd's split-then-cat would write the weight gradients out once more (the
    ``cat`` took 1 ms per step at the small config, 2-core CPU); under ``torch.compile`` the
    plain ``cat`` is fused into the products by Inductor."""
    r = grads[0].shape[0]
    ws = _segments(weights, layout)
    if torch.compiler.is_compiling():
        parts = [(g.reshape(r, -1) * w).float() for g, w in zip(grads, ws, strict=True)]
        if factors is not None:
            parts = [x * f for x, f in zip(parts, factors, strict=True)]
        return torch.cat(parts, dim=1)
    out = torch.empty(r, weights.shape[0], dtype=torch.float32, device=weights.device)
    for k, (dst, g, w) in enumerate(zip(_segments(out, layout), grads, ws, strict=True)):
        torch.mul(g.reshape(r, -1), w, out=dst)
        if factors is not None:
            dst.mul_(factors[k])
    return out


class StraightThroughMaskedWeights(torch.autograd.Function):
    """``W * 1[sigmoid(G) > t]`` of every masked matrix, with a straight-through gradient.

    Forward: from the flat ``[R, P]`` logits, one ``[R, in, out]`` tensor per matrix
    (:func:`hard_masked` on its columns; no mask tensor kept). Backward: the product's gradient
    w.r.t. the mask is ``grad * W``; ``identity`` passes it through the threshold unchanged
    (lamp-jax's default ``ste_grad``), ``sigmoid`` multiplies it by ``sigmoid'(G)``. Returns
    the logits' gradient as one ``[R, P]`` buffer (:func:`_gradient`)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, weights: torch.Tensor, layout: Layout, cut: float,
                sigmoid_grad: bool) -> tuple[torch.Tensor, ...]:
        ctx.layout, ctx.sigmoid_grad = layout, sigmoid_grad
        ctx.save_for_backward(weights, logits if sigmoid_grad else None)
        r = logits.shape[0]
        return tuple(hard_masked(g, w, cut).view(r, a, b) for g, w, (_, a, b) in zip(
            _segments(logits, layout), _segments(weights, layout), layout, strict=True))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        weights, logits = ctx.saved_tensors
        factors = None
        if ctx.sigmoid_grad:
            factors = [s * (1 - s) for s in map(torch.sigmoid, _segments(logits, ctx.layout))]
        return _gradient(grads, weights, ctx.layout, factors), None, None, None, None


class ConcreteMaskedWeights(torch.autograd.Function):
    """``W * sigmoid((G + log(u / (1 - u))) / tau)`` of every masked matrix: the
    binary-concrete sample times the weights. ``u`` is uniform noise clamped to ``[1e-6, 1 -
    1e-6]`` (lamp-jax draws it in that range); ``torch.logit(u, eps)`` is the one log, and the
    rest runs in place. Keeps only the sample for its backward, ``grad * W * m (1 - m) / tau``."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, weights: torch.Tensor, noise: torch.Tensor,
                layout: Layout, tau: float) -> tuple[torch.Tensor, ...]:
        r = logits.shape[0]
        samples, outs = [], []
        for g, w, u, (_, a, b) in zip(_segments(logits, layout), _segments(weights, layout),
                                      _segments(noise, layout), layout, strict=True):
            m = torch.logit(u, eps=1e-6).add_(g).div_(tau).sigmoid_()
            samples.append(m)
            outs.append((m.to(w.dtype) * w).view(r, a, b))
        ctx.layout, ctx.tau = layout, tau
        ctx.save_for_backward(weights, *samples)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        weights, *samples = ctx.saved_tensors
        factors = [m * (1.0 - m) / ctx.tau for m in samples]
        return _gradient(grads, weights, ctx.layout, factors), None, None, None, None


# --- the forward pass ----------------------------------------------------------------------------


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x [R, N, in] @ w + b``: one batched matmul for per-relation weights ``[R, in, out]``,
    one matmul over all relations' rows for shared weights ``[in, out]``."""
    if w.dim() == 3:
        return torch.baddbmm(b, x, w)
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[-1])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
            heads: int) -> torch.Tensor:
    """``q [R, B, Q, H]``, ``k, v [R, B, L, H]``, ``key_mask [R*B, 1, 1, L]`` bool ->
    ``[R, B*Q, H]``, with the softmax in float32 whatever the compute dtype (as lamp-jax).

    On a GPU: PyTorch's fused kernel (``scaled_dot_product_attention``; flash / memory-efficient
    kernels accumulate the softmax in float32). On a CPU: two matmuls and a softmax, which beat
    the fused CPU kernel at these short prompts (forward + backward on the 2-core CPU, torch
    2.13: [128 prompts x 4 heads, L 16, 32] 2.7 vs 5.6 ms; bert-base heads at L 20 with 32
    prompts 5.0 vs 6.2 ms in float32, 4.4 vs 22.4 ms in bfloat16)."""
    r, b, nq, h = q.shape
    split = lambda t: t.reshape(r * b, t.shape[2], heads, h // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    if q.is_cuda:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(h // heads)
        scores = scores.masked_fill(~key_mask, torch.finfo(torch.float32).min)
        ctx = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    return ctx.transpose(1, 2).reshape(r, b * nq, h)


def encoder_layer(x: torch.Tensor, lw: LayerWeights, masked: dict[str, torch.Tensor] | None,
                  key_mask: torch.Tensor, shape: PeerShape, rows: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """One post-LayerNorm BERT layer. ``x [R, B, L, H]``; ``masked``: this layer's masked
    ``[R, in, out]`` weights (None: the frozen ones, shared by every relation). ``rows [R, B]``:
    compute the output only at those positions (-> ``[R, B, 1, H]``); every row still serves
    as a key and value."""
    r, b, length, h = x.shape
    w = masked or {s: lw.kernel(s) for s in SEGMENTS}
    flat = x.reshape(r, b * length, h)
    if rows is None:
        q, k, v = _linear(flat, w["qkv"], lw.qkv_b).view(r, b, length, 3 * h).split(h, dim=-1)
        resid = x
    else:
        resid = x.gather(2, rows[:, :, None, None].expand(r, b, 1, h))
        wq, wkv = w["qkv"].split((h, 2 * h), dim=-1)
        q = _linear(resid.reshape(r, b, h), wq, lw.qkv_b[:h]).view(r, b, 1, h)
        k, v = _linear(flat, wkv, lw.qkv_b[h:]).view(r, b, length, 2 * h).split(h, dim=-1)
    nq = q.shape[2]
    ctx = _attend(q, k, v, key_mask, shape.num_heads)
    eps = shape.layer_norm_eps
    y = F.layer_norm(resid.reshape(r, b * nq, h) + _linear(ctx, w["attn_out"], lw.o_b), (h,),
                     lw.ln1_w, lw.ln1_b, eps)
    ffn = _linear(F.gelu(_linear(y, w["ffn_in"], lw.in_b)), w["ffn_out"], lw.out_b)
    return F.layer_norm(y + ffn, (h,), lw.ln2_w, lw.ln2_b, eps).view(r, b, nq, h)


def mlm_head(x: torch.Tensor, fw: PeerWeights) -> torch.Tensor:
    """``x [..., H]`` at [MASK] -> float32 logits ``[..., V]`` (decoder in the compute dtype,
    the bias added in float32, as lamp-jax)."""
    h = fw.shape.hidden_size
    y = F.gelu(_linear(x.reshape(1, -1, h), fw.head_w, fw.head_b))
    y = F.layer_norm(y, (h,), fw.head_ln_w, fw.head_ln_b, fw.shape.layer_norm_eps)
    logits = (y.reshape(-1, h) @ fw.decoder.T).float() + fw.decoder_b.float()
    return logits.view(*x.shape[:-1], -1)


def forward_from(hidden: torch.Tensor, attention_mask: torch.Tensor, mask_pos: torch.Tensor,
                 fw: PeerWeights, start_layer: int,
                 masked: dict[int, dict[str, torch.Tensor]] | None) -> torch.Tensor:
    """Logits ``[R, B, V]`` at [MASK] from ``hidden [R, B, L, H]``, the output of layer
    ``start_layer - 1``; ``masked[i]``: layer i's masked weights (missing layers are frozen)."""
    r, b, length, _ = hidden.shape
    key_mask = attention_mask.reshape(r * b, 1, 1, length).bool()
    x, last = hidden, fw.shape.num_layers - 1
    for i in range(start_layer, fw.shape.num_layers):
        x = encoder_layer(x, fw.layers[i], (masked or {}).get(i), key_mask, fw.shape,
                          rows=mask_pos if i == last else None)
    return mlm_head(x[:, :, 0], fw)


def embed(input_ids: torch.Tensor, fw: PeerWeights) -> torch.Tensor:
    """BERT's embeddings (absolute positions, token type 0) of ``[..., L]`` ids."""
    length = input_ids.shape[-1]
    x = fw.word[input_ids] + fw.position[:length] + fw.token_type0
    return F.layer_norm(x, (fw.shape.hidden_size,), fw.emb_ln_w, fw.emb_ln_b,
                        fw.shape.layer_norm_eps)


# --- training and evaluation ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeerOptim:
    """lamp_jax.optim.OptimConfig's fields the peer implements (no weight decay, float32
    moments)."""

    learning_rate: float = 3e-4
    warmup_fraction: float = 0.2
    clip_norm: float | None = 5.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "linear"


def learning_rates(steps: torch.Tensor, total: torch.Tensor, peak: torch.Tensor,
                   optim: PeerOptim) -> torch.Tensor:
    """``[R]`` step sizes of update ``steps`` (0-based) out of ``total``: ``lamp_jax.step.
    linear_warmup_decay`` (warmup of ``ceil(fraction * total)`` updates whose first already
    uses ``peak / warmup``, then linear decay to 0), or ``peak`` throughout."""
    if optim.schedule == "constant":
        return peak
    if optim.schedule != "linear":
        raise ValueError(f"unknown schedule {optim.schedule!r}")
    count = steps.float()
    total = total.float().clamp(min=1.0)
    warmup = torch.ceil(optim.warmup_fraction * total).clamp(min=1.0)
    up = (count + 1.0) / warmup
    down = ((total - count) / (total - warmup).clamp(min=1.0)).clamp(0.0, 1.0)
    return peak * torch.where(count < warmup, up, down)


class PeerLAMP:
    """Mask logits, Adam state and schedule of R relations over one frozen BERT.

    ``layers``: the masked layers (contiguous; all six matrices each). ``init_logits``:
    ``[R, P]`` (:func:`flat_from_tree` of lamp-jax's), default ``value + N(0, 1)``.
    ``total_steps`` and ``peak_lr``: one value or ``[R]`` (per-relation schedules, as
    lamp-jax's per-relation ``total_steps`` and per-slot learning rate).
    """

    def __init__(self, weights: PeerWeights, relations: int, layers: Sequence[int], *,
                 mode: str = "deterministic", tau: float = 0.1, threshold: float = 0.5,
                 ste_grad: str = "identity", optim: PeerOptim = PeerOptim(),
                 total_steps: Any = 10_000, peak_lr: Any = None,
                 init_logits: np.ndarray | torch.Tensor | None = None, init_value: float = 1.0,
                 seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 compile: bool = False, compile_mode: str | None = None) -> None:
        layers = tuple(layers)
        if mode not in MODES or ste_grad not in ("identity", "sigmoid"):
            raise ValueError(f"mode {mode!r} / ste_grad {ste_grad!r}")
        if list(layers) != list(range(layers[0], layers[-1] + 1)):
            raise ValueError(f"masked layers must be contiguous, not {list(layers)}")
        shape = weights.shape
        self.shape, self.layers, self.relations = shape, layers, relations
        self.mode, self.tau, self.ste_grad, self.optim = mode, tau, ste_grad, optim
        self.cut = math.log(threshold) - math.log1p(-threshold)  # logit(t)
        self.device, self.dtype = torch.device(device), dtype
        self.fw = weights.to(device, dtype)
        # The frozen weights of every masked matrix, flat in buffer order: the masks multiply
        # them in one op over [R, P].
        self.w_flat = torch.cat([self.fw.layers[i].kernel(s).reshape(-1) for i in layers
                                 for s in SEGMENTS])
        self.sizes = [a * b for _ in layers for a, b in shape.segment_shapes().values()]
        offsets = np.cumsum([0, *self.sizes[:-1]]).tolist()
        self.layout: Layout = tuple((off, a, b) for off, (a, b) in zip(
            offsets, [ab for _ in layers for ab in shape.segment_shapes().values()],
            strict=True))
        p = shape.masked_size(layers)
        f32 = dict(device=self.device, dtype=torch.float32)
        if init_logits is None:
            gen = torch.Generator().manual_seed(seed)
            init_logits = init_value + torch.randn(relations, p, generator=gen)
        self.logits = torch.as_tensor(init_logits, **f32).clone().requires_grad_(True)
        if self.logits.shape != (relations, p):
            raise ValueError(f"init logits {tuple(self.logits.shape)}, need {(relations, p)}")
        self.exp_avg = torch.zeros(relations, p, **f32)
        self.exp_avg_sq = torch.zeros(relations, p, **f32)
        self.steps = torch.zeros(relations, **f32)  # updates applied (float: Adam's step count)
        self.total = torch.broadcast_to(torch.as_tensor(total_steps, **f32), (relations,)).clone()
        peak = optim.learning_rate if peak_lr is None else peak_lr
        self.peak = torch.broadcast_to(torch.as_tensor(peak, **f32), (relations,)).clone()
        self.compiled = compile
        self._loss_fn = self._losses
        self._update_fn = self._fused_update
        if compile:
            self._loss_fn = torch.compile(self._losses, fullgraph=True, dynamic=False,
                                          mode=compile_mode)
            self._update_fn = torch.compile(self._math_update, fullgraph=True, dynamic=False,
                                            mode=compile_mode)

    # -- data --

    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               chunk: int | None = None) -> torch.Tensor:
        """``[R, B, L]`` prompts -> ``[R, B, L, H]``: the output of the frozen layers below the
        lowest masked one, computed once per prompt (no gradient), in chunks of ``chunk``
        prompts (default as ``lamp_jax.prefix.default_chunk``: 128 on a CPU, where larger
        chunks leave the caches, 1024 on a GPU)."""
        r, b, length = input_ids.shape
        chunk = chunk or (128 if self.device.type == "cpu" else 1024)
        ids, att = input_ids.reshape(-1, length), attention_mask.reshape(-1, length)
        out = []
        with torch.no_grad():
            for s in range(0, ids.shape[0], chunk):
                x = embed(ids[s:s + chunk], self.fw).to(self.dtype)[None]
                key_mask = att[s:s + chunk].reshape(-1, 1, 1, length).bool()
                for i in range(self.layers[0]):
                    x = encoder_layer(x, self.fw.layers[i], None, key_mask, self.shape)
                out.append(x[0])
        return torch.cat(out).view(r, b, length, -1)

    def batch(self, data: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """``[R, B, ...]`` numpy arrays (``bench.common.random_batch``'s keys) on the device,
        with ``hidden``, the frozen prefix."""
        dev = self.device
        t = {k: torch.as_tensor(np.asarray(data[k]), device=dev).long()
             for k in ("input_ids", "attention_mask", "mask_pos", "obj_id")}
        t["weight"] = torch.as_tensor(np.asarray(data["weight"]), device=dev).float()
        t["hidden"] = self.prefix(t["input_ids"], t["attention_mask"])
        return t

    # -- training --

    def _split(self, flat: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        """``[R, P]`` masked weights -> per layer, ``[R, in, out]`` views (evaluation)."""
        return self._by_layer([seg.view(self.relations, a, b) for seg, (_, a, b) in zip(
            _segments(flat, self.layout), self.layout, strict=True)])

    def _by_layer(self, tensors: Sequence[torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
        it = iter(tensors)
        return {i: {s: next(it) for s in SEGMENTS} for i in self.layers}

    def _masked_weights(self, logits: torch.Tensor, noise: torch.Tensor | None
                        ) -> dict[int, dict[str, torch.Tensor]]:
        if self.mode == "deterministic":
            tensors = StraightThroughMaskedWeights.apply(logits, self.w_flat, self.layout,
                                                         self.cut, self.ste_grad == "sigmoid")
        else:
            if noise is None:
                noise = torch.rand_like(logits)
            tensors = ConcreteMaskedWeights.apply(logits, self.w_flat, noise, self.layout,
                                                  self.tau)
        return self._by_layer(tensors)

    def _losses(self, logits: torch.Tensor, noise: torch.Tensor | None, hidden: torch.Tensor,
                attention_mask: torch.Tensor, mask_pos: torch.Tensor, obj_id: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        """``[R]`` weighted mean cross-entropy of the object at [MASK], per relation."""
        masked = self._masked_weights(logits, noise)
        out = forward_from(hidden, attention_mask, mask_pos, self.fw, self.layers[0], masked)
        r, b, v = out.shape
        ce = F.cross_entropy(out.reshape(r * b, v), obj_id.reshape(-1), reduction="none")
        return (ce.view(r, b) * weight).sum(1) / weight.sum(1).clamp(min=1.0)

    def losses_and_grads(self, batch: Mapping[str, torch.Tensor],
                         noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``([R] losses, [R, P] gradient of each relation's loss w.r.t. its logits)``. The
        relations' losses are independent, so the gradient of their sum is each one's own.
        ``noise``: ``[R, P]`` uniforms for the stochastic masks (default: ``torch.rand``)."""
        self.logits.grad = None
        losses = self._loss_fn(self.logits, noise, batch["hidden"], batch["attention_mask"],
                               batch["mask_pos"], batch["obj_id"], batch["weight"])
        losses.sum().backward()
        return losses.detach(), self.logits.grad

    def train_step(self, batch: Mapping[str, torch.Tensor],
                   noise: torch.Tensor | None = None) -> torch.Tensor:
        """One update of every relation: gradient, per-relation clipping, Adam, schedule.
        Returns the ``[R]`` losses (on the device, not synchronised)."""
        losses, grad = self.losses_and_grads(batch, noise)
        counts = batch["weight"].sum(1)
        with torch.no_grad():
            self._update_fn(self.logits, grad, self.exp_avg, self.exp_avg_sq, self.steps,
                            self.total, self.peak, losses, counts)
        return losses

    def _clip_and_active(self, grad: torch.Tensor, losses: torch.Tensor, counts: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([R] clipping factor min(1, clip / norm), [R] active)``: a relation without data
        or with a non-finite loss or gradient keeps its logits and Adam state, as lamp-jax's
        ``relation_update``."""
        norm = torch.linalg.vector_norm(grad, dim=1)
        active = (counts > 0) & torch.isfinite(losses) & torch.isfinite(norm)
        if self.optim.clip_norm is None:
            return torch.ones_like(norm), active
        return (self.optim.clip_norm / norm).clamp(max=1.0), active

    def _fused_update(self, logits: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                      exp_avg_sq: torch.Tensor, steps: torch.Tensor, total: torch.Tensor,
                      peak: torch.Tensor, losses: torch.Tensor, counts: torch.Tensor) -> None:
        """Eager: ``torch._fused_adam_`` once per relation (see the module docstring)."""
        o = self.optim
        scale, active = self._clip_and_active(grad, losses, counts)
        lr = learning_rates(steps, total, peak, o)
        skip = (~active).float()
        unscale = 1.0 / scale  # the kernel divides the gradient by grad_scale
        steps.add_(active.float())  # Adam's count of the update it makes (bias correction)
        for r in range(self.relations):
            torch._fused_adam_([logits[r]], [grad[r]], [exp_avg[r]], [exp_avg_sq[r]], [],
                               [steps[r]], lr=lr[r], beta1=o.b1, beta2=o.b2, weight_decay=0.0,
                               eps=o.eps, amsgrad=False, maximize=False,
                               grad_scale=unscale[r:r + 1], found_inf=skip[r:r + 1])

    def _math_update(self, logits: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                     exp_avg_sq: torch.Tensor, steps: torch.Tensor, total: torch.Tensor,
                     peak: torch.Tensor, losses: torch.Tensor, counts: torch.Tensor) -> None:
        """Compiled: clipping, Adam (optax's formula) and the schedule as tensor math over
        ``[R, P]``, written back in place; Inductor fuses it into one pass."""
        o = self.optim
        scale, active = self._clip_and_active(grad, losses, counts)
        lr = learning_rates(steps, total, peak, o)
        count = steps + 1.0
        g = grad * scale[:, None]
        m = o.b1 * exp_avg + (1.0 - o.b1) * g
        v = o.b2 * exp_avg_sq + (1.0 - o.b2) * g * g
        bc1 = (1.0 - o.b1 ** count)[:, None]
        bc2 = (1.0 - o.b2 ** count)[:, None]
        new = logits - lr[:, None] * (m / bc1) / (torch.sqrt(v / bc2) + o.eps)
        keep = active[:, None]
        logits.copy_(torch.where(keep, new, logits))
        exp_avg.copy_(torch.where(keep, m, exp_avg))
        exp_avg_sq.copy_(torch.where(keep, v, exp_avg_sq))
        steps.copy_(steps + active.float())

    # -- evaluation --

    def threshold_weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every relation's binary subnetwork as ``[R, in, out]`` weights ``W * 1[G > logit(t)]``
        (formed once per evaluation, not per batch)."""
        with torch.no_grad():
            return self._split(hard_masked(self.logits, self.w_flat, self.cut))

    def rank_stats(self, batch: Mapping[str, torch.Tensor],
                   masked: dict[int, dict[str, torch.Tensor]] | None,
                   ks: Sequence[int] = (1, 2, 3, 5, 10)) -> dict[str, torch.Tensor]:
        """Per relation: ``hits [R, K]``, ``rr [R]``, ``count [R]`` and ``rank [R, B]`` (0 on
        padding rows), as ``lamp_jax.ranking.batch_rank_stats``. ``masked``: from
        :meth:`threshold_weights` (subnetworks), or None (the full model)."""
        with torch.no_grad():
            logits = self._rank_logits(batch["hidden"], batch["attention_mask"],
                                       batch["mask_pos"], masked)
            target = logits.gather(-1, batch["obj_id"][..., None])
            rank = 1 + (logits > target).sum(-1)
            w = batch["weight"]
            hits = torch.stack([((rank <= k) * w).sum(1) for k in ks], dim=1)
            return {"hits": hits, "rr": (w / rank).sum(1), "count": w.sum(1),
                    "rank": torch.where(w > 0, rank, torch.zeros_like(rank))}

    def _rank_logits(self, hidden, attention_mask, mask_pos, masked):
        return forward_from(hidden, attention_mask, mask_pos, self.fw, self.layers[0], masked)

    def compile_ranking(self, mode: str | None = None) -> None:
        """``torch.compile`` the evaluation forward (one graph for the subnetworks, one for the
        full model)."""
        self._rank_logits = torch.compile(self._rank_logits, dynamic=False, mode=mode)
