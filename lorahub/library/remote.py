"""`lorahub search --check`: does each found adapter fit the base? Its headers are read from the Hub with
Range requests (two per file; a PEFT config whole), laid out as a local header-only copy, read by the
formats registry and checked by `lorahub.validate` — the weights are never downloaded."""
from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LorahubError
from ..hub.files import adapter_candidates
from ..hub.search import HubModel, fetch_adapter_headers, hub_repo_paths

if TYPE_CHECKING:
    from ..base import BaseModel

MAX_ADAPTERS_PER_REPO = 4  # a repo holding more adapters is judged by its first four
THREADS = 8  # Hub requests in flight


@dataclass
class HubCheck:
    fits: bool | None  # None: could not be checked
    message: str  # the validate headline, or why it could not be checked
    files: list[str]  # the repo files of the adapter the message is about

    def to_dict(self) -> dict:
        return {"fits": self.fits, "check": self.message}


def check_model(model: HubModel, base: "BaseModel", token: str | bool | None = None) -> HubCheck:
    from ..formats import load_adapter
    from ..validate import validate

    groups = adapter_candidates(hub_repo_paths(model))
    if not groups:
        return HubCheck(None, "no adapter file (no adapter_config.json with weights, no LoRA .safetensors)", [])
    first_failure: HubCheck | None = None
    for group in groups[:MAX_ADAPTERS_PER_REPO]:
        try:
            with tempfile.TemporaryDirectory(prefix="lorahub-check-") as tmp:
                path = fetch_adapter_headers(model.repo_id, model.sha, group, Path(tmp), token)
                report = validate(load_adapter(path), base, suggest=False)
        except LorahubError as exc:
            first_failure = first_failure or HubCheck(None, f"cannot check: {exc}", group)
            continue
        # the headline names the adapter by its (temporary) file name: name it by the repo path instead
        label = model.repo_id + ("/" + group[-1] if len(group) == 1 else
                                 "/" + group[0].rpartition("/")[0] if "/" in group[0] else "")
        headline = report.summary.replace(report.adapter, label, 1)
        if report.ok and report.matched:
            return HubCheck(True, headline, group)
        if first_failure is None or first_failure.fits is None:
            first_failure = HubCheck(False, headline, group)
    assert first_failure is not None
    return first_failure


def check_hub_adapters(models: list[HubModel], base: "BaseModel",
                       token: str | bool | None = None) -> dict[str, HubCheck]:
    """repo id -> whether its adapter fits `base`, checked from headers (several repos at once)."""
    from ..storage import close_open_files

    if not models:
        return {}
    try:
        with ThreadPoolExecutor(max_workers=min(THREADS, len(models))) as pool:
            checks = list(pool.map(lambda m: check_model(m, base, token), models))
    finally:
        close_open_files()  # the header-only copies are gone: drop their handles
    return {model.repo_id: check for model, check in zip(models, checks)}
