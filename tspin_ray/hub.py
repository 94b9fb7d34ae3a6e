"""Hugging Face hub ids as users type them (`org/name`, `org/name@revision`), resolved to a local snapshot.

    .venv/bin/pytest tests/unit/test_hub.py

`model.path` and `data.path` take a local path or a hub id. The driver resolves an id once, before any
work, and every actor then reads that same local directory (on a cluster it sits on the shared storage
HF_HOME points to). The local cache comes first; `HF_HUB_OFFLINE=1` (an offline cluster, this project's
CI) forbids anything else, and an id that is not cached then fails in one line naming the id and the
cache. Online, a missing snapshot is downloaded into the cache (safetensors and JSON only for a model:
never pickled weights).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from tspin_ray.errors import UserError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
FILE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".txt", ".yaml", ".safetensors"}  # a missing local file


def hub_id(value: str | None) -> tuple[str, str | None] | None:
    """(repo id, revision) when `value` is a hub id rather than an existing local path; else None."""
    if not value or Path(value).expanduser().exists() or value.startswith((".", "/", "~")):
        return None
    if Path(value).suffix.lower() in FILE_SUFFIXES:
        return None
    m = HUB_ID.match(value)
    return (m["repo"], m["revision"]) if m else None


def resolve(value: str, repo_type: str, key: str) -> str:
    """`value` itself when it is a local path; the cached (or, online, downloaded) snapshot directory of a
    hub id otherwise. `key` names the config key in errors."""
    parsed = hub_id(value)
    if parsed is None:
        return value
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = parsed
    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        return snapshot_download(repo, revision=revision, repo_type=repo_type, local_files_only=True)
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"{key}: {value} is no local path, and {kind} {value} is not in the Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set: download it where there is network (`hf download {repo}"
                            f"{' --repo-type dataset' if kind == 'dataset' else ''}`) into that cache, or give a "
                            f"local path") from None
    try:
        return snapshot_download(repo, revision=revision, repo_type=repo_type,
                                 allow_patterns=MODEL_FILES if kind == "model" else None)
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = " ".join(str(e).split())[:200]
        raise UserError(f"{key}: cannot download {kind} {value} ({first})") from None


def resolve_hub_ids(cfg):
    """The RunConfig with model.path and data.path as local directories: a hub id becomes its cached
    snapshot, resolved once by the driver (or the CLI) so every actor reads the same files."""
    model, data = cfg.model, cfg.data
    if model.path:
        model = dataclasses.replace(model, path=resolve(model.path, "model", "model.path"))
    if data.path:
        data = dataclasses.replace(data, path=resolve(data.path, "dataset", "data.path"))
    return dataclasses.replace(cfg, model=model, data=data)
