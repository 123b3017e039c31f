"""Gram modes: `affine` equals `exact` on a peft-LoRA network; optimizer metric; diagnostics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from marble_kit import gram as gram_ops
from marble_kit.balancing import MinNormQP
from marble_kit.errors import MarbleError
from marble_kit.nft import (
    anchor_cotangent,
    anchor_loss,
    fused_row_weights,
    nft_cotangents,
    nft_loss_per_sample,
    reward_row_coefficients,
)


class TinyDiT(nn.Module):
    """Per-sample token mixer: linear layers over [B, T, D], one of them applied twice."""

    def __init__(self, dim: int = 8, hidden: int = 16, batch_norm: bool = False):
        super().__init__()
        self.proj_in = nn.Linear(dim, hidden)
        self.attn_q = nn.Linear(hidden, hidden)
        self.attn_k = nn.Linear(hidden, hidden)
        self.mlp = nn.Linear(hidden, hidden)
        self.proj_out = nn.Linear(hidden, dim)
        self.norm = nn.BatchNorm1d(hidden) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj_in(x))
        scores = torch.softmax(self.attn_q(h) @ self.attn_k(h).transpose(1, 2) / 4.0, dim=-1)
        h = h + scores @ h
        h = h + torch.tanh(self.mlp(h))
        h = h + torch.tanh(self.mlp(h))  # the same LoRA layer used twice in one forward
        if self.norm is not None:
            h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        return self.proj_out(h)


def lora_network(seed: int = 0, dtype=torch.float64, batch_norm: bool = False, bias: bool = False):
    torch.manual_seed(seed)
    net = TinyDiT(batch_norm=batch_norm)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, lora_bias=bias,
                        target_modules=["proj_in", "attn_q", "attn_k", "mlp", "proj_out"])
    net = inject_adapter_in_model(config, net).to(dtype)
    for name, param in net.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_B" in name:
            nn.init.normal_(param, std=0.2)  # peft starts B (and its bias) at 0; make every path non-trivial
    return net, [p for p in net.parameters() if p.requires_grad]


def nft_batch(batch: int, num_rewards: int, dtype, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 6, 8)

    def draw():
        return torch.randn(shape, generator=generator, dtype=dtype)

    x0, noise, v_old, v_ref = draw(), draw(), draw(), draw()
    t = torch.rand(batch, generator=generator, dtype=dtype) * 0.8 + 0.1
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
    r = torch.rand(num_rewards, batch, generator=generator, dtype=dtype)
    return x_t, x0, t, v_old, v_ref, r


def masked_coefficients(num_rewards: int, batch: int, dtype, seed: int, absent: int | None = None):
    """L_k over a random subset of the rows (some reward judging few or none): coef = m/n."""
    generator = torch.Generator().manual_seed(seed + 100)
    judged = torch.rand(num_rewards, batch, generator=generator) < 0.6
    judged[:, 0] = True  # every reward judges something ...
    if absent is not None:
        judged[absent] = False  # ... except the absent one
    return reward_row_coefficients(judged, judged.sum(1)).to(dtype)


def masked_losses(v, v_old, x_t, x0, t, r, coef, beta):
    return [(coef[k] * nft_loss_per_sample(v, v_old, x_t, x0, t, r[k], beta)).sum() for k in range(r.shape[0])]


def affine_gradients(net, params, x_t, x0, t, v_old, r, coef, beta, extra_ref=None, kl=0.0):
    with gram_ops.LoraCapture(net, params) as capture:  # also around the backward: a checkpointed
        v = net(x_t)                                     # forward is replayed inside it
        U, W = nft_cotangents(v, v_old, x_t, x0, t, beta, num_samples=1)
        extra = kl * anchor_cotangent(v, extra_ref) if extra_ref is not None else None
        return gram_ops.per_reward_gradients_affine(v, U, W, coef, coef * r, capture, extra=extra)


@pytest.mark.parametrize("num_rewards", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_affine_gram_and_fused_gradient_equal_exact(num_rewards, dtype, tolerance):
    """Masked per-reward losses L_k = Σ_{i judged by k} ℓ_k(i)/n_k (one reward judging nothing
    when K > 2): the two-pass gradients equal one backward per reward, and the fused gradient
    equals one backward on Σ_i c_i·ℓ(i; r_eff(i))."""
    net, params = lora_network(seed=num_rewards, dtype=dtype, bias=num_rewards % 2 == 0)
    x_t, x0, t, v_old, v_ref, r = nft_batch(5, num_rewards, dtype, seed=num_rewards)
    coef = masked_coefficients(num_rewards, 5, dtype, num_rewards, absent=2 if num_rewards > 2 else None)
    beta, kl = 0.1, 1e-2

    affine, anchor = affine_gradients(net, params, x_t, x0, t, v_old, r, coef, beta, extra_ref=v_ref, kl=kl)

    v = net(x_t)
    losses = masked_losses(v, v_old, x_t, x0, t, r, coef, beta)
    exact = gram_ops.per_reward_gradients_exact(losses + [kl * anchor_loss(v, v_ref)], params)

    scale = exact.abs().max()
    assert scale > 0
    assert (affine - exact[:-1]).abs().max() <= tolerance * scale
    assert (anchor - exact[-1]).abs().max() <= tolerance * max(exact[-1].abs().max(), 1e-30)
    if num_rewards > 2:
        assert not affine[2].any() and not exact[2].any()  # no judged row: exactly no gradient
    gram_affine, gram_exact = gram_ops.gram_matrix(affine), gram_ops.gram_matrix(exact[:-1])
    assert (gram_affine - gram_exact).abs().max() <= 10 * tolerance * gram_exact.abs().max()

    # The fused gradient Σ w_k g_k equals one backward on Σ_i c_i·ℓ(i; r_eff(i)) (SPEC §1.5).
    weights = torch.rand(num_rewards, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fused = gram_ops.fused_gradient(affine, weights)
    c, r_eff = fused_row_weights(weights, coef, r)
    net.zero_grad()
    v = net(x_t)
    (c.to(dtype) * nft_loss_per_sample(v, v_old, x_t, x0, t, r_eff.to(dtype), beta)).sum().backward()
    single = torch.cat([p.grad.reshape(-1) for p in params])
    assert (fused - single).abs().max() <= tolerance * single.abs().max()


class CheckpointedDiT(TinyDiT):
    """TinyDiT with its middle in a non-reentrant checkpoint (as diffusers does): the layer
    inputs are recomputed in the backward instead of kept."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj_in(x))
        h = torch.utils.checkpoint.checkpoint(self._middle, h, use_reentrant=False)
        return self.proj_out(h)

    def _middle(self, h: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.attn_q(h) @ self.attn_k(h).transpose(1, 2) / 4.0, dim=-1)
        h = h + scores @ h
        return h + torch.tanh(self.mlp(h))


