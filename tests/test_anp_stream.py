"""ANP's ``random_stream: backdoorbench``: the mask optimisation draws what BackdoorBench's anp.py draws from torch's
global stream after ``fix_random(seed)``. The reference here is derived independently, with torch's own machinery on
the global generator: the model built after ``torch.manual_seed(seed)`` (default init), a real ``DataLoader`` over a
``RandomSampler(replacement=True)`` whose dataset draws crop offsets in ``__getitem__`` as torchvision's
``RandomCrop.get_params`` does, the per-step ``uniform_`` noise of every BN in module order, and two shuffled test
loaders iterated between blocks (no BackdoorBench, no torchvision)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from otbr_plugin.data.transforms import Normalizer
from otbr_plugin.defenses.anp import ANPConfig, PerturbedBatchNorm2d, optimize_masks
from otbr_plugin.defenses.base import DefenseContext

MEAN, STD = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
PAD, N, H, BATCH, EVERY, STEPS, EPS = 4, 10, 8, 3, 2, 5, 0.4


class Tiny(nn.Module):
    """conv (bias) - BN - conv (no bias) - BN - linear: default init draws of three layers, two noisy BNs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 256, (N, 3, H, H), dtype=torch.uint8, generator=g), torch.arange(N) % 3


class CropSet(Dataset):
    """A training transform like torchvision's RandomCrop(padding=PAD) per image, on the global stream; returns the
    index and the offsets with the cropped, normalized image."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, k: int):
        padded = F.pad(self.images[k].float().div(255.0), (PAD, PAD, PAD, PAD))
        i = torch.randint(0, padded.shape[1] - H + 1, size=(1,)).item()
        j = torch.randint(0, padded.shape[2] - H + 1, size=(1,)).item()
        x = padded[:, i:i + H, j:j + H]
        x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        return x, k, i, j


def _reference(seed: int, images: torch.Tensor) -> tuple[list, list]:
    """Per step: (indices, crop offsets, inputs) and the noise of each BN, in module order."""
    torch.manual_seed(seed)
    model = Tiny()  # its construction draws (default init)
    bn_sizes = [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    data = CropSet(images)
    loader = DataLoader(data, batch_size=BATCH, sampler=RandomSampler(data, replacement=True,
                                                                      num_samples=EVERY * BATCH), num_workers=0)
    test_sets = [TensorDataset(torch.arange(7)), TensorDataset(torch.arange(5))]
    steps, noises = [], []
    blocks = -(-STEPS // EVERY)
    for b in range(blocks):
        for x, idx, i, j in loader:
            if len(steps) == STEPS:
                break
            steps.append((idx.tolist(), list(zip(i.tolist(), j.tolist())), x))
            noises.append([torch.empty(n).uniform_(-EPS, EPS) for n in bn_sizes for _ in ("weight", "bias")])
        for ts in test_sets:  # its test loaders between blocks
            for _ in DataLoader(ts, batch_size=4, shuffle=True, num_workers=0):
                pass
    return steps, noises


def _ours(seed: int, images: torch.Tensor, labels: torch.Tensor, **cfg_kw):
    """Run optimize_masks and record, per step, the first forward's input and the noise it ran with."""
    torch.manual_seed(999)  # the global stream: must play no part
    model = Tiny()
    seen: list = []

    def hook(module, args):
        wrapped = [m for m in module.modules() if isinstance(m, PerturbedBatchNorm2d)]
        seen.append((args[0].detach().clone(),
                     [t.detach().clone() for m in wrapped for t in (m.noise_weight, m.noise_bias)]))

    model.register_forward_pre_hook(hook)
    cfg = ANPConfig(iterations=STEPS, batch_size=BATCH, eps=EPS, mask_lr=0.2, **cfg_kw)
    ctx = DefenseContext(num_classes=3, input_shape=(3, H, H), normalizer=Normalizer(MEAN, STD), seed=seed,
                         progress=False)
    before = torch.get_rng_state()
    masks, _ = optimize_masks(model, images, labels, ctx, cfg)
    assert torch.equal(torch.get_rng_state(), before), "the global generator was used"
    return seen[::3], masks  # three forwards per step (noise ascent, perturbed, clean)


