"""BOOT algebra: signal-space DDIM identity, Δ options, boundary at init, gradient isolation, gradcheck."""

from __future__ import annotations

import pytest
import torch
from boot_helpers import save_tiny_teacher
from diffusers import DDIMScheduler, DDPMScheduler

from vkd.boot.losses import (
    BootLoss,
    bootstrap_loss,
    bootstrap_weights,
    boundary_loss,
    ddim_step,
    exact_boundary_target,
    resolve_time_weight,
    signal_ddim_step,
    x0_gain,
    x0_gain_weight,
)
from vkd.boot.schedule import NoiseSchedule, ddim_timesteps
from vkd.boot.student import BootStudent
from vkd.boot.teacher import load_diffusers_teacher


def _schedule() -> NoiseSchedule:
    return NoiseSchedule(DDPMScheduler().alphas_cumprod)


def test_signal_space_step_equals_diffusers_ddim_step():
    """y_s = y_t + Δ(t,s)(f − y_t) is exactly a diffusers DDIM step, read in signal space (float64)."""
    sched = DDIMScheduler(prediction_type="sample", clip_sample=False, timestep_spacing="trailing",
                          set_alpha_to_one=True)
    sched.set_timesteps(50)
    ns = _schedule()
    assert sched.timesteps.tolist() == ddim_timesteps(1000, 50)[:-1]
    gen = torch.Generator().manual_seed(0)
    for t in sched.timesteps.tolist():
        s = t - 1000 // 50  # diffusers' prev_timestep; -1 at the end → final_alpha_cumprod = 1
        eps = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
        x_t = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
        f = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)  # the teacher's x0 at (x_t, t)
        x_s = sched.step(f, t, x_t).prev_sample
        tt, ss = torch.full((2,), float(t)), torch.full((2,), float(max(s, -1)))
        a_t, s_t = ns.alpha_sigma(tt)
        a_s, s_s = ns.alpha_sigma(ss)
        torch.testing.assert_close(ddim_step(x_t, f, a_t, s_t, a_s, s_s), x_s, rtol=1e-5, atol=1e-6)
        # exact identity in our own float64 arithmetic (diffusers' coefficients are float32 roots)
        x_s64 = ddim_step(x_t, f, a_t, s_t, a_s, s_s)
        bc = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
        y_t = (x_t - bc(s_t) * eps) / bc(a_t)
        y_s = signal_ddim_step(y_t, f, ns.delta(tt, ss))
        torch.testing.assert_close(y_s, (x_s64 - bc(s_s) * eps) / bc(a_s), rtol=1e-12, atol=1e-12)


def test_delta_reference_values_and_first_order_limit():
    ns = _schedule()
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    # spec §3 anchors on the linear schedule
    assert float(ns.delta(t(500), t(490))) == pytest.approx(0.0531, abs=1e-4)
    assert float(ns.delta(t(500), t(490), "first_order")) == pytest.approx(0.0546, abs=1e-4)
    assert float(ns.delta(t(50), t(30))) == pytest.approx(0.366, abs=1e-3)
    assert float(ns.delta(t(50), t(30), "first_order")) == pytest.approx(0.456, abs=1e-3)
    # exact and first order agree as δ → 0 (fractional timesteps, λ-interpolated)
    gaps = []
    for d in (10.0, 1.0, 1e-1, 1e-2):
        ex, fo = float(ns.delta(t(500), t(500 - d))), float(ns.delta(t(500), t(500 - d), "first_order"))
        gaps.append(abs(ex - fo) / fo)
        assert gaps[-1] == pytest.approx(fo / 2, rel=0.05)  # 1 − e^{−x} = x − x²/2 + …
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-4
    # clean endpoint: Δ(t, −1) = 1 in both modes
    for mode in ("exact", "first_order"):
        assert float(ns.delta(t(19), t(-1), mode)) == 1.0
        assert float(ns.delta(t(999), t(-1), mode)) == 1.0


def test_exact_boundary_target_is_ddim_from_eps():
    ns = _schedule()
    eps = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    T = torch.full((3,), 999.0)
    a, s = ns.alpha_sigma(T)
    y_T = exact_boundary_target(eps, a, s)
    # the implied noisy state α_T·y_T + σ_T·ε is ε itself
    torch.testing.assert_close(a.view(-1, 1, 1, 1) * y_T + s.view(-1, 1, 1, 1) * eps, eps)
    torch.testing.assert_close(y_T, ((1 - s) / a).view(-1, 1, 1, 1) * eps)


