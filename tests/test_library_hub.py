"""The library and the Hub (issue 15): the test Hub's `GET /api/models` answers `list_models` as the Hub
does, `lorahub search` returns what that filter returns, `--check` reads headers only, `lorahub list`
shows the Hugging Face cache by repo, and `lorahub rm` removes from the cache and the library folders
and from nowhere else."""
from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from cli_runner import run_cli
from click.testing import CliRunner
from huggingface_hub import HfApi, scan_cache_dir
from huggingface_hub.utils import HfHubHTTPError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from make_library import base_shard, llama_modules, peft_dir  # noqa: E402

_ids = itertools.count(1)


def _uid() -> str:
    return f"{os.getpid()}x{next(_ids)}"


def _card(meta: dict | None, text: str = "# model\n") -> str:
    return ("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" if meta else "") + text


def _json(*args, ok: int = 0, env=None) -> dict:
    result = run_cli(*map(str, args), "--json", env=env)
    assert result.returncode == ok, result.stderr + result.stdout
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------------------
# a small Hub of adapters, and the filter semantics written out


SPEC = [  # name, owner, card, downloads, likes
    ("lora-one", "a", {"base_model": "BASE1", "library_name": "peft", "tags": ["lora"]}, 50, 1),
    ("style-two", "a", {"base_model": "BASE1", "base_model_relation": "adapter", "library_name": "diffusers",
                        "tags": ["lora", "style"]}, 10, 9),
    ("lora-three", "b", {"base_model": "BASE1", "library_name": "peft"}, 30, 5),
    ("other-base", "b", {"base_model": "BASE2", "library_name": "peft", "tags": ["lora"]}, 70, 2),
    ("a-finetune", "a", {"base_model": "BASE1", "base_model_relation": "finetune"}, 99, 3),
    ("two-bases", "b", {"base_model": ["BASE1", "BASE2"], "base_model_relation": "adapter", "tags": ["lora"]},
     5, 0),
    ("no-card", "a", None, 1000, 50),
]


@pytest.fixture(scope="module")
def small_hub(hub_server):
    """SPEC on the test Hub under fresh owners and base ids; returns (ids, expected tags per repo id)."""
    uid = _uid()
    owners = {"a": f"liba{uid}", "b": f"libb{uid}"}
    bases = {"BASE1": f"org{uid}/base-one", "BASE2": f"org{uid}/base-two"}
    repos = {}
    for name, owner, card, downloads, likes in SPEC:
        repo_id = f"{owners[owner]}/{name}"
        meta = None
        if card is not None:
            meta = json.loads(json.dumps(card))
            raw = meta["base_model"]
            meta["base_model"] = [bases[b] for b in raw] if isinstance(raw, list) else bases[raw]
        hub_server.seed_repo(repo_id, {"README.md": _card(meta)} if meta else {"notes.txt": "x"})
        hub_server.set_repo_stats(repo_id, downloads=downloads, likes=likes)
        repos[name] = {"id": repo_id, "owner": owners[owner], "meta": meta, "downloads": downloads, "likes": likes}
    return {"owners": owners, "bases": bases, "repos": repos}


def _tags(repo: dict) -> list[str]:
    """The tags the Hub shows for a repo: the card's, its library, and base_model:(relation:)ID."""
    meta = repo["meta"]
    if not meta:
        return []
    tags = list(meta.get("tags", [])) + ([meta["library_name"]] if meta.get("library_name") else [])
    bases = meta["base_model"] if isinstance(meta["base_model"], list) else [meta["base_model"]]
    relation = meta.get("base_model_relation") or (
        "adapter" if meta.get("library_name") == "peft" or "lora" in tags else "finetune")
    for base in bases:
        tags += [f"base_model:{base}", f"base_model:{relation}:{base}"]
    return tags


def _expected(hub: dict, *, filters: list[str], search: str | None = None, author: str | None = None,
              sort: str | None = None, limit: int | None = None) -> list[str]:
    """What the Hub answers, from SPEC: every filter among the tags, the search text in the id (any case),
    the author; sorted descending by `sort` (ties in id order), at most `limit`."""
    repos = sorted(hub["repos"].values(), key=lambda r: r["id"])
    found = [r for r in repos if all(f in _tags(r) for f in filters)
             and (search is None or search.lower() in r["id"].lower())
             and (author is None or r["owner"] == author)]
    if sort:
        found.sort(key=lambda r: r[sort], reverse=True)
    ids = [r["id"] for r in found]
    return ids[:limit] if limit else ids


