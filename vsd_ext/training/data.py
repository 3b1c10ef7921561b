"""Training data for drafters: token sequences with a loss mask.

A `TokenDataset` is two tensors: `input_ids` `[R, T]` int64 (right-padded with −1) and
`loss_mask` `[R, T]` bool — True where the token is a training target (a response token;
every token of plain text). Target features are NOT stored: the trainer computes them
online with the frozen target in every step.

Sources:
- the embedded corpus (`vsd_ext.corpus`: stdlib sources, deterministic train/held-out split by
  file), cut into rows of `seq_len` tokens, every token a target;
- a JSONL file, one record per line: `{"text": ...}` (every token a target, long texts cut
  into several rows), `{"messages"|"conversations": [{"role"|"from": ..., "content"|"value":
  ...}, ...]}` (only assistant turns are targets) or `{"prompt": ..., "response"|
  "completion": ...}`; chats are rendered with the tokenizer config's `chat_template` when
  there is one, else with `PLAIN_CHAT_FORMAT`. Records go to the held-out split by the hash
  of their line (`HELDOUT_PER_MILLE`, like the corpus);
- a `.pt` file written by `DataSplits.save` (e.g. a regenerated set shared between runs);
- `regenerate`: the target itself writes the responses (prompts = each row's tokens before
  its first target, or its first `prompt_tokens`), which is what makes a drafter match its
  target rather than the corpus's authors.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import corpus
from ..decoding import generate
from ..durable import atomic_write

HELDOUT_PER_MILLE = corpus.HELDOUT_PER_MILLE
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "model": "assistant", "bot": "assistant", "system": "system"}
PLAIN_CHAT_FORMAT = "<|{role}|>\n{content}\n"


@dataclass
class TokenDataset:
    """`input_ids` `[R, T]` int64 (−1 = padding) and `loss_mask` `[R, T]` bool."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor

    def __post_init__(self):
        ids, mask = self.input_ids, self.loss_mask
        if ids.dim() != 2 or ids.dtype != torch.int64:
            raise ValueError(f"TokenDataset: input_ids must be [R, T] int64, got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        if mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(f"TokenDataset: loss_mask must be bool {tuple(ids.shape)}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        if bool((mask & (ids < 0)).any()):
            raise ValueError("TokenDataset: loss_mask marks padding (−1) tokens as targets")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, index: torch.Tensor) -> TokenDataset:
        return TokenDataset(self.input_ids[index], self.loss_mask[index])

    def num_targets(self) -> int:
        return int(self.loss_mask.sum())

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids in [0, vocab_size), or −1 (padding)."""
        if len(self) and (int(self.input_ids.max()) >= vocab_size
                          or int(self.input_ids.min()) < -1):
            bad = self.input_ids[(self.input_ids >= vocab_size) | (self.input_ids < -1)]
            raise ValueError(f"training data holds token id {int(bad[0])}, outside the "
                             f"target's vocabulary [0, {vocab_size}) (−1 is padding)")


@dataclass
class DataSplits:
    """Training rows, held-out rows and held-out prompts (token lists) for τ evaluation."""

    train: TokenDataset
    heldout: TokenDataset
    prompts: list[list[int]]
    source: str

    def save(self, path: str | Path) -> None:
        """Write the splits to `path` (crash-safe: a temporary file, fsynced, renamed)."""
        state = {"train": (self.train.input_ids, self.train.loss_mask),
                 "heldout": (self.heldout.input_ids, self.heldout.loss_mask),
                 "prompts": self.prompts, "source": self.source}
        atomic_write(Path(path), lambda tmp: torch.save(state, str(tmp)))

    @classmethod
    def load(cls, path: str | Path) -> DataSplits:
        """Read splits written by `save`; anything else is a ValueError naming the file."""
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such file")
        try:
            state = torch.load(str(path), weights_only=True)
        except Exception as err:  # torch.load fails on foreign files in many ways
            raise ValueError(f"{path}: not a dataset written by DataSplits.save (unreadable: "
                             f"{type(err).__name__})") from err
        try:
            splits = cls(TokenDataset(*state["train"]), TokenDataset(*state["heldout"]),
                         [[int(t) for t in p] for p in state["prompts"]], str(state["source"]))
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
            raise ValueError(f"{path}: not a dataset written by DataSplits.save ({err})") from err
        if not len(splits.train) or any(not p for p in splits.prompts):
            raise ValueError(f"{path}: no training rows, or an empty prompt")
        return splits


def _pad_rows(rows: list[tuple[list[int], list[bool]]], seq_len: int) -> TokenDataset:
    ids = torch.full((len(rows), seq_len), -1, dtype=torch.int64)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for r, (toks, tmask) in enumerate(rows):
        n = min(len(toks), seq_len)
        ids[r, :n] = torch.tensor(toks[:n], dtype=torch.int64)
        mask[r, :n] = torch.tensor(tmask[:n], dtype=torch.bool)
    return TokenDataset(ids, mask)


def _eos(target_or_id) -> int:
    if isinstance(target_or_id, int):
        return target_or_id
    eos = target_or_id.model_config.eos_token_id
    if eos is None:
        raise ValueError("the target has no eos_token_id; pass eos_id explicitly")
    return eos if isinstance(eos, int) else list(eos)[0]


# ---- the embedded corpus ------------------------------------------------------------------
def corpus_splits(tokenizer, seq_len: int, eval_prompts: int = 32, prompt_tokens: int = 96,
                  root=None) -> DataSplits:
    """The stdlib corpus (vsd_ext.corpus): training rows of `seq_len` tokens from the
    `drafter` files, held-out rows from the `tune` files (never the evaluation's `heldout`
    files), every token a target; prompts: the first lines of `tune` files
    (`vsd_ext.corpus.prompts`), at most `prompt_tokens` tokens each."""
    def rows(split):
        ids = corpus.token_sequences(tokenizer, split, seq_len, root)
        return TokenDataset(ids, torch.ones_like(ids, dtype=torch.bool))

    texts = corpus.prompts("tune", limit=eval_prompts, root=root)
    prompts = [p[:prompt_tokens] for p in corpus.encode_texts(tokenizer, texts)]
    return DataSplits(rows("drafter"), rows("tune"), prompts, "corpus")


# ---- JSONL ------------------------------------------------------------------------------
def load_chat_template(directory: str | Path | None) -> str | None:
    """`chat_template` of `<directory>/tokenizer_config.json` (or of a separate
    `chat_template.jinja`), None when the checkpoint has none."""
    if directory is None:
        return None
    directory = Path(directory)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template


class ChatRenderer:
    """Renders a conversation to text plus the character spans of its assistant turns.

    With a Jinja `template` (the Hugging Face chat-template convention: variables
    `messages`, `add_generation_prompt`, `bos_token`, `eos_token`) turn i spans from the end
    of the render of turns `< i` with the generation prompt to the end of the render of
    turns `≤ i`. Without one, turns are `PLAIN_CHAT_FORMAT` blocks and the assistant span is
    its content plus the newline.
    """

    def __init__(self, template: str | None, bos_token: str = "", eos_token: str = ""):
        self.template = None
        self.special = {"bos_token": bos_token, "eos_token": eos_token}
        if template is not None:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError as err:
                raise ValueError("the tokenizer config has a chat_template: rendering it needs "
                                 "the jinja2 package (pip install jinja2)") from err
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self.template = env.from_string(template)

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=generation_prompt,
                                    **self.special)

    def __call__(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        spans = []
        if self.template is None:
            text = ""
            for m in messages:
                head = PLAIN_CHAT_FORMAT.split("{content}")[0].format(role=m["role"])
                start = len(text) + len(head)
                text += PLAIN_CHAT_FORMAT.format(role=m["role"], content=m["content"])
                if m["role"] == "assistant":
                    spans.append((start, len(text)))
            return text, spans
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], True)
            upto = self._render(messages[:i + 1], False)
            if not upto.startswith(before):
                raise ValueError("chat_template: the render of a conversation's first turns is "
                                 "not a prefix of the render with the next turn; cannot "
                                 "locate the assistant tokens")
            spans.append((len(before), len(upto)))
        return self._render(messages, False), spans


def _raise_template_error(message):
    raise ValueError(f"chat_template: {message}")


def _messages(record: dict, line: int) -> list[dict] | None:
    turns = record.get("messages", record.get("conversations"))
    if turns is None and "prompt" in record:
        response = record.get("response", record.get("completion"))
        if response is None:
            raise ValueError(f"line {line}: a 'prompt' record needs 'response' or 'completion'")
        turns = [{"role": "user", "content": record["prompt"]},
                 {"role": "assistant", "content": response}]
    if turns is None:
        return None
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"line {line}: 'messages' must be a non-empty list of turns")
    out = []
    for t in turns:
        role = t.get("role", t.get("from")) if isinstance(t, dict) else None
        content = t.get("content", t.get("value")) if isinstance(t, dict) else None
        if role not in ROLE_ALIASES or not isinstance(content, str):
            raise ValueError(f"line {line}: every turn needs a role in {sorted(ROLE_ALIASES)} "
                             f"and a string content, got {t!r}")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


def _encode_with_mask(tokenizer, text: str, spans) -> tuple[list[int], list[bool]]:
    enc = tokenizer.encode(text, add_special_tokens=False)
    mask = [any(s <= start < e for s, e in spans) for start, _ in enc.offsets]
    return list(enc.ids), mask


def jsonl_splits(path: str | Path, tokenizer, seq_len: int, eos_id: int,
                 chat_template: str | None = None, eval_prompts: int = 32,
                 prompt_tokens: int = 96) -> DataSplits:
    """Rows of a JSONL file (module docstring). Texts longer than `seq_len` are cut into
    several rows; chats are truncated to `seq_len`. `eos_id` ends every text and chat."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file")
    eos_text = tokenizer.id_to_token(eos_id) or ""
    renderer = ChatRenderer(chat_template, eos_token=eos_text)
    splits = {"train": [], "heldout": []}
    prompts = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object, got "
                             f"{type(record).__name__}")
        messages = _messages(record, line_no)
        if messages is None:
            if not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{line_no}: a record needs 'text', 'messages', "
                                 f"'conversations' or 'prompt'")
            ids = tokenizer.encode(record["text"], add_special_tokens=False).ids + [eos_id]
            rows = [(ids[i:i + seq_len], [True] * len(ids[i:i + seq_len]))
                    for i in range(0, len(ids), seq_len)]
        else:
            text, spans = renderer(messages)
            ids, mask = _encode_with_mask(tokenizer, text, spans)
            if chat_template is None:
                ids, mask = ids + [eos_id], mask + [True]
            rows = [(ids[:seq_len], mask[:seq_len])]
        digest = hashlib.sha256(line.encode("utf-8")).digest()
        held = int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PER_MILLE
        split = "heldout" if held else "train"
        splits[split].extend(rows)
    if not splits["train"]:
        raise ValueError(f"{path}: no training records")
    if not splits["heldout"]:  # tiny files: hold out the last row
        splits["heldout"].append(splits["train"].pop())
    for ids, mask in splits["heldout"]:
        if len(prompts) >= eval_prompts:
            break
        first = mask.index(True) if True in mask else len(ids)
        cut = first if first > 0 else min(prompt_tokens, max(1, len(ids) // 2))
        prompts.append(ids[:min(cut, prompt_tokens)])
    return DataSplits(_pad_rows(splits["train"], seq_len), _pad_rows(splits["heldout"], seq_len),
                      prompts, f"jsonl:{path}")


# ---- regeneration by the target -----------------------------------------------------------
def regenerate(target, data: TokenDataset, temperature: float = 1.0, prompt_tokens: int = 32,
               batch_size: int = 32, seed: int = 0, progress: bool = False) -> TokenDataset:
    """The same prompts, answered by the target: row r's prompt is its tokens before its
    first target (at most `prompt_tokens`; rows whose first token is a target keep their
    first `prompt_tokens`), the response is the target's continuation at `temperature` up
    to the row length (stopping at EOS). Targets = the response tokens."""

    if temperature < 0:
        raise ValueError(f"regenerate: temperature must be >= 0, got {temperature}")
    T = data.seq_len
    prompts = []
    for ids, mask in zip(data.input_ids.tolist(), data.loss_mask.tolist()):
        length = sum(1 for t in ids if t >= 0)
        first = mask.index(True) if True in mask else length
        cut = min(first if first > 0 else prompt_tokens, prompt_tokens, max(1, T - 1), length)
        prompts.append(ids[:max(cut, 1)])
    gen = torch.Generator(device=target.device).manual_seed(seed)
    rows = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="regenerate", unit="batch")
    for start in starts:
        chunk = prompts[start:start + batch_size]
        budget = T - min(len(p) for p in chunk)  # each row is cut to its own room below
        out = generate(target, None, chunk, max(budget, 1), temperature=temperature,
                       generator=gen)
        for p, new in zip(chunk, out.tokens):
            new = new[:T - len(p)]
            rows.append((p + new, [False] * len(p) + [True] * len(new)))
    return _pad_rows(rows, T)


def regenerated_corpus_splits(target, seq_len: int, rows: int, heldout_rows: int = 16,
                              eval_prompts: int = 32, seed: int = 1234,
                              heldout_seed: int = 4321, progress: bool = False) -> DataSplits:
    """The embedded corpus answered by the target itself (T = 1): `rows` random training rows
    (chosen with `seed`) and the first `heldout_rows` held-out rows keep their first 32
    tokens as the prompt, the rest is the target's continuation (`regenerate`). This is
    the data that makes a drafter match its target; `vsd demo` and the method comparison
    train on it."""
    splits = corpus_splits(target.tokenizer, seq_len, eval_prompts=eval_prompts)
    if not 1 <= rows <= len(splits.train):
        raise ValueError(f"rows: expected 1..{len(splits.train)}, got {rows}")
    pick = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))
    train = regenerate(target, splits.train.rows(pick[:rows]), temperature=1.0,
                       prompt_tokens=32, batch_size=64, seed=seed, progress=progress)
    heldout = regenerate(target, splits.heldout.rows(torch.arange(min(heldout_rows,
                                                                      len(splits.heldout)))),
                         temperature=1.0, prompt_tokens=32, seed=heldout_seed)
    return DataSplits(train, heldout, splits.prompts, "corpus+regenerated")


