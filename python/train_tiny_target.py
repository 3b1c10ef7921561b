"""Train the small default target that ships in vsd_ext/assets/default_target.

The corpus is the running interpreter's standard library (`vsd_ext.corpus`, deterministic
train/held-out split by file), its test suites included for training (`--no-tests` leaves
them out). Steps:

1. a byte-level BPE tokenizer (`tokenizers`) trained on the train split (without tests);
2. a Llama-architecture model (`vsd_ext.models.Target`, tied embeddings) trained on random
   windows of the train token stream: AdamW (decoupled weight decay on matrices only),
   linear warmup then cosine decay to `--min-lr-ratio`·lr, gradient clipping, bf16 autocast
   (CPU or CUDA), `torch.compile` of the loss (`--no-compile` to skip);
3. held-out perplexity over the whole held-out stream (non-overlapping windows), on the
   corpus split and on code outside the corpus (`vsd_ext.corpus.external_files`), and how
   peaked the model is: the mean max-probability of the model on its own T = 1 samples;
4. a Hugging Face checkpoint directory: config.json, model.safetensors (bf16 by default),
   tokenizer.json, tokenizer_config.json, plus training_info.json (the command, sizes,
   tokens, wall and CPU time, the loss curve, held-out perplexities).

Everything random is seeded (`--seed`). A checkpoint (`--work-dir`/checkpoint.pt, written to a
temporary file, fsynced and renamed, so a crash never leaves a broken one) is written every
`--checkpoint-every` steps; the same command resumes from it. `--max-minutes` stops early
(and saves the checkpoint, not the model): run the command again to continue.

The shipped model (see its training_info.json for the exact command and figures):

    python python/train_tiny_target.py --threads 1 --out vsd_ext/assets/default_target

On a GPU the same script trains in bf16 with a larger budget, e.g.
`--device cuda --batch-size 64 --steps 4000`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from vsd_ext import corpus
from vsd_ext.models import Target, parse_config

EOT = "<|endoftext|>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="vsd_ext/assets/default_target")
    p.add_argument("--work-dir", default="runs/tiny_target", help="checkpoints, caches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the cosine decays to lr · this at the last step")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--no-tests", action="store_true",
                   help="train on the standard library without its test suites")
    p.add_argument("--autocast", choices=["bf16", "none"], default="bf16",
                   help="autocast dtype for the forward/backward matmuls")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the loss")
    p.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250,
                   help="held-out loss on --eval-windows windows every this many steps")
    p.add_argument("--eval-windows", type=int, default=48)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much wall time in this process (checkpoint saved; "
                        "run again to resume)")
    args = p.parse_args(argv)
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "seq_len",
                 "batch_size", "steps", "threads", "checkpoint_every", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    return args


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenization, no prefix space), one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def hf_config(args, tokenizer) -> dict:
    eot = tokenizer.token_to_id(EOT)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": tokenizer.get_vocab_size(), "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
        "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
        "torch_dtype": args.save_dtype, "initializer_range": 0.02,
    }


def init_weights(model: Target, seed: int, std: float = 0.02) -> None:
    """N(0, std) for embeddings and projections; the residual outputs (o_proj, down_proj)
    scaled by 1/sqrt(2L) (GPT-2) so the residual stream starts at unit scale; norms = 1."""
    gen = torch.Generator().manual_seed(seed)
    scaled = std / math.sqrt(2 * model.num_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith("bias"):
            p.data.zero_()
        else:
            s = scaled if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            p.data.copy_(torch.randn(p.shape, generator=gen) * s)


def lr_at(step: int, args) -> float:
    """Linear warmup to `lr` over `warmup` steps, then a cosine from `lr` down to
    `lr · min_lr_ratio` at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast(args):
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                          enabled=args.autocast == "bf16")


