"""Per-reward gradients, their Gram matrix and the alignment diagnostics (SPEC §1.6–1.8).

Modes:

* ``exact`` — :func:`per_reward_gradients_exact`: one backward per reward loss (the reference).
* ``affine`` — :class:`LoraCapture` + :func:`per_reward_gradients_affine`: the exact K
  gradients from two backward passes. The NFT loss is affine in each sample's reward
  probability, so its output cotangent for reward k is Σ_i (m_ki/n_k)·(U_i + r_k(i)·W_i);
  backprop is linear and samples do not interact, so at each LoRA layer the per-sample
  cotangents of the U pass and of the W pass, contracted with the layer input as they arrive
  and mixed with the per-reward coefficients, give every reward's weight gradient.
* ``periodic`` — scheduled by the trainer (:func:`marble_kit.balancing.solve_period_due`).

Plus the Gram in the optimizer's metric (:func:`metric_gram`) and the cosines of each reward
gradient with the fused gradient (:func:`cosine_diagnostics`) and with the actual parameter
update (:func:`update_cosines`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

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


def write_flat_grad(params: Sequence[Tensor], flat: Tensor, accumulate: bool = False,
                    copy: bool = True) -> None:
    """Write a flat gradient into ``p.grad`` (replacing it, or adding when ``accumulate``).

    ``copy=False`` makes each replaced ``p.grad`` a view of ``flat`` where the dtypes agree (no
    per-parameter copy; ``flat`` must not be used afterwards for anything else)."""
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
            p.grad = piece.clone() if copy else piece


# ------------------------------------------------------------------------------- exact
def per_reward_gradients_exact(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """[len(losses), P]: one backward per loss over a shared graph (retain_graph)."""
    rows = []
    for index, loss in enumerate(losses):
        if not loss.requires_grad:
            rows.append(torch.zeros(flat_size(params), dtype=params[0].dtype, device=params[0].device))
            continue
        with torch.profiler.record_function("marble::exact_backward"):
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


class _CapturedLinear(torch.autograd.Function):
    """y = x Aᵀ (+ b) for one LoRA factor; its backward also hands (δy, x) to the capture.

    The input is saved the way ``F.linear`` saves it (so gradient checkpointing recomputes it
    in the backward instead of keeping it), and no weight gradient is formed here: the
    capture contracts the per-sample cotangent with the input at once and lets both go.
    Under autocast the factor's input and weight are cast once here, to what autocast's
    ``F.linear`` would multiply, and saved that way: no backward pass casts them again.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, call: _FactorCall) -> Tensor:
        ctx.input_dtype = x.dtype
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.call = call
        LoraCapture.calls["forward"] += 1
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, weight = ctx.saved_tensors
        ctx.call.capture._accumulate(ctx.call, grad_output, x)
        grad_input = grad_output @ weight.to(grad_output.dtype) if ctx.needs_input_grad[0] else None
        return (None if grad_input is None else grad_input.to(ctx.input_dtype)), None, None, None


@dataclass
class _FactorCall:
    """One LoRA factor of the captured forward: where its weight (and bias) sit in the flat
    parameter vector."""

    capture: LoraCapture
    module: nn.Linear
    weight_slot: tuple[int, int] | None
    bias_slot: tuple[int, int] | None
    name: str = ""  # the LoRA layer's module path and factor, e.g. "mix.lora_A"

    @property
    def where(self) -> str:
        return repr(self.name)


@dataclass
class _Pass:
    """One backward pass: per-sample coefficients [J, B] (None: one combination, all ones)
    and the buffer it adds to (:meth:`LoraCapture.buffer`)."""

    coefficients: Tensor | None
    target: Tensor
    rows: int

    def block(self, slot: tuple[int, int]) -> Tensor:
        """The [J, numel] block of one parameter: contiguous, so a product adds into it in place."""
        offset, numel = slot
        return self.target[self.rows * offset:self.rows * (offset + numel)].view(self.rows, numel)


