"""Tests for lora_min/data.py: download, parsing, formatting, batching and the loss."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import importlib.util
import random
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from lora_min import data
from lora_min.data import (
    DEMO_DIR, E2E_SHA256, EOT, PAD_ID, SPLIT_FILES, DownloadError, E2EFormatError, Example,
    batch_plan, collate, decode, decode_completion, download_e2e, encode_example, encode_prompt,
    ensure_e2e, format_mr, format_ref, get_tokenizer, group_references, iterate_batches, load_split,
    make_examples, masked_lm_loss, num_batches, paper_file, paper_words, parse_mr, read_e2e_csv,
    references_for_scoring, resolve_e2e_dir, shard,
)

# ------------------------------------------------------------------ real data (../shared/e2e)

E2E_COUNTS = {"train": (4862, 42061), "dev": (547, 4672), "test": (630, 4693)}  # (MRs, refs)
E2E_SLOTS = {"name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"}


@functools.lru_cache(maxsize=None)
def read_real(path: Path) -> list:
    """Each real CSV is parsed once per test session (the train set takes ~1 s)."""
    return read_e2e_csv(path)


@pytest.mark.parametrize("split", sorted(E2E_COUNTS))
def test_real_split_counts_and_grouping(e2e_dir, split):
    pairs = read_real(e2e_dir / SPLIT_FILES[split])
    groups = group_references(pairs)
    assert (len(groups), len(pairs)) == E2E_COUNTS[split]
    # grouping keeps first-appearance order and loses nothing
    assert groups[0] == (pairs[0].mr, [ref for mr, ref in pairs if mr == pairs[0].mr])
    assert [mr for mr, _ in groups] == list(dict.fromkeys(mr for mr, _ in pairs))
    assert sum(len(refs) for _, refs in groups) == len(pairs)
    assert {slot for mr, _ in groups for slot, _ in parse_mr(mr)} == E2E_SLOTS


def test_real_first_rows(e2e_dir):
    pairs = read_real(e2e_dir / "devset.csv")
    assert pairs[0].mr.startswith("name[")
    assert parse_mr("name[The Vaults], eatType[pub], priceRange[more than £30]") == [
        ("name", "The Vaults"), ("eatType", "pub"), ("priceRange", "more than £30")]
    train = read_real(e2e_dir / "trainset.csv")
    assert train[0].mr == ("name[The Vaults], eatType[pub], priceRange[more than £30], "
                           "customer rating[5 out of 5], near[Café Adriatic]")
    assert train[0].ref == "The Vaults pub near Café Adriatic has a 5 star rating.  Prices start at £30."


def test_real_files_match_pinned_sha256(e2e_dir):
    for name, expected in E2E_SHA256.items():
        assert hashlib.sha256((e2e_dir / name).read_bytes()).hexdigest() == expected


@pytest.mark.parametrize("text", ["paper", "raw-csv"])
def test_real_format_decode_round_trip(e2e_dir, text):
    pairs = read_real(e2e_dir / "devset.csv")
    for mr, ref in pairs:
        example = encode_example(mr, ref, text)
        completion = format_ref(ref, text)
        assert decode(example.input_ids) == f"{format_mr(mr, text)}<|endoftext|> {completion}<|endoftext|>"
        assert list(example.input_ids[:example.n_prompt]) == encode_prompt(mr, text)
        assert decode_completion(example.input_ids[example.n_prompt:]) == completion.strip()


# ------------------------------------------------------------------ the paper's text

@pytest.mark.parametrize("csv_name, split, paper_name", [("devset.csv", "dev", "valid.txt"),
                                                         ("testset_w_refs.csv", "test", "test.txt")])
def test_paper_text_is_microsoft_loras_file_byte_for_byte(e2e_dir, shared_dir, csv_name, split, paper_name):
    """microsoft/LoRA's examples/NLG/data/e2e/{valid,test}.txt (git blob 94f87112..., 084da9f4...)."""
    ours = paper_file(read_real(e2e_dir / csv_name), split).encode("utf-8")
    assert ours == (shared_dir / "e2e-paper" / paper_name).read_bytes()


