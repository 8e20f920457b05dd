"""`push`: inspect (and optionally validate) an adapter, then commit it with its model card in one commit.

    push(Path("adapter/"), "alice/my-lora")              -> PushResult
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckFailed, LorahubError
from ..formats import all_formats
from .card import render_card
from .client import client, current_token, hub_errors, is_offline
from .refs import check_repo_id, is_hub_ref, looks_like_repo_id, parse_ref


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    commit: str | None
    commit_url: str | None
    pr_url: str | None
    revision: str
    files: list[str] = field(default_factory=list)
    created: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "repo_url": self.repo_url, "commit": self.commit,
                "commit_url": self.commit_url, "pr_url": self.pr_url, "revision": self.revision,
                "files": self.files, "created_repo": self.created}


def _upload_files(path: Path, info: dict) -> list[tuple[str, Path]]:
    """(path in repo, local file) for the adapter: PEFT config + weights, or the single file."""
    if path.is_dir():
        out = []
        for fmt in all_formats():
            config = path / fmt.marker_files[0] if fmt.directory and fmt.marker_files else None
            if config is not None and config.is_file():
                out.append((config.name, config))
        for entry in info.get("files") or []:
            file = Path(entry["path"]).resolve()
            root = path.resolve()
            rel = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name
            if rel not in [r for r, _ in out]:
                out.append((rel, file))
        return out
    return [(path.name, path)]


def _existing_card(repo_id: str, revision: str, token: str | None) -> str | None:
    from huggingface_hub.utils import EntryNotFoundError, RevisionNotFoundError

    try:
        file = client().hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    return Path(file).read_text(encoding="utf-8", errors="replace")


def push(path: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None, create_pr: bool = False, base: str | None = None,
         token: str | None = None, info: dict | None = None,
         on_progress: Callable[[str], None] | None = None) -> PushResult:
    """Inspect (and with `base`, validate) an adapter, then upload it with a generated model card.

    The user's files are never modified: the card is generated in memory and committed together
    with the adapter files in one commit.
    """
    hf = client()
    say = on_progress or (lambda text: None)
    path = Path(path)
    repo_id = parse_ref(repo_id).repo_id if is_hub_ref(repo_id) else check_repo_id(repo_id)
    if not path.exists():
        raise LorahubError("no such file or directory", path=path)
    if is_offline():
        raise LorahubError("HF_HUB_OFFLINE=1: pushing needs the network")
    token = current_token(token)
    if not token:
        raise LorahubError("pushing needs a Hugging Face token with write access: set HF_TOKEN or run "
                           "'hf auth login'")

    # 1. the adapter must load and be finite; with a base, it must fit it
    from ..inspect import inspect_adapter, nonfinite_error

    say("inspecting the adapter")
    if info is None:
        info = inspect_adapter(path)
    problem = nonfinite_error(info)
    if problem is not None:
        raise LorahubError(f"refusing to push: {problem}")
    base_model = None
    if base:
        say("validating against the base model")
        _validate_against_base(path, base)
        base_model = parse_ref(base).repo_id if is_hub_ref(base) else base if looks_like_repo_id(base) else None
    if base_model is None and looks_like_repo_id(info.get("base_model")):
        base_model = info["base_model"]

    branch = revision or "main"
    api = hf.HfApi(token=token)
    with hub_errors(repo_id, branch, write=True, token=token):
        # 2. the repo (and branch)
        created = False
        if not api.repo_exists(repo_id):
            say(f"creating {repo_id}")
            api.create_repo(repo_id, private=private, exist_ok=True)
            created = True
        if revision and revision != "main":
            refs = api.list_repo_refs(repo_id)
            if revision in {t.name for t in refs.tags} or re.fullmatch(r"[0-9a-f]{40}", revision):
                raise LorahubError(f"cannot push to '{revision}': it is a tag or a commit, not a branch")
            if revision not in {b.name for b in refs.branches}:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
        # 3. the card: the user's local README wins over the Hub's; either way their text is kept
        local_readme = (path / "README.md") if path.is_dir() else None
        existing: str | None
        if local_readme is not None and local_readme.is_file():
            existing = local_readme.read_text(encoding="utf-8", errors="replace")
        else:
            existing = _existing_card(repo_id, branch, token)
        card = render_card(existing, info, repo_id=repo_id, base_model=base_model)
        # 4. one commit: adapter files from where they are, the card from memory
        uploads = _upload_files(path, info)
        operations = [hf.CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(local)) for rel, local in uploads]
        operations.append(hf.CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        say(f"uploading {len(uploads)} files")
        commit = api.create_commit(repo_id, operations, commit_message=message or "Upload LoRA adapter with lorahub",
                                   revision=revision, create_pr=create_pr)
    return PushResult(repo_id, str(commit.repo_url), commit.oid, commit.commit_url, commit.pr_url, branch,
                      [rel for rel, _ in uploads] + ["README.md"], created)


def _validate_against_base(path: Path, base: str) -> None:
    """Run lorahub.validate against `base`; raise CheckFailed when it reports problems."""
    from ..base import load_base
    from ..formats import load_adapter
    from ..validate import validate

    report = validate(load_adapter(path), load_base(base), suggest=False)
    if not report.ok:
        first = report.errors[0] if report.errors else None
        detail = f": {first.module}: expected {first.expected}, found {first.found}" if first else ""
        raise CheckFailed(f"refusing to push: {report.summary}{detail}", report)
