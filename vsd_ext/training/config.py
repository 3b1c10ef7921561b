"""Training configuration: one dataclass per objective and one for the trainer.

Every constant of docs/design/METHOD.md is a field here, with its default there, so that a run
is fully described by its `TrainConfig` (saved next to every checkpoint). `validate()`
raises `ValueError` naming the field for anything out of range.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

METHODS = ("eagle3", "auf", "vsd")
PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("cosine", "constant")
CLOCKS = ("wall", "process")
REACH_MODES = ("expected", "realized")
BASELINES = ("mean", "none")


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"TrainConfig: {name} {msg}")


@dataclass
class Eagle3Config:
    """EAGLE-3 training-time test: unroll `steps` drafter steps, each fed the drafter's own
    hidden state of the previous step; soft CE against the target on the draft vocabulary
    (teacher logits divided by `soft_temperature`); step j weighted `step_decay ** j`."""

    steps: int = 5
    step_decay: float = 0.8
    soft_temperature: float = 1.0

    def validate(self, prefix: str = "eagle3") -> None:
        _check(isinstance(self.steps, int) and self.steps >= 1, f"{prefix}.steps",
               f"must be an integer >= 1, got {self.steps!r}")
        _check(0 < self.step_decay <= 1, f"{prefix}.step_decay",
               f"must be in (0, 1], got {self.step_decay}")
        _check(self.soft_temperature > 0, f"{prefix}.soft_temperature",
               f"must be > 0, got {self.soft_temperature}")


@dataclass
class AUFConfig:
    """Accept-Until-Fail: the same unroll, hard CE on the ground-truth token, kept at step j
    only while the drafter's greedy token matched the ground truth at every step < j (so up
    to and including the first mismatch)."""

    steps: int = 5

    def validate(self) -> None:
        _check(isinstance(self.steps, int) and self.steps >= 1, "auf.steps",
               f"must be an integer >= 1, got {self.steps!r}")


@dataclass
class VSDConfig:
    """The VSD objective of docs/design/METHOD.md (names follow its notation).

    E-step at the decoding temperature `temperature`: at `anchors` positions per sequence,
    T > 0 — the drafter samples `paths` i.i.d. chains of `depth` tokens from q_T, the target
    scores every node in one tree forward and each chain is verified ("sampled" mode);
    T = 0 — the drafter builds its own top-k tree as the decoder does (`depth` levels,
    `tree_topk` children, `tree_nodes` kept nodes, ranked by cumulative log q at
    `ranking_temperature`), the target scores it and greedy verification returns the
    target's greedy path inside it.
    M-step: T > 0 — per node, reach r (`reach`: "expected" weights every sampled node by r,
    "realized" keeps the reached nodes unweighted) times (1 + Ŵ) (`future_value`) times the
    acceptance mass β (`lambda_accept`), the score-function term at the root with a
    per-context mean baseline (`baseline` "mean" | "none"), and `lambda_kl` · KL(q_T ‖ p_T)
    on the same rows (CAR); T = 0 — cross-entropy on the next greedy token at the nodes of
    the greedy path decoding reached, weighted by 1 + Ŵ (`future_value`).
    L = `lambda_tok` · eagle3 (unrolled `anchor_steps` steps, default `depth`) +
    `lambda_tree` · tree terms.
    """

    temperature: float = 1.0
    anchors: int = 4
    paths: int = 4
    depth: int = 5
    tree_topk: int = 4
    tree_nodes: int = 24
    ranking_temperature: float = 1.0
    reach: str = "expected"
    future_value: bool = True
    baseline: str = "mean"
    lambda_accept: float = 1.0
    lambda_kl: float = 0.1
    lambda_tok: float = 1.0
    lambda_tree: float = 0.5
    anchor_steps: int | None = None

    @property
    def unroll_steps(self) -> int:
        """Steps of the EAGLE-3 anchor term: `anchor_steps`, else the tree depth."""
        return self.anchor_steps if self.anchor_steps is not None else self.depth

    def validate(self) -> None:
        for name in ("anchors", "paths", "depth", "tree_topk", "tree_nodes"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"vsd.{name}",
                   f"must be an integer >= 1, got {value!r}")
        if self.anchor_steps is not None:
            _check(isinstance(self.anchor_steps, int) and self.anchor_steps >= 1,
                   "vsd.anchor_steps", f"must be an integer >= 1, got {self.anchor_steps!r}")
        _check(self.temperature >= 0, "vsd.temperature",
               f"must be >= 0, got {self.temperature}")
        _check(self.ranking_temperature > 0, "vsd.ranking_temperature",
               f"must be > 0, got {self.ranking_temperature}")
        _check(self.reach in REACH_MODES, "vsd.reach",
               f"must be one of {REACH_MODES}, got {self.reach!r}")
        _check(self.baseline in BASELINES, "vsd.baseline",
               f"must be one of {BASELINES}, got {self.baseline!r}")
        _check(isinstance(self.future_value, bool), "vsd.future_value",
               f"must be true or false, got {self.future_value!r}")
        for name in ("lambda_accept", "lambda_kl", "lambda_tok", "lambda_tree"):
            value = getattr(self, name)
            _check(value >= 0, f"vsd.{name}", f"must be >= 0, got {value}")


@dataclass
class TrainConfig:
    """Everything a training run depends on (the trainer saves it with every checkpoint).

    Batching: `batch_size` sequences of `seq_len` tokens per optimizer step (global, over all
    processes); each process runs micro-batches of `micro_batch_size` sequences (default: as
    many as make one micro-batch per process). The step's gradient is the mean of the
    micro-batch gradients, so N processes equal one process accumulating N micro-batches.
    Optimizer: AdamW (`lr`, `betas`, `weight_decay`), `warmup_steps` linear warmup, then
    `schedule` (cosine to `min_lr_ratio`·lr at `max_steps`, or constant), gradients clipped
    to `grad_clip` (global L2 norm; 0 disables). `precision`: fp32, bf16 (autocast drafter,
    bf16 target) or auto (bf16 on CUDA, fp32 on CPU).
    Budget: `max_steps`; `max_minutes` of training time (steps only, evaluation excluded)
    measured on `budget_clock` ("wall", or "process" CPU time, fair on a shared machine);
    `stop_after_steps` ends this invocation early with a checkpoint (the schedule still spans
    `max_steps`; rerunning resumes).
    Drafter (fresh runs): `draft_vocab_size` (None: the target's vocabulary; else the most
    frequent tokens of the training data), `drafter_intermediate_size` (None: the target's).
    Data: `data` (None: the embedded corpus; a JSONL or `.pt` file, see `training.data`),
    `regenerate`: replace the responses of `regenerate_rows` training rows (None: all) and of
    the held-out rows by the target's own continuations at `regenerate_temperature` (prompts:
    the tokens before the first target, at most `regenerate_prompt_tokens`).
    Evaluation: every `eval_every` steps, τ of `generate` on `eval_prompts` held-out prompts
    (`eval_new_tokens` tokens, T = 0) and the held-out step-0 KL; `log_every`,
    `save_every` steps.
    """

    method: str = "eagle3"
    seed: int = 0
    data: str | None = None
    regenerate: bool = False
    regenerate_rows: int | None = None
    regenerate_temperature: float = 1.0
    regenerate_prompt_tokens: int = 32
    seq_len: int = 256
    batch_size: int = 8
    micro_batch_size: int | None = None
    max_steps: int = 1000
    stop_after_steps: int | None = None
    max_minutes: float | None = None
    budget_clock: str = "wall"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"
    draft_vocab_size: int | None = None
    drafter_intermediate_size: int | None = None
    log_every: int = 10
    save_every: int = 100
    eval_every: int = 0
    eval_prompts: int = 4
    eval_new_tokens: int = 48
    heldout_sequences: int = 8
    eagle3: Eagle3Config = field(default_factory=Eagle3Config)
    auf: AUFConfig = field(default_factory=AUFConfig)
    vsd: VSDConfig = field(default_factory=VSDConfig)

    def validate(self) -> TrainConfig:
        _check(self.method in METHODS, "method", f"must be one of {METHODS}, got {self.method!r}")
        for name in ("seq_len", "batch_size", "max_steps", "log_every", "save_every",
                     "eval_prompts", "eval_new_tokens", "heldout_sequences"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name,
                   f"must be an integer >= 1, got {value!r}")
        _check(self.seq_len >= 3, "seq_len", f"must be >= 3, got {self.seq_len}")
        for name in ("warmup_steps", "eval_every"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 0, name,
                   f"must be an integer >= 0, got {value!r}")
        if self.regenerate_rows is not None:
            _check(isinstance(self.regenerate_rows, int) and self.regenerate_rows >= 1,
                   "regenerate_rows", f"must be an integer >= 1, got {self.regenerate_rows!r}")
        _check(self.regenerate_temperature >= 0, "regenerate_temperature",
               f"must be >= 0, got {self.regenerate_temperature}")
        _check(isinstance(self.regenerate_prompt_tokens, int)
               and self.regenerate_prompt_tokens >= 1,
               "regenerate_prompt_tokens",
               f"must be an integer >= 1, got {self.regenerate_prompt_tokens!r}")
        if self.micro_batch_size is not None:
            _check(isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 1,
                   "micro_batch_size", f"must be an integer >= 1, got {self.micro_batch_size!r}")
        if self.stop_after_steps is not None:
            _check(isinstance(self.stop_after_steps, int) and self.stop_after_steps >= 1,
                   "stop_after_steps", f"must be an integer >= 1, got {self.stop_after_steps!r}")
        if self.max_minutes is not None:
            _check(self.max_minutes > 0, "max_minutes", f"must be > 0, got {self.max_minutes}")
        _check(self.budget_clock in CLOCKS, "budget_clock",
               f"must be one of {CLOCKS}, got {self.budget_clock!r}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
               f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.schedule in SCHEDULES, "schedule",
               f"must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
               f"must be two values in [0, 1), got {self.betas}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.precision in PRECISIONS, "precision",
               f"must be one of {PRECISIONS}, got {self.precision!r}")
        if self.draft_vocab_size is not None:
            _check(isinstance(self.draft_vocab_size, int) and self.draft_vocab_size >= 1,
                   "draft_vocab_size", f"must be an integer >= 1, got {self.draft_vocab_size!r}")
        if self.drafter_intermediate_size is not None:
            _check(isinstance(self.drafter_intermediate_size, int)
                   and self.drafter_intermediate_size >= 1, "drafter_intermediate_size",
                   f"must be an integer >= 1, got {self.drafter_intermediate_size!r}")
        self.eagle3.validate()
        self.auf.validate()
        self.vsd.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Inverse of `to_dict` (unknown keys raise ValueError naming them)."""
        values = dict(values)
        nested = {"eagle3": Eagle3Config, "auf": AUFConfig, "vsd": VSDConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}")
        for name, sub in nested.items():
            if isinstance(values.get(name), dict):
                inner = dict(values[name])
                values[name] = sub(**inner)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)