# ---- batch order ------------------------------------------------------------------------
class BatchOrder:
    """Deterministic epoch-wise shuffling: epoch e visits the rows in
    `randperm(R, seed = seed · 1_000_003 + e)`; `take(n)` returns the next n row indices
    (crossing into the next epoch as needed). `state_dict()` is the data position."""

    def __init__(self, num_rows: int, seed: int):
        if num_rows < 1:
            raise ValueError("BatchOrder: the dataset has no rows")
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=gen)

    def take(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self.cursor == self.num_rows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            k = min(n, self.num_rows - self.cursor)
            out.append(self._perm[self.cursor:self.cursor + k])
            self.cursor += k
            n -= k
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"num_rows": self.num_rows, "seed": self.seed, "epoch": self.epoch,
                "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise ValueError(f"resume: the checkpoint's data has {state['num_rows']} rows and "
                             f"seed {state['seed']}, this run's {self.num_rows} and {self.seed}")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation(self.epoch)


def load_splits(target, data: str | Path | None, seq_len: int, target_dir=None,
                eval_prompts: int = 32) -> DataSplits:
    """`data` None → the embedded corpus; a `.pt` → `DataSplits.load`; else JSONL (chat
    template from `target_dir`'s tokenizer config when present)."""
    if target.tokenizer is None and (data is None or not str(data).endswith(".pt")):
        raise ValueError("the target has no tokenizer: pass --data with a .pt token dataset")
    if data is None:
        splits = corpus_splits(target.tokenizer, seq_len, eval_prompts)
    elif str(data).endswith(".pt"):
        splits = DataSplits.load(data)
        if splits.train.seq_len != seq_len:
            raise ValueError(f"--data {data}: rows have {splits.train.seq_len} tokens, but "
                             f"seq_len is {seq_len}")
    else:
        splits = jsonl_splits(data, target.tokenizer, seq_len, _eos(target),
                              load_chat_template(target_dir), eval_prompts)
    splits.train.check_vocab(target.vocab_size)
    splits.heldout.check_vocab(target.vocab_size)
    if any(not 0 <= t < target.vocab_size for p in splits.prompts for t in p):
        raise ValueError(f"--data {data}: a held-out prompt holds a token id outside the "
                         f"target's vocabulary [0, {target.vocab_size})")
    return splits
