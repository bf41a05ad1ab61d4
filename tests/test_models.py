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
    assert {"preactresnet18", "resnet18", "vgg19_bn", "smallcnn"} <= set(list_models())


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


# ----------------------------------------------------------------------------- resnet18 (torchvision names)

def torchvision_resnet18_shapes(num_classes: int = 10, in_channels: int = 3) -> dict[str, tuple[int, ...]]:
    """torchvision's ``resnet18`` state_dict, name -> shape, in its order, built from the documented architecture
    (He et al. 2016, Table 1; torchvision's module names): a 7x7/2 stem conv ``conv1`` + ``bn1``, four stages
    ``layer1..4`` of two BasicBlocks (``conv1``/``bn1``, ``conv2``/``bn2``, 3x3 convs without bias) with 64, 128,
    256, 512 channels, a ``downsample`` (1x1 conv + BN) in the first block of stages 2-4, and ``fc``."""
    def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}

    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, in_channels, 7, 7), **bn("bn1", 64)}
    c_in = 64
    for stage, c in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            shapes[f"{p}.conv1.weight"] = (c, c_in if block == 0 else c, 3, 3)
            shapes.update(bn(f"{p}.bn1", c))
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            shapes.update(bn(f"{p}.bn2", c))
            if stage > 1 and block == 0:
                shapes[f"{p}.downsample.0.weight"] = (c, c_in, 1, 1)
                shapes.update(bn(f"{p}.downsample.1", c))
        c_in = c
    shapes["fc.weight"] = (num_classes, 512)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def test_resnet18_has_torchvision_names_shapes_and_order():
    expected = torchvision_resnet18_shapes(10)
    sd = create_model("resnet18", 10, 3, 32, 1.0).state_dict()
    assert len(sd) == len(expected) == 122
    assert list(sd) == list(expected)  # same names, same order
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # torchvision's ResNet-18 with its classifier replaced for 10 classes: 11,181,642 parameters
    assert sum(p.numel() for p in create_model("resnet18", 10, 3, 32, 1.0).parameters()) == 11_181_642


def test_a_torchvision_resnet18_state_dict_loads_strictly():
    """A state_dict laid out as torchvision's resnet18 adapted to 10 classes (random values) loads with
    strict=True and reproduces itself; a wrong or missing key is refused by name."""
    g = torch.Generator().manual_seed(0)
    foreign = {k: (torch.randint(0, 100, (), generator=g) if not s else torch.rand(s, generator=g) + 0.5)
               for k, s in torchvision_resnet18_shapes(10).items()}
    model = create_model("resnet18", 10, 3, 32, 1.0)
    model.load_state_dict(foreign, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in foreign.items())
    broken = dict(foreign)
    broken["fc.weight_renamed"] = broken.pop("fc.weight")
    with pytest.raises(RuntimeError, match="fc.weight"):
        create_model("resnet18", 10, 3, 32, 1.0).load_state_dict(broken, strict=True)


@pytest.mark.parametrize("width", [0.25, 0.0625])
def test_resnet18_width_scales_channels_and_keeps_names(width):
    sd = create_model("resnet18", 10, 1, 28, width, stem="cifar").state_dict()
    assert list(sd) == list(torchvision_resnet18_shapes())
    c = round(64 * width)
    assert sd["conv1.weight"].shape == (c, 1, 3, 3)  # small-input stem: 3x3, stride 1
    assert sd["layer4.0.downsample.0.weight"].shape == (8 * c, 4 * c, 1, 1)
    assert sd["fc.weight"].shape == (10, 8 * c)


@pytest.mark.parametrize("stem,size,after_stem", [("imagenet", 32, 8), ("cifar", 32, 32), ("cifar", 28, 28)])
def test_resnet18_stems(stem, size, after_stem):
    model = create_model("resnet18", 7, 3, size, 0.125, stem=stem).eval()
    seen = {}
    model.layer1.register_forward_hook(lambda m, a, out: seen.update(hw=tuple(a[0].shape[2:])))
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)
    assert seen["hw"] == (after_stem, after_stem)


def test_model_options_are_validated_and_round_trip():
    with pytest.raises(ValueError, match="stem must be one of imagenet, cifar"):
        create_model("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="'smallcnn' has no option.*stem"):
        create_model("smallcnn", stem="cifar")
    cfg = ModelConfig("resnet18", 10, 1, 28, 0.25, {"stem": "cifar"})
    assert cfg.to_dict()["args"] == {"stem": "cifar"} and ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert "args" not in ModelConfig("smallcnn", 5, 1, 28, 0.5).to_dict()  # no options: the dict as before
    assert cfg.build().conv1.weight.shape == (16, 1, 3, 3)
