"""The drafter trainer: `train_drafter(target, out_dir, config)` and `vsd train`.

One loop for every objective (`TrainConfig.method`): AdamW, linear warmup then cosine (or
constant), global-norm gradient clipping, fp32 or bf16 autocast, gradient accumulation over
micro-batches, DDP under torchrun (FSDP for the target with `fsdp_target`), a tqdm bar with
loss, τ estimate and tokens/s, periodic evaluation, and checkpoints that resume exactly.

Output directory:
    config.json, model.safetensors     the final drafter (EAGLE-3 layout, fp32)
    checkpoint/                        the latest checkpoint: the drafter (same layout) and
        trainer_state.pt               optimizer, scheduler, step, data position, elapsed
                                       training time, RNG state, the TrainConfig
    data.pt                            the dataset of the run (kept so a resumed run trains
                                       on the same rows even after regeneration)
    train_log.jsonl                    one line per logged step / evaluation
    summary.json                       the config, steps, training time, final evaluation

The τ estimate of the bar and the log is a one-step proxy, not decoding: eagle3/auf —
1 + the mean number of leading unrolled steps whose greedy draft equals the target's greedy
token (teacher-forced on the data, T = 0, chain of `steps`); vsd — 1 + the expected accepted
length of the E-step's trees at the run's decoding temperature (`vsd.temperature`): the
sampled chains' ℓ at T > 0, the greedy path's accepted length in the drafter's own tree at
T = 0.
Real τ comes from the periodic evaluation (`eval_every`): `vsd_ext.generate` with the
default dynamic tree on held-out prompts at T = 0, plus the held-out step-0 KL.

Exact resume: every random choice of a step is keyed by (seed, step, micro-batch) and the
batch order by (seed, epoch), so a run interrupted after k steps and resumed from its
checkpoint computes the same steps as an uninterrupted one: same weights bit for bit (on
the same machine, same process layout).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..models import Drafter, load_drafter, load_target, token_counts
from ..models.checkpoint import resolve_checkpoint_dir
from .config import TrainConfig
from .data import BatchOrder, DataSplits, load_splits, regenerate
from .distributed import barrier, init_distributed, is_distributed, shard_target, wrap_data_parallel
from .evaluate import decode_tau, heldout_kl
from .objective import TrainStep

# Fields a resumed run may change: they steer this invocation, not the computed steps
# (max_steps changes the cosine horizon; extending a finished run is what it is for).
RESUMABLE_CHANGES = {"max_steps", "stop_after_steps", "max_minutes", "budget_clock",
                     "log_every", "save_every", "eval_every", "eval_prompts", "eval_new_tokens"}


def _lr_factor(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        span = max(1, config.max_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine
    return factor


def _micro_seed(seed: int, step: int, micro: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + micro) % (2 ** 63)


class Trainer:
    """See the module docstring. `target`: a loaded `Target`, or a checkpoint directory /
    "default" (loaded in the run's precision on this process's device). `init`: a drafter
    directory to start from (fine-tuning); `target_dir`: where the chat template is read."""

    def __init__(self, target, out_dir, config: TrainConfig, init=None, target_dir=None,
                 fsdp_target: bool = False, progress: bool = True):
        self.config = config.validate()
        self.rank, self.world, device = init_distributed()
        self.out = Path(out_dir)
        self.progress = progress and self.rank == 0
        if isinstance(target, (str, Path)):
            target_dir = target_dir or resolve_checkpoint_dir(target)
            mixed = config.precision == "bf16" or (config.precision == "auto"
                                                   and device.type == "cuda")
            target = load_target(target, dtype=torch.bfloat16 if mixed else torch.float32,
                                 device=device)
        self.target = target.eval().requires_grad_(False)
        self.device = self.target.device
        if fsdp_target:
            shard_target(self.target)
        self._check_batching()
        state = self._load_state()
        self.splits = self._data(target_dir)
        self.drafter = self._drafter(init, state)
        self.step_module = TrainStep(self.drafter, self.target, self.config)
        self.module = wrap_data_parallel(self.step_module, self.device)
        self.optimizer = torch.optim.AdamW(
            self.drafter.parameters(), lr=config.lr, betas=tuple(config.betas),
            weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(config))
        self.order = BatchOrder(len(self.splits.train), config.seed)
        self.step, self.elapsed = 0, 0.0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.order.load_state_dict(state["data_order"])
            self.step, self.elapsed = state["step"], state["elapsed"]
            torch.set_rng_state(state["torch_rng"])
            self._trim_log()

    # ---- setup ----------------------------------------------------------------------
    def _check_batching(self) -> None:
        cfg = self.config
        micro = cfg.micro_batch_size or math.ceil(cfg.batch_size / self.world)
        if cfg.batch_size % micro or (cfg.batch_size // micro) % self.world:
            raise ValueError(f"TrainConfig: batch_size {cfg.batch_size} must split into "
                             f"micro-batches of {micro} sequences, a multiple of the "
                             f"{self.world} processes' count")
        self.micro = micro
        self.num_micro = cfg.batch_size // micro

    def _checkpoint_dir(self) -> Path | None:
        for name in ("checkpoint", "checkpoint.tmp"):  # .tmp: killed between rm and rename
            path = self.out / name
            if (path / "trainer_state.pt").is_file():
                return path
        return None

    def _load_state(self):
        path = self._checkpoint_dir()
        if path is None:
            return None
        state = torch.load(str(path / "trainer_state.pt"), weights_only=False)
        saved = TrainConfig.from_dict(state["config"]).to_dict()
        mine = self.config.to_dict()
        changed = sorted(k for k in mine if mine[k] != saved.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            raise ValueError(f"{self.out} holds a checkpoint of a different run (fields "
                             f"{changed} differ); use another --out or the same settings")
        state["path"] = path
        return state

    def _data(self, target_dir) -> DataSplits:
        cfg = self.config
        cached = self.out / "data.pt"
        if cached.is_file():
            return DataSplits.load(cached)
        splits = load_splits(self.target, cfg.data, cfg.seq_len, target_dir,
                             eval_prompts=max(cfg.eval_prompts, 32))
        if cfg.regenerate:
            train = splits.train
            if cfg.regenerate_rows is not None and cfg.regenerate_rows < len(train):
                pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
                train = train.rows(pick[:cfg.regenerate_rows])
            heldout = splits.heldout.rows(torch.arange(min(len(splits.heldout),
                                                           cfg.heldout_sequences)))
            opts = dict(temperature=cfg.regenerate_temperature,
                        prompt_tokens=cfg.regenerate_prompt_tokens, seed=cfg.seed)
            splits = DataSplits(regenerate(self.target, train, progress=self.progress, **opts),
                                regenerate(self.target, heldout, **opts), splits.prompts,
                                splits.source + "+regenerated")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            splits.save(cached)
        return splits

    def _drafter(self, init, state) -> Drafter:
        cfg = self.config
        if state is not None:
            return load_drafter(state["path"], self.target, dtype=torch.float32)
        if init is not None:
            return load_drafter(init, self.target, dtype=torch.float32)
        counts = token_counts(self.splits.train.input_ids, self.target.vocab_size)
        drafter = Drafter.for_target(self.target, cfg.draft_vocab_size, counts,
                                     cfg.drafter_intermediate_size, seed=cfg.seed)
        return drafter.float().attach(self.target)

    # ---- checkpoints and logs ---------------------------------------------------------
    def _save(self) -> None:
        if self.rank == 0:
            tmp, final = self.out / "checkpoint.tmp", self.out / "checkpoint"
            shutil.rmtree(tmp, ignore_errors=True)
            self.drafter.save_pretrained(tmp)
            torch.save({"config": self.config.to_dict(), "step": self.step,
                        "elapsed": self.elapsed, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "data_order": self.order.state_dict(),
                        "torch_rng": torch.get_rng_state()}, str(tmp / "trainer_state.pt"))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        barrier()

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_log(self) -> None:
        """Drop log lines of steps after the checkpoint (they will be run again)."""
        path = self.out / "train_log.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        lines = [ln for ln in path.read_text().splitlines()
                 if ln and json.loads(ln).get("step", 0) <= self.step]
        path.write_text("".join(ln + "\n" for ln in lines))

    # ---- the loop -----------------------------------------------------------------------
    def train_step(self, want_metrics: bool) -> dict:
        """One optimizer step over a global batch (this process's micro-batches)."""
        rows = self.order.take(self.config.batch_size)
        mine = [m for m in range(self.num_micro) if m % self.world == self.rank]
        totals: dict = {}
        for i, m in enumerate(mine):
            index = rows[m * self.micro:(m + 1) * self.micro]
            ids = self.splits.train.input_ids[index].to(self.device)
            mask = self.splits.train.loss_mask[index].to(self.device)
            last = i == len(mine) - 1
            sync = nullcontext() if last or not is_distributed() else self.module.no_sync()
            with sync:
                loss, metrics = self.module(ids, mask, _micro_seed(self.config.seed, self.step, m),
                                            want_metrics)
                (loss / len(mine)).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / len(mine)
            totals["tokens"] = totals.get("tokens", 0.0) + float((ids >= 0).sum()) * self.world
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.config.grad_clip)
            totals["grad_norm"] = float(norm)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def evaluate(self, temperatures=(0.0,)) -> dict:
        """Held-out KL and decoding τ (every process runs it: FSDP gathers are collectives)."""
        cfg = self.config
        heldout = self.splits.heldout.rows(torch.arange(min(len(self.splits.heldout),
                                                            cfg.heldout_sequences)))
        result = {"heldout_kl": heldout_kl(self.step_module, heldout)}
        prompts = self.splits.prompts[:cfg.eval_prompts]
        for t in temperatures:
            stats = decode_tau(self.target, self.drafter, prompts, t, cfg.eval_new_tokens,
                               seed=cfg.seed)
            result[f"tau_T{t:g}"] = stats["tau"]
        return result

    def run(self) -> Drafter:
        cfg = self.config
        clock = time.perf_counter if cfg.budget_clock == "wall" else time.process_time
        budget = None if cfg.max_minutes is None else cfg.max_minutes * 60
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {cfg.method}",
                       unit="step", dynamic_ncols=True)
        last_eval, tau = None, None
        while self.step < cfg.max_steps:
            if cfg.stop_after_steps is not None and self.step >= cfg.stop_after_steps:
                break
            if budget is not None and self.elapsed >= budget:
                break
            want = self.step % cfg.log_every == 0 or self.step + 1 == cfg.max_steps
            start, wall = clock(), time.perf_counter()
            metrics = self.train_step(want)
            self.elapsed += clock() - start
            self.step += 1
            metrics["tokens_per_s"] = metrics.pop("tokens") / max(time.perf_counter() - wall, 1e-9)
            if want:
                self._log({"step": self.step, "elapsed_s": self.elapsed, **metrics})
            tau = metrics.get("tau_est", tau)  # estimated on logged steps only
            if bar is not None:
                post = {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
                if tau is not None:
                    post["tau~"] = f"{tau:.2f}"
                bar.set_postfix(post)
                bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                last_eval = self.evaluate()
                self._log({"step": self.step, "eval": last_eval})
            if self.step % cfg.save_every == 0:
                self._save()
        if bar is not None:
            bar.close()
        self._save()
        if self.rank == 0:
            self.drafter.save_pretrained(self.out)
            summary = {"config": cfg.to_dict(), "steps": self.step,
                       "train_seconds": self.elapsed, "budget_clock": cfg.budget_clock,
                       "data": self.splits.source, "train_rows": len(self.splits.train),
                       "last_eval": last_eval}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        barrier()
        return self.drafter


def train_drafter(target, out_dir, config: TrainConfig | None = None, *, init=None,
                  target_dir=None, fsdp_target: bool = False, progress: bool = True,
                  **overrides) -> Drafter:
    """Train (or resume training) a drafter for `target`; returns it (also saved in `out_dir`).

    target: a `Target`, a Hugging Face checkpoint directory, or "default". config: a
    `TrainConfig` (fields may also be given as keyword overrides, e.g. `method="vsd"`,
    `max_steps=200`). init: a drafter directory to fine-tune. A checkpoint in `out_dir` of
    the same run is resumed exactly. See `vsd_ext.training.trainer`.
    """
    config = config or TrainConfig()
    if overrides:
        config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    return Trainer(target, out_dir, config, init=init, target_dir=target_dir,
                   fsdp_target=fsdp_target, progress=progress).run()