def test_affine_equals_exact_under_gradient_checkpointing_and_keeps_no_input():
    torch.manual_seed(0)
    net = CheckpointedDiT()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["proj_in", "attn_q", "attn_k", "mlp", "proj_out"])
    net = inject_adapter_in_model(config, net).to(torch.float32)
    for name, param in net.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_B" in name:
            nn.init.normal_(param, std=0.2)
    params = [p for p in net.parameters() if p.requires_grad]
    x_t, x0, t, v_old, v_ref, r = nft_batch(6, 3, torch.float32, seed=3)
    coef = masked_coefficients(3, 6, torch.float32, 3)
    affine, anchor = affine_gradients(net, params, x_t, x0, t, v_old, r, coef, 0.5, extra_ref=v_ref, kl=0.1)
    v = net(x_t)
    exact = gram_ops.per_reward_gradients_exact(
        masked_losses(v, v_old, x_t, x0, t, r, coef, 0.5) + [0.1 * anchor_loss(v, v_ref)], params)
    assert (affine - exact[:-1]).abs().max() <= 1e-6 * exact.abs().max()
    assert (anchor - exact[-1]).abs().max() <= 1e-6 * exact[-1].abs().max()
    # The capture holds no tensor of the forward: nothing is recorded outside autograd's graph.
    with gram_ops.LoraCapture(net, params) as capture:
        net(x_t)
    assert not [value for value in vars(capture).values() if isinstance(value, torch.Tensor)]
    assert all("forward" not in vars(m) for m in net.modules())  # the patched forwards are gone


