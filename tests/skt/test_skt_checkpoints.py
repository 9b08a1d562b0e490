"""``vkd count --weights``: community checkpoints in their own key layouts and containers, built here with tiny
random weights, are recognised, rebuilt at their width, normalised as their project trained, and count exactly
what the same weights count in vkd's modules."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from vkd.cli import main
from vkd.errors import UserError
from vkd.skt.checkpoints import (
    C3_SHHA_MEAN,
    C3_SHHA_STD,
    is_vgg_state_file,
    load_counter,
    load_reference_checkpoint,
)
from vkd.skt.commands import evaluate
from vkd.skt.count import count_frame
from vkd.skt.datasets import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from vkd.skt.models import CSRNet, VGG19Regressor, count_parameters

H, W = 45, 61  # not multiples of 8 or 16: floor and ceil pooling give different grids


def _positive(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights whose densities are clearly non-zero (so equal counts mean something)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.3 / (m.in_channels * 9) ** 0.5)
                m.bias.uniform_(0.0, 0.05)
    return model.eval()


def _image(tmp_path: Path, seed: int = 1) -> tuple[Path, np.ndarray]:
    arr = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = tmp_path / f"img{seed}.png"
    Image.fromarray(arr).save(path)
    return path, arr


def _student_state(model: CSRNet) -> dict[str, torch.Tensor]:
    """An official SKT student dict (conv{stage}_{k}.0.*, conv5_0.*, transform*) for a 1/4 CSRNet's weights."""
    names = ["conv0_0", "conv0_1", "conv1_0", "conv1_1", "conv2_0", "conv2_1", "conv2_2", "conv3_0", "conv3_1",
             "conv3_2"] + [f"conv4_{k}" for k in range(6)]
    convs = [m for m in list(model.frontend) + list(model.backend) if isinstance(m, torch.nn.Conv2d)]
    state = {}
    for name, conv in zip(names, convs, strict=True):
        state[f"{name}.0.weight"], state[f"{name}.0.bias"] = conv.weight, conv.bias
    state["conv5_0.weight"], state["conv5_0.bias"] = model.output_layer.weight, model.output_layer.bias
    state["transform0_0.0.weight"], state["transform0_0.0.bias"] = torch.zeros(64, 16, 1, 1), torch.zeros(64)
    return state


def _save_csrnet_pytorch(path: Path, model: CSRNet) -> None:
    # CSRNet-pytorch's save_checkpoint dict, DataParallel keys, legacy (pre-1.6) pickle, numpy best_prec1
    torch.save({"epoch": 400, "arch": None, "best_prec1": np.float64(66.4),
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-7, "momentum": 0.95, "params": [0, 1]}]}},
               path, _use_new_zipfile_serialization=False)


# family -> (vkd module with the weights, how the file is written, width text, reference count of a [3,H,W] input)
def _csrnet_ref(model, x):
    return float(model(x[None]).sum())


def _c3_ref(model, x):
    # C³-Framework's CSRNet.forward ends with F.upsample(x, scale_factor=8) (nearest); test.py divides by LOG_PARA
    return float(F.interpolate(model(x[None]), scale_factor=8, mode="nearest").sum()) / 100.0


