"""`lorahub pull REPO[@REVISION]` and `lorahub push PATH REPO`."""
from __future__ import annotations

import click

from ..options import json_option, out_option, overwrite_option
from ..ui import clean, console, err_console, ok_payload, print_json, safe


def _prompt_choice(labels: list[str]) -> int:
    err_console.print("This repository holds several adapters:")
    for i, label in enumerate(labels, 1):
        err_console.print(f"  {i}. {safe(label)}")
    choice = click.prompt("Which one", type=click.IntRange(1, len(labels)), err=True)
    return choice - 1


@click.command("pull")
@click.argument("repo")
@click.option("--revision", "-r", default=None, help="Branch, tag or commit sha (overrides REPO@REVISION).")
@out_option(required=False, file_okay=False,
            help="Copy the adapter files into this folder (default: leave them in the HF cache).")
@overwrite_option()
@click.option("--include", default=None, metavar="PATTERN",
              help="Glob picking the adapter file(s) when the repo holds several (e.g. '*style*.safetensors').")
@click.option("--no-inspect", is_flag=True, help="Do not inspect the pulled adapter.")
@json_option
def pull_command(repo, revision, out, overwrite, include, no_inspect, as_json):
    """Download an adapter (only its files) from the Hugging Face Hub and inspect it.

    REPO is owner/name, owner/name@REVISION or hf://owner/name[@REVISION][/FILE]. Only the adapter's
    files are downloaded: a PEFT config and weights, or the LoRA .safetensors file of a kohya/diffusers
    repo (pass --include when there are several). Files land in the HF cache (HF_HOME / HF_HUB_CACHE)
    unless --out is given. HF_TOKEN or `hf auth login` authenticate; HF_HUB_OFFLINE=1 uses the cache only.

    \b
    Examples:
      lorahub pull alice/llama-lora
      lorahub pull alice/llama-lora@v1.0 --out ./llama-lora
      lorahub pull hf://alice/style-loras --include '*watercolor*'
    """
    from ..hub import interactive, pull

    result = pull(repo, revision=revision, include=include, out=out, overwrite=overwrite,
                  prompt=_prompt_choice if interactive() and not as_json else None)
    info = None
    if not no_inspect:
        from ..inspect import inspect_adapter

        info = inspect_adapter(result.path)
    if as_json:
        payload = result.as_dict()
        payload["out"] = None if out is None else str(result.path)
        if info is not None:
            from .inspect import inspect_payload

            payload["inspect"] = {k: v for k, v in inspect_payload(info).items() if k != "ok"}
        print_json(ok_payload(payload))
        return
    click.echo(str(result.path))
    commit = f" (commit {result.commit})" if result.commit else ""
    cached = " from the local cache" if result.offline else ""
    err_console.print(safe(f"pulled {result.repo_id}@{result.revision}{commit}{cached}: {', '.join(result.files)}"))
    if info is not None:
        from .inspect import render

        render(info)


@click.command("push")
@click.argument("path")  # a missing adapter is invalid input (exit 1), as in every command, not a usage error
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repository as private (when it does not exist).")
@click.option("--revision", "-r", default=None, metavar="BRANCH", help="Branch to commit to (created if missing).")
@click.option("--message", "-m", default=None, help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--base", default=None, metavar="SRC",
              help="Validate against this base model first (a path, a registry name or hf://owner/name); "
                   "its repo id becomes the card's base_model.")
@json_option
def push_command(path, repo, private, revision, message, create_pr, base, as_json):
    """Upload an adapter to the Hugging Face Hub with a generated model card.

    The adapter is inspected first (and with --base, validated against the base model); one that fails
    is not uploaded. The repository is created if needed. README.md gets YAML metadata (library_name,
    base_model, base_model_relation: adapter, tags) and a summary block between lorahub markers; any
    text you wrote (a README.md beside the adapter, or the one on the Hub) is kept. Your files are not
    modified. Needs a write token: HF_TOKEN or `hf auth login`.

    \b
    Examples:
      lorahub push ./llama-lora alice/llama-lora
      lorahub push ./llama-lora alice/llama-lora --base hf://meta-llama/Llama-3.1-8B --private
      lorahub push style.safetensors alice/style-lora --revision dev -m "epoch 10"
    """
    from ..hub import push

    result = push(path, repo, private=private, revision=revision, message=message, create_pr=create_pr,
                  base=base, on_progress=None if as_json else (lambda text: err_console.print(safe(text))))
    if as_json:
        print_json(ok_payload({"path": str(path), **result.as_dict()}))
        return
    if result.pr_url:
        console.print(safe(f"opened pull request {result.pr_url}"))
    click.echo(clean(result.commit_url or result.repo_url))  # URLs the Hub answered: no control characters
