"""Per-reward gradients, their Gram matrix and the alignment diagnostics (SPEC §1.6–1.8).

Modes:

* ``exact`` — :func:`per_reward_gradients_exact`: one backward per reward loss (the reference).
* ``affine`` — :class:`LoraCapture` + :func:`per_reward_gradients_affine`: the exact K
  gradients from two backward passes. The NFT loss is affine in each sample's reward
  probability, so its output cotangent for reward k is U + r_k·W; backprop is linear and
  samples do not interact, so the per-sample cotangents of U and W at each LoRA layer, mixed
  with r_k and contracted with the layer inputs, give every reward's weight gradient.
* ``periodic`` — scheduled by the trainer (:func:`marble_kit.balancing.solve_period_due`).

Plus the Gram in the optimizer's metric (:func:`metric_gram`) and the cosines of each reward
gradient with the fused gradient (:func:`cosine_diagnostics`) and with the actual parameter
update (:func:`update_cosines`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from marble_kit.errors import MarbleError
from marble_kit.policy import has_cross_sample_ops, iter_lora_pairs

GRAM_MODES = ("affine", "exact", "periodic")


# ----------------------------------------------------------------------------- flat views
def flat_size(params: Sequence[Tensor]) -> int:
    return sum(p.numel() for p in params)


def flatten(tensors: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """Concatenate per-parameter tensors (None → zeros) in the order of ``params``."""
    parts = [torch.zeros_like(p).reshape(-1) if t is None else t.reshape(-1)
             for t, p in zip(tensors, params)]
    return torch.cat(parts)


def write_flat_grad(params: Sequence[Tensor], flat: Tensor, accumulate: bool = False) -> None:
    """Write a flat gradient into ``p.grad`` (replacing it, or adding when ``accumulate``)."""
    if flat.numel() != flat_size(params):
        raise MarbleError(f"flat gradient has {flat.numel()} entries but the parameters have "
                          f"{flat_size(params)}")
    offset = 0
    for p in params:
        piece = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        if accumulate and p.grad is not None:
            p.grad.add_(piece)
        else:
            p.grad = piece.clone()


# ------------------------------------------------------------------------------- exact
def per_reward_gradients_exact(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """[len(losses), P]: one backward per loss over a shared graph (retain_graph)."""
    rows = []
    for index, loss in enumerate(losses):
        if not loss.requires_grad:
            rows.append(torch.zeros(flat_size(params), dtype=params[0].dtype, device=params[0].device))
            continue
        grads = torch.autograd.grad(loss, list(params), retain_graph=index < len(losses) - 1,
                                    allow_unused=True)
        rows.append(flatten(grads, params))
    return torch.stack(rows)


def gram_matrix(grads: Tensor) -> Tensor:
    """G = g gᵀ in float64 (K×K) from the [K, P] per-reward gradients."""
    g = grads.detach().double()
    return g @ g.T


def fused_gradient(grads: Tensor, weights: Tensor) -> Tensor:
    """d = Σ_k w_k g_k."""
    return weights.to(grads) @ grads


# ------------------------------------------------------------------------------ affine
def refuse_cross_sample_ops(module: nn.Module) -> None:
    """The `affine` Gram assumes samples never interact inside the policy: refuse batch-norm."""
    name = has_cross_sample_ops(module)
    if name is not None:
        raise MarbleError(
            f"--gram affine needs a policy whose samples do not interact, but layer {name!r} "
            "normalizes over the batch (batch-norm in training mode); use --gram exact or put "
            "that layer in eval mode"
        )


@dataclass
class _LinearCall:
    """One forward call of a LoRA factor: its input and output (output still in the graph)."""

    module: nn.Linear
    inputs: Tensor
    output: Tensor


@dataclass
class LoraCapture:
    """Context manager recording, during ONE forward, the input and output of every active
    peft LoRA factor (``lora_A[adapter]``, ``lora_B[adapter]``) of ``module``.

    peft 0.21 computes ``result + lora_B(lora_A(dropout(x))) * scaling``: the scaling is applied
    outside ``lora_B``, so the cotangent at lora_B's output already carries it and the weight
    gradients need no extra factor; the input hook sees ``dropout(x)``, the input that A
    really multiplied. A factor called several times in one forward gets one record per call.
    """

    module: nn.Module
    calls: list[_LinearCall] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> LoraCapture:
        refuse_cross_sample_ops(self.module)
        factors = []
        for name, lora_a, lora_b, _scaling in iter_lora_pairs(self.module):
            for factor in (lora_a, lora_b):
                if type(factor) is not nn.Linear:
                    raise MarbleError(
                        f"--gram affine supports LoRA on linear layers only; {name!r} uses "
                        f"{type(factor).__name__}; use --gram exact"
                    )
                factors.append(factor)
        if not factors:
            raise MarbleError("--gram affine found no active trainable LoRA layer in the policy; "
                              "use --gram exact for full fine-tuning")
        self.calls = []
        self._handles = [factor.register_forward_hook(self._record) for factor in factors]
        return self

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.calls.append(_LinearCall(module, args[0], output))

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def modules(self) -> list[nn.Linear]:
        seen: dict[int, nn.Linear] = {}
        for call in self.calls:
            seen.setdefault(id(call.module), call.module)
        return list(seen.values())


def _parameter_slots(params: Sequence[Tensor], capture: LoraCapture) -> dict[int, tuple[int, int]]:
    """id(parameter) → (offset, numel) in the flat order of ``params``; every parameter must
    belong to a captured LoRA factor (identity, not position, links them)."""
    slots, offset = {}, 0
    for p in params:
        slots[id(p)] = (offset, p.numel())
        offset += p.numel()
    captured = {id(t) for m in capture.modules for t in (m.weight, m.bias) if t is not None}
    missing = [index for index, p in enumerate(params) if id(p) not in captured]
    if missing:
        raise MarbleError(
            f"--gram affine: trainable parameter #{missing[0]} (shape {tuple(params[missing[0]].shape)}) "
            "is not a LoRA factor used in the captured forward; train only LoRA weights or use --gram exact"
        )
    return slots


def _per_sample_rows(tensor: Tensor, batch: int, where: str) -> Tensor:
    """[B, …, F] → [B, T, F] (T = tokens per sample); the first axis must be the sample axis."""
    if tensor.shape[0] != batch:
        raise MarbleError(
            f"--gram affine: LoRA layer {where} sees a leading axis of {tensor.shape[0]} but the "
            f"batch has {batch} samples (the layer mixes or reshapes samples); use --gram exact"
        )
    return tensor.reshape(batch, -1, tensor.shape[-1])


def per_reward_gradients_affine(output: Tensor, U: Tensor, W: Tensor, r: Tensor,
                                capture: LoraCapture, params: Sequence[Tensor],
                                extra: Tensor | None = None, retain_graph: bool = False
                                ) -> tuple[Tensor, Tensor | None]:
    """The K per-reward gradients [K, P] from two backward passes (SPEC §1.6, `affine`).

    Args:
        output: the policy output v_θ of the captured forward, [B, …].
        U, W: cotangents shaped like ``output`` with ∂L_k/∂output = U + r_k·W (per sample).
        r: [K, B] reward probabilities.
        capture: the :class:`LoraCapture` that was active during the forward.
        params: trainable parameters; the flat order of the result follows this list.
        extra: optional cotangent of an unbalanced term (the KL anchor); its gradient is
            returned separately and never enters the Gram.
        retain_graph: keep the graph after the last backward (e.g. to compare with `exact`).

    Returns:
        (grads [K, P], extra_grad [P] or None), in the dtype of the parameters.
    """
    batch = output.shape[0]
    if U.shape != output.shape or W.shape != output.shape:
        raise MarbleError(f"--gram affine: cotangents U {tuple(U.shape)} and W {tuple(W.shape)} must "
                          f"have the output's shape {tuple(output.shape)}")
    if r.ndim != 2 or r.shape[1] != batch:
        raise MarbleError(f"--gram affine: r must be [K, {batch}], got {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise MarbleError("--gram affine: reward probabilities r contain NaN/inf; compute them "
                          "with marble_kit.advantages (NaN rewards give r = 0.5)")
    slots = _parameter_slots(params, capture)
    outputs = [call.output for call in capture.calls]
    cotangents = [U, W] + ([extra] if extra is not None else [])
    deltas = []
    for index, cotangent in enumerate(cotangents):
        last = index == len(cotangents) - 1
        deltas.append(torch.autograd.grad(output, outputs, grad_outputs=cotangent.to(output.dtype),
                                          retain_graph=retain_graph or not last, allow_unused=True))
    num_rewards = r.shape[0]
    dtype, device = params[0].dtype, params[0].device
    grads = torch.zeros(num_rewards, flat_size(params), dtype=dtype, device=device)
    extra_grad = torch.zeros(flat_size(params), dtype=dtype, device=device) if extra is not None else None
    mix = r.to(dtype=dtype, device=device)
    for index, call in enumerate(capture.calls):
        where = f"{type(call.module).__name__}{tuple(call.module.weight.shape)}"
        x = _per_sample_rows(call.inputs.detach().to(dtype), batch, where)
        per_cotangent = [d[index] for d in deltas]
        if per_cotangent[0] is None and per_cotangent[1] is None:
            continue  # this call does not reach the output
        d_u, d_w = (torch.zeros_like(call.output) if d is None else d for d in per_cotangent[:2])
        d_u = _per_sample_rows(d_u.to(dtype), batch, where)
        d_w = _per_sample_rows(d_w.to(dtype), batch, where)
        # Weight: Σ_{i,t} (δU + r_k(i)·δW)_{it} ⊗ x_{it}; the W part is formed per sample first.
        shared = torch.einsum("bto,bti->oi", d_u, x).reshape(-1)
        per_sample = torch.einsum("bto,bti->boi", d_w, x).reshape(batch, -1)
        _add_slot(grads, slots, call.module.weight, shared + mix @ per_sample)
        if call.module.bias is not None and id(call.module.bias) in slots:
            _add_slot(grads, slots, call.module.bias, d_u.sum((0, 1)) + mix @ d_w.sum(1))
        if extra_grad is not None and per_cotangent[2] is not None:
            d_e = _per_sample_rows(per_cotangent[2].to(dtype), batch, where)
            _add_slot(extra_grad[None], slots, call.module.weight,
                      torch.einsum("bto,bti->oi", d_e, x).reshape(-1))
            if call.module.bias is not None and id(call.module.bias) in slots:
                _add_slot(extra_grad[None], slots, call.module.bias, d_e.sum((0, 1)))
    return grads, extra_grad


def _add_slot(target: Tensor, slots: dict[int, tuple[int, int]], param: Tensor, values: Tensor) -> None:
    if id(param) not in slots:
        return  # a frozen factor (e.g. lora_B bias not trained)
    offset, numel = slots[id(param)]
    target[:, offset:offset + numel] += values.reshape(-1, numel) if values.ndim > 1 else values


# ---------------------------------------------------------------------- optimizer metric
def _adam_state(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
                ) -> tuple[Tensor, Tensor, float]:
    """(P, m, β1): Adam's diagonal preconditioner 1/(√v̂ + ε) and first moment, flattened in
    the order of ``params``; before the first step P = 1 and m = 0."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise MarbleError(f"the Adam-metric Gram needs torch.optim.Adam or AdamW, got "
                          f"{type(optimizer).__name__}; use metric=\"euclidean\"")
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    precond, momentum, beta1 = [], [], None
    for p in params:
        if id(p) not in group_of:
            raise MarbleError("the Adam-metric Gram: a trainable parameter is not in the optimizer")
        group = group_of[id(p)]
        beta1 = group["betas"][0] if beta1 is None else beta1
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state or float(state["step"]) == 0:
            precond.append(torch.ones(p.numel(), dtype=torch.float64, device=p.device))
            momentum.append(torch.zeros(p.numel(), dtype=torch.float64, device=p.device))
            continue
        step = float(state["step"])
        second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        v_hat = second.double().reshape(-1) / (1.0 - group["betas"][1] ** step)
        precond.append(1.0 / (v_hat.sqrt() + group["eps"]))
        momentum.append(state["exp_avg"].double().reshape(-1))
    return torch.cat(precond), torch.cat(momentum), float(beta1)


