"""The test Hub server speaks enough of the Hub protocol for the real huggingface_hub client."""
from __future__ import annotations

import http.client
import json
import os
import struct
from pathlib import Path

import fixtures_hub
import pytest

hh = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError  # noqa: E402


def _safetensors_bytes(n_floats: int, metadata: dict | None = None) -> bytes:
    header = {"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + os.urandom(4 * n_floats)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "upload"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 4}\n')
    (d / "adapter_model.safetensors").write_bytes(_safetensors_bytes(50_000, {"format": "pt"}))  # 200 KB
    (d / "sub" / "notes.txt").write_text("hello\n")
    (d / "README.md").write_text("---\nbase_model: org/base\ntags: [lora, peft]\nlibrary_name: peft\n---\n# hi\n")
    return d


def test_environment_points_at_local_server(hub_server):
    from huggingface_hub import constants

    assert constants.ENDPOINT == hub_server.url == fixtures_hub.HUB_URL
    assert constants.HF_HUB_DISABLE_XET
    assert constants.HF_HOME == os.environ["HF_HOME"] and "HF_TOKEN" not in os.environ


def test_whoami_and_bad_token(hub_server):
    assert HfApi(token=hub_server.alice).whoami()["name"] == "alice"
    assert HfApi(token=hub_server.reader).whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        HfApi(token="hf_nope").whoami()
    # an unknown token is refused even on a public read
    with pytest.raises(HfHubHTTPError, match="Invalid credentials in Authorization header"):
        HfApi(token="hf_nope").model_info("alice/anything")


def test_upload_list_info_download(hub_server, folder, tmp_path):
    api = HfApi(token=hub_server.alice)
    repo_id = hub_server.new_repo_id()
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id and url.endpoint == hub_server.url
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id  # 409 with url is swallowed
    with pytest.raises(HfHubHTTPError, match="already created"):
        api.create_repo(repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes"]

    hub_server.reset_stats()
    info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="add adapter")
    assert info.oid and len(info.oid) == 40 and info.commit_url.endswith(f"/{repo_id}/commit/{info.oid}")
    assert hub_server.stats.count("PUT", "lfs-upload") == 1  # the safetensors file went through LFS
    assert hub_server.stats.count("POST", "lfs-verify") == 1
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "README.md", "adapter_config.json",
                                                    "adapter_model.safetensors", "sub/notes.txt"]
    m = api.model_info(repo_id)
    assert m.sha == info.oid
    assert m.card_data["base_model"] == "org/base" and m.card_data["tags"] == ["lora", "peft"]
    m = api.model_info(repo_id, files_metadata=True)
    sib = {s.rfilename: s for s in m.siblings}
    weights = (folder / "adapter_model.safetensors").read_bytes()
    assert sib["adapter_model.safetensors"].lfs.size == len(weights)
    assert sib["adapter_config.json"].lfs is None
    tree = {e.path: e for e in api.list_repo_tree(repo_id, recursive=True)}
    assert {"sub", "sub/notes.txt"} <= set(tree)
    assert [e.path for e in api.list_repo_tree(repo_id, path_in_repo="sub")] == ["sub/notes.txt"]
    assert [e.path for e in api.get_paths_info(repo_id, ["sub", "README.md", "missing"])] == ["sub", "README.md"]

    hub_server.reset_stats()
    path = hf_hub_download(repo_id, "adapter_model.safetensors")
    assert Path(path).read_bytes() == weights
    assert Path(path).parent.name == info.oid  # snapshot dir named by X-Repo-Commit
    assert hub_server.stats.bytes_served[(repo_id, "adapter_model.safetensors")] == len(weights)
    # cached: a second call only sends a HEAD
    hub_server.reset_stats()
    assert hf_hub_download(repo_id, "adapter_model.safetensors") == path
    assert hub_server.stats.count("GET", "resolve") == 0

    # unchanged files are skipped by the client (preupload oid), so nothing is re-uploaded
    hub_server.reset_stats()
    api.upload_folder(folder_path=folder, repo_id=repo_id)
    assert hub_server.stats.count("PUT", "lfs-upload") == 0
    assert api.model_info(repo_id).sha == info.oid

    # delete a file and a folder
    api.delete_file("sub/notes.txt", repo_id)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="d/x.txt", repo_id=repo_id)
    api.delete_folder("d", repo_id)
    assert "d/x.txt" not in api.list_repo_files(repo_id)
    commits = api.list_repo_commits(repo_id)
    assert commits[-1].title == "initial commit" and "add adapter" in [c.title for c in commits]


