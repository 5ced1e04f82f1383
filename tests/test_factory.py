"""model/factory.py: random checkpoints that load strictly, run, and are reproducible byte for byte.

Configs: the three real configs shrunk to toy sizes (same keys and switches as the real files), variants that
turn on the code paths the parity fixtures do not cover (group_limited_greedy, moe_layer_freq 2, YaRN, GQA,
global_view_pos tail, a depth-3 projector), and every parity checkpoint's config, whose files the factory's
output must match key for key and shape for shape.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parity import REPO_ROOT, checkpoint_dir, checkpoint_names, require
from safetensors import safe_open
from safetensors.torch import load_file

from dsvl2.model.errors import ConfigError
from dsvl2.model.factory import Init, random_tensor, split_shards, write_random_checkpoint
from dsvl2.model.language import MLP, MoE
from dsvl2.model.weights import INDEX_FILE, SINGLE_FILE, checkpoint_files, load_model, read_headers

REAL_CONFIGS = REPO_ROOT / "tests" / "data" / "configs"
IMAGE_TOKENS = 14 * 15 + 1 + 14 * 15  # one image, one 384x384 local tile (tw = th = 1)


def shrunk(name: str) -> dict:
    """The real config `name` with toy sizes: every switch and unused field of the real file kept."""
    cfg = json.loads((REAL_CONFIGS / name / "config.json").read_text(encoding="utf-8"))
    cfg["vision_config"].update(width=64, layers=2, heads=4)
    cfg["projector_config"].update(n_embed=64, input_dim=64)
    lang = cfg["language_config"]
    lang.update(vocab_size=1536, hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                num_experts_per_tok=3)
    if lang.get("use_mla", True):
        lang.update(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        if lang.get("q_lora_rank") is not None:
            lang["q_lora_rank"] = 48
    return cfg


def variant(name: str, **changes: dict) -> dict:
    """shrunk(name) with some sections updated: variant(..., language_config={...}, top={...})."""
    cfg = shrunk(name)
    for section, values in changes.items():
        (cfg if section == "top" else cfg[section]).update(values)
    return cfg


CONFIGS = {
    "real-tiny": shrunk("deepseek-vl2-tiny"),
    "real-small": shrunk("deepseek-vl2-small"),
    "real-base": shrunk("deepseek-vl2"),
    "group-limited": variant("deepseek-vl2-small", language_config={
        "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
    "moe-every-2": variant("deepseek-vl2-tiny", language_config={
        "moe_layer_freq": 2, "first_k_dense_replace": 0, "num_hidden_layers": 4}),
    "yarn": variant("deepseek-vl2", language_config={"rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}, "n_group": 4, "topk_group": 2}),
    "gqa-tail": variant("deepseek-vl2-tiny", language_config={"num_key_value_heads": 2},
                        top={"global_view_pos": "tail"}),
    "projector-depth-3": variant("deepseek-vl2-small", projector_config={"depth": 3}),
}


def image_inputs(vocab: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(ids, images_seq_mask, tiles, crops) for one row: bos, one image block, a few text tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (1, 1 + IMAGE_TOKENS + 6), generator=g)
    ids[0, 0] = 0
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 1 : 1 + IMAGE_TOKENS] = True
    tiles = torch.rand(2, 3, 384, 384, generator=g) * 2 - 1  # global view + one local tile
    return ids, mask, tiles, torch.tensor([[[1, 1]]])


def expert_sets(model, embeds: torch.Tensor) -> list[int]:
    """Per MoE layer, how many distinct expert sets the tokens of `embeds` (1, T, E) choose."""
    lm = model.language
    positions = torch.arange(embeds.shape[1])[None]
    counts, x = [], embeds
    for layer in lm.model.layers:
        if isinstance(layer.mlp, MoE):
            h = layer.input_layernorm(x)
            h = x + layer.self_attn(h, positions, None, layer.index)
            ids, _ = layer.mlp.gate(layer.post_attention_layernorm(h)[0])
            counts.append(len({tuple(sorted(r)) for r in ids.tolist()}))
        x, delta = layer(x, positions, None)  # the residual stream and the feed-forward output not yet added
        x = x + delta
    return counts


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpoint_loads_strictly_and_runs(tmp_path, name):
    """Catches key names or shapes that drift between the factory and the model, and scales that blow up or
    collapse activations (non-finite or flat logits, every token routed to the same experts)."""
    config = CONFIGS[name]
    out = write_random_checkpoint(config, tmp_path / name, dtype=torch.float32)
    model = load_model(out)
    lang = config["language_config"]
    for i, layer in enumerate(model.language.model.layers):
        moe = i >= lang["first_k_dense_replace"] and i % lang.get("moe_layer_freq", 1) == 0
        assert isinstance(layer.mlp, MoE if moe else MLP), f"layer {i}"
    ids, mask, tiles, crops = image_inputs(lang["vocab_size"])
    with torch.no_grad():
        embeds = model.embed(ids, mask, tiles, crops)
        logits = model.language.logits(model.language(embeds))
        text_logits = model.language.logits(model.language(model.language.embed(ids[:, -8:])))
        sets = expert_sets(model, embeds)
    assert torch.isfinite(logits).all() and torch.isfinite(text_logits).all()
    assert 0.3 < logits.std().item() < 10, f"logit std {logits.std().item()}"
    assert all(n > 1 for n in sets), f"distinct expert sets per MoE layer: {sets}"


@pytest.mark.parametrize("name", require(checkpoint_names(), "parity checkpoints"))
def test_layout_matches_parity_checkpoint(tmp_path, name):
    """The factory's files have exactly the reference checkpoint's keys and shapes (incl. attn_pool and the
    misspelt view_seperator) and load."""
    source = checkpoint_dir(name)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    out = write_random_checkpoint(config, tmp_path / name, dtype=torch.float32, tokenizer_dir=source)
    ours = {k: t.shape for k, t in read_headers(checkpoint_files(out))[0].items()}
    theirs = {k: t.shape for k, t in read_headers(checkpoint_files(source))[0].items()}
    assert ours == theirs
    assert "view_seperator" in ours and any(k.startswith("vision.attn_pool.") for k in ours)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json"):
        assert (out / file).read_bytes() == (source / file).read_bytes(), file
    written = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert written == config  # parity configs are float32 already
    load_model(out)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    """Catches nondeterminism (global RNG, dict order, timestamps) and a seed that is ignored."""
    config = CONFIGS["real-base"]
    a = file_bytes(write_random_checkpoint(config, tmp_path / "a", seed=7))
    b = file_bytes(write_random_checkpoint(config, tmp_path / "b", seed=7))
    c = write_random_checkpoint(config, tmp_path / "c", seed=8)
    assert a == b
    assert file_bytes(c)["config.json"] == a["config.json"]
    assert file_bytes(c)[SINGLE_FILE] != a[SINGLE_FILE]
    other = load_file(c / SINGLE_FILE)
    same = [k for k, t in load_file(tmp_path / "a" / SINGLE_FILE).items() if torch.equal(t, other[k])]
    assert not same, f"tensors unchanged by the seed: {same}"


def test_sharding_changes_files_not_tensors(tmp_path):
    """Catches per-tensor values that depend on the shard size or the write order, and a wrong index."""
    config = CONFIGS["real-small"]
    single = write_random_checkpoint(config, tmp_path / "single")
    sharded = write_random_checkpoint(config, tmp_path / "sharded", shard_bytes=200_000)
    assert sorted(p.name for p in single.iterdir()) == ["config.json", SINGLE_FILE]
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (sharded / SINGLE_FILE).exists()
    index = json.loads((sharded / INDEX_FILE).read_text(encoding="utf-8"))
    reference = load_file(single / SINGLE_FILE)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())
    assert set(index["weight_map"]) == set(reference)
    for shard in shards:
        with safe_open(sharded / shard, framework="pt") as f:
            keys = list(f.keys())
            assert all(index["weight_map"][k] == shard for k in keys)
            for k in keys:
                assert torch.equal(f.get_tensor(k), reference[k]), k
    a, b = load_model(single).state_dict(), load_model(sharded).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_checkpoint(tmp_path):
    out = write_random_checkpoint(CONFIGS["real-tiny"], tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / SINGLE_FILE).values()} == {torch.bfloat16}
    model = load_model(out, dtype=torch.bfloat16)
    ids = torch.arange(2, 12)[None]
    with torch.no_grad():
        assert torch.isfinite(model.language.logits(model.language(model.language.embed(ids)))).all()


def test_random_tensor_depends_only_on_seed_and_key():
    init = Init(0.0, 1.0)
    a = random_tensor("x.weight", (4, 5), init, seed=1, dtype=torch.float32)
    random_tensor("y.weight", (100,), init, seed=1, dtype=torch.float32)
    assert torch.equal(a, random_tensor("x.weight", (4, 5), init, seed=1, dtype=torch.float32))
    assert not torch.equal(a, random_tensor("y.weight", (4, 5), init, seed=1, dtype=torch.float32))
    assert not torch.equal(a, random_tensor("x.weight", (4, 5), init, seed=2, dtype=torch.float32))


def test_split_shards():
    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 1), ("e", 1)]
    assert split_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert split_shards(sizes, 100) == [["a", "b", "c", "d", "e"]]


def test_output_is_atomic_and_input_untouched(tmp_path):
    """An existing directory is never overwritten, a failed write leaves nothing behind, the caller's dict
    is not modified."""
    config = CONFIGS["real-tiny"]
    before = copy.deepcopy(config)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_random_checkpoint(config, occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]

    bad = copy.deepcopy(config)
    bad["language_config"]["topk_method"] = "gready"
    with pytest.raises(ConfigError, match="topk_method"):
        write_random_checkpoint(bad, tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_random_checkpoint(config, empty) == empty
    assert (empty / SINGLE_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "occupied"]
    assert config == before


def test_cli_prints_only_the_path(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(CONFIGS["real-tiny"]), encoding="utf-8")
    out = tmp_path / "cli"
    run = subprocess.run(
        [sys.executable, "-m", "dsvl2.model.factory", "--config", str(config_file), "--out", str(out),
         "--seed", "3", "--dtype", "float32", "--shard-gb", "0.0002"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    assert run.stdout == f"{out}\n"
    assert (out / INDEX_FILE).is_file()
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["torch_dtype"] == "float32"