def metric_gram(grads: Tensor, optimizer: torch.optim.Optimizer | None, params: Sequence[Tensor],
                metric: str = "adam", grad_scale: float = 1.0, anchor: Tensor | None = None) -> Tensor:
    """The Gram in the metric of the optimizer's next step (SPEC §2, notes/conflict-experiment).

    * ``"euclidean"``: G = g gᵀ.
    * ``"adam"``: G_kl = ⟨g_k, P g_l⟩ with P = 1/(√v̂ + ε) from Adam's state (identity before
      the first step). MGDA on it makes the *preconditioned* fused gradient P·d conflict-free.
    * ``"adam-momentum"``: the Gram E_kl = ⟨e_k, P e_l⟩ of the momentum-shifted gradients
      e_k = β1·m + (1−β1)·s·(g_k + a) + ω (:class:`MomentumGramParts`, s = ``grad_scale``).

    The guarantee of ``"adam-momentum"``, precisely. AdamW's descent direction this step (its
    step divided by lr/(1−β1^t)) is u = P'·(β1·m + (1−β1)·s·(d + a)) + (1−β1^t)·wd·θ, with d
    the balanced gradient, a the unbalanced anchor gradient, s the clip factor, wd the decoupled
    weight decay and P' the preconditioner *after* this step's v update. With P' replaced by
    P (Adam's preconditioner before the step) and ω = (1−β1^t)·wd·θ/P, u = P·Σλ_k e_k for λ on
    the simplex, and the KKT conditions of MGDA's min-norm λ* on E give
    ⟨g_k, u⟩ ≥ ⟨d, u⟩ for every reward — exact (to the solver's round-off) when:
    λ is the exact min-norm solution (no floor, no EMA, normalize="none": the balancers refuse
    other combinations), s is this step's clip factor (:func:`consistent_clip_scale`), and
    the anchor gradient is passed here. First order, the one approximation left: P' ≠ P. The
    new v̂ mixes in (1−β2)·ĝ², a relative change of about (1−β2)·(ĝ²/v̂ − 1) per coordinate: at
    the first step Adam's direction is sign(ĝ) and nothing is guaranteed; after ~1/(1−β2)
    steps the margin is small (measured in `marble bench optimizer`).
    """
    if metric == "euclidean":
        return gram_matrix(grads)
    if metric not in ("adam", "adam-momentum"):
        raise MarbleError(f"unknown Gram metric {metric!r}; use euclidean, adam or adam-momentum")
    if optimizer is None:
        raise MarbleError(f"the {metric!r} Gram needs the optimizer")
    if metric == "adam-momentum":
        return adam_momentum_parts(grads, optimizer, params, anchor).gram(grad_scale)
    precond, _momentum, _beta1 = _adam_state(optimizer, params)
    g = grads.detach().double().to(precond.device)
    return (g * precond[None, :]) @ g.T


