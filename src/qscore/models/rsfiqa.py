"""RSFIQA (arXiv 2508.07818): no-reference image quality from region-aware semantic attention.

image -> label map (``sam_regions``: SAM, or SLIC where SAM's weights are not installed) -> per-region description (CLIP zero-shot ratings or a
chat VLM) -> region embeddings e_r; any timm/torchvision backbone -> feature map F (C, h, w);
RSA(F, label map, e) -> global attention map G (h, w) + pooled feature -> score.

Where the work happens: the preparer (CPU workers) decodes, sizes the working image, hashes it
and reads the region cache; on a miss it also resizes the image for SAM (or partitions it with
SLIC right there). ``precompute`` (device) segments and describes the misses, and the runner
keeps them in the cache; ``forward`` crops image and label map identically and runs backbone +
RSA. Scores average several crops at test time; the heatmap is
G assembled over the crops, overlaid on the image at its original size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qscore.cache import ArrayCache
from qscore.models.base import Model, ModelSpec
from qscore.types import Item, MissingWeights, Output, Sample
from qscore.models.sam_regions import (
    SAM_KEYS,
    RegionRules,
    SamRegions,
    build_sam,
    default_cache_dir,
    fingerprint,
    sam_input,
    slic_label_map,
)

DIMENSIONS = ("colour", "noise", "artifact", "blur", "exposure", "overall")
PAIRS = (  # (positive, negative) per dimension, in DIMENSIONS order
    ("a photo with natural, vivid colours", "a photo with dull, distorted colours"),
    ("a clean photo", "a noisy, grainy photo"),
    ("a photo without artifacts", "a photo with compression artifacts"),
    ("a sharp photo", "a blurry photo"),
    ("a well-exposed photo", "an over- or under-exposed photo"),
    ("a high quality photo", "a low quality photo"),
)
CONTENT = (
    "person", "face", "crowd", "dog", "cat", "bird", "animal", "sky", "cloud", "water", "tree",
    "grass", "flower", "plant", "mountain", "rock", "sand", "snow", "building", "room",
    "furniture", "road", "car", "vehicle", "food", "text", "screen", "object", "night scene", "background",
)
SEVERITY = ("none", "slight", "moderate", "strong")  # of a distortion, from P(positive prompt)
QUALITY = ("poor", "fair", "good", "excellent")


@dataclass
class Config:
    backbone: str = "resnet50"  # timm name, or "tv:<name>" for a torchvision model
    crop_size: int = 384
    test_grid: int = 3  # test_grid x test_grid crops averaged at test time; must cover max_side
    max_side: int = 1024  # the working image's long side is at most this (its labels, crops)
    regions: str = "auto"  # sam | slic | auto: sam where its weights are installed (tiny: always), else slic
    sam: str = "vit_b"  # vit_b | vit_l | vit_h | tiny
    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    min_region_frac: float = 0.005
    r_max: int = 16
    sam_points_per_batch: int = 256  # point prompts decoded at once on the device
    describer: str = "clip"  # clip | mllm | measured (signal statistics, needs no weights)
    clip_arch: str = "ViT-B-16"  # "tiny": a small random CLIP for tests
    mllm: str = "Qwen/Qwen2.5-VL-3B-Instruct"  # transformers chat VLM for describer=mllm
    dim: int = 256
    region_layers: int = 2
    heads: int = 8
    backbone_weights: str = ""  # weights.toml key of the backbone's pretrained state dict (--init official)
    rank_weight: float = 0.3  # L1 + rank_weight * rank loss on normalised MOS
    lr: float = 1e-4  # RSA and head; the backbone trains at lr * backbone_lr_scale
    backbone_lr_scale: float = 0.2  # 2e-5 for a pretrained backbone
    weight_decay: float = 0.05
    cache_dir: str = ""  # default $QSCORE_HOME/cache/rsfiqa


class Backbone(nn.Module):
    """Any timm model (``features_only``, last stage) or torchvision CNN (``tv:`` prefix, up to
    its global pool) as a feature map. uint8 (B, 3, H, W) -> float (B, C, h, w)."""

    def __init__(self, name: str, crop_size: int):
        super().__init__()
        if name.startswith("tv:"):
            import torchvision

            net = torchvision.models.get_model(name[3:], weights=None)
            if hasattr(net, "features"):
                self.body = net.features
            else:
                layers = list(net.children())
                cut = next(i for i, m in enumerate(layers) if isinstance(m, nn.AdaptiveAvgPool2d))
                self.body = nn.Sequential(*layers[:cut])
            mean, std, self.nhwc = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False
            with torch.no_grad():  # a dry run in eval mode, so batch-norm statistics stay untouched
                self.channels = self.body.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
            self.body.train()
        else:
            import timm

            kwargs = dict(pretrained=False, features_only=True, out_indices=(-1,))
            try:  # ViTs and Swins are built for the crop size; CNNs take any size
                self.body = timm.create_model(name, img_size=crop_size, **kwargs)
            except TypeError:
                self.body = timm.create_model(name, **kwargs)
            self.channels = self.body.feature_info.channels()[-1]
            self.nhwc = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
            mean, std = self.body.pretrained_cfg.get("mean", (0.5,) * 3), self.body.pretrained_cfg.get("std", (0.5,) * 3)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        out = self.body((images.float() - self.mean) / self.std)
        out = out[-1] if isinstance(out, (list, tuple)) else out
        return out.permute(0, 3, 1, 2) if self.nhwc else out


def mlp(dims: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


class RSA(nn.Module):
    """Region-aware semantic attention (spec steps 1-6).

    feats (B, C, h, w); area (B, R, h, w): fraction of each cell covered by each region (sums to
    1 over R); regions (B, R, E): region embeddings; present (B, R): region is in this crop.
    Returns score (B,), G (B, h, w) summing to 1, region weights w (B, R) (0 where absent).
    No positional code on regions, so permuting region order permutes w and changes nothing else.
    """

    def __init__(self, channels: int, region_dim: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.heads = heads
        self.v = nn.Sequential(nn.Linear(channels, dim), nn.LayerNorm(dim))
        self.t = nn.Sequential(nn.Linear(region_dim, dim), nn.LayerNorm(dim))
        self.fuse = mlp((3 * dim, dim, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.mix = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.weight = mlp((dim, dim // 2, 1))
        self.q, self.k, self.kv_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.cell = mlp((2 * dim, dim, dim))
        self.head = mlp((2 * dim, dim, 1))

    def forward(self, feats: Tensor, area: Tensor, regions: Tensor, present: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, _, h, w = feats.shape
        v = self.v(feats.flatten(2).transpose(1, 2))  # (B, P, d)
        a = area.flatten(2).float()  # (B, R, P)
        mass = a.sum(-1)  # (B, R) region area in cells
        t = self.t(regions)  # (B, R, d)
        u = (a @ v.float()) / mass.clamp_min(1e-6)[..., None]  # A-weighted mean of V per region
        z = self.fuse(torch.cat([u, t, u * t], -1))
        z = self.mix(z, src_key_padding_mask=~present).masked_fill(~present[..., None], 0.0)
        weights = self.weight(z).squeeze(-1).float().masked_fill(~present, float("-inf")).softmax(-1)  # (B, R)
        g = torch.einsum("brp,br->bp", a, weights / mass.clamp_min(1e-6))
        g = g / g.sum(-1, keepdim=True)  # (B, P)
        # region-constrained cross-attention: each cell attends to the texts of the regions in it
        bias = a.clamp_min(0).log().transpose(1, 2)[:, None]  # (B, 1, P, R), -inf outside
        split = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        s = F.scaled_dot_product_attention(split(self.q(v)), split(self.k(t)), split(self.kv_v(t)), attn_mask=bias.to(v.dtype))
        q = self.cell(torch.cat([v, s.transpose(1, 2).flatten(2)], -1))  # (B, P, d)
        pooled = torch.einsum("bp,bpd->bd", g, q.float())
        context = torch.einsum("br,brd->bd", weights, z.float())
        score = self.head(torch.cat([pooled, context], -1).to(v.dtype)).squeeze(-1).float().sigmoid()
        return score, g.view(b, h, w), weights


# ---- region describers ------------------------------------------------------------------------------


def region_crops(image: Tensor, labels: Tensor, n: int, size: int, fill: Tensor) -> Tensor:
    """Each region's bounding box, pixels outside the region set to ``fill``, padded square and
    resized. image: float (3, H, W) in [0, 1]; labels: (H, W) in 0..n-1 -> (n, 3, size, size)."""
    from segment_anything.utils.amg import batched_mask_to_box

    masks = labels[None] == torch.arange(n, device=labels.device)[:, None, None]
    crops = []
    for mask, (x0, y0, x1, y1) in zip(masks, batched_mask_to_box(masks).tolist()):
        crop = torch.where(mask[y0 : y1 + 1, x0 : x1 + 1], image[:, y0 : y1 + 1, x0 : x1 + 1], fill[:, None, None])
        h, w = crop.shape[1:]
        side = max(h, w)
        canvas = fill[:, None, None].expand(3, side, side).clone()
        canvas[:, (side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = crop
        crops.append(F.interpolate(canvas[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(crops)


def description(content: int, ratings: Sequence[float]) -> str:
    """"a photo of a dog; colour: none; ...; overall quality: good" from P(positive) ratings."""
    parts = [f"a photo of a {CONTENT[content]}"]
    for name, p in zip(DIMENSIONS, ratings):
        if name == "overall":
            parts.append(f"overall quality: {QUALITY[min(int(p * 4), 3)]}")
        else:
            parts.append(f"{name}: {SEVERITY[min(int((1 - p) * 4), 3)]}")
    return "; ".join(parts)


class ClipDescriber(nn.Module):
    """Zero-shot region description with CLIP: antonym-prompt ratings per dimension (P of the
    positive side) and a content label from ``CONTENT``. Region embedding e_r = [CLIP text
    embedding of the description ; ratings] (E = D + 6). Subclasses replace ``rate``."""

    def __init__(self, clip: nn.Module, tokenizer: Any, mean, std, size: int):
        from qscore.models.clip_common import AntonymPrompts

        super().__init__()
        self.clip, self.tokenizer, self.size = clip, tokenizer, size
        self.ratings = AntonymPrompts(clip, tokenizer, PAIRS)
        self.register_buffer("content_tokens", tokenizer([f"a photo of a {c}" for c in CONTENT]), persistent=False)
        self.content_features: Tensor | None = None  # (len(CONTENT), D), computed on first use
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)
        self.dim = clip.text_projection.shape[-1] + len(DIMENSIONS)

    def reset(self) -> None:
        """Forget cached text features (after the CLIP weights change)."""
        self.ratings.reset()
        self.content_features = None

    def rate(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """crops: float (n, 3, S, S) in [0, 1] -> ratings (n, 6) in [0, 1], content (n,) long."""
        from qscore.models.clip_common import encode_images

        feats = encode_images(self.clip, (crops - self.mean[:, None, None]) / self.std[:, None, None])
        if self.content_features is None or self.content_features.device != feats.device:
            with torch.autocast(feats.device.type, enabled=False):
                self.content_features = F.normalize(self.clip.encode_text(self.content_tokens).float(), dim=-1)
        return self.ratings(feats), (feats @ self.content_features.T).argmax(-1)

    @torch.no_grad()
    def forward(self, image: Tensor, labels: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """image: uint8 (3, H, W); labels: (H, W) in 0..n-1 -> e (n, E) fp32, content (n,) long."""
        crops = region_crops(image.float() / 255, labels, n, self.size, self.mean)
        ratings, content = self.rate(crops)
        texts = [description(c, r) for c, r in zip(content.tolist(), ratings.tolist())]
        text = F.normalize(self.clip.encode_text(self.tokenizer(texts).to(image.device)).float(), dim=-1)
        return torch.cat([text, ratings.float()], -1), content


class MllmDescriber(ClipDescriber):
    """Ratings and content from a transformers chat VLM asked for JSON (greedy decoding); the
    description is embedded with CLIP's text tower as for ``clip``. An optional extra."""

    PROMPT = (
        "Rate this image region. Answer with JSON only: {\"content\": one of [" + ", ".join(CONTENT) + "], "
        + ", ".join(f'"{d}": 0-4' for d in DIMENSIONS[:-1])
        + ', "overall": 0-4}. For colour, noise, artifact, blur and exposure give the severity of that '
        "distortion (0 none, 4 severe); for overall the quality (0 bad, 4 excellent)."
    )

    def __init__(self, clip, tokenizer, mean, std, size: int, name: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        super().__init__(clip, tokenizer, mean, std, size)
        self.processor = AutoProcessor.from_pretrained(name)
        self.vlm = AutoModelForImageTextToText.from_pretrained(name, torch_dtype=torch.bfloat16).eval().requires_grad_(False)
        self.size = 448  # the VLM sees larger crops than CLIP

    def rate(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        ratings, content = [], []
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.PROMPT}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        for crop in crops:
            picture = (crop.permute(1, 2, 0) * 255).round().byte().cpu().numpy()
            inputs = self.processor(text=[prompt], images=[picture], return_tensors="pt").to(crops.device)
            out = self.vlm.generate(**inputs, max_new_tokens=96, do_sample=False)
            answer = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
            r, c = parse_answer(answer)
            ratings.append(r)
            content.append(c)
        return torch.tensor(ratings, device=crops.device), torch.tensor(content, device=crops.device)


def parse_answer(answer: str) -> tuple[list[float], int]:
    """The VLM's JSON -> P(positive)-like ratings in [0, 1] (1 - severity/4; overall/4) and a
    content index ("object" when unknown). Unparseable answers rate 0.5 everywhere."""
    try:
        data = json.loads(answer[answer.index("{") : answer.rindex("}") + 1])
    except ValueError:
        data = {}
    ratings = []
    for name in DIMENSIONS:
        try:
            value = min(max(float(data[name]) / 4, 0.0), 1.0)
        except (KeyError, TypeError, ValueError):
            value = 0.5
        ratings.append(value if name == "overall" else 1.0 - value)
    label = str(data.get("content", "")).strip().lower()
    return ratings, CONTENT.index(label) if label in CONTENT else CONTENT.index("object")


MEASURED = (  # per-region statistics of the measured describer, in this order before the ratings
    "luma", "contrast", "dark_clip", "bright_clip", "colourfulness", "saturation", "log_noise_all",
    "log_noise_flat", "log_gradient", "fine_coarse", "log_blockiness", "log_laplacian_contrast", "log_gradient_contrast",
)


def _filter3(y: Tensor, kernel: Sequence[Sequence[float]]) -> Tensor:
    """3x3 filter of a (H, W) map with replicated borders -> (H, W)."""
    k = torch.tensor(kernel, dtype=y.dtype, device=y.device)[None, None]
    return F.conv2d(F.pad(y[None, None], (1, 1, 1, 1), mode="replicate"), k)[0, 0]


def _gradient(y: Tensor) -> Tensor:
    sobel = ((-1, 0, 1), (-2, 0, 2), (-1, 0, 1))
    return torch.hypot(_filter3(y, sobel), _filter3(y, tuple(zip(*sobel))))


class MeasuredDescriber(nn.Module):
    """Region description by measurement instead of a vision-language model: per region, the
    statistics in ``MEASURED`` (luminance and clipping, Hasler-Suesstrunk colourfulness,
    Immerkaer noise over all and over flat pixels, gradient energy, fine-to-coarse detail ratio,
    8x8 blockiness, detail relative to contrast) and the six ratings in [0, 1] (higher is better)
    as fixed monotone maps of them. No weights, deterministic; no content label (content -1).
    e_r = [statistics ; ratings] (E = 13 + 6)."""

    def __init__(self):
        super().__init__()
        self.dim = len(MEASURED) + len(DIMENSIONS)

    def reset(self) -> None:
        """Nothing is cached (the interface of the CLIP describer)."""

    @torch.no_grad()
    def forward(self, image: Tensor, labels: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """image: uint8 (3, H, W); labels: (H, W) in 0..n-1 -> e (n, E) fp32, content (n,) = -1."""
        x = image.float() / 255
        r, g, b = x
        y = 0.299 * r + 0.587 * g + 0.114 * b
        grad = _gradient(y)
        coarse = F.interpolate(_gradient(F.avg_pool2d(y[None, None], 2)[0, 0])[None, None], size=y.shape, mode="nearest")[0, 0]
        noise = _filter3(y, ((1, -2, 1), (-2, 4, -2), (1, -2, 1))).abs() * (torch.pi / 2) ** 0.5 / 6  # Immerkaer sigma
        flat = (grad < 0.1).float()
        rg, yb = r - g, 0.5 * (r + g) - b
        top, bottom = x.max(0).values, x.min(0).values
        dx = torch.zeros_like(y)  # |step to the right neighbour|; the last column has none
        dx[:, :-1] = (y[:, 1:] - y[:, :-1]).abs()
        has_step = torch.ones_like(y)
        has_step[:, -1] = 0
        edge = (torch.arange(y.shape[1], device=y.device) % 8 == 7).float() * has_step  # JPEG block borders
        inner = has_step - edge
        maps = torch.stack([  # per-pixel terms whose region sums give every statistic
            torch.ones_like(y), y, y * y, (y < 0.02).float(), (y > 0.98).float(), rg, rg * rg, yb, yb * yb,
            (top - bottom) / (top + 1e-3), noise, noise * flat, flat, grad, coarse,
            dx * edge, edge, dx * inner, inner, _filter3(y, ((0, 1, 0), (1, -4, 1), (0, 1, 0))).abs(),
        ])
        sums = torch.zeros(n, len(maps), device=x.device).index_add_(0, labels.flatten().long(), maps.flatten(1).T)
        count, sy, syy, dark, bright, srg, srgrg, syb, sybyb, sat, sn, snf, sf, sg, sc, sde, se, sdi, si, slap = sums.T
        mean = lambda v, c=count: v / c.clamp_min(1)  # noqa: E731
        luma, contrast = mean(sy), (mean(syy) - mean(sy) ** 2).clamp_min(0).sqrt()
        colourful = ((mean(srgrg) - mean(srg) ** 2).clamp_min(0) + (mean(sybyb) - mean(syb) ** 2).clamp_min(0)).sqrt() + 0.3 * torch.hypot(mean(srg), mean(syb))
        sigma = mean(snf, sf)  # noise where the image is flat; texture would pass for noise elsewhere
        blockiness = mean(sde, se) / mean(sdi, si).clamp_min(1e-6)
        detail = mean(slap) / (contrast + 0.01)
        gradient = mean(sg)
        stats = torch.stack([
            luma, contrast, mean(dark), mean(bright), colourful, mean(sat), (mean(sn) + 1e-4).log(), (sigma + 1e-4).log(),
            (gradient + 1e-4).log(), gradient / mean(sc).clamp_min(1e-4), blockiness.clamp_min(1e-3).log(), (detail + 1e-4).log(),
            (gradient / (contrast + 0.01) + 1e-4).log(),
        ], 1)
        ratings = torch.stack([
            1 - torch.exp(-colourful / 0.12),  # colour: vivid is good
            torch.exp(-255 * sigma / 3),  # noise: sigma in 8-bit levels
            torch.exp(-(blockiness - 1).clamp_min(0)),  # artifact: 8x8 grid edges stronger than the rest
            1 - torch.exp(-detail / 0.15),  # blur: fine detail relative to contrast
            (1 - (2 * luma - 1) ** 2) * (1 - mean(dark) - mean(bright)),  # exposure: mid-grey, unclipped
        ], 1).clamp(0, 1)
        overall = ratings.clamp_min(1e-6).log().mean(1, keepdim=True).exp()  # geometric mean
        return torch.cat([stats, ratings, overall], 1).float(), torch.full((n,), -1, dtype=torch.long, device=x.device)


# ---- the CPU side -----------------------------------------------------------------------------------


def working_image(image: np.ndarray, max_side: int, min_side: int) -> np.ndarray:
    """Resize so the long side is <= max_side and the short side >= min_side (crops fit)."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = max(min(1.0, max_side / max(h, w)), min_side / min(h, w))
    if scale == 1.0:
        return image
    size = (max(min_side, round(w * scale)), max(min_side, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BOX if scale < 1 else Image.BICUBIC))


def grid_origins(hw: tuple[int, int], crop: int, grid: int) -> np.ndarray:
    """(grid*grid, 2) top-left corners (y, x) of evenly spaced crops spanning the image."""
    ys, xs = (np.linspace(0, n - crop, grid).round().astype(np.int64) for n in hw)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


@dataclass
class Preparer:
    """Item -> Sample on a CPU worker: decode, working image, crop origins, cached regions."""

    crop_size: int
    test_grid: int
    max_side: int
    sam_size: int
    cache_root: str
    salt: str
    rules: RegionRules | None = None  # set: partition misses here with SLIC instead of SAM
    train: bool = False

    def __call__(self, item: Item) -> Sample:
        from qscore.media.image import load_image

        image, facts = load_image(item.path, max_side=self.max_side)
        work = working_image(image, self.max_side, self.crop_size)
        h, w = work.shape[:2]
        cache = ArrayCache(self.cache_root, self.salt)
        key = cache.key(work)
        inputs: dict[str, Tensor] = {
            "image": torch.tensor(work).permute(2, 0, 1),
            "key": torch.frombuffer(bytearray(bytes.fromhex(key)), dtype=torch.uint8),
        }
        if self.train:  # a fresh random crop and flip each epoch (workers are seeded per epoch)
            y, x, flip = (int(torch.randint(0, n, ())) for n in (h - self.crop_size + 1, w - self.crop_size + 1, 2))
            inputs["origins"], inputs["flip"] = torch.tensor([[y, x]]), torch.tensor([bool(flip)])
        else:
            origins = torch.from_numpy(grid_origins((h, w), self.crop_size, self.test_grid))
            inputs["origins"], inputs["flip"] = origins, torch.zeros(len(origins), dtype=torch.bool)
        cached = cache.load(key)
        if cached is not None:
            inputs.update({k: torch.from_numpy(v) for k, v in cached.items()})
        elif self.rules is not None:
            inputs["partition"] = torch.from_numpy(slic_label_map(work, self.rules).astype(np.uint8))
        else:
            sam = sam_input(work, self.sam_size)
            inputs["sam_image"] = torch.tensor(sam).permute(2, 0, 1)
        return Sample(item, inputs, facts, {"size": (facts["height"], facts["width"]), "preview": work})


# ---- the model ---------------------------------------------------------------------------------------


class RSFIQA(Model):
    spec = ModelSpec(
        name="rsfiqa",
        task="image",
        summary="Region-aware semantic attention IQA: SAM (or SLIC) regions, CLIP or measured region ratings, any backbone",
        paper="arXiv:2508.07818",
        licence="Apache-2.0 (SAM weights); MIT (CLIP ViT-B/16 openai); heads: trained by qscore",
        score_range="[0, 1], higher is better (normalised MOS of the training data)",
        columns={
            "regions": pa.string(),  # the partition: sam-vit-b | sam-tiny | ... | slic
            "n_regions": pa.int32(),
            "top_region_weight": pa.float32(),
            **{f"rating_{d}": pa.float32() for d in DIMENSIONS},
            "largest_region": pa.string(),
        },
        artefacts=("heatmap",),
    )
    Config = Config

    def __init__(self, config: Config):
        config = self.settle(config, None)  # built without a registry: auto is SAM only for the tiny test SAM
        super().__init__(config)
        c = config
        if c.test_grid * c.crop_size < c.max_side:
            raise ValueError(f"test_grid x crop_size ({c.test_grid} x {c.crop_size}) must cover max_side {c.max_side}")
        from qscore.models.clip_common import build_clip

        self.rules = RegionRules(
            c.points_per_side, c.pred_iou_thresh, c.stability_score_thresh, 1.0, c.box_nms_thresh, c.min_region_frac, c.r_max
        )
        if c.regions not in ("sam", "slic"):
            raise ValueError(f"regions must be sam, slic or auto, got {c.regions!r}")
        self.regions = SamRegions(build_sam(c.sam), self.rules, c.sam_points_per_batch) if c.regions == "sam" else None
        if c.describer == "measured":
            self.describer = MeasuredDescriber()
        elif c.describer in ("clip", "mllm"):
            clip_parts = build_clip(tiny=True) if c.clip_arch == "tiny" else build_clip(c.clip_arch)
            self.describer = ClipDescriber(*clip_parts) if c.describer == "clip" else MllmDescriber(*clip_parts, name=c.mllm)
        else:
            raise ValueError(f"unknown describer {c.describer!r}: clip, mllm or measured")
        self.backbone = Backbone(c.backbone, c.crop_size)
        self.rsa = RSA(self.backbone.channels, self.describer.dim, c.dim, c.region_layers, c.heads)

    @classmethod
    def settle(cls, config: Config, registry: Any) -> Config:
        """``regions=auto``: SAM when its checkpoint is in the cache (the tiny test SAM needs
        none), else SLIC; a random SAM gives almost no masks, so it is never the fallback."""
        if config.regions != "auto":
            return config
        key = SAM_KEYS.get(config.sam)
        installed = key is None or registry is not None and key in registry.keys() and registry.cache_path(key).is_file()
        return dataclasses.replace(config, regions="sam" if installed else "slic")

    @property
    def partition(self) -> str:
        """The ``regions`` column: which partition made the label maps."""
        return f"sam-{self.config.sam.replace('_', '-')}" if self.regions is not None else "slic"

    # ---- CPU side ---------------------------------------------------------------------------------
    def cache(self) -> ArrayCache:
        """The region cache (the preparer reads it, the runner fills it from ``precompute``). Its salt holds everything that changes a label map or a description
        besides the working image's pixels (which the key hashes): rules, names, weights."""
        c = self.config
        frozen = {"sam": fingerprint(self.regions.sam) if self.regions is not None else "slic", "describer": fingerprint(self.describer)}
        names = {k: getattr(c, k) for k in ("sam", "describer", "clip_arch", "mllm")}
        salt = json.dumps([dataclasses.asdict(self.rules), names, frozen, PAIRS, CONTENT], sort_keys=True)
        return ArrayCache(c.cache_dir or default_cache_dir(), salt)

    def preparer(self, train: bool = False) -> Preparer:
        c, cache = self.config, self.cache()
        sam_size = self.regions.img_size if self.regions is not None else 0
        slic_rules = self.rules if self.regions is None else None
        return Preparer(c.crop_size, c.test_grid, c.max_side, sam_size, str(cache.root), cache.salt, slic_rules, train)

    def collate(self, samples: Sequence[Sample]) -> dict[str, Tensor]:
        """Pad images and label maps to the batch's largest; region tensors to r_max; SAM inputs
        only for cache misses (``sam_image`` (M, 3, S, S) in batch order of the misses); a SLIC
        miss brings its label map (``partition``) into ``labels`` already."""
        r = self.config.r_max
        size = self.regions.img_size if self.regions is not None else 0
        hw = torch.tensor([s.inputs["image"].shape[1:] for s in samples])
        hmax, wmax = hw.max(0).values.tolist()
        batch = {
            "image": torch.zeros(len(samples), 3, hmax, wmax, dtype=torch.uint8),
            "labels": torch.zeros(len(samples), hmax, wmax, dtype=torch.uint8),
            "regions": torch.zeros(len(samples), r, self.describer.dim),
            "content": torch.zeros(len(samples), r, dtype=torch.long),
            "n_regions": torch.zeros(len(samples), dtype=torch.long),
            "hw": hw,
            "key": torch.stack([s.inputs["key"] for s in samples]),
            "origins": torch.stack([s.inputs["origins"] for s in samples]),
            "flip": torch.stack([s.inputs["flip"] for s in samples]),
            "cached": torch.tensor(["labels" in s.inputs for s in samples]),
            "sam_image": torch.zeros(0, 3, size, size, dtype=torch.uint8),
            "sam_hw": torch.zeros(0, 2, dtype=torch.long),
        }
        sam_images = []
        for b, s in enumerate(samples):
            h, w = hw[b].tolist()
            batch["image"][b, :, :h, :w] = s.inputs["image"]
            if "labels" in s.inputs:
                n = len(s.inputs["regions"])
                batch["labels"][b, :h, :w] = s.inputs["labels"]
                batch["regions"][b, :n] = s.inputs["regions"]
                batch["content"][b, :n] = s.inputs["content"]
                batch["n_regions"][b] = n
            elif "partition" in s.inputs:
                batch["labels"][b, :h, :w] = s.inputs["partition"]
            else:
                sam_images.append(s.inputs["sam_image"])
        if sam_images:
            batch["sam_hw"] = torch.tensor([x.shape[1:] for x in sam_images])
            batch["sam_image"] = torch.zeros(len(sam_images), 3, size, size, dtype=torch.uint8)
            for m, x in enumerate(sam_images):
                batch["sam_image"][m, :, : x.shape[1], : x.shape[2]] = x
        return batch

    # ---- device side ------------------------------------------------------------------------------
    @torch.no_grad()
    def precompute(self, batch: dict[str, Tensor]) -> dict[str, dict[str, np.ndarray]]:
        """Segment and describe the images the cache did not have (SAM in fp32, as the stock
        generator runs it; SLIC label maps came from the preparer), fill them into ``batch``
        (marked cached) and return them by cache key, for the runner to keep."""
        miss = torch.nonzero(~batch["cached"]).flatten().tolist()
        if not miss:
            return {}
        if self.regions is None:
            label_maps = [batch["labels"][b, :h, :w].long() for b, (h, w) in zip(miss, batch["hw"][miss].tolist())]
        else:
            with torch.autocast(batch["image"].device.type, enabled=False):
                label_maps = self.regions(batch["sam_image"], batch["sam_hw"], batch["hw"][miss])
        fresh = dict(self.add_regions(batch, b, labels) for b, labels in zip(miss, label_maps))
        batch["cached"][miss] = True
        return fresh

    @torch.no_grad()
    def add_regions(self, batch: dict[str, Tensor], b: int, labels: Tensor) -> tuple[str, dict[str, np.ndarray]]:
        """Describe image ``b`` of the batch by its label map (H, W) in 0..R-1 and fill labels and
        descriptions into ``batch``; returns the cache entry (the preparer's key, the arrays)."""
        h, w = labels.shape
        n = int(labels.max()) + 1
        regions, content = self.describer(batch["image"][b, :, :h, :w], labels, n)
        batch["labels"][b, :h, :w] = labels.to(torch.uint8)
        batch["regions"][b, :n] = regions.to(batch["regions"].dtype)
        batch["content"][b, :n] = content
        batch["n_regions"][b] = n
        entry = {"labels": labels.to(torch.uint8), "regions": regions.float(), "content": content}
        return bytes(batch["key"][b].tolist()).hex(), {k: v.cpu().numpy() for k, v in entry.items()}

    def crops(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Image and label-map crops at the same origins: uint8 (B*N, 3, c, c), long (B*N, c, c)."""
        c = self.config.crop_size
        images, labels = [], []
        for b, (origins, flips) in enumerate(zip(batch["origins"].tolist(), batch["flip"].tolist())):
            for (y, x), flip in zip(origins, flips):
                image, label = batch["image"][b, :, y : y + c, x : x + c], batch["labels"][b, y : y + c, x : x + c]
                images.append(image.flip(-1) if flip else image)
                labels.append(label.flip(-1) if flip else label)
        return torch.stack(images), torch.stack(labels).long()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        self.precompute(batch)  # a no-op where the runner ran it first (and kept what it found)
        b, n = batch["origins"].shape[:2]
        r = self.config.r_max
        images, labels = self.crops(batch)
        feats = self.backbone(images)  # (B*N, C, h, w)
        area = F.adaptive_avg_pool2d(F.one_hot(labels, r).permute(0, 3, 1, 2).float(), feats.shape[-2:])
        valid = torch.arange(r, device=labels.device) < batch["n_regions"][:, None]  # (B, R)
        present = valid.repeat_interleave(n, 0) & (area.flatten(2).sum(-1) > 0)
        regions = batch["regions"].repeat_interleave(n, 0).to(feats.dtype)
        score, attention, weights = self.rsa(feats, area, regions, present)
        image_area = torch.stack(
            [torch.bincount(batch["labels"][i, :h, :w].flatten().long(), minlength=r)[:r] / (h * w) for i, (h, w) in enumerate(batch["hw"].tolist())]
        )
        return {
            "score": score.view(b, n).mean(1),
            "attention": attention.view(b, n, *attention.shape[1:]),
            "region_weights": weights.view(b, n, r).mean(1),
            "region_area": image_area,
            "ratings": batch["regions"][..., -len(DIMENSIONS) :],
            "content": batch["content"],
            "n_regions": batch["n_regions"],
        }

    def postprocess(self, outputs: dict[str, Tensor], samples: Sequence[Sample]) -> list[Output]:
        results = []
        for i, sample in enumerate(samples):
            n = int(outputs["n_regions"][i])
            area = outputs["region_area"][i, :n]
            ratings = (area[:, None] * outputs["ratings"][i, :n]).sum(0)
            columns = {
                "score": float(outputs["score"][i]),
                "regions": self.partition,
                "n_regions": n,
                "top_region_weight": float(outputs["region_weights"][i, :n].max()),
                **{f"rating_{d}": float(v) for d, v in zip(DIMENSIONS, ratings)},
                "largest_region": label_of(int(outputs["content"][i, int(area.argmax())])),
            }
            if self.maps:
                heat = self.heatmap(outputs["attention"][i], sample)
                results.append(Output(columns, {"heatmap": overlay_on(sample, heat)}, {"heatmap": heat}))
            else:
                results.append(Output(columns))
        return results

    def heatmap(self, attention: Tensor, sample: Sample) -> np.ndarray:
        """G of every crop, as attention per pixel, blended where crops overlap -> float (H, W)
        at the working size (uncovered pixels 0). Each crop weighs most at its centre and
        fades towards its edges (a tent window), so crop borders leave no seams."""
        c = self.config.crop_size
        h, w = sample.inputs["image"].shape[1:]
        ramp = 1 - torch.linspace(-1, 1, c).abs()
        window = torch.outer(ramp, ramp).clamp_min(1e-3)  # (c, c)
        total, weight = torch.zeros(h, w), torch.zeros(h, w)
        for g, (y, x), flip in zip(attention.float(), sample.inputs["origins"].tolist(), sample.inputs["flip"].tolist()):
            density = F.interpolate(g[None, None] / (c * c / g.numel()), size=(c, c), mode="bilinear", align_corners=False)[0, 0]
            total[y : y + c, x : x + c] += window * (density.flip(-1) if flip else density)
            weight[y : y + c, x : x + c] += window
        return (total / weight.clamp_min(1e-12)).numpy()

    # ---- weights and training -------------------------------------------------------------------
    def train(self, mode: bool = True) -> RSFIQA:
        """SAM and the describer stay in eval mode: their outputs are cached, so they must not
        depend on whether the model is training."""
        super().train(mode)
        if self.regions is not None:
            self.regions.eval()
        self.describer.eval()
        return self

    def load_backbone(self, registry: Any) -> None:
        """SAM and CLIP checkpoints from weights.toml (the parts ``qscore train`` never changes)."""
        import open_clip

        from qscore.weights import load_state

        uses_clip = isinstance(self.describer, ClipDescriber)
        lacking = [f"sam={self.config.sam}"] * (self.regions is not None and self.config.sam not in SAM_KEYS)
        lacking += [f"clip_arch={self.config.clip_arch}"] * (uses_clip and self.config.clip_arch != "ViT-B-16")
        if lacking:
            raise MissingWeights(f"no official weights for {', '.join(lacking)}; use --weights random")
        self.load_sam(registry)
        if uses_clip:
            open_clip.load_checkpoint(self.describer.clip, str(registry.path("clip-vit-b16-openai")), strict=True)
            self.describer.reset()

    def load_headless(self, registry: Any) -> tuple[str, str]:
        """SAM + CLIP and no ``rsfiqa-head`` (a ``qscore train rsfiqa`` checkpoint; the paper
        released none): the head stays random (rows say ``head = random``; ``qscore train
        --init official`` starts here, with the backbone's pretrained weights from
        ``backbone_weights`` when set)."""
        from qscore.weights import load_state

        self.load_backbone(registry)
        if self.config.backbone_weights:
            missing = self.backbone.body.load_state_dict(load_state(registry.path(self.config.backbone_weights)), strict=False)
            if missing.missing_keys:
                raise ValueError(f"{self.config.backbone_weights} does not fit {self.config.backbone}: missing {missing.missing_keys[:5]}")
        parts = [SAM_KEYS[self.config.sam]] * (self.regions is not None)
        parts += ["clip-vit-b16-openai"] * isinstance(self.describer, ClipDescriber)
        return "+".join(parts) or "slic+measured", "random"

    def load_sam(self, registry: Any) -> None:
        """SAM's official checkpoint, when the model partitions with a published SAM."""
        from qscore.weights import load_state

        if self.regions is not None and self.config.sam in SAM_KEYS:
            self.regions.sam.load_state_dict(load_state(registry.path(SAM_KEYS[self.config.sam])))

    def load_trained(self, state: dict[str, Tensor], card: dict, registry: Any) -> None:
        """A ``qscore train`` checkpoint; one trained on SLIC regions holds no SAM, so SAM's
        official weights are loaded when this model partitions with SAM (``regions=auto``)."""
        super().load_trained(state, card, registry)
        if card.get("backbone") != "official" and not any(k.startswith("regions.") for k in state):
            self.load_sam(registry)
        self.describer.reset()  # a random-init run's checkpoint carries its own CLIP

    def trainable_parameters(self) -> list[dict]:
        """Backbone (at ``backbone_lr_scale`` x lr) and RSA + head; SAM and the describer stay
        frozen (their outputs are cached)."""
        return [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr_scale": self.config.backbone_lr_scale},
            {"params": [p for p in self.rsa.parameters() if p.requires_grad]},
        ]

    def training_loss(self, batch: dict[str, Tensor], targets: Tensor) -> Tensor:
        """L1 on normalised MOS plus ``rank_weight`` x the pairwise rank loss."""
        from qscore.train.losses import l1_loss, rank_loss

        pred = self(batch)["score"].float()
        return l1_loss(pred, targets) + self.config.rank_weight * rank_loss(pred, targets.float())


def label_of(content: int) -> str | None:
    """A content index as its word; None where the describer gives no label (``measured``)."""
    return CONTENT[content] if content >= 0 else None


def overlay_on(sample: Sample, heat: np.ndarray) -> np.ndarray:
    """The heatmap over the image at its original size (from the kept working-size preview)."""
    from PIL import Image

    from qscore.artefacts import overlay

    h, w = sample.keep["size"]
    preview = sample.keep["preview"]
    if preview.shape[:2] != (h, w):
        preview = np.asarray(Image.fromarray(preview).resize((w, h), Image.BILINEAR))
    return overlay(preview, heat)
