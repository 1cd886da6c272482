"""Region partitions for RSFIQA: a non-overlapping label map per image, from SAM or, where
SAM's weights are not installed, from SLIC superpixels.

Two ways to SAM's label map:

- ``stock_label_map``: segment-anything's ``SamAutomaticMaskGenerator`` (one image at a time,
  RLE encoding and decoding of every mask on the CPU) painted mask by mask. The reference.
- ``SamRegions``: the same prompts and filters batched on the device: one encoder call for the
  whole batch, all point prompts of an image decoded in large chunks, masks kept on the device
  as booleans, torchvision NMS there, and the painting done as one max-reduction.

Both then apply the same label-map rules (``finalise``): sort masks by area, paint the largest
first so smaller parts win, move regions under ``min_region_frac`` of the image into the "rest
of image" region, keep at most ``r_max`` regions (the largest), and relabel 0..R-1 by area
(label 0 is the largest region). Only the full-image crop is used (SAM's default
``crop_n_layers=0``), so the stock crop-edge filter never removes anything and is not repeated.

``slic_label_map`` needs no weights: scikit-image's SLIC over-segments the image, neighbouring
superpixels of the closest mean colour are merged until the rules hold, and ``finalise`` orders
the labels the same way. A random SAM gives almost no masks, so this is what a model without
SAM's checkpoint partitions with.

The runner keeps label maps and region descriptions by image content hash (``qscore.cache``,
under ``default_cache_dir``), so a file is segmented and described once across runs and
training epochs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms


SAM_KEYS = {"vit_b": "sam-vit-b", "vit_l": "sam-vit-l", "vit_h": "sam-vit-h"}


@dataclass(frozen=True)
class RegionRules:
    """SAM's automatic-mask settings (its defaults) and the label-map rules."""

    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_region_frac: float = 0.005
    r_max: int = 16


def build_sam(variant: str):
    """A randomly initialised SAM: ``vit_b`` / ``vit_l`` / ``vit_h`` as published, or ``tiny``
    (64 px input, 2 blocks, 32 channels) for tests and smoke runs. The tiny one is drawn from a
    fixed seed (whatever the global RNG) with wide weights (std 3 / sqrt(fan-in)): default init gives near-constant masks
    that NMS collapses to one, wide weights give many distinct masks to partition with."""
    from segment_anything import sam_model_registry
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if variant in sam_model_registry and variant != "default":
        return sam_model_registry[variant]().eval()
    if variant != "tiny":
        raise ValueError(f"unknown SAM variant {variant!r}; choose tiny, {', '.join(SAM_KEYS)}")
    dim, size, patch = 32, 64, 16
    with torch.random.fork_rng(devices=[]):  # the same tiny SAM in every process
        torch.manual_seed(0)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=size, patch_size=patch, embed_dim=32, depth=2, num_heads=2, out_chans=dim,
                norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=2, global_attn_indexes=(1,),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim, image_embedding_size=(size // patch, size // patch), input_image_size=(size, size),
                mask_in_chans=4,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3, transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32,
            ),
        )
        with torch.no_grad():
            for weight in (p for p in sam.parameters() if p.dim() > 1):
                weight.copy_(torch.randn(weight.shape) * 3 / weight[0].numel() ** 0.5)
    return sam.eval()


def sam_input(image: np.ndarray, img_size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3) with long side ``img_size``, resized exactly as SAM's
    predictor does (PIL), so both paths see the same pixels. Runs in the CPU workers."""
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide(img_size).apply_image(image)


def point_prompts(hw: tuple[int, int], points_per_side: int, img_size: int) -> torch.Tensor:
    """SAM's grid of point prompts for an (H, W) image, in the encoder's input frame: float64
    (N, 2) as the stock generator builds them (same arithmetic, same dtype)."""
    from segment_anything.utils.amg import build_point_grid
    from segment_anything.utils.transforms import ResizeLongestSide

    points = build_point_grid(points_per_side) * np.array(hw)[None, ::-1]
    return torch.as_tensor(ResizeLongestSide(img_size).apply_coords(points, hw))


# ---- label-map rules ---------------------------------------------------------------------------


def paint_reference(masks: list[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
    """Paint masks largest first, one at a time (the obvious reference). Returns int64 (H, W):
    0 where no mask, else 1 + the mask's rank by area (ties keep the given order)."""
    painted = np.zeros(hw, dtype=np.int64)
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    for rank, i in enumerate(order):
        painted[masks[i]] = rank + 1
    return painted