def test_api_models_answers_list_models_as_the_hub_does(hub_server, small_hub):
    api = HfApi()
    b1, b2 = small_hub["bases"]["BASE1"], small_hub["bases"]["BASE2"]
    adapter1 = f"base_model:adapter:{b1}"
    cases = [
        dict(filters=[adapter1]),
        dict(filters=[adapter1], sort="downloads"),
        dict(filters=[adapter1], sort="likes"),
        dict(filters=[adapter1, "style"]),
        dict(filters=[f"base_model:adapter:{b2}"], sort="downloads"),
        dict(filters=[f"base_model:finetune:{b1}"]),
        dict(filters=["lora"], author=small_hub["owners"]["a"]),
        dict(filters=[adapter1], search="LORA"),
        dict(filters=[adapter1], sort="downloads", limit=2),
    ]
    for case in cases:
        got = [m.id for m in api.list_models(filter=case["filters"], search=case.get("search"),
                                             author=case.get("author"), sort=case.get("sort"),
                                             limit=case.get("limit"))]
        assert got == _expected(small_hub, **case), case
    # the derived tags, as the Hub shows them
    info = api.model_info(small_hub["repos"]["lora-three"]["id"])
    assert adapter1 in info.tags and f"base_model:{b1}" in info.tags and "peft" in info.tags


