"""A base model as lorahub sees it: tensor names, shapes, dtypes and the file holding each.

Everything here comes from safetensors *headers* (8 bytes + the JSON header of each file): a 70B base
costs a few hundred kilobytes of reads, locally or over the Hub (HTTP Range requests), and no tensor
data is ever read. Sources (`load_base`):

| spec                           | layout                                                                           |
| ------------------------------ | -------------------------------------------------------------------------------- |
| a transformers model directory | `model.safetensors` or shards + `model.safetensors.index.json`                   |
| a diffusers pipeline directory | `unet/`, `text_encoder/`, `text_encoder_2/`, `transformer/`, ... (names prefixed |
|                                | `unet.` etc.)                                                                    |
| one `.safetensors` file        | an SD/SDXL single-file checkpoint (`model.diffusion_model.…`), or any state dict |
| a registry name (`llama-3-8b`) | a shape manifest shipped with lorahub or added with `lorahub registry add`       |
| `owner/name[@rev]`,            | the same layouts on the Hub, headers fetched with Range requests                 |
| `hf://owner/name[@rev][/path]` |                                                                                  |

Tensor names of diffusers layouts carry the component as a prefix (`unet.down_blocks.0…weight`,
`text_encoder.text_model…`), the way diffusers names LoRA targets; `BaseTensor.file` is the path of
the file holding the tensor relative to the model root (`unet/diffusion_pytorch_model.safetensors`),
or the repo path for Hub bases, or None for registry manifests (which have no files).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from . import hub
from .adapter import TensorSize
from .errors import LorahubError
from .formats.peft import CONFIG as PEFT_CONFIG
from .storage import SafetensorsHeader, check_regular, is_pickle_path, read_header, read_json_file

LAYOUTS = ("transformers", "diffusers", "sd-single-file", "single-file")

# diffusers weight names inside a component folder, preferred first
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
# a diffusers model folder's config names its class; the component prefix lorahub gives it
_CLASS_COMPONENTS = (("UNet", "unet"), ("Transformer", "transformer"), ("CLIPTextModel", "text_encoder"),
                     ("T5EncoderModel", "text_encoder"), ("AutoencoderKL", "vae"))
# keys that mark a Stable Diffusion (LDM/SGM) single-file checkpoint
SD_SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.",
                           "first_stage_model.")


@dataclass
class BaseTensor(TensorSize):
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str | None  # relative to BaseModel.root (local), repo path (Hub), None (registry)
    key: str | None = None  # the key inside `file` (differs from `name` in diffusers layouts); None: registry


@dataclass
class BaseModel:
    """Names, shapes and dtypes of a base model's tensors; never their values."""

    source: str  # what the user gave (path, repo id, registry name)
    name: str | None  # repo id or registry name, where known
    layout: str  # one of LAYOUTS
    tensors: dict[str, BaseTensor]
    config: dict | None = None  # config.json; for diffusers {component: config}
    files: list[str] = field(default_factory=list)  # weight files, relative to root / repo paths
    root: Path | None = None  # local directory the files are relative to
    revision: str | None = None  # Hub: the commit the headers were read at
    repo_id: str | None = None  # Hub repo (or, for registry manifests, the repo they describe)
    complete: bool = True  # False when a local file holds less data than its header describes
    metadata: dict[str, Any] = field(default_factory=dict)  # registry manifests: source URL, aliases...

    # ------------------------------------------------------------------ lookups
    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def get(self, name: str) -> BaseTensor | None:
        return self.tensors.get(name)

    def shape(self, name: str) -> tuple[int, ...] | None:
        tensor = self.tensors.get(name)
        return tensor.shape if tensor is not None else None

    @property
    def components(self) -> list[str]:
        """diffusers component prefixes present (`unet`, `text_encoder`, ...); [] for other layouts."""
        if self.layout != "diffusers":
            return []
        return sorted({name.split(".", 1)[0] for name in self.tensors})

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtypes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
        return counts

    @property
    def display_name(self) -> str:
        return self.name or self.source

    def component_config(self, target: str) -> dict | None:
        """The config that describes the module `target` (its component's, for diffusers)."""
        if not self.config:
            return None
        if self.layout == "diffusers":
            component = target.split(".", 1)[0]
            value = self.config.get(component)
            return value if isinstance(value, dict) else None
        return self.config

    def path_of(self, name: str) -> Path | None:
        """Absolute path of the local file holding tensor `name` (None for Hub/registry bases)."""
        tensor = self.tensors.get(name)
        if tensor is None or tensor.file is None or self.root is None:
            return None
        return self.root / tensor.file

    # ------------------------------------------------------------------ manifests
    def to_manifest(self, name: str | None = None, **extra: Any) -> dict:
        """The registry manifest of this base: names, shapes, dtypes (no files, no data)."""
        dtypes = self.dtypes
        manifest: dict[str, Any] = {
            "name": name or self.name or self.source,
            "repo_id": self.repo_id,
            "layout": self.layout,
            "dtype": max(dtypes, key=dtypes.__getitem__) if dtypes else None,
            "params": self.num_params,
        }
        manifest.update({k: v for k, v in self.metadata.items() if k not in manifest})
        manifest.update(extra)
        manifest["config"] = self.config
        manifest["tensors"] = {t.name: [list(t.shape), t.dtype] for t in self.tensors.values()}
        return manifest

    @classmethod
    def from_manifest(cls, manifest: dict, source: str | None = None) -> "BaseModel":
        try:
            tensors = {str(name): BaseTensor(str(name), tuple(int(d) for d in entry[0]), str(entry[1]), None)
                       for name, entry in manifest["tensors"].items()}
            layout = str(manifest.get("layout") or "transformers")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise LorahubError("corrupt registry manifest (expected {\"tensors\": {name: [shape, dtype]}})",
                               path=source) from None
        meta = {k: v for k, v in manifest.items()
                if k not in ("tensors", "config", "name", "layout", "repo_id", "params", "dtype")}
        return cls(source=source or str(manifest.get("name")), name=manifest.get("name"), layout=layout,
                   tensors=tensors, config=manifest.get("config"), repo_id=manifest.get("repo_id"),
                   metadata=meta)


