"""Teachers and students by architecture name: torchvision and timm models, any class count, local weights and the
(offline) library cache, close-match errors; LoRA targets per CLIP architecture."""

import logging

import pytest
import torch
from hello_helpers import resnet_bundle, vit_bundle
from torch import nn
from torchvision.models import get_model

from vkd.cli import main
from vkd.errors import ConfigError, DataError, UserError
from vkd.hello.config import ClassifierConfig, ProjectorConfig, StudentConfig
from vkd.hello.evaluate import student_configs
from vkd.hello.model import build_classifier, resolve_arch
from vkd.hello.projector import add_lora, build_projector, clip_family, image_lora_targets, lora_config
from vkd.hello.teacher import load_teacher


def test_torchvision_name_any_class_count_and_local_weights(tmp_path, caplog):
    cfg = ClassifierConfig(arch="mobilenet_v3_small")
    torch.manual_seed(0)
    model = build_classifier(cfg, 10, 32).eval()
    assert resolve_arch("mobilenet_v3_small").library == "torchvision"
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10) and model.num_classes == 10
    torch.save(model.net.state_dict(), tmp_path / "mnv3.pth")
    again = build_classifier(ClassifierConfig(arch="mobilenet_v3_small", pretrained=str(tmp_path / "mnv3.pth")),
                             10, 32).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    # 1000-class (ImageNet-shaped) weights: the head is re-initialised and the log says so, the rest is loaded
    imagenet = get_model("mobilenet_v3_small", weights=None)
    torch.save({"state_dict": imagenet.state_dict()}, tmp_path / "in1k.pth")
    with caplog.at_level(logging.INFO, logger="vkd"):
        head_reset = build_classifier(ClassifierConfig(arch="mobilenet_v3_small",
                                                       pretrained=str(tmp_path / "in1k.pth")), 10, 32)
    assert "1000-class head" in caplog.text and "classifier.3" in caplog.text
    assert torch.equal(head_reset.net.features[0][0].weight, imagenet.features[0][0].weight)
    assert head_reset.net.classifier[3].out_features == 10
    # as a teacher the class count must match: no silent head reset
    with pytest.raises(DataError, match="predicts 1000 classes but the dataset has 10"):
        load_teacher(tmp_path / "in1k.pth", cfg, 10, 32)


def test_timm_name_and_prefixes():
    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig(arch="resnet10t"), 7, 32).eval()
    assert resolve_arch("resnet10t").library == "timm" and resolve_arch("timm:resnet18").library == "timm"
    assert resolve_arch("resnet18").library == "torchvision"  # a bare name: torchvision first
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert tuple(model.mean.flatten().tolist()) == pytest.approx(model.net.pretrained_cfg["mean"])
    with pytest.raises(ConfigError, match="low_res_stem"):
        build_classifier(ClassifierConfig(arch="resnet10t", low_res_stem=True), 7, 32)


def test_torchvision_imagenet_weights_from_the_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    cfg = ClassifierConfig(arch="mobilenet_v3_small", pretrained="imagenet")
    with pytest.raises(UserError, match="not in the torch hub cache .*mobilenet_v3_small-047dcff4.pth"):
        build_classifier(cfg, 10, 32)
    torch.manual_seed(1)
    cached = get_model("mobilenet_v3_small", weights=None)  # stands in for the published file
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached.state_dict(), tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth")
    model = build_classifier(cfg, 10, 32)
    assert torch.equal(model.net.features[1].block[0][0].weight, cached.features[1].block[0][0].weight)
    assert model.net.classifier[3].out_features == 10
    full = build_classifier(cfg, 1000, 32)  # 1000 classes: the cached head is kept
    assert torch.equal(full.net.classifier[3].weight, cached.classifier[3].weight)
    # teacher.checkpoint=imagenet: the library weights as a frozen 1000-class teacher, never a head reset
    teacher = load_teacher("imagenet", ClassifierConfig(arch="mobilenet_v3_small"), 1000, 32)
    assert not teacher.training and torch.equal(teacher.net.classifier[3].weight, cached.classifier[3].weight)
    with pytest.raises(DataError, match="1000-class teacher but the dataset has 10"):
        load_teacher("imagenet", ClassifierConfig(arch="mobilenet_v3_small"), 10, 32)