def test_paper_words_rule_by_rule():
    # step 1: punctuation off the ends, outside in
    assert paper_words("Blue Spice. '5 out of 5', £20-25.") == \
        ["Blue", "Spice", ".", "'", "5", "out", "of", "5", "'", ",", "£", "20", "-", "25", "."]
    assert paper_words("center., non- -friendly £.") == ["center", ".", ",", "non-", "-friendly", "£", "."]
    assert paper_words("rated 1 out of 5. in the city", "dev") == ["rated", "1", "out", "of", "5.", "in", "the", "city"]
    assert paper_words("rated 1 out of 5. in the city", "test")[4:6] == ["5", "."]
    assert paper_words("rated 5. It is") == ["rated", "5", ".", "It", "is"]  # a capital: a sentence end
    # step 2: clitics, and the one the two tools split differently
    assert paper_words("It's you'll") == ["It", "'s", "you", "'ll"]
    assert paper_words("isn't won't", "train") == ["isn", "'t", "won", "'t"]
    assert paper_words("isn't won't thats", "test") == ["is", "n't", "wo", "n't", "that", "s"]
    assert paper_words("thats", "dev") == ["thats"]
    # step 3: hyphens, commas and (train and dev) pound signs and dots inside a word
    assert paper_words("family-friendly 20-25 Cricketers,located 30.99 L30") == \
        ["family", "-", "friendly", "20", "-", "25", "Cricketers", ",", "located", "30.99", "L30"]
    assert paper_words("5-star is£20-25 £20-£25 ratings...but", "train") == \
        ["5", "-", "star", "is", "£", "20", "-", "25", "£", "20-", "£", "25", "ratings", "...", "but"]
    assert paper_words("5-star of£20-£30 £20-£25", "test") == ["5-star", "of£20-£30", "£", "20-£25"]
    with pytest.raises(ValueError, match="unknown E2E split 'valid'"):
        paper_words("a", "valid")


def test_paper_mr_and_completion():
    mr = "name[Blue Spice], eatType[coffee shop], priceRange[£20-25], familyFriendly[yes]"
    assert format_mr(mr) == "name : Blue Spice | Type : coffee shop | price : £ 20 - 25 | family friendly : yes"
    assert format_mr(mr, "raw-csv") == "name : Blue Spice | Type : coffee shop | price : £20-25 | family friendly : yes"
    assert format_ref("It's  a café.\n") == "It 's a café . "  # the files' lines end in a space
    assert format_ref("It's  a café.\n", "raw-csv") == "It's a café."
    assert references_for_scoring(["It's a café."]) == ["It 's a café ."]  # gpt2_decode.py strips
    with pytest.raises(ValueError, match="unknown text 'csv'"):
        format_mr(mr, "csv")