def test_affine_without_anchor_and_flat_order_follows_params():
    net, params = lora_network()
    x_t, x0, t, v_old, _, r = nft_batch(3, 2, torch.float64)
    reordered = params[::-1]
    coef = torch.full((2, 3), 1.0 / 3, dtype=torch.float64)
    grads, anchor = affine_gradients(net, reordered, x_t, x0, t, v_old, r, coef, 1.0)
    assert anchor is None
    v = net(x_t)
    losses = [nft_loss_per_sample(v, v_old, x_t, x0, t, r[k], 1.0).mean() for k in range(2)]
    torch.testing.assert_close(grads, gram_ops.per_reward_gradients_exact(losses, reordered))


def test_affine_refuses_batch_norm_and_non_lora_parameters():
    net, params = lora_network(batch_norm=True)
    with pytest.raises(MarbleError, match="batch-norm"):
        gram_ops.refuse_cross_sample_ops(net)
    with pytest.raises(MarbleError, match="--gram exact"), gram_ops.LoraCapture(net, params):
        pass
    net.eval()  # running statistics: samples no longer interact
    gram_ops.refuse_cross_sample_ops(net)

    with pytest.raises(MarbleError, match="no active trainable LoRA"), gram_ops.LoraCapture(TinyDiT(), []):
        pass

    net, params = lora_network()
    extra_param = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(MarbleError, match="not an active LoRA factor"), \
            gram_ops.LoraCapture(net, params + [extra_param]):
        pass
    x_t, x0, t, v_old, _, r = nft_batch(2, 2, torch.float64)
    with gram_ops.LoraCapture(net, params) as capture:
        v = net(x_t)
        U, W = nft_cotangents(v, v_old, x_t, x0, t, 1.0, num_samples=1)
        with pytest.raises(MarbleError, match=r"coefficients must be \[J, 2\]"):
            gram_ops.per_reward_gradients_affine(v, U, W, r[:, :1], r[:, :1], capture)
        with pytest.raises(MarbleError, match="NaN"):
            gram_ops.per_reward_gradients_affine(v, U, W, r * float("nan"), r, capture)


def test_exact_gradients_of_a_constant_loss_are_zero():
    _, params = lora_network()
    grads = gram_ops.per_reward_gradients_exact([torch.tensor(1.0)], params)
    assert grads.shape == (1, gram_ops.flat_size(params)) and not grads.any()


def test_write_flat_grad_round_trip_and_accumulate():
    _, params = lora_network()
    flat = torch.arange(gram_ops.flat_size(params), dtype=torch.float64)
    gram_ops.write_flat_grad(params, flat)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), flat)
    gram_ops.write_flat_grad(params, flat, accumulate=True)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), 2 * flat)
    with pytest.raises(MarbleError, match="entries"):
        gram_ops.write_flat_grad(params, flat[:-1])


# ------------------------------------------------------------------------ optimizer metric
def adam_after_steps(steps: int, betas=(0.9, 0.999), amsgrad=False):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, dtype=torch.float64)), nn.Parameter(torch.randn(2, 3, dtype=torch.float64))]
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=betas, amsgrad=amsgrad)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p) * 3
        optimizer.step()
    return params, optimizer


def test_metric_gram_is_euclidean_before_the_first_step():
    params, optimizer = adam_after_steps(0)
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0  # (the first step's decay enters the momentum Gram: tested below)
    grads = torch.randn(3, 11, dtype=torch.float64)
    for metric in ("euclidean", "adam", "adam-momentum"):
        expected = gram_ops.gram_matrix(grads) * (0.1 ** 2 if metric == "adam-momentum" else 1.0)
        torch.testing.assert_close(gram_ops.metric_gram(grads, optimizer, params, metric), expected)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_metric_gram_uses_adams_bias_corrected_preconditioner_and_momentum(amsgrad):
    params, optimizer = adam_after_steps(4, amsgrad=amsgrad)
    grads = torch.randn(3, 11, dtype=torch.float64)
    key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    v_hat = torch.cat([optimizer.state[p][key].reshape(-1) for p in params]) / (1 - 0.999 ** 4)
    precond = 1.0 / (v_hat.sqrt() + 1e-8)
    torch.testing.assert_close(gram_ops.metric_gram(grads, optimizer, params, "adam"),
                               (grads * precond) @ grads.T)
    m = torch.cat([optimizer.state[p]["exp_avg"].reshape(-1) for p in params])
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    decay = (1 - 0.9 ** 5) * 0.01 * theta / precond  # AdamW's default weight decay, next step t = 5
    shifted = 0.9 * m + 0.1 * grads + decay
    torch.testing.assert_close(gram_ops.metric_gram(grads, optimizer, params, "adam-momentum"),
                               (shifted * precond) @ shifted.T)
    with pytest.raises(MarbleError, match="Adam"):
        gram_ops.metric_gram(grads, torch.optim.SGD(params, lr=0.1), params, "adam")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 6), st.floats(0.0, 0.99))
