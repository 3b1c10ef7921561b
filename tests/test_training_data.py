"""Training data: JSONL texts and chats (plain and Jinja chat templates), loss masks,
held-out split, regeneration by the target, batch order state, saved datasets, bad input."""
import json

import pytest
import torch

from vsd_ext import train_drafter
from vsd_ext.decoding import generate
from vsd_ext.training.data import (
    BatchOrder,
    ChatRenderer,
    DataSplits,
    TokenDataset,
    jsonl_splits,
    load_chat_template,
    regenerate,
)

from helpers import write_tiny_target

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} "
            "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_chat")
    return directory, write_tiny_target(directory, chat_template=TEMPLATE)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def words(*ids):
    return " ".join(f"w{i}" for i in ids)


def masked_tokens(data, row):
    ids, mask = data.input_ids[row], data.loss_mask[row]
    return ids[mask].tolist()


def test_texts_are_cut_into_rows_every_token_a_target(tiny, tmp_path):
    _, target = tiny
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": words(*range(1, 12))}] * 3)
    splits = jsonl_splits(path, target.tokenizer, seq_len=5, eos_id=0)
    rows = torch.cat((splits.train.input_ids, splits.heldout.input_ids))
    assert rows.shape[1] == 5
    # 11 words + eos = 12 tokens -> rows of 5, 5, 2 (padded with -1) per record
    assert rows[:3].tolist() == [[2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12, 0, -1, -1, -1]]
    masks = torch.cat((splits.train.loss_mask, splits.heldout.loss_mask))
    assert torch.equal(masks, rows >= 0)


@pytest.mark.parametrize("template", [None, TEMPLATE])
def test_chat_loss_mask_covers_assistant_turns_only(tiny, tmp_path, template):
    _, target = tiny
    chat = [{"role": "system", "content": words(1)}, {"role": "user", "content": words(2, 3)},
            {"role": "assistant", "content": words(4, 5)}, {"role": "user", "content": words(6)},
            {"role": "assistant", "content": words(7, 8, 9)}]
    sharegpt = [{"from": "human", "value": words(2, 3)}, {"from": "gpt", "value": words(4, 5)}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}, {"conversations": sharegpt},
                                              {"prompt": words(2, 3), "response": words(4, 5)}])
    splits = jsonl_splits(path, target.tokenizer, seq_len=64, eos_id=0, chat_template=template)
    data = TokenDataset(torch.cat((splits.train.input_ids, splits.heldout.input_ids)),
                        torch.cat((splits.train.loss_mask, splits.heldout.loss_mask)))
    assert len(data) == 3
    # Assistant content (and the template's end-of-turn eos / the plain format's final eos).
    got = sorted(masked_tokens(data, r) for r in range(3))
    want = sorted([[5, 6, 0, 8, 9, 10, 0], [5, 6, 0], [5, 6, 0]])
    if template is None:  # plain format: newline is not a word-level token; eos once at the end
        want = sorted([[5, 6, 8, 9, 10, 0], [5, 6, 0], [5, 6, 0]])
    assert got == want
    assert len(splits.prompts) == 1 and len(splits.prompts[0]) > 0


