"""UGD-IML (arXiv 2508.06101): one conditional diffusion model for forgery localization (IML)
and constrained IML (CIML: the forged image plus its authentic source).

The mask is what diffuses: ``x0 = 2 M - 1`` (1 x S x S). Three modules, as in the paper:

- Condition Control Module (``ConditionControl``): the 9-channel condition [forged, reference,
  |forged - reference|] (ImageNet-normalised; reference and difference are zeros in IML) is
  encoded once per file by a small CNN and concatenated with ``x_t`` at the denoiser's input.
- Noise Addition Module (``MaskDiffusion``): T = 1000 steps, linear betas 1e-4..0.02 for
  t = 1..T, t = 0 is the clean mask (beta_0 = 0); diffusers' DDIM scheduler holds the table.
- Denoising Module: diffusers' ``UNet2DModel`` predicting epsilon; a class embedding (IML = 0,
  CIML = 1) is added to the timestep embedding, which every residual block receives as
  scale/shift. One set of weights serves both modes.

Inference runs DDIM for S steps on K samples per file, all B x K samples as one tensor.
``P = mean_k (x0_k + 1) / 2``; mask = ``P > threshold``; uncertainty = per-pixel std over the K
samples; image score = mean of the top ``score_top`` fraction of P. The initial noise of every
file is drawn on the CPU from ``item.seed(config.seed)``, so a file's mask does not depend on
its batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qscore.artefacts import to_uint8
from qscore.media.image import load_image, load_mask
from qscore.media.sampling import IMAGENET_MEAN, IMAGENET_STD, normalize, squash_resize, to_tensor
from qscore.models.base import Model, ModelSpec
from qscore.types import Item, MediaError, Output, Sample

TRAIN_STEPS = 1000  # T
BETA_START, BETA_END = 1e-4, 0.02
STD_MAX = 0.5  # the largest possible std of values in [0, 1]: uncertainty PNG = std / 0.5 x 255


@dataclass
class UGDIMLConfig:
    mode: str = "iml"  # "iml" | "ciml"
    size: int = 256  # the mask is diffused at size x size (512 works too: --set size=512)
    steps: int = 10  # DDIM steps S
    samples: int = 8  # samples K per file (uncertainty = their per-pixel std)
    threshold: float = 0.5  # mask = P > threshold
    score_top: float = 0.01  # image score: mean of the top 1 % of P
    seed: int = 0  # per-file noise seed: item.seed(seed)
    prediction: str = "epsilon"  # the denoiser predicts "epsilon" (the noise) or "sample" (the clean mask x0)
    channels: tuple = (32, 64, 128, 256, 256)  # UNet levels; each but the last halves the size
    layers_per_block: int = 2
    attention_levels: int = 1  # the deepest levels with self-attention (plus the mid block)
    head_dim: int = 32
    groups: int = 8  # GroupNorm groups
    cond_channels: int = 32  # Condition Control Module output, concatenated with x_t
    cond_blocks: int = 0  # residual blocks at each of the Condition Control Module's scales (0: plain convolutions)
    image_scale: int = 1  # the images enter at (size x image_scale)^2, strided down to size once per file
    image_fit: str = "squash"  # "squash": resized to the square (aspect ignored); "pad": pixels kept as they are on a zero-padded square (scaled down, aspect kept, only if larger)
    ciml_prob: float = 0.5  # training: share of pairs with a reference trained as CIML
    crop_min: float = 0.5  # training: smallest random crop, as a fraction of the image area
    lr: float = 3e-4  # training: AdamW learning rate (`qscore train --lr` overrides it)


class ConditionControl(nn.Module):
    """Condition Control Module: (forged, reference, ciml) -> features (B, C, S, S).

    The images may come at ``scale`` x the mask size (a power of two): stride-2 convolutions
    bring them down to S, so the fine traces of an edit (resampling, noise, JPEG grids) that a
    resize to S would erase reach the denoiser; this runs once per file, not at every DDIM
    step. ``blocks`` residual blocks at each scale (full resolution first) give the encoder depth
    to find such traces where a plain convolution per scale reads little more than the pixels.
    In IML (``ciml`` False) the reference and the difference are replaced by zeros, whatever was
    passed, so IML never sees a reference.
    """

    def __init__(self, channels: int, groups: int, scale: int = 1, blocks: int = 0):
        super().__init__()
        if scale < 1 or scale & (scale - 1):
            raise ValueError(f"image_scale must be a power of two, got {scale}")
        norm = lambda: nn.GroupNorm(math.gcd(groups, channels), channels)  # noqa: E731
        residual = lambda: [ResidualBlock(channels, norm) for _ in range(blocks)]  # noqa: E731
        layers = [nn.Conv2d(9, channels, 3, padding=1), norm(), nn.SiLU(), *residual()]
        for _ in range(scale.bit_length() - 1):  # log2(scale) halvings
            layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1), norm(), nn.SiLU(), *residual()]
        self.net = nn.Sequential(*layers, nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, forged: Tensor, reference: Tensor, ciml: Tensor) -> Tensor:
        """forged, reference: (B, 3, S x scale, S x scale) normalised; ciml: (B,) bool."""
        keep = ciml.to(forged.dtype).view(-1, 1, 1, 1)
        reference = reference * keep
        return self.net(torch.cat([forged, reference, (forged - reference).abs() * keep], 1))


class ResidualBlock(nn.Module):
    """x + conv(SiLU(norm(conv(x)))), then norm and SiLU: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, norm):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), norm(), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), norm())
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


