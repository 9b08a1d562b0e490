"""Untrusted files never run code: every place a user can hand vkd a weights file refuses a malicious pickle.

The payload is a pickle whose ``__reduce__`` creates a marker file when it is unpickled. Each test first proves
that the payload fires under plain ``pickle.loads`` / ``torch.load(weights_only=False)``, then hands the file to
vkd (through the CLI where there is a flag for it) and checks that vkd reports one clear line and that the
marker does not exist. Both the legacy pickle format and torch's zip format are tried. YAML configs are parsed
with ``yaml.safe_load``: a ``!!python/object/apply`` tag is refused the same way.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli as _cli
from cli_helpers import set_args as _sets

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.timeout(180)]


class Payload:
    """Unpickling this runs ``open(marker, "w")``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def write_payload(path: Path, marker: Path, fmt: str, wrap: str = "state_dict") -> Path:
    """A malicious weights file ``{wrap: Payload, "weight": tensor}``: a plain pickle (``pickle``), torch's legacy
    format (``torch-legacy``) or torch's zip format (``torch-zip``)."""
    obj = {wrap: Payload(marker), "weight": torch.zeros(2)}
    if fmt == "pickle":
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "torch-zip")
    return path


@pytest.fixture(params=["pickle", "torch-legacy", "torch-zip"])
def evil(request, tmp_path):
    """``make(name) -> path`` of a malicious file, after checking the payload really runs when trusted."""
    marker = tmp_path / "PWNED"

    def make(name: str, wrap: str = "state_dict") -> Path:
        path = write_payload(tmp_path / name, marker, request.param, wrap)
        if request.param == "pickle":  # the payload is live...
            with open(path, "rb") as fh:
                pickle.load(fh)
        else:
            torch.load(path, weights_only=False)
        assert marker.is_file()
        marker.unlink()  # ...and the marker is gone before vkd touches the file
        return path

    make.marker = marker
    return make


def refused(code: int, err: str, marker: Path, *fragments: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("vkd: error:")]
    assert not marker.exists(), "the pickle's code ran"
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]






SKT_TINY = ["train.steps=1", "train.batch_size=2", "data.synthetic.num_train=2", "data.synthetic.num_test=1",
            "data.synthetic.height=32", "data.synthetic.width=32", "eval.tile_size=0"]


def test_skt_teacher_checkpoint(tmp_path, capsys, evil):
    path = evil("teacher.pth")
    code, err = _cli(capsys, "distill", "skt", *_sets(f"run.output_dir={tmp_path}", f"data.root={tmp_path / 'c'}",
                                                     f"teacher.run={path}", *SKT_TINY))
    refused(code, err, evil.marker, "cannot read checkpoint", str(path))


def test_skt_vgg_weights(tmp_path, capsys, evil):
    path = evil("vgg16.pth")
    code, err = _cli(capsys, "distill", "skt-teacher", *_sets(
        f"run.output_dir={tmp_path}", f"data.root={tmp_path / 'c'}", f"model.weights={path}", *SKT_TINY))
    refused(code, err, evil.marker, "cannot read checkpoint")


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("fid_images")
    for side in ("real", "fake"):
        (root / side).mkdir()
        for k in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(root / side / f"{k}.png")
    return root


def test_fid_extractor(capsys, evil, real_dirs):
    for name in ("extractor.pt", "extractor.pth"):
        path = evil(name)
        code, err = _cli(capsys, "fid", "--real", real_dirs / "real", "--fake", real_dirs / "fake", "--extractor",
                         path, "--device", "cpu")
        refused(code, err, evil.marker, "neither a TorchScript module nor a vkd classifier")


def test_fid_inception_weights(capsys, evil, real_dirs):
    path = evil("pt_inception.pth")
    code, err = _cli(capsys, "fid", "--real", real_dirs / "real", "--fake", real_dirs / "fake", "--extractor",
                     "inception", "--inception-weights", path, "--device", "cpu")
    refused(code, err, evil.marker, "refusing to load Inception weights")


def test_hello_teacher_checkpoint_and_init_checkpoint(tmp_path, capsys, evil):
    path = evil("resnet18.pth")
    code, err = _cli(capsys, "distill", "hello", *_sets(f"run.output_dir={tmp_path}", f"teacher.checkpoint={path}"))
    refused(code, err, evil.marker, "cannot read checkpoint")
    code, err = _cli(capsys, "distill", "hello-teacher", *_sets(f"run.output_dir={tmp_path}",
                                                                f"model.init_checkpoint={path}", "train.steps=1"))
    refused(code, err, evil.marker, "cannot read checkpoint")


def test_resume_from_a_strangers_checkpoint(tmp_path, capsys, evil):
    """A checkpoint whose meta.json lists the right sha256 of a malicious training_state.pt."""
    sets = _sets(f"run.output_dir={tmp_path}", "train.steps=4", "train.checkpoint_every=2")
    assert _cli(capsys, "distill", "toy", *sets)[0] == 0
    ckpt = tmp_path / "toy" / "default" / "checkpoints" / "checkpoint-2"
    path = evil("training_state.pt", wrap="optimizers")
    (ckpt / "training_state.pt").write_bytes(path.read_bytes())
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["training_state.pt"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))
    code, err = _cli(capsys, "distill", "toy", *sets, "--resume", ckpt)
    refused(code, err, evil.marker, "refusing to load")


def test_boot_teacher_directory(tmp_path, evil):
    """A diffusers teacher directory (``teacher.path``) whose UNet weights are a malicious ``.bin``: diffusers
    reads it with weights_only=True. Called through the loader, not ``main()``: diffusers' logging handler
    keeps the stderr of the test that first imported it, which breaks in-process capture."""
    from diffusers import DDPMScheduler, UNet2DModel

    from vkd.boot.teacher import load_diffusers_teacher, save_teacher
    from vkd.errors import UserError

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    teacher = save_teacher(unet, DDPMScheduler(), tmp_path / "teacher")
    (teacher / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    evil("diffusion_pytorch_model.bin").rename(teacher / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="cannot load the UNet") as info:
        load_diffusers_teacher(str(teacher))
    assert not evil.marker.exists()
    assert "\n" not in str(info.value)


def test_open_clip_weights(tmp_path, evil):
    """open_clip reads local CLIP weights (HeLlO's clip.model_name / pretrained, Feature 3DGS's teacher) with
    weights_only=True: a tiny-CLIP directory whose weights are a malicious pickle is refused."""
    from vkd.errors import UserError
    from vkd.models.tiny_clip import TinyClipConfig, load_clip, pretrain_tiny_clip

    clip_dir = Path(pretrain_tiny_clip(torch.rand(4, 3, 8, 8), ["a", "b", "a", "b"],
                                       TinyClipConfig(image_size=8, patch_size=4, width=16, layers=1, embed_dim=16,
                                                      text_width=16, steps=1, batch_size=4),
                                       cache_dir=tmp_path / "cache", progress=False))
    (clip_dir / "open_clip_model.safetensors").unlink()
    evil("open_clip_pytorch_model.bin").rename(clip_dir / "open_clip_pytorch_model.bin")
    with pytest.raises(UserError) as info:
        load_clip(str(clip_dir))
    assert not evil.marker.exists()
    assert "\n" not in str(info.value)


def test_yaml_config_with_python_tags(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.yaml"
    config.write_text(f"task: toy\nrun: !!python/object/apply:builtins.exec [\"open('{marker}', 'w').close()\"]\n")
    code, err = _cli(capsys, "distill", "toy", "--config", config)
    refused(code, err, marker, "cannot parse")
