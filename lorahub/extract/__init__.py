"""Extract a LoRA from a fine-tuned model: ΔW = tuned − base per layer, factored at rank R (docs/extract.md).

| module      | what it holds                                                                              |
| ----------- | ------------------------------------------------------------------------------------------ |
| `plan.py`   | both models from headers: tensors paired by name, filters, what each tensor becomes         |
| `svd.py`    | randomized SVD with power iterations (Halko et al.), exact fallback, the rank rules, stats  |
| `stream.py` | two reader threads (base, tuned) filling a ring of chunk buffers; ΔW assembled on the device |
| `api.py`    | `extract`, `ExtractResult` (the adapter, the per-layer report)                             |
"""
from .api import ExtractReport, ExtractResult, LayerExtract, check_options, extract
from .plan import ExtractPlan, Pair, plan_extract
from .svd import Decomposition, RankRule, decompose, randomized_svd

__all__ = [
    "Decomposition", "ExtractPlan", "ExtractReport", "ExtractResult", "LayerExtract", "Pair", "RankRule",
    "check_options", "decompose", "extract", "plan_extract", "randomized_svd",
]