def test_momentum_aware_weights_balance_the_actual_adam_step(seed, num_rewards, beta1):
    """For λ from the adam-momentum Gram, the (first-order) Adam step u = P(β1·m + (1−β1)·d)
    satisfies ⟨g_k, u⟩ ≥ ⟨d, u⟩ for every reward: no reward is less aligned with the step
    than the fused gradient (equality on the support)."""
    generator = torch.Generator().manual_seed(seed)
    dim = 9
    grads = torch.randn(num_rewards, dim, generator=generator, dtype=torch.float64)
    param = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
    optimizer = torch.optim.Adam([param], betas=(beta1, 0.99))
    for _ in range(3):  # build up a momentum that disagrees with today's gradients
        param.grad = torch.randn(dim, generator=generator, dtype=torch.float64) * 2
        optimizer.step()
    gram = gram_ops.metric_gram(grads, optimizer, [param], "adam-momentum")
    lam = torch.as_tensor(MinNormQP().solve(gram.numpy()).lam)
    fused = lam @ grads
    state = optimizer.state[param]
    precond = 1.0 / ((state["exp_avg_sq"] / (1 - 0.99 ** 3)).sqrt() + 1e-8)
    step = precond * (beta1 * state["exp_avg"] + (1 - beta1) * fused)
    alignments = grads @ step
    tolerance = 1e-7 * (grads.abs() @ step.abs())
    assert torch.all(alignments >= fused @ step - tolerance)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 6), st.floats(0.0, 0.99), st.floats(0.0, 0.2),
       st.floats(0.05, 5.0))
def test_momentum_guarantee_is_exact_with_weight_decay_anchor_and_this_steps_clip(seed, k, beta1, decay, max_norm):
    """With P frozen, AdamW's direction u = P·(β1·m + (1−β1)·s·(d + a)) + (1−β1^t)·wd·θ, the
    anchor gradient a and the clip factor s that clipping d + a will apply: ⟨g_k, u⟩ ≥ ⟨d, u⟩."""
    generator = torch.Generator().manual_seed(seed)
    dim = 9
    grads = torch.randn(k, dim, generator=generator, dtype=torch.float64)
    anchor = 0.3 * torch.randn(dim, generator=generator, dtype=torch.float64)
    param = nn.Parameter(torch.randn(dim, generator=generator, dtype=torch.float64))
    optimizer = torch.optim.AdamW([param], betas=(beta1, 0.99), weight_decay=decay)
    for _ in range(3):
        param.grad = torch.randn(dim, generator=generator, dtype=torch.float64) * 2
        optimizer.step()
    parts = gram_ops.adam_momentum_parts(grads, optimizer, [param], anchor=anchor)

    def solve(gram):
        return torch.as_tensor(MinNormQP().solve(gram.numpy()).lam)

    scale = gram_ops.consistent_clip_scale(parts, max_norm, solve)
    lam = solve(parts.gram(scale))
    fused = lam @ grads
    clipped = torch.nn.utils.get_total_norm([fused + anchor])  # what clip_grad_norm_ sees
    assert scale == pytest.approx(min(1.0, max_norm / float(clipped)), rel=1e-9)
    state = optimizer.state[param]
    precond = 1.0 / ((state["exp_avg_sq"] / (1 - 0.99 ** 3)).sqrt() + 1e-8)
    direction = (precond * (beta1 * state["exp_avg"] + (1 - beta1) * scale * (fused + anchor))
                 + (1 - beta1 ** 4) * decay * param.detach())
    alignments = grads @ direction
    tolerance = 1e-9 * (grads.abs() @ direction.abs())
    assert torch.all(alignments >= fused @ direction - tolerance)