def next_token_loss(model: Target, batch: torch.Tensor, args) -> torch.Tensor:
    """Mean next-token cross-entropy of `batch` `[B, T + 1]`."""
    with autocast(args):
        logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def heldout_perplexity(model: Target, stream: torch.Tensor, args,
                       max_windows: int | None = None) -> tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping windows of a held-out stream (the
    first `max_windows` of them if given)."""
    rows = corpus.chunk_stream(stream, args.seq_len + 1)[:max_windows]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, rows.shape[0], args.eval_batch):
        batch = rows[i:i + args.eval_batch].to(args.device)
        with autocast(args):
            logits = model(batch[:, :-1])
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(),
                              reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count), count


@torch.no_grad()
def own_sample_confidence(model: Target, prompts: list[list[int]], new_tokens: int = 64,
                          seed: int = 0) -> float:
    """Mean max-probability of the model at the positions of its own T = 1 continuations of
    `prompts`: how peaked its next-token distributions are on the text it generates."""
    from vsd_ext.decoding import generate

    model.eval()
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = generate(model, None, prompts, new_tokens, temperature=1.0, generator=gen,
                   ignore_eos=True)
    values = []
    for prompt, tokens in zip(prompts, out.tokens):
        ids = torch.tensor([prompt + tokens[:-1]], device=model.device)
        probs = model(ids)[0, len(prompt) - 1:].float().softmax(-1)
        values.append(probs.max(-1).values)
    return float(torch.cat(values).mean())


class Checkpoint:
    """The training state in one file, replaced atomically (temp file, fsync, rename)."""

    def __init__(self, work: Path):
        self.path = work / "checkpoint.pt"

    def load(self, device) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, weights_only=False, map_location=device)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error
            raise RuntimeError(f"checkpoint {self.path} cannot be read ({exc}); delete it to "
                               f"start over") from exc

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".pt.tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_or_train_tokenizer(work: Path, vocab_size: int):
    from tokenizers import Tokenizer

    path = work / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tokenizer = train_tokenizer(corpus.stdlib_texts("train"), vocab_size)
    tokenizer.save(str(path))
    return tokenizer


def build_optimizer(model: Target, args) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def train(model, streams: dict, args, work: Path) -> dict:
    """The training loop (resumable); returns the run's record (steps, times, curves)."""
    opt = build_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed + 1)
    record = {"step": 0, "wall_seconds": 0.0, "cpu_seconds": 0.0, "loss_curve": [],
              "heldout_curve": []}
    checkpoint = Checkpoint(work)
    state = checkpoint.load(args.device)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].cpu())
        record = state["record"]
        print(f"resumed from {checkpoint.path} at step {record['step']}")
    loss_fn = next_token_loss if args.no_compile else torch.compile(next_token_loss)
    stream, window = streams["train"], args.seq_len + 1
    wall0, cpu0 = time.time() - record["wall_seconds"], time.process_time() - record["cpu_seconds"]
    session_start = time.time()
    bar = tqdm(total=args.steps, initial=record["step"], desc="train target", unit="step",
               mininterval=10)
    window_losses = []

    def save():
        record["wall_seconds"] = time.time() - wall0
        record["cpu_seconds"] = time.process_time() - cpu0
        checkpoint.save({"model": model.state_dict(), "opt": opt.state_dict(),
                         "gen": gen.get_state(), "record": record})

    model.train()
    while record["step"] < args.steps:
        if args.max_minutes is not None and time.time() - session_start > 60 * args.max_minutes:
            save()
            print(f"stopped at step {record['step']} (--max-minutes {args.max_minutes}); "
                  f"run the same command to resume")
            return record
        step = record["step"]
        starts = torch.randint(0, stream.numel() - window, (args.batch_size,), generator=gen)
        batch = torch.stack([stream[s:s + window] for s in starts.tolist()]).to(args.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = loss_fn(model, batch, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        record["step"] = step = step + 1
        window_losses.append(loss.item())
        if step % 10 == 0 or step == args.steps:
            record["loss_curve"].append([step, round(sum(window_losses) / len(window_losses), 4)])
            window_losses = []
        if step % args.eval_every == 0 or step == args.steps:
            ppl, _ = heldout_perplexity(model, streams["heldout"], args, args.eval_windows)
            record["heldout_curve"].append([step, round(ppl, 3)])
            bar.write(f"step {step}: held-out perplexity {ppl:.2f} ({args.eval_windows} windows)")
        bar.update(1)
        steps_per_s = bar.format_dict["rate"] or 0.0
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_at(step - 1, args):.2e}",
                        tok_s=f"{steps_per_s * args.batch_size * args.seq_len:.0f}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            save()
    bar.close()
    save()
    return record


def save_model(model: Target, config: dict, tokenizer, out: Path, save_dtype: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, save_dtype)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
        "pad_token": EOT, "unk_token": None, "add_prefix_space": False,
        "model_max_length": config["max_position_embeddings"]}, indent=2) + "\n")


def evaluate(model: Target, streams: dict, tokenizer, args) -> dict:
    """Final figures: held-out perplexity (corpus split, external code), confidence."""
    ppl, n_eval = heldout_perplexity(model, streams["heldout"], args)
    ext_ppl, n_ext = heldout_perplexity(model, streams["external"], args)
    prompts = [tokenizer.encode(t).ids[-64:] for t in corpus.prompts("heldout", limit=8)]
    confidence = own_sample_confidence(model.float(), prompts)
    print(f"held-out perplexity {ppl:.2f} ({n_eval} tokens); external code {ext_ppl:.2f} "
          f"({n_ext} tokens); mean max-probability on own T=1 samples {confidence:.3f}")
    return {"heldout_perplexity": round(ppl, 3), "heldout_tokens": n_eval,
            "external_perplexity": round(ext_ppl, 3), "external_tokens": n_ext,
            "external_code": f"torch {torch.__version__}: {', '.join(corpus.EXTERNAL_PACKAGES)}",
            "own_sample_mean_max_prob": round(confidence, 4)}


def main(argv=None):
    args = parse_args(argv)
    command = "python python/train_tiny_target.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    tokenizer = load_or_train_tokenizer(work, args.vocab_size)
    streams = {"train": corpus.token_stream(tokenizer, "train", include_tests=not args.no_tests),
               "heldout": corpus.token_stream(tokenizer, "heldout"),
               "external": corpus.texts_stream(tokenizer, [corpus.read_source(p) for p in
                                                         corpus.external_files()])}
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; train {streams['train'].numel()}, "
          f"held-out {streams['heldout'].numel()}, external {streams['external'].numel()} tokens")

    config = hf_config(args, tokenizer)
    model = Target(parse_config(config), config, tokenizer, tie_word_embeddings=True)
    init_weights(model, args.seed)
    model.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, config {json.dumps(config)}")

    record = train(model, streams, args, work)
    if record["step"] < args.steps:
        return
    info = {"command": command, "parameters": n_params, "steps": record["step"],
            "tokens_seen": record["step"] * args.batch_size * args.seq_len,
            "train_tokens": streams["train"].numel(),
            "train_wall_seconds": round(record["wall_seconds"], 1),
            "train_cpu_seconds": round(record["cpu_seconds"], 1),
            "device": args.device, "threads": args.threads, "torch": torch.__version__,
            **evaluate(model, streams, tokenizer, args),
            "loss_curve": record["loss_curve"], "heldout_curve": record["heldout_curve"],
            "args": vars(args)}
    out = Path(args.out)
    save_model(model, config, tokenizer, out, args.save_dtype)
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: v for k, v in info.items() if not k.endswith("curve")}))


if __name__ == "__main__":
    main()
