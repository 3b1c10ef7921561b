"""Train the small default target that ships in vsd_ext/assets/default_target.

The corpus is the running interpreter's standard library (`vsd_ext.data`, deterministic
train/held-out split by file). Steps:

1. a byte-level BPE tokenizer (`tokenizers`) trained on the train split;
2. a Llama-architecture model (`vsd_ext.models.Target`, tied embeddings) trained on random
   windows of the train token stream: AdamW, linear warmup then inverse-square-root decay,
   gradient clipping, bf16 autocast on CPU (optional), and an exponential moving average
   (EMA) of the weights, which is what gets evaluated and saved;
3. held-out perplexity over the whole held-out stream (non-overlapping windows);
4. a Hugging Face checkpoint directory: config.json, model.safetensors (bf16 by default),
   tokenizer.json, tokenizer_config.json, plus training_info.json (sizes, time, perplexity).

Everything random is seeded (`--seed`); a checkpoint (`--work-dir`) is written every
`--checkpoint-every` steps and the run resumes from it when restarted with the same
arguments. The learning rate and the EMA depend on the step alone (not on `--steps`), so a
run stopped early by `--max-minutes` after s steps equals a run with `--steps s`
(training_info.json records s). The defaults are the shipped model (it was trained with
`--max-minutes`, stopped at step 352 on a CPU shared with other jobs; more steps give a
better model: `--steps 3000`, or `--device cuda`). Example (the shipped model):

    nice python python/train_tiny_target.py --out vsd_ext/assets/default_target
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from vsd_ext import data
from vsd_ext.models import Target, parse_config

EOT = "<|endoftext|>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="vsd_ext/assets/default_target")
    p.add_argument("--work-dir", default="runs/tiny_target", help="checkpoints, caches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--steps", type=int, default=352)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--ema", type=float, default=0.97, help="EMA decay of the weights")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--autocast", choices=["bf16", "none"], default="bf16",
                   help="CPU autocast dtype for the forward/backward matmuls")
    p.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (autocast then on cuda)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training early (and still save) after this much wall time")
    return p.parse_args(argv)


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
    """Linear warmup to `lr`, then `lr · sqrt(warmup / (step + 1))` (a function of the step
    alone, so stopping early equals a shorter run)."""
    return args.lr * min((step + 1) / args.warmup, math.sqrt(args.warmup / (step + 1)))


def autocast(args):
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                          enabled=args.autocast == "bf16")


@torch.no_grad()
def heldout_perplexity(model: Target, stream: torch.Tensor, args) -> tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping windows of the held-out stream."""
    rows = data.chunk_stream(stream, args.seq_len + 1)
    total, count = 0.0, 0
    model.eval()
    for i in range(0, rows.shape[0], args.eval_batch):
        batch = rows[i:i + args.eval_batch].to(args.device)
        with autocast(args):
            logits = model(batch[:, :-1])
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(),
                              reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    model.train()
    return math.exp(total / count), count


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    tok_path = work / "tokenizer.json"
    if tok_path.is_file():
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(tok_path))
    else:
        tokenizer = train_tokenizer(data.stdlib_texts("train"), args.vocab_size)
        tokenizer.save(str(tok_path))
    train_stream = data.token_stream(tokenizer, "train")
    heldout_stream = data.token_stream(tokenizer, "heldout")
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; train {train_stream.numel()} "
          f"tokens, held-out {heldout_stream.numel()} tokens ({time.time() - t0:.0f}s)")

    config = hf_config(args, tokenizer)
    model = Target(parse_config(config), config, tokenizer, tie_word_embeddings=True)
    init_weights(model, args.seed)
    model.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, config {json.dumps(config)}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step, elapsed = 0, 0.0
    ckpt = work / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False, map_location=args.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].cpu())
        ema = state["ema"]
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed from {ckpt} at step {step}")

    model.train()
    window = args.seq_len + 1
    bar = tqdm(total=args.steps, initial=step, desc="train", mininterval=10)
    start = time.time() - elapsed
    def save_checkpoint():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "ema": ema, "step": step,
                    "elapsed": time.time() - start}, ckpt)

    while step < args.steps:
        if args.max_minutes is not None and time.time() - start > 60 * args.max_minutes:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached")
            save_checkpoint()
            break
        starts = torch.randint(0, train_stream.numel() - window, (args.batch_size,),
                               generator=gen)
        batch = torch.stack([train_stream[s:s + window] for s in starts.tolist()])
        batch = batch.to(args.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with autocast(args):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        with torch.no_grad():  # ema <- d·ema + (1 − d)·w
            for k, v in model.state_dict().items():
                ema[k].lerp_(v, 1 - args.ema)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_at(step - 1, args):.2e}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint()
    bar.close()
    train_seconds = time.time() - start
    model.load_state_dict(ema)

    ppl, n_eval = heldout_perplexity(model, heldout_stream, args)
    print(f"held-out perplexity {ppl:.3f} over {n_eval} tokens; trained {step} steps in "
          f"{train_seconds / 60:.1f} min")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_dtype = getattr(torch, args.save_dtype)
    tensors = {k: v.detach().to("cpu", save_dtype).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
        "pad_token": EOT, "unk_token": None, "add_prefix_space": False,
        "model_max_length": config["max_position_embeddings"]}, indent=2) + "\n")
    info = {"parameters": n_params, "steps": step, "tokens_seen": step * args.batch_size *
            args.seq_len, "train_seconds": round(train_seconds, 1),
            "heldout_perplexity": round(ppl, 4), "heldout_tokens": n_eval,
            "train_tokens": train_stream.numel(), "args": vars(args)}
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
