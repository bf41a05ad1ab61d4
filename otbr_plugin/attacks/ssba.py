"""SSBA, the sample-specific invisible backdoor (Li et al., "Invisible Backdoor Attack with Sample-Specific
Triggers", ICCV 2021), dirty label.

The trigger is the residual of a StegaStamp-style steganography encoder (Tancik et al. 2020) that hides a fixed
secret bit string in each image: every poisoned image gets its own, image-specific, invisible residual.

1. :meth:`SSBA.prepare` trains an encoder/decoder pair on the *training split* only (as the paper and
   BackdoorBench's ``resource/ssba`` do): the encoder maps (image, bits) to a residual, the decoder reads the bits
   back from the encoded image. As in StegaStamp, every training image gets freshly drawn random bits, so the
   decoder must read the image (a decoder trained on one fixed secret could output it for any input); the loss is
   the decoder's binary cross-entropy plus ``l2_weight`` x the residual's mean square (image fidelity).
2. The attack then encodes one fixed secret (``secret``, or ``secret_length`` bits drawn from ``seed``) into the
   poisoned samples: ``round(255 * clip(x + r(x, secret)))``. Poisoning, target and ratio are BackdoorBench's SSBA
   defaults (``config/attack/ssba/default.yaml``: all2one, target 0, pratio 0.1; indices drawn like BadNets, from
   all training samples).

Documented choices: the residual is bounded by construction, ``r = epsilon * tanh(raw)`` (L-inf ``epsilon`` on the
[0, 1] scale; StegaStamp outputs a sigmoid image and bounds it only through the L2 loss), so the bound holds for
every image, also after rounding to uint8 (at most ``round(255 * epsilon)`` grey levels). The encoder is a small
U-Net (two down/up levels, ``encoder_channels`` wide) sized for a 2-core CPU instead of StegaStamp's five levels,
and trained for ``encoder_epochs`` passes over ``encoder_samples`` training images with Adam at ``encoder_lr``
(BackdoorBench: 100 bits, 20 epochs, lr 1e-4, on a GPU). Images are clipped to [0, 1] and dithered by +-0.5 grey
levels while the pair trains, so the decoder learns to read the stored uint8 image. The secret reaches the output
layer directly as well as through the U-Net, and a warm-up starts the bound at ``epsilon_warmup`` x ``epsilon``
(shrinking to ``epsilon`` over ``warmup_share`` of the steps) while the L2 term waits and then ramps up (StegaStamp's
``l2_loss_await``/``l2_loss_ramp``): without these the pair sat at chance on Fashion-MNIST. ``encoder_holdout`` training
images are kept out of the encoder's training; its bit accuracy on them (secret encoded, and on the clean images)
is reported in the bundle's ``attack.trigger_search``. BackdoorBench's BCH error correction of the secret is not
used: the classifier, not a decoder, is what must recognise the residual.

The encoder's and decoder's weights and the secret are the attack's state (``extra.safetensors`` under
``attack.``), so :func:`~otbr_plugin.attacks.restore_attack` rebuilds the poisoned samples from a bundle.
BackdoorBench's own SSBA records read like any other record; its pre-made SSBA image files are read and written by
:mod:`benchmark_adapters.backdoorbench.ssba`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.transforms import to_float
from .base import Attack, AttackConfig, AttackContext
from .registry import register_attack
from .triggers import check_images, to_uint8

__all__ = ["SSBAConfig", "SSBA", "StegaEncoder", "StegaDecoder", "parse_secret", "bit_accuracy"]


def _int_at_least(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def parse_secret(secret: str) -> torch.Tensor:
    """A bit string such as ``"0110..."`` as a float tensor of 0/1; a clear error for anything else."""
    if not isinstance(secret, str) or not secret or set(secret) - {"0", "1"}:
        raise ValueError(f"secret must be a non-empty string of 0s and 1s, got {secret!r}")
    return torch.tensor([float(ch) for ch in secret])


def bit_accuracy(logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Per-image share of bits read correctly: ``logits`` (N, L) of the decoder against ``bits`` (L,) or (N, L)."""
    return ((logits > 0).float() == bits.expand_as(logits)).float().mean(1)


