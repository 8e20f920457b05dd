"""`lorahub pull` / `lorahub push` and hf:// references, run as the real CLI against the test Hub."""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from huggingface_hub import HfApi, ModelCard, hf_hub_download

ALL_TOKENS = ("hf_test_alice_write", "hf_test_bob_write", "hf_test_alice_read", "hf_bogus_token")


def _tree(path: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under a folder (or of one file): proves nothing was modified."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


def run(hub_env, *args, token=None, env=None, ok=True, isolated=False):
    """The real CLI: in-process (fast) unless `isolated` or `env` is given; those run a subprocess with
    hub_env's fresh HF_HOME, since huggingface_hub reads HF_HOME/HF_ENDPOINT/HF_HUB_OFFLINE at import."""
    if isolated or env:
        result = hub_env.run(*args, token=token, env=env)
    else:
        result = run_cli(*args, env={"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": None})
    for secret in ALL_TOKENS:  # tokens never reach the output
        assert secret not in result.stdout and secret not in result.stderr
    if ok is True:
        assert result.returncode == 0, result.stderr
    elif ok is False:
        assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def base_repo(hub_server, tiny_llama_dir) -> str:
    """The tiny llama base model on the Hub (public)."""
    repo_id = hub_server.new_repo_id(prefix="tiny-llama")
    files = {p.name: p for p in tiny_llama_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    hub_server.seed_repo(repo_id, files)
    return repo_id


@pytest.fixture(scope="module")
def adapter_repo(hub_server, peft_lora_dir) -> tuple[str, str, str]:
    """A PEFT adapter seeded on the Hub: main (r=8), tag v1 = main, branch dev with an extra file.
    Returns (repo_id, sha of v1, sha of dev)."""
    repo_id = hub_server.new_repo_id(prefix="seeded-lora")
    files = {name: peft_lora_dir / name for name in ("adapter_config.json", "adapter_model.safetensors")}
    v1 = hub_server.seed_repo(repo_id, files, tag="v1")
    config = json.loads((peft_lora_dir / "adapter_config.json").read_text())
    config["lora_alpha"] = 32
    dev = hub_server.seed_repo(repo_id, {"adapter_config.json": json.dumps(config)}, branch="dev")
    return repo_id, v1, dev


# ---------------------------------------------------------------------------------------------
# round trip


def test_push_pull_round_trip(hub_server, hub_env, peft_lora_dir, base_repo, tmp_path):
    repo_id = hub_server.new_repo_id(prefix="lora")
    before = _tree(peft_lora_dir)
    hub_server.reset_stats()
    pushed = run(hub_env, "push", peft_lora_dir, repo_id, "--base", f"hf://{base_repo}", "-m", "first version",
                 token=hub_server.alice)
    assert _tree(peft_lora_dir) == before  # the user's folder is untouched
    commit_url = pushed.stdout.strip().splitlines()[-1]
    api = HfApi(token=hub_server.alice)
    info = api.model_info(repo_id)
    assert commit_url == f"{hub_server.url}/{repo_id}/commit/{info.sha}"
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "README.md", "adapter_config.json",
                                                    "adapter_model.safetensors"]
    assert api.list_repo_commits(repo_id)[0].title == "first version"
    # --base validated the adapter against the Hub base reading only safetensors headers
    weights = api.model_info(base_repo, files_metadata=True)
    sizes = {s.rfilename: s.size for s in weights.siblings}
    served = {p: n for (r, p), n in hub_server.stats.bytes_served.items() if r == base_repo}
    st_files = [p for p in sizes if p.endswith(".safetensors")]
    assert st_files and all(served.get(p, 0) < sizes[p] for p in st_files), (served, sizes)

    # the card: valid YAML for the Hub, parsed by huggingface_hub, user text (PEFT's template) kept
    card = ModelCard.load(repo_id)
    card.validate()
    assert card.data.base_model == base_repo
    assert card.data.base_model_relation == "adapter" and card.data.library_name == "peft"
    assert {"lora", "peft", f"base_model:adapter:{base_repo}"} <= set(card.data.tags)
    assert not any(str(t).startswith("base_model:adapter:/") for t in card.data.tags)  # no local paths
    assert card.text.count("<!-- lorahub:start -->") == 1 and "| rank | 8 |" in card.text
    sha = hashlib.sha256((peft_lora_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert sha in card.text
    if (peft_lora_dir / "README.md").exists():
        assert "Framework versions" in card.text
    assert info.card_data["base_model"] == base_repo

    # pull by repo id: into the HF cache, only the adapter files
    hub_server.reset_stats()
    pulled = json.loads(run(hub_env, "pull", repo_id, "--json", isolated=True).stdout)
    assert sorted(pulled["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert pulled["commit"] == info.sha and pulled["inspect"]["format"] == "peft"
    assert pulled["inspect"]["rank"] == 8
    local = Path(pulled["path"])
    assert str(local).startswith(hub_env["HF_HOME"])  # the HF cache of that process's HF_HOME
    for name in pulled["files"]:
        assert (local / name).read_bytes() == (peft_lora_dir / name).read_bytes()
    downloaded = {p for (r, p) in hub_server.stats.bytes_served if r == repo_id}
    assert downloaded == {"adapter_config.json", "adapter_model.safetensors"}

    # pull by commit sha, copied to --out; the text output starts with the local path
    out = tmp_path / "copy"
    text = run(hub_env, "pull", f"{repo_id}@{info.sha}", "--out", out).stdout
    assert text.splitlines()[0] == str(out)
    assert sorted(p.name for p in out.iterdir()) == [".lorahub-output.json", "adapter_config.json",
                                                     "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (peft_lora_dir / name).read_bytes()

    # offline, the cached pull is found again; nothing cached for another revision
    offline = {"HF_HUB_OFFLINE": "1"}
    again = json.loads(run(hub_env, "pull", repo_id, "--json", "--no-inspect", env=offline).stdout)
    assert again["path"] == pulled["path"] and again["from_cache_only"]
    res = run(hub_env, "pull", f"{repo_id}@v2", env=offline, ok=False)
    assert error_line(res) == (f"error: HF_HUB_OFFLINE=1 and '{repo_id}' (revision v2) is not in the local "
                               f"cache; run the pull once while online")

    # a second push with no change only rewrites the card (same summary → no new commit at all)
    run(hub_env, "push", peft_lora_dir, repo_id, "--base", f"hf://{base_repo}", token=hub_server.alice)
    assert api.model_info(repo_id).sha == info.sha


def test_pull_revisions(hub_env, adapter_repo, peft_lora_dir):
    repo_id, v1, dev = adapter_repo

    def alpha(*args):
        res = json.loads(run(hub_env, "pull", *args, "--json").stdout)
        return res["commit"], res["inspect"]["alpha"]

    assert alpha(f"{repo_id}@dev") == (dev, 32)
    assert alpha(f"hf://{repo_id}@v1") == (v1, 16)
    assert alpha(repo_id, "--revision", dev) == (dev, 32)
    assert alpha(f"{repo_id}@{v1}") == (v1, 16)


def test_inspect_hf_reference(hub_env, adapter_repo):
    repo_id, v1, _ = adapter_repo
    res = run(hub_env, "inspect", f"hf://{repo_id}@v1", "--json")
    info = json.loads(res.stdout)
    assert info["format"] == "peft" and info["rank"] == 8 and f"snapshots/{v1}" in info["path"]


def test_validate_hf_adapter_against_hf_base_reads_headers_only(hub_server, hub_env, adapter_repo, base_repo,
                                                               tiny_llama_dir):
    repo_id, _, _ = adapter_repo
    hub_server.reset_stats()
    payload = json.loads(run(hub_env, "validate", f"hf://{repo_id}", "--base", f"hf://{base_repo}", "--json").stdout)
    assert payload["ok"] is True and payload["matched"] == payload["modules"] == 14
    # the base's weights: exactly the 8-byte length and the JSON header of each file, nothing more
    served = {p: n for (r, p), n in hub_server.stats.bytes_served.items()
              if r == base_repo and p.endswith(".safetensors")}
    weights = sorted(p.name for p in tiny_llama_dir.glob("*.safetensors"))
    assert sorted(served) == weights
    for name in weights:
        with open(tiny_llama_dir / name, "rb") as handle:
            header = 8 + int.from_bytes(handle.read(8), "little")
        assert served[name] == header < (tiny_llama_dir / name).stat().st_size, name


def test_pull_falls_back_to_the_cache_when_the_hub_is_unreachable(hub_server, hub_env, peft_lora_dir):
    """docs/hub.md: with the network down (and no HF_HUB_OFFLINE), a cached pull is found again."""
    repo_id = hub_server.new_repo_id(prefix="cached")
    hub_server.seed_repo(repo_id, {name: peft_lora_dir / name
                                   for name in ("adapter_config.json", "adapter_model.safetensors")})
    first = json.loads(run(hub_env, "pull", repo_id, "--json", "--no-inspect").stdout)
    assert first["from_cache_only"] is False
    hub_server.fail("close")  # every request: the connection is dropped
    try:
        again = json.loads(run(hub_env, "pull", repo_id, "--json", "--no-inspect").stdout)
        res = run(hub_env, "pull", hub_server.new_repo_id(prefix="never-pulled"), ok=False)
    finally:
        hub_server.heal()
    assert again["from_cache_only"] is True
    assert again["path"] == first["path"] and again["commit"] == first["commit"]
    assert error_line(res).startswith(f"error: cannot reach the Hugging Face Hub at {hub_server.url}")


def test_pull_picks_one_adapter_or_asks(hub_server, hub_env, kohya_unet_file, tmp_path):
    repo_id = hub_server.new_repo_id(prefix="styles")
    hub_server.seed_repo(repo_id, {"watercolor.safetensors": kohya_unet_file, "ink.safetensors": kohya_unet_file,
                                   "README.md": "# two styles\n"})
    res = run(hub_env, "pull", repo_id, ok=False)
    assert error_line(res) == (f"error: Hub repository '{repo_id}' holds several adapters (ink.safetensors, "
                               f"watercolor.safetensors); pass --include PATTERN (or hf://{repo_id}/FILE) to "
                               f"pick one")
    res = json.loads(run(hub_env, "pull", repo_id, "--include", "water*", "--json").stdout)
    assert res["files"] == ["watercolor.safetensors"] and res["inspect"]["format"] == "kohya"
    assert Path(res["path"]).read_bytes() == kohya_unet_file.read_bytes()
    res = json.loads(run(hub_env, "pull", f"hf://{repo_id}/ink.safetensors", "--json", "--no-inspect",
                         "--out", tmp_path / "o").stdout)
    assert res["path"] == str(tmp_path / "o" / "ink.safetensors")


def test_push_keeps_user_card_text_and_unknown_keys(hub_server, hub_env, kohya_unet_file):
    repo_id = hub_server.new_repo_id(prefix="kohya")
    hub_server.seed_repo(repo_id, {"README.md": (
        "---\nlicense: mit\nbase_model: org/sd15-base\nwidget:\n- text: a cat\ntags:\n- anime\n---\n\n# My style\n\nTrigger word: `sks`.\n\n"
        "<!-- lorahub:start -->\nold generated text\n<!-- lorahub:end -->\n\n## Credits\nme\n")})
    before = _tree(kohya_unet_file)
    run(hub_env, "push", kohya_unet_file, repo_id, token=hub_server.alice)
    assert _tree(kohya_unet_file) == before
    text = Path(hf_hub_download(repo_id, "README.md")).read_text()
    card = ModelCard(text)
    assert card.data.license == "mit" and card.data.widget == [{"text": "a cat"}]
    assert card.data.tags[0] == "anime" and "lora" in card.data.tags
    assert card.data.base_model == "org/sd15-base" and card.data.base_model_relation == "adapter"
    assert "Trigger word: `sks`." in text and "## Credits\nme" in text and "old generated text" not in text
    assert text.count("<!-- lorahub:start -->") == 1 and "| format | kohya |" in text
    assert text.index("# My style") < text.index("<!-- lorahub:start -->") < text.index("## Credits")
    assert kohya_unet_file.name in HfApi().list_repo_files(repo_id)


def test_push_to_branch_private_and_stored_token(hub_server, hub_env, peft_lora_dir):
    repo_id = hub_server.new_repo_id(prefix="private")
    # `hf auth login` stores the token in $HF_HOME/token; lorahub uses it like the hf CLI
    home = Path(hub_env["HF_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "token").write_text(hub_server.alice)
    res = json.loads(run(hub_env, "push", peft_lora_dir, repo_id, "--private", "--revision", "dev",
                         "--json", isolated=True).stdout)
    assert res["created_repo"] and res["revision"] == "dev"
    api = HfApi(token=hub_server.alice)
    assert api.model_info(repo_id).private
    assert "adapter_model.safetensors" in api.list_repo_files(repo_id, revision="dev")
    assert "adapter_model.safetensors" not in api.list_repo_files(repo_id)
    pulled = json.loads(run(hub_env, "pull", f"{repo_id}@dev", "--json", "--no-inspect", isolated=True).stdout)
    assert pulled["commit"] == res["commit"]
    # --create-pr opens refs/pr/N
    res = json.loads(run(hub_env, "push", peft_lora_dir, repo_id, "--create-pr", "-m", "tweak", "--json",
                         isolated=True).stdout)
    assert res["pr_url"].endswith("/discussions/1")
    # without the stored token the private repo is invisible
    (home / "token").unlink()
    res = run(hub_env, "pull", repo_id, ok=False, isolated=True)
    assert error_line(res) == (f"error: Hub repository '{repo_id}' not found (if it is private, set HF_TOKEN "
                               f"or run 'hf auth login')")


def test_push_refuses_an_adapter_that_does_not_fit(hub_server, hub_env, peft_wide_dir, base_repo):
    repo_id = hub_server.new_repo_id(prefix="wide")
    res = run(hub_env, "push", peft_wide_dir, repo_id, "--base", f"hf://{base_repo}", token=hub_server.alice,
              ok=False)
    assert error_line(res).startswith("error: refusing to push: does not fit")
    assert not HfApi(token=hub_server.alice).repo_exists(repo_id)


# ---------------------------------------------------------------------------------------------
# errors: one line each, exit 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_error_messages(hub_server, hub_env, adapter_repo, peft_lora_dir):
    repo_id, _, _ = adapter_repo
    missing = hub_server.new_repo_id(prefix="missing")
    private = hub_server.new_repo_id(prefix="secret")
    hub_server.seed_repo(private, {"adapter_config.json": peft_lora_dir / "adapter_config.json",
                                   "adapter_model.safetensors": peft_lora_dir / "adapter_model.safetensors"},
                         private=True)
    port = _closed_port()
    cases = [
        (("pull", missing), {}, None,
         f"error: Hub repository '{missing}' not found (if it is private, set HF_TOKEN or run 'hf auth login')"),
        (("pull", f"hf://{repo_id}/nope.safetensors"), {}, None,
         f"error: file 'nope.safetensors' not found in Hub repository '{repo_id}'"),
        (("inspect", f"hf://{repo_id}@v9"), {}, None,
         f"error: revision 'v9' not found in Hub repository '{repo_id}'"),
        (("push", peft_lora_dir, hub_server.new_repo_id()), {}, None,
         "error: pushing needs a Hugging Face token with write access: set HF_TOKEN or run 'hf auth login'"),
        (("pull", repo_id), {}, "hf_bogus_token",
         "error: the Hub rejected the token in HF_TOKEN as invalid; set a valid HF_TOKEN or run 'hf auth login'"),
        (("pull", private), {}, hub_server.bob,
         f"error: Hub repository '{private}' not found, or it is private and the token in HF_TOKEN has no "
         f"access to it"),
        (("push", peft_lora_dir, private), {}, hub_server.reader,
         f"error: permission denied on Hub repository '{private}': You don't have the rights to write to "
         f"{private}: your token is read-only"),
        (("pull", repo_id), {"HF_HUB_OFFLINE": "1"}, None,
         f"error: HF_HUB_OFFLINE=1 and '{repo_id}' (revision main) is not in the local cache; run the pull "
         f"once while online"),
        (("pull", repo_id), {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}, None,
         f"error: cannot reach the Hugging Face Hub at http://127.0.0.1:{port}: [Errno 111] Connection refused"),
    ]
    for args, env, token, expected in cases:
        res = run(hub_env, *args, env=env, token=token, ok=False)
        assert error_line(res) == expected, args


def test_server_failure_is_one_line(hub_server, hub_env, adapter_repo):
    repo_id, _, _ = adapter_repo
    hub_server.fail("500")
    try:
        res = run(hub_env, "pull", repo_id, ok=False)
    finally:
        hub_server.heal()
    assert error_line(res) == (f"error: the Hugging Face Hub at {hub_server.url} failed (500): Internal Error "
                               f"(injected); try again later")


# ---------------------------------------------------------------------------------------------
# pure helpers


def test_parse_ref_forms():
    from lorahub.hub import HubRef, parse_ref

    assert parse_ref("hf://alice/lora") == HubRef("alice/lora", None, None)
    assert parse_ref("alice/lora@v1") == HubRef("alice/lora", "v1", None)
    assert parse_ref("hf://alice/lora@refs/pr/2/sub/a.safetensors") == HubRef("alice/lora", "refs/pr/2",
                                                                               "sub/a.safetensors")
    assert parse_ref("hf://alice/lora@feat%2Fx/a.safetensors") == HubRef("alice/lora", "feat/x", "a.safetensors")
    assert parse_ref("hf://alice/lora@v1", revision="main").revision == "main"
    with pytest.raises(Exception, match="not a Hub reference"):
        parse_ref("hf://alice")


def test_choose_adapter_files():
    from lorahub.errors import LorahubError
    from lorahub.hub import choose_adapter_files

    peft = ["README.md", ".gitattributes", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    assert choose_adapter_files(peft, repo_id="a/b") == ["adapter_config.json", "adapter_model.safetensors"]
    # pickle weights only when there is no safetensors
    assert choose_adapter_files(["adapter_config.json", "adapter_model.bin"], repo_id="a/b")[1] == "adapter_model.bin"
    # PEFT adapters in sub-folders: several → ask; a folder path picks one
    nested = ["x/adapter_config.json", "x/adapter_model.safetensors", "y/adapter_config.json",
              "y/adapter_model.safetensors"]
    with pytest.raises(LorahubError, match=r"several adapters \(x/ \(PEFT adapter\), y/ \(PEFT adapter\)\)"):
        choose_adapter_files(nested, repo_id="a/b")
    assert choose_adapter_files(nested, repo_id="a/b", path="y") == ["y/adapter_config.json",
                                                                       "y/adapter_model.safetensors"]
    assert choose_adapter_files(nested, repo_id="a/b", include="x/*")[0] == "x/adapter_config.json"
    assert choose_adapter_files(nested, repo_id="a/b", prompt=lambda labels: 1)[0] == "y/adapter_config.json"
    # a full model's weights are not adapter candidates
    assert choose_adapter_files(["model.safetensors", "lora.safetensors"], repo_id="a/b") == ["lora.safetensors"]
    with pytest.raises(LorahubError, match="no adapter in Hub repository 'a/b'"):
        choose_adapter_files(["config.json", "model.safetensors"], repo_id="a/b")
    with pytest.raises(LorahubError, match="matches --include 'z\\*'"):
        choose_adapter_files(nested, repo_id="a/b", include="z*")


def test_card_rendering_is_stable_and_keeps_text():
    from lorahub.hub import render_card, split_front_matter

    info = {"format": "peft", "modules": 2, "rank": 4, "rank_distribution": {"4": 2}, "alpha": 8,
            "alpha_distribution": {"8": 2}, "scale": 2, "scale_distribution": {"2": 2}, "targets": {"q_proj": 2},
            "trainable_parameters": 10, "dtypes": {"F32": 4}, "files": [], "base_model": "/local/path"}
    user = "---\nlicense: apache-2.0\nbase_model: /local/path\ntags: [base_model:adapter:/local/path, x]\n---\n\nMine.\n"
    once = render_card(user, info, repo_id="a/b", base_model="org/base")
    assert render_card(once, info, repo_id="a/b", base_model="org/base") == once
    meta, body, _ = split_front_matter(once)
    assert meta == {"license": "apache-2.0", "base_model": "org/base", "tags": ["x", "lora", "peft",
                    "base_model:adapter:org/base"], "library_name": "peft", "base_model_relation": "adapter"}
    assert body.startswith("Mine.\n") and body.count("<!-- lorahub:start -->") == 1


def test_every_adapter_command_takes_hf_references(hub_env, adapter_repo, peft_lora_dir, tiny_llama_dir, tmp_path):
    """resize, blend, convert and merge pull `hf://` adapters first and work on the pulled files."""
    from safetensors.torch import load_file

    repo_id, v1, _ = adapter_repo
    ref = f"hf://{repo_id}@v1"
    converted = tmp_path / "k.safetensors"
    run(hub_env, "convert", ref, "--to", "kohya", "--out", converted)
    local = run(hub_env, "convert", peft_lora_dir, "--to", "kohya", "--out", tmp_path / "local.safetensors")
    assert local.returncode == 0
    assert load_file(str(converted)).keys() == load_file(str(tmp_path / "local.safetensors")).keys()
    resized = json.loads(run(hub_env, "resize", ref, "--rank", "2", "--out", tmp_path / "r2", "--json").stdout)
    assert resized["summary"]["resized"] == 14
    # half the pulled adapter plus half the local copy of the same adapter is that adapter
    run(hub_env, "blend", ref, str(peft_lora_dir), "--weights", "0.5,0.5", "--method", "svd",
        "--out", tmp_path / "same")
    from lorahub.formats import load_adapter

    original, same = load_adapter(peft_lora_dir), load_adapter(tmp_path / "same")
    for target, layer in original.layers.items():
        assert same.layers[target].rank == layer.rank
        torch.testing.assert_close(same.layers[target].delta_weight(), layer.delta_weight(), rtol=1e-4, atol=1e-5)
    run(hub_env, "merge", "--base", tiny_llama_dir, ref, "--out", tmp_path / "merged")
    run(hub_env, "merge", "--base", tiny_llama_dir, peft_lora_dir, "--out", tmp_path / "merged_local")
    assert load_file(str(tmp_path / "merged" / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "merged_local" / "model.safetensors")).keys()
    for key, value in load_file(str(tmp_path / "merged" / "model.safetensors")).items():
        assert value.equal(load_file(str(tmp_path / "merged_local" / "model.safetensors"))[key])


def test_pull_out_never_leaves_a_partial_file(hub_env, adapter_repo, peft_lora_dir, tmp_path, monkeypatch):
    """A copy into --out that fails half-way (disk full) leaves no --out and no temporaries."""
    import shutil as real_shutil
    import types

    import lorahub.hub.download as hub

    calls = []

    def copyfile(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the second file: half written, then the disk is full
            Path(dst).write_bytes(Path(src).read_bytes()[: Path(src).stat().st_size // 2])
            raise OSError(28, "No space left on device", str(dst))
        return real_shutil.copyfile(src, dst)

    monkeypatch.setattr(hub, "shutil", types.SimpleNamespace(copyfile=copyfile))
    out = tmp_path / "copy"
    result = run(hub_env, "pull", adapter_repo[0], "--out", out, ok=False)
    assert "No space left" in error_line(result)
    # the folder is written beside --out and swapped in whole (lorahub.output): nothing lands, nothing is left
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".copy.")]
