"""gsplat.strategy.DefaultStrategy runs unchanged on the torch backend's meta (CPU)."""

import pytest
import torch
from gsplat.strategy import DefaultStrategy

from vkd.render import rasterization


def _setup(N=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    opac = torch.rand(N, generator=g) * 0.8 + 0.1
    opac[:20] = 0.005  # below prune_opa: these get pruned
    params = torch.nn.ParameterDict(
        {
            "means": torch.nn.Parameter(torch.randn(N, 3, generator=g) * 0.4 + torch.tensor([0.0, 0.0, 3.0])),
            "scales": torch.nn.Parameter(torch.log(torch.rand(N, 3, generator=g) * 0.05 + 0.03)),
            "quats": torch.nn.Parameter(torch.randn(N, 4, generator=g)),
            "opacities": torch.nn.Parameter(torch.logit(opac)),
            "features": torch.nn.Parameter(torch.rand(N, 5, generator=g)),  # extra entry: split/pruned too
        }
    )
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    viewmats = torch.eye(4).repeat(2, 1, 1)
    viewmats[1, 0, 3] = 0.2
    Ks = torch.tensor([[30.0, 0, 16], [0, 30.0, 12], [0, 0, 1]]).repeat(2, 1, 1)
    return params, optimizers, viewmats, Ks


def _render(params, viewmats, Ks):
    return rasterization(
        params["means"],
        params["quats"],
        torch.exp(params["scales"]),
        torch.sigmoid(params["opacities"]),
        params["features"],
        viewmats,
        Ks,
        32,
        24,
        backend="torch",
    )


def test_meta_contract():
    params, _, viewmats, Ks = _setup()
    img, alpha, meta = _render(params, viewmats, Ks)
    N = len(params["means"])
    for key in (
        "width",
        "height",
        "n_cameras",
        "radii",
        "gaussian_ids",
        "means2d",
        "depths",
        "conics",
        "opacities",
    ):
        assert key in meta
    assert meta["gaussian_ids"] is None and meta["n_cameras"] == 2
    assert meta["width"] == 32 and meta["height"] == 24
    assert meta["radii"].shape == (2, N, 2) and meta["radii"].dtype == torch.int32
    assert meta["means2d"].shape == (2, N, 2) and not meta["means2d"].is_leaf
    assert meta["tiles_per_gauss"].shape == (2, N)


def test_means2d_grad_matches_finite_difference_direction():
    """meta['means2d'].grad is ∂L/∂means2d: moving means2d against it lowers the loss."""
    params, _, viewmats, Ks = _setup(N=60)
    target = torch.rand(2, 24, 32, 5)
    img, _, meta = _render(params, viewmats, Ks)
    meta["means2d"].retain_grad()
    loss = ((img - target) ** 2).mean()
    loss.backward()
    g = meta["means2d"].grad
    assert g is not None and g.shape == meta["means2d"].shape and g.abs().sum() > 0
    vis = (meta["radii"] > 0).all(-1)
    assert (g[~vis] == 0).all()


def _train(strategy, steps, seed=0):
    params, optimizers, viewmats, Ks = _setup(seed=seed)
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state()
    target = torch.rand(2, 24, 32, 5, generator=torch.Generator().manual_seed(seed))
    sizes = [len(params["means"])]
    for step in range(steps):
        img, _, meta = _render(params, viewmats, Ks)
        strategy.step_pre_backward(params, optimizers, state, step, meta)
        loss = ((img - target) ** 2).mean()
        loss.backward()
        strategy.step_post_backward(params, optimizers, state, step, meta, packed=False)
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        sizes.append(len(params["means"]))
        assert all(len(p) == sizes[-1] for p in params.values())  # every entry (features too) follows
        assert all(len(opt.param_groups[0]["params"][0]) == sizes[-1] for opt in optimizers.values())
    return params, state, sizes


def test_default_strategy_prunes_transparent_gaussians():
    # Growth disabled: the first refinement (step 2) removes exactly the 20 Gaussians with opacity 0.005.
    strategy = DefaultStrategy(
        refine_start_iter=1, refine_every=2, reset_every=1000, grow_grad2d=1e9, prune_opa=0.05
    )
    params, state, sizes = _train(strategy, 4)
    assert sizes == [200, 200, 200, 180, 180]
    assert torch.sigmoid(params["opacities"]).min() > 0.05
    assert state["grad2d"].shape == (180,)


def test_default_strategy_grows():
    strategy = DefaultStrategy(
        refine_start_iter=1, refine_every=2, reset_every=1000, grow_grad2d=1e-6, prune_opa=0.05
    )
    params, state, sizes = _train(strategy, 5)
    assert sizes[-1] > sizes[0]  # duplicated / split from the accumulated means2d gradients
    assert state["count"].shape == (sizes[-1],)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mcmc_strategy_gpu():
    from gsplat.strategy import MCMCStrategy

    params, optimizers, viewmats, Ks = _setup()
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.detach().cuda()) for k, v in params.items()})
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strategy = MCMCStrategy(cap_max=400, refine_start_iter=1, refine_every=2)
    state = strategy.initialize_state()
    for step in range(5):
        img, _, meta = _render(params, viewmats.cuda(), Ks.cuda())
        img.mean().backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        strategy.step_post_backward(params, optimizers, state, step, meta, lr=1e-3)
    assert len(params["means"]) <= 400