def test_chat_template_from_tokenizer_config(tiny, tmp_path):
    directory, _ = tiny
    assert load_chat_template(directory) == TEMPLATE
    assert load_chat_template(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert load_chat_template(tmp_path) == "{{ messages }}"
    text, spans = ChatRenderer(TEMPLATE, eos_token="E")(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert text == "<|user|> a E <|assistant|> b E " and text[spans[0][0]:spans[0][1]] == "b E "


def test_bad_jsonl_raises_clear_errors(tiny, tmp_path):
    _, target = tiny
    cases = {"{not json": "not JSON", '["a"]': "JSON object", '{"x": 1}': "needs 'text'",
             '{"messages": []}': "non-empty list",
             '{"messages": [{"role": "alien", "content": "a"}]}': "role",
             '{"prompt": "a"}': "'response' or 'completion'"}
    for i, (line, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text('{"text": "w1"}\n' + line + "\n")
        with pytest.raises(ValueError, match=message) as err:
            jsonl_splits(path, target.tokenizer, 8, 0)
        assert ":2" in str(err.value) or "line 2" in str(err.value)
    with pytest.raises(ValueError, match="no such file"):
        jsonl_splits(tmp_path / "missing.jsonl", target.tokenizer, 8, 0)
    with pytest.raises(ValueError, match="marks padding"):
        TokenDataset(torch.tensor([[1, -1]]), torch.tensor([[True, True]]))
    with pytest.raises(ValueError, match="input_ids"):
        TokenDataset(torch.tensor([1, 2]), torch.tensor([True, True]))


def test_regenerate_answers_prompts_with_the_target(tiny):
    _, target = tiny
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, -1, -1]])
    mask = torch.tensor([[False, False, True, True, True, True, True, True],
                         [True] * 6 + [False] * 2])
    new = regenerate(target, TokenDataset(ids, mask), temperature=0.0, prompt_tokens=3)
    # Row 0: prompt = tokens before the first target; row 1: its first 3 tokens.
    for row, prompt in ((0, [3, 4]), (1, [11, 12, 13])):
        cont = generate(target, None, [prompt], 8 - len(prompt)).tokens[0]
        seq = new.input_ids[row][new.input_ids[row] >= 0].tolist()
        assert seq == prompt + cont
        assert new.loss_mask[row].tolist()[:len(seq)] == [False] * len(prompt) + [True] * len(cont)


def test_batch_order_is_deterministic_and_resumable():
    order = BatchOrder(10, seed=5)
    first = torch.cat([order.take(4) for _ in range(6)])      # crosses two epochs
    assert sorted(first[:10].tolist()) == list(range(10))
    again = BatchOrder(10, seed=5)
    again.take(4)
    state = again.state_dict()
    resumed = BatchOrder(10, seed=5)
    resumed.load_state_dict(state)
    assert torch.equal(torch.cat([resumed.take(4) for _ in range(5)]), first[4:])
    with pytest.raises(ValueError, match="rows and seed"):
        BatchOrder(11, seed=5).load_state_dict(state)


def test_saved_splits_roundtrip(tmp_path):
    data = TokenDataset(torch.tensor([[1, 2, -1]]), torch.tensor([[False, True, False]]))
    DataSplits(data, data, [[1, 2]], "x").save(tmp_path / "d.pt")
    back = DataSplits.load(tmp_path / "d.pt")
    assert torch.equal(back.train.input_ids, data.input_ids) and back.prompts == [[1, 2]]
    torch.save({"other": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a dataset"):
        DataSplits.load(tmp_path / "bad.pt")


def test_trainer_regenerates_once_and_keeps_the_dataset(tiny, tmp_path):
    _, target = tiny
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": words(*range(1, 30, k))} for k in
                                               (1, 2, 3, 4, 5, 1, 2)])
    kw = dict(data=str(path), seq_len=12, batch_size=2, max_steps=1, regenerate=True,
              regenerate_rows=3, regenerate_prompt_tokens=4, regenerate_temperature=0.0,
              progress=False)
    train_drafter(target, tmp_path / "run", **kw)
    data = DataSplits.load(tmp_path / "run" / "data.pt")
    assert len(data.train) == 3 and data.source.endswith("+regenerated")
    for ids, mask in zip(data.train.input_ids.tolist(), data.train.loss_mask.tolist()):
        n = sum(t >= 0 for t in ids)
        assert mask[:4] == [False] * 4 and mask[4:n] == [True] * (n - 4)
        assert generate(target, None, [ids[:4]], 8).tokens[0][:n - 4] == ids[4:n]
    before = (tmp_path / "run" / "data.pt").stat().st_mtime_ns
    train_drafter(target, tmp_path / "run", **{**kw, "max_steps": 2})  # resumes, reuses data
    assert (tmp_path / "run" / "data.pt").stat().st_mtime_ns == before
