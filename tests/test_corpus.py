"""The built-in corpus: file selection, the deterministic split, token helpers."""
import hashlib

import pytest
import torch

from vsd_ext import corpus

from helpers import word_tokenizer


def test_split_is_deterministic_and_disjoint():
    root = corpus.stdlib_root()
    train = [p.relative_to(root).as_posix() for p in corpus.stdlib_files("train")]
    heldout = [p.relative_to(root).as_posix() for p in corpus.stdlib_files("heldout")]
    everything = [p.relative_to(root).as_posix() for p in corpus.stdlib_files("all")]
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == everything == sorted(everything)
    assert 0.02 < len(heldout) / len(everything) < 0.10
    assert train == [p.relative_to(root).as_posix() for p in corpus.stdlib_files("train")]
    # The split of a path is a pure function of the path (never of the machine or run).
    for rel in everything[:50]:
        value = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % 1000
        assert corpus.split_of(rel) == ("heldout" if value < corpus.HELDOUT_PER_MILLE else "train")
    assert "os.py" in everything and "dataclasses.py" in heldout


def test_exclusions():
    root = corpus.stdlib_root()
    for path in corpus.stdlib_files("all"):
        parts = path.relative_to(root).parts
        assert path.suffix == ".py"
        assert not set(parts[:-1]) & corpus.EXCLUDED_DIRS
        assert not parts[-1].startswith("_sysconfigdata")
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.stdlib_files("validation")


def fake_stdlib(tmp_path):
    files = {"a.py": "x = 1\n", "pkg/b.py": "y = 2\nz = 3\n", "test/t.py": "skip\n",
             "site-packages/s.py": "skip\n", "encodings/e.py": "skip\n",
             "_sysconfigdata_x.py": "skip\n", "notes.txt": "skip\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def small_tokenizer():
    words = ["<|endoftext|>", "x", "=", "1", "y", "2", "z", "3", "[UNK]"]
    return word_tokenizer({w: i for i, w in enumerate(words)}, "[UNK]")


def test_token_helpers_on_a_fake_root(tmp_path):
    root = fake_stdlib(tmp_path)
    names = [p.relative_to(root).as_posix() for p in corpus.stdlib_files("all", root)]
    assert names == ["a.py", "pkg/b.py"]
    tok = small_tokenizer()
    stream = corpus.token_stream(tok, "all", root)
    assert stream.tolist() == [1, 2, 3, 0, 4, 2, 5, 6, 2, 7, 0]  # files end with EOT (0)
    assert stream.dtype == torch.int64
    rows = corpus.chunk_stream(stream, 4)
    assert rows.shape == (2, 4) and rows.flatten().tolist() == stream[:8].tolist()
    assert corpus.token_sequences(tok, "all", 5, root).shape == (2, 5)
    assert corpus.eos_id(tok) == 0
    with pytest.raises(ValueError, match="seq_len"):
        corpus.chunk_stream(stream, 0)


def test_prompts_are_heldout_file_openings():
    prompts = corpus.prompts("heldout", num_lines=5, limit=3)
    assert len(prompts) == 3
    first = [t for t in corpus.stdlib_texts("heldout") if len(t.splitlines()) > 10][0]
    assert prompts[0] == "".join(first.splitlines(keepends=True)[:5])


def test_include_tests_adds_the_test_suites_of_the_same_split(tmp_path):
    root = fake_stdlib(tmp_path)
    names = [p.relative_to(root).as_posix() for p in corpus.stdlib_files("all", root, True)]
    assert names == ["a.py", "pkg/b.py", "test/t.py"]
    for split in ("train", "heldout"):
        plain = set(corpus.stdlib_files(split))
        with_tests = set(corpus.stdlib_files(split, include_tests=True))
        assert plain < with_tests or (split == "heldout" and plain <= with_tests)
        extra = with_tests - plain
        assert all(set(p.relative_to(corpus.stdlib_root()).parts[:-1]) & corpus.TEST_DIRS
                   for p in extra)
        assert all(corpus.split_of(p.relative_to(corpus.stdlib_root()).as_posix()) == split
                   for p in extra)


def test_external_files_are_outside_the_corpus():
    external = corpus.external_files()
    assert len(external) > 20 and all(p.suffix == ".py" for p in external)
    assert not set(external) & set(corpus.stdlib_files("all", include_tests=True))
    assert external == corpus.external_files()
