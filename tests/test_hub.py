"""model/hub.py: local directories, repo ids through a fake Hugging Face cache, offline mode and the errors.

The cache is built in tmp_path with the real layout (models--owner--name/{refs,snapshots,blobs}) around a tiny
checkpoint. No test touches the network: the Hub endpoint points at a local port that refuses connections,
and the cases that need other failures patch huggingface_hub's API call to raise them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants, errors
from huggingface_hub.hf_api import HfApi

from dsvl2.model import hub
from dsvl2.model.errors import ModelNotFoundError
from dsvl2.model.hub import CachedModel, download_model, list_cached_models, resolve_model

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO = "deepseek-ai/deepseek-vl2-tiny"
MAIN = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"
CHECKPOINT_FILES = (
    "config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
)


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint directory: the parity tiny-mha files, or (without the parity set) the assembled
    Tiny config with a one-tensor safetensors file, which is all resolving a model needs."""
    parity = Path(os.environ.get("DSVL2_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity"))
    source = parity / "checkpoints" / "tiny-mha"
    if all((source / name).is_file() for name in CHECKPOINT_FILES):
        return source
    out = tmp_path_factory.mktemp("tiny-checkpoint")
    configs = REPO_ROOT / "tests" / "data" / "configs" / "deepseek-vl2-tiny"
    for name in CHECKPOINT_FILES[:-1]:
        src = configs / name
        (out / name).write_bytes(src.read_bytes() if src.is_file() else b"{}")
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (out / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    return out


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """HOME, HF_HOME and tokens in tmp_path; online mode; the Hub endpoint a local port that refuses."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for var in (
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "XDG_CACHE_HOME",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_ENDPOINT",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # huggingface_hub reads these at import time, so the environment alone does not isolate it.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"), raising=False)
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"), raising=False)
    # A bound socket that never listens: connecting to it is refused at once, so nothing can hang.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        yield


@pytest.fixture
def cache(tmp_path, checkpoint) -> Path:
    """A cache holding REPO at MAIN (symlinks into blobs, ref main) and OLD (plain files, tag v1.0)."""
    root = tmp_path / "hub-cache"
    add_snapshot(root, REPO, MAIN, checkpoint, refs=("main",), symlinks=True)
    add_snapshot(root, REPO, OLD, checkpoint, refs=("v1.0",), symlinks=False)
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if huggingface_hub asks the Hub anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(HfApi, "repo_info", refuse)
    monkeypatch.setattr(HfApi, "list_repo_tree", refuse)


def add_snapshot(
    cache: Path, repo_id: str, commit: str, src: Path, *, refs=(), symlinks=True, files=CHECKPOINT_FILES
) -> Path:
    """Lay `src`'s files out as huggingface_hub does: blobs named by content hash, snapshot links to them."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        if not symlinks:
            shutil.copyfile(src / name, snapshot / name)
            continue
        data = (src / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def snapshot_of(cache: Path, commit: str, repo_id: str = REPO) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit


def raise_from_repo_info(monkeypatch, exc: Exception) -> None:
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(HfApi, "repo_info", fail)


def http_error(cls, status: int, message: str = "error"):
    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}")
    return cls(message, response=httpx2.Response(status, request=request))


def message_of(excinfo) -> str:
    """The error's message, which the CLI prints as its only line."""
    text = str(excinfo.value)
    assert "\n" not in text, f"message spans lines: {text!r}"
    assert "Traceback" not in text
    return text


def assert_says_what_to_do(text: str) -> None:
    for hint in (f"dsvl2 models download {REPO}", f"download {REPO}", "--model", "HF_HUB_CACHE", "HF_HOME"):
        assert hint in text, f"{hint!r} missing from: {text}"


# --- local directories -------------------------------------------------------------------------------------


def test_local_directory_is_returned_as_is(checkpoint, no_network):
    assert resolve_model(str(checkpoint)) == checkpoint


def test_relative_local_directory_wins_over_a_repo_id_of_the_same_name(tmp_path, checkpoint, monkeypatch):
    shutil.copytree(checkpoint, tmp_path / "deepseek-ai" / "deepseek-vl2-tiny")
    monkeypatch.chdir(tmp_path)
    assert resolve_model(REPO) == Path(REPO)


def test_local_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(str(tmp_path))
    text = message_of(excinfo)
    assert str(tmp_path) in text and "config.json" in text


@pytest.mark.parametrize("arg", ["/nonexistent/tiny", "./checkpoints/tiny", "../tiny", "~/no-such-model", "a/b/c"])
def test_missing_path_is_not_looked_up_on_the_hub(arg, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub lookup"))
    with pytest.raises(ModelNotFoundError, match="no such directory") as excinfo:
        resolve_model(arg)
    assert arg in message_of(excinfo)


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="is a file, not a directory"):
        resolve_model(str(tmp_path / "config.json"))


@pytest.mark.parametrize("arg", ["deepseek-vl2-tiny", "owner/bad--name", "owner/-name", "owner/name.git", ""])
def test_argument_that_is_neither_directory_nor_repo_id(arg):
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(arg)
    assert "owner/name" in message_of(excinfo) or "empty" in str(excinfo.value)


def test_revision_with_a_local_directory_is_refused(checkpoint):
    with pytest.raises(ModelNotFoundError, match="--revision"):
        resolve_model(str(checkpoint), revision="main")


# --- repo ids from the cache -------------------------------------------------------------------------------


def test_repo_id_resolves_from_cache_offline(cache, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    path = resolve_model(REPO)
    assert path == snapshot_of(cache, MAIN)
    assert json.loads((path / "config.json").read_text())["model_type"] == "deepseek_vl_v2"
    assert (path / "model.safetensors").stat().st_size > 0  # the symlink reaches its blob


def test_cache_dir_argument_and_hf_home_locate_the_cache(cache, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(REPO, cache_dir=cache) == snapshot_of(cache, MAIN)
    hf_home = tmp_path / "elsewhere"
    hf_home.mkdir()
    shutil.copytree(cache, hf_home / "hub", symlinks=True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    assert resolve_model(REPO) == snapshot_of(hf_home / "hub", MAIN)


@pytest.mark.parametrize(("revision", "commit"), [(MAIN, MAIN), (OLD, OLD), ("main", MAIN), ("v1.0", OLD)])
def test_revision_by_commit_hash_and_by_ref_name(cache, monkeypatch, no_network, revision, commit):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(REPO, revision=revision, cache_dir=cache) == snapshot_of(cache, commit)


def test_revision_not_in_cache_offline_names_what_is_cached(cache, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(REPO, revision="v2.0", cache_dir=cache)
    text = message_of(excinfo)
    assert "v2.0" in text and "main -> 0123456" in text and "HF_HUB_OFFLINE" in text
    assert_says_what_to_do(text)


def test_cached_snapshot_without_config_json(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "c"
    add_snapshot(cache, REPO, MAIN, checkpoint, refs=("main",), files=("model.safetensors",))
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(REPO, cache_dir=cache)
    assert str(snapshot_of(cache, MAIN)) in message_of(excinfo) and "config.json" in str(excinfo.value)


def test_not_cached_offline(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(REPO)
    text = message_of(excinfo)
    assert REPO in text and "HF_HUB_OFFLINE=1" in text and str(tmp_path / "hf_home" / "hub") in text
    assert_says_what_to_do(text)


# --- the Hub cannot be reached -----------------------------------------------------------------------------


def test_not_cached_and_hub_refuses_connections(tmp_path):
    """The real network path: huggingface_hub connects to the (refusing) endpoint and gives up."""
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(REPO, cache_dir=tmp_path / "empty-cache")
    text = message_of(excinfo)
    assert "cannot be reached" in text and "ConnectError" in text and REPO in text
    assert_says_what_to_do(text)


@pytest.mark.parametrize(
    "exc",
    [
        httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"),
        httpx2.ConnectTimeout("timed out"),
        httpx2.ProxyError("407 Proxy Authentication Required"),
        http_error(errors.HfHubHTTPError, 503, "Service Unavailable"),
    ],
    ids=["dns", "timeout", "proxy", "hub-down"],
)
def test_not_cached_and_hub_unreachable_in_other_ways(tmp_path, monkeypatch, exc):
    raise_from_repo_info(monkeypatch, exc)
    with pytest.raises(ModelNotFoundError) as excinfo:
        download_model(REPO, cache_dir=tmp_path / "empty-cache")
    text = message_of(excinfo)
    assert "cannot be reached" in text and type(exc).__name__ in text
    assert_says_what_to_do(text)


def test_cached_model_is_used_when_the_hub_cannot_be_reached(cache):
    assert resolve_model(REPO, cache_dir=cache) == snapshot_of(cache, MAIN)
    assert resolve_model(REPO, revision="v1.0", cache_dir=cache) == snapshot_of(cache, OLD)


def test_connection_lost_during_download_falls_back_to_cache(cache, tmp_path, monkeypatch):
    real = huggingface_hub.snapshot_download
    calls = []

    def flaky(repo_id, **kwargs):
        calls.append(kwargs["local_files_only"])
        if not kwargs["local_files_only"]:
            raise httpx2.ReadTimeout("read timed out")
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", flaky)
    assert resolve_model(REPO, cache_dir=cache) == snapshot_of(cache, MAIN)
    assert calls == [False, True]
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model("owner/uncached", cache_dir=cache)
    assert "cannot be reached (ReadTimeout: read timed out)" in message_of(excinfo)


# --- errors the Hub answers with ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (http_error(errors.RepositoryNotFoundError, 404), ["not found on the Hugging Face Hub", "HF_TOKEN"]),
        (http_error(errors.GatedRepoError, 403), ["gated", f"huggingface.co/{REPO}", "hf auth login"]),
        (http_error(errors.HfHubHTTPError, 401), ["401 Unauthorized", "HF_TOKEN"]),
        (http_error(errors.RevisionNotFoundError, 404), ["revision v9 does not exist", "branch, tag"]),
    ],
    ids=["repo-not-found", "gated", "unauthorized", "revision-not-found"],
)
def test_hub_errors_have_their_own_messages(tmp_path, monkeypatch, exc, expected):
    raise_from_repo_info(monkeypatch, exc)
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(REPO, revision="v9", cache_dir=tmp_path / "empty-cache")
    text = message_of(excinfo)
    assert REPO in text
    for part in expected:
        assert part in text, f"{part!r} missing from: {text}"
    assert "cannot be reached" not in text


def test_unwritable_cache_says_where_to_point_it(monkeypatch):
    def denied(repo_id, **kwargs):
        raise PermissionError(13, "Permission denied", "/cache/models--x")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", denied)
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(REPO)
    assert "cannot write" in message_of(excinfo) and "writable" in str(excinfo.value)


def test_unexpected_errors_are_not_disguised(monkeypatch):
    """A bug (not a hub or disk failure) keeps its own type and traceback."""
    bug = RuntimeError("bug")

    def broken(repo_id, **kwargs):
        raise bug

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(RuntimeError) as excinfo:
        resolve_model(REPO)
    assert excinfo.value is bug and excinfo.value.__cause__ is None


# --- download_model ----------------------------------------------------------------------------------------


def test_download_model_offline_returns_the_cached_snapshot(cache, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_model(REPO, cache_dir=cache) == snapshot_of(cache, MAIN)


def test_download_model_wants_a_repo_id(checkpoint):
    with pytest.raises(ModelNotFoundError, match="owner/name"):
        download_model(str(checkpoint))


def test_only_checkpoint_files_are_requested(tmp_path, monkeypatch):
    """Both entry points download the files the runtime reads and nothing else from the repo."""
    from huggingface_hub.utils import filter_repo_objects

    seen = []

    def record(repo_id, **kwargs):
        seen.append(kwargs)
        snapshot = tmp_path / "snap"
        snapshot.mkdir(exist_ok=True)
        (snapshot / "config.json").write_text("{}")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", record)
    resolve_model(REPO, revision="main")
    download_model(REPO, revision="main")
    repo_files = [
        "config.json", "processor_config.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "README.md", "pytorch_model.bin", "images/logo.png",
        "deepseek_vl2/models/modeling_deepseek.py", ".gitattributes",
    ]  # fmt: skip
    for kwargs in seen:
        assert kwargs["revision"] == "main"
        assert Path(kwargs["cache_dir"]) == tmp_path / "hf_home" / "hub"
        assert sorted(filter_repo_objects(repo_files, allow_patterns=kwargs["allow_patterns"])) == sorted(
            repo_files[:8]
        )
    assert len(seen) == 2


# --- list_cached_models ------------------------------------------------------------------------------------


def test_list_cached_models(cache, checkpoint, monkeypatch):
    detached = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    add_snapshot(cache, REPO, detached, checkpoint, files=("config.json",))
    add_snapshot(cache, "owner/other", MAIN, checkpoint, refs=("main",), files=("config.json",))
    pr = cache / "models--deepseek-ai--deepseek-vl2-tiny" / "refs" / "refs" / "pr" / "1"
    pr.parent.mkdir(parents=True)
    pr.write_text(MAIN)
    dataset = cache / "datasets--owner--data" / "snapshots" / MAIN
    dataset.mkdir(parents=True)
    (dataset / "data.csv").write_text("a,b\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    models = list_cached_models()

    full = sum((checkpoint / name).stat().st_size for name in CHECKPOINT_FILES)
    config = (checkpoint / "config.json").stat().st_size
    assert models == [
        CachedModel(REPO, MAIN, ("main", "refs/pr/1"), full, snapshot_of(cache, MAIN)),
        CachedModel(REPO, OLD, ("v1.0",), full, snapshot_of(cache, OLD)),
        CachedModel(REPO, detached, (), config, snapshot_of(cache, detached)),
        CachedModel("owner/other", MAIN, ("main",), config, snapshot_of(cache, MAIN, "owner/other")),
    ]
    assert list_cached_models(cache) == models


def test_list_cached_models_without_a_cache(tmp_path):
    assert list_cached_models() == []
    assert list_cached_models(tmp_path / "missing") == []


def test_cached_model_is_a_frozen_value(tmp_path):
    model = CachedModel(REPO, MAIN, ("main",), 1, tmp_path)
    with pytest.raises(AttributeError):
        model.size_bytes = 2  # type: ignore[misc]
    assert not hasattr(model, "__dict__")


# --- module contract ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}, "/a"),
        ({"HUGGINGFACE_HUB_CACHE": "/c", "HF_HOME": "/b"}, "/c"),
        ({"HF_HOME": "/b", "XDG_CACHE_HOME": "/x"}, "/b/hub"),
        ({"XDG_CACHE_HOME": "/x"}, "/x/huggingface/hub"),
    ],
)
def test_cache_location_follows_the_environment_at_call_time(monkeypatch, env, expected):
    monkeypatch.delenv("HF_HOME")
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert hub.hub_cache_dir() == Path(expected)


def test_importing_the_module_does_not_import_huggingface_hub():
    code = "import sys, model.hub; sys.exit('huggingface_hub' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0