CASES = {
    "csrnet-pytorch": (lambda: CSRNet(4, ceil_mode=False), _save_csrnet_pytorch, "CSRNet 1/4", _csrnet_ref,
                       IMAGENET_MEAN, IMAGENET_STD),
    "skt-student": (lambda: CSRNet(4, ceil_mode=True),
                    lambda p, m: torch.save({"epoch": 3, "arch": "quarter_vgg", "state_dict": _student_state(m),
                                             "mae_best_prec1": 71.5, "mse_best_prec1": 114.4}, p),
                    "CSRNet 1/4", _csrnet_ref, IMAGENET_MEAN, IMAGENET_STD),
    "skt-teacher": (lambda: CSRNet(8, ceil_mode=True),
                    lambda p, m: torch.save({"epoch": 3, "state_dict": m.state_dict(), "mae_best_prec1": 68.4}, p),
                    "CSRNet 1/8", _csrnet_ref, IMAGENET_MEAN, IMAGENET_STD),
    "c3-framework": (lambda: CSRNet(8, ceil_mode=False),
                     lambda p, m: torch.save({f"CCN.module.{k}": v for k, v in m.state_dict().items()}, p),
                     "CSRNet 1/8", _c3_ref, C3_SHHA_MEAN, C3_SHHA_STD),
    "c3-latest-state": (lambda: CSRNet(8, ceil_mode=False),
                        lambda p, m: torch.save({"net": {f"CCN.{k}": v for k, v in m.state_dict().items()},
                                                 "epoch": 5, "exp_name": "x"}, p),
                        "CSRNet 1/8", _c3_ref, C3_SHHA_MEAN, C3_SHHA_STD),
    "dm-count": (lambda: VGG19Regressor((4, 8, 16, 32), (16, 8), "dm-count"),
                 lambda p, m: torch.save(m.state_dict(), p), "VGG-19 regressor 1/16", _csrnet_ref,
                 IMAGENET_MEAN, IMAGENET_STD),
    # the SKT paper's best student: Bayesian Loss at 1/4 width, head included (1.35 M parameters)
    "bayesian-loss": (lambda: VGG19Regressor((16, 32, 64, 128), (64, 32), "bayesian-loss"),
                      lambda p, m: torch.save({"epoch": 7, "model_state_dict": m.state_dict(),
                                               "optimizer_state_dict": {}}, p),
                      "VGG-19 regressor 1/4", _csrnet_ref, IMAGENET_MEAN, IMAGENET_STD),
    "vkd-safetensors": (lambda: CSRNet(4, ceil_mode=True),
                        lambda p, m: save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(p)),
                        "CSRNet 1/4", _csrnet_ref, IMAGENET_MEAN, IMAGENET_STD),
}
FAMILY = {"skt-student": "skt", "skt-teacher": "skt", "c3-latest-state": "c3-framework", "vkd-safetensors": "vkd"}
SUFFIX = {"vkd-safetensors": ".safetensors", "bayesian-loss": ".tar", "dm-count": ".pth", "c3-framework": ".pth"}


