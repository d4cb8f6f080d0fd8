"""Resolve a local path or a Hugging Face Hub repo id to a local checkpoint directory."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError

ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "*.txt"]


def looks_like_repo_id(source: str) -> bool:
    """True for ``owner/name`` strings that are not existing local paths."""
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))
            and not Path(source).exists())


def download(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download the safetensors, JSON and tokenizer files of ``repo_id`` and return the local snapshot.

    Offline (``HF_HUB_OFFLINE=1`` or no network) the local cache is used if it holds the repo; otherwise
    a :class:`UsageError` says how to get the files.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError("downloading from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub") from None
    hint = (f"{repo_id!r} is not a local path and could not be downloaded. On a machine with network access run "
            f"`hf download {repo_id} --include '*.safetensors' --include '*.json' --include 'tokenizer*' "
            f"--local-dir DIR` "
            f"(or `bittern convert {repo_id} OUT_DIR`) and pass the downloaded directory instead")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS,
                                 local_files_only=offline)
    except Exception as e:  # hub errors: offline, missing repo, gated repo, connection problems
        reason = "offline mode (HF_HUB_OFFLINE is set) and the repo is not in the local cache" if offline else \
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise UsageError(f"{hint} ({reason})") from None
    return Path(path)
