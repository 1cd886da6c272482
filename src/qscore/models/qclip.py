"""Q-CLIP (arXiv 2508.06092): video quality from a frozen Perception Encoder and a shared adapter.

The frozen open_clip ``PE-Core-L-14-336`` (timm ``Eva`` vision trunk, open_clip text tower, both
1024 wide) scores 8 squash-resized frames against five quality-level prompts
("X X X a video of {bad ... excellent} quality"). Everything trainable lives in ``QualityHead``:

- the Shared Cross-Modal Adapter (SCMA): one core MLP shared by every adapted layer of both
  towers, plus per layer i a down/up projection and a LayerNorm used by vision block i *and*
  text block i: ``x = x + a_m * LN_i(up_i(core(down_i(x))))`` on every token, after each of the
  last ``adapted_blocks`` blocks;
- a projection adapter shared by both towers: ``emb = proj(pooled) + b_m * P(pooled)``;
- 3 CoOp context vectors in place of "X X X", shared by the 5 prompts;
- the learned 5 -> 1 map (no bias) from the 5 cosine similarities to the score.

The adapters are forward hooks on the real timm / open_clip blocks, so the backbone keeps its
own module tree and parameter names (official checkpoints load unchanged). The prompt features
do not depend on the video: they are computed once and reused until a trainable parameter
changes. With official PE weights but no trained head the model runs zero-shot (adapters off,
score = softmax(100 cos) . (1..5)).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qscore.media.sampling import channels_first, check_sampler, decode_slack, normalize, select_frames
from qscore.media.video import open_video
from qscore.models.base import Model, ModelSpec
from qscore.types import Item, MissingWeights, Output, Sample

LEVELS = ("bad", "poor", "fair", "good", "excellent")
PROMPT = "a video of {} quality"  # after one "X" per context vector, whose embeddings are replaced
PE_MEAN = PE_STD = (0.5, 0.5, 0.5)
ZERO_SHOT_SCALE = 100.0  # softmax temperature of the zero-shot fallback
PE_L14 = "PE-Core-L-14-336"
OFFICIAL_BACKBONES = {PE_L14: "pe-core-l14-336"}  # open_clip arch -> weights.toml key
HEAD_KEY = "qclip-head"  # slot for a trained head (no official one is published)

# A PE-shaped CLIP small enough for CPU tests: a timm Eva trunk (RoPE, attention pooling, the
# same module tree as PE-Core) 64 wide, and a 64-wide open_clip text tower with PE's tokenizer.
LOCAL_ARCHS: dict[str, dict[str, Any]] = {
    "qscore-pe-micro": {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": 64,
            "timm_model_name": "qscore_pe_core_micro_patch8_64",
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": None,
        },
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
    }
}


def _register_micro_trunk() -> None:
    """Register the micro PE trunk with timm: PE-Core-T's definition at 64 px, 4 blocks, width 64
    (open_clip builds timm trunks by name only)."""
    from timm.models import is_model, register_model
    from timm.models.eva import vit_pe_core_tiny_patch16_384

    if is_model("qscore_pe_core_micro_patch8_64"):
        return

    def qscore_pe_core_micro_patch8_64(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        micro = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2, ref_feat_shape=(8, 8),
                     attn_pool_num_heads=4)
        return vit_pe_core_tiny_patch16_384(pretrained=False, **{**micro, **kwargs})

    qscore_pe_core_micro_patch8_64.__module__ = __name__
    register_model(qscore_pe_core_micro_patch8_64)


@contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """open_clip warns "initialized randomly" on the root logger; qscore loads the weights right
    after (or the row says ``random``), so the warning would only mislead."""
    drop = lambda record: not record.getMessage().startswith("No pretrained weights loaded")  # noqa: E731
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def create_backbone(arch: str) -> tuple[nn.Module, Any]:
    """(open_clip CustomTextCLIP, tokenizer) with random weights, frozen, in eval mode. ``arch``:
    an open_clip PE model name or a ``LOCAL_ARCHS`` key (built as PE-Core-L with its configs
    replaced). Built on the current default device, so ``torch.device("meta")`` works."""
    import open_clip

    _register_micro_trunk()
    base, overrides = (PE_L14, LOCAL_ARCHS[arch]) if arch in LOCAL_ARCHS else (arch, {})
    with _without_random_init_warning():
        clip = open_clip.create_model(base, pretrained=None, device=torch.get_default_device(), **overrides)
    return clip.eval().requires_grad_(False), open_clip.get_tokenizer(base)


@dataclass
class QCLIPConfig:
    backbone: str = PE_L14  # open_clip model name (PE-Core family) or a LOCAL_ARCHS key
    frames: int = 8  # frames per video
    sampler: str = "uniform"  # uniform (released code) | framediff (largest change per segment) | pairs (consecutive pairs)
    frame_slack: int = 1  # a frame may move this far to a reference frame (B-frames not decoded); 0: exact
    adapted_blocks: int = 6  # SCMA after each of the last N blocks of both towers
    bottleneck: int = 128  # SCMA / projection adapter hidden width
    context: int = 3  # learnable context vectors in front of every prompt
    init_scale: float = 0.1  # initial a_v, a_t, b_v, b_t


class SharedAdapter(nn.Module):
    """SCMA: ``core`` (r -> r -> r, GELU) shared by all layers and both towers; per adapted layer
    a down (w -> r), up (r -> w) projection and LayerNorm(w). (..., w) -> (..., w) residual."""

    def __init__(self, width: int, bottleneck: int, layers: int):
        super().__init__()
        self.core = nn.Sequential(nn.Linear(bottleneck, bottleneck), nn.GELU(), nn.Linear(bottleneck, bottleneck))
        self.down = nn.ModuleList(nn.Linear(width, bottleneck) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(bottleneck, width) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))

    def forward(self, x: Tensor, layer: int, scale: Tensor) -> Tensor:
        return x + scale * self.norm[layer](self.up[layer](self.core(self.down[layer](x))))


class QualityHead(nn.Module):
    """Every trainable tensor of Q-CLIP (the backbone is frozen): SCMA, the shared projection
    adapter P (w -> r -> r, GELU, -> d), the tower scales, the prompt context and the score map."""

    def __init__(self, width: int, embed_dim: int, cfg: QCLIPConfig):
        super().__init__()
        r = cfg.bottleneck
        self.scma = SharedAdapter(width, r, cfg.adapted_blocks)
        self.proj_adapter = nn.Sequential(nn.Linear(width, r), nn.Linear(r, r), nn.GELU(), nn.Linear(r, embed_dim))
        self.a_v, self.a_t, self.b_v, self.b_t = (nn.Parameter(torch.tensor(cfg.init_scale)) for _ in range(4))
        self.context = nn.Parameter(torch.zeros(cfg.context, width))  # set from "x x x" by the owner
        self.score_map = nn.Linear(len(LEVELS), 1, bias=False)


@dataclass
class QCLIPPrepare:
    """Item -> ``frames`` frames squash-resized to the backbone input by the decoder itself (cheaper
    than decoding 720p and resizing): uint8 (T, 3, S, S); normalisation runs on the device (4x
    less to copy than floats)."""

    frames: int
    size: int
    sampler: str
    slack: int

    def __call__(self, item: Item) -> Sample:
        with open_video(item.path) as reader:
            indices = select_frames(reader, self.frames, self.sampler, self.slack)
            # (T, S, S, 3), squashed while decoding; `used` may differ from `indices` by <= slack
            frames, used = reader.frames_near(indices, size=(self.size, self.size), near=self.slack)
            facts = reader.facts()
        facts["frames_used"] = used
        x = channels_first(frames).contiguous()
        return Sample(item, {"frames": x}, facts)


class QCLIP(Model):
    spec = ModelSpec(
        name="qclip",
        task="video",
        summary="Q-CLIP: frozen PE-Core-L/14-336 + shared cross-modal adapter, 5 quality-level prompts",
        paper="arXiv 2508.06092",
        licence="Apache-2.0 (PE-Core weights); qscore-trained heads inherit their data's terms",
        score_range="trained head: unbounded, scale of its training run (PLCC loss); zero-shot: [1, 5]; --weights random: any value",
        columns={f"sim_{level}": pa.float32() for level in LEVELS},
    )
    Config = QCLIPConfig

    def __init__(self, config: QCLIPConfig):
        super().__init__(config)
        check_sampler(config.sampler, config.frames)
        self.clip, tokenizer = create_backbone(config.backbone)
        trunk, text = self.clip.visual.trunk, self.clip.text
        width = trunk.embed_dim
        if text.width != width or not 0 < config.adapted_blocks <= min(len(trunk.blocks), len(text.transformer.resblocks)):
            raise ValueError(f"{config.backbone}: SCMA needs equal tower widths and adapted_blocks <= depth")
        self.size = trunk.patch_embed.img_size[0]
        self.head = QualityHead(width, text.output_dim, config)
        self.zero_shot = False

        prefix = " ".join(["X"] * config.context)
        prompts = tokenizer([f"{prefix} {PROMPT.format(level)}" for level in LEVELS])  # (5, L): SOT X X X ...
        self.register_buffer("prompt_ids", prompts, persistent=False)
        self.reset_context()
        self._prompt_cache: tuple[tuple, Tensor] | None = None
        self._hook_towers()

    # ---- hooks on the frozen towers -------------------------------------------------------------
    def _hook_towers(self) -> None:
        """SCMA after the last ``adapted_blocks`` blocks of each tower (layer i of both towers
        shares adapter i), P on the vision projection, the context on the text embeddings."""
        trunk, text = self.clip.visual.trunk, self.clip.text
        n = self.config.adapted_blocks
        for blocks, scale in ((trunk.blocks, "a_v"), (text.transformer.resblocks, "a_t")):
            for i, block in enumerate(list(blocks)[-n:]):
                block.register_forward_hook(self._adapter_hook(i, scale))
        trunk.head.register_forward_hook(self._vision_projection_hook)
        text.token_embedding.register_forward_hook(self._context_hook)
        text.output_tokens = True  # the text tower also returns its final tokens (for b_t P(pooled))

    def _adapter_hook(self, layer: int, scale: str):
        def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor | None:
            return None if self.zero_shot else self.head.scma(out, layer, getattr(self.head, scale))

        return hook

    def _vision_projection_hook(self, module: nn.Module, args: tuple[Tensor], out: Tensor) -> Tensor | None:
        """trunk.head: attention-pooled (N, w) -> projected (N, d); add b_v P(pooled)."""
        return None if self.zero_shot else out + self.head.b_v * self.head.proj_adapter(args[0])

    def _context_hook(self, module: nn.Module, args: tuple[Tensor], out: Tensor) -> Tensor:
        """token_embedding (5, L, w): the learnable context replaces the "X X X" embeddings."""
        n = self.config.context
        ctx = self.head.context.to(out.dtype).expand(out.shape[0], -1, -1)
        return torch.cat([out[:, :1], ctx, out[:, 1 + n :]], dim=1)

    def reset_context(self) -> None:
        """Context vectors <- the token embeddings of "x x x" (CoOp initialisation)."""
        x_ids = self.prompt_ids[0, 1 : 1 + self.config.context]
        with torch.no_grad():
            self.head.context.copy_(self.clip.text.token_embedding.weight[x_ids])

    # ---- text side ---------------------------------------------------------------------------------
    def encode_prompts(self) -> Tensor:
        """The 5 level prompts through the adapted text tower -> (5, d) L2-normalised, fp32."""
        from open_clip.transformer import text_global_pool

        text = self.clip.text
        projected, tokens = text(self.prompt_ids)  # (5, d), (5, L, w) after ln_final
        pooled = text_global_pool(tokens, self.prompt_ids, text.pool_type)  # (5, w): the EOT token
        if not self.zero_shot:
            projected = projected + self.head.b_t * self.head.proj_adapter(pooled)
        return F.normalize(projected.float(), dim=-1)

    def prompt_features(self) -> Tensor:
        """(5, d) prompt features, in fp32 (autocast off: 5 short prompts cost nothing). Training
        with gradients: fresh every step. Otherwise cached, keyed by the versions of the trainable
        tensors (an optimiser step or a load bumps them): inference encodes them once per run."""
        device = self.prompt_ids.device
        fp32 = torch.autocast(device.type, enabled=False)
        if self.training and torch.is_grad_enabled():
            with fp32:
                return self.encode_prompts()
        key = (self.zero_shot, device, *(p._version for p in self.head.parameters()))
        if self._prompt_cache is None or self._prompt_cache[0] != key:
            # a normal tensor even under inference_mode, so a later grad-enabled eval can use it
            with fp32, torch.inference_mode(False), torch.no_grad():
                self._prompt_cache = (key, self.encode_prompts())
        return self._prompt_cache[1]

    # ---- the four steps ----------------------------------------------------------------------------
    def preparer(self, train: bool = False) -> QCLIPPrepare:
        return QCLIPPrepare(self.config.frames, self.size, self.config.sampler, decode_slack(self.config.sampler, self.config.frame_slack))  # no augmentation (released code)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """frames: uint8 (B, T, 3, S, S) -> score (B,), sims (B, 5) cosine per quality level."""
        frames = batch["frames"]
        b, t = frames.shape[:2]
        x = normalize(frames.flatten(0, 1).float() / 255.0, PE_MEAN, PE_STD)  # (B T, 3, S, S)
        video = F.normalize(self.clip.visual(x).float().view(b, t, -1).mean(1), dim=-1)  # (B, d)
        sims = video @ self.prompt_features().T  # (B, 5)
        if self.zero_shot:
            levels = torch.arange(1, len(LEVELS) + 1, device=sims.device, dtype=sims.dtype)
            score = (ZERO_SHOT_SCALE * sims).softmax(-1) @ levels
        else:
            score = self.head.score_map(sims).squeeze(-1)
        return {"score": score, "sims": sims}

    def postprocess(self, outputs: dict[str, Tensor], samples: list[Sample]) -> list[Output]:
        rows = []
        for i in range(len(samples)):
            sims = {f"sim_{level}": float(outputs["sims"][i, k]) for k, level in enumerate(LEVELS)}
            rows.append(Output({"score": float(outputs["score"][i]), **sims}))
        return rows

    def train(self, mode: bool = True) -> QCLIP:
        """The frozen towers never switch to training behaviour; training a head ends the
        zero-shot fallback (``qscore train`` starts from the official backbone's zero-shot)."""
        super().train(mode)
        self.clip.eval()
        self.zero_shot = self.zero_shot and not mode
        return self

    # ---- weights -----------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def load_backbone(self, registry: Any) -> None:
        """Official PE weights into the frozen towers (open_clip's loader and key conversion);
        the context restarts from the loaded "x x x" embeddings."""
        import open_clip

        open_clip.load_checkpoint(self.clip, str(registry.path(self._backbone_key())), strict=True)
        self.reset_context()

    def load_head(self, path: Path, registry: Any) -> tuple[str, str]:
        """PE backbone (``pe-core-l14-336``) and the head file in the ``qclip-head`` slot."""
        from qscore.weights import load_state, recorded_sha256

        self.load_backbone(registry)
        self._load_head(load_state(path))
        return f"{HEAD_KEY}:sha256:{recorded_sha256(path)[:16]}", "trained"

    def load_headless(self, registry: Any) -> tuple[str, str]:
        """PE backbone and no trained head: zero-shot (adapters off, softmax over the levels)."""
        self.load_backbone(registry)
        self.zero_shot = True
        return f"{self._backbone_key()}+zero-shot", "zero-shot"

    def _backbone_key(self) -> str:
        if self.config.backbone not in OFFICIAL_BACKBONES:
            raise MissingWeights(f"no official weights for backbone {self.config.backbone!r} (only {PE_L14})")
        return OFFICIAL_BACKBONES[self.config.backbone]

    def load_trained(self, state: dict[str, Tensor], card: dict, registry: Any) -> None:
        """A ``qscore train`` checkpoint: over the official backbone it holds the head only;
        trained from a random backbone (``--init random``) it holds every tensor."""
        if card.get("backbone") == "official":
            self.load_backbone(registry)
            self._load_head(state)
        else:
            self.load_state_dict(state, strict=True)
            self.zero_shot = False

    def _load_head(self, state: dict[str, Tensor]) -> None:
        """A head checkpoint: the ``head.*`` tensors, all of them (backbone tensors are ignored)."""
        head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        self.head.load_state_dict(head, strict=True)
        self.zero_shot = False
