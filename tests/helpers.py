"""What the tests share: tiny random models and checkpoints, a sampled dataset, the χ² test.

- `tiny_target`: a random Llama target in memory (`Target`), weights scaled so that its
  distributions are peaked and context-dependent; `save_checkpoint` writes it as a Hugging
  Face checkpoint directory, `write_tiny_target` does both with a word-level tokenizer (the
  training tests' target). tests/test_models.py builds its checkpoints with `transformers`
  instead: they are the reference its logits are compared with.
- `random_dataset`: rows sampled from a target, so that a drafter can learn them.
- `chi2_pvalue`: Pearson's χ² test of counts against expected counts
  (`vsd_ext.eval.stats.pearson_statistic`), with the exact tail.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from vsd_ext.decoding import generate
from vsd_ext.eval.stats import pearson_statistic
from vsd_ext.models import Target, load_target, parse_config
from vsd_ext.training.data import TokenDataset

VOCAB = 61  # the training tests' target
EOS = "<|endoftext|>"


def tiny_config(vocab: int, layers: int, hidden: int, heads: int = 4, kv_heads: int = 2,
                head_dim: int | None = None, max_positions: int = 512,
                eos_token_id: int | None = None) -> dict:
    """A Llama `config.json` of a tiny model (intermediate size 1.5 · hidden)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": hidden * 3 // 2,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "max_position_embeddings": max_positions, "rope_theta": 10000.0,
              "tie_word_embeddings": False}
    if head_dim is not None:
        config["head_dim"] = head_dim
    if eos_token_id is not None:
        config["bos_token_id"] = config["eos_token_id"] = eos_token_id
    return config


def tiny_target(seed: int, vocab: int = 97, layers: int = 4, hidden: int = 64,
                scale: float = 0.12, norm_jitter: float = 0.2, embed_scale: float | None = None,
                head_first: bool = False, **config) -> Target:
    """A random fp32 target: projections N(0, scale²) (embedding and LM head N(0,
    embed_scale²) when given), norm weights 1 + N(0, norm_jitter²) (exactly 1, no draw, when
    0), drawn in parameter order from one generator seeded with ``seed`` — the embedding and
    the LM head first with ``head_first`` (the order in which the training tests' target was
    always drawn: their fixed-seed assertions hold for those weights). ``config``: more
    `tiny_config` arguments."""
    raw = tiny_config(vocab, layers, hidden, **config)
    target = Target(parse_config(raw), raw).eval()
    gen = torch.Generator().manual_seed(seed)
    params = list(target.named_parameters())
    if head_first:
        params.sort(key=lambda item: "embed" not in item[0] and "lm_head" not in item[0])
    with torch.no_grad():
        for name, p in params:
            if "norm" in name:
                p.copy_(1 + norm_jitter * torch.randn(p.shape, generator=gen) if norm_jitter
                        else torch.ones(p.shape))
            else:
                std = embed_scale if embed_scale and ("embed" in name or "lm_head" in name) \
                    else scale
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return target


def word_tokenizer(vocab: dict[str, int], unk: str, special: tuple[str, ...] = ()) -> Tokenizer:
    """A whitespace word-level tokenizer over ``vocab``."""
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if special:
        tok.add_special_tokens(list(special))
    return tok


def save_checkpoint(target: Target, directory, tokenizer: Tokenizer,
                    tokenizer_config: dict | None = None) -> None:
    """`target` as a Hugging Face checkpoint directory (config.json, model.safetensors,
    tokenizer.json and, when given, tokenizer_config.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(target.config))
    save_file({k: v.contiguous() for k, v in target.state_dict().items()},
              str(directory / "model.safetensors"))
    tokenizer.save(str(directory / "tokenizer.json"))
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def write_tiny_target(directory, seed: int = 0, vocab: int = VOCAB, layers: int = 4,
                      scale: float = 0.35, chat_template: str | None = None) -> Target:
    """The training tests' target, written and loaded back: hidden 32, 2 query heads / 1 KV
    head of dim 16, unit-scale embedding and LM head (peaked, context-dependent
    distributions), a word-level tokenizer `w0 .. w{V-2}` plus `<|endoftext|>` = 0 (EOS)."""
    target = tiny_target(seed, vocab, layers, hidden=32, scale=scale, norm_jitter=0.0,
                         embed_scale=1.0, head_first=True, heads=2, kv_heads=1, head_dim=16,
                         eos_token_id=0)
    words = {EOS: 0} | {f"w{i}": i + 1 for i in range(vocab - 1)}
    tokenizer_config = {"eos_token": EOS}
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    save_checkpoint(target, directory, word_tokenizer(words, EOS, (EOS,)), tokenizer_config)
    return load_target(directory)


def random_dataset(target, rows: int, seq_len: int, seed: int = 0, temperature: float = 1.0):
    """Rows sampled from the target itself (so a drafter can learn them), every token a
    target except the first few."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, target.vocab_size, (rows, 2), generator=gen).tolist()
    out = generate(target, None, prompts, seq_len - 2, temperature=temperature, generator=gen,
                   ignore_eos=True)
    ids = torch.tensor([p + t for p, t in zip(prompts, out.tokens)], dtype=torch.int64)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :2] = False
    return TokenDataset(ids, mask)


def chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor, groups=None) -> float:
    """Pearson χ² p-value of ``observed`` counts against ``expected`` counts (cells expecting
    fewer than 5 pooled), summed over ``groups`` of cells (each group's expected total equals
    its observed total; default: one group of every cell), from the exact χ² tail."""
    stat, dof = 0.0, 0
    for cells in groups if groups is not None else [slice(None)]:
        if float(expected[cells].sum()) <= 0:
            continue
        s, d = pearson_statistic(observed[cells], expected[cells])
        stat, dof = stat + s, dof + d
    return float(torch.special.gammaincc(torch.tensor(max(dof, 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))
