"""Shared pieces of the Feature 3DGS tests: a text-aligned stand-in teacher and the tiny synthetic-scene config."""

from __future__ import annotations

import textwrap

import torch

from vkd.config import load_config
from vkd.feature3dgs.config import Feature3DGSConfig
from vkd.feature3dgs.distiller import build_field
from vkd.feature3dgs.model import GaussianField

TEACHER_DIM = 6  # the stub teacher's width

# A text-aligned stand-in teacher: per-patch colour features, and "text" embeddings of the colour words. It is
# imported through teacher.target exactly like a user's plug-in (the stub_teacher fixture writes it).
STUB = textwrap.dedent('''
    import torch
    import torch.nn.functional as F

    COLOURS = {"red": (0.86, 0.16, 0.12), "blue": (0.14, 0.3, 0.88), "green": (0.16, 0.72, 0.22),
               "yellow": (0.93, 0.8, 0.1), "floor": (0.62, 0.58, 0.52)}

    def _embed(rgb):
        return F.normalize(torch.cat([rgb, 1 - rgb], 1), dim=1)

    class Teacher:
        def __call__(self, images):
            return _embed(F.avg_pool2d(images, 4))  # [B, 6, H/4, W/4]

        def encode_text(self, prompts):
            out = []
            for p in prompts:
                rgb = next((c for k, c in COLOURS.items() if k in p), (0.5, 0.5, 0.5))
                out.append(_embed(torch.tensor(rgb).view(1, 3, 1, 1)).flatten())
            return torch.stack(out)

    teacher = Teacher()
    no_text = lambda images: F.avg_pool2d(images, 4)
''')


def tiny_cfg(tmp_path, name="tiny", extra=()):
    over = [
        f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}",
        f"data.synthetic.out_dir={tmp_path / 'scene'}", "data.synthetic.num_views=8", "data.synthetic.resolution=24",
        "data.synthetic.supersample=1", "data.synthetic.num_points=250", "data.test_every=4",
        "teacher.kind=callable", "teacher.target=f3d_stub_teacher:teacher",
        "model.render_dim=4", "model.sh_degree=0",
        "optim.features_lr=0.03", "optim.decoder_lr=0.01",
        "train.steps=40", "train.log_every=20", "train.checkpoint_every=40",
        "densify.refine_start=10", "densify.refine_every=10", "densify.refine_stop=30",
        "eval.fps_repeats=1", "compute.cpu_threads=1", *extra,
    ]
    return load_config(Feature3DGSConfig, None, over, task="feature3dgs")


def trained_like(cfg, scene, seed: int) -> GaussianField:
    """The scene's point init with every geometry and colour parameter perturbed: a stand-in for a trained scene."""
    field = build_field(cfg, scene, TEACHER_DIM)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p = field.params
        p["scales"].add_(0.3 * torch.randn(p["scales"].shape, generator=g))
        p["quats"].copy_(torch.randn(p["quats"].shape, generator=g))
        p["opacities"].copy_(torch.randn(p["opacities"].shape, generator=g))
        p["sh0"].add_(0.3 * torch.randn(p["sh0"].shape, generator=g))
        if "shN" in p:
            p["shN"].copy_(0.3 * torch.randn(p["shN"].shape, generator=g))
    field.active_sh_degree = field.sh_degree
    return field.eval()
