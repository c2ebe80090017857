"""Model FLOPs utilisation of our training steps (issue 16.3): FLOP counts, the bf16 matmul peak, a time breakdown.

FLOPs of one step (a multiply-add is 2 FLOPs; only matmuls are counted — norms, activations, softmax, the optimizer
and casts are "overhead", as is usual for MFU). Per *non-padding* token, per decoder linear of shape ``in × out``:

* frozen base weight (LoRA): forward ``2·in·out`` + gradient w.r.t. its input ``2·in·out`` = ``4·in·out``; no weight
  gradient. In layer 0 the q/k/v inputs come from the frozen embedding through a frozen norm: their input gradient
  is not needed and autograd skips it (``2·in·out`` less for those three).
* trained base weight (full fine-tuning): ``6·in·out`` (forward, input gradient, weight gradient).
* LoRA adapter of rank r on that linear (A: ``in × r``, B: ``r × out``): forward ``2·r·(in+out)``, weight gradients
  ``2·r·(in+out)``, input gradients ``2·r·out`` (into A's output) + ``2·r·in`` (into x; not in layer 0's q/k/v).

Attention, per layer and per *visible* (query, key) pair (causal: ``L(L+1)/2`` per row of L tokens; packed DPO rows:
the 4D mask's true entries among real tokens): ``4·h·d`` forward (QKᵀ and PV, h heads of width d) and ``8·h·d``
backward (dP, dV, dQ, dK) = ``12·h·d``; in layer 0 under LoRA, Q, K or V without an adapter needs no gradient
(``2·h·d`` less each, and dP goes when neither Q nor K needs one). Kernels that compute masked-out pairs (SDPA with an
explicit mask) do more
work than this count: the count is the *model's* work.

LM head (``hidden × vocab``), on trained positions only (our chunked head scores no other position): ``2·H·V``
forward + ``2·H·V`` input gradient; + ``2·H·V`` weight gradient when it is trained (full fine-tuning; SmolLM2 ties it
to the embedding).

A DPO step with the ``auto`` reference adds a no-grad forward of the same packed batch with the adapter disabled:
``2·in·out`` per token and linear, ``4·h·d`` per visible pair and layer, ``2·H·V`` per trained position.

Peak: ``torch.matmul`` of two ``n × n`` matrices (n = 2048 by default) *in the dtype the step's matmuls run in*
(:func:`matmul_dtype`: bf16 under ``bf16-mixed``, the weights' dtype under ``32-true``; a CPU without native bf16
emulates it far below its fp32 speed, so an fp32 step against a bf16 peak read 187–234 % in issue 28), in the same
process and thread count, best of ``repeats`` (the peak is what the core gives when nothing else runs on it), by wall
time and by process CPU time. MFU by CPU time (step FLOPs per CPU-second over matmul FLOPs per CPU-second) is robust
to other jobs on the machine; MFU by wall time is the usual definition. :func:`utilisation` refuses a figure above
100 %: the step cannot outrun the matmul peak it is measured against, so such a figure means the FLOP count, the
peak's dtype or the timing is wrong (:class:`MFUError`).

Breakdown: :func:`profile_scopes` labels modules with ``record_function`` scopes (attention, base linears, LoRA
adapters, MLP/norm elementwise, LM head + log-softmax, data collation); :func:`breakdown` sums the profiler's self
CPU time per scope, giving each backward node the scope of the forward op that created it (matched by autograd
sequence number), and puts the optimizer (``Optimizer.step``, gradient clipping, ``zero_grad``) in its own bucket.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

ATTN_NAMES = {"q_proj", "k_proj", "v_proj"}  # layer-0 inputs that need no input gradient under LoRA


class MFUError(ValueError):
    """A utilisation above 100 % of the measured peak: a bug in the count, the peak or the timing, never a result."""


PRECISION_DTYPES = {
    "bf16-mixed": "bfloat16",
    "bf16-true": "bfloat16",
    "16-mixed": "float16",
    "16-true": "float16",
    "32-true": None,
    "32": None,
    "64-true": "float64",
}


def matmul_dtype(precision: str, weights_dtype: str = "float32") -> str:
    """The dtype the training step's matmuls run in: the autocast dtype of a mixed precision, the weights' dtype of
    ``32-true`` (Lightning's precision names)."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; known: {sorted(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[precision] or weights_dtype


def utilisation(achieved_gflops: float, peak_gflops: float, what: str = "") -> float:
    """``achieved / peak``; raises :class:`MFUError` when it is above 1 (or the peak is not positive) instead of
    returning a figure that cannot be true."""
    if not peak_gflops > 0:
        raise MFUError(f"MFU{what}: the measured matmul peak is {peak_gflops} GFLOP/s")
    mfu = achieved_gflops / peak_gflops
    if mfu > 1.0:
        raise MFUError(
            f"MFU{what} would be {mfu:.1%} ({achieved_gflops:.1f} GFLOP/s achieved over a {peak_gflops:.1f} GFLOP/s "
            "matmul peak): above 100 % is a bug (the FLOP count, the peak's dtype or the timed window is wrong), "
            "not a result; not reported"
        )
    return mfu


def matmul_peak(n: int = 2048, repeats: int = 8, dtype: str = "bfloat16") -> dict:
    """Measured ``n × n`` matmul throughput in this process (its torch thread count): best and median GFLOP/s by wall
    time and by CPU time."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    for _ in range(2):  # oneDNN builds its kernel on the first call
        torch.matmul(a, b)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    flop = 2 * n**3
    return {
        "n": n,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "gflops_wall_best": round(flop / min(wall) / 1e9, 2),
        "gflops_wall_median": round(flop / statistics.median(wall) / 1e9, 2),
        "gflops_cpu_best": round(flop / max(min(cpu), 1e-9) / 1e9, 2),
        "gflops_cpu_median": round(flop / max(statistics.median(cpu), 1e-9) / 1e9, 2),
    }


def model_shapes(model) -> dict:
    """The matmul shapes of a (PEFT-wrapped) causal LM: decoder linears per layer with their LoRA rank, heads, LM head
    and which parts are trained."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    layers = base.model.layers
    linears = []  # (layer, name, in, out, lora_r or 0, base weight trained)
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            base_layer = getattr(mod, "base_layer", None)
            if isinstance(base_layer, torch.nn.Linear):
                r = mod.lora_A["default"].out_features if "default" in getattr(mod, "lora_A", {}) else 0
                linears.append(
                    (i, leaf, base_layer.in_features, base_layer.out_features, r, base_layer.weight.requires_grad)
                )
            elif (
                isinstance(mod, torch.nn.Linear)
                and "lora_" not in name
                and base_layer is None
                and not name.endswith("base_layer")
            ):
                linears.append((i, leaf, mod.in_features, mod.out_features, 0, mod.weight.requires_grad))
    head = base.get_output_embeddings()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {
        "linears": linears,
        "n_layers": len(layers),
        "heads": heads,
        "head_dim": head_dim,
        "hidden": head.in_features,
        "vocab": head.out_features,
        "head_trained": head.weight.requires_grad,
    }


def step_flops(shapes: dict, tokens: int, visible_pairs: int, trained: int, reference_forward: bool = False) -> dict:
    """FLOPs of one training step (formula in the module docstring), by part."""
    lin_fwd = lin_bwd = lora = 0
    for layer, name, d_in, d_out, r, trained_w in shapes["linears"]:
        inputs_need_grad = trained_w or layer > 0 or name not in ATTN_NAMES
        lin_fwd += 2 * d_in * d_out
        lin_bwd += (2 * d_in * d_out if inputs_need_grad else 0) + (2 * d_in * d_out if trained_w else 0)
        if r:
            lora += 2 * r * (d_in + d_out) * 2 + 2 * r * d_out + (2 * r * d_in if inputs_need_grad else 0)
    hd = shapes["heads"] * shapes["head_dim"]
    # attention backward per pair: dP = dO·Vᵀ (if Q or K needs a gradient), dV, dQ, dK (2·h·d each, when needed)
    layer0 = {name: bool(r) or trained_w for layer, name, _, _, r, trained_w in shapes["linears"] if layer == 0}
    grads0 = [layer0.get(n, True) for n in ("q_proj", "k_proj", "v_proj")]
    bwd0 = 2 * ((grads0[0] or grads0[1]) + sum(grads0))
    attn = (4 + 8) * hd * (shapes["n_layers"] - 1) + (4 + bwd0) * hd
    hv = shapes["hidden"] * shapes["vocab"]
    parts = {
        "linear_fwd": lin_fwd * tokens,
        "linear_bwd": lin_bwd * tokens,
        "lora": lora * tokens,
        "attention": attn * visible_pairs,
        "lm_head": (6 if shapes["head_trained"] else 4) * hv * trained,
    }
    if reference_forward:
        parts["reference_forward"] = lin_fwd * tokens + 4 * hd * shapes["n_layers"] * visible_pairs + 2 * hv * trained
    parts["total"] = sum(parts.values())
    return parts


def batch_shape(batch: dict) -> tuple[int, int, int]:
    """``(non-padding tokens, visible attention pairs, trained positions)`` of one of our batches."""
    if "pair_tokens" in batch:  # packed pairs: a 4D bool mask [n, 1, T, T] and a token mask [n, T]
        tm = batch["token_mask"].bool()
        visible = batch["attention_mask"][:, 0].bool() & tm[:, :, None] & tm[:, None, :]
        return int(tm.sum()), int(visible.sum()), len(batch["pair_tokens"])
    lengths = batch["attention_mask"].sum(dim=1)  # right padding: causal pairs L(L+1)/2 per row
    return (int(lengths.sum()), int((lengths * (lengths + 1) // 2).sum()), int((batch["labels"][:, 1:] != -100).sum()))


# ------------------------------------------------------------------------------------------------ time breakdown
SCOPES = (
    "attention",
    "linear_base",
    "lora",
    "mlp_elementwise",
    "norm",
    "embedding",
    "lm_head_logsoftmax",
    "data_collate",
)


@contextmanager
def profile_scopes(model):
    """Wrap modules in ``record_function`` scopes (``scope::<name>``) so that :func:`breakdown` can attribute time.

    The innermost scope wins: a LoRA ``q_proj`` runs its base linear under ``linear_base`` and its adapter under
    ``lora``; what ``self_attn`` does outside its projections (rotary, SDPA, reshapes) is ``attention``."""
    import torch

    import clarify_lit.data.datamodule as dm_mod
    import clarify_lit.train.logprobs as lp_mod
    from clarify_lit.data import pair_collation as pp_mod

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    handles, stack, names = [], [], []

    def label(mod, scope):
        def pre(m, args, kwargs=None):
            rf = torch.autograd.profiler.record_function(f"scope::{scope}")
            rf.__enter__()
            stack.append(rf)
            names.append(scope)

        def post(m, args, out):
            stack.pop().__exit__(None, None, None)
            names.pop()

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))

    for name, mod in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if parent in ("lora_A", "lora_B", "lora_dropout"):  # ModuleDict entries ("default"): the called modules
            label(mod, "lora")
            continue
        if leaf == "self_attn":
            label(mod, "attention")
        elif leaf == "mlp":
            label(mod, "mlp_elementwise")
        elif leaf.endswith("norm"):
            label(mod, "norm")
        elif leaf == "embed_tokens":
            label(mod, "embedding")
        elif leaf == "base_layer" or (isinstance(mod, torch.nn.Linear) and leaf.endswith("_proj")):
            label(mod, "linear_base")
        elif hasattr(mod, "base_layer") and leaf.endswith("_proj"):  # PEFT wrapper: adds, scales and casts
            label(mod, "lora")
    originals = {"chunk": lp_mod._chunk_logps, "collate": dm_mod.PadCollator.__call__, "pack": pp_mod.pack_pairs}

    def chunk(*a, **k):
        names.append("lm_head_logsoftmax")
        try:
            with torch.autograd.profiler.record_function("scope::lm_head_logsoftmax"):
                return originals["chunk"](*a, **k)
        finally:
            names.pop()

    def collate(self, *a, **k):
        with torch.autograd.profiler.record_function("scope::data_collate"):
            return originals["collate"](self, *a, **k)

    lp_mod._chunk_logps = chunk
    dm_mod.PadCollator.__call__ = collate
    try:
        yield names  # the current scope stack (innermost last), for saved_activation_bytes
    finally:
        lp_mod._chunk_logps = originals["chunk"]
        dm_mod.PadCollator.__call__ = originals["collate"]
        for h in handles:
            h.remove()


def breakdown(prof) -> dict:
    """Self CPU seconds per scope of a ``torch.profiler`` run wrapped in :func:`profile_scopes`.

    Each event goes to its innermost enclosing scope. A backward op (under an ``autograd::engine::evaluate_function``
    node) goes to the scope of the forward op that created the node: the last op without children recorded with the
    node's autograd sequence number (ops at a module boundary can land in the neighbouring scope). ``optimizer`` is
    what runs in ``Optimizer.step``/``zero_grad`` outside forward and backward (AdamW's update, gradient clipping —
    Lightning runs the forward+backward closure inside ``Optimizer.step``); ``other`` is the rest (loss, Lightning,
    logging, ops outside any module)."""
    events = list(prof.events())

    def enclosing(evt) -> tuple[str, object]:
        e = evt
        while e is not None:
            name = e.name
            if name.startswith("scope::"):
                return "scope", name[len("scope::") :]
            if name.startswith("autograd::engine::evaluate_function"):
                return "backward", e.sequence_nr
            if name.startswith("Optimizer."):
                return "scope", "optimizer"
            e = e.cpu_parent
        return "scope", "other"

    fwd_scope: dict[int, str] = {}
    for e in events:  # events are in start order: the last leaf per sequence number wins
        if (
            e.sequence_nr is not None
            and e.sequence_nr >= 0
            and not e.cpu_children
            and not e.name.startswith("autograd::")
        ):
            kind, s = enclosing(e)
            if kind == "scope":
                fwd_scope[e.sequence_nr] = s
    totals: dict[str, float] = {}
    for e in events:
        kind, s = enclosing(e)
        if kind == "backward":
            s = fwd_scope.get(s, "backward_unattributed")
        totals[s] = totals.get(s, 0.0) + e.self_cpu_time_total / 1e6
    total = sum(totals.values())
    order = sorted(totals.items(), key=lambda kv: -kv[1])
    return {
        "seconds": {k: round(v, 3) for k, v in order},
        "share": {k: round(v / total, 3) for k, v in order},
        "total_s": round(total, 3),
    }


def saved_activation_bytes(model, forward, weight_shapes: set[tuple[int, ...]]) -> dict:
    """MB of tensors autograd keeps for backward during ``forward()`` (a training forward under the step's autocast),
    by the scope (:func:`profile_scopes`) that saved them. Each storage is counted once; 2-D bf16 tensors of a
    linear weight's shape are the autocast's per-step bf16 copies of fp32 weights (``weight_copies``); parameters
    themselves are not counted."""
    import torch

    seen: set[int] = set()
    totals: dict[str, float] = {}
    with profile_scopes(model) as names:

        def pack(t):
            if isinstance(t, torch.nn.Parameter):
                return t
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                scope = names[-1] if names else "other"
                if (
                    t.dim() == 2
                    and t.dtype == torch.bfloat16
                    and (tuple(t.shape) in weight_shapes or tuple(t.shape[::-1]) in weight_shapes)
                ):
                    scope = "weight_copies"
                totals[scope] = totals.get(scope, 0.0) + storage.nbytes() / 2**20
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
    del out
    order = sorted(totals.items(), key=lambda kv: -kv[1])
    return {"mb": {k: round(v, 1) for k, v in order}, "total_mb": round(sum(totals.values()), 1)}