@dataclass
class MomentumGramParts:
    """E(s) = ⟨c + s·h_k, P(c + s·h_l)⟩ as a polynomial in the clip factor s, with the shared
    part c = β1·m + ω and h_k = (1−β1)·(g_k + a): E(s) = ⟨c,Pc⟩ + s·(⟨c,Ph_k⟩ + ⟨c,Ph_l⟩) +
    s²·⟨h_k,Ph_l⟩. Also the euclidean Gram of g_k + a, whose λ-quadratic is ‖d + a‖² (what
    clipping looks at)."""

    shared: Tensor            # ⟨c, P c⟩ (scalar)
    cross: Tensor             # [K] ⟨c, P h_k⟩
    spread: Tensor            # [K, K] ⟨h_k, P h_l⟩
    fused_gram: Tensor        # [K, K] ⟨g_k + a, g_l + a⟩

    def gram(self, scale: float = 1.0) -> Tensor:
        return self.shared + scale * (self.cross[:, None] + self.cross[None, :]) + scale * scale * self.spread

    def fused_norm(self, lam: Tensor) -> float:
        """‖Σλ_k g_k + a‖ for λ on the simplex."""
        lam = lam.to(self.fused_gram)
        return float(torch.sqrt(torch.clamp(lam @ self.fused_gram @ lam, min=0.0)))