def test_revisions_branch_tag_sha(hub_server, folder, tmp_path):
    api = HfApi(token=hub_server.alice)
    repo_id = hub_server.new_repo_id()
    api.create_repo(repo_id)
    first = api.upload_folder(folder_path=folder, repo_id=repo_id).oid
    api.create_tag(repo_id, tag="v1")
    api.create_branch(repo_id, branch="dev")
    api.upload_file(path_or_fileobj=b'{"r": 8}\n', path_in_repo="adapter_config.json", repo_id=repo_id,
                    revision="dev")
    second = api.upload_file(path_or_fileobj=b'{"r": 16}\n', path_in_repo="adapter_config.json",
                             repo_id=repo_id).oid
    refs = api.list_repo_refs(repo_id)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1"]

    def config_at(rev: str) -> str:
        d = snapshot_download(repo_id, revision=rev, allow_patterns=["*.json"],
                              local_dir=tmp_path / f"snap-{rev.replace('/', '_')}")
        files = sorted(p.name for p in Path(d).rglob("*") if p.is_file() and ".cache" not in p.parts)
        assert files == ["adapter_config.json"]
        return (Path(d) / "adapter_config.json").read_text()

    assert config_at("main") == '{"r": 16}\n'
    assert config_at("dev") == '{"r": 8}\n'
    assert config_at("v1") == '{"r": 4}\n'
    assert config_at(first) == '{"r": 4}\n'
    cache_dir = snapshot_download(repo_id, revision=second, allow_patterns=["*.json"])
    assert Path(cache_dir).name == second

    # commits to a tag or a sha are refused; a stale parent commit is refused
    with pytest.raises(HfHubHTTPError, match="not a branch"):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, revision="v1")
    with pytest.raises(HfHubHTTPError, match="A commit has happened since"):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, parent_commit=first)
    # create_pr lands on refs/pr/N without moving main
    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="pr.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert "pr.txt" not in api.list_repo_files(repo_id)
    assert "pr.txt" in api.list_repo_files(repo_id, revision="refs/pr/1")
    api.delete_branch(repo_id, branch="dev")
    api.delete_tag(repo_id, tag="v1")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(repo_id, revision="dev")


def test_safetensors_metadata_reads_only_the_header(hub_server, folder):
    repo_id = hub_server.new_repo_id()
    data = (folder / "adapter_model.safetensors").read_bytes()
    hub_server.seed_repo(repo_id, {"model.safetensors": data})
    hub_server.reset_stats()
    meta = hh.get_safetensors_metadata(repo_id)
    fm = meta.files_metadata["model.safetensors"]
    assert fm.metadata == {"format": "pt"} and fm.tensors["w"].shape == [50_000]
    served = hub_server.stats.bytes_served[(repo_id, "model.safetensors")]
    assert 0 < served <= 100_001 < len(data)
    assert all(r["status"] == 206 for r in hub_server.stats.ranges) and hub_server.stats.ranges


def test_raw_ranges_and_keepalive(hub_server):
    repo_id = hub_server.new_repo_id()
    hub_server.seed_repo(repo_id, {"f.bin": bytes(range(100))})
    conn = http.client.HTTPConnection("127.0.0.1", hub_server.port, timeout=10)

    def get(headers, method="GET", path=f"/{repo_id}/resolve/main/f.bin", body=None):
        conn.request(method, path, body=body, headers=headers, encode_chunked=body is not None)
        r = conn.getresponse()
        return r, r.read()

    r, b = get({"Range": "bytes=10-19"})
    assert r.status == 206 and b == bytes(range(10, 20)) and r.headers["Content-Range"] == "bytes 10-19/100"
    assert r.headers["X-Linked-Size"] == "100" and r.headers["Accept-Ranges"] == "bytes"
    r, b = get({"Range": "bytes=-5"})
    assert r.status == 206 and b == bytes(range(95, 100))
    r, b = get({"Range": "bytes=90-"})
    assert r.status == 206 and b == bytes(range(90, 100))
    r, b = get({"Range": "bytes=100-"})
    assert r.status == 416 and r.headers["Content-Range"] == "bytes */100"
    r, b = get({}, method="HEAD")
    assert r.status == 200 and b == b"" and r.headers["Content-Length"] == "100" and len(r.headers["X-Repo-Commit"]) == 40
    # a chunked body on an error path is consumed, and the connection stays usable
    r, b = get({"Transfer-Encoding": "chunked", "Content-Type": "application/json"}, method="POST",
               path="/api/validate-yaml", body=iter([b'{"content": "---\\n- a list\\n---\\n"}']))
    assert r.status == 400 and json.loads(b)["errors"]
    r, b = get({})
    assert r.status == 200 and b == bytes(range(100))
    conn.close()