def test_weights():
    delta = torch.tensor([0.5, 1.0], dtype=torch.float64)
    steps = torch.tensor([20.0, 20.0], dtype=torch.float64)
    torch.testing.assert_close(bootstrap_weights(delta, steps), torch.tensor([4.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(bootstrap_weights(delta, steps, "inv_delta_sq"), torch.full((2,), 1 / 400.0,
                                                                                            dtype=torch.float64))
    torch.testing.assert_close(bootstrap_weights(delta, steps, "none"), torch.ones(2, dtype=torch.float64))


def test_losses_gradcheck_float64():
    pred = torch.randn(3, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda p: bootstrap_loss(p, target, w), (pred,))
    assert torch.autograd.gradcheck(lambda p: boundary_loss(p, target), (pred,))
    # per-sample weighting: mean over batch of w · mean over pixels
    ref = (w * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(bootstrap_loss(pred, target, w), ref)


@pytest.mark.parametrize("prediction_type,parameterization", [
    ("epsilon", "teacher_to_x0"), ("v_prediction", "teacher_to_x0"), ("sample", "teacher_to_x0"),
    ("v_prediction", "preconditioned"), ("sample", "auto")])  # v's preconditioned band reaches T
def test_boundary_loss_zero_at_initialisation(tmp_path, prediction_type, parameterization):
    teacher = load_diffusers_teacher(str(save_tiny_teacher(tmp_path / "t", prediction_type)), clip_x0=False)
    student = BootStudent.from_teacher(teacher, parameterization)
    eps = torch.randn(4, 1, 8, 8)
    T = torch.full((4,), 999.0, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(student(eps, T), teacher(eps, T), rtol=0, atol=0)
    loss = BootLoss(teacher, boundary_target="teacher")
    t = torch.tensor([999.0, 500.0, 100.0, 19.0], dtype=torch.float64)
    out = loss(student, eps, t, torch.clamp(t - 20, min=-1))
    assert float(out["boundary"]) == 0.0
    assert float(out["bootstrap"]) > 0.0  # the incremental improvement term is non-zero


def test_gradients_flow_only_through_student_at_s(tmp_path):
    teacher = load_diffusers_teacher(str(save_tiny_teacher(tmp_path / "t", "epsilon", num_classes=3)),
                                     clip_x0=False, guidance_scale=2.0).double()  # float64: exact comparison
    student = BootStudent.from_teacher(teacher)
    loss = BootLoss(teacher, boundary_weight=0.0)  # isolate L_BS
    eps = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([600.0, 300.0, 19.0], dtype=torch.float64)
    s = torch.tensor([580.0, 280.0, -1.0], dtype=torch.float64)
    c = torch.tensor([0, 1, 2])
    tg = loss.targets(student, eps, t, s, c)
    for key in ("y_t", "x_hat", "f_t", "target", "boundary"):
        assert not tg[key].requires_grad, key
    out = loss(student, eps, t, s, c)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    got = [p.grad.clone() for p in student.parameters()]
    # the same gradient from g(ε, s) alone against the detached target
    student.zero_grad()
    w = bootstrap_weights(tg["delta"], t - s)
    bootstrap_loss(student(eps, s, c), tg["target"], w).backward()
    for g_ref, p in zip(got, student.parameters(), strict=True):
        torch.testing.assert_close(g_ref, p.grad, rtol=1e-8, atol=1e-10)
    assert any(float(g.abs().sum()) > 0 for g in got)


def test_time_weight_callable(tmp_path):
    teacher = load_diffusers_teacher(str(save_tiny_teacher(tmp_path / "t", "sample")), clip_x0=False)
    student = BootStudent.from_teacher(teacher)
    eps = torch.randn(2, 1, 8, 8)
    t = torch.tensor([500.0, 100.0], dtype=torch.float64)
    s = t - 20
    base = BootLoss(teacher, boundary_weight=0.0)(student, eps, t, s)["bootstrap"]
    doubled = BootLoss(teacher, boundary_weight=0.0, time_weight=lambda tt: 2 * torch.ones_like(tt))(
        student, eps, t, s)["bootstrap"]
    torch.testing.assert_close(doubled, 2 * base)


@pytest.mark.parametrize("prediction_type,expected", [
    ("epsilon", "sample"), ("v_prediction", "sample"), ("sample", "teacher_to_x0")])
def test_auto_student_is_an_x0_head(tmp_path, prediction_type, expected):
    """``auto``: an x0 head for ε/v teachers (it beat ``preconditioned`` on the digits benchmark), the identity
    for x0 teachers; the x0 head's output is the network's output at every t."""
    teacher = load_diffusers_teacher(str(save_tiny_teacher(tmp_path / "t", prediction_type)), clip_x0=False)
    student = BootStudent.from_teacher(teacher)
    assert student.parameterization == expected and student.lambda_range is None
    eps, t = torch.randn(3, 1, 8, 8), torch.tensor([999.0, 400.0, -1.0], dtype=torch.float64)
    with torch.no_grad():
        raw = student.raw(eps, t)
        want = raw if expected == "sample" else teacher.to_x0(raw, eps, t)
        torch.testing.assert_close(student(eps, t), want, rtol=0, atol=0)


def test_x0_gain_weight_lowers_only_the_noise_amplified_steps_of_an_epsilon_teacher():
    sched = _schedule()  # DDPM's linear β: σ_T/α_T ≈ 157
    t = torch.tensor([999.0, 800.0, 500.0, 200.0, 19.0, -1.0], dtype=torch.float64)
    a, s = sched.alpha_sigma(t.clamp(min=0.0))
    torch.testing.assert_close(x0_gain(sched, "epsilon", t), s / a)
    torch.testing.assert_close(x0_gain(sched, "v_prediction", t), s)
    w_eps = x0_gain_weight(sched, "epsilon", t)
    torch.testing.assert_close(w_eps, 1.0 / (1.0 + (s / a / torch.exp(torch.tensor(2.0, dtype=torch.float64))) ** 2))
    assert float(w_eps[0]) < 3e-3 and float(w_eps[3]) > 0.99  # ≈ 1/(1+(157/7.39)²) at T; ≈ 1 once σ/α < 1
    assert bool((w_eps[1:] >= w_eps[:-1]).all())  # non-decreasing towards the clean end
    for ptype in ("v_prediction", "sample"):  # gain ≤ 1: the weight stays within 2 % of 1
        assert float(x0_gain_weight(sched, ptype, t).min()) > 0.98
    # where k_t = e^λc the weight is 1/2
    k = x0_gain(sched, "epsilon", torch.tensor([600.0], dtype=torch.float64))
    torch.testing.assert_close(x0_gain_weight(sched, "epsilon", torch.tensor([600.0], dtype=torch.float64),
                                              float(torch.log(k))), torch.tensor([0.5], dtype=torch.float64))
    assert resolve_time_weight("auto", "epsilon") == "inv_x0_gain"
    assert resolve_time_weight("auto", "v_prediction") == resolve_time_weight("auto", "sample") == "uniform"
    assert resolve_time_weight("uniform", "epsilon") == "uniform"


def test_inv_x0_gain_time_weight_multiplies_the_bootstrap_weights(tmp_path):
    teacher = load_diffusers_teacher(str(save_tiny_teacher(tmp_path / "t", "epsilon")), clip_x0=False)
    student = BootStudent.from_teacher(teacher)
    eps = torch.randn(3, 1, 8, 8)
    t = torch.tensor([990.0, 500.0, 100.0], dtype=torch.float64)
    s = t - 20
    auto = BootLoss(teacher, boundary_weight=0.0, time_weight="auto")
    assert auto.time_weight == "inv_x0_gain"
    tg = auto.targets(student, eps, t, s, None)
    w = bootstrap_weights(tg["delta"], t - s) * x0_gain_weight(teacher.schedule, "epsilon", t, 1.5)
    got = BootLoss(teacher, boundary_weight=0.0, time_weight="inv_x0_gain", x0_gain_cutoff=1.5)(student, eps, t, s)
    with torch.no_grad():
        ref = bootstrap_loss(student(eps, s), tg["target"], w)
    torch.testing.assert_close(got["bootstrap"], ref)
    uniform = BootLoss(teacher, boundary_weight=0.0)(student, eps, t, s)["bootstrap"]
    assert float(got["bootstrap"]) < float(uniform)  # the weights are < 1, most at t = 990


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_preconditioned_student_is_the_teacher_inside_its_band(tmp_path, prediction_type):
    """g(ε, t) = f(ε, t) at step 0 where λ_t ∈ [λ_min, λ_max]; outside, the coefficients are the band's edge."""
    teacher = load_diffusers_teacher(str(save_tiny_teacher(tmp_path / "t", prediction_type)), clip_x0=False)
    student = BootStudent.from_teacher(teacher, "preconditioned")
    assert student.parameterization == "preconditioned"
    lo, hi = student.lambda_range
    t = torch.arange(0, 1000, dtype=torch.float64)
    lam = teacher.schedule.lam(t)
    inside = t[(lam >= lo) & (lam <= hi)]
    assert inside.numel() > 50  # the band covers a real stretch of the schedule
    eps = torch.randn(inside.numel(), 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(student(eps, inside), teacher(eps, inside), rtol=1e-5, atol=1e-5)
    # the output weight |∂g/∂out| stays within the band's range at every t, clean endpoint included
    _, sigma = student.coefficients(torch.cat([t, torch.tensor([-1.0], dtype=torch.float64)]))
    alpha, _ = student.coefficients(torch.cat([t, torch.tensor([-1.0], dtype=torch.float64)]))
    weight = sigma / alpha if prediction_type == "epsilon" else sigma
    assert float(weight.max() / weight.min()) < 3.0
    a, s = teacher.schedule.alpha_sigma(t)
    plain = s / a if prediction_type == "epsilon" else s
    assert float(plain.max() / plain.min()) > 50  # teacher_to_x0 on the same schedule: 100 (v), 15,700 (ε)