class StegaEncoder(nn.Module):
    """(images (N, C, H, W) in [0, 1], bits (N, L) in {0, 1}) -> residual (N, C, H, W) in [-epsilon, epsilon].

    The bits go through a linear layer to a (4, H/4, W/4) map, upsampled to the image and stacked on it; a two-level
    U-Net (``channels``, 2x, 4x wide, skip connections) gives the raw residual, squashed by ``epsilon * tanh``.
    H and W must be divisible by 4."""

    def __init__(self, in_channels: int, height: int, width: int, secret_length: int, channels: int,
                 epsilon: float) -> None:
        super().__init__()
        if height % 4 or width % 4:
            raise ValueError(f"the SSBA encoder needs H and W divisible by 4, got {height}x{width}")
        self.grid = (height // 4, width // 4)
        self.epsilon = float(epsilon)
        c = channels
        self.secret_dense = nn.Linear(secret_length, 4 * self.grid[0] * self.grid[1])
        self.inc = nn.Sequential(nn.Conv2d(in_channels + 4, c, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True))
        self.down1 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1), nn.ReLU(inplace=True),
                                   nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(inplace=True))
        self.down2 = nn.Sequential(nn.Conv2d(2 * c, 4 * c, 3, 2, 1), nn.ReLU(inplace=True),
                                   nn.Conv2d(4 * c, 4 * c, 3, padding=1), nn.ReLU(inplace=True))
        self.up2 = nn.Sequential(nn.Conv2d(4 * c + 2 * c, 2 * c, 3, padding=1), nn.ReLU(inplace=True))
        self.up1 = nn.Sequential(nn.Conv2d(2 * c + c + in_channels + 4, c, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(c + 4, in_channels, 1)

    def forward(self, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        s = self.secret_dense(bits - 0.5).view(-1, 4, *self.grid)
        s = F.interpolate(s, size=images.shape[-2:], mode="nearest")
        inputs = torch.cat([images - 0.5, s], 1)
        x1 = self.inc(inputs)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        u2 = self.up2(torch.cat([F.interpolate(x3, size=x2.shape[-2:], mode="nearest"), x2], 1))
        u1 = self.up1(torch.cat([F.interpolate(u2, size=x1.shape[-2:], mode="nearest"), x1, inputs], 1))
        return self.epsilon * torch.tanh(self.out(torch.cat([u1, s], 1)))


class StegaDecoder(nn.Module):
    """images (N, C, H, W) in [0, 1] -> bit logits (N, L): three 3x3 conv layers (two of stride 2) and two linear
    layers."""

    def __init__(self, in_channels: int, height: int, width: int, secret_length: int, channels: int) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c, 2 * c, 3, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * c, 4 * c, 3, 2, 1), nn.ReLU(inplace=True),
        )
        h, w = (height + 3) // 4, (width + 3) // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * c * h * w, 256), nn.ReLU(inplace=True),
                                  nn.Linear(256, secret_length))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images - 0.5))


@dataclass
class SSBAConfig(AttackConfig):
    """secret: the hidden bit string (``"0110..."``), or null for ``secret_length`` bits drawn from ``seed``;
    epsilon: L-inf bound of the residual on the [0, 1] scale; encoder_channels: width of the encoder and decoder;
    encoder_epochs / encoder_samples / encoder_batch_size / encoder_lr / l2_weight: their training (null samples: the
    whole training split less the holdout); encoder_holdout: training images kept out to measure bit accuracy;
    bit_threshold: share of correct bits above which an image counts as carrying the secret (reported);
    epsilon_warmup / warmup_share: the bound starts at ``epsilon_warmup`` x epsilon and shrinks linearly to epsilon
    over that share of the steps (a readable signal first; without it the pair sits at chance), while the fidelity
    term waits and then ramps up over as many steps (StegaStamp's ``l2_loss_await``/``l2_loss_ramp``)."""

    secret: str | None = None
    secret_length: int = 32
    epsilon: float = 0.05
    encoder_channels: int = 16
    encoder_epochs: int = 1
    encoder_samples: int | None = None
    encoder_batch_size: int = 64
    encoder_lr: float = 0.001
    l2_weight: float = 1.0
    encoder_holdout: int = 1000
    bit_threshold: float = 0.9
    epsilon_warmup: float = 10.0
    warmup_share: float = 0.5

    def validate(self) -> None:
        super().validate()
        if self.secret is not None:
            parse_secret(self.secret)
            if len(self.secret) != self.secret_length:
                raise ValueError(f"secret has {len(self.secret)} bits but secret_length is {self.secret_length}; "
                                 "make them agree")
        for name, low in (("secret_length", 1), ("encoder_channels", 1), ("encoder_epochs", 1),
                          ("encoder_batch_size", 2), ("encoder_holdout", 1)):
            if not _int_at_least(getattr(self, name), low):
                raise ValueError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if self.encoder_samples is not None and not _int_at_least(self.encoder_samples, 2):
            raise ValueError(f"encoder_samples must be an integer >= 2 or null, got {self.encoder_samples!r}")
        if not _positive(self.epsilon) or self.epsilon > 1:
            raise ValueError(f"epsilon must be a number in (0, 1] (pixel scale [0, 1]), got {self.epsilon!r}")
        if not _positive(self.encoder_lr):
            raise ValueError(f"encoder_lr must be a number > 0, got {self.encoder_lr!r}")
        if isinstance(self.l2_weight, bool) or not isinstance(self.l2_weight, (int, float)) \
                or not math.isfinite(self.l2_weight) or self.l2_weight < 0:
            raise ValueError(f"l2_weight must be a number >= 0, got {self.l2_weight!r}")
        if not _positive(self.bit_threshold) or self.bit_threshold > 1:
            raise ValueError(f"bit_threshold must be a number in (0, 1], got {self.bit_threshold!r}")
        if not _positive(self.epsilon_warmup) or self.epsilon_warmup < 1:
            raise ValueError(f"epsilon_warmup must be a number >= 1 (a factor on epsilon), got {self.epsilon_warmup!r}")
        if isinstance(self.warmup_share, bool) or not isinstance(self.warmup_share, (int, float)) \
                or not 0 <= self.warmup_share <= 1:
            raise ValueError(f"warmup_share must be a number in [0, 1], got {self.warmup_share!r}")