def test_private_repos_and_not_found_errors(hub_server, tmp_path):
    repo_id = hub_server.new_repo_id(prefix="private")
    alice, bob = HfApi(token=hub_server.alice), HfApi(token=hub_server.bob)
    alice.create_repo(repo_id, private=True)
    alice.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=repo_id)
    assert alice.model_info(repo_id).private
    hub_server.reset_stats()
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info(repo_id)  # anonymous: 401
    with pytest.raises(RepositoryNotFoundError):
        bob.model_info(repo_id)  # authenticated, not the owner: 404
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "s.txt", token=hub_server.bob)
    assert [s for (_, k, _, s) in hub_server.stats.requests if k == "info"] == [401, 404]
    assert not bob.repo_exists(repo_id) and alice.repo_exists(repo_id)
    assert Path(hf_hub_download(repo_id, "s.txt", token=hub_server.alice)).read_bytes() == b"secret"
    # bob cannot write to alice's namespace; the read-only token cannot write at all
    with pytest.raises(HfHubHTTPError, match="rights"):
        bob.create_repo(hub_server.new_repo_id("alice"))
    with pytest.raises(HfHubHTTPError, match="read-only"):
        HfApi(token=hub_server.reader).create_repo(hub_server.new_repo_id("alice"))
    alice.update_repo_settings(repo_id, private=False)
    assert HfApi().model_info(repo_id).private is False

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/does-not-exist", "x.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "s.txt", revision="nope")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt")
    assert not alice.file_exists(repo_id, "missing.txt") and alice.file_exists(repo_id, "s.txt")
    alice.delete_repo(repo_id)
    assert not alice.repo_exists(repo_id)


def test_readme_yaml_validation(hub_server):
    api = HfApi(token=hub_server.alice)
    repo_id = hub_server.new_repo_id()
    api.create_repo(repo_id)
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(path_or_fileobj=b"---\n- not\n- a mapping\n---\ntext\n", path_in_repo="README.md",
                        repo_id=repo_id)
    card = ModelCard("---\nbase_model: org/base\nbase_model_relation: adapter\ntags:\n- lora\n---\n# card\n")
    card.validate()
    card.push_to_hub(repo_id, token=hub_server.alice)
    loaded = ModelCard.load(repo_id)
    assert loaded.data.base_model == "org/base" and loaded.data.tags == ["lora"]


def test_failure_injection(hub_server):
    repo_id = hub_server.new_repo_id()
    hub_server.seed_repo(repo_id, {"a.txt": "a"})
    try:
        hub_server.fail("500", kinds={"info"})
        with pytest.raises(HfHubHTTPError, match="500"):
            HfApi().model_info(repo_id)
        hub_server.fail("close", kinds={"info"})
        with pytest.raises(Exception) as excinfo:
            HfApi().model_info(repo_id)
        assert not isinstance(excinfo.value, HfHubHTTPError) or "500" not in str(excinfo.value)
    finally:
        hub_server.heal()
    assert HfApi().model_info(repo_id).id == repo_id


def test_xet_endpoints_answer_501(hub_server):
    repo_id = hub_server.new_repo_id()
    hub_server.seed_repo(repo_id, {"a.txt": "a"})
    conn = http.client.HTTPConnection("127.0.0.1", hub_server.port, timeout=10)
    conn.request("GET", f"/api/models/{repo_id}/xet-write-token/main",
                 headers={"Authorization": f"Bearer {hub_server.alice}"})
    r = conn.getresponse()
    assert r.status == 501 and "HF_HUB_DISABLE_XET" in r.read().decode()
    conn.close()