@pytest.mark.parametrize("seed", [0, 7])
def test_backdoorbench_stream_draws_what_a_real_dataloader_draws(seed):
    images, labels = _images()
    ref_steps, ref_noise = _reference(seed, images)
    ours, masks = _ours(seed, images, labels, random_stream="backdoorbench", bb_print_every=EVERY)
    assert len(ours) == STEPS
    for step, ((idx, offsets, x_ref), noise_ref, (x, noise)) in enumerate(zip(ref_steps, ref_noise, ours)):
        # the inputs: the same images (indices), cropped at the same offsets, padded before normalization
        assert torch.equal(x, x_ref), f"step {step}: inputs differ (indices {idx}, offsets {offsets})"
        assert len(noise) == len(noise_ref)
        for a, b in zip(noise, noise_ref):
            assert torch.equal(a, b), f"step {step}: noise differs"
    assert all(((m >= 0) & (m <= 1)).all() for m in masks.values())


def test_backdoorbench_stream_block_boundary_matters():
    """The loader's fresh seeds per block and the test loaders' draws between blocks are part of the replay: with
    another print_every the second block's batches differ from the reference's."""
    images, labels = _images()
    ref_steps, _ = _reference(0, images)
    ours, _ = _ours(0, images, labels, random_stream="backdoorbench", bb_print_every=STEPS)
    assert torch.equal(ours[0][0], ref_steps[0][2])  # the first block starts the same
    assert any(not torch.equal(x, r[2]) for (x, _), r in zip(ours[EVERY:], ref_steps[EVERY:]))


def test_plugin_stream_is_the_default_and_unchanged():
    images, labels = _images()
    default, m_default = _ours(3, images, labels)
    plugin, m_plugin = _ours(3, images, labels, random_stream="plugin")
    bb, m_bb = _ours(3, images, labels, random_stream="backdoorbench", bb_print_every=EVERY)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(default, plugin))
    assert all(torch.equal(m_default[k], m_plugin[k]) for k in m_default)
    # the plug-in's own draws: batch indices on seed + 1, noise U(-eps, eps) as 2 * rand - 1 on seed + 3
    first = torch.randint(0, N, (BATCH,), generator=torch.Generator().manual_seed(3 + 1))
    noise_gen = torch.Generator().manual_seed(3 + 3)
    first_noise = (torch.rand(4, generator=noise_gen) * 2 - 1).mul_(EPS)
    assert torch.equal(plugin[0][1][0], first_noise)
    aug_gen = torch.Generator().manual_seed(3 + 2)  # crops on seed + 2: all row offsets, then all column offsets
    oy = torch.randint(0, 2 * PAD + 1, (BATCH,), generator=aug_gen)
    ox = torch.randint(0, 2 * PAD + 1, (BATCH,), generator=aug_gen)
    padded = F.pad(images[first].float().div(255.0), (PAD, PAD, PAD, PAD))
    x = torch.stack([padded[k, :, oy[k]:oy[k] + H, ox[k]:ox[k] + H] for k in range(BATCH)])
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.equal(plugin[0][0], x)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(plugin, bb))


def test_random_stream_is_validated_and_mapped_from_backdoorbench():
    with pytest.raises(ValueError, match="random_stream must be"):
        ANPConfig(random_stream="global")
    with pytest.raises(ValueError, match="bb_print_every must be"):
        ANPConfig(bb_print_every=0)
    from benchmark_adapters.backdoorbench.bb_args import translate_bb

    out = translate_bb("anp", {"print_every": 24, "nb_iter": 30})
    assert out.fields["bb_print_every"] == 24 and out.fields["iterations"] == 48
    assert "print_every" not in out.ignored
