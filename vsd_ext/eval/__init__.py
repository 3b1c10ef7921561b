"""Evaluation of decoding methods against autoregressive decoding of the same target.

- `harness.py`   `evaluate`: τ, tokens/s and speedup with confidence intervals (`vsd eval`)
- `lossless.py`  the lossless checks (T = 0: identical outputs; T > 0: a PIT χ² test)
- `stats.py`     χ² p-values and bootstrap intervals (torch + math only)
- `report.py`    the table, report.json and report.png
"""
from .harness import EVAL_SETS, evaluate, evaluation_prompts, heldout_prompts, read_prompts_jsonl
from .lossless import LosslessConfig
from .report import TAU_CONVENTION, format_table, write_report

__all__ = ["LosslessConfig", "TAU_CONVENTION", "evaluate", "evaluation_prompts", "EVAL_SETS",
           "format_table", "heldout_prompts",
           "read_prompts_jsonl", "write_report"]