def test_api_models_projection_pages_and_errors(hub_server, small_hub):
    api = HfApi()
    adapter1 = f"base_model:adapter:{small_hub['bases']['BASE1']}"
    only = list(api.list_models(filter=adapter1, expand=["downloads"]))
    assert only and all(m.downloads is not None and m.likes is None and m.tags is None for m in only)
    full = list(api.list_models(filter=adapter1, full=True))
    assert all(m.siblings is not None and m.sha and m.last_modified for m in full)
    cards = list(api.list_models(filter=adapter1, cardData=True))
    assert all(m.card_data is not None for m in cards)
    default = list(api.list_models(filter=adapter1))
    assert all(m.last_modified is None and m.siblings is None and m.downloads is not None for m in default)
    # pages: Link headers, followed by the client
    expected = _expected(small_hub, filters=[adapter1], sort="downloads")
    hub_server.list_page_max = 2
    try:
        hub_server.reset_stats()
        assert [m.id for m in api.list_models(filter=adapter1, sort="downloads")] == expected
        assert hub_server.stats.count("GET", "list") == 2
        hub_server.reset_stats()
        assert [m.id for m in api.list_models(filter=adapter1, sort="downloads", limit=3)] == expected[:3]
        assert hub_server.stats.count("GET", "list") == 2  # stops once it has 3
    finally:
        hub_server.list_page_max = 1000
    # direction: -1 (or none) descending, anything else ascending; bad values are 400s
    url = urlsplit(hub_server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", f"/api/models?filter={adapter1}&sort=downloads&direction=1")
    assert [m["id"] for m in json.loads(conn.getresponse().read())] == expected[::-1]
    for bad in ("sort=bogus", "expand=nonsense", "limit=x"):
        conn.request("GET", f"/api/models?{bad}")
        response = conn.getresponse()
        response.read()
        assert response.status == 400, bad
    with pytest.raises(HfHubHTTPError):
        list(api.list_models(sort="bogus"))


def test_private_repos_are_listed_for_their_owner_only(hub_server, small_hub):
    base = small_hub["bases"]["BASE1"]
    repo_id = hub_server.new_repo_id(prefix="private-lib")
    hub_server.seed_repo(repo_id, {"README.md": _card({"base_model": base, "library_name": "peft"})}, private=True)
    assert repo_id not in [m.id for m in HfApi().list_models(filter=f"base_model:adapter:{base}", token=False)]
    assert repo_id in [m.id for m in HfApi(token=hub_server.alice).list_models(filter=f"base_model:adapter:{base}")]


# ----------------------------------------------------------------------------------------------
# lorahub search


def test_search_results_equal_the_server_filter(hub_server, small_hub):
    b1 = small_hub["bases"]["BASE1"]
    adapter1 = f"base_model:adapter:{b1}"
    owner_a = small_hub["owners"]["a"]
    cases = [
        (("--base", b1), dict(filters=[adapter1], sort="downloads")),
        (("--base", b1, "--sort", "likes"), dict(filters=[adapter1], sort="likes")),
        (("--base", b1, "--author", owner_a), dict(filters=[adapter1], author=owner_a, sort="downloads")),
        (("lora", "--base", b1), dict(filters=[adapter1], search="lora", sort="downloads")),
        (("--base", b1, "--limit", "2"), dict(filters=[adapter1], sort="downloads", limit=2)),
        (("--author", owner_a), dict(filters=["lora"], author=owner_a, sort="downloads")),
    ]
    for args, expected in cases:
        payload = _json("search", *args)
        assert list(payload)[0] == "ok"
        assert [r["repo_id"] for r in payload["results"]] == _expected(small_hub, **expected), args
    rows = {r["repo_id"]: r for r in _json("search", "--base", b1)["results"]}
    one = rows[small_hub["repos"]["lora-one"]["id"]]
    assert one["downloads"] == 50 and one["likes"] == 1 and one["library"] == "peft" and one["modified"]
    assert one["base_models"] == [b1] and one["author"] == owner_a
    two = rows[small_hub["repos"]["two-bases"]["id"]]
    assert two["base_models"] == [b1, small_hub["bases"]["BASE2"]]
    text = run_cli("search", "--base", b1)
    assert text.returncode == 0 and text.stdout.splitlines()[0].split()[:3] == ["REPO", "DOWNLOADS", "LIKES"]
    assert len(text.stdout.splitlines()) == 1 + len(rows)


def test_search_option_errors(hub_server, hub_env):
    assert run_cli("search", "--check").returncode == 2  # --check needs --base
    assert run_cli("search", "--limit", "0").returncode == 2
    assert run_cli("search", "--sort", "size").returncode == 2
    assert run_cli("search", "--base", "../../etc").returncode == 1
    offline = hub_env.run("search", "--base", "org/x", env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "HF_HUB_OFFLINE=1" in offline.stderr and "Traceback" not in offline.stderr


def test_search_check_reads_only_headers(hub_server, tiny_llama_dir, peft_lora_dir, peft_wide_dir, kohya_unet_file):
    """--check: the adapters whose shapes fit the base are `fits: true`, another hidden size or another
    model `false`, a repo without adapter files `null`; the adapters' weights are read by Range requests
    of their headers only."""
    uid = _uid()
    base = f"org{uid}/tiny-llama"
    hub_server.seed_repo(base, {p.name: p for p in tiny_llama_dir.iterdir() if p.is_file()})
    card = _card({"base_model": base, "library_name": "peft", "tags": ["lora"]})
    repos = {"fits": f"chk{uid}/fits", "wide": f"chk{uid}/wide", "kohya": f"chk{uid}/kohya",
             "empty": f"chk{uid}/empty"}
    hub_server.seed_repo(repos["fits"], {"README.md": card, **{n: peft_lora_dir / n for n in
                                                                ("adapter_config.json", "adapter_model.safetensors")}})
    hub_server.seed_repo(repos["wide"], {"README.md": card, **{n: peft_wide_dir / n for n in
                                                                ("adapter_config.json", "adapter_model.safetensors")}})
    hub_server.seed_repo(repos["kohya"], {"README.md": card, "unet.safetensors": kohya_unet_file})
    hub_server.seed_repo(repos["empty"], {"README.md": card})
    hub_server.reset_stats()
    payload = _json("search", "--base", base, "--check")
    fits = {r["repo_id"]: r["fits"] for r in payload["results"]}
    assert fits == {repos["fits"]: True, repos["wide"]: False, repos["kohya"]: False, repos["empty"]: None}
    checks = {r["repo_id"]: r["check"] for r in payload["results"]}
    assert checks[repos["fits"]].startswith("fits:") and repos["fits"] in checks[repos["fits"]]
    assert "does not fit" in checks[repos["wide"]] and "no adapter file" in checks[repos["empty"]]
    # the weights: only their headers, by Range requests
    weights = {(repos["fits"], "adapter_model.safetensors"), (repos["wide"], "adapter_model.safetensors"),
               (repos["kohya"], "unet.safetensors")}
    for repo, path in weights:
        served = hub_server.stats.bytes_served[(repo, path)]
        size = {"fits": peft_lora_dir / "adapter_model.safetensors", "wide": peft_wide_dir / "adapter_model.safetensors",
                "kohya": kohya_unet_file}[repo.rsplit("/", 1)[1]].stat().st_size
        assert 0 < served < size, (repo, served, size)
    ranged = {(r["repo"], r["path"]) for r in hub_server.stats.ranges}
    assert weights <= ranged
    text = run_cli("search", "--base", base, "--check")
    assert text.returncode == 0 and text.stdout.splitlines()[0].split()[-1] == "FITS"


# ----------------------------------------------------------------------------------------------
# the Hugging Face cache: listed by repo, removed through the cache API


def _cache_repo(repo_id: str):
    return next((r for r in scan_cache_dir().repos if r.repo_id == repo_id), None)


def test_list_shows_the_cache_by_repo_and_rm_removes_through_the_cache_api(
        hub_server, tmp_path, monkeypatch, peft_lora_dir, peft_rslora_dir, kohya_unet_file):
    monkeypatch.setenv("LORAHUB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAHUB_LIBRARY", raising=False)
    uid = _uid()
    two_revs, same_blob, other = f"cache{uid}/two-revs", f"cache{uid}/same-blob", f"cache{uid}/other"
    peft = {n: peft_lora_dir / n for n in ("adapter_config.json", "adapter_model.safetensors")}
    first = hub_server.seed_repo(two_revs, peft)
    hub_server.seed_repo(same_blob, {"style.safetensors": kohya_unet_file})
    hub_server.seed_repo(other, {"style.safetensors": kohya_unet_file, "README.md": "# other\n"})
    for repo in (two_revs, same_blob, other):
        assert run_cli("pull", repo, "--no-inspect").returncode == 0
    # a new adapter on main (another revision, other blobs); a new commit keeping the same file
    hub_server.seed_repo(two_revs, {n: peft_rslora_dir / n for n in ("adapter_config.json",
                                                                      "adapter_model.safetensors")})
    hub_server.seed_repo(same_blob, {"README.md": "# readme only\n"})
    for repo in (two_revs, same_blob):
        assert run_cli("pull", repo, "--no-inspect").returncode == 0

    rows = [a for a in _json("list")["adapters"] if a["repo_id"] and a["repo_id"].startswith(f"cache{uid}/")]
    names = sorted(a["name"] for a in rows)
    assert names == sorted([f"{two_revs}@main", f"{two_revs}@{first[:12]}", f"{same_blob}@main/style.safetensors",
                            f"{other}@main/style.safetensors"]), names
    same = next(a for a in rows if a["repo_id"] == same_blob)
    assert len(same["also"]) == 1 and same["also"][0].startswith(f"{same_blob}@")  # the older snapshot, once
    main = next(a for a in rows if a["name"] == f"{two_revs}@main")
    assert main["refs"] == ["main"] and main["revision"] != first and main["rank_distribution"] != {}

    # rm one revision (by its short sha), then the repo, through the cache API
    removed = _json("rm", f"{two_revs}@{first[:12]}", "--yes")
    assert removed["repo_id"] == two_revs and removed["revisions"] == [first] and removed["bytes_freed"] > 0
    assert [r.commit_hash for r in _cache_repo(two_revs).revisions] != [first]
    assert len(_cache_repo(two_revs).revisions) == 1
    assert _json("rm", f"hf://{two_revs}", "--yes")["revisions"]
    assert _cache_repo(two_revs) is None
    assert _cache_repo(other) is not None and _cache_repo(same_blob) is not None  # nothing else went
    again = run_cli("rm", two_revs, "--yes")
    assert again.returncode == 1 and "not in the Hugging Face cache" in again.stderr
    # a path inside a cached snapshot names that revision
    snapshot_file = next(a for a in rows if a["repo_id"] == other)["path"]
    assert _json("rm", snapshot_file, "--yes")["repo_id"] == other
    assert _cache_repo(other) is None
    listed = {a["repo_id"] for a in _json("list")["adapters"]}
    assert two_revs not in listed and other not in listed and same_blob in listed


# ----------------------------------------------------------------------------------------------
# rm in the library folders, and every refusal


@pytest.fixture
def lib(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "lib"
    monkeypatch.setenv("LORAHUB_LIBRARY", os.pathsep.join([str(folder), str(tmp_path / "lib2")]))
    monkeypatch.setenv("LORAHUB_HOME", str(tmp_path / "home"))
    modules = llama_modules(1, 64, 128, 32, ["q_proj"])
    peft_dir(folder / "peft", modules, 4, 8, "org/base")
    (folder / "peft" / "README.md").write_text("# card\n")
    peft_dir(folder / "peft-with-notes", modules, 4, 8, "org/base")
    (folder / "peft-with-notes" / "notes.txt").write_text("mine\n")
    peft_dir(tmp_path / "outside" / "peft", modules, 4, 8, "org/base")
    shutil.copytree(folder / "peft", tmp_path / "kohya-src")
    (folder / "files").mkdir()
    for name in ("a", "b"):
        shutil.copy(folder / "peft" / "adapter_model.safetensors", folder / "files" / f"{name}.safetensors")
    shutil.copy(folder / "peft" / "adapter_model.safetensors", tmp_path / "outside" / "x.safetensors")
    os.symlink(tmp_path / "outside" / "x.safetensors", folder / "files" / "link.safetensors")
    base_shard(folder / "bases" / "model-00001-of-00002.safetensors")
    return folder


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def _in(folder: Path) -> list[dict]:
    """The listed adapters under `folder` (the default listing also shows the session's Hub cache)."""
    return [a for a in _json("list")["adapters"] if a["path"].startswith(str(folder) + os.sep)]


def test_rm_removes_library_adapters(lib):
    assert len(_in(lib)) == 5  # peft, peft-with-notes, a, b, link
    removed = _json("rm", lib / "files" / "a.safetensors", "--yes")
    assert removed["removed"] == [str(lib / "files" / "a.safetensors")] and removed["repo_id"] is None
    assert not (lib / "files" / "a.safetensors").exists() and (lib / "files" / "b.safetensors").exists()
    assert _json("rm", lib / "peft", "--yes")["bytes_freed"] > 0  # config, weights and the card only
    assert not (lib / "peft").exists()
    names = {Path(a["path"]).name for a in _in(lib)}
    assert names == {"peft-with-notes", "b.safetensors", "link.safetensors"}


def test_rm_refuses_everything_else(lib, tmp_path):
    before_lib, before_outside = _tree(lib), _tree(tmp_path / "outside")
    refusals = {
        "outside": (tmp_path / "outside" / "x.safetensors", "not in the Hugging Face cache or a library folder"),
        "dotdot": (f"{lib}/../outside/x.safetensors", "not in the Hugging Face cache or a library folder"),
        "dotdot folder": (f"{lib}/files/../../outside/peft", "not in the Hugging Face cache or a library folder"),
        "symlink out": (lib / "files" / "link.safetensors", "symbolic link"),
        "the folder": (lib, "not in the Hugging Face cache or a library folder"),
        "a base shard": (lib / "bases" / "model-00001-of-00002.safetensors", "not an adapter"),
        "other files": (lib / "peft-with-notes", "notes.txt"),
        "repo id with ..": ("alice/..", "not a Hub repo id"),
        "hf:// with ..": ("hf://alice/../../etc", "not a valid Hub repo id"),
        "missing": (lib / "nope.safetensors", "no such file"),
        "not cached": ("nobody/never-pulled", "not in the Hugging Face cache"),
    }
    for label, (target, message) in refusals.items():
        result = run_cli("rm", target, "--yes")
        assert result.returncode == 1, (label, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (label, result.stderr)
    assert _tree(lib) == before_lib and _tree(tmp_path / "outside") == before_outside


def test_rm_asks_first(lib):
    from lorahub.cli import cli

    target = lib / "files" / "b.safetensors"
    no = CliRunner().invoke(cli, ["rm", str(target)], input="n\n")
    assert no.exit_code == 1 and target.exists() and "nothing removed" in no.stderr
    assert "b.safetensors" in no.stderr  # what would go was shown
    eof = CliRunner().invoke(cli, ["rm", str(target)], input="")
    assert eof.exit_code == 1 and target.exists()
    yes = CliRunner().invoke(cli, ["rm", str(target)], input="y\n")
    assert yes.exit_code == 0 and not target.exists()
    assert run_cli("rm", lib / "files" / "a.safetensors", "--json").returncode == 2  # --json never asks
    assert (lib / "files" / "a.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# docs/json.md documents these payloads' keys


def _documented(command: str) -> tuple[set[str], set[str]]:
    text = (ROOT / "docs" / "json.md").read_text()
    row = re.search(rf"^\| `lorahub {command}` \| ([^|]+) \|", text, flags=re.M)
    assert row, f"docs/json.md has no row for lorahub {command}"
    keys = re.findall(r"`([a-z_]+\??)`", row.group(1))
    return {k for k in keys if not k.endswith("?")}, {k[:-1] for k in keys if k.endswith("?")}


def _check_keys(payload: dict, command: str) -> None:
    required, optional = _documented(command)
    assert required <= set(payload) <= required | optional, (command, sorted(payload))
    assert list(payload)[0] == "ok"


def test_json_keys_are_documented(lib, hub_server, small_hub, tiny_llama_dir):
    listing = _json("list")
    _check_keys(listing, "list")
    _check_keys(_json("list", "--fits", tiny_llama_dir), "list")
    assert "base" in _json("list", "--fits", tiny_llama_dir) and "base" not in listing
    _check_keys(_json("search", "--base", small_hub["bases"]["BASE1"]), "search")
    _check_keys(_json("rm", lib / "files" / "a.safetensors", "--yes"), "rm")
    # each listed adapter's row and each search result carry the keys the docs name
    text = (ROOT / "docs" / "json.md").read_text()
    row_keys = set(re.findall(r"`([a-z_]+)`", re.search(r"one row per adapter in `adapters`: ([^;]+);", text).group(1)))
    assert row_keys == set(listing["adapters"][0])