class LoraCapture:
    """Context manager for the `affine` Gram: during the forward *and the backward passes* inside
    it (a checkpointed forward is replayed in the backward and must take the same path), every active peft LoRA
    factor (``lora_A[adapter]``, ``lora_B[adapter]``) of ``module`` runs through
    :class:`_CapturedLinear`. A later backward pass with cotangent C and per-sample coefficients
    c [J, B] then accumulates, layer by layer as the cotangent arrives, Σ_i c_ji·(δ_i ⊗ x_i)
    for each j — the gradient of Σ_i c_ji·⟨C_i, v_i⟩ — into a [J, P] buffer.

    Memory: the layer input x lives exactly as long as autograd itself keeps it (with gradient
    checkpointing it is recomputed for the layer's backward and freed after it); what the
    capture adds is the J × (LoRA size) buffers and one layer's per-sample products at a time.
    Products and buffers are float32 (float64 for float64 inputs) whatever the autocast dtype
    (half-precision factors are multiplied with float32 accumulation and output where the
    device has such a product, else upcast first).

    Per factor and pass: two products (per-sample outer products, then every combination of
    them added into the factor's block of the buffer), no host synchronization (coefficients
    on an accelerator are checked for NaN once, after the passes: :meth:`verify`).
    ``LoraCapture.calls`` counts the factor calls of all captures (forward, backward).

    peft 0.21 computes ``result + lora_B(lora_A(dropout(x))) * scaling``: the scaling is applied
    outside ``lora_B``, so the cotangent at lora_B's output already carries it; the factor sees
    ``dropout(x)``, the input that A really multiplied. A factor called several times in one
    forward contributes once per call.
    """

    calls: ClassVar[Counter] = Counter()

    def __init__(self, module: nn.Module, params: Sequence[Tensor]):
        self.module = module
        self.params = list(params)
        self.size = flat_size(self.params)
        self.batch: int | None = None
        self._pass: _Pass | None = None
        self._factors: list[nn.Linear] = []
        self._unchecked: list[Tensor] = []  # device flags "coefficients finite", read by verify()

    # -- recording the forward ------------------------------------------------------
    def __enter__(self) -> LoraCapture:
        refuse_cross_sample_ops(self.module)
        factors, names = [], {}
        for name, lora_a, lora_b, _scaling in iter_lora_pairs(self.module):
            for factor, kind in ((lora_a, "lora_A"), (lora_b, "lora_B")):
                names[id(factor)] = f"{name}.{kind}"
                if type(factor) is not nn.Linear:
                    raise MarbleError(
                        f"--gram affine supports LoRA on linear layers only; {name!r} uses "
                        f"{type(factor).__name__}; use --gram exact"
                    )
                factors.append(factor)
        if not factors:
            raise MarbleError("--gram affine found no active trainable LoRA layer in the policy; "
                              "use --gram exact for full fine-tuning")
        slots = _parameter_slots(self.params, factors)
        for factor in factors:
            call = _FactorCall(self, factor, slots.get(id(factor.weight)),
                               slots.get(id(factor.bias)) if factor.bias is not None else None,
                               names[id(factor)])
            factor.forward = _captured_forward(call)  # instance attribute: nn.Module.__call__ uses it
        self._factors = factors
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for factor in self._factors:
            factor.__dict__.pop("forward", None)
        self._factors = []
        if exc_type is None:
            self.verify()
        self._unchecked = []

    # -- backward passes --------------------------------------------------------------
    def buffer(self, rows: int) -> Tensor:
        """A zero buffer for ``rows`` combinations (J), filled by :meth:`backward_pass` and read
        by :meth:`read`: each parameter's [J, numel] block lies contiguous in it."""
        accumulate = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
        return torch.zeros(rows * self.size, dtype=accumulate, device=self.params[0].device)

    def read(self, buffer: Tensor, rows: int) -> Tensor:
        """[J, P] in the dtype of the parameters, flat in the order of ``params``."""
        if rows == 1:
            flat = buffer.view(1, -1)
        else:
            blocks, offset = [], 0
            for p in self.params:
                blocks.append(buffer[rows * offset:rows * (offset + p.numel())].view(rows, -1))
                offset += p.numel()
            flat = torch.cat(blocks, dim=1)
        return flat.to(self.params[0].dtype)

    def gradients(self, output: Tensor, cotangent: Tensor, coefficients: Tensor,
                  retain_graph: bool = False) -> Tensor:
        """[J, P]: row j is the gradient of Σ_i coefficients[j, i]·⟨cotangent_i, output_i⟩ with
        respect to the parameters, in the dtype of the parameters, from ONE backward pass."""
        rows = coefficients.shape[0] if coefficients.ndim == 2 else 0
        buffer = self.buffer(max(rows, 1))
        self.backward_pass(output, cotangent, coefficients, buffer, retain_graph=retain_graph)
        return self.read(buffer, rows)

    def backward_pass(self, output: Tensor, cotangent: Tensor, coefficients: Tensor | None,
                      buffer: Tensor, retain_graph: bool = False) -> None:
        """One backward pass adding Σ_i coefficients[j, i]·∇⟨cotangent_i, output_i⟩ for every j
        into ``buffer`` (from :meth:`buffer`); ``coefficients`` None: one combination of weight 1."""
        batch = output.shape[0]
        if cotangent.shape != output.shape:
            raise MarbleError(f"--gram affine: cotangent {tuple(cotangent.shape)} must have the output's "
                              f"shape {tuple(output.shape)}")
        if coefficients is not None:
            if coefficients.ndim != 2 or coefficients.shape[1] != batch:
                raise MarbleError(f"--gram affine: coefficients must be [J, {batch}], got "
                                  f"{tuple(coefficients.shape)}")
            self._check_finite(coefficients)
            coefficients = coefficients.to(device=buffer.device, dtype=buffer.dtype)
        rows = 1 if coefficients is None else coefficients.shape[0]
        if buffer.numel() != rows * self.size:
            raise MarbleError(f"--gram affine: the buffer holds {buffer.numel()} entries, not {rows} × {self.size}")
        self.batch, self._pass = batch, _Pass(coefficients, buffer, rows)
        try:
            with torch.profiler.record_function("marble::capture_backward"):
                torch.autograd.grad(output, self.params, grad_outputs=cotangent.to(output.dtype),
                                    retain_graph=retain_graph, allow_unused=True)
        finally:
            self._pass = None

    def _check_finite(self, coefficients: Tensor) -> None:
        if coefficients.device.type == "cpu":
            if not torch.isfinite(coefficients).all():
                raise MarbleError(NONFINITE_COEFFICIENTS)
        else:  # reading it now would wait for the device: verify() reads it after the passes
            self._unchecked.append(torch.isfinite(coefficients).all())

    def verify(self) -> None:
        """Raise if coefficients of a pass on an accelerator were not finite (one host read)."""
        flags, self._unchecked = self._unchecked, []
        if flags and not bool(torch.stack(flags).all()):
            raise MarbleError(NONFINITE_COEFFICIENTS)

    def _accumulate(self, call: _FactorCall, grad_output: Tensor, inputs: Tensor) -> None:
        current = self._pass
        if current is None or (call.weight_slot is None and call.bias_slot is None):
            return  # a backward outside `gradients` (or a frozen factor): nothing to record
        LoraCapture.calls["backward"] += 1
        dtype = current.target.dtype
        delta = _per_sample_rows(grad_output, self.batch, call.where)
        coefficients = current.coefficients
        if call.weight_slot is not None:
            x = _per_sample_rows(inputs.detach(), self.batch, call.where)
            block = current.block(call.weight_slot)
            out_features, in_features = call.module.weight.shape
            if coefficients is None:  # one combination of weight 1: a single product over all rows
                block.view(out_features, in_features).addmm_(
                    *_upcast(delta.reshape(-1, out_features).T, x.reshape(-1, in_features), dtype))
            elif coefficients.shape[0] == 1:  # one combination: weight the rows, one product
                weighted = delta.to(dtype) * coefficients[0].view(-1, 1, 1)
                block.view(out_features, in_features).addmm_(
                    weighted.reshape(-1, out_features).T, x.reshape(-1, in_features).to(dtype))
            else:  # per-sample outer products, then every combination of them at once
                outer = _products(delta.transpose(1, 2), x, dtype)
                block.addmm_(coefficients, outer.reshape(self.batch, -1))
        if call.bias_slot is not None:
            sums = delta.to(dtype).sum(1)
            block = current.block(call.bias_slot)
            if coefficients is None:
                block.add_(sums.sum(0, keepdim=True))
            else:
                block.addmm_(coefficients, sums)


