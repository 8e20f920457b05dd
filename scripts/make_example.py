"""Regenerate the example bundled with lorahub (lorahub/examples/): a tiny Llama-shaped base model and
a LoRA made for it by PEFT. Needs the test extra (transformers, peft): `pip install '.[test]'`."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures_models import make_peft_lora, make_tiny_llama  # noqa: E402


def main() -> None:
    out = ROOT / "lorahub" / "examples"
    work = ROOT / "build" / "example-work"
    shutil.rmtree(work, ignore_errors=True)
    base = make_tiny_llama(work / "tiny-llama")
    adapter = make_peft_lora(work / "tiny-lora", base)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(base, out / "tiny-llama")
    shutil.copytree(adapter, out / "tiny-lora")
    config_path = out / "tiny-lora" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "lorahub-example/tiny-llama"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(ROOT)}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