def adam_momentum_parts(grads: Tensor, optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                        anchor: Tensor | None = None) -> MomentumGramParts:
    """The pieces of the ``adam-momentum`` Gram (see :func:`metric_gram`), including the anchor
    gradient ``anchor`` [P] and AdamW's decoupled weight decay of the coming step."""
    precond, momentum, beta1 = _adam_state(optimizer, params)
    g = grads.detach().double().to(precond.device)
    if anchor is not None:
        g = g + anchor.detach().double().to(precond.device)[None, :]
    shared = beta1 * momentum + _decay_shift(optimizer, params, precond, beta1)
    h = (1.0 - beta1) * g
    ph = h * precond[None, :]
    return MomentumGramParts(shared=(shared * precond) @ shared, cross=ph @ shared, spread=ph @ h.T,
                             fused_gram=g @ g.T)


def _decay_shift(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], precond: Tensor,
                 beta1: float) -> Tensor:
    """ω = (1−β1^t)·wd·θ/P: AdamW's decoupled decay of the coming step t, written inside P·(…)."""
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    if not isinstance(optimizer, torch.optim.AdamW):
        return torch.zeros_like(precond)
    parts = []
    for p in params:
        group = group_of[id(p)]
        state = optimizer.state.get(p, {})
        step = float(state["step"]) + 1.0 if "step" in state else 1.0
        parts.append((1.0 - beta1 ** step) * group["weight_decay"] * p.detach().double().reshape(-1))
    return torch.cat(parts).to(precond.device) / precond