# ---------------------------------------------------------------------------- diagnostics
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_cosine_diagnostics_match_explicit_cosines(seed, num_rewards):
    generator = torch.Generator().manual_seed(seed)
    grads = torch.randn(num_rewards, 7, generator=generator, dtype=torch.float64)
    grads = grads * 10.0 ** torch.linspace(-3, 1, num_rewards, dtype=torch.float64)[:, None]  # norms ≪ 1 too
    weights = torch.rand(num_rewards, generator=generator, dtype=torch.float64)
    fused = weights @ grads
    expected = torch.nn.functional.cosine_similarity(grads, fused[None, :], dim=1)
    diag = gram_ops.cosine_diagnostics(gram_ops.gram_matrix(grads), weights)
    torch.testing.assert_close(diag["cos"], expected)
    assert diag["worst"] == pytest.approx(float(expected.min()))
    assert diag["worst_index"] == int(expected.argmin())
    torch.testing.assert_close(gram_ops.update_cosines(grads, fused), expected)
    # MGDA's λ never conflicts with a reward: worst cosine ≥ 0 (SPEC §1.8).
    lam = torch.as_tensor(MinNormQP().solve(gram_ops.gram_matrix(grads).numpy()).lam)
    assert gram_ops.cosine_diagnostics(gram_ops.gram_matrix(grads), lam)["worst"] >= -1e-6


def test_cosines_of_zero_vectors_are_zero():
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    diagnostics = gram_ops.cosine_diagnostics(gram_ops.gram_matrix(grads), torch.tensor([0.0, 1.0]))
    assert diagnostics["cos"].tolist() == [0.0, 0.0]
    assert gram_ops.update_cosines(grads, torch.zeros(2)).tolist() == [0.0, 0.0]


def test_exact_rows_of_constant_and_partial_losses_and_the_graph_is_freed():
    """A loss that does not depend on the parameters is a zero row in its place (the later
    losses still get theirs); a loss that reaches only some parameters has zeros for the others;
    the graph is freed after the last loss (memory), not before."""
    net, params = lora_network()
    x_t = nft_batch(2, 1, torch.float64)[0]
    v = net(x_t)
    first = (v ** 2).sum()
    only_in = sum((p ** 2).sum() for p in params[:2])  # reaches the first two factors only
    grads = gram_ops.per_reward_gradients_exact([torch.tensor(3.0), first, only_in, torch.tensor(1.0)], params)
    assert grads.shape == (4, gram_ops.flat_size(params)) and grads.dtype == torch.float64
    assert not grads[0].any() and not grads[3].any()
    net.zero_grad()
    (v ** 2).sum().backward(retain_graph=True)
    torch.testing.assert_close(grads[1], torch.cat([p.grad.reshape(-1) for p in params]))
    size = params[0].numel() + params[1].numel()
    torch.testing.assert_close(grads[2, :size], 2 * torch.cat([p.detach().reshape(-1) for p in params[:2]]))
    assert not grads[2, size:].any()
    last = (v ** 3).sum()
    gram_ops.per_reward_gradients_exact([last], params)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        last.backward()


def test_affine_frees_the_graph_after_its_last_pass_and_its_messages():
    net, params = lora_network()
    x_t, x0, t, v_old, v_ref, r = nft_batch(2, 2, torch.float64)
    coef = torch.full((2, 2), 0.5, dtype=torch.float64)
    for extra in (None, True):
        with gram_ops.LoraCapture(net, params) as capture:
            v = net(x_t)
            U, W = nft_cotangents(v, v_old, x_t, x0, t, 1.0, num_samples=1)
            anchor = anchor_cotangent(v, v_ref) if extra else None
            gram_ops.per_reward_gradients_affine(v, U, W, coef, coef * r, capture, extra=anchor)
            with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                v.sum().backward()
    with gram_ops.LoraCapture(net, params) as capture:
        v = net(x_t)
        U, W = nft_cotangents(v, v_old, x_t, x0, t, 1.0, num_samples=1)
        assert _message(lambda: gram_ops.per_reward_gradients_affine(v, U[:1], W, coef, coef, capture)) == (
            "--gram affine: cotangents U (1, 6, 8) and W (2, 6, 8) must have the output's shape (2, 6, 8)")
        assert _message(lambda: gram_ops.per_reward_gradients_affine(v, U, W[:1], coef, coef, capture)) == (
            "--gram affine: cotangents U (2, 6, 8) and W (1, 6, 8) must have the output's shape (2, 6, 8)")
        assert _message(lambda: gram_ops.per_reward_gradients_affine(v, U, W, coef, coef[:1], capture)) == (
            "--gram affine: coefficient shapes differ: (2, 2) vs (1, 2)")
        assert _message(lambda: capture.gradients(v, U[:, :3], coef)) == (
            "--gram affine: cotangent (2, 3, 8) must have the output's shape (2, 6, 8)")
        assert _message(lambda: capture.gradients(v, U, coef * float("nan"))) == (
            "--gram affine: per-sample coefficients contain NaN/inf (reward probabilities must be finite; "
            "marble_kit.advantages gives r = 0.5 for NaN rewards)")
    assert _message(lambda: gram_ops.LoraCapture(TinyDiT(), []).__enter__()) == (
        "--gram affine found no active trainable LoRA layer in the policy; use --gram exact for full fine-tuning")


