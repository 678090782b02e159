"""Depth Anything V2: a DINOv2 ViT encoder feeding a DPT head.

Laid out as timm lays out an architecture: the encoder blocks, the DPT head blocks, the model,
then ``checkpoint_filter_fn`` (foreign key names to ours) and the named configurations.
Parameter names equal the upstream release's, so released checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DepthAnythingV2Config:
    """Everything that determines the shapes of a Depth Anything V2 network."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 14
    img_size: int = 518  # positional-embedding grid is img_size / patch_size per side
    layer_idx: tuple[int, ...] = (2, 5, 8, 11)  # blocks whose outputs feed the DPT head
    features: int = 64
    out_channels: tuple[int, ...] = (48, 96, 192, 384)
    use_bn: bool = False
    use_clstoken: bool = False
    ffn: str = "mlp"  # "mlp" or "swiglufused" (vitg)
    name: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_idx", tuple(int(i) for i in self.layer_idx))
        object.__setattr__(self, "out_channels", tuple(int(c) for c in self.out_channels))
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if len(self.layer_idx) != 4 or len(self.out_channels) != 4:
            problems.append("layer_idx and out_channels need exactly 4 entries each")
        if any(not 0 <= i < self.depth for i in self.layer_idx):
            problems.append(f"layer_idx {list(self.layer_idx)} must lie in [0, depth={self.depth})")
        if self.ffn not in ("mlp", "swiglufused"):
            problems.append(f"ffn must be 'mlp' or 'swiglufused', not {self.ffn!r}")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if problems:
            raise ValueError("invalid Depth Anything V2 config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_idx"] = list(self.layer_idx)
        d["out_channels"] = list(self.out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DepthAnythingV2Config":
        """A config from its fields; upstream's form ``{"encoder": "vitl", "features": 256,
        "out_channels": [...]}`` starts from the named size and overrides what it gives."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known - _IGNORED_CONFIG_KEYS - {"encoder"})
        if unknown:
            raise ValueError(f"unknown Depth Anything V2 config keys {unknown}; known keys: {sorted(known)}")
        fields = {k: v for k, v in d.items() if k in known}
        if "encoder" in d:
            size = MODEL_ALIASES.get(str(d["encoder"]).lower(), str(d["encoder"]).lower())
            if size not in MODEL_CONFIGS:
                raise ValueError(f"encoder {d['encoder']!r} is not one of {', '.join(MODEL_CONFIGS)}")
            base = MODEL_CONFIGS[size].to_dict()
            changed = any(base[k] != (list(v) if isinstance(v, tuple) else v) for k, v in fields.items() if k != "name")
            fields = {**base, "name": "custom" if changed else size, **fields}
        return cls(**fields)


# keys that appear in config files beside the architecture (e.g. the golden fixture's metadata)
_IGNORED_CONFIG_KEYS = {"input_shape", "seed", "outputs"}


# --------------------------------------------------------------------------------------------
# DINOv2 encoder blocks


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, use_sdpa: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # Plain attention is kept for the benchmark that shows what SDPA buys.
        self.use_sdpa = use_sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.use_sdpa:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFused(nn.Module):
    """DINOv2's fused SwiGLU feed-forward (vitg): hidden width 2/3 of the MLP's, rounded to 8."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ffn: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLUFused(dim, hidden) if ffn == "swiglufused" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


_BICUBIC_WEIGHTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _bicubic_weights(side: int, gh: int, gw: int, offset: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(gh, side) and (gw, side) float32 matrices R, C with R @ X @ C.T equal (to float
    rounding) to ``F.interpolate(X, scale_factor=((gh + offset) / side, (gw + offset) / side),
    mode="bicubic")`` of a (side, side) X: bicubic resizing is separable. Read off
    ``F.interpolate`` of one-hot rows and columns (exactly upstream's coordinates and clamping
    at the borders; upstream passes a scale factor, not a size, so the weights depend on the
    offset); cached per shape and device."""
    gh, gw = int(gh), int(gw)
    key = (side, gh, gw, offset, str(device))
    if key not in _BICUBIC_WEIGHTS:
        scale = ((gh + offset) / side, (gw + offset) / side)
        eye = torch.eye(side, dtype=torch.float64)
        # basis image a: row a all ones (resp. column a); its resize holds column a of R (of C)
        by_row = eye[:, :, None].expand(side, side, side)[:, None]
        by_col = eye[:, None, :].expand(side, side, side)[:, None]
        rows = F.interpolate(by_row, scale_factor=scale, mode="bicubic", antialias=False)[:, 0, :, 0].T
        cols = F.interpolate(by_col, scale_factor=scale, mode="bicubic", antialias=False)[:, 0, 0, :].T
        if rows.shape != (gh, side) or cols.shape != (gw, side):
            raise RuntimeError(f"bicubic weights of shape {tuple(rows.shape)}, {tuple(cols.shape)} for a {gh}x{gw} grid")
        _BICUBIC_WEIGHTS[key] = (rows.to(device, torch.float32), cols.to(device, torch.float32))
    return _BICUBIC_WEIGHTS[key]


@torch.compiler.disable
def _resize_bicubic(grid: torch.Tensor, gh: int, gw: int, offset: float) -> torch.Tensor:
    """(side, side, C) -> (gh, gw, C), upstream's bicubic resize of the positional embedding.
    Left out of torch.compile: inductor got its backward wrong (the student's gradients off by
    ~100% at a 3x3 token grid, torch 2.13 on CPU; tests/train/test_train_e2e.py caught it)."""
    side = grid.shape[0]
    rows, cols = _bicubic_weights(side, gh, gw, offset, grid.device)
    return torch.einsum("ia,abc,jb->ijc", rows, grid, cols)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT without registers, as Depth Anything V2 uses it."""

    interpolate_offset = 0.1  # upstream's offset: avoids floating-point error in the resize

    def __init__(self, cfg: DepthAnythingV2Config) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))  # unused; kept for key parity
        self.blocks = nn.ModuleList(
            [Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.ffn) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        n = self.pos_embed.shape[1] - 1
        gh, gw = h // self.patch_size, w // self.patch_size
        if gh * gw == n and gh == gw:
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        side = math.sqrt(n)
        patch_pos = pos[0, 1:].reshape(int(side), int(side), -1)
        # upstream's bicubic resize, as its two 1-D weight matrices: CUDA's bicubic kernel runs a
        # thread per output position looping over all channels (6.6 ms forward + 2.2 backward for
        # ViT-B at 560 px on an H100, 8% of a training step's kernel time); two small matmuls
        # take microseconds
        patch_pos = _resize_bicubic(patch_pos, gh, gw, self.interpolate_offset).reshape(1, gh * gw, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1).to(dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        return tokens + self.interpolate_pos_encoding(h, w, tokens.dtype)

    def get_intermediate_layers(
        self, x: torch.Tensor, layer_idx: Sequence[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(patch tokens (B, N, C), class token (B, C)) after the final LayerNorm, per block asked for."""
        wanted = set(layer_idx)
        last = max(wanted)
        tokens = self.prepare_tokens(x)
        outputs = {}
        for i, block in enumerate(self.blocks[: last + 1]):
            tokens = block(tokens)
            if i in wanted:
                normed = self.norm(tokens)
                outputs[i] = (normed[:, 1:], normed[:, 0])
        return [outputs[i] for i in layer_idx]


# --------------------------------------------------------------------------------------------
# DPT head blocks


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int, use_bn: bool) -> None:
        super().__init__()
        self.use_bn = use_bn
        # upstream keeps the conv biases even in front of BatchNorm
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)
        if use_bn:
            self.bn1 = nn.BatchNorm2d(features)
            self.bn2 = nn.BatchNorm2d(features)
        self.activation = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.activation(x))
        if self.use_bn:
            out = self.bn1(out)
        out = self.conv2(self.activation(out))
        if self.use_bn:
            out = self.bn2(out)
        return out + x


class FeatureFusionBlock(nn.Module):
    def __init__(self, features: int, use_bn: bool) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features, use_bn)
        self.resConfUnit2 = ResidualConvUnit(features, use_bn)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    def __init__(self, cfg: DepthAnythingV2Config) -> None:
        super().__init__()
        c, oc, f = cfg.embed_dim, cfg.out_channels, cfg.features
        self.use_clstoken = cfg.use_clstoken
        self.projects = nn.ModuleList([nn.Conv2d(c, o, kernel_size=1) for o in oc])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        if cfg.use_clstoken:
            self.readout_projects = nn.ModuleList(
                [nn.Sequential(nn.Linear(2 * c, c), nn.GELU()) for _ in oc]
            )
        self.scratch = nn.Module()
        for i, o in enumerate(oc, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(o, f, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FeatureFusionBlock(f, cfg.use_bn))
        self.scratch.output_conv1 = nn.Conv2d(f, f // 2, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(f // 2, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 1, kernel_size=1),
            nn.ReLU(inplace=True),
        )

    def forward(
        self, layers: list[tuple[torch.Tensor, torch.Tensor]], patch_h: int, patch_w: int, patch_size: int
    ) -> torch.Tensor:
        maps = []
        for i, (tokens, cls) in enumerate(layers):
            if self.use_clstoken:
                tokens = self.readout_projects[i](torch.cat([tokens, cls[:, None].expand_as(tokens)], -1))
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], patch_h, patch_w)
            maps.append(self.resize_layers[i](self.projects[i](x)))
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i + 1}_rn")(m) for i, m in enumerate(maps))
        p4 = s.refinenet4(l4, size=l3.shape[2:])
        p3 = s.refinenet3(p4, l3, size=l2.shape[2:])
        p2 = s.refinenet2(p3, l2, size=l1.shape[2:])
        p1 = s.refinenet1(p2, l1)
        out = s.output_conv1(p1)
        out = F.interpolate(out, (patch_h * patch_size, patch_w * patch_size), mode="bilinear", align_corners=True)
        return s.output_conv2(out)


# --------------------------------------------------------------------------------------------
# The model


class DepthAnythingV2(nn.Module):
    """Normalised RGB (B, 3, H, W), H and W multiples of the patch size -> disparity (B, H, W)."""

    def __init__(self, cfg: DepthAnythingV2Config) -> None:
        super().__init__()
        self.config = cfg
        self.pretrained = DinoVisionTransformer(cfg)
        self.depth_head = DPTHead(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init for students trained from scratch (ViT: trunc-normal, as DINOv2)."""
        if self.pretrained.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pretrained.pos_embed, std=0.02)
        nn.init.normal_(self.pretrained.cls_token, std=1e-6)
        for m in self.pretrained.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # the head ends in a ReLU: a positive bias keeps a fresh model off the dead side of it,
        # where it would output 0 everywhere and never receive a gradient
        nn.init.constant_(self.depth_head.scratch.output_conv2[2].bias, 1.0)

    def set_sdpa(self, enabled: bool) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.use_sdpa = enabled

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Disparity (B, H, W); with ``return_features`` also the last encoder layer's patch
        tokens (B, N, C) after the final LayerNorm, the features stage 1 caches and stage 2 aligns."""
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"input height and width must be multiples of {p}, got {tuple(x.shape[-2:])}")
        patch_h, patch_w = x.shape[-2] // p, x.shape[-1] // p
        layers = self.pretrained.get_intermediate_layers(x, self.config.layer_idx)
        depth = F.relu(self.depth_head(layers, patch_h, patch_w, p)).squeeze(1)
        if return_features:
            return depth, layers[-1][0]
        return depth


# --------------------------------------------------------------------------------------------
# Foreign checkpoints


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the key names of every checkpoint layout users hold onto ours.

    Handles DDP/compile wrappers (``module.``, ``_orig_mod.``), Distill-Any-Depth's
    ``backbone.*`` names with chunked blocks (``backbone.blocks.0.{i}.``), and ``head.*``
    as an alias of ``depth_head.*``.
    """
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for original, value in state_dict.items():
        key = original
        stripped = True
        while stripped:  # wrappers nest (a compiled model inside DDP: module._orig_mod.)
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key.startswith("backbone."):
            key = "pretrained." + key[len("backbone."):]
        if key.startswith("head."):
            key = "depth_head." + key[len("head."):]
        parts = key.split(".")
        # chunked blocks: pretrained.blocks.<chunk>.<i>.<rest> -> pretrained.blocks.<i>.<rest>
        if len(parts) > 4 and parts[0] == "pretrained" and parts[1] == "blocks" and parts[2].isdigit() and parts[3].isdigit():
            key = ".".join(parts[:2] + parts[3:])
        if key in out:  # e.g. a file holding both a backbone.* and a pretrained.* copy
            raise ValueError(f"keys {source[key]!r} and {original!r} both map to {key!r}; keep one copy in the checkpoint")
        out[key], source[key] = value, original
    return out


# --------------------------------------------------------------------------------------------
# Named configurations (upstream Depth Anything V2)


MODEL_CONFIGS: dict[str, DepthAnythingV2Config] = {
    "vits": DepthAnythingV2Config(384, 12, 6, layer_idx=(2, 5, 8, 11), features=64, out_channels=(48, 96, 192, 384), name="vits"),
    "vitb": DepthAnythingV2Config(768, 12, 12, layer_idx=(2, 5, 8, 11), features=128, out_channels=(96, 192, 384, 768), name="vitb"),
    "vitl": DepthAnythingV2Config(1024, 24, 16, layer_idx=(4, 11, 17, 23), features=256, out_channels=(256, 512, 1024, 1024), name="vitl"),
    "vitg": DepthAnythingV2Config(1536, 40, 24, layer_idx=(9, 19, 29, 39), features=384, out_channels=(1536, 1536, 1536, 1536), ffn="swiglufused", name="vitg"),
}

MODEL_ALIASES = {
    "depthanything-small": "vits",
    "depthanything-base": "vitb",
    "depthanything-large": "vitl",
    "depthanything-giant": "vitg",
    "small": "vits",
    "base": "vitb",
    "large": "vitl",
    "giant": "vitg",
}
