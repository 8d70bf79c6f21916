"""Model and tower names: a local directory, or a Hugging Face hub id resolved through huggingface_hub's cache.

Every argument that names a model or a tower goes through here: `--model_name_or_path` (checked by the
distillation entry), `--teacher_model_path`, `--vision_tower` / `mm_vision_tower`, `--model-path` /
`--model-base` of `load_pretrained_model` and of the CLIs built on it.

Design choices:
- An existing directory is that directory: a local folder wins over a hub id spelled the same way.
- A hub id is `org/name`, optionally `org/name@revision` (branch, tag or commit). Anything else that is no
  directory (an absolute or `./` path, one bare name, several slashes) is a local path that is missing. Bare
  names (`gpt2`) are legacy on the hub, which redirects them to `org/name`; accepting them would turn every
  mistyped folder name into a network look-up.
- huggingface_hub does the resolving, so `HF_HOME` / `HF_HUB_CACHE` choose the cache and `HF_HUB_OFFLINE=1`
  restricts it to the cache; online, what the cache lacks is downloaded (and an unreachable hub falls back to
  the cache, as in huggingface_hub).
- `resolve_dir` gives a whole snapshot directory, for code that reads a checkpoint's files itself
  (config.json, the projector, the safetensors index, a LoRA adapter); foreign weight formats (GGUF, ONNX,
  TF, Flax...) are not downloaded. `resolve_file` gives one file, where fetching the weights would be waste
  (a tower's config or its preprocessor config).
- Errors (`ModelNotFoundError`, a FileNotFoundError) name the argument and say which case it was: a local
  path that does not exist, or a hub id that could not be resolved (offline and not cached, hub unreachable,
  no such repository or revision, gated), with the fix.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Weight formats no loader here reads: a snapshot skips them (their repos can be many times the model's size).
FOREIGN_FORMATS = ["*.gguf", "*.onnx", "*.onnx_data", "onnx/*", "*.msgpack", "*.h5", "*.tflite", "*.ot",
                   "openvino/*", "coreml/*", "*.mlmodel", "*.mlpackage/*"]


class ModelNotFoundError(FileNotFoundError):
    """A model or tower name that is neither an existing local directory nor a hub id that could be resolved."""


@dataclass(frozen=True)
class HubId:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse_hub_id(name: str | os.PathLike) -> HubId | None:
    """`org/name` or `org/name@revision` -> HubId; None for anything else (a local path)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name, str):
        return None
    repo_id, at, revision = name.partition("@")
    if repo_id.count("/") != 1 or (at and not revision.strip()):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubId(repo_id, revision or None)