# ---------------------------------------------------------------------------------------------
# entry point


def load_base(spec: str | Path, *, revision: str | None = None, token: str | bool | None = None,
              offline_fallback: bool = True) -> BaseModel:
    """A base model from a local directory or file, a registry name, or a Hub repo (headers only).

    Resolution order: an existing path; a registry manifest name; `hf://owner/name[@rev][/path]` or
    `owner/name[@rev]` on the Hub. When the Hub cannot be reached and a registry manifest describes
    that repo, the manifest is used instead (with a warning) unless `offline_fallback=False`.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if not hub.is_hub_ref(text) and path.exists():
        check_regular(path)  # a FIFO or a device: refused, never opened
        if path.is_dir():
            return _load_listing(_LocalFiles(path), source=text)
        return _load_single_file(_LocalFiles(path.parent), path.name, source=text)

    if not hub.is_hub_ref(text):
        from . import registry

        manifest = registry.find_manifest(text, by_repo_id=False)
        if manifest is not None:
            return registry.load_manifest(manifest)

    repo_id, rev, sub = hub.parse_repo_spec(text)
    if repo_id is None:
        raise LorahubError("no such file or directory, registry name or Hub repo "
                           "(see `lorahub registry list`; Hub repos are owner/name[@revision])", path=text)
    rev = revision or rev
    try:
        return load_hub_base(repo_id, revision=rev, subpath=sub, token=token, source=text)
    except hub.HubUnreachable as exc:
        if offline_fallback:
            from . import registry

            manifest = registry.find_manifest(repo_id)
            if manifest is not None:
                from .ui import warn

                warn(f"cannot reach the Hub ({exc.reason}); using the registry manifest '{manifest.name}' "
                     f"for {repo_id}")
                return registry.load_manifest(manifest)
        raise LorahubError(f"cannot reach the Hub to read {repo_id}: {exc.reason} (offline? a registry name works "
                           f"without network: `lorahub registry list`)") from None


# ---------------------------------------------------------------------------------------------
# file access: the same planning code reads local directories and Hub repos


class _Files:
    """A directory of files: listing, small JSON files, safetensors headers."""

    label: str

    def listing(self) -> list[str]:
        raise NotImplementedError

    def read_json(self, rel: str) -> Any:
        raise NotImplementedError

    def header(self, rel: str) -> SafetensorsHeader:
        raise NotImplementedError

    def complete(self, rel: str, header: SafetensorsHeader) -> bool:
        return True

    def exists(self, rel: str) -> bool:
        return rel in set(self.listing())

    def headers(self, rels: Iterable[str]) -> dict[str, SafetensorsHeader]:
        return {rel: self.header(rel) for rel in rels}


class _LocalFiles(_Files):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.label = str(root)
        self._listing: list[str] | None = None

    def listing(self) -> list[str]:
        if self._listing is None:
            out = []
            # everything but directories: a FIFO or a device named like a weight file is refused when
            # read (`storage.open_regular`), never skipped in silence nor opened (a FIFO blocks)
            for child in sorted(self.root.iterdir()):
                if not child.is_dir():
                    out.append(child.name)
                elif not child.name.startswith("."):
                    out.extend(f"{child.name}/{grand.name}" for grand in sorted(child.iterdir()) if not grand.is_dir())
            self._listing = out
        return self._listing

    def read_json(self, rel: str) -> Any:
        return read_json_file(self.root / rel)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def header(self, rel: str) -> SafetensorsHeader:
        return read_header(self.root / rel, check_size=False)

    def complete(self, rel: str, header: SafetensorsHeader) -> bool:
        end = max((info.end for info in header.tensors.values()), default=0)
        try:
            return (self.root / rel).stat().st_size >= header.data_start + end
        except OSError:
            return False


class _HubFiles(_Files):
    """A Hub repo at one commit, through lorahub.hub: safetensors headers by two Range requests per file."""

    def __init__(self, repo_id: str, revision: str | None, token: str | bool | None):
        self.repo_id = repo_id
        self.token = token
        sha, self._listing = hub.list_files(repo_id, revision, token)
        self.sha = sha or revision or "main"
        self.label = f"{repo_id}@{revision}" if revision else repo_id

    def listing(self) -> list[str]:
        return self._listing

    def read_json(self, rel: str) -> Any:
        return hub.read_json(self.repo_id, rel, self.sha, self.token)

    def header(self, rel: str) -> SafetensorsHeader:
        return hub.read_header(self.repo_id, rel, self.sha, self.token)

    def headers(self, rels: Iterable[str]) -> dict[str, SafetensorsHeader]:
        return hub.read_headers(self.repo_id, rels, self.sha, self.token)


def load_hub_base(repo_id: str, *, revision: str | None = None, subpath: str | None = None,
                  token: str | bool | None = None, source: str | None = None) -> BaseModel:
    """A base model on the Hub: repo listing, config JSON, and safetensors headers by Range requests."""
    files = _HubFiles(repo_id, revision, token)
    source = source or repo_id
    if subpath:
        if subpath.endswith(".safetensors"):
            if subpath not in files.listing():
                raise hub.file_not_found(repo_id, subpath, revision)
            base = _load_single_file(files, subpath, source=source)
        else:
            base = _load_listing(_SubFiles(files, subpath), source=source)
            for tensor in base.tensors.values():
                tensor.file = f"{subpath.strip('/')}/{tensor.file}"
            base.files = [f"{subpath.strip('/')}/{f}" for f in base.files]
    else:
        base = _load_listing(files, source=source)
    base.name = base.repo_id = repo_id
    base.revision = files.sha
    base.root = None
    return base


class _SubFiles(_Files):
    """A folder inside another _Files."""

    def __init__(self, parent: _Files, folder: str):
        self.parent = parent
        self.folder = folder.strip("/") + "/"
        self.label = f"{parent.label}/{folder}"

    def listing(self) -> list[str]:
        return [p[len(self.folder):] for p in self.parent.listing() if p.startswith(self.folder)]

    def read_json(self, rel: str) -> Any:
        return self.parent.read_json(self.folder + rel)

    def header(self, rel: str) -> SafetensorsHeader:
        return self.parent.header(self.folder + rel)

    def exists(self, rel: str) -> bool:
        return self.parent.exists(self.folder + rel)

    def complete(self, rel: str, header: SafetensorsHeader) -> bool:
        return self.parent.complete(self.folder + rel, header)

    def headers(self, rels: Iterable[str]) -> dict[str, SafetensorsHeader]:
        got = self.parent.headers([self.folder + r for r in rels])
        return {k[len(self.folder):]: v for k, v in got.items()}


# ---------------------------------------------------------------------------------------------
# planning: which files hold the weights


def _pick_weights(names: set[str], folder: str = "") -> list[str] | str | None:
    """The weight files of one model folder: an index path (str), a list of files, or None."""
    pre = f"{folder}/" if folder else ""
    here = sorted(n[len(pre):] for n in names if n.startswith(pre) and "/" not in n[len(pre):])
    for stem in _WEIGHT_STEMS:
        if f"{stem}.safetensors.index.json" in here:
            return pre + f"{stem}.safetensors.index.json"
        if f"{stem}.safetensors" in here:
            return [pre + f"{stem}.safetensors"]
    # variants (diffusion_pytorch_model.fp16.safetensors) when no plain file exists
    for stem in _WEIGHT_STEMS:
        variant = re.escape(stem) + r"\.[A-Za-z0-9_-]+\.safetensors(\.index\.json)?"
        variants = [n for n in here if re.fullmatch(variant, n)]
        if variants:
            index = [n for n in variants if n.endswith(".index.json")]
            return pre + index[0] if index else [pre + variants[0]]
    indexes = [n for n in here if n.endswith(".safetensors.index.json")]
    if len(indexes) == 1:
        return pre + indexes[0]
    weights = [n for n in here if n.endswith(".safetensors")]
    if weights and all(re.search(r"-\d{5}-of-\d{5}\.safetensors$", n) for n in weights):
        return [pre + n for n in weights]
    if len(weights) == 1:
        return [pre + weights[0]]
    return None


def _load_listing(files: _Files, source: str) -> BaseModel:
    names = set(files.listing())
    if PEFT_CONFIG in names and "config.json" not in names:
        raise LorahubError("this is a LoRA adapter, not a base model (pass the model it was trained on)",
                           path=files.label)
    folders = sorted({n.split("/", 1)[0] for n in names if "/" in n})
    picked = {folder: _pick_weights(names, folder) for folder in folders}
    component_plans = {k: v for k, v in picked.items() if v is not None}
    root_plan = _pick_weights(names)
    diffusers_layout = "model_index.json" in names or (root_plan is None and any(
        PurePosixPath(p).name.startswith("diffusion_pytorch_model")
        for plan in component_plans.values() for p in ([plan] if isinstance(plan, str) else plan)))

    if diffusers_layout and component_plans:
        tensors: dict[str, BaseTensor] = {}
        configs: dict[str, Any] = {}
        all_files: list[str] = []
        plans = {}
        for folder, plan in component_plans.items():
            plans[folder] = _expand_plan(files, plan)
        headers = files.headers(sorted({f for shard_files in plans.values() for f in shard_files[0]}))
        complete = True
        for folder, (shard_files, _) in plans.items():
            for rel in shard_files:
                header = headers[rel]
                complete &= files.complete(rel, header)
                all_files.append(rel)
                for info in header.tensors.values():
                    full = f"{folder}.{info.name}"
                    tensors[full] = BaseTensor(full, info.shape, info.dtype, rel, info.name)
            if f"{folder}/config.json" in names:
                configs[folder] = files.read_json(f"{folder}/config.json")
        return BaseModel(source=source, name=None, layout="diffusers", tensors=tensors, config=configs or None,
                         files=all_files, root=getattr(files, "root", None), complete=complete)

    if root_plan is None:
        pickles = sorted(n for n in names if "/" not in n and is_pickle_path(Path(n)))
        if pickles:
            raise LorahubError(f"no safetensors weights (found {', '.join(pickles[:3])}): pickle checkpoints "
                               "cannot be read header-only; convert them to safetensors", path=files.label)
        several = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
        if several:
            raise LorahubError(f"several .safetensors files and no index ({', '.join(several[:4])}); "
                               "pass the file to use", path=files.label)
        raise LorahubError("no model weights here (no model.safetensors, index, or diffusers components)",
                           path=files.label)

    shard_files, _ = _expand_plan(files, root_plan)
    config = files.read_json("config.json") if "config.json" in names else None
    if len(shard_files) == 1 and not isinstance(root_plan, str) and config is None:
        return _load_single_file(files, shard_files[0], source=source)
    headers = files.headers(shard_files)
    if all(_looks_like_adapter(h.tensors) for h in headers.values()):
        raise LorahubError("this is a LoRA adapter, not a base model (pass the model it was trained on)",
                           path=files.label)
    tensors = {}
    complete = True
    prefix = _diffusers_model_prefix(config)
    for rel in shard_files:
        complete &= files.complete(rel, headers[rel])
        for info in headers[rel].tensors.values():
            full = prefix + info.name
            tensors[full] = BaseTensor(full, info.shape, info.dtype, rel, info.name)
    layout = "diffusers" if prefix else "transformers"
    if prefix:
        config = {prefix[:-1]: config}
    return BaseModel(source=source, name=None, layout=layout, tensors=tensors, config=config, files=shard_files,
                     root=getattr(files, "root", None), complete=complete)


def _diffusers_model_prefix(config: dict | None) -> str:
    """`unet.` for a lone diffusers UNet folder (config `_class_name`), so names match LoRA targets."""
    if not isinstance(config, dict) or "_class_name" not in config:
        return ""
    class_name = str(config["_class_name"])
    for marker, component in _CLASS_COMPONENTS:
        if marker in class_name:
            return component + "."
    return ""


def _expand_plan(files: _Files, plan: list[str] | str) -> tuple[list[str], dict[str, str] | None]:
    """(shard files, weight map) of a plan: an index JSON is read and its shards listed."""
    if isinstance(plan, list):
        return plan, None
    index = files.read_json(plan)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LorahubError("index has no weight_map", path=f"{files.label}/{plan}")
    folder = str(PurePosixPath(plan).parent)
    pre = "" if folder in ("", ".") else folder + "/"
    shards = sorted({pre + str(f) for f in weight_map.values()})
    missing = [s for s in shards if s not in set(files.listing())]
    if missing:
        raise LorahubError(f"index names shard files that do not exist: {', '.join(missing[:3])}",
                           path=f"{files.label}/{plan}")
    return shards, {k: pre + str(v) for k, v in weight_map.items()}


def _load_single_file(files: _Files, rel: str, source: str) -> BaseModel:
    if not rel.endswith(".safetensors"):
        if is_pickle_path(Path(rel)):
            raise LorahubError("pickle checkpoints cannot be read header-only; convert to safetensors",
                               path=f"{files.label}/{rel}")
        raise LorahubError("not a safetensors file", path=f"{files.label}/{rel}")
    header = files.headers([rel])[rel]
    if _looks_like_adapter(header.tensors):
        raise LorahubError("this is a LoRA adapter, not a base model (pass the model it was trained on)",
                           path=f"{files.label}/{rel}")
    tensors = {info.name: BaseTensor(info.name, info.shape, info.dtype, rel, info.name)
               for info in header.tensors.values()}
    sd_keys = sum(1 for name in tensors if name.startswith(SD_SINGLE_FILE_PREFIXES))
    layout = "sd-single-file" if sd_keys and sd_keys >= len(tensors) // 2 else "single-file"
    config = None
    if layout == "single-file" and "/" not in rel and files.exists("config.json"):
        config = files.read_json("config.json")
        layout = "transformers"
    return BaseModel(source=source, name=None, layout=layout, tensors=tensors, config=config, files=[rel],
                     root=getattr(files, "root", None), complete=files.complete(rel, header))


def _looks_like_adapter(tensors: dict) -> bool:
    from .formats import is_adapter_state

    return is_adapter_state(list(tensors))