# ---- vkd.render.strategy.DensifyStrategy: vkd's schedule over gsplat's surgery ----------------------------------


def _opacity_trace(strategy, steps):
    """Max sigmoid opacity right after each step_post_backward (before the optimizer moves it again)."""
    params, optimizers, viewmats, Ks = _setup()
    state = strategy.initialize_state()
    target = torch.rand(2, 24, 32, 5, generator=torch.Generator().manual_seed(0))
    trace = []
    for step in range(steps):
        img, _, meta = _render(params, viewmats, Ks)
        strategy.step_pre_backward(params, optimizers, state, step, meta)
        ((img - target) ** 2).mean().backward()
        strategy.step_post_backward(params, optimizers, state, step, meta, packed=False)
        trace.append(float(torch.sigmoid(params["opacities"].detach()).max()))
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    return trace, optimizers


def test_opacity_reset_fires_on_its_steps_and_not_at_step_0():
    """3DGS resets every opacity to at most 2 x prune_opa on each reset step (gsplat 1.5.3's DefaultStrategy never
    does: its `step % reset_every == 0 & step > 0` is a chained comparison ending in `0 > 0`)."""
    from vkd.render.strategy import DensifyStrategy, opacity_reset_steps

    prune_opa = 0.005
    strategy = DensifyStrategy(refine_start_iter=1000, refine_stop_iter=100, reset_every=3, prune_opa=prune_opa)
    trace, optimizers = _opacity_trace(strategy, 8)
    assert opacity_reset_steps(3, 100, 8) == [3, 6]
    for step in (3, 6):
        assert trace[step] <= 2 * prune_opa * (1 + 1e-5), (step, trace)
    assert min(trace[:3]) > 0.5, trace  # no reset before the first reset step (gsplat 1.5.2 reset at step 0)
    # the reset also clears the opacity optimizer's moments (gsplat's reset_opa surgery)
    exp_avg = optimizers["opacities"].state[optimizers["opacities"].param_groups[0]["params"][0]]["exp_avg"]
    assert exp_avg.abs().max() < 1e-2  # one Adam step after the reset at step 6


def test_no_reset_after_refine_stop():
    from vkd.render.strategy import DensifyStrategy

    trace, _ = _opacity_trace(DensifyStrategy(refine_start_iter=1000, refine_stop_iter=3, reset_every=3), 5)
    assert min(trace) > 0.5


def test_densify_strategy_grows_and_prunes_as_default_strategy():
    """Away from reset steps the refine is gsplat's own (same selection and surgery)."""
    from vkd.render.strategy import DensifyStrategy

    kwargs = dict(refine_start_iter=1, refine_every=2, reset_every=1000, grow_grad2d=1e-6, prune_opa=0.05)
    ours = _train(DensifyStrategy(**kwargs), 5)
    torch.manual_seed(0)
    theirs = _train(DefaultStrategy(**kwargs), 5)
    assert ours[2] == theirs[2] and ours[2][-1] > ours[2][0]  # the same Gaussian counts at every step