class ConvAndMixer(nn.Module):
    """A LoRA conv (not a linear factor) and a linear layer that sees all samples as one row."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)
        self.mix = nn.Linear(4, 4)

    def forward(self, x):
        return self.mix(self.conv(x).reshape(1, -1, 4)).reshape(x.shape[0], -1, 4)


def test_affine_names_the_layer_it_cannot_capture():
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["conv", "mix"])
    net = inject_adapter_in_model(config, ConvAndMixer()).double()
    conv = [p for n, p in net.named_parameters() if "lora_" in n and "conv" in n]
    assert _message(lambda: gram_ops.LoraCapture(net, conv).__enter__()) == (
        "--gram affine supports LoRA on linear layers only; 'conv' uses Conv1d; use --gram exact")
    for param in conv:
        param.requires_grad_(False)  # only the mixer's LoRA is trained now
    mix = [p for n, p in net.named_parameters() if "lora_" in n and "mix" in n]
    with gram_ops.LoraCapture(net, mix) as capture:
        v = net(torch.ones(3, 4, 2, dtype=torch.float64))
        message = _message(lambda: capture.gradients(v, torch.ones_like(v), torch.ones(1, 3, dtype=torch.float64)))
    assert message.startswith("--gram affine: LoRA layer 'mix.lora_B' ") and message.endswith(
        "sees a leading axis of 1 but the batch has 3 samples (the layer mixes or reshapes samples); use --gram exact")
    mix[1].requires_grad_(False)  # train only the A factor: the message names it
    with gram_ops.LoraCapture(net, mix[:1]) as capture:
        v = net(torch.ones(3, 4, 2, dtype=torch.float64))
        message = _message(lambda: capture.gradients(v, torch.ones_like(v), torch.ones(1, 3, dtype=torch.float64)))
    assert message.startswith("--gram affine: LoRA layer 'mix.lora_A' sees a leading axis of 1")


def _message(call) -> str:
    with pytest.raises(MarbleError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_write_flat_grad_overwrites_by_default_in_the_parameters_dtype():
    _, params = lora_network(dtype=torch.float32)
    flat = torch.linspace(-1, 1, gram_ops.flat_size(params), dtype=torch.float64)
    gram_ops.write_flat_grad(params, flat)
    gram_ops.write_flat_grad(params, 2 * flat)  # a later step's gradient replaces the first
    assert all(p.grad.dtype == torch.float32 for p in params)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), (2 * flat).float())


def test_amsgrad_uses_the_running_maximum_after_one_step_and_after_the_gradients_shrink():
    """After one step the preconditioner is Adam's (not the identity of step 0); with amsgrad,
    once the gradients shrink, v̂ is the running maximum (not the current average)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, dtype=torch.float64))]
    for amsgrad, steps in ((False, 1), (True, 6)):
        optimizer = torch.optim.Adam(params, lr=1e-2, amsgrad=amsgrad)
        for step in range(steps):
            params[0].grad = torch.full((5,), 10.0 if step == 0 else 0.01, dtype=torch.float64)
            optimizer.step()
        state = optimizer.state[params[0]]
        second = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
        assert not amsgrad or (second > state["exp_avg_sq"]).all()
        precond = 1.0 / ((second / (1 - 0.999 ** steps)).sqrt() + 1e-8)
        grads = torch.randn(2, 5, dtype=torch.float64)
        torch.testing.assert_close(gram_ops.metric_gram(grads, optimizer, params), (grads * precond) @ grads.T)
        anchor = torch.randn(5, dtype=torch.float64)
        parts = gram_ops.adam_momentum_parts(grads, optimizer, params, anchor)
        torch.testing.assert_close(gram_ops.metric_gram(grads, optimizer, params, "adam-momentum", anchor=anchor),
                                   parts.gram())
        shifted = 0.9 * state["exp_avg"] + 0.1 * (grads + anchor)
        torch.testing.assert_close(parts.gram(), (shifted * precond) @ shifted.T)
        lam = torch.tensor([0.25, 0.75], dtype=torch.float64)
        assert parts.fused_norm(lam) == pytest.approx(float((lam @ (grads + anchor)).norm()), rel=1e-12)
        assert parts.fused_norm(lam * 0) == 0.0