NONFINITE_COEFFICIENTS = ("--gram affine: per-sample coefficients contain NaN/inf (reward probabilities must be "
                          "finite; marble_kit.advantages gives r = 0.5 for NaN rewards)")
# (device type, dtype) -> whether torch's matrix products take out_dtype there (CUDA, torch >= 2.9)
_OUT_DTYPE_PRODUCTS: dict[tuple[str, torch.dtype], bool] = {}


def _has_out_dtype_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.bmm``/``torch.mm`` multiply half-precision ``dtype`` into float32 on
    ``device`` (checked once against the upcast product)."""
    key = (device.type, dtype)
    if key not in _OUT_DTYPE_PRODUCTS:
        try:
            a = torch.arange(6, device=device).reshape(1, 2, 3).to(dtype)
            b = torch.arange(3, device=device).reshape(1, 3, 1).to(dtype)
            product = torch.bmm(a, b, out_dtype=torch.float32)
            _OUT_DTYPE_PRODUCTS[key] = bool(product.dtype == torch.float32 and torch.equal(
                product, torch.bmm(a.float(), b.float())))
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_PRODUCTS[key] = False
    return _OUT_DTYPE_PRODUCTS[key]


def _upcast(a: Tensor, b: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return a.to(dtype), b.to(dtype)


def _products(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """Batched a @ b in ``dtype`` (float32/64): half-precision operands multiplied with float32
    output where the device can (no upcast copies), else upcast first — the same products."""
    if a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16) and dtype == torch.float32 \
            and _has_out_dtype_products(a.device, a.dtype):
        return torch.bmm(a, b, out_dtype=dtype)
    return torch.bmm(a.to(dtype), b.to(dtype))


def _captured_forward(call: _FactorCall):
    def forward(x: Tensor) -> Tensor:
        return _CapturedLinear.apply(x, call.module.weight, call.module.bias, call)
    return forward


def _parameter_slots(params: Sequence[Tensor], factors: Sequence[nn.Linear]) -> dict[int, tuple[int, int]]:
    """id(parameter) → (offset, numel) in the flat order of ``params``; every parameter must
    belong to a captured LoRA factor (identity, not position, links them)."""
    slots, offset = {}, 0
    for p in params:
        slots[id(p)] = (offset, p.numel())
        offset += p.numel()
    captured = {id(t) for m in factors for t in (m.weight, m.bias) if t is not None}
    missing = [index for index, p in enumerate(params) if id(p) not in captured]
    if missing:
        raise MarbleError(
            f"--gram affine: trainable parameter #{missing[0]} (shape {tuple(params[missing[0]].shape)}) "
            "is not an active LoRA factor of the policy; train only LoRA weights or use --gram exact"
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


def per_reward_gradients_affine(output: Tensor, U: Tensor, W: Tensor, coef_u: Tensor, coef_w: Tensor,
                                capture: LoraCapture, extra: Tensor | None = None,
                                retain_graph: bool = False) -> tuple[Tensor, Tensor | None]:
    """The K per-reward gradients [K, P] from two backward passes (SPEC §1.6, `affine`).

    Reward k's loss has the output cotangent Σ_i coef_u[k, i]·U_i + coef_w[k, i]·W_i: per row i,
    ∂ℓ_k(i)/∂v_i = U_i + r_k(i)·W_i and L_k = Σ_i m_ki/n_k·ℓ_k(i), so coef_u = m/n and
    coef_w = m·r/n (SPEC §1.5). Backprop is linear and samples do not mix, so one pass with U
    and one with W give every reward's gradient.

    Args:
        output: the policy output v_θ of the forward recorded by ``capture``, [B, …].
        U, W: per-row cotangents shaped like ``output``.
        coef_u, coef_w: [K, B] per-reward, per-row coefficients of U and W.
        capture: the :class:`LoraCapture` that was active during the forward.
        extra: optional cotangent of an unbalanced term (the KL anchor): its gradient comes from
            a third pass, is returned separately and never enters the Gram.
        retain_graph: keep the graph after the last pass (e.g. to compare with `exact`).

    Returns:
        (grads [K, P], extra_grad [P] or None), in the dtype of the parameters, flat in the
        order of ``capture.params``.
    """
    _check_affine_inputs(output, U, W, coef_u, coef_w)
    buffers = capture.buffer(coef_u.shape[0]), capture.buffer(coef_u.shape[0])
    capture.backward_pass(output, U, coef_u, buffers[0], retain_graph=True)
    capture.backward_pass(output, W, coef_w, buffers[1], retain_graph=retain_graph or extra is not None)
    anchor = None
    if extra is not None:
        anchor_buffer = capture.buffer(1)
        capture.backward_pass(output, extra, None, anchor_buffer, retain_graph=retain_graph)
        anchor = capture.read(anchor_buffer, 1)[0]
    capture.verify()
    # (one buffer per pass, added once: a product added into a partly filled buffer rounds differently)
    return capture.read(buffers[0], coef_u.shape[0]) + capture.read(buffers[1], coef_u.shape[0]), anchor


def per_reward_gradients_affine_stacked(output: Tensor, U: Tensor, W: Tensor, coef_u: Tensor, coef_w: Tensor,
                                        capture: LoraCapture, extra: Tensor | None = None,
                                        retain_graph: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`per_reward_gradients_affine` from ONE backward pass over a stacked forward.

    ``output`` is the policy output of the rows repeated m times (m = 2, or 3 with ``extra``),
    [m·B, …]: copy 1 takes the cotangent U, copy 2 W, copy 3 the anchor's. Samples do not mix,
    so each copy's per-sample cotangents arrive at the LoRA factors apart and one coefficient
    matrix [K (+1), m·B] — [coef_u, coef_w, 0] per reward, [0, 0, 1] for the anchor — gives
    the same gradients as the separate passes (the forward costs m× the rows, the backward
    passes' fixed costs are paid once). ``U``, ``W``, ``extra`` are [B, …] like copy 1.
    """
    copies = 2 if extra is None else 3
    rows = U.shape[0]
    if output.shape[0] != copies * rows or output.shape[1:] != U.shape[1:]:
        raise MarbleError(f"--gram affine: a stacked output must hold {copies} copies of the "
                          f"{tuple(U.shape)} rows, got {tuple(output.shape)}")
    _check_affine_inputs(output[:rows], U, W, coef_u, coef_w)
    num_rewards = coef_u.shape[0]
    coefficients = torch.zeros(num_rewards + (extra is not None), copies * rows, dtype=torch.float64,
                               device=coef_u.device)
    coefficients[:num_rewards, :rows] = coef_u
    coefficients[:num_rewards, rows:2 * rows] = coef_w
    parts = [U, W]
    if extra is not None:
        coefficients[num_rewards, 2 * rows:] = 1.0
        parts.append(extra)
    buffer = capture.buffer(coefficients.shape[0])
    capture.backward_pass(output, torch.cat(parts), coefficients, buffer, retain_graph=retain_graph)
    capture.verify()
    grads = capture.read(buffer, coefficients.shape[0])
    return grads[:num_rewards], (grads[num_rewards] if extra is not None else None)


def _check_affine_inputs(output: Tensor, U: Tensor, W: Tensor, coef_u: Tensor, coef_w: Tensor) -> None:
    if U.shape != output.shape or W.shape != output.shape:
        raise MarbleError(f"--gram affine: cotangents U {tuple(U.shape)} and W {tuple(W.shape)} must "
                          f"have the output's shape {tuple(output.shape)}")
    if coef_u.shape != coef_w.shape:
        raise MarbleError(f"--gram affine: coefficient shapes differ: {tuple(coef_u.shape)} vs {tuple(coef_w.shape)}")


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