def test_timm_pretrained_weights_from_the_offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty HF cache
    cfg = ClassifierConfig(arch="resnet10t", pretrained="imagenet")
    with pytest.raises(UserError, match="not in the Hugging Face or torch hub cache"):
        build_classifier(cfg, 7, 32)
    torch.manual_seed(2)
    cached = timm.create_model("resnet10t", pretrained=False)  # 1000 classes, stands in for the published file
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet10t_176_c3-f3215ab1.pth")
    model = build_classifier(cfg, 7, 32)
    assert torch.equal(model.net.conv1[0].weight, cached.conv1[0].weight) and model.net.fc.out_features == 7


def test_unknown_architecture_lists_close_matches_exit_2(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"close matches: .*mobilenet_v3_small \(torchvision\)"):
        resolve_arch("mobilenet_v3_smal")
    with pytest.raises(ConfigError, match=r"resnet10t \(timm\)"):
        resolve_arch("timm:resnet10x")
    code = main(["distill", "hello-teacher", "--set", f"run.output_dir={tmp_path}", "--set", "model.arch=mobilnet_v2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("vkd: error: unknown architecture 'mobilnet_v2'")
    assert "mobilenet_v2 (torchvision)" in err[0]
    with pytest.raises(ConfigError, match="unknown architecture 'resnet1800'"):
        student_configs(StudentConfig(), ["small_cnn", "resnet1800"])


def test_weights_that_do_not_fit_the_architecture_exit_2(tmp_path, capsys):
    torch.save(get_model("resnet18", weights=None, num_classes=10).state_dict(), tmp_path / "r18.pth")
    code = main(["distill", "hello-teacher", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=1",
                 "--set", "model.arch=mobilenet_v3_small", "--set", f"model.pretrained={tmp_path / 'r18.pth'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "do not fit a mobilenet_v3_small with 10 classes" in err[0]


def test_student_configs_one_per_architecture():
    base = StudentConfig(model=ClassifierConfig(arch="small_cnn", width=8, pretrained="x.pth"))
    cfgs = student_configs(base, ["small_cnn", "mobilenet_v3_small"])
    assert list(cfgs) == ["small_cnn", "mobilenet_v3_small"]
    assert cfgs["small_cnn"].model.pretrained == "x.pth" and cfgs["mobilenet_v3_small"].model.pretrained == ""
    assert cfgs["mobilenet_v3_small"].model.width == 8 and cfgs["mobilenet_v3_small"].lr == base.lr
    assert list(student_configs(base)) == ["small_cnn"]


def test_older_init_keys_fold_into_pretrained():
    assert ClassifierConfig(arch="resnet18", init="imagenet").pretrained == "imagenet"
    assert ClassifierConfig(init_checkpoint="w.pth").pretrained == "w.pth"
    with pytest.raises(ConfigError, match="conflicts"):
        ClassifierConfig(pretrained="a.pth", init_checkpoint="b.pth")


def test_lora_targets_per_clip_architecture():
    vit = build_projector(vit_bundle(), ["a", "b"], "a {}.")
    targets = image_lora_targets(vit)
    assert clip_family(vit) == "vit"
    attn = [t for t in targets if t.endswith(".attn")]
    assert len(attn) == 2 and all(isinstance(vit.get_submodule(t), nn.MultiheadAttention) for t in attn)
    assert "visual.conv1" in targets and sum(t.endswith(("mlp.c_fc", "mlp.c_proj")) for t in targets) == 4
    model = add_lora(vit, lora_config(vit, ProjectorConfig(rank_image=2, rank_head=2))).eval()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        for name, p in model.named_parameters():  # only the attention factors move
            if "lora_B" in name and ".attn." in name:
                p.normal_(0, 0.3)
        assert (model(x) - before).abs().max() > 1e-3  # LoRA on attention is live, not bypassed
    rn = build_projector(resnet_bundle(), ["a", "b"], "a {}.")
    assert clip_family(rn) == "resnet"
    rn_targets = image_lora_targets(rn)
    assert rn_targets and all(isinstance(rn.get_submodule(t), nn.Conv2d) for t in rn_targets)