def test_metric_gram_and_adam_state_messages():
    params, optimizer = adam_after_steps(1)
    grads = torch.randn(2, 11, dtype=torch.float64)
    assert _message(lambda: gram_ops.metric_gram(grads, torch.optim.SGD(params, lr=0.1), params)) == (
        "the Adam-metric Gram needs torch.optim.Adam or AdamW, got SGD; use metric=\"euclidean\"")
    assert _message(lambda: gram_ops.metric_gram(grads, optimizer, params, "sgd")) == (
        "unknown Gram metric 'sgd'; use euclidean, adam or adam-momentum")
    assert _message(lambda: gram_ops.metric_gram(grads, None, params, "adam")) == "the 'adam' Gram needs the optimizer"
    stranger = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    assert _message(lambda: gram_ops.metric_gram(torch.zeros(2, 13, dtype=torch.float64), optimizer,
                                                 [*params, stranger])) == (
        "the Adam-metric Gram: a trainable parameter is not in the optimizer")
    net, lora = lora_network(batch_norm=True)
    assert _message(lambda: gram_ops.refuse_cross_sample_ops(net)).endswith(
        "normalizes over the batch (batch-norm in training mode); use --gram exact or put that layer in eval mode")
    net.eval()
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    assert _message(lambda: gram_ops.LoraCapture(net, [*lora, extra]).__enter__()).endswith(
        "is not an active LoRA factor of the policy; train only LoRA weights or use --gram exact")


class _Parts:
    """A stand-in for MomentumGramParts whose fused norm is a + b·s at clip factor s."""

    def __init__(self, a: float, b: float):
        self.a, self.b = a, b

    def gram(self, scale):
        return scale

    def fused_norm(self, scale):
        return self.a + self.b * scale


def test_consistent_clip_scale_solves_its_fixed_point():
    """s = min(1, M/(a + b·s)) → b·s² + a·s − M = 0 when clipping; 1 when ‖d‖ ≤ M or M ≤ 0."""
    identity = lambda gram: gram  # noqa: E731 (λ(s) = s for the stand-in)
    for a, b, max_norm in ((1.0, 3.0, 2.0), (0.5, 10.0, 0.1), (4.0, 0.0, 1.0), (0.1, 0.1, 0.01)):  # ‖d‖ < 1 too
        expected = max_norm / a if b == 0 else (-a + (a * a + 4 * b * max_norm) ** 0.5) / (2 * b)
        assert gram_ops.consistent_clip_scale(_Parts(a, b), max_norm, identity) == pytest.approx(expected, rel=1e-11)
    assert gram_ops.consistent_clip_scale(_Parts(1.0, 1.0), 2.0, identity) == 1.0  # exactly at the limit
    assert gram_ops.consistent_clip_scale(_Parts(0.5, 0.5), 2.0, identity) == 1.0  # under it
    assert gram_ops.consistent_clip_scale(_Parts(1.0, 3.0), 0.0, identity) == 1.0  # clipping off
    assert gram_ops.consistent_clip_scale(_Parts(0.0, 0.0), 1.0, identity) == 1.0  # a zero update


def test_after_its_passes_the_capture_lets_an_ordinary_backward_through():
    """Inside the capture, a plain backward after the per-reward passes carries the input
    gradients as without the capture (the weight gradients come only from the capture's passes);
    the anchor pass keeps the graph when asked to."""
    net, params = lora_network()
    x_t, x0, t, v_old, v_ref, r = nft_batch(3, 2, torch.float64)
    coef = torch.full((2, 3), 1.0 / 3, dtype=torch.float64)
    inputs = x_t.clone().requires_grad_(True)
    (net(inputs) ** 2).sum().backward()
    expected = inputs.grad.clone()
    net.zero_grad()
    inputs.grad = None
    with gram_ops.LoraCapture(net, params) as capture:
        v = net(inputs)
        U, W = nft_cotangents(v, v_old, x_t, x0, t, 1.0, num_samples=1)
        gram_ops.per_reward_gradients_affine(v, U, W, coef, coef * r, capture, extra=anchor_cotangent(v, v_ref),
                                             retain_graph=True)
        (v ** 2).sum().backward()  # the graph was kept
    torch.testing.assert_close(inputs.grad, expected)
    assert all(p.grad is None for p in params)


