"""DeepSeek-VL2: vision tower -> projector -> tile layout -> image features scattered into text embeddings.

This module owns the image-token layout (what each `<image>` block of the processor is filled with); the
processor owns how many tokens that block has. Both must agree with `num_image_tokens` in processor.py.

Shape legend: B batch, T tokens, N tiles, E hidden size, h = w = 14 projected tokens per tile side,
tw / th tiles across / down the local view.
"""

from __future__ import annotations

import torch
from torch import nn

from dsvl2.model.config import ModelConfig
from dsvl2.model.language import LanguageModel
from dsvl2.model.vision import Projector, VisionTower


class DeepseekVL2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.language.hidden_size
        self.vision = VisionTower(cfg.vision)
        self.projector = Projector(cfg.projector)
        self.language = LanguageModel(cfg.language)
        self.image_newline = nn.Parameter(torch.empty(E))
        self.view_separator = nn.Parameter(torch.empty(E))  # checkpoint key: view_seperator

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    def encode_tiles(self, tiles: torch.Tensor, *, chunk: int | None = None) -> torch.Tensor:
        """(N, 3, 384, 384) pixels -> (N, h*w, E) projected features, `chunk` tiles per vision call."""
        tiles = tiles.to(device=self.device, dtype=self.dtype)
        step = chunk or max(tiles.shape[0], 1)
        parts = [self.projector(self.vision(tiles[i : i + step])) for i in range(0, tiles.shape[0], step)]
        return torch.cat(parts) if parts else tiles.new_zeros(0, 0, self.cfg.language.hidden_size)

    def layout_image(self, features: torch.Tensor, tw: int, th: int) -> torch.Tensor:
        """(1 + tw*th, h*w, E) features of one image (global view first) -> (tokens, E): the global grid
        and the stitched local grid, each row followed by `image_newline`, joined by `view_separator`
        (global first for global_view_pos "head", last for "tail")."""
        _, hw, E = features.shape
        h = w = round(hw**0.5)
        newline = self.image_newline.to(features.dtype)
        global_grid = features[0].view(h, w, E)
        global_rows = torch.cat((global_grid, newline.expand(h, 1, E)), dim=1).view(-1, E)
        local = features[1:].view(th, tw, h, w, E).permute(0, 2, 1, 3, 4).reshape(th * h, tw * w, E)
        local_rows = torch.cat((local, newline.expand(th * h, 1, E)), dim=1).view(-1, E)
        sep = self.view_separator.to(features.dtype)[None]
        if self.cfg.global_view_pos == "head":
            return torch.cat((global_rows, sep, local_rows))
        return torch.cat((local_rows, sep, global_rows))

    def embed(self, input_ids: torch.Tensor, images_seq_mask: torch.Tensor, tiles: torch.Tensor,
              crops: torch.Tensor, *, vision_chunk: int | None = None) -> torch.Tensor:
        """Token embeddings (B, T, E) with image features written, in order, into each row's
        `images_seq_mask` positions.

        tiles: (N, 3, 384, 384) every row's real tiles, concatenated in row order (per image: global view,
               then local tiles row-major); crops: (B, I, 2) (tw, th) per image, (0, 0) rows are padding.
        """
        embeds = self.language.embed(input_ids.to(self.device))
        if tiles.shape[0] == 0:
            return embeds
        features = self.encode_tiles(tiles, chunk=vision_chunk)
        start = 0
        for b in range(input_ids.shape[0]):
            blocks = []
            for tw, th in crops[b].tolist():
                if tw == 0 or th == 0:
                    break
                blocks.append(self.layout_image(features[start : start + 1 + tw * th], tw, th))
                start += 1 + tw * th
            if blocks:
                mask = images_seq_mask[b].to(self.device)
                image_embeds = torch.cat(blocks)
                if int(mask.sum()) != image_embeds.shape[0]:
                    raise ValueError(f"row {b}: {int(mask.sum())} image positions but "
                                     f"{image_embeds.shape[0]} image features")
                embeds[b, mask] = image_embeds.to(embeds.dtype)
        return embeds


def real_tiles(images: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """Select the real tiles from a padded (B, max_tiles, 3, H, W) batch given (B, I, 2) crops: per row,
    1 + tw*th tiles per image until the first (0, 0) crop (the reference's tile accounting)."""
    parts = []
    for b in range(images.shape[0]):
        n = 0
        for tw, th in crops[b].tolist():
            if tw == 0 or th == 0:
                break
            n += 1 + tw * th
        parts.append(images[b, :n])
    return torch.cat(parts)
