"""DeepSeek-VL2 processor: conversation -> token ids, image-token mask and pixel tiles; then batching.

Reproduces the reference `DeepseekVLV2Processor` in inference mode with the "deepseek" chat template
exactly (token for token, pixel for pixel): chat template, `select_best_resolution`, global view + local
tiles, image-token counts, left-padded `batchify`. Pure CPU; loads no model and never prints. Not
responsible for how image features are laid out in the embeddings (model/vl2.py) or for generation.

Shape legend: T tokens of one conversation, N tiles of one conversation (global + local views of every
image), I images of one conversation, S tile side (image_size, 384), B batch rows, T_max / N_max / I_max
the largest T / N / I in a batch (N_max and I_max at least 1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dsvl2.model.errors import ConfigError, InputError
from dsvl2.model.requests import ASSISTANT, IMAGE_TOKEN, USER, Message
from dsvl2.model.tokenizer import PAD, Tokenizer

# The reference tiles images only when the whole conversation has at most this many
# (`cropping=len(pil_images) <= 2` in format_messages_v2); beyond it every image is one S x S view.
MAX_TILED_IMAGES = 2
BICUBIC = Image.Resampling.BICUBIC


@dataclass(frozen=True, slots=True)
class ProcessorConfig:
    """Image and template settings from a checkpoint's processor_config.json (unknown keys ignored)."""

    candidate_resolutions: tuple[tuple[int, int], ...]  # (width, height) of the local-view canvases
    image_size: int = 384
    patch_size: int = 14
    downsample_ratio: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    normalize: bool = True

    def __post_init__(self) -> None:
        s = self.image_size
        for key in ("image_size", "patch_size", "downsample_ratio"):
            if getattr(self, key) < 1:
                raise ConfigError(f"processor config: {key} must be >= 1, got {getattr(self, key)}")
        if not self.candidate_resolutions:
            raise ConfigError("processor config: candidate_resolutions is empty")
        for w, h in self.candidate_resolutions:
            if w < s or h < s or w % s or h % s:
                raise ConfigError(
                    f"processor config: candidate_resolutions entry ({w}, {h}) is not a multiple of "
                    f"image_size {s} (local views are cut into {s}x{s} tiles)"
                )
        for key in ("image_mean", "image_std"):
            if len(getattr(self, key)) != 3:
                raise ConfigError(f"processor config: {key} must have 3 (RGB) values")
        if any(v == 0 for v in self.image_std):
            raise ConfigError("processor config: image_std must not contain 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProcessorConfig:
        """Build from processor_config.json's keys; reject values this runtime does not implement."""
        for key, supported in (("sft_format", "deepseek"), ("image_token", IMAGE_TOKEN), ("pad_token", PAD)):
            if key in d and d[key] != supported:
                raise ConfigError(f"processor config: unsupported {key} {d[key]!r} (only {supported!r})")
        if "candidate_resolutions" not in d:
            raise ConfigError("processor config: candidate_resolutions is missing")
        try:
            candidates = tuple((int(w), int(h)) for w, h in d["candidate_resolutions"])
            # The reference sets image_size = candidate_resolutions[0][0]; real configs have no such key.
            kwargs: dict[str, Any] = {
                "candidate_resolutions": candidates,
                "image_size": int(d.get("image_size", candidates[0][0] if candidates else 384)),
            }
            for key in ("patch_size", "downsample_ratio"):
                if key in d:
                    kwargs[key] = int(d[key])
            for key in ("image_mean", "image_std"):
                if key in d:
                    kwargs[key] = tuple(float(v) for v in d[key])
            if "normalize" in d:
                kwargs["normalize"] = bool(d["normalize"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"processor config: malformed value ({exc})") from exc
        return cls(**kwargs)

    @classmethod
    def from_dir(cls, path: str | Path) -> ProcessorConfig:
        """Read `<path>/processor_config.json`; candidate_resolutions may come from config.json instead."""
        directory = Path(path)
        d = _read_json(directory / "processor_config.json")
        if "candidate_resolutions" not in d and (directory / "config.json").is_file():
            model_cfg = _read_json(directory / "config.json")
            if "candidate_resolutions" in model_cfg:
                d = {**d, "candidate_resolutions": model_cfg["candidate_resolutions"]}
        return cls.from_dict(d)

    @property
    def tokens_per_side(self) -> int:
        """Side of one tile's token grid after the projector's downsampling: ceil((384 // 14) / 2) = 14."""
        return math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """RGB fill of padded canvas areas; the reference uses int(mean * 255), i.e. (127, 127, 127)."""
        r, g, b = (int(m * 255) for m in self.image_mean)
        return r, g, b


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ConfigError(f"{file.name} not found in {file.parent}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{file} does not hold a JSON object")
    return data


# ---------------------------------------------------------------------------------------------------
# Tiling geometry


def select_best_resolution(size: tuple[int, int], candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The candidate (width, height) that keeps the most image pixels when the image is fitted into it.

    Reference rule: for each candidate in order, scale = min(cw / W, ch / H), effective =
    min(int(W * scale) * int(H * scale), W * H), waste = cw * ch - effective; keep the largest effective,
    ties broken by the smaller waste, then by list order.
    """
    width, height = size
    best, best_eff, best_waste = None, 0, math.inf
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cw, ch), eff, waste
    if best is None:  # only when every candidate keeps 0 pixels, which a valid config cannot produce
        raise InputError(f"no candidate resolution fits an image of size {width}x{height}")
    return best


def num_image_tokens(num_width_tiles: int, num_height_tiles: int, cfg: ProcessorConfig) -> int:
    """`<image>` positions of one image: global grid h x (w + 1 newline), 1 view separator, then the local
    grid (th * h) x (tw * w + 1 newline), with h = w = cfg.tokens_per_side."""
    n = cfg.tokens_per_side
    return n * (n + 1) + 1 + (num_height_tiles * n) * (num_width_tiles * n + 1)


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """How one image becomes tiles and tokens."""

    resolution: tuple[int, int]  # (width, height) canvas of the local view
    num_width_tiles: int
    num_height_tiles: int
    num_tokens: int

    @property
    def num_tiles(self) -> int:
        """Tiles including the global view."""
        return 1 + self.num_width_tiles * self.num_height_tiles


def plan_image(size: tuple[int, int], *, num_images: int, cfg: ProcessorConfig) -> ImagePlan:
    """Local-view canvas, tile grid and token count of an image of `size` in a conversation with
    `num_images` images. The only place that applies the "tile at most MAX_TILED_IMAGES images" policy:
    with more, the local view is a single S x S tile identical to the global view."""
    if num_images <= MAX_TILED_IMAGES:
        resolution = select_best_resolution(size, cfg.candidate_resolutions)
    else:
        resolution = (cfg.image_size, cfg.image_size)
    tw, th = resolution[0] // cfg.image_size, resolution[1] // cfg.image_size
    return ImagePlan(resolution, tw, th, num_image_tokens(tw, th, cfg))


def pad_geometry(size: tuple[int, int], target: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized (w, h), paste offset (x, y)) of an image of `size` fitted into a `target` canvas.

    Same arithmetic as Pillow 13's `ImageOps.pad` (used by the reference): the fitted side keeps the
    target length, the other becomes round(other / fitted * target) and is centred at
    round((target - resized) * 0.5), Python's round-half-to-even (38.5 -> 38).
    """
    (w, h), (tw, th) = size, target
    rw, rh = tw, th
    if w / h > tw / th:
        rh = round(h / w * tw)
    elif w / h < tw / th:
        rw = round(w / h * th)
    return (rw, rh), (round((tw - rw) * 0.5), round((th - rh) * 0.5))


def pad_image(image: Image.Image, target: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    """`image` (RGB) resized with bicubic to fit `target` and centred on a `color` canvas (ImageOps.pad)."""
    (rw, rh), offset = pad_geometry(image.size, target)
    if (rw, rh) == target:
        return image.resize(target, BICUBIC)
    canvas = Image.new("RGB", target, color)
    if rw > 0 and rh > 0:  # an extreme aspect ratio can round one side to 0: nothing left to paste
        canvas.paste(image.resize((rw, rh), BICUBIC), offset)
    return canvas


def _tiles_u8(view: Image.Image, side: int) -> torch.Tensor:
    """Cut an RGB view whose sides are multiples of `side` into tiles, row by row: (n, 3, side, side) u8."""
    w, h = view.size
    hwc = torch.from_numpy(np.array(view, dtype=np.uint8))  # (H, W, 3)
    grid = hwc.view(h // side, side, w // side, side, 3)  # (th, S, tw, S, 3)
    return grid.permute(0, 2, 4, 1, 3).reshape(-1, 3, side, side)  # (th * tw, 3, S, S)


# ---------------------------------------------------------------------------------------------------
# Processing and batching


@dataclass(frozen=True, slots=True)
class Prepared:
    """One conversation, processed. Text-only conversations have N = I = 0 (collate adds the dummy tile)."""

    input_ids: torch.Tensor  # (T,) long
    images_seq_mask: torch.Tensor  # (T,) bool, True at `<image>` positions
    tiles: torch.Tensor  # (N, 3, S, S) float32: per image its global view, then its local tiles row-major
    images_spatial_crop: torch.Tensor  # (I, 2) long: (num_width_tiles, num_height_tiles) per image
    num_image_tokens: tuple[int, ...]  # per image


@dataclass(frozen=True, slots=True)
class Batch:
    """Left-padded model inputs for B conversations (the reference's `batchify`)."""

    input_ids: torch.Tensor  # (B, T_max) long, pad id on the left
    attention_mask: torch.Tensor  # (B, T_max) bool, False on padding
    position_ids: torch.Tensor  # (B, T_max) long, cumsum(mask) - 1, 1 on padding (as generate() does)
    images_seq_mask: torch.Tensor  # (B, T_max) bool
    images: torch.Tensor  # (B, N_max, 3, S, S) float32, all-zero padding tiles
    images_spatial_crop: torch.Tensor  # (B, I_max, 2) long, (0, 0) rows for padding / no image
    seq_lens: torch.Tensor  # (B,) long, unpadded lengths


def _user_text(content: str) -> str:
    # The "deepseek" conversation template (SeparatorStyle.DeepSeek) renders a user turn followed by the
    # empty reply slot: "role: text" + "\n\n" for a non-empty text, bare "role:" for an empty one.
    text = content.strip()
    return f"{USER}: {text}\n\n{ASSISTANT}:" if text else f"{USER}:{ASSISTANT}:"


def _check_conversation(conversation: Sequence[Message]) -> None:
    if not conversation:
        raise InputError("empty conversation: expected user turns ending with an empty assistant turn")
    for k, turn in enumerate(conversation):
        if turn.role not in (USER, ASSISTANT):
            raise InputError(f"turn {k}: unknown role {turn.role!r} (expected {USER!r} or {ASSISTANT!r})")
        placeholders = turn.content.count(IMAGE_TOKEN)
        if turn.role == ASSISTANT and (placeholders or turn.images):
            raise InputError(f"turn {k}: assistant turns cannot hold images or {IMAGE_TOKEN} placeholders")
        if placeholders != len(turn.images):
            raise InputError(f"turn {k}: {placeholders} {IMAGE_TOKEN} placeholders but {len(turn.images)} images")
        for image in turn.images:
            if image.width < 1 or image.height < 1:
                raise InputError(f"turn {k}: image of size {image.width}x{image.height} is empty")
    last = conversation[-1]
    if last.role != ASSISTANT or last.content.strip():
        raise InputError(
            "the last turn must be an empty assistant turn (the reply to generate), "
            f"got a {last.role} turn with {len(last.content)} characters"
        )
    if not any(turn.role == USER for turn in conversation):
        raise InputError("conversation has no user turn")


class Processor:
    """Turns conversations into `Prepared` inputs and batches them; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, config: ProcessorConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self._mean = torch.tensor(config.image_mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(config.image_std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_dir(cls, path: str | Path) -> Processor:
        """Load tokenizer.json and processor_config.json from a checkpoint directory."""
        return cls(Tokenizer.from_dir(path), ProcessorConfig.from_dir(path))

    def prepare(self, conversation: Sequence[Message]) -> Prepared:
        """Process one conversation whose last turn is the empty assistant turn to generate."""
        ids, mask, images = self._layout(conversation)
        tiles = [self._image_tiles(image, plan) for image, plan in images]
        s = self.config.image_size
        u8 = torch.cat(tiles) if tiles else torch.empty((0, 3, s, s), dtype=torch.uint8)
        return Prepared(
            input_ids=torch.tensor(ids, dtype=torch.long),
            images_seq_mask=torch.tensor(mask, dtype=torch.bool),
            tiles=self._normalize(u8),
            images_spatial_crop=torch.tensor(
                [(plan.num_width_tiles, plan.num_height_tiles) for _, plan in images], dtype=torch.long
            ).view(-1, 2),
            num_image_tokens=tuple(plan.num_tokens for _, plan in images),
        )

    def count_tokens(self, conversation: Sequence[Message]) -> int:
        """The prompt length `prepare` gives `conversation`, without cutting a tile: what a server checks
        against the context before it queues a request."""
        return len(self._layout(conversation)[0])

    def _layout(
        self, conversation: Sequence[Message]
    ) -> tuple[list[int], list[bool], list[tuple[Image.Image, ImagePlan]]]:
        """(token ids, image-position mask, each image with its plan) of a checked conversation."""
        _check_conversation(conversation)
        tok, cfg = self.tokenizer, self.config
        num_images = sum(len(turn.images) for turn in conversation)
        ids: list[int] = [tok.bos_id]
        mask: list[bool] = [False]
        images: list[tuple[Image.Image, ImagePlan]] = []
        # The final empty assistant turn would add only eos, which the reference drops in inference mode.
        for turn in conversation[:-1]:
            if turn.role == ASSISTANT:
                answer = [*tok.encode(turn.content.strip()), tok.eos_id]
                ids += answer
                mask += [False] * len(answer)
                continue
            # Each text piece between placeholders is encoded on its own, as the reference does.
            pieces = _user_text(turn.content).split(IMAGE_TOKEN)
            for k, piece in enumerate(pieces):
                if k > 0:
                    image = turn.images[k - 1]
                    plan = plan_image(image.size, num_images=num_images, cfg=cfg)
                    images.append((image, plan))
                    ids += [tok.image_id] * plan.num_tokens
                    mask += [True] * plan.num_tokens
                piece_ids = tok.encode(piece)
                ids += piece_ids
                mask += [False] * len(piece_ids)
        return ids, mask, images

    def _image_tiles(self, image: Image.Image, plan: ImagePlan) -> torch.Tensor:
        """Global view then local tiles of one image: (plan.num_tiles, 3, S, S) uint8."""
        cfg = self.config
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() copies; caller's is kept
        side = (cfg.image_size, cfg.image_size)
        global_view = pad_image(rgb, side, cfg.pad_color)
        local_view = global_view if plan.resolution == side else pad_image(rgb, plan.resolution, cfg.pad_color)
        return torch.cat([_tiles_u8(global_view, cfg.image_size), _tiles_u8(local_view, cfg.image_size)])

    def _normalize(self, u8: torch.Tensor) -> torch.Tensor:
        # torchvision ToTensor (u8 / 255 in float32) then Normalize ((x - mean) / std): same ops, same bits.
        x = u8.to(torch.float32).div(255)
        return x.sub(self._mean).div(self._std) if self.config.normalize else x

    def collate(self, items: Sequence[Prepared]) -> Batch:
        """Left-pad token rows with the pad id and pad tiles / crops with zeros (the reference batchify)."""
        if not items:
            raise InputError("nothing to collate: no prepared conversations")
        s = self.config.image_size
        lens = [int(it.input_ids.numel()) for it in items]
        b, t = len(items), max(lens)
        n_tiles = max(1, *(it.tiles.shape[0] for it in items))  # a text-only row keeps one zero tile
        n_images = max(1, *(it.images_spatial_crop.shape[0] for it in items))
        input_ids = torch.full((b, t), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, t), dtype=torch.bool)
        images_seq_mask = torch.zeros((b, t), dtype=torch.bool)
        images = torch.zeros((b, n_tiles, 3, s, s), dtype=torch.float32)
        crops = torch.zeros((b, n_images, 2), dtype=torch.long)
        for row, (it, n) in enumerate(zip(items, lens, strict=True)):
            input_ids[row, t - n :] = it.input_ids
            attention_mask[row, t - n :] = True
            images_seq_mask[row, t - n :] = it.images_seq_mask
            images[row, : it.tiles.shape[0]] = it.tiles
            crops[row, : it.images_spatial_crop.shape[0]] = it.images_spatial_crop
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(~attention_mask, 1)
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            images_seq_mask=images_seq_mask,
            images=images,
            images_spatial_crop=crops,
            seq_lens=torch.tensor(lens, dtype=torch.long),
        )
