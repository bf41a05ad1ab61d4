import pytest
import torch

from otbr_plugin.data import Normalizer, Preprocess, get_dataset_spec, normalize, random_crop, random_hflip, to_float
from otbr_plugin.data.transforms import denormalize


def test_to_float_scales_uint8():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    assert torch.allclose(to_float(x).flatten(), torch.tensor([0.0, 0.2, 1.0]))
    with pytest.raises(TypeError):
        to_float(x.float())


def test_normalize_per_channel_and_inverse():
    x = torch.rand(4, 3, 5, 5)
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    y = normalize(x, mean, std)
    assert torch.allclose(y[:, 1], (x[:, 1] - 0.4822) / 0.243)
    assert torch.allclose(denormalize(y, mean, std), x, atol=1e-6)
    with pytest.raises(ValueError, match="normalization values"):
        normalize(torch.rand(1, 3, 2, 2), (0.1, 0.2), (1.0, 1.0))


def test_random_crop_is_a_window_of_the_padded_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    gen = torch.Generator().manual_seed(3)
    out = random_crop(x, 2, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[i, :, dy:dy + 6, dx:dx + 6], out[i])]
        assert windows, "each crop must equal one window of the zero-padded image"
    assert torch.equal(random_crop(x, 0), x)


def test_random_crop_varies_across_images_and_is_seeded():
    x = torch.rand(64, 1, 8, 8)
    a = random_crop(x, 4, torch.Generator().manual_seed(0))
    b = random_crop(x, 4, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert not torch.equal(a, x)


def test_random_hflip():
    x = torch.arange(8, dtype=torch.float32).view(2, 1, 2, 2)
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, p=0.0), x)
    flipped = random_hflip(torch.rand(500, 1, 1, 2), 0.5, torch.Generator().manual_seed(1))
    assert flipped.shape == (500, 1, 1, 2)


def test_preprocess_eval_is_plain_normalization_and_train_augments():
    spec = get_dataset_spec("cifar10")
    imgs = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    ev = Preprocess(spec, train=False)(imgs)
    assert torch.allclose(ev, Normalizer.for_dataset(spec)(imgs.float() / 255))
    tr = Preprocess(spec, train=True, generator=torch.Generator().manual_seed(0))(imgs)
    assert tr.shape == ev.shape and not torch.allclose(tr, ev)


def test_flip_only_where_the_dataset_allows_it():
    assert get_dataset_spec("cifar10").hflip and not get_dataset_spec("gtsrb").hflip
    assert not get_dataset_spec("fashion_mnist").hflip


def test_device_normalizer_gives_the_same_numbers():
    norm = Normalizer.for_dataset(get_dataset_spec("cifar10"))
    x = torch.rand(5, 3, 4, 4)
    on = norm.on("cpu")
    assert torch.equal(on(x), norm(x))  # bit for bit: CPU results must not move
    assert torch.equal(on(x.double()), norm(x.double()))  # another dtype: the plain path
    with pytest.raises(ValueError, match="normalization values"):
        on(torch.rand(1, 2, 4, 4))  # the channel check stays
