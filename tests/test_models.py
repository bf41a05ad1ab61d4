import pytest
import torch

from otbr_plugin.models import ModelConfig, create_model, list_models


def backdoorbench_preactresnet18_keys() -> list[str]:
    """BackdoorBench's PreActResNet18 state_dict names, built from its published structure."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}."
            keys += [p + "bn1." + b for b in bn] + [p + "conv1.weight"]
            keys += [p + "bn2." + b for b in bn] + [p + "conv2.weight"]
            if layer > 1 and block == 0:
                keys.append(p + "shortcut.0.weight")
    return keys + ["linear.weight", "linear.bias"]


def test_registry_lists_models():
    assert {"preactresnet18", "vgg19_bn", "smallcnn"} <= set(list_models())


@pytest.mark.parametrize("width", [1.0, 0.25])
def test_preactresnet18_state_dict_matches_backdoorbench(width):
    sd = create_model("preactresnet18", 10, 3, 32, width).state_dict()
    expected = backdoorbench_preactresnet18_keys()
    assert len(sd) == 102 == len(expected)
    assert sorted(sd) == sorted(expected)


def test_preactresnet18_full_width_shapes_match_backdoorbench():
    sd = create_model("preactresnet18", 10, 3, 32, 1.0).state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["layer4.0.shortcut.0.weight"].shape == (512, 256, 1, 1)
    assert sd["linear.weight"].shape == (10, 512)
    assert sum(p.numel() for p in create_model("preactresnet18").parameters()) == 11_171_146


def test_preactresnet18_loads_its_own_checkpoint_strictly():
    a = create_model("preactresnet18", 43, 3, 32, 0.5)
    b = create_model("preactresnet18", 43, 3, 32, 0.5)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_vgg19_bn_uses_torchvision_key_names():
    sd = create_model("vgg19_bn", 10, 3, 32, 0.125).state_dict()
    convs = [0, 3, 7, 10, 14, 17, 20, 23, 27, 30, 33, 36, 40, 43, 46, 49]
    for i in convs:
        assert f"features.{i}.weight" in sd and f"features.{i}.bias" in sd
        assert f"features.{i + 1}.running_var" in sd  # the BN right after each conv
    for i in (0, 3, 6):
        assert f"classifier.{i}.weight" in sd
    assert len(sd) == 16 * 2 + 16 * 5 + 6


@pytest.mark.parametrize("name,channels,size", [
    ("preactresnet18", 1, 28), ("preactresnet18", 3, 32), ("preactresnet18", 3, 64),
    ("smallcnn", 1, 28), ("smallcnn", 3, 40), ("vgg19_bn", 3, 32), ("vgg19_bn", 1, 64),
])
def test_forward_shapes(name, channels, size):
    model = create_model(name, 7, channels, size, 0.125).eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet9000")
    with pytest.raises(ValueError, match="in_channels"):
        create_model("smallcnn", in_channels=2)
    with pytest.raises(ValueError, match="width"):
        create_model("smallcnn", width=0)
    with pytest.raises(ValueError, match="image_size >= 32"):
        create_model("vgg19_bn", in_channels=1, image_size=28)


def test_model_config_round_trip():
    cfg = ModelConfig("smallcnn", 5, 1, 28, 0.5)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.build()(torch.randn(1, 1, 28, 28)).shape == (1, 5)