def test_affine_with_one_sample_and_two_rewards():
    """A micro-batch of one sample with two different reward coefficients: two different rows."""
    net, params = lora_network(seed=3)
    x_t, x0, t, v_old, _, r = nft_batch(1, 2, torch.float64, seed=3)
    coef = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    grads, _ = affine_gradients(net, params, x_t, x0, t, v_old, r, coef, 0.1)
    v = net(x_t)
    exact = gram_ops.per_reward_gradients_exact(masked_losses(v, v_old, x_t, x0, t, r, coef, 0.1), params)
    torch.testing.assert_close(grads, exact)


def test_the_momentum_gram_before_the_first_step_includes_that_steps_weight_decay():
    """Step t = 1 of AdamW: P = 1, m = 0, ω = (1 − β1)·wd·θ, so E = (ω + (1−β1)g_k)(ω + (1−β1)g_l)ᵀ."""
    params, optimizer = adam_after_steps(0)
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.5
    grads = torch.randn(3, 11, dtype=torch.float64)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    shifted = 0.1 * 0.5 * theta + 0.1 * grads
    torch.testing.assert_close(gram_ops.metric_gram(grads, optimizer, params, "adam-momentum"), shifted @ shifted.T)


@pytest.mark.parametrize("kl", [0.0, 1e-2])
def test_stacked_passes_equal_the_separate_passes(kl):
    """One backward over the rows stacked 2 (3 with the anchor) times gives the gradients of the
    separate U, W (and anchor) passes; each factor hook runs once per copy-stacked pass."""
    net, params = lora_network(seed=4, bias=True)
    x_t, x0, t, v_old, v_ref, r = nft_batch(4, 3, torch.float64, seed=4)
    coef = masked_coefficients(3, 4, torch.float64, 4)
    separate, anchor = affine_gradients(net, params, x_t, x0, t, v_old, r, coef, 0.3,
                                        extra_ref=v_ref if kl else None, kl=kl)
    copies = 3 if kl else 2
    with gram_ops.LoraCapture(net, params) as capture:
        output = net(x_t.repeat(copies, 1, 1))
        v = output[:4]
        U, W = nft_cotangents(v, v_old, x_t, x0, t, 0.3, num_samples=1)
        extra = kl * anchor_cotangent(v, v_ref) if kl else None
        before = dict(gram_ops.LoraCapture.calls)
        stacked, stacked_anchor = gram_ops.per_reward_gradients_affine_stacked(
            output, U, W, coef, coef * r, capture, extra=extra)
        backward_calls = gram_ops.LoraCapture.calls["backward"] - before.get("backward", 0)
    assert backward_calls == 2 * 6  # 5 LoRA layers, mlp called twice: 12 factor calls, one pass
    torch.testing.assert_close(stacked, separate, rtol=1e-10, atol=1e-12)
    if kl:
        torch.testing.assert_close(stacked_anchor, anchor, rtol=1e-10, atol=1e-14)
    else:
        assert stacked_anchor is None and anchor is None
    with gram_ops.LoraCapture(net, params) as capture:
        output = net(x_t)
        with pytest.raises(MarbleError, match="stacked output must hold 2 copies"):
            gram_ops.per_reward_gradients_affine_stacked(output, U, W, coef, coef * r, capture)


def test_coefficients_off_the_cpu_are_checked_after_the_passes():
    """No host read between passes: a device pass records a flag that verify() (after the last
    pass, or leaving the capture) reads once; CPU coefficients are checked at once."""
    net, params = lora_network()
    with gram_ops.LoraCapture(net, params) as capture:
        capture._unchecked.append(torch.tensor(False))  # what a NaN coefficient on a GPU leaves
        with pytest.raises(MarbleError, match="NaN/inf"):
            capture.verify()
        assert capture._unchecked == []
        capture._unchecked.append(torch.tensor(True))
    assert capture._unchecked == []
    with pytest.raises(MarbleError, match="NaN/inf"), gram_ops.LoraCapture(net, params) as capture:
        capture._unchecked.append(torch.tensor(False))
