"""Where a model comes from: turn a `--model` argument into a local checkpoint directory.

A local directory is used as is (it must hold config.json). Anything else must be a Hugging Face repo id
(`owner/name`), resolved through huggingface_hub's cache: with `HF_HUB_OFFLINE=1` only the cache is read, and
when the Hub cannot be reached the cache is tried before giving up. Every failure is a `ModelNotFoundError`
whose one-line message says what to do. This module neither loads weights nor prints; huggingface_hub is
imported only when a repo id has to be resolved, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from dsvl2.model.errors import ConfigError, ModelNotFoundError

DEFAULT_MODEL = "deepseek-ai/deepseek-vl2-tiny"

# What the runtime reads from a checkpoint; everything else in a model repo (README, images, legacy .bin
# weights, the reference's Python code) is never downloaded.
ALLOW_PATTERNS = (
    "config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "*.safetensors",
    "model.safetensors.index.json",
)

# The Hub's naming rules for one side of `owner/name`: letters, digits, '-', '_', '.', starting and ending
# with a letter or digit, no '--' or '..', at most 96 characters.
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True, slots=True)
class CachedModel:
    """One revision of a model repo held in the Hugging Face cache."""

    repo_id: str
    revision: str  # the commit hash (the snapshot folder's name)
    refs: tuple[str, ...]  # branch / tag names pointing at it, e.g. ("main",); empty when detached
    size_bytes: int
    path: Path  # the snapshot directory, usable as a local model directory


def hub_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face hub cache this module reads and writes.

    Read from the environment at call time (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, in
    huggingface_hub's order of precedence) rather than from huggingface_hub's import-time constants, so a
    location set after import still counts.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if value := os.environ.get(var):
            return Path(os.path.expandvars(value)).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(home)).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE) forbids the network, read at call time."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def is_repo_id(text: str) -> bool:
    """True when `text` has the form of a Hugging Face repo id, `owner/name`."""
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(_REPO_PART.fullmatch(part) for part in parts)
        and "--" not in text
        and ".." not in text
        and not text.endswith(".git")
    )


def resolve_model(model: str, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local directory holding the checkpoint `model` names: a local directory, or a repo id.

    A repo id is looked up in the Hugging Face cache and downloaded when missing (config, processor and
    tokenizer JSON files and the safetensors weights only). `revision` (branch, tag or commit hash) applies
    to repo ids only. Raises `ModelNotFoundError` with a one-line, actionable message.
    """
    if not model or not model.strip():
        raise ModelNotFoundError(
            f"the model argument is empty; pass a local directory or a repo id such as {DEFAULT_MODEL}"
        )
    local = Path(model).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ModelNotFoundError(
                f"--revision {revision} applies to Hugging Face repo ids, but {model} is a "
                "local directory; drop --revision or pass a repo id"
            )
        return _checked_checkpoint(local)
    if local.exists():
        raise ModelNotFoundError(
            f"{model} is a file, not a directory: --model takes a directory holding "
            "config.json and the *.safetensors weights, or a Hugging Face repo id"
        )
    if _looks_like_path(model):
        raise ModelNotFoundError(
            f"no such directory: {model} (--model takes a local checkpoint directory or a "
            f"Hugging Face repo id such as {DEFAULT_MODEL})"
        )
    if not is_repo_id(model):
        raise ModelNotFoundError(
            f"{model!r} is neither a local directory nor a Hugging Face repo id of the "
            f"form owner/name (e.g. {DEFAULT_MODEL})"
        )
    return _fetch(model, revision=revision, cache_dir=cache_dir)


