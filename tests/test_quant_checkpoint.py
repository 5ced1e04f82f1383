"""Quantised checkpoints: `dsvl2 quantize`'s output loads strictly and gives the same model as quantising while
loading; a corrupt or mismatched one is one clear error before any page; the scheme reaches the runtime's
identity (and so every record), from --quantize or from the checkpoint itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fakes import isolate, make_image
from parity import checkpoint_dir
from safetensors.torch import load_file, save_file

import dsvl2
from dsvl2 import backend, quantize_cmd
from dsvl2.model import quant_kernels
from dsvl2.model.errors import ConfigError, WeightsError
from dsvl2.model.quant import QuantLinear, Scheme, describe_paths, pack_nibbles, quantize
from dsvl2.model.quant_checkpoint import CONFIG_KEY, quantize_stored, write_quantized
from dsvl2.model.weights import checkpoint_files, load_model, read_headers

SOURCE = checkpoint_dir("base-noaux")  # two shards, MLA with q_lora, noaux_tc routing


@pytest.fixture(scope="module", params=["int8", "int4"])
def written(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("q") / f"base-{request.param}"
    write_quantized(SOURCE, out, Scheme.named(request.param), shard_bytes=300_000)
    return request.param, out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantising_a_block_of_rows_at_a_time_equals_the_whole_weight(scheme, dtype, monkeypatch):
    """Catches a block boundary that drops, repeats or misplaces rows (where the quantised kernels are not
    available, the loader and `dsvl2 quantize` quantise large weights in blocks so their float32 temporaries stay
    small), in either stored layout and as the values the loader packs into the runtime layout."""
    monkeypatch.setattr(quant_kernels, "available", lambda *a: False)  # torch's blocks, not the library's op
    sch = Scheme.named(scheme)
    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(3)).to(dtype)
    q, s = quantize(w, sch)
    want = q if sch.bits == 8 else pack_nibbles(q)
    for chunk_bytes in (1, 4 * 96 * 5, 2**30):  # one row per block, 5 rows (a short last block), one block
        got_q, got_s = quantize_stored(w, sch, chunk_bytes=chunk_bytes)
        assert torch.equal(got_q, want) and torch.equal(got_s, s)
        values, got_s = quantize_stored(w, sch, chunk_bytes=chunk_bytes, values=True)  # what the loader packs
        assert torch.equal(values, q) and torch.equal(got_s, s)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.language.logits(model.language(model.language.embed(ids)))


def test_a_written_checkpoint_loads_as_quantising_while_loading(written):
    """Catches a layout written one way and read another (nibble order, scales, shards, renames)."""
    name, out = written
    config = json.loads((out / "config.json").read_text())
    assert config[CONFIG_KEY]["bits"] == int(name[3:]) and config[CONFIG_KEY]["quant_method"] == "dsvl2"
    assert len(checkpoint_files(out)) > 1 and (out / "tokenizer.json").is_file()
    found, _ = read_headers(checkpoint_files(out))
    q = found["language.model.layers.1.mlp.experts.0.down_proj.qweight"]
    assert q.dtype == ("I8" if name == "int8" else "U8")
    assert "language.lm_head.scales" in found and "language.lm_head.weight" not in found
    assert "language.model.layers.0.self_attn.kv_b_proj.weight" in found  # kept float: the absorbed decode reads it
    assert "vision.blocks.0.mlp.fc1.weight" in found  # the vision tower is not quantised
    stored, on_load = load_model(out), load_model(SOURCE, quantize=name)
    assert isinstance(stored.language.lm_head, QuantLinear)
    ids = torch.randint(3, 1400, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(stored, ids), _logits(on_load, ids))
    assert load_model(out, quantize=name) is not None  # naming its own scheme is fine


def test_another_scheme_than_the_checkpoints_is_an_error_naming_both(written):
    name, out = written
    other = "int4" if name == "int8" else "int8"
    with pytest.raises(ConfigError, match=f"{name} checkpoint.*--quantize {other}"):
        load_model(out, quantize=other)
    with pytest.raises(ConfigError, match=f"{name} checkpoint.*--quantize {other}"):
        backend.identify(str(out), device="cpu", quantize=other)
    with pytest.raises(WeightsError, match="already quantised"):
        write_quantized(out, out.parent / f"again-{name}", Scheme.named(other))


def _copy(out: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(out, tmp_path / "copy"))


def _edit_tensors(directory: Path, edit) -> None:
    for file in checkpoint_files(directory):
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})


def test_scales_of_the_wrong_shape_or_missing_are_one_error(written, tmp_path):
    _, out = written
    bad = _copy(out, tmp_path)
    key = "language.model.layers.1.mlp.shared_experts.up_proj.scales"

    def damage(t):
        if key in t:
            t[key] = t[key][:-1].contiguous()
        t.pop("language.lm_head.scales", None)

    _edit_tensors(bad, damage)
    with pytest.raises(WeightsError) as e:
        load_model(bad)
    message = str(e.value)
    assert "\n" not in message and "missing (1): language.lm_head.scales" in message
    assert f"misshaped (1): {key}" in message


def test_a_float_qweight_is_a_wrong_dtype(written, tmp_path):
    _, out = written
    bad = _copy(out, tmp_path)
    key = "language.lm_head.qweight"
    _edit_tensors(bad, lambda t: t.update({key: t[key].float()}) if key in t else None)
    with pytest.raises(WeightsError, match=f"wrong dtype \\(1\\): {key} \\(F32\\)"):
        load_model(bad)


@pytest.mark.parametrize(("entry", "key"), [({"bits": 3}, "bits"), ({"bits": 4, "group_size": None}, "group_size"),
                                            ({"quant_method": "gptq"}, "quant_method")])
def test_an_unsupported_scheme_is_a_config_error_naming_the_key(written, tmp_path, entry, key):
    _, out = written
    bad = _copy(out, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config[CONFIG_KEY] |= entry
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"{CONFIG_KEY}.*{key}"):
        load_model(bad)
    with pytest.raises(ConfigError, match=key):
        backend.identify(str(bad), device="cpu")


def test_the_identity_names_the_scheme_with_or_without_quantize(written):
    name, out = written
    assert backend.identify(str(out), device="cpu").quantize == name
    assert backend.identify(str(SOURCE), device="cpu").quantize == "none"
    assert backend.identify(str(SOURCE), device="cpu", quantize="int4").quantize == "int4"


def test_the_quantize_command(tmp_path, capsys):
    out = tmp_path / "tiny-int8"
    assert quantize_cmd.quantize(model=str(checkpoint_dir("tiny-mha")), out=out, bits=8) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "config.json").read_text())[CONFIG_KEY]["bits"] == 8
    assert quantize_cmd.quantize(model=str(checkpoint_dir("tiny-mha")), out=tmp_path / "x", bits=5) == 2
    assert "bits" in capsys.readouterr().err
    assert quantize_cmd.quantize(model=str(out), out=tmp_path / "y", bits=4) == 2  # already quantised
    assert "already quantised" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_quantize_command_says_when_it_builds_the_kernels(tmp_path, capsys, monkeypatch):
    """The writer quantises with the library, so a machine's first `dsvl2 quantize` builds it: one stderr line says
    so before the build (a build is simulated by calling the hook the library calls before its compiler starts);
    a run that finds the build cached says nothing of it."""
    real = quant_kernels.available
    asked = []

    def first_run(on_build_start=None):
        asked.append(on_build_start)
        if on_build_start is not None:
            on_build_start()
        return real()

    monkeypatch.setattr(quant_kernels, "available", first_run)
    assert quantize_cmd.quantize(model=str(checkpoint_dir("tiny-mha")), out=tmp_path / "a", bits=4) == 0
    assert asked and asked[0] is not None
    assert "building the CPU kernels (first run only)" in capsys.readouterr().err
    monkeypatch.setattr(quant_kernels, "available", real)
    assert quantize_cmd.quantize(model=str(checkpoint_dir("tiny-mha")), out=tmp_path / "b", bits=4) == 0
    assert "building" not in capsys.readouterr().err


def test_api_records_say_how_the_model_was_quantised(monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)
    runtime = dsvl2.load(str(checkpoint_dir("tiny-mha")), device="cpu", quantize="int8", batch_size=2)
    assert runtime.identity.quantize == "int8" and "int8 weights" in repr(runtime)
    make_image(tmp_path / "page.png")
    (record,) = list(dsvl2.ocr(tmp_path / "page.png", runtime=runtime, max_new_tokens=3))
    assert record["status"] != "error", record["error"]
    assert record["settings"]["quantize"] == "int8"


def test_the_cli_reports_what_the_quantised_products_run(monkeypatch, tmp_path):
    """Catches a quantised run whose -v and manifest are silent about the quantised kernels (built, loaded, failed)
    and about what the products run: the decode and prefill implementations and the weights' layout."""
    from fakes import invoke

    from dsvl2.model import quant_kernels

    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "page.png")
    result = invoke("ocr", "page.png", "--model", str(checkpoint_dir("tiny-mha")), "--device", "cpu", "--quantize",
                    "int8", "--max-new-tokens", "2", "-o", "out/", "-v")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "ocr.manifest.json").read_text())
    quant = manifest["runtime"]["quant_kernels"]
    assert quant["state"] == quant_kernels.status().state
    families = quant["paths"]["families"]
    assert quant["paths"]["scheme"] == "int8" and set(families) == {"experts", "dense"}
    assert all(p["layout"] in ("plain", "r4") for p in families.values())
    line = "int8 products: " + "; ".join(f"{family} decode {p['decode']}, prefill {p['prefill']}, {p['layout']} layout"
                                         for family, p in families.items())
    assert line == describe_paths(quant["paths"])
    assert line in result.stderr.splitlines(), result.stderr
