"""The Hugging Face Hub: every Hub call lorahub makes lives in this package.

    refs      hf://owner/name[@rev][/path] and repo ids: one parser, one pattern
    client    endpoint, token, offline; error translation; listings; ranged reads (safetensors headers)
    files     which repo files make one adapter
    download  pull (and hf:// adapter arguments)
    upload    push
    card      the model card written on push

`huggingface_hub` is imported only here, so HF_* settings and error handling have one home.
"""
from __future__ import annotations

from .card import render_card, split_front_matter
from .client import (
    HubUnreachable,
    current_token,
    endpoint,
    file_not_found,
    hub_errors,
    is_offline,
    list_files,
    read_header,
    read_headers,
    read_json,
    read_range,
    translate_error,
)
from .download import PullResult, interactive, pull, resolve_adapter_path
from .files import choose_adapter_files
from .refs import SCHEME, HubRef, check_repo_id, is_hub_ref, is_repo_id, looks_like_repo_id, parse_ref, parse_repo_spec
from .upload import PushResult, push

__all__ = [
    "SCHEME", "HubRef", "HubUnreachable", "PullResult", "PushResult", "check_repo_id", "choose_adapter_files",
    "current_token", "endpoint", "file_not_found", "hub_errors", "interactive", "is_hub_ref", "is_offline",
    "is_repo_id", "list_files", "looks_like_repo_id", "parse_ref", "parse_repo_spec", "pull", "push",
    "read_header", "read_headers", "read_json", "read_range", "render_card", "resolve_adapter_path",
    "split_front_matter", "translate_error",
]