class MaskDiffusion:
    """Noise Addition Module and DDIM sampler over one shared alpha-bar table (length T + 1,
    ``alpha_bar[0] = 1``): ``add_noise`` at t = 0 returns x0, training draws t in 1..T, and DDIM
    ("trailing" spacing) starts at t = T and ends on the clean state."""

    def __init__(self, steps: int, prediction: str = "epsilon"):
        from diffusers import DDIMScheduler  # diffusers' import takes seconds: made at build, not when planned or decoding

        betas = np.concatenate([[0.0], np.linspace(BETA_START, BETA_END, TRAIN_STEPS)])
        self.scheduler = DDIMScheduler(
            num_train_timesteps=TRAIN_STEPS + 1,
            trained_betas=betas,
            clip_sample=True,
            set_alpha_to_one=True,
            timestep_spacing="trailing",
            prediction_type=prediction,
        )
        self.scheduler.set_timesteps(steps)
        # the scheduler's own table, rebuilt on the CPU so that meta-device construction works
        self.alpha_bar = torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float32, device="cpu"), 0)  # (T + 1,)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """q(x_t | x0): sqrt(ab_t) x0 + sqrt(1 - ab_t) eps; x0, eps (B, 1, S, S), t (B,) long."""
        ab = self.alpha_bar.to(x0.device)[t].view(-1, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def random_t(self, n: int, device: torch.device) -> Tensor:
        return torch.randint(1, TRAIN_STEPS + 1, (n,), device=device)

    @property
    def timesteps(self) -> Tensor:
        return self.scheduler.timesteps

    def step(self, eps: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """One deterministic DDIM step (eta = 0) from t to the next timestep, x0 clipped to [-1, 1]."""
        return self.scheduler.step(eps, t, x).prev_sample


class UGDIML(Model):
    spec = ModelSpec(
        name="ugdiml",
        task="forgery",
        summary="UGD-IML: conditional mask diffusion, IML and CIML with one set of weights; mask + uncertainty",
        paper="arXiv:2508.06101",
        licence="no official weights (train with `qscore train ugdiml`); UNet from diffusers, Apache-2.0",
        score_range="[0, 1] image forgery score (higher = more likely manipulated)",
        columns={
            "forgery_score": pa.float64(),
            "manipulated_fraction": pa.float64(),
            "threshold": pa.float32(),
            "mean_uncertainty": pa.float32(),
        },
        artefacts=("mask", "probability", "uncertainty"),
        reference_modes=("ciml",),
    )
    Config = UGDIMLConfig

    def __init__(self, config: UGDIMLConfig):
        super().__init__(config)
        if config.mode not in ("iml", "ciml"):
            raise ValueError(f"mode must be iml or ciml, got {config.mode!r}")
        if config.prediction not in ("epsilon", "sample"):
            raise ValueError(f"prediction must be epsilon or sample, got {config.prediction!r}")
        if config.image_fit not in ("squash", "pad"):
            raise ValueError(f"image_fit must be squash or pad, got {config.image_fit!r}")
        levels = len(config.channels)
        attention = [i >= levels - config.attention_levels for i in range(levels)]
        self.condition = ConditionControl(config.cond_channels, config.groups, config.image_scale, config.cond_blocks)
        from diffusers import UNet2DModel

        self.denoiser = UNet2DModel(
            sample_size=config.size,
            in_channels=1 + config.cond_channels,
            out_channels=1,
            block_out_channels=tuple(config.channels),
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            layers_per_block=config.layers_per_block,
            attention_head_dim=config.head_dim,
            norm_num_groups=config.groups,
            resnet_time_scale_shift="scale_shift",
            num_class_embeds=2,  # class_embed_type None: nn.Embedding(2) added to the timestep embedding
        )
        self.diffusion = MaskDiffusion(config.steps, config.prediction)

    # ---- data ----------------------------------------------------------------------------
    def preparer(self, train: bool = False) -> "UGDIMLPrepare":
        c = self.config
        return UGDIMLPrepare(c.size, c.mode == "ciml", c.samples, c.seed, train, c.crop_min, c.size * c.image_scale, c.image_fit)

    # ---- model ---------------------------------------------------------------------------
    def denoise(self, x_t: Tensor, t: Tensor, features: Tensor, ciml: Tensor) -> Tensor:
        """The denoiser's prediction (the noise or x0, by ``config.prediction``): x_t (N, 1, S, S),
        t (N,) or scalar, features (N, C, S, S), ciml (N,) bool -> (N, 1, S, S) fp32."""
        x = torch.cat([x_t, features.to(x_t.dtype)], 1)
        return self.denoiser(x, t, class_labels=ciml.long()).sample.float()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """forged, reference (B, 3, S, S), ciml (B,) bool, noise (B, K, S, S) -> score (B,),
        prob (B, S, S), std (B, S, S). The B x K samples run as one tensor through S DDIM steps."""
        noise, ciml = batch["noise"], batch["ciml"]
        b, k, h, w = noise.shape
        features = self.condition(batch["forged"], batch["reference"], ciml).repeat_interleave(k, 0)
        labels = ciml.repeat_interleave(k)
        x = noise.reshape(b * k, 1, h, w).float()
        for t in self.diffusion.timesteps:
            x = self.diffusion.step(self.denoise(x, t.to(x.device), features, labels), t, x)
        probs = ((x.clamp(-1, 1) + 1) / 2).view(b, k, h, w)
        prob = probs.mean(1)
        top = max(1, round(self.config.score_top * h * w))
        score = prob.flatten(1).topk(top, dim=1).values.mean(1)
        return {"score": score, "prob": prob, "std": probs.std(1, unbiased=False)}

    def training_loss(self, batch: dict[str, Tensor], targets: Tensor | None = None) -> Tensor:
        """At a random t in 1..T: epsilon MSE (``prediction = epsilon``), or x0 MSE plus soft Dice
        on the predicted mask (``sample``: the segmentation-diffusion recipe, which learns the
        condition in far fewer steps). Pairs with a reference train as CIML with probability
        ``ciml_prob`` and as IML otherwise (same weights, class 0, reference zeroed); ``targets``
        (image labels) are implied by the masks and not used."""
        from qscore.train.losses import dice_loss, eps_mse

        mask = batch["mask"].float()  # (B, 1, S, S) in {0, 1}
        x0 = mask * 2 - 1
        n = x0.shape[0]
        ciml = batch["ciml"] & (torch.rand(n, device=x0.device) < self.config.ciml_prob)
        t = self.diffusion.random_t(n, x0.device)
        eps = torch.randn_like(x0)
        features = self.condition(batch["forged"], batch["reference"], ciml)
        predicted = self.denoise(self.diffusion.add_noise(x0, eps, t), t, features, ciml)
        if self.config.prediction == "epsilon":
            return eps_mse(predicted, eps)
        return F.mse_loss(predicted, x0) + dice_loss((predicted.clamp(-1, 1) + 1) / 2, mask)

    def postprocess(self, outputs: dict[str, Tensor], samples) -> list[Output]:
        """Maps back to each file's original size: binary mask (0/255), P x 255 and std / 0.5 x 255.
        With ``image_fit = pad`` only the maps' part over the image (not its padding) is kept."""
        results = []
        side = self.config.size * self.config.image_scale
        for i, sample in enumerate(samples):
            h, w = sample.keep["size"]
            maps = torch.stack([outputs["prob"][i], outputs["std"][i]]).float()[None]  # (1, 2, S, S)
            if self.config.image_fit == "pad":
                ph, pw = sample.keep["placed"]
                maps = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)[..., :ph, :pw]
            prob, std = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
            mask = prob > self.config.threshold
            score = float(outputs["score"][i])
            columns = {
                "score": score,
                "forgery_score": score,
                "manipulated_fraction": float(mask.mean()),
                "threshold": self.config.threshold,
                "mean_uncertainty": float(outputs["std"][i].mean()),
            }
            artefacts = {
                "mask": mask.astype(np.uint8) * 255,
                "probability": to_uint8(prob),
                "uncertainty": to_uint8(std / STD_MAX),
            }
            results.append(Output(columns, artefacts, {"probability": prob, "uncertainty": std}))
        return results


@dataclass
class UGDIMLPrepare:
    """Item -> Sample: forged (and reference) image normalised on an image_size^2 square, and the K
    initial noise maps (size^2) drawn from the file's seed. ``fit = squash`` resizes the image
    to the square; ``pad`` keeps its pixels (top-left, zeros around; only an image larger than
    the square is scaled down), so that the traces IML reads (JPEG's 8-pixel grid, resampling,
    noise) are not resampled away. ``train``: the GT mask instead of the noise, and one random
    crop and flip applied alike to image, reference and mask."""

    size: int
    ciml: bool
    samples: int
    seed: int
    train: bool = False
    crop_min: float = 0.5
    image_size: int = 0  # the images' side; 0: size
    fit: str = "squash"

    def __post_init__(self) -> None:
        self.image_size = self.image_size or self.size

    def __call__(self, item: Item) -> Sample:
        forged, facts = load_image(item.path)
        height, width = forged.shape[:2]
        reference = self._reference(item, (height, width), facts)
        box, flip = self._augmentation() if self.train else ((0.0, 0.0, 1.0, 1.0), False)
        side = self.image_size
        placed = self._placed(height, width, box)
        inputs = {
            "forged": self._image(forged, box, flip, placed),
            "reference": torch.zeros(3, side, side) if reference is None else self._image(reference, box, flip, placed),
            "ciml": torch.tensor(reference is not None),
        }
        if self.train:
            inputs["mask"] = self._mask(item.mask, box, flip, placed)
        else:
            generator = torch.Generator().manual_seed(item.seed(self.seed))
            inputs["noise"] = torch.randn((self.samples, self.size, self.size), generator=generator)
        return Sample(item, inputs, facts, {"size": (height, width), "placed": placed})

    def _reference(self, item: Item, size: tuple[int, int], facts: dict) -> np.ndarray | None:
        """The authentic source (CIML; in training whenever the item has one), or None."""
        if not (self.ciml or self.train):
            return None
        if item.reference is None:
            if self.train:
                return None
            raise MediaError("CIML needs a reference image: none given (use --pairs CSV or <stem>.ref.<ext>)")
        name = os.path.basename(item.reference)
        try:
            reference, _ = load_image(item.reference)
        except MediaError as e:
            raise MediaError(f"reference {name}: {e}") from e
        if reference.shape[:2] != size:
            note = (f"reference {name} is {reference.shape[1]}x{reference.shape[0]}, "
                    f"resized to the forged image's {size[1]}x{size[0]}")
            facts["decode_warnings"] = "; ".join(filter(None, [facts.get("decode_warnings"), note]))
        return reference

    def _augmentation(self) -> tuple[tuple[float, float, float, float], bool]:
        """A random crop (top, left, height, width as fractions; same aspect) and a flip."""
        side = math.sqrt(self.crop_min + (1 - self.crop_min) * torch.rand(()).item())
        top, left = (torch.rand(2) * (1 - side)).tolist()
        return (top, left, side, side), bool(torch.rand(()) < 0.5)

    @staticmethod
    def _crop(h: int, w: int, box: tuple[float, float, float, float]) -> tuple[slice, slice]:
        top, left, bh, bw = box
        y0, x0 = round(top * h), round(left * w)
        return slice(y0, y0 + max(1, round(bh * h))), slice(x0, x0 + max(1, round(bw * w)))

    def _placed(self, h: int, w: int, box) -> tuple[int, int]:
        """(h, w) the image's crop takes on the image_size square: all of it (squash), or its own
        size, scaled down with its aspect only when it is larger than the square (pad)."""
        if self.fit == "squash":
            return self.image_size, self.image_size
        rows, cols = self._crop(h, w, box)
        ch, cw = rows.stop - rows.start, cols.stop - cols.start
        scale = min(1.0, self.image_size / max(ch, cw))
        return max(1, round(ch * scale)), max(1, round(cw * scale))

    def _resize(self, x: Tensor, box, flip: bool, hw: tuple[int, int]) -> Tensor:
        """(N, C, H, W) -> crop ``box`` (fractions) -> (N, C, *hw), flipped left-right."""
        rows, cols = self._crop(*x.shape[-2:], box)
        x = squash_resize(x[..., rows, cols], hw)
        return x.flip(-1) if flip else x

    def _pad(self, x: Tensor) -> Tensor:
        """(..., h, w) -> (..., image_size, image_size), zeros right and below."""
        return F.pad(x, (0, self.image_size - x.shape[-1], 0, self.image_size - x.shape[-2]))

    def _image(self, pixels: np.ndarray, box, flip: bool, placed: tuple[int, int]) -> Tensor:
        """uint8 (H, W, 3) -> normalised (3, image_size, image_size); padding is 0 (the mean colour)."""
        pixels = self._resize(to_tensor(pixels[None]), box, flip, placed)
        return self._pad(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)[0])

    def _mask(self, path: str | None, box, flip: bool, placed: tuple[int, int]) -> Tensor:
        """GT mask file (``load_mask``: brightest channel > 127 is manipulated) -> {0, 1} (1, size, size),
        placed as the image is; no file: an authentic image, all zeros."""
        if path is None:
            return torch.zeros(1, self.size, self.size)
        mask = torch.from_numpy(load_mask(path)).float()[None, None]
        if self.fit == "pad":  # on the image's square first, then the mean of each cell's pixels
            mask = F.avg_pool2d(self._pad(self._resize(mask, box, flip, placed)), self.image_size // self.size)
        else:
            mask = self._resize(mask, box, flip, (self.size, self.size))
        return (mask[0] > 0.5).float()