def resolve_dir(name: str | os.PathLike, arg: str, allow_patterns: list[str] | None = None) -> str:
    """A local directory for `name`: itself, or the snapshot of hub id `name` in the Hugging Face cache.

    `arg` names the argument in errors (e.g. "--model-path"); `allow_patterns` limits what a download fetches.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError

    local = _local_dir(name)
    if local is not None:
        return local
    hub_id = _hub_id_or_raise(name, arg)
    try:
        return snapshot_download(hub_id.repo_id, revision=hub_id.revision, allow_patterns=allow_patterns,
                                 ignore_patterns=None if allow_patterns else FOREIGN_FORMATS)
    except IncompleteSnapshotError as err:
        # The cached file listing names files this cache lacks (often README.md or formats nobody needs here):
        # use what is there; a loader that misses a file it needs says which.
        logger.warning("%s %s: %s Using the cached files.", arg, name, err)
        return err.snapshot_path
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        raise _hub_error(err, name, hub_id, arg) from err


def resolve_file(name: str | os.PathLike, filename: str, arg: str, required: bool = True) -> str | None:
    """The local path of `filename` in checkpoint `name` (a local directory or a hub id), downloaded alone when
    online and not cached. When it cannot be had: an error naming `arg`, or None if not `required` (an optional
    look-up, e.g. a tower's preprocessor config, with a fallback)."""
    try:
        return _resolve_file(name, filename, arg)
    except ModelNotFoundError:
        if required:
            raise
        return None


def _resolve_file(name: str | os.PathLike, filename: str, arg: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    local = _local_dir(name)
    if local is not None:
        path = os.path.join(local, filename)
        if not os.path.isfile(path):
            raise ModelNotFoundError(f"{arg} {os.fspath(name)!r} has no {filename}")
        return path
    hub_id = _hub_id_or_raise(name, arg)
    try:
        return hf_hub_download(hub_id.repo_id, filename, revision=hub_id.revision)
    except EntryNotFoundError as err:
        if isinstance(err, LocalEntryNotFoundError):  # not cached, and offline or unreachable
            raise _hub_error(err, name, hub_id, arg, filename) from err
        raise ModelNotFoundError(f"{arg} {name!r}: the hub repository {hub_id} has no {filename}") from err
    except HfHubHTTPError as err:
        raise _hub_error(err, name, hub_id, arg, filename) from err


def _local_dir(name: str | os.PathLike) -> str | None:
    path = os.path.expanduser(os.fspath(name))
    return path if os.path.isdir(path) else None


def _hub_id_or_raise(name: str | os.PathLike, arg: str) -> HubId:
    """`name`, no directory, as a hub id; a local path that is missing is an error saying so."""
    hub_id = parse_hub_id(name)
    if hub_id is not None:
        return hub_id
    path = os.path.abspath(os.path.expanduser(os.fspath(name)))
    if os.path.exists(path):
        raise ModelNotFoundError(f"{arg} {os.fspath(name)!r} is a file, not a local directory (a checkpoint "
                                 "folder, or a hub id 'org/name', is expected)")
    message = f"{arg} {os.fspath(name)!r} is not a local directory: {path} does not exist"
    parent = os.path.dirname(path)
    if os.path.isdir(parent):
        close = difflib.get_close_matches(os.path.basename(path), os.listdir(parent), n=3)
        if close:
            message += f" (in {parent}: {', '.join(close)})"
    if "/" not in os.fspath(name) and os.sep not in os.fspath(name):
        message += "; a hub id is written 'org/name' or 'org/name@revision'"
    raise ModelNotFoundError(message)


def _hub_error(err: Exception, name: str, hub_id: HubId, arg: str, filename: str | None = None) -> Exception:
    """A huggingface_hub failure for hub id `name` -> an error naming `arg`, the case and its fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = hub_id.repo_id
    what = repo if hub_id.revision is None else f"{repo} at revision {hub_id.revision!r}"
    what = f"{filename} of {what}" if filename else what
    revision = f" --revision {hub_id.revision}" if hub_id.revision else ""
    fetch = (f"download it where the hub is reachable (`hf download {repo}{revision}`) and point HF_HOME (or "
             "HF_HUB_CACHE) at that cache, or pass a local directory")
    head = f"{arg} {name!r} is not a local directory, and as a hub id it could not be resolved:"
    if isinstance(err, GatedRepoError):
        reason = (f"{repo} is gated: accept its terms on https://huggingface.co/{repo} and log in "
                  "(`hf auth login` or HF_TOKEN)")
    elif isinstance(err, RepositoryNotFoundError):
        reason = (f"the hub has no repository {repo} that you can access (a typo, or a private repository: log in "
                  "with `hf auth login` or set HF_TOKEN)")
    elif isinstance(err, RevisionNotFoundError):
        reason = f"{repo} has no revision {hub_id.revision!r}"
    elif isinstance(err, LocalEntryNotFoundError) and constants.is_offline_mode():
        reason = (f"{what} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and offline mode "
                  f"(HF_HUB_OFFLINE=1) forbids downloading it: {fetch}")
    elif isinstance(err, LocalEntryNotFoundError):
        cause = err.__cause__ or err
        reason = (f"the hub could not be reached ({type(cause).__name__}: {str(cause).splitlines()[0]}) and {what} "
                  f"is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}): {fetch}")
    else:
        reason = f"{type(err).__name__}: {err}"
    return ModelNotFoundError(f"{head} {reason}")