@pytest.mark.parametrize("case", list(CASES))
def test_family_detected_width_inferred_and_count_matches_vkd_module(tmp_path, capsys, case):
    build, save, width, reference, mean, std = CASES[case]
    model = _positive(build())
    path = tmp_path / f"{case}{SUFFIX.get(case, '.pth.tar')}"
    save(path, model)
    image_path, image = _image(tmp_path)
    x = to_tensor(image, mean, std)
    with torch.no_grad():
        expected = reference(model, x)
    assert abs(expected) > 0.1  # a count that can differ

    counter = load_counter(path)
    assert counter.family == FAMILY.get(case, case)
    assert counter.arch.startswith(width)
    assert counter.mean == pytest.approx(mean) and counter.std == pytest.approx(std)
    _, pred = count_frame(counter, image)
    assert pred.count == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert float(pred.density.sum()) == pytest.approx(expected, rel=1e-5, abs=1e-5)

    # the same through the command line: the model line prints the normalisation applied
    assert main(["count", "--weights", str(path), str(image_path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    model_line = next(line for line in out.splitlines() if line.startswith("model:"))
    assert counter.title in model_line and width in model_line
    assert "mean ({}) std ({})".format(*(", ".join(f"{v:.3f}" for v in t) for t in (mean, std))) in model_line
    row = next(csv.DictReader(open(tmp_path / "out" / "counts.csv")))
    assert float(row["count"]) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert (tmp_path / "out" / "img1_density.png").is_file()


def test_legacy_pickle_keeps_numpy_metadata_and_every_load_is_weights_only(tmp_path, monkeypatch):
    model = _positive(CSRNet(4, ceil_mode=False))
    path = tmp_path / "PartAmodel_best.pth.tar"
    _save_csrnet_pytorch(path, model)
    assert path.read_bytes()[:2] != b"PK"  # not a zip: the legacy format
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    counter = load_counter(path)
    assert counter.meta["best_prec1"] == pytest.approx(66.4) and counter.meta["epoch"] == 400
    assert calls and all(flag is True for flag in calls)


def test_bayesian_loss_parameter_counts_match_the_skt_readme():
    # SKT README: BL 21.50 M parameters, 1/4-BL + SKT 1.35 M
    assert round(count_parameters(VGG19Regressor(style="bayesian-loss")) / 1e6, 2) == 21.50
    assert round(count_parameters(VGG19Regressor((16, 32, 64, 128), (64, 32), "bayesian-loss")) / 1e6, 2) == 1.35


def test_vgg19_regressor_grid_and_heads():
    x = torch.randn(1, 3, 50, 70)
    dm, bl = VGG19Regressor((4, 8, 16, 32), (16, 8), "dm-count"), VGG19Regressor((4, 8, 16, 32), (16, 8), "bayesian-loss")
    assert dm(x).shape == bl(x).shape == (1, 1, 2 * (50 // 16), 2 * (70 // 16))
    assert "density_layer.0.weight" in dm.state_dict() and "reg_layer.4.weight" in bl.state_dict()
    assert (bl(x) >= 0).all() and (dm(x) >= 0).all()


def test_c3_log_para_and_normalisation_overrides(tmp_path, capsys):
    model = _positive(CSRNet(8, ceil_mode=False))
    path = tmp_path / "all_ep_93_mae_68.8.pth"
    torch.save({f"CCN.{k}": v for k, v in model.state_dict().items()}, path)
    image_path, image = _image(tmp_path)
    mean, std = (0.452, 0.447, 0.432), (0.232, 0.225, 0.222)  # C³'s SHHB setting.py, rounded
    counter = load_counter(path, mean="0.452,0.447,0.432", std="0.232,0.225,0.222", log_para=50)
    with torch.no_grad():
        expected = float(F.interpolate(model(to_tensor(image, mean, std)[None]), scale_factor=8).sum()) / 50
    assert count_frame(counter, image)[1].count == pytest.approx(expected, rel=1e-5)
    assert "--mean/--std" in counter.describe() and "(50)" in counter.describe()
    # bad values and --log-para on a family without LOG_PARA: one-line errors
    dm = tmp_path / "dm.pth"
    torch.save(VGG19Regressor((4, 8, 16, 32), (16, 8)).state_dict(), dm)
    for args, fragment in ((["--weights", str(dm), "--log-para", "100"], "C³-Framework checkpoints only"),
                           (["--weights", str(path), "--mean", "0.4,0.4"], "three"),
                           (["--weights", str(path), "--std", "0.2,0,0.2"], "positive"),
                           (["--weights", str(path), "--log-para", "0"], "positive")):
        assert main(["count", *args, str(image_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vkd: error:") and fragment in err[0], err


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("vkd: error:") and "Traceback" not in err[0], err
    return err[0]


def test_unknown_layout_names_closest_family_and_first_mismatching_key(tmp_path, capsys):
    image_path, _ = _image(tmp_path)
    state = CSRNet(4).state_dict()
    state["backend.6.weight_renamed"] = state.pop("backend.6.weight")
    csr = tmp_path / "renamed.pth"
    torch.save({"state_dict": state}, csr)
    line = _one_line_error(capsys, ["count", "--weights", str(csr), str(image_path)])
    assert "unknown checkpoint layout" in line and "closest known: CSRNet" in line
    assert "'backend.6.weight' (missing)" in line

    dm_state = VGG19Regressor((4, 8, 16, 32), (16, 8)).state_dict()
    dm_state["density_layer.1.weight"] = dm_state.pop("density_layer.0.weight")
    dm = tmp_path / "dm_renamed.pth"
    torch.save(dm_state, dm)
    line = _one_line_error(capsys, ["count", "--weights", str(dm), str(image_path)])
    assert "closest known: DM-Count" in line and "'density_layer.0.weight' (missing)" in line

    extra = CSRNet(4).state_dict()
    extra["attention.weight"] = torch.zeros(1)
    torch.save(extra, tmp_path / "extra.pth")
    line = _one_line_error(capsys, ["count", "--weights", str(tmp_path / "extra.pth"), str(image_path)])
    assert "closest known: CSRNet" in line and "'attention.weight' (not in that layout)" in line


def test_bad_checkpoint_files_are_one_line_errors(tmp_path, capsys):
    image_path, _ = _image(tmp_path)
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint" * 10)
    assert "cannot read checkpoint" in _one_line_error(capsys, ["count", "--weights", str(tmp_path / "garbage.pth"),
                                                                str(image_path)])
    # a pickled Python object beyond tensors and numpy scalars is refused, never unpickled
    torch.save({"state_dict": CSRNet(16).state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "obj.pth")
    line = _one_line_error(capsys, ["count", "--weights", str(tmp_path / "obj.pth"), str(image_path)])
    assert "weights_only=True" in line and "argparse.Namespace" in line
    # widths that are no 1/n CSRNet
    state = CSRNet(4).state_dict()
    state["frontend.0.weight"], state["frontend.0.bias"] = torch.zeros(17, 3, 3, 3), torch.zeros(17)
    torch.save(state, tmp_path / "odd.pth")
    assert "stage widths" in _one_line_error(capsys, ["count", "--weights", str(tmp_path / "odd.pth"),
                                                      str(image_path)])
    # C³ keeps other networks in CCN. too: refused by name
    torch.save({f"CCN.{k}": v for k, v in VGG19Regressor((4, 8, 16, 32), (16, 8)).state_dict().items()},
               tmp_path / "c3_vgg.pth")
    assert "other than CSRNet" in _one_line_error(capsys, ["count", "--weights", str(tmp_path / "c3_vgg.pth"),
                                                           str(image_path)])
    assert "checkpoint not found" in _one_line_error(capsys, ["count", "--weights", str(tmp_path / "nope.pth"),
                                                              str(image_path)])


def test_run_or_weights_exactly_one(tmp_path, capsys):
    image_path, _ = _image(tmp_path)
    assert "--run RUN_DIR or --weights FILE" in _one_line_error(capsys, ["count", str(image_path)])
    with pytest.raises(SystemExit) as info:  # argparse's mutually exclusive group
        main(["count", "--run", str(tmp_path), "--weights", str(tmp_path / "w.pth"), str(image_path)])
    assert info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_teacher_loading_refuses_other_architectures(tmp_path):
    dm = tmp_path / "dm.pth"
    torch.save(VGG19Regressor((4, 8, 16, 32), (16, 8)).state_dict(), dm)
    assert not is_vgg_state_file(dm)  # a whole DM-Count model, not ImageNet VGG weights
    with pytest.raises(UserError, match="a CSRNet is needed"):
        load_reference_checkpoint(CSRNet(16), dm)
    c3 = tmp_path / "c3.pth"
    torch.save({f"CCN.{k}": v for k, v in CSRNet(16).state_dict().items()}, c3)
    with pytest.raises(UserError, match="LOG_PARA"):
        load_reference_checkpoint(CSRNet(16), c3)


def test_eval_with_a_checkpoint_file(tmp_path):
    """``evaluate(FILE, --set data...)``: the checkpoint's normalisation and counts on a generic data set."""
    model = _positive(CSRNet(4, ceil_mode=False))
    path = tmp_path / "PartAmodel_best.pth.tar"
    _save_csrnet_pytorch(path, model)
    root = tmp_path / "data" / "test"
    root.mkdir(parents=True)
    expected_errors = []
    for seed in range(3):
        _, image = _image(root, seed)
        (root / f"img{seed}.json").write_text(json.dumps([[5, 5]] * (seed + 1)))
        with torch.no_grad():
            expected_errors.append(abs(float(model(to_tensor(image)[None]).sum()) - (seed + 1)))
    metrics = evaluate(path, ["data.dataset=generic", f"data.root={tmp_path / 'data'}"], tmp_path / "ev")
    assert metrics["mae"] == pytest.approx(np.mean(expected_errors), rel=1e-5)
    assert metrics["family"] == "CSRNet-pytorch" and "ImageNet" in metrics["normalisation"]
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["num_images"] == 3

    # the same through the CLI: vkd eval skt --weights FILE --set data...
    sets = ["--set", "data.dataset=generic", "--set", f"data.root={tmp_path / 'data'}"]
    assert main(["eval", "skt", "--weights", str(path), *sets, "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert cli["mae"] == pytest.approx(metrics["mae"], rel=1e-9)


def test_eval_weights_is_refused_where_it_does_not_apply(tmp_path, capsys):
    path = tmp_path / "w.pth"
    torch.save({}, path)
    for args, message in [(["eval", "toy", "--weights", str(path)], "--weights FILE is for: skt-teacher, skt"),
                          (["eval", "skt", "--weights", str(tmp_path / "absent.pth")], "no such file")]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


class _Payload:
    """Unpickling this creates a marker file: the stand-in for arbitrary code in a downloaded checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_checkpoint_never_runs(tmp_path, capsys, zip_format):
    image_path, _ = _image(tmp_path)
    marker = tmp_path / "PWNED"
    path = tmp_path / "PartAmodel_best.pth.tar"
    torch.save({"state_dict": CSRNet(16).state_dict(), "best_prec1": _Payload(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    torch.load(path, weights_only=False)  # the payload is live...
    assert marker.is_file()
    marker.unlink()
    line = _one_line_error(capsys, ["count", "--weights", str(path), str(image_path)])
    assert "weights_only=True" in line and not marker.exists()  # ...and vkd never runs it
