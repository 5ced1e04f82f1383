"""Model configuration: frozen dataclasses read from a checkpoint's `config.json`.

Fields absent from the file take the reference classes' defaults (DeepseekVLV2Config, VisionEncoderConfig,
MlpProjectorConfig, DeepseekV2Config); unknown keys are ignored; values the runtime does not implement are
rejected with a `ConfigError` naming the key. Derived sizes are properties, defined once here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsvl2.model.errors import ConfigError

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_SCALING_TYPES = ("linear", "yarn")
PROJECTOR_TYPES = ("downsample_mlp_gelu",)
GLOBAL_VIEW_POS = ("head", "tail")


def _from_dict(cls, raw: dict[str, Any], section: str):
    """Build dataclass `cls` from the keys of `raw` it knows (an explicit JSON null stays None, as in the
    reference: `q_lora_rank: null` means no query compression, not the default rank)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a JSON object, got {type(raw).__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = raw[f.name]
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{section}: {e}") from None


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,)}


def _check_types(obj, section: str) -> None:
    """Every scalar field must hold its annotated JSON type (a string "false" is not false; a bool is not a
    number); `X | None` fields may also be null. Checked before any value is compared."""
    for f in dataclasses.fields(obj):
        name, *rest = [part.strip() for part in str(f.type).split("|")]
        if name not in _TYPES:
            continue
        value = getattr(obj, f.name)
        if value is None and "None" in rest:
            continue
        ok = isinstance(value, _TYPES[name]) and not (name != "bool" and isinstance(value, bool))
        _require(ok, f"{section}.{f.name}", f"expected {name}{' or null' if rest else ''}, got {value!r}")


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"unsupported value for {key}: {msg}")


MAX_SIZE = 1 << 20  # no dimension of a real model comes near; a larger one is a broken config
MAX_LAYERS = 1024  # building even the meta model takes minutes far below a billion layers


def _positive_int(value: Any, key: str, most: int = MAX_SIZE) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and 0 < value <= most, key,
             f"expected an integer from 1 to {most}, got {value!r}")


@dataclass(frozen=True, slots=True)
class VisionConfig:
    """SigLIP ViT tower (timm VisionTransformer layout, no class token, pooling head unused)."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 384
    class_token: bool = False
    ignore_head: bool = True
    model_name: str = "siglip_large_patch16_384"

    def __post_init__(self) -> None:
        _check_types(self, "vision_config")
        for key in ("width", "heads", "patch_size", "image_size"):
            _positive_int(getattr(self, key), f"vision_config.{key}")
        _positive_int(self.layers, "vision_config.layers", MAX_LAYERS)
        _require(self.width % self.heads == 0, "vision_config.heads", f"{self.heads} does not divide width")
        _require(self.class_token is False, "vision_config.class_token", "only false is supported")
        _require(self.ignore_head is True, "vision_config.ignore_head", "only true is supported")
        _require(self.mlp_ratio > 0, "vision_config.mlp_ratio", f"{self.mlp_ratio!r}")
        _require(self.patch_size <= self.image_size, "vision_config.patch_size",
                 f"{self.patch_size} is larger than image_size {self.image_size}")

    @property
    def grid(self) -> int:
        """Patches per side: 384 // 14 = 27 (the last pixel rows/columns are not seen)."""
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True, slots=True)
class ProjectorConfig:
    """downsample_mlp_gelu: pad the patch grid to even, merge 2x2 windows, then an MLP of `depth` layers."""

    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False

    def __post_init__(self) -> None:
        _check_types(self, "projector_config")
        _require(self.projector_type in PROJECTOR_TYPES, "projector_config.projector_type",
                 f"{self.projector_type!r} (supported: {', '.join(PROJECTOR_TYPES)})")
        for key in ("input_dim", "n_embed", "mlp_ratio", "downsample_ratio"):
            _positive_int(getattr(self, key), f"projector_config.{key}")
        _positive_int(self.depth, "projector_config.depth", MAX_LAYERS)
        _require(self.token_pooling is False, "projector_config.token_pooling", "only false is supported")


