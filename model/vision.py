"""SigLIP vision tower and the downsampling MLP projector.

The tower is a pre-norm ViT in timm's layout (the checkpoint's `vision.*` keys): 14x14 patches of a 384x384
tile -> 27x27 = 729 tokens, learned position embedding, no class token, final LayerNorm. The map-pooling head
(`attn_pool`) is part of the checkpoint but not of the forward: DeepSeek-VL2 uses the patch tokens.

Which of its products and attentions run our CPU kernels is the `Paths` that `VisionTower` gets from kernels.paths
(per machine, calibrated on the tower's own shapes) and hands to its blocks.

Shapes: N tiles, P patches per tile (729), C width, G grid side (27), E language hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.model import kernel_calibration, kernels
from dsvl2.model.config import ProjectorConfig, VisionConfig
from dsvl2.model.kernel_choice import UNCHOSEN, Paths

LAYER_NORM_EPS = 1e-6


def dense(x: torch.Tensor, layer: nn.Linear, paths: Paths, *, gelu: bool = False) -> torch.Tensor:
    """`layer(x)` (then tanh-GELU when `gelu`), with bias and GELU fused into the product by oneDNN when the
    vision-GEMM family takes the kernel."""
    if paths.kernel("vision_gemm"):
        return kernels.linear_fused(x, layer.weight, layer.bias, gelu=gelu)
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y, approximate="tanh") if gelu else y


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.paths = UNCHOSEN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(dense(x, self.fc1, self.paths, gelu=True), self.fc2, self.paths)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.paths = UNCHOSEN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, P, C = x.shape
        p = self.paths
        qkv = dense(x, self.qkv, p).view(N, P, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, N, H, P, D)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if p.kernel("vision_attention") and kernels.attention_fits(q, k, v):
            out = kernels.attention(q, k, v, q.shape[-1] ** -0.5)  # (N, H, P, D), stored as (N, P, H, D)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return dense(out.transpose(1, 2).reshape(N, P, C), self.proj, p)


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # (N, C, G, G) -> (N, P, C), made contiguous: left channel-major, the layout carried through every residual
        # add of the tower, and each LayerNorm and add ran on strided data (a transposing copy per LayerNorm).
        return self.proj(pixels).flatten(2).transpose(1, 2).contiguous()


class AttentionPoolHead(nn.Module):
    """SigLIP's map-pooling head. Its weights ship in every checkpoint, so it is built to keep loading strict
    and parameter counts true, but DeepSeek-VL2 never runs it (the reference sets ignore_head)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.latent = nn.Parameter(torch.empty(1, 1, cfg.width))
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.grid * cfg.grid, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.attn_pool = AttentionPoolHead(cfg)
        self.paths = UNCHOSEN
        self._trials: dict | None = None  # the calibration trials on this tower's shapes, made once

    def use_paths(self, paths: Paths) -> None:
        """Make every block of the tower ask `paths` which families run our kernels."""
        if paths is not self.paths:
            self.paths = paths
            for module in self.blocks.modules():
                if isinstance(module, Attention | Mlp):
                    module.paths = paths

    def choose_paths(self) -> Paths:
        """Which path each op family of the tower takes on this CPU (see LanguageModel.choose_paths)."""
        if self._trials is None:
            self._trials = kernel_calibration.vision_trials(self)
        paths = kernels.paths(self._trials)
        self.use_paths(paths)
        return paths

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, 384, 384) normalised pixels -> (N, P, C) patch features after the final LayerNorm."""
        if self.pos_embed.dtype is torch.bfloat16 and self.pos_embed.device.type == "cpu":  # where kernels can run
            self.choose_paths()  # decided once per process (at load), then a lookup
        x = self.patch_embed(pixels.to(self.pos_embed.dtype)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Projector(nn.Module):
    """downsample_mlp_gelu: zero-pad the G x G grid at the bottom/right to a multiple of the ratio, turn each
    r x r window into one token whose features are ordered channel-major (c*r*r + dy*r + dx, the order of
    torch's F.unfold that the reference uses), then Linear, (GELU, Linear) x max(depth - 1, 1)."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.ratio = cfg.downsample_ratio
        hidden = cfg.n_embed * cfg.mlp_ratio
        # As in the reference, depth 1 builds the same two linear layers as depth 2.
        layers: list[nn.Module] = [nn.Linear(cfg.input_dim * self.ratio**2, hidden)]
        for _ in range(max(cfg.depth - 2, 0)):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        layers += [nn.GELU(), nn.Linear(hidden, cfg.n_embed)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, G*G, C) -> (N, (G'/r)^2, E) with G' = G rounded up to a multiple of r."""
        N, P, C = x.shape
        r = self.ratio
        G = round(P**0.5)
        pad = -G % r
        x = F.pad(x.view(N, G, G, C), (0, 0, 0, pad, 0, pad))
        g = (G + pad) // r
        x = x.view(N, g, r, g, r, C).permute(0, 1, 3, 5, 2, 4)  # (N, gy, gx, C, dy, dx)
        return self.layers(x.reshape(N, g * g, C * r * r))