def paint(masks: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The same painting as one reduction: at each pixel the covering mask of highest area rank
    (the smallest) wins. masks: bool (N, H, W) -> int64 (H, W), 0 where no mask."""
    areas = masks.flatten(1).sum(1)
    order = torch.sort(areas, descending=True, stable=True).indices
    painted = torch.zeros(masks.shape[1:], dtype=torch.int32, device=masks.device)
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        ranks = torch.arange(start + 1, start + 1 + len(idx), device=masks.device, dtype=torch.int32)
        painted = torch.maximum(painted, (masks[idx] * ranks[:, None, None]).amax(0))
    return painted.long()


def finalise(painted: torch.Tensor, rules: RegionRules) -> torch.Tensor:
    """Painted ranks (H, W) -> label map int64 (H, W) with labels 0..R-1, R <= r_max, every label
    present, ordered by area (0 = largest). Unpainted pixels, regions under ``min_region_frac``
    and regions beyond the cap form one "rest of image" region."""
    total = painted.numel()
    areas = torch.bincount(painted.flatten(), minlength=1)
    masks_area = areas[1:]
    candidates = torch.nonzero(masks_area >= max(rules.min_region_frac * total, 1)).flatten()
    candidates = candidates[torch.sort(masks_area[candidates], descending=True, stable=True).indices]
    has_rest = bool(masks_area[candidates].sum() < total) or len(candidates) > rules.r_max
    kept = candidates[: rules.r_max - int(has_rest)]
    kept_area = masks_area[kept]
    region_area = torch.cat([(total - kept_area.sum()).reshape(1), kept_area]) if has_rest else kept_area
    rank = torch.empty_like(region_area)
    rank[torch.sort(region_area, descending=True, stable=True).indices] = torch.arange(len(region_area), device=rank.device)
    lut = torch.full((len(areas),), int(rank[0]) if has_rest else -1, dtype=torch.long, device=painted.device)
    lut[kept + 1] = rank[int(has_rest) :]
    return lut[painted]


def slic_label_map(image: np.ndarray, rules: RegionRules, superpixels_per_region: int = 4, side: int = 256) -> np.ndarray:
    """Label map of one uint8 (H, W, 3) image without SAM: int64 (H, W), labels 0..R-1 by area.

    SLIC (k-means in Lab + position) gives about ``superpixels_per_region x r_max`` compact,
    connected superpixels of the image shrunk to a long side of at most ``side`` (the regions are
    pooled onto a coarse feature grid, so finer borders change nothing); then the smallest
    region is merged into the neighbour whose mean Lab colour is closest, until at most
    ``r_max`` regions remain and none is under ``min_region_frac``. Deterministic (SLIC's seeds
    are a grid); about 0.1 s per image on one core."""
    from PIL import Image
    from skimage.color import rgb2lab
    from skimage.segmentation import slic

    h, w = image.shape[:2]
    scale = min(1.0, side / max(h, w))
    small = image if scale == 1.0 else np.asarray(
        Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BOX))
    lab = rgb2lab(small)
    segments = slic(small, n_segments=superpixels_per_region * rules.r_max, compactness=10.0, start_label=0,
                    enforce_connectivity=True, channel_axis=-1)  # converts to Lab itself (scaled as it expects)
    n = int(segments.max()) + 1
    flat = segments.ravel()
    area = np.bincount(flat, minlength=n).astype(np.float64)
    colour_sum = np.stack([np.bincount(flat, lab[..., c].ravel(), minlength=n) for c in range(3)], 1)
    a = np.concatenate([segments[:, :-1].ravel(), segments[:-1].ravel()])  # adjacent pixel pairs
    b = np.concatenate([segments[:, 1:].ravel(), segments[1:].ravel()])
    codes = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    neighbours = [set() for _ in range(n)]
    for lo, hi in zip(*divmod(codes[codes // n != codes % n], n)):
        neighbours[lo].add(int(hi))
        neighbours[hi].add(int(lo))
    owner = np.arange(n)
    alive = set(range(n))
    min_area = rules.min_region_frac * flat.size
    while len(alive) > 1:
        smallest = min(alive, key=lambda r: (area[r], r))
        if len(alive) <= rules.r_max and area[smallest] >= min_area:
            break
        mean = colour_sum[smallest] / area[smallest]
        into = min(neighbours[smallest], key=lambda r: (float(((colour_sum[r] / area[r] - mean) ** 2).sum()), r))
        area[into] += area[smallest]
        colour_sum[into] += colour_sum[smallest]
        for r in neighbours[smallest] - {into}:
            neighbours[r].discard(smallest)
            neighbours[r].add(into)
            neighbours[into].add(r)
        neighbours[into].discard(smallest)
        owner[owner == smallest] = into
        alive.discard(smallest)
    merged = np.unique(owner, return_inverse=True)[1][segments]
    if scale != 1.0:
        merged = np.asarray(Image.fromarray(merged.astype(np.uint8)).resize((w, h), Image.NEAREST))
    return finalise(torch.from_numpy(merged.astype(np.int64) + 1), rules).numpy()


# ---- the stock reference ----------------------------------------------------------------------


def stock_label_map(sam, image: np.ndarray, rules: RegionRules, points_per_batch: int = 64) -> np.ndarray:
    """Label map of one uint8 (H, W, 3) image with segment-anything's own generator: int64 (H, W)."""
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(
        sam,
        points_per_side=rules.points_per_side,
        points_per_batch=points_per_batch,
        pred_iou_thresh=rules.pred_iou_thresh,
        stability_score_thresh=rules.stability_score_thresh,
        stability_score_offset=rules.stability_score_offset,
        box_nms_thresh=rules.box_nms_thresh,
    )
    masks = [record["segmentation"] for record in generator.generate(image)]
    painted = paint_reference(masks, image.shape[:2])
    return finalise(torch.from_numpy(painted), rules).numpy()


# ---- the batched device path --------------------------------------------------------------------


class SamRegions(nn.Module):
    """SAM's automatic masks for a batch of images, on the device, to label maps."""

    def __init__(self, sam, rules: RegionRules, points_per_batch: int = 256):
        super().__init__()
        self.sam = sam.eval().requires_grad_(False)
        self.rules = rules
        self.points_per_batch = points_per_batch

    @property
    def img_size(self) -> int:
        return self.sam.image_encoder.img_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor, input_hw: torch.Tensor, out_hw: torch.Tensor) -> list[torch.Tensor]:
        """images: uint8 (B, 3, S, S), each the ``sam_input`` of an image padded at the bottom
        right; input_hw: (B, 2) its valid size; out_hw: (B, 2) the size of the label map wanted
        (the image's). Returns B label maps int64 (H_b, W_b)."""
        inputs = [
            self.sam.preprocess(images[b : b + 1, :, : int(h), : int(w)].float())
            for b, (h, w) in enumerate(input_hw.tolist())
        ]
        embeddings = self.sam.image_encoder(torch.cat(inputs).to(self.sam.pixel_mean.dtype))
        return [
            self._label_map(embeddings[b : b + 1], tuple(input_hw[b].tolist()), tuple(out_hw[b].tolist()))
            for b in range(len(images))
        ]

    def _label_map(self, embedding: torch.Tensor, input_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
        masks, boxes, scores = [], [], []
        points = point_prompts(hw, self.rules.points_per_side, self.img_size).to(embedding.device)
        for chunk in points.split(self.points_per_batch):
            m, b, s = self._decode(embedding, chunk, input_hw, hw)
            masks.append(m)
            boxes.append(b)
            scores.append(s)
        masks, boxes, scores = torch.cat(masks), torch.cat(boxes), torch.cat(scores)
        keep = batched_nms(boxes.float(), scores, torch.zeros_like(scores), self.rules.box_nms_thresh)
        return finalise(paint(masks[keep]), self.rules)

    def _decode(self, embedding, points, input_hw, hw):
        """Masks of one chunk of point prompts, filtered as the stock generator filters them:
        bool (K, H, W), boxes (K, 4), predicted IoU (K,)."""
        from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score

        sam, rules = self.sam, self.rules
        labels = torch.ones(len(points), 1, dtype=torch.int, device=points.device)
        sparse, dense = sam.prompt_encoder(points=(points[:, None], labels), boxes=None, masks=None)
        low_res, iou = sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)
        keep = iou > rules.pred_iou_thresh if rules.pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
        logits = sam.postprocess_masks(low_res[keep][:, None], input_hw, hw)[:, 0]
        stability = calculate_stability_score(logits, sam.mask_threshold, rules.stability_score_offset)
        stable = stability >= rules.stability_score_thresh if rules.stability_score_thresh > 0 else slice(None)
        masks = logits[stable] > sam.mask_threshold
        return masks, batched_mask_to_box(masks), iou[keep][stable]


# ---- where the regions are kept -----------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$QSCORE_HOME/cache/rsfiqa`` (``$QSCORE_HOME`` defaults to ``$XDG_CACHE_HOME/qscore``)."""
    from qscore.weights import cache_home

    return cache_home() / "cache" / "rsfiqa"


def fingerprint(module: nn.Module) -> str:
    """A cheap hash of a module's weights (shapes, sums and a strided sample of each tensor),
    enough to tell weight sets apart in cache keys without hashing gigabytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().flatten().float()
        sample = flat[:: max(1, len(flat) // 64)].cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}{float(flat.double().sum()):.6e}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]
