"""The E2E NLG Challenge data (Novikova et al., 2017): get it, parse it, batch it.

The LoRA paper (Hu et al., 2021, Section 5.4 and Table 3) fine-tunes GPT-2 on E2E:
restaurant meaning representations (MRs) such as
`name[The Vaults], eatType[pub], priceRange[more than £30]`, each with several
human-written references. This module is everything between the official CSV files
and the tensors the training loop and the evaluation consume:

    download_e2e / ensure_e2e        the official zip -> three verified CSVs on disk
    read_e2e_csv, group_references   CSV -> (mr, ref) pairs -> each MR with all its refs
    paper_words, format_mr/ref       the paper's text: microsoft/LoRA's data/e2e/*.txt, rebuilt
    encode_prompt, encode_example    text -> GPT-2 tokens, formatted as microsoft/LoRA does
    make_examples, iterate_batches   token lists -> padded (input_ids, targets, loss_mask)
    masked_lm_loss                   the label-smoothed loss over reference tokens only

One training sequence (microsoft/LoRA, examples/NLG/src/gpt2_encode.py and data_utils.py):

    [name : The Vaults | Type : pub] [<|endoftext|>] [ The Vaults is a pub . ] [<|endoftext|>]
     the formatted MR                 separator       ' ' + completion         end
     prompt: not in the loss                          completion: in the loss

Where we differ from microsoft/LoRA:
  * collate drops the last input position instead of giving it a padding target:
    the same loss with one position fewer.
  * Batches are padded to their longest sequence (with optional length bucketing),
    not every sequence to 512, and a short final batch is not topped up with
    random repeats.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import random
import re
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from lora_min.download import DownloadError, download_file
from lora_min.fileio import folder_for
from lora_min.tokenizer import EOT, PAD_ID, get_tokenizer

# --------------------------------------------------------------------------- where

E2E_URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
E2E_ZIP_FOLDER = "e2e-dataset"  # the CSVs sit in this folder inside the zip
E2E_SHA256 = {  # of the CSVs as extracted from the official v1.0.0 release
    "trainset.csv": "f27d48df45815288ab15619d47a79028c300fbb7f42e373668aba0b98c1d57c6",
    "devset.csv": "fc26b78cdb849c80545f513b223d1e051138b43882eeb79e3eb153e689c864f9",
    "testset_w_refs.csv": "edc8db685e39bb9824d5bd70c18b1c9b0412d14b527aa960e2d1c8251ee15ccd",
}
SPLIT_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}

REPO_DIR = Path(__file__).resolve().parents[1]
DEFAULT_E2E_DIR = REPO_DIR / "data" / "e2e"  # git-ignored; the download lands here
DEMO_DIR = REPO_DIR / "data" / "demo"  # a tiny hand-made set in E2E format (data/make_demo.py)
E2E_DIR_ENV = "LORA_MIN_E2E_DIR"


def resolve_e2e_dir(path: str | Path | None = None) -> Path:
    """The folder the E2E CSVs are read from (it need not exist yet).

    Precedence: an explicit `path` (train.py's --data-dir), then the environment
    variable LORA_MIN_E2E_DIR, then data/e2e/ in the repository. The literal
    string "demo" means the small demo set shipped in data/demo/.
    """
    if path is not None and str(path) == "demo":
        return DEMO_DIR
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(E2E_DIR_ENV):
        return Path(os.environ[E2E_DIR_ENV]).expanduser()
    return DEFAULT_E2E_DIR


def _missing_files(folder: Path) -> list[str]:
    return [name for name in E2E_SHA256 if not (folder / name).is_file()]


def _by_hand_hint(folder: Path) -> str:
    return (f"To get the data by hand, download {E2E_URL}, unzip it and put "
            f"{', '.join(E2E_SHA256)} (from its {E2E_ZIP_FOLDER}/ folder) into {folder}, "
            f"or point {E2E_DIR_ENV} (or --data-dir) at a folder that has them.")


def download_e2e(dest_dir: str | Path | None = None, url: str = E2E_URL, timeout: float = 10.0) -> Path:
    """Download the official E2E zip, extract and verify the three CSVs into `dest_dir`.

    The zip goes to a temporary folder inside `dest_dir` (so the final os.replace
    is a same-filesystem, atomic rename). Every CSV is checked against its pinned
    sha256 before any of them is moved into place; on any failure the temporary
    folder is removed and `dest_dir` holds nothing new (nor exists, if this made it). Raises DownloadError.
    """
    dest = resolve_e2e_dir(dest_dir)
    hint = _by_hand_hint(dest)
    with folder_for(dest), tempfile.TemporaryDirectory(prefix=".e2e-download-", dir=dest) as tmp:
        zip_path = download_file(url, Path(tmp) / "e2e-dataset.zip", timeout=timeout,
                                 desc="E2E dataset", hint=hint)
        verified = []
        try:
            with zipfile.ZipFile(zip_path) as archive:
                for name, expected in E2E_SHA256.items():
                    member = f"{E2E_ZIP_FOLDER}/{name}"
                    try:
                        content = archive.read(member)  # also checks the zip's CRC-32
                    except KeyError:
                        raise DownloadError(f"{url} has no {member} inside. {hint}") from None
                    actual = hashlib.sha256(content).hexdigest()
                    if actual != expected:
                        raise DownloadError(f"sha256 mismatch for {name} (from {url}): expected "
                                            f"{expected}, got {actual}. {hint}")
                    (Path(tmp) / name).write_bytes(content)
                    verified.append(name)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # truncated or corrupted archive
            raise DownloadError(f"{url} is not a valid zip archive ({err}). {hint}") from err
        for name in verified:
            os.replace(Path(tmp) / name, dest / name)
    return dest


def ensure_e2e(path: str | Path | None = None, download: bool = True) -> Path:
    """A folder that holds the three E2E CSVs, downloading them there if they are missing.

    The folder comes from resolve_e2e_dir(path). The demo set is never downloaded.
    """
    folder = resolve_e2e_dir(path)
    missing = _missing_files(folder)
    if not missing:
        return folder
    if not download or folder == DEMO_DIR:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}. {_by_hand_hint(folder)}")
    return download_e2e(folder)


# --------------------------------------------------------------------------- parsing

class E2EFormatError(ValueError):
    """An E2E CSV (or one MR in it) is malformed; the message names the file and line."""


class E2EPair(NamedTuple):
    mr: str  # meaning representation, e.g. "name[The Vaults], eatType[pub]"
    ref: str  # one human reference text for it


# Mojibake the official scorer repairs before reading any file: tuetschek/e2e-metrics,
# measure_scores.py, read_tsv() ("fix Ł", "fix Â£", "fix Ã©", "fix ã©"). The v1.0.0
# CSVs as released are clean UTF-8; we apply the same fixes so that files that went
# through a wrong encoding round trip (and system outputs) read as the scorer reads them.
MOJIBAKE_FIXES = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))

_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*")  # one `slot[value]`


def fix_mojibake(text: str) -> str:
    for wrong, right in MOJIBAKE_FIXES:
        text = text.replace(wrong, right)
    return text


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """'name[The Vaults], eatType[pub]' -> [('name', 'The Vaults'), ('eatType', 'pub')]."""
    if not mr.strip():
        raise E2EFormatError("empty MR")
    slots, pos = [], 0
    while True:
        match = _SLOT.match(mr, pos)
        if match is None:
            why = "unbalanced brackets" if mr.count("[") != mr.count("]") else "expected slot[value]"
            raise E2EFormatError(f"malformed MR {mr!r} at character {pos}: {why}")
        slots.append((match.group(1), match.group(2)))
        pos = match.end()
        if pos == len(mr):
            return slots
        if mr[pos] != ",":
            raise E2EFormatError(f"malformed MR {mr!r} at character {pos}: expected ',' between slots")
        pos += 1


def read_e2e_csv(path: str | Path) -> list[E2EPair]:
    """All (mr, ref) rows of an official E2E CSV (header `mr,ref`), in file order.

    Raises E2EFormatError naming the file and (1-based) line for bad UTF-8, a bad
    header, a row without exactly two columns, a malformed or empty MR, or an empty ref.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise E2EFormatError(f"{path}, line {line}: not valid UTF-8 ({err.reason}, "
                             f"byte 0x{raw[err.start]:02x})") from None
    text = fix_mojibake(text.removeprefix("\ufeff"))  # the scorer also drops a BOM

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    pairs: list[E2EPair] = []
    header_seen = False
    start = 1  # the line the next record starts on (a quoted ref may span lines)
    try:
        for row in reader:
            where, start = f"{path}, line {start}", reader.line_num + 1
            if not row:  # a blank line
                continue
            if not header_seen:
                if [column.strip().lower() for column in row] != ["mr", "ref"]:
                    raise E2EFormatError(f"{where}: expected the header 'mr,ref', got {row!r}")
                header_seen = True
                continue
            if len(row) != 2:
                raise E2EFormatError(f"{where}: expected 2 columns (mr, ref), got {len(row)}: {row!r}")
            mr, ref = row
            try:
                parse_mr(mr)
            except E2EFormatError as err:
                raise E2EFormatError(f"{where}: {err}") from None
            if not ref.strip():
                raise E2EFormatError(f"{where}: empty reference")
            pairs.append(E2EPair(mr, ref))
    except csv.Error as err:  # e.g. a quote that is never closed
        raise E2EFormatError(f"{path}, line {start}: {err}") from None
    if not header_seen:
        raise E2EFormatError(f"{path}, line 1: empty file, expected the header 'mr,ref'")
    if not pairs:  # training on it would run 0 steps; scoring it would divide by zero
        raise E2EFormatError(f"{path}, line {start}: no rows after the header 'mr,ref' (an empty split)")
    return pairs


def group_references(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Unique MRs in order of first appearance, each with all its references.

    This is the grouping the E2E scorer expects: one hypothesis per MR, scored
    against every reference for that MR.
    """
    groups: dict[str, list[str]] = {}
    for mr, ref in pairs:
        groups.setdefault(mr, []).append(ref)
    return list(groups.items())


def load_split(split: str, data_dir: str | Path | None = None, *, download: bool = True) -> list[E2EPair]:
    """The (mr, ref) pairs of 'train', 'dev' or 'test', downloading the data if needed."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown E2E split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    return read_e2e_csv(ensure_e2e(data_dir, download=download) / SPLIT_FILES[split])


# --------------------------------------------------------------------------- the paper's text
# The paper's numbers come from microsoft/LoRA's examples/NLG pipeline, which trains, decodes and
# scores on data/e2e/{train,valid,test}.txt: one `context||completion` line per (MR, reference)
# row of the official CSVs, in the same order. Those files are the Prefix-Tuning (Li & Liang,
# 2021) preprocessing, which we rebuild from the CSVs, byte for byte for valid.txt and test.txt
# (tests/test_data.py checks both against microsoft/LoRA's files):
#
#   CSV  name[Blue Spice], eatType[coffee shop], priceRange[£20-25] | It's a family-friendly café.
#   file name : Blue Spice | Type : coffee shop | price : £ 20 - 25||It 's a family - friendly café . \n
#
# The MR becomes `slot : value | ...` with three slots renamed, and every value and reference is
# split into words by the rules in paper_words, joined by single spaces. The completion ends with
# one space (their files do, and microsoft/LoRA trains on ' ' + completion, that space included).
# The test set's references were evidently tokenized by a different tool from the train/dev
# ones; the rules marked "test" / "train and dev" below are where the two disagree (train.txt
# is assumed to follow the dev rules: it is not here to check, see data/README.md).
# `--text raw-csv` (TEXTS) trains on the CSV text unchanged instead.

TEXTS = ("paper", "raw-csv")  # the paper's tokenized text (default) or the official CSV text as is
LORA_SLOT_NAMES = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}

_LETTER = r"[^\W\d_]"  # a letter, "é" included
_SPLIT_OFF_FRONT = "£$'\","  # "£30" -> "£ 30", "'Family" -> "' Family", ",with" -> ", with"
_SPLIT_OFF_BACK = re.compile(r"(?:\.{2,}|[.,;:!?'\"])$")  # "Spice." -> "Spice .", "friendly.." -> "friendly .."
_CLITIC = re.compile(r"(.+?)('(?:s|ll|re|ve|d|m|t))", re.IGNORECASE)  # "It's" -> "It 's", "isn't" -> "isn 't"
_NUMBER_PERIOD = re.compile(r"\d+\.")  # "5." of "5 out of 5. in the city centre"
_NOT = re.compile(r"(.+)(n't)", re.IGNORECASE)  # test: "isn't" -> "is n't", "won't" -> "wo n't"
_INSIDE = {  # split points inside a word, kept as tokens of their own
    "test": re.compile(rf"((?<={_LETTER})-(?={_LETTER})|(?<=\d)-(?=\d)|(?<={_LETTER}),(?={_LETTER}))"),
    "train": re.compile(rf"((?<=[^\W_])-(?={_LETTER})|(?<=\d)-(?=\d)|(?<={_LETTER}),(?={_LETTER})"
                        rf"|£|\.{{2,}}(?={_LETTER}))"),
}


def paper_words(text: str, split: str = "train") -> list[str]:
    """The words of `text` as the paper's files have them (`split`: "train", "dev" or "test").

    Each whitespace-separated word is cut in three steps:
      1. punctuation off both ends, outside in: "£30" -> "£ 30", "'average'," -> "' average ' ,",
         "center.," -> "center . ,"; "£." -> "£ ."; but "non-" and "-friendly" keep their hyphen.
         train and dev: a number's period before a lower-case word stays ("of 5. in the city";
         the one such word in dev, where their tool did not take the period for a sentence end).
      2. a clitic off the end: "It's" -> "It 's", "You'll" -> "You 'll"; for "n't" the two tools
         differ: test "isn't" -> "is n't", train and dev "isn't" -> "isn 't"; and test alone
         splits "thats" -> "that s".
      3. hyphens and commas inside: "family-friendly" -> "family - friendly", "20-25" -> "20 - 25",
         "Cricketers,located" -> "Cricketers , located"; "5-star" -> "5 - star" in train and dev
         but stays "5-star" in test; train and dev also split off every "£" ("is£20-25" ->
         "is £ 20 - 25", "£20-£25" -> "£ 20- £ 25") and dots between words ("ratings...but").
    Anything else stays as it is: "30.99", "L30", "d'oeuvre", "Café".
    """
    style = _style(split)
    words = text.split()
    tokens: list[str] = []
    for i, word in enumerate(words):
        next_word = words[i + 1] if i + 1 < len(words) else ""
        if style == "train" and _NUMBER_PERIOD.fullmatch(word) and next_word[:1].islower():
            tokens.append(word)  # step 1's exception: "1 out of 5. in the city centre"
        else:
            tokens += _cut_word(word, style)
    return tokens


@functools.lru_cache(maxsize=1 << 16)  # E2E's 51,426 rows hold 5,160 distinct words: each is cut once
def _cut_word(word: str, style: str) -> tuple[str, ...]:
    """Steps 1-3 of paper_words for one whitespace-separated word."""
    front, back = [], []
    while len(word) > 1:  # step 1
        end = _SPLIT_OFF_BACK.search(word)
        if word[0] in _SPLIT_OFF_FRONT:
            front.append(word[0])
            word = word[1:]
        elif end and end.start() > 0:
            back.insert(0, end.group())
            word = word[:end.start()]
        else:
            break
    return (*front, *_split_inside(word, style), *back)


def _style(split: str) -> str:
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown E2E split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    return "test" if split == "test" else "train"


def _split_inside(word: str, style: str) -> list[str]:
    """Steps 2 and 3 of paper_words for one word without its outer punctuation."""
    if style == "test" and word.lower() == "thats":
        return [word[:4], word[4:]]
    clitic = (style == "test" and _NOT.fullmatch(word)) or _CLITIC.fullmatch(word)
    if clitic:
        return _split_inside(clitic.group(1), style) + [clitic.group(2)]
    return [part for part in _INSIDE[style].split(word) if part]


@functools.lru_cache(maxsize=1 << 14)  # the training set's 42,061 rows share 4,862 MRs
def format_mr(mr: str, text: str = "paper") -> str:
    """The prompt text for an MR: 'name[X], eatType[pub], priceRange[£20-25]' ->
    'name : X | Type : pub | price : £ 20 - 25' ("paper"; "raw-csv" keeps '£20-25')."""
    slots = parse_mr(mr)
    if _check_text(text) == "paper":
        slots = [(slot, " ".join(paper_words(value))) for slot, value in slots]
    return " | ".join(f"{LORA_SLOT_NAMES.get(slot, slot)} : {value}" for slot, value in slots)


def format_ref(ref: str, text: str = "paper", split: str = "train") -> str:
    """A reference as the completion text: "paper": its paper_words joined by spaces, with the
    files' final space; "raw-csv": the CSV text with whitespace runs collapsed to one space."""
    if _check_text(text) == "paper":
        return " ".join(paper_words(ref, split)) + " "
    return " ".join(ref.split())


def _check_text(text: str) -> str:
    if text not in TEXTS:
        raise ValueError(f"unknown text {text!r}; expected one of {TEXTS}")
    return text


def paper_file(pairs: Sequence[tuple[str, str]], split: str) -> str:
    """The whole of microsoft/LoRA's data/e2e/<file>.txt for these CSV rows (`split` as in
    SPLIT_FILES; their file names are train, valid and test): one context||completion a line."""
    return "".join(f"{format_mr(mr)}||{format_ref(ref, 'paper', split)}\n" for mr, ref in pairs)


def references_for_scoring(refs: Sequence[str], text: str = "paper", split: str = "test") -> list[str]:
    """One MR's references as the scorer gets them. "paper": as microsoft/LoRA's gpt2_decode.py
    writes e2e_ref.txt (the completion, stripped); "raw-csv": the CSV text on one line."""
    return [format_ref(ref, text, split).strip() for ref in refs]


# --------------------------------------------------------------------------- tokens

# EOT, GPT-2's <|endoftext|> (lora_min/tokenizer.py): separator after the MR and end of the reference.


def encode_prompt(mr: str, text: str = "paper") -> list[int]:
    """What generation feeds the model: the formatted MR, then the <|endoftext|> separator.

    encode_ordinary treats any '<|endoftext|>' inside the text as plain characters,
    so data can never inject the special token.
    """
    return get_tokenizer().encode_ordinary(format_mr(mr, text)) + [EOT]


def encode_reference(ref: str, text: str = "paper") -> list[int]:
    """The completion: ' ' + the training text of the reference (format_ref), then <|endoftext|>."""
    # The leading space is microsoft/LoRA's (gpt2_encode.py: enc.encode(' ' + completion)):
    # GPT-2's BPE glues a word to the space before it, so ' The' is the natural first token.
    return get_tokenizer().encode_ordinary(" " + format_ref(ref, text, "train")) + [EOT]


def decode(ids: Sequence[int]) -> str:
    return get_tokenizer().decode(list(ids))


def decode_completion(ids: Sequence[int]) -> str:
    """Generated tokens after the prompt -> text, cut as microsoft/LoRA's gpt2_decode.py cuts it:
    at the first <|endoftext|>, then at the first blank line ("\\n\\n"), stripped."""
    ids = list(ids)
    if EOT in ids:
        ids = ids[:ids.index(EOT)]
    return decode(ids).split("\n\n")[0].strip()


@dataclass(frozen=True)
class Example:
    """One training sequence: prompt tokens, then completion tokens (reference + EOT)."""
    input_ids: tuple[int, ...]
    n_prompt: int  # tokens of MR + separator; the loss starts at input_ids[n_prompt]

    def __post_init__(self) -> None:
        if not 1 <= self.n_prompt < len(self.input_ids):
            raise ValueError(f"an Example needs a prompt and at least one completion token; "
                             f"got n_prompt={self.n_prompt} of {len(self.input_ids)} tokens")


def encode_example(mr: str, ref: str, text: str = "paper") -> Example:
    prompt = encode_prompt(mr, text)
    return Example(tuple(prompt + encode_reference(ref, text)), len(prompt))


def make_examples(pairs: Sequence[tuple[str, str]], max_len: int = 512,
                  text: str = "paper") -> tuple[list[Example], int]:
    """Encode every (mr, ref) pair; sequences longer than `max_len` keep their first
    `max_len` tokens (as microsoft/LoRA's padding_tokens does). Returns the examples and
    how many were truncated. E2E examples are ~20-100 tokens, so 512 never truncates."""
    examples, n_truncated = [], 0
    for mr, ref in pairs:
        example = encode_example(mr, ref, text)
        if len(example.input_ids) > max_len:
            if example.n_prompt >= max_len:
                raise ValueError(f"max_len={max_len} leaves no reference token for MR {mr!r} "
                                 f"({example.n_prompt} prompt tokens)")
            example = Example(example.input_ids[:max_len], example.n_prompt)
            n_truncated += 1
        examples.append(example)
    return examples, n_truncated


# --------------------------------------------------------------------------- batches

BUCKET_BATCHES = 100  # length-sort within windows of this many batches


def collate(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a list of examples into (input_ids, targets, loss_mask), each (B, T).

    A sequence of L tokens gives L - 1 positions: input_ids = tokens[:-1] and
    targets = tokens[1:], so targets[b, t] is the token that follows input_ids[b, t]
    (the standard next-token shift, done here so the model needs no slicing).
    T is the longest L - 1 in the batch (dynamic padding). loss_mask[b, t] is True
    exactly where targets[b, t] is a reference token or the final <|endoftext|>;
    padded positions hold PAD_ID in both tensors and are never in the mask.
    """
    T = max(len(ex.input_ids) for ex in examples) - 1
    input_ids = torch.full((len(examples), T), PAD_ID, dtype=torch.long)
    targets = torch.full((len(examples), T), PAD_ID, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), T), dtype=torch.bool)
    for b, ex in enumerate(examples):
        tokens = torch.tensor(ex.input_ids, dtype=torch.long)
        n = len(tokens) - 1
        input_ids[b, :n] = tokens[:-1]
        targets[b, :n] = tokens[1:]
        # target t is tokens[t + 1]; it belongs to the completion when t + 1 >= n_prompt
        loss_mask[b, ex.n_prompt - 1:n] = True
    return input_ids, targets, loss_mask


def batch_plan(lengths: Sequence[int], batch_size: int, *, seed: int = 0, epoch: int = 0,
               shuffle: bool = True, bucket: bool = True, drop_last: bool = False,
               world_size: int = 1) -> list[list[int]]:
    """The global batches of one epoch, as lists of example indices.

    Scheme: shuffle all indices (if `shuffle`); if `bucket`, cut that order into
    windows of BUCKET_BATCHES * batch_size and sort each window by length, so a batch
    holds similar lengths and little padding; cut into batches; then shuffle the
    order of the batches (if `shuffle`), so lengths do not rise and fall in a
    saw-tooth through the epoch. The order depends only on (seed, epoch): a
    dedicated random.Random, never global RNG state, so a resumed run sees the same
    batches. The one incomplete batch (wherever the shuffle put it) is kept unless
    `drop_last`, or unless it has fewer examples than `world_size` (a data-parallel
    rank would get none); all other batches are identical for every world_size.
    """
    if not 1 <= world_size <= batch_size:
        raise ValueError(f"need 1 <= world_size <= batch_size (every rank gets part of each batch), "
                         f"got world_size={world_size}, batch_size={batch_size}")
    # A str seed is hashed with SHA-512 by random.seed: the same stream in every process and run.
    rng = random.Random(f"lora-min e2e batches seed={seed} epoch={epoch}")
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = BUCKET_BATCHES * batch_size
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda i: lengths[i])]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    # Drop the short batch only now, so that every world_size shares one batch order.
    return [batch for batch in batches
            if len(batch) == batch_size or (not drop_last and len(batch) >= world_size)]


def num_batches(n_examples: int, batch_size: int, *, drop_last: bool = False, world_size: int = 1) -> int:
    """How many (global) batches batch_plan / iterate_batches give for one epoch."""
    full, rest = divmod(n_examples, batch_size)
    return full + (rest > 0 and not drop_last and rest >= world_size)


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous piece of a global batch; pieces differ in size by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(batch[rank * len(batch) // world_size:(rank + 1) * len(batch) // world_size])


def iterate_batches(examples: Sequence[Example], batch_size: int, *, seed: int = 0, epoch: int = 0,
                    shuffle: bool = True, bucket: bool = True, drop_last: bool = False,
                    start_batch: int = 0, rank: int = 0, world_size: int = 1,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (input_ids, targets, loss_mask) for one epoch, see collate and batch_plan.

    `batch_size` is the global batch size; with data parallelism each of the
    `world_size` processes passes its `rank` and gets a disjoint slice of every
    global batch, so the union over ranks is exactly the single-process batch.
    (Each rank's masked_lm_loss then averages over its own tokens; to match the
    single-process loss exactly, weight it by the rank's share of the batch's tokens.)
    `start_batch` skips that many batches, for resuming mid-epoch.
    """
    plan = batch_plan([len(ex.input_ids) for ex in examples], batch_size, seed=seed, epoch=epoch,
                      shuffle=shuffle, bucket=bucket, drop_last=drop_last, world_size=world_size)
    for batch in plan[start_batch:]:
        yield collate([examples[i] for i in shard(batch, rank, world_size)])


# --------------------------------------------------------------------------- loss

def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the positions where loss_mask is True.

    `logits` is either (B, T, V) for every position, or (N, V) already gathered at
    the N = loss_mask.sum() masked positions (row-major order, i.e. logits_full[loss_mask]),
    which lets a model run its LM head only where the loss needs it.
    Label smoothing (paper Table 11: 0.1 for training, 0 for validation) is
    (1 - eps) * NLL + eps * mean over the vocabulary of -log p, exactly
    microsoft/LoRA's GPT2LMModel.forward and torch's cross_entropy(label_smoothing=eps).
    The average is over all real target tokens of the batch, as in microsoft/LoRA.
    """
    masked_targets = targets[loss_mask]  # (N,)
    if logits.dim() == 3:
        logits = logits[loss_mask]  # (B, T, V) -> (N, V)
    if logits.dim() != 2 or logits.shape[0] != masked_targets.shape[0]:
        raise ValueError(f"logits must be (B, T, V) or (N, V) with N = loss_mask.sum() = "
                         f"{masked_targets.shape[0]}; got {tuple(logits.shape)}")
    return F.cross_entropy(logits.float(), masked_targets, label_smoothing=label_smoothing)


# --------------------------------------------------------------------------- the training stream

@dataclass
class Position:
    """Where the data stream stands: the next global batch is batch `batch` of epoch `epoch`."""
    epoch: int = 0
    batch: int = 0


def global_batches(examples: Sequence[Example], batch_size: int, epochs: int, *, seed: int, start: Position,
                   world_size: int = 1) -> Iterator[tuple[Position, list[int]]]:
    """(position, example indices) of every global batch from `start` to the end of the last epoch.
    The order depends only on (seed, epoch) (see batch_plan), so a resumed run, or a run with
    another number of processes, sees the very same batches."""
    lengths = [len(ex.input_ids) for ex in examples]
    for epoch in range(start.epoch, epochs):
        plan = batch_plan(lengths, batch_size, seed=seed, epoch=epoch, world_size=world_size)
        for index in range(start.batch if epoch == start.epoch else 0, len(plan)):
            yield Position(epoch, index), plan[index]


def micro_batches(examples: Sequence[Example], batch: Sequence[int], rank: int, world_size: int,
                  grad_accum: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Rank `rank`'s part of a global batch, cut into `grad_accum` micro-batches:
    (input_ids, targets, loss_mask, number of loss tokens) each."""
    mine = shard(batch, rank, world_size)
    pieces = [shard(mine, i, grad_accum) for i in range(grad_accum)]
    return [(*tensors, int(tensors[2].sum())) for tensors in (collate([examples[i] for i in p]) for p in pieces if p)]


def loss_tokens(examples: Sequence[Example], batch: Sequence[int]) -> int:
    """Target tokens that carry loss in a batch: each example's reference and final <|endoftext|>."""
    return sum(len(examples[i].input_ids) - examples[i].n_prompt for i in batch)