def consistent_clip_scale(parts: MomentumGramParts, max_norm: float, solve, tol: float = 1e-12) -> float:
    """The clip factor s this step's clipping will apply, found together with the λ it depends
    on: s = min(1, max_norm/‖d(λ(s)) + a‖), λ(s) = ``solve(parts.gram(s))`` (the min-norm λ on
    the simplex as a tensor). No clipping at s = 1 ends at once; otherwise bisection on (0, 1]
    (s − min(1, max_norm/‖…‖) is negative near 0 and ≥ 0 at 1)."""
    def gap(scale: float) -> float:
        norm = parts.fused_norm(solve(parts.gram(scale)))
        return scale - (min(1.0, max_norm / norm) if norm > 0 else 1.0)

    if max_norm <= 0 or gap(1.0) <= 0:
        return 1.0
    low, high = 0.0, 1.0
    while high - low > tol * high:
        middle = 0.5 * (low + high)
        if gap(middle) < 0:
            low = middle
        else:
            high = middle
    return high


# ---------------------------------------------------------------------------- diagnostics
def cosine_diagnostics(gram: Tensor, weights: Tensor) -> dict[str, Tensor | float | int]:
    """cos_k = (G w)_k / sqrt(G_kk · wᵀGw): each reward gradient against d = Σ w_k g_k
    (SPEC §1.8), from the Gram alone. A zero gradient or a zero d gives cosine 0.

    Returns {"cos": Tensor[K], "worst": min cos_k, "worst_index": argmin}.
    """
    g = gram.detach().double()
    w = weights.detach().double().to(g.device)
    gw = g @ w
    fused_sq = torch.clamp(w @ gw, min=0.0)
    denom = torch.sqrt(torch.clamp(torch.diagonal(g), min=0.0) * fused_sq)
    cos = torch.where(denom > 0, gw / torch.where(denom > 0, denom, torch.ones_like(denom)),
                      torch.zeros_like(gw)).clamp(-1.0, 1.0)
    worst = int(torch.argmin(cos)) if cos.numel() else 0
    return {"cos": cos, "worst": float(cos[worst]) if cos.numel() else 0.0, "worst_index": worst}


def update_cosines(grads: Tensor, update: Tensor) -> Tensor:
    """cos(g_k, u) for each reward against a parameter-space direction u (e.g. −Δθ, the descent
    direction the optimizer actually took; SPEC §1.8). Zero norms give 0."""
    g = grads.detach().double()
    u = update.detach().double().to(g.device).reshape(-1)
    norms = g.norm(dim=1) * u.norm()
    dots = g @ u
    return torch.where(norms > 0, dots / torch.where(norms > 0, norms, torch.ones_like(norms)),
                       torch.zeros_like(dots)).clamp(-1.0, 1.0)
