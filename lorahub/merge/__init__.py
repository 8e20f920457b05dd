"""Merge LoRA adapters into a base model, and unmerge them, streaming one tensor at a time (docs/merge.md).

| module        | what it holds                                                                        |
| ------------- | ------------------------------------------------------------------------------------ |
| `plan.py`     | the base's files, which base tensor gets which ops, where each output byte comes from |
| `ops.py`      | the math on one tensor (fp32, in the base layout, in PEFT's order of operations)      |
| `pipeline.py` | reader / compute / writer threads; CUDA streams and pinned slots                     |
| `record.py`   | the merge record, adapter fingerprints, the undo file                                |
| `api.py`      | `merge`, `unmerge`, `MergeResult`                                                    |
"""
from .api import MergeResult, ProgressFactory, merge, unmerge
from .ops import Op, Workspace, apply_ops, fits_dtype
from .plan import AdapterInput
from .record import METADATA_KEY, RECORD_FILE, UNDO_PREFIX, adapter_fingerprint, read_record

__all__ = [
    "METADATA_KEY", "RECORD_FILE", "UNDO_PREFIX", "AdapterInput", "MergeResult", "Op", "ProgressFactory",
    "Workspace", "adapter_fingerprint", "apply_ops", "fits_dtype", "merge", "read_record", "unmerge",
]