def download_model(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Download (or find already cached) the checkpoint files of `repo_id`; returns its snapshot directory.

    The same files and error messages as `resolve_model`; with HF_HUB_OFFLINE=1 only the cache is consulted.
    """
    if not is_repo_id(repo_id):
        raise ModelNotFoundError(
            f"{repo_id!r} is not a Hugging Face repo id of the form owner/name (e.g. {DEFAULT_MODEL})"
        )
    return _fetch(repo_id, revision=revision, cache_dir=cache_dir)


def list_cached_models(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """Every revision of every model repo in the Hugging Face cache, by repo id, referenced revisions first.

    A cache that does not exist yet holds no models. Repos the cache scanner finds corrupted are left out.
    """
    cache = hub_cache_dir(cache_dir)
    if not cache.exists():
        return []
    if not cache.is_dir():
        raise ModelNotFoundError(
            f"the Hugging Face cache location {cache} is a file, not a directory; set "
            "HF_HOME or HF_HUB_CACHE to a directory"
        )
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:  # removed between the check above and the scan
        return []
    models = [
        CachedModel(
            repo_id=repo.repo_id,
            revision=rev.commit_hash,
            refs=tuple(sorted(rev.refs)),
            size_bytes=rev.size_on_disk,
            path=Path(rev.snapshot_path),
        )
        for repo in info.repos
        if repo.repo_type == "model"
        for rev in repo.revisions
    ]
    return sorted(models, key=lambda m: (m.repo_id.lower(), not m.refs, m.revision))


# ---------------------------------------------------------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    """An argument that can only mean a filesystem path (so a missing one is never looked up on the Hub)."""
    return (
        text in (".", "..")
        or text.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in text
        or text.endswith("/")
        or text.count("/") > 1
        or (len(text) >= 2 and text[1] == ":" and text[0].isalpha())  # C:models
    )


def _checked_checkpoint(directory: Path) -> Path:
    config = directory / "config.json"
    if not config.exists():
        raise ModelNotFoundError(
            f"{directory} has no config.json: it is not a DeepSeek-VL2 checkpoint "
            "directory (expected config.json, tokenizer files and *.safetensors weights)"
        )
    if not config.is_file():
        raise ConfigError(f"{config} is not a regular file")
    return directory


def _fetch(repo_id: str, *, revision: str | None, cache_dir: str | Path | None) -> Path:
    cache = hub_cache_dir(cache_dir)
    offline = hub_offline()
    try:
        snapshot = _snapshot(repo_id, revision, cache, local_only=offline)
    except Exception as exc:
        cached = None if offline or not _is_network_error(exc) else _cached_snapshot(repo_id, revision, cache)
        if cached is None:
            error = _translate(exc, repo_id, revision, cache, offline=offline)
            if error is None:
                raise
            raise error from exc
        snapshot = cached
    return _checked_checkpoint(snapshot)


def _cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The cached snapshot, for when the Hub went away after the repo was found (huggingface_hub itself
    falls back to the cache only when its first request fails); None when the cache cannot serve it."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return _snapshot(repo_id, revision, cache, local_only=True)
    except LocalEntryNotFoundError:
        return None


def _snapshot(repo_id: str, revision: str | None, cache: Path, *, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        repo_id,
        revision=revision,
        cache_dir=cache,
        local_files_only=local_only,
        allow_patterns=list(ALLOW_PATTERNS),
    )
    return Path(path)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection / timeout error classes of whichever HTTP client huggingface_hub uses (it changed across
    versions: requests, httpx, httpx2). Only clients already imported can have raised, so none is imported."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        if (mod := sys.modules.get(module)) is not None:
            found.extend(cls for name in names if isinstance(cls := getattr(mod, name, None), type))
    return tuple(found)


def _is_network_error(exc: BaseException) -> bool:
    return isinstance(exc, _network_errors())


def _translate(
    exc: Exception, repo_id: str, revision: str | None, cache: Path, *, offline: bool
) -> ModelNotFoundError | None:
    """The user-facing error for an exception from huggingface_hub; None for one it does not know."""
    from huggingface_hub import errors

    rev = f" (revision {revision})" if revision else ""
    incomplete = getattr(errors, "IncompleteSnapshotError", None)
    disabled = getattr(errors, "DisabledRepoError", None)

    if incomplete is not None and isinstance(exc, incomplete):
        why = "HF_HUB_OFFLINE=1 forbids downloading the rest" if offline else "the Hub cannot be reached to complete it"
        return ModelNotFoundError(
            f"the cached copy of {repo_id}{rev} in {cache} is incomplete and {why}; " + _remedies(repo_id)
        )
    if isinstance(exc, errors.LocalEntryNotFoundError) or (not offline and _is_network_error(exc)):
        cause = exc.__cause__ if isinstance(exc, errors.LocalEntryNotFoundError) else exc
        if offline or isinstance(cause, errors.OfflineModeIsEnabled):
            why = "HF_HUB_OFFLINE=1 forbids downloading it"
        else:
            why = f"the Hugging Face Hub cannot be reached{_short(cause)}"
        cached = _cached_refs(cache, repo_id)
        if cached and revision is not None:
            what = (
                f"model {repo_id} is in the Hugging Face cache at {cache}, but not at revision {revision} "
                f"(cached: {cached}), and {why}"
            )
        else:
            what = f"model {repo_id}{rev} is not in the Hugging Face cache at {cache} and {why}"
        return ModelNotFoundError(f"{what}; " + _remedies(repo_id))
    if isinstance(exc, errors.RevisionNotFoundError):
        return ModelNotFoundError(
            f"revision {revision or 'main'} does not exist in {repo_id} on the Hugging Face "
            "Hub; pass a branch, tag or full commit hash that exists (the default is main)"
        )
    if isinstance(exc, errors.GatedRepoError):
        return ModelNotFoundError(
            f"{repo_id} is a gated repository: accept its terms at "
            f"https://huggingface.co/{repo_id}, then log in with `hf auth login` (or set "
            "HF_TOKEN) and retry"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ModelNotFoundError(
            f"{repo_id} was not found on the Hugging Face Hub (misspelled, or private and "
            "no valid token is set; log in with `hf auth login` or set HF_TOKEN)"
        )
    if disabled is not None and isinstance(exc, disabled):
        return ModelNotFoundError(f"{repo_id} has been disabled on the Hugging Face Hub and cannot be downloaded")
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            return ModelNotFoundError(
                f"the Hugging Face Hub refused access to {repo_id} (401 Unauthorized): the "
                "token is missing, invalid or expired; log in with `hf auth login` or set "
                "HF_TOKEN"
            )
        return ModelNotFoundError(
            f"the Hugging Face Hub returned an error for {repo_id}{rev}{_short(exc)}; " + _remedies(repo_id)
        )
    if isinstance(exc, errors.HFValidationError):
        return ModelNotFoundError(f"{repo_id!r} is not a valid Hugging Face repo id{_short(exc)}")
    if isinstance(exc, OSError):  # the HF errors above are OSErrors too: what is left is the local disk
        return ModelNotFoundError(
            f"cannot write {repo_id} into the Hugging Face cache at {cache}{_short(exc)}; "
            "set HF_HOME or HF_HUB_CACHE to a writable directory with enough space"
        )
    return None


def _remedies(repo_id: str) -> str:
    return (
        f"either download it on a connected machine (`dsvl2 models download {repo_id}` or `hf download "
        f"{repo_id}`; older huggingface_hub: `huggingface-cli download`) and copy its cache here, point "
        "--model at a local directory holding config.json and the *.safetensors weights, or set HF_HOME / "
        "HF_HUB_CACHE to the cache where it is already downloaded"
    )


def _cached_refs(cache: Path, repo_id: str) -> str:
    """'main -> 1a2b3c4, 5d6e7f8' for what the cache holds of `repo_id`; '' when nothing."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = sorted(p.name for p in (folder / "snapshots").glob("*") if p.is_dir())
    if not snapshots:
        return ""
    named: dict[str, list[str]] = {}
    for ref in sorted(p for p in (folder / "refs").glob("**/*") if p.is_file()):
        try:
            commit = ref.read_text().strip()
        except OSError:
            continue
        named.setdefault(commit, []).append(ref.relative_to(folder / "refs").as_posix())
    return ", ".join(f"{' '.join(named[c])} -> {c[:7]}" if c in named else c[:7] for c in snapshots)


def _short(exc: BaseException | None) -> str:
    """' (ConnectError: connection refused)': the first line of an exception, for a one-line message."""
    if exc is None:
        return ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > 160:
        text = text[:157] + "..."
    return f" ({type(exc).__name__}: {text})" if text else f" ({type(exc).__name__})"
