"""Helpers of the training tests: a tiny random Llama target with a word-level tokenizer."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from vsd_ext.models import load_target

VOCAB = 61


def tiny_config(vocab: int = VOCAB, layers: int = 4) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": layers,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
            "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 0,
            "eos_token_id": 0}


def write_tiny_target(directory, seed: int = 0, vocab: int = VOCAB, layers: int = 4,
                      scale: float = 0.35, chat_template: str | None = None):
    """A random checkpoint (weights scaled so the target's distributions are peaked and
    context-dependent) with a word-level tokenizer `w0 .. w{V-2}` plus `<|endoftext|>` = 0."""
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(vocab, layers)
    (directory / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(seed)
    H, I, D = 32, 48, 16
    shapes = {"model.embed_tokens.weight": (vocab, H), "model.norm.weight": (H,),
              "lm_head.weight": (vocab, H)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.q_proj.weight": (2 * D, H), p + "self_attn.k_proj.weight": (D, H),
                   p + "self_attn.v_proj.weight": (D, H), p + "self_attn.o_proj.weight": (H, 2 * D),
                   p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                   p + "mlp.down_proj.weight": (H, I)}
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape)
        else:
            state[name] = torch.randn(shape, generator=gen) * (1.0 if "embed" in name or "lm_head"
                                                               in name else scale)
    save_file(state, str(directory / "model.safetensors"))
    vocab_map = {"<|endoftext|>": 0} | {f"w{i}": i + 1 for i in range(vocab - 1)}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(directory / "tokenizer.json"))
    tok_config = {"eos_token": "<|endoftext|>"}
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return load_target(directory)


def random_dataset(target, rows: int, seq_len: int, seed: int = 0, temperature: float = 1.0):
    """Rows sampled from the target itself (so a drafter can learn them), every token a
    target except the first few."""
    from vsd_ext.decoding import generate
    from vsd_ext.training.data import TokenDataset

    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, target.vocab_size, (rows, 2), generator=gen).tolist()
    out = generate(target, None, prompts, seq_len - 2, temperature=temperature, generator=gen,
                   ignore_eos=True)
    ids = torch.tensor([p + t for p, t in zip(prompts, out.tokens)], dtype=torch.int64)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :2] = False
    return TokenDataset(ids, mask)