@dataclass(frozen=True, slots=True)
class LanguageConfig:
    """DeepSeek-V2 MoE decoder. `use_mla` false means plain multi-head attention (LlamaAttention)."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "gready"  # the reference default, misspelt: configs must set it (rejected below)
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    use_mla: bool = True
    bos_token_id: int = 100000
    eos_token_id: int = 100001

    def __post_init__(self) -> None:
        p = "language_config."
        _check_types(self, "language_config")
        _require(self.first_k_dense_replace >= 0, p + "first_k_dense_replace",
                 f"expected >= 0, got {self.first_k_dense_replace}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                    "max_position_embeddings", "moe_layer_freq"):
            _positive_int(getattr(self, key), p + key)
        _positive_int(self.num_hidden_layers, p + "num_hidden_layers", MAX_LAYERS)
        _require(self.hidden_act == "silu", p + "hidden_act", f"{self.hidden_act!r} (supported: silu)")
        _require(self.attention_bias is False, p + "attention_bias", "only false is supported")
        _require(self.rms_norm_eps > 0, p + "rms_norm_eps", f"{self.rms_norm_eps!r}")
        _require(self.rope_theta > 0, p + "rope_theta", f"{self.rope_theta!r}")
        if self.use_mla:
            for key in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim"):
                _positive_int(getattr(self, key), p + key)
            _require(self.qk_rope_head_dim % 2 == 0, p + "qk_rope_head_dim", "must be even")
            if self.q_lora_rank is not None:
                _positive_int(self.q_lora_rank, p + "q_lora_rank")
        else:
            _require(self.hidden_size % self.num_attention_heads == 0, p + "num_attention_heads",
                     f"{self.num_attention_heads} does not divide hidden_size {self.hidden_size}")
            _require(self.num_attention_heads % self.kv_heads == 0, p + "num_key_value_heads",
                     f"{self.kv_heads} does not divide num_attention_heads {self.num_attention_heads}")
            _require(self.head_dim % 2 == 0, p + "num_attention_heads", "head_dim must be even")
        if self.n_routed_experts is not None:
            for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
                _positive_int(getattr(self, key), p + key)
            _require(self.topk_method in TOPK_METHODS, p + "topk_method",
                     f"{self.topk_method!r} (supported: {', '.join(TOPK_METHODS)})")
            _require(self.scoring_func in SCORING_FUNCS, p + "scoring_func",
                     f"{self.scoring_func!r} (supported: {', '.join(SCORING_FUNCS)})")
            _require(self.num_experts_per_tok <= self.n_routed_experts, p + "num_experts_per_tok",
                     f"{self.num_experts_per_tok} > n_routed_experts {self.n_routed_experts}")
            _require(self.routed_scaling_factor > 0, p + "routed_scaling_factor",
                     f"{self.routed_scaling_factor!r}")
            if self.n_shared_experts is not None:
                _require(isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0,
                         p + "n_shared_experts", f"{self.n_shared_experts!r}")
            if self.topk_method != "greedy":
                _positive_int(self.n_group, p + "n_group")
                _positive_int(self.topk_group, p + "topk_group")
                _require(self.n_routed_experts % self.n_group == 0, p + "n_group",
                         f"{self.n_group} does not divide n_routed_experts {self.n_routed_experts}")
                _require(self.topk_group <= self.n_group, p + "topk_group", f"{self.topk_group} > n_group")
                per_group = self.n_routed_experts // self.n_group
                _require(self.topk_method != "noaux_tc" or per_group >= 2, p + "n_group",
                         "noaux_tc needs at least two experts per group")
        if self.rope_scaling is not None:
            _require(isinstance(self.rope_scaling, dict), p + "rope_scaling", "expected an object or null")
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            _require(kind in ROPE_SCALING_TYPES, p + "rope_scaling.type",
                     f"{kind!r} (supported: {', '.join(ROPE_SCALING_TYPES)})")
            factor = self.rope_scaling.get("factor")
            _require(isinstance(factor, int | float) and factor >= 1, p + "rope_scaling.factor",
                     f"expected a number >= 1, got {factor!r}")

    # -- derived sizes -------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """MHA head size (hidden / heads)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def q_head_dim(self) -> int:
        """MLA query/key head size: the non-rotary part plus the rotary part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.use_mla else self.head_dim

    @property
    def rope_scaling_type(self) -> str | None:
        if self.rope_scaling is None:
            return None
        return self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))

    @property
    def softmax_scale(self) -> float:
        """Attention score scale; with YaRN and `mscale_all_dim` the reference multiplies by mscale^2."""
        if not self.use_mla:
            return self.head_dim**-0.5
        scale = self.q_head_dim**-0.5
        if self.rope_scaling_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = yarn_mscale(self.rope_scaling["factor"], mscale_all_dim)
                scale = scale * m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts is not None and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature factor (DeepSeek-V2 `yarn_get_mscale`)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The whole DeepSeek-VL2 model: vision tower, projector, language model and the tile layout."""

    vision: VisionConfig
    projector: ProjectorConfig
    language: LanguageConfig
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: tuple[tuple[int, int], ...] = ((384, 384),)

    def __post_init__(self) -> None:
        _require(self.tile_tag == "2D", "tile_tag", f"{self.tile_tag!r} (supported: 2D)")
        _require(self.global_view_pos in GLOBAL_VIEW_POS, "global_view_pos",
                 f"{self.global_view_pos!r} (supported: head, tail)")
        _require(self.projector.input_dim == self.vision.width, "projector_config.input_dim",
                 f"{self.projector.input_dim} != vision width {self.vision.width}")
        _require(self.projector.n_embed == self.language.hidden_size, "projector_config.n_embed",
                 f"{self.projector.n_embed} != language hidden_size {self.language.hidden_size}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        if not isinstance(raw, dict):
            raise ConfigError("config.json: expected a JSON object")
        for key in ("vision_config", "projector_config", "language_config"):
            if key not in raw:
                raise ConfigError(f"config.json has no {key!r}: not a DeepSeek-VL2 checkpoint")
        top = {k: raw[k] for k in ("tile_tag", "global_view_pos") if k in raw}
        if "tile_tag" not in top:
            raise ConfigError("unsupported value for tile_tag: missing (the reference default "
                              "'tile_tag' cannot be built; set \"2D\")")
        if "candidate_resolutions" in raw:
            try:
                top["candidate_resolutions"] = tuple((int(w), int(h)) for w, h in raw["candidate_resolutions"])
            except (TypeError, ValueError):
                raise ConfigError("unsupported value for candidate_resolutions: expected [[w, h], ...]") from None
        return cls(
            vision=_from_dict(VisionConfig, raw["vision_config"], "vision_config"),
            projector=_from_dict(ProjectorConfig, raw["projector_config"], "projector_config"),
            language=_from_dict(LanguageConfig, raw["language_config"], "language_config"),
            **top,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"{file}: no such file (a model directory needs config.json)")
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{file}: cannot read JSON: {e}") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None