# ------------------------------------------------------------------ download

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path):
    """Serve `directory` over HTTP on 127.0.0.1; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def assert_left_nothing(dest: Path) -> None:
    """A failed download into a new folder leaves not even the folder; into an existing one, nothing new."""
    assert not dest.exists() or list(dest.iterdir()) == [], f"left behind: {list(dest.iterdir())}"


def test_download_and_extract_real_zip(shared_dir, tmp_path):
    dest = tmp_path / "e2e"
    with serve(shared_dir / "e2e") as base:
        assert download_e2e(dest, url=f"{base}/e2e-dataset.zip") == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(E2E_SHA256)  # no zip, no temp folder
    for name in E2E_SHA256:
        assert (dest / name).read_bytes() == (shared_dir / "e2e" / name).read_bytes()
    assert ensure_e2e(dest, download=False) == dest


def test_download_truncated_zip_leaves_nothing(shared_dir, tmp_path):
    served, dest = tmp_path / "served", tmp_path / "e2e"
    served.mkdir()
    zip_bytes = (shared_dir / "e2e" / "e2e-dataset.zip").read_bytes()
    (served / "e2e-dataset.zip").write_bytes(zip_bytes[:len(zip_bytes) // 2])
    with serve(served) as base, pytest.raises(DownloadError, match="not a valid zip"):
        download_e2e(dest, url=f"{base}/e2e-dataset.zip")
    assert_left_nothing(dest)


def test_download_corrupted_zip_leaves_nothing(shared_dir, tmp_path):
    served, dest = tmp_path / "served", tmp_path / "e2e"
    served.mkdir()
    zip_bytes = bytearray((shared_dir / "e2e" / "e2e-dataset.zip").read_bytes())
    for i in range(len(zip_bytes) // 3, len(zip_bytes) // 3 + 64):  # garble compressed data
        zip_bytes[i] ^= 0xFF
    (served / "e2e-dataset.zip").write_bytes(bytes(zip_bytes))
    with serve(served) as base, pytest.raises(DownloadError):
        download_e2e(dest, url=f"{base}/e2e-dataset.zip")
    assert_left_nothing(dest)


def _write_zip(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(f"e2e-dataset/{name}", content)


def test_download_sha_mismatch_names_file_and_leaves_nothing(tmp_path):
    served, dest = tmp_path / "served", tmp_path / "e2e"
    served.mkdir()
    _write_zip(served / "e2e-dataset.zip", {name: b'mr,ref\n"name[A]",Text.\n' for name in E2E_SHA256})
    with serve(served) as base, pytest.raises(DownloadError, match="sha256 mismatch for trainset.csv"):
        download_e2e(dest, url=f"{base}/e2e-dataset.zip")
    assert_left_nothing(dest)


def test_download_zip_without_csv_is_an_error(tmp_path):
    served, dest = tmp_path / "served", tmp_path / "e2e"
    served.mkdir()
    _write_zip(served / "e2e-dataset.zip", {"README.md": b"nothing here"})
    with serve(served) as base, pytest.raises(DownloadError, match="e2e-dataset/trainset.csv"):
        download_e2e(dest, url=f"{base}/e2e-dataset.zip")
    assert_left_nothing(dest)


def test_download_offline_fails_fast_and_says_what_to_do(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on: the connection is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dest = tmp_path / "e2e"
    started = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download_e2e(dest, url=f"http://127.0.0.1:{port}/e2e-dataset.zip", timeout=2.0)
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert str(dest) in message and "by hand" in message and "LORA_MIN_E2E_DIR" in message
    assert all(name in message for name in E2E_SHA256)
    assert not dest.exists()  # not even an empty data folder


def test_resolve_e2e_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_MIN_E2E_DIR", raising=False)
    assert resolve_e2e_dir() == data.REPO_DIR / "data" / "e2e"
    monkeypatch.setenv("LORA_MIN_E2E_DIR", str(tmp_path / "env"))
    assert resolve_e2e_dir() == tmp_path / "env"
    assert resolve_e2e_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_e2e_dir("demo") == DEMO_DIR


def test_ensure_e2e_downloads_only_when_missing(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(data, "download_e2e", lambda folder: calls.append(folder) or folder)
    assert ensure_e2e(tmp_path) == tmp_path and calls == [tmp_path]
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ensure_e2e(tmp_path, download=False)
    for name in E2E_SHA256:
        (tmp_path / name).write_text("mr,ref\n")
    assert ensure_e2e(tmp_path) == tmp_path and calls == [tmp_path]


# ------------------------------------------------------------------ parsing bad input

def write(tmp_path: Path, content: str | bytes, name: str = "bad.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize("content, line, why", [
    ('mr,ref\n"name[A], eatType[pub]",Fine.\n"name[B], eatType[pub]"\n', 3, "2 columns"),
    ('mr,ref\n"name[A], eatType[pub",Text.\n', 2, "unbalanced brackets"),
    ('mr,ref\n"name[A]",Fine.\n,Text without an MR.\n', 3, "empty MR"),
    ('mr,ref\n"  ",Text.\n', 2, "empty MR"),
    ('mr,ref\n"name[A] eatType[pub]",Text.\n', 2, "expected ','"),
    ('mr,ref\n"name[A]",\n', 2, "empty reference"),
    ('mrs,refs\n"name[A]",Text.\n', 1, "header"),
    ('mr,ref\n"name[A]","two\nlines"\n"name[B]",Fine.\n"name[C]"\n', 5, "2 columns"),  # quoted newline
    ('mr,ref\n"name[A]",Fine.\n"name[B]","never closed\n', 3, "unexpected end of data"),
    ("", 1, "empty file"),
    ("mr,ref\n", 2, "no rows after the header"),  # training would run 0 steps, scoring divide by 0
])
def test_bad_csv_names_file_and_line(tmp_path, content, line, why):
    path = write(tmp_path, content)
    with pytest.raises(E2EFormatError, match=why) as err:
        read_e2e_csv(path)
    assert f"{path}, line {line}:" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_bad_encoding_names_file_and_line(tmp_path):
    path = write(tmp_path, b'mr,ref\n"name[A]",Fine.\n"name[B]",Caf\xe9 latin-1.\n')
    with pytest.raises(E2EFormatError, match="UTF-8") as err:
        read_e2e_csv(path)
    assert f"{path}, line 3:" in str(err.value)


def test_mojibake_and_bom_are_fixed_like_the_scorer(tmp_path):
    path = write(tmp_path, '\ufeffmr,ref\n"name[Caf\u00c3\u00a9 X], priceRange[\u00c2\u00a330]","Costs \u0141 20."\n')
    assert read_e2e_csv(path) == [("name[Café X], priceRange[£30]", "Costs £ 20.")]


def test_blank_lines_and_crlf_are_fine(tmp_path):
    path = write(tmp_path, 'mr,ref\r\n"name[A], food[Thai]",One.\r\n\r\n"name[A], food[Thai]",Two.\r\n')
    pairs = read_e2e_csv(path)
    assert pairs == [("name[A], food[Thai]", "One."), ("name[A], food[Thai]", "Two.")]
    assert group_references(pairs) == [("name[A], food[Thai]", ["One.", "Two."])]


def test_parse_mr():
    assert parse_mr("name[Blue Spice], priceRange[£20-25], near[A, B]") == [
        ("name", "Blue Spice"), ("priceRange", "£20-25"), ("near", "A, B")]
    assert parse_mr("customer rating[5 out of 5]") == [("customer rating", "5 out of 5")]
    for bad in ["", "name", "name[A]]", "name[[A]", "name[A],", "[A]"]:
        with pytest.raises(E2EFormatError):
            parse_mr(bad)


def test_load_split_rejects_unknown_split():
    with pytest.raises(ValueError, match="'valid'"):
        load_split("valid", "demo")


# ------------------------------------------------------------------ tokenizer and formatting

def test_tokenizer_is_gpt2():
    enc = get_tokenizer()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT == 50256


def test_format_follows_microsoft_lora():
    mr = "name[The Vaults], eatType[pub], priceRange[more than £30], familyFriendly[yes]"
    assert format_mr(mr) == "name : The Vaults | Type : pub | price : more than £ 30 | family friendly : yes"
    enc = get_tokenizer()
    example = encode_example(mr, "The Vaults is a pub.\n  Kids welcome. ")
    prompt = enc.encode_ordinary(format_mr(mr)) + [EOT]  # context + separator (gpt2_encode.py --add_bos)
    completion = enc.encode_ordinary(" The Vaults is a pub . Kids welcome . ") + [EOT]  # ' ' + completion (--add_eos)
    assert example == Example(tuple(prompt + completion), len(prompt))
    assert encode_prompt(mr) == prompt
    raw = encode_example(mr, "The Vaults is a pub.\n  Kids welcome. ", "raw-csv")  # whitespace runs collapsed
    assert raw.input_ids[raw.n_prompt:] == tuple(enc.encode_ordinary(" The Vaults is a pub. Kids welcome.") + [EOT])


def test_decode_completion_cuts_as_gpt2_decode_does():
    enc = get_tokenizer()
    assert decode_completion(enc.encode_ordinary(" A pub . \n\nName : x") + [EOT] + [11]) == "A pub ."


def test_special_token_text_is_not_injected():
    example = encode_example("name[<|endoftext|>]", "Say <|endoftext|>.")
    assert example.input_ids.count(EOT) == 2  # only the separator and the end


def test_make_examples_truncation_is_counted():
    pairs = [("name[A]", "short."), ("name[B]", "a much longer reference " * 10)]
    full, n_truncated = make_examples(pairs)
    assert n_truncated == 0
    prompt_len = full[1].n_prompt
    cut, n_truncated = make_examples(pairs, max_len=prompt_len + 5)
    assert n_truncated == 1
    assert cut[0] == full[0] and cut[1].input_ids == full[1].input_ids[:prompt_len + 5]
    with pytest.raises(ValueError, match="max_len"):
        make_examples(pairs, max_len=prompt_len)


# ------------------------------------------------------------------ batching (property tests)

@st.composite
def examples_strategy(draw, min_size=1, max_size=12):
    """Synthetic Examples: random token ids (no EOT inside), a prompt and a completion."""
    token = st.integers(0, EOT - 1)
    result = []
    for _ in range(draw(st.integers(min_size, max_size))):
        prompt = draw(st.lists(token, min_size=0, max_size=8)) + [EOT]
        completion = draw(st.lists(token, min_size=0, max_size=8)) + [EOT]
        result.append(Example(tuple(prompt + completion), len(prompt)))
    return result


@given(examples_strategy())
def test_collate_mask_covers_exactly_the_completion(examples):
    input_ids, targets, loss_mask = collate(examples)
    B, T = input_ids.shape
    assert T == max(len(ex.input_ids) for ex in examples) - 1
    assert input_ids.dtype == targets.dtype == torch.long and loss_mask.dtype == torch.bool
    for b, ex in enumerate(examples):
        tokens, n = list(ex.input_ids), len(ex.input_ids) - 1
        assert input_ids[b, :n].tolist() == tokens[:-1] and targets[b, :n].tolist() == tokens[1:]
        assert (input_ids[b, n:] == PAD_ID).all()
        # the mask never covers a prompt target or padding ...
        assert not loss_mask[b, :ex.n_prompt - 1].any() and not loss_mask[b, n:].any()
        # ... and covers every completion token (reference + final EOT) exactly once, in order
        assert targets[b][loss_mask[b]].tolist() == tokens[ex.n_prompt:]
        assert targets[b, n - 1] == EOT and loss_mask[b, n - 1]


TOY_VOCAB = 64


def causal_toy_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """A tiny causal 'language model' over ids mod TOY_VOCAB: logits at t depend only on tokens 0..t."""
    gen = torch.Generator().manual_seed(0)
    embed, head = torch.randn(TOY_VOCAB, 8, generator=gen), torch.randn(8, TOY_VOCAB, generator=gen)
    hidden = embed[input_ids % TOY_VOCAB].cumsum(dim=1) / torch.arange(1, input_ids.shape[1] + 1).view(1, -1, 1)
    return hidden @ head  # (B, T, TOY_VOCAB)


@given(examples_strategy(min_size=2, max_size=6), st.sampled_from([0.0, 0.1]))
def test_padding_does_not_change_the_loss(examples, label_smoothing):
    def loss(batch):
        x, y, m = batch
        return masked_lm_loss(causal_toy_logits(x), y % TOY_VOCAB, m, label_smoothing).item()

    batch_loss = loss(collate(examples))
    # each example alone (no padding at all), weighted by its number of target tokens
    n_targets = [len(ex.input_ids) - ex.n_prompt for ex in examples]
    alone = sum(loss(collate([ex])) * n for ex, n in zip(examples, n_targets)) / sum(n_targets)
    assert batch_loss == pytest.approx(alone, rel=1e-5)


@given(n=st.integers(0, 60), batch_size=st.integers(1, 9), seed=st.integers(0, 3),
       epoch=st.integers(0, 3), shuffle=st.booleans(), bucket=st.booleans(),
       drop_last=st.booleans(), world_size=st.integers(1, 4))
def test_batch_plan_is_deterministic_and_complete(n, batch_size, seed, epoch, shuffle, bucket,
                                                  drop_last, world_size):
    world_size = min(world_size, batch_size)
    lengths = [random.Random(i).randint(3, 40) for i in range(n)]
    kwargs = dict(seed=seed, epoch=epoch, shuffle=shuffle, bucket=bucket, drop_last=drop_last,
                  world_size=world_size)
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    plan = batch_plan(lengths, batch_size, **kwargs)
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
    assert plan == batch_plan(lengths, batch_size, **kwargs)  # same seed and epoch, same batches
    assert len(plan) == num_batches(n, batch_size, drop_last=drop_last, world_size=world_size)
    flat = [i for batch in plan for i in batch]
    assert len(flat) == len(set(flat))  # no example twice
    assert len(flat) == n or (len(flat) == n - n % batch_size and n % batch_size)  # at most the tail dropped
    assert all(len(batch) == batch_size for batch in plan[:-1] if not shuffle)
    assert sum(len(batch) < batch_size for batch in plan) <= 1
    assert all(len(batch) >= world_size for batch in plan)
    if not shuffle and not bucket:
        assert flat == list(range(len(flat)))


@given(examples_strategy(min_size=1, max_size=20), st.integers(1, 6), st.integers(1, 4), st.booleans())
def test_ddp_shards_union_is_the_single_process_batch(examples, batch_size, world_size, bucket):
    world_size = min(world_size, batch_size)
    kwargs = dict(seed=7, epoch=1, bucket=bucket)
    # one process sees the same batches, except a final batch too short to give every rank a row
    single = [batch for batch in iterate_batches(examples, batch_size, **kwargs) if len(batch[0]) >= world_size]
    per_rank = [list(iterate_batches(examples, batch_size, rank=r, world_size=world_size, **kwargs))
                for r in range(world_size)]
    assert all(len(batches) == len(single) for batches in per_rank)  # every rank steps together

    def pad_to(tensor, T, value):  # right-pad a (b, t) piece to T columns
        return F.pad(tensor, (0, T - tensor.shape[1]), value=value)

    for step, full in enumerate(single):
        pieces = [per_rank[r][step] for r in range(world_size)]
        assert all(len(piece[0]) >= 1 for piece in pieces)
        T = full[0].shape[1]
        joined = [torch.cat([pad_to(piece[k], T, value) for piece in pieces])
                  for k, value in ((0, PAD_ID), (1, PAD_ID), (2, False))]
        assert all(torch.equal(a, b) for a, b in zip(joined, full))


def test_shard_splits_evenly():
    batch = list(range(10))
    pieces = [shard(batch, r, 4) for r in range(4)]
    assert pieces == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="rank"):
        shard(batch, 4, 4)
    with pytest.raises(ValueError, match="world_size"):
        batch_plan([3] * 10, 2, world_size=4)  # a global batch of 2 cannot feed 4 ranks


def test_start_batch_resumes_at_the_same_batch():
    examples = [Example(tuple(range(1, 3 + i % 7)) + (EOT,), 2) for i in range(50)]
    full = list(iterate_batches(examples, 4, seed=3, epoch=2))
    resumed = list(iterate_batches(examples, 4, seed=3, epoch=2, start_batch=5))
    assert len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    other_epoch = list(iterate_batches(examples, 4, seed=3, epoch=3))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(full, other_epoch))


def test_bucketing_reduces_padding():
    rng = random.Random(0)
    examples = [Example(tuple(range(1, rng.randint(5, 80))) + (EOT,), 2) for _ in range(800)]

    def padding_fraction(bucket):
        padded = real = 0
        for _, _, mask in iterate_batches(examples, 8, seed=0, bucket=bucket):
            padded += mask.numel()
        real = sum(len(ex.input_ids) - 1 for ex in examples)
        return 1 - real / padded

    assert padding_fraction(bucket=True) < 0.05 < 0.2 < padding_fraction(bucket=False)


# ------------------------------------------------------------------ loss

def lora_reference_loss(logits, targets, mask, label_smooth):
    """microsoft/LoRA examples/NLG/src/model.py GPT2LMModel.forward, written out."""
    logprobs = F.log_softmax(logits.view(-1, logits.size(-1)), dim=-1)
    nll = -logprobs.gather(dim=-1, index=targets.view(-1, 1)).squeeze(1)
    smooth = -logprobs.mean(dim=-1)
    loss = ((1.0 - label_smooth) * nll + label_smooth * smooth).view(targets.shape)
    mask = mask.float()
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_masked_lm_loss_matches_microsoft_lora(label_smoothing):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 50, (3, 7), generator=gen)
    mask = torch.rand(3, 7, generator=gen) < 0.5
    mask[0, 0] = True
    expected = lora_reference_loss(logits, targets, mask, label_smoothing)
    full = masked_lm_loss(logits, targets, mask, label_smoothing)
    gathered = masked_lm_loss(logits[mask], targets, mask, label_smoothing)
    assert full.item() == pytest.approx(expected.item(), rel=1e-6)
    assert gathered.item() == pytest.approx(expected.item(), rel=1e-6)
    targets_changed_off_mask = targets.masked_fill(~mask, 0)  # values under a False mask don't matter
    assert masked_lm_loss(logits, targets_changed_off_mask, mask, label_smoothing).item() == full.item()


def test_masked_lm_loss_rejects_wrong_shapes():
    mask = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="N = loss_mask.sum"):
        masked_lm_loss(torch.randn(3, 10), torch.zeros(1, 3, dtype=torch.long), mask)


# ------------------------------------------------------------------ demo data

def test_demo_set_is_regenerated_byte_for_byte(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo", data.REPO_DIR / "data" / "make_demo.py")
    make_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_demo)
    make_demo.make_demo(tmp_path)
    for name in SPLIT_FILES.values():
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), name


def test_demo_set_loads_and_is_split_cleanly():
    assert ensure_e2e("demo", download=False) == DEMO_DIR
    groups = {split: group_references(load_split(split, "demo", download=False)) for split in SPLIT_FILES}
    assert 200 <= sum(len(refs) for _, refs in groups["train"]) <= 500
    for split in ("dev", "test"):
        assert 30 <= len(groups[split]) <= 50
        assert all(2 <= len(refs) <= 3 for _, refs in groups[split])
    train_mrs = {mr for mr, _ in groups["train"]}
    assert not train_mrs & {mr for mr, _ in groups["dev"]} and not train_mrs & {mr for mr, _ in groups["test"]}
    examples, n_truncated = make_examples(load_split("train", "demo", download=False))
    assert n_truncated == 0 and all(ex.n_prompt < len(ex.input_ids) for ex in examples)