@register_attack
class SSBA(Attack):
    name = "ssba"
    config_cls = SSBAConfig
    description = "sample-specific invisible residual from a steganography encoder hiding a fixed secret (Li et al. 2021)"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.encoder: StegaEncoder | None = None
        self.decoder: StegaDecoder | None = None
        self.image_shape: tuple[int, int, int] | None = None
        cfg: SSBAConfig = self.config  # type: ignore[assignment]
        if cfg.secret is not None:
            self.secret = parse_secret(cfg.secret)
        else:
            gen = torch.Generator().manual_seed(cfg.seed + 7)
            self.secret = torch.randint(0, 2, (cfg.secret_length,), generator=gen).float()

    # -- the networks --------------------------------------------------------------------------------------
    def build(self, image_shape: tuple[int, int, int]) -> None:
        """Fresh encoder and decoder for images of ``image_shape`` (C, H, W), initialised from the config's seed."""
        cfg: SSBAConfig = self.config  # type: ignore[assignment]
        c, h, w = (int(v) for v in image_shape)
        with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's random state untouched
            torch.manual_seed(cfg.seed)
            self.encoder = StegaEncoder(c, h, w, cfg.secret_length, cfg.encoder_channels, cfg.epsilon)
            self.decoder = StegaDecoder(c, h, w, cfg.secret_length, cfg.encoder_channels)
        self.image_shape = (c, h, w)

    def _nets(self) -> tuple[StegaEncoder, StegaDecoder]:
        if self.encoder is None or self.decoder is None:
            raise ValueError("ssba: the encoder is not trained yet; run prepare() (it trains on the training split) "
                             "or load_state() with a bundle's attack tensors")
        return self.encoder, self.decoder

    @torch.no_grad()
    def residuals(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """The encoder's float residuals (N, C, H, W) hiding the secret in uint8 ``images`` (before rounding)."""
        check_images(images)
        enc, _ = self._nets()
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"ssba: the encoder was built for {self.image_shape} images, got {tuple(images.shape[1:])}")
        dev = next(enc.parameters()).device
        enc.eval()
        out = torch.empty(images.shape, dtype=torch.float32)
        for start in range(0, images.shape[0], batch_size):
            x = to_float(images[start:start + batch_size].to(dev))
            bits = self.secret.to(dev).expand(x.shape[0], -1)
            out[start:start + batch_size] = enc(x, bits).cpu()
        return out

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        """``round(255 * clip(x + r(x, secret)))`` for uint8 images (the stored poisoned samples)."""
        check_images(images)
        if images.shape[0] == 0:
            return images.clone()
        r = self.residuals(images)
        return to_uint8(images.float() + 255.0 * r).to(images.device)

    @torch.no_grad()
    def decode(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Per-image share of the secret's bits the decoder reads from uint8 ``images`` (N,)."""
        check_images(images)
        _, dec = self._nets()
        dev = next(dec.parameters()).device
        dec.eval()
        out = []
        for start in range(0, images.shape[0], batch_size):
            logits = dec(to_float(images[start:start + batch_size].to(dev)))
            out.append(bit_accuracy(logits, self.secret.to(dev)).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def carries_secret(self, images: torch.Tensor) -> torch.Tensor:
        """Boolean (N,): the decoder reads at least ``bit_threshold`` of the secret's bits."""
        return self.decode(images) >= self.config.bit_threshold  # type: ignore[attr-defined]

    # -- training the encoder/decoder pair (training split only) ------------------------------------------------
    def prepare(self, context: AttackContext) -> None:
        """Train the encoder and decoder on the clean training split with random bits per image, then report the
        decoder's bit accuracy on held-out training images (secret encoded / clean)."""
        cfg: SSBAConfig = self.config  # type: ignore[assignment]
        images = context.images
        check_images(images, "training images")
        n = images.shape[0]
        if n <= cfg.encoder_holdout + 1:
            raise ValueError(f"ssba: encoder_holdout {cfg.encoder_holdout} leaves no training images of the {n} "
                             "given; lower encoder_holdout")
        self.build(tuple(images.shape[1:]))
        enc, dec = self._nets()
        dev = context.device
        enc.to(dev)
        dec.to(dev)
        gen = torch.Generator().manual_seed(cfg.seed + 11)
        order = torch.randperm(n, generator=gen)
        holdout, pool = order[:cfg.encoder_holdout], order[cfg.encoder_holdout:]
        if cfg.encoder_samples is not None:
            pool = pool[:cfg.encoder_samples]
        start, cpu_start = time.perf_counter(), time.process_time()
        context.log(f"ssba: training the encoder/decoder on {pool.numel()} training images for {cfg.encoder_epochs} "
                    f"epoch(s) ({cfg.secret_length} bits, epsilon {cfg.epsilon})")
        curve = self._train_pair(images, pool, gen, context)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        held = images[torch.sort(holdout).values]
        encoded = self.apply_trigger(held)
        acc_enc, acc_clean = self.decode(encoded), self.decode(held)
        diff = (encoded.float() - held.float()).abs()
        res = self.residuals(held)
        # how much of a residual is its own: mean |r_i - mean_j r_j| over mean |r_i| (0: one pattern for all images)
        specific = float((res - res.mean(0, keepdim=True)).abs().mean() / res.abs().mean().clamp_min(1e-12))
        report = {
            "epochs": cfg.encoder_epochs, "train_images": int(pool.numel()), "seconds": seconds,
            "cpu_seconds": cpu_seconds,  # all threads of this process; wall seconds show contention
            "threads": torch.get_num_threads(), "curve": curve,
            "holdout_images": int(held.shape[0]),
            "bit_accuracy_encoded": float(acc_enc.mean()), "bit_accuracy_clean": float(acc_clean.mean()),
            "detected_encoded": float((acc_enc >= cfg.bit_threshold).float().mean()),
            "detected_clean": float((acc_clean >= cfg.bit_threshold).float().mean()),
            "residual_linf_levels": float(diff.max()), "residual_mean_abs_levels": float(diff.mean()),
            "residual_specificity": specific,
            "psnr_db": float(10 * torch.log10(255.0 ** 2 / diff.pow(2).mean().clamp_min(1e-12))),
        }
        self.info = {"encoder": report}
        context.log(f"ssba: encoder trained in {seconds:.0f} s; held-out bit accuracy {report['bit_accuracy_encoded']:.4f}"
                    f" encoded / {report['bit_accuracy_clean']:.4f} clean; carrying the secret (>= "
                    f"{cfg.bit_threshold}): {report['detected_encoded'] * 100:.1f}% encoded / "
                    f"{report['detected_clean'] * 100:.1f}% clean; PSNR {report['psnr_db']:.1f} dB, max "
                    f"|residual| {report['residual_linf_levels']:.0f} grey levels")

    def _train_pair(self, images: torch.Tensor, pool: torch.Tensor, gen: torch.Generator,
                    context: AttackContext) -> list[dict[str, float]]:
        cfg: SSBAConfig = self.config  # type: ignore[assignment]
        enc, dec = self._nets()
        dev = context.device
        opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=cfg.encoder_lr)
        bs = cfg.encoder_batch_size
        steps = math.ceil(pool.numel() / bs)
        curve: list[dict[str, float]] = []
        warm = max(1, int(round(cfg.warmup_share * steps * cfg.encoder_epochs)))
        done = 0
        enc.train()
        dec.train()
        for epoch in range(1, cfg.encoder_epochs + 1):
            perm = pool[torch.randperm(pool.numel(), generator=gen)]
            totals = {"bce": 0.0, "l2": 0.0, "bit_accuracy": 0.0}
            t0 = time.perf_counter()
            bar = tqdm(range(steps), desc=f"ssba encoder {epoch}/{cfg.encoder_epochs}", disable=not context.progress,
                       leave=False)
            for step in bar:
                idx = perm[step * bs:(step + 1) * bs]
                # the bound starts at epsilon_warmup x epsilon and shrinks linearly to epsilon (a readable signal
                # first, then an invisible one)
                enc.epsilon = cfg.epsilon * (1 + (cfg.epsilon_warmup - 1) * max(0.0, 1 - done / warm))
                done += 1
                x = to_float(images[idx].to(dev))
                bits = torch.randint(0, 2, (idx.numel(), cfg.secret_length), generator=gen).float().to(dev)
                noise = (torch.rand(x.shape, generator=gen).to(dev) - 0.5) / 255.0  # uint8 rounding
                r = enc(x, bits)
                logits = dec((x + r + noise).clamp(0, 1))
                bce = F.binary_cross_entropy_with_logits(logits, bits)
                l2 = r.pow(2).mean()
                # the fidelity term waits for the warm-up (as StegaStamp's l2_loss_await) and then ramps up
                loss = bce + cfg.l2_weight * min(1.0, max(0.0, done / warm - 1)) * l2
                if not bool(torch.isfinite(loss.detach())):
                    raise FloatingPointError(f"ssba: the encoder loss is {float(loss)} at epoch {epoch} step "
                                             f"{step + 1}; lower encoder_lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                totals["bce"] += float(bce.detach())
                totals["l2"] += float(l2.detach())
                totals["bit_accuracy"] += float(bit_accuracy(logits.detach(), bits).mean())
                if step % 50 == 0:
                    bar.set_postfix(bce=f"{totals['bce'] / (step + 1):.3f}",
                                    bits=f"{totals['bit_accuracy'] / (step + 1):.3f}")
            curve.append({"epoch": epoch, **{k: v / steps for k, v in totals.items()},
                          "seconds": time.perf_counter() - t0})
            context.log(f"  encoder epoch {epoch}: bce {curve[-1]['bce']:.4f} residual mse {curve[-1]['l2']:.2e} "
                        f"bit accuracy {curve[-1]['bit_accuracy']:.4f} ({curve[-1]['seconds']:.0f} s)")
        enc.epsilon = float(cfg.epsilon)
        enc.eval()
        dec.eval()
        return curve

    # -- state for the bundle --------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        enc, dec = self._nets()
        out = {f"encoder.{k}": v.detach().cpu().clone() for k, v in enc.state_dict().items()}
        out.update({f"decoder.{k}": v.detach().cpu().clone() for k, v in dec.state_dict().items()})
        out["secret"] = self.secret.to(torch.uint8)
        out["image_shape"] = torch.tensor(self.image_shape, dtype=torch.int64)
        return out

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        cfg: SSBAConfig = self.config  # type: ignore[assignment]
        shape, secret = tensors.get("image_shape"), tensors.get("secret")
        if shape is None or secret is None or shape.numel() != 3:
            raise ValueError("ssba: state needs 'image_shape' (C, H, W), 'secret' and the encoder.* / decoder.* "
                             "weights")
        unknown = sorted(k for k in tensors if not k.startswith(("encoder.", "decoder."))
                         and k not in ("image_shape", "secret"))
        if unknown:
            raise ValueError(f"ssba: unknown state tensor(s) {', '.join(unknown)}")
        if secret.dim() != 1 or secret.numel() != cfg.secret_length or not bool(((secret == 0) | (secret == 1)).all()):
            raise ValueError(f"ssba: the stored secret must be {cfg.secret_length} bits of 0/1, got "
                             f"{secret.dtype} {tuple(secret.shape)}")
        if not torch.equal(secret.float(), self.secret):
            raise ValueError("ssba: the stored secret differs from the config's secret")
        self.build(tuple(int(v) for v in shape.tolist()))  # type: ignore[arg-type]
        enc, dec = self._nets()
        for prefix, net in (("encoder.", enc), ("decoder.", dec)):
            part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if any(not v.is_floating_point() or not bool(torch.isfinite(v).all()) for v in part.values()):
                raise ValueError(f"ssba: the stored {prefix.rstrip('.')} weights must be finite floats")
            try:
                net.load_state_dict(part, strict=True)
            except RuntimeError as err:
                raise ValueError(f"ssba: the stored {prefix.rstrip('.')} weights do not fit the config's encoder "
                                 f"size: {err}") from err
        enc.eval().requires_grad_(False)
        dec.eval().requires_grad_(False)
