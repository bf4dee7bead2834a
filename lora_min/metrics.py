"""The five official E2E NLG Challenge metrics: BLEU, NIST, METEOR, ROUGE-L and CIDEr.

E2E is scored with the challenge's official scorer, tuetschek/e2e-metrics (`measure_scores.py`).
That script does not compute anything itself; it runs third-party evaluators, and this module
reproduces them:

* BLEU and NIST come from NIST's `mteval-v13a` Perl script (the `-sig` copy, adapted to a
  variable number of references per segment), run without `-c`, so on lower-cased text with
  mteval's own tokenization, at corpus level, against all references of each MR. With `-p` the
  scorer uses its Python port instead (`metrics/pymteval.py`), which differs in corner cases
  (short outputs, the NIST length penalty). The paper's numbers (Hu et al., 2021, Table 3) come
  from `measure_scores.py ... -p` (microsoft/LoRA, examples/NLG/README.md, step 4), so both are
  here: `mteval="perl"` is the challenge's official scorer, `mteval="python"` the paper's.
* METEOR, ROUGE-L and CIDEr come from the MS-COCO caption evaluation code (`pycocoevalcap`),
  which first tokenizes every sentence with the Stanford PTB tokenizer (`-lowerCase`) and drops
  punctuation tokens. They are the same in both modes.

Everything is plain Python/NumPy except METEOR, which needs the official Java implementation
(`meteor-1.5.jar`, shipped by the optional `pycocoevalcap` package; needs `java`). When either is
missing, METEOR is reported as `None` with the reason; it is never approximated.

    scores = e2e_scores(hypotheses, references)  # one hypothesis and a list of references per MR
    print(format_scores(scores))

tests/test_metrics.py checks both modes against figures printed by the official scorer, run
whole, on the outputs of published E2E systems and on cases where the brevity penalties bite.
"""
from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import itertools
import math
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

# The paper's GPT-2 M (LoRA) row of Table 3, on the official scorer's scale (the paper prints
# BLEU, METEOR and ROUGE-L x100: 70.4 / 8.85 / 46.8 / 71.8 / 2.53).
PAPER_GPT2_M_LORA = {"BLEU": 0.704, "NIST": 8.85, "METEOR": 0.468, "ROUGE_L": 0.718, "CIDEr": 2.53}
METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
MTEVAL = ("perl", "python")  # measure_scores.py's default (the challenge's) and its -p mode (the paper's)

Tokens = list[str]


def ngrams(tokens: Sequence[str], max_n: int) -> Iterator[tuple[str, ...]]:
    """Every n-gram of `tokens` as a tuple: the unigrams left to right, then the bigrams, ... up to max_n."""
    return itertools.chain.from_iterable(zip(*(tokens[i:] for i in range(n))) for n in range(1, max_n + 1))


def ngram_counts(tokens: Sequence[str], max_n: int) -> Counter:
    """How often each n-gram (n = 1..max_n) occurs in `tokens`."""
    return Counter(ngrams(tokens, max_n))


# ----------------------------------------------------------------------------------------------
# BLEU and NIST, as mteval-v13a computes them
# ----------------------------------------------------------------------------------------------

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# mteval's punctuation class: the ASCII ranges {-~, [-`, space-&, (-+, :-@ and "/"
# (so neither the apostrophe nor "-", "." and "," are split here; the last three have rules below).
_MTEVAL_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_MTEVAL_PERIOD_COMMA_AFTER = re.compile(r"([^0-9])([\.,])")
_MTEVAL_PERIOD_COMMA_BEFORE = re.compile(r"([\.,])([^0-9])")
_MTEVAL_DASH = re.compile(r"([0-9])(-)")


def mteval_tokenize(text: str, mteval: str = "perl") -> Tokens:
    """mteval-v13a's default (non-international) normalization, lower-cased as the E2E scorer runs it.

    Step by step as in the Perl `tokenization` sub: join lines, unescape four SGML entities,
    lower-case ASCII letters only (`tr/[A-Z]/[a-z]/`), pad with spaces, split off punctuation,
    split "." and "," unless they sit between digits ("3.5", "1,000" stay whole), split "-"
    after a digit ("20-25" -> "20 - 25"), then split on whitespace.
    mteval="python" is pymteval's copy of these steps, which lower-cases every letter
    (`str.lower`, so "CAFÉ" -> "café", not "cafÉ") and splits an empty text into one empty
    token (`"".split(" ") == [""]`), so an empty output still counts as one word.
    """
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} ".lower() if _check_mteval(mteval) == "python" else f" {text} ".translate(_ASCII_LOWER)
    text = _MTEVAL_PUNCT.sub(r" \1 ", text)
    text = _MTEVAL_PERIOD_COMMA_AFTER.sub(r"\1 \2 ", text)
    text = _MTEVAL_PERIOD_COMMA_BEFORE.sub(r" \1 \2", text)
    text = _MTEVAL_DASH.sub(r"\1 \2 ", text)
    return text.split() or ([""] if mteval == "python" else [])


def _check_mteval(mteval: str) -> str:
    if mteval not in MTEVAL:
        raise ValueError(f"unknown mteval {mteval!r}; expected one of {MTEVAL}")
    return mteval


def closest_ref_length(ref_lengths: Sequence[int], hyp_length: int) -> int:
    """The reference length BLEU's brevity penalty uses for one segment (mteval's default "closest").

    The reference length nearest the hypothesis length; on a tie, the shorter one. Like the E2E
    copy of mteval, empty references after the first are skipped: the scorer pads MRs with fewer
    references than the largest set with empty ones, which must not count.
    """
    best = ref_lengths[0]
    for length in ref_lengths[1:]:
        if length and (abs(hyp_length - length), length) < (abs(hyp_length - best), best):
            best = length
    return best


def _clipped_counts(hyp_counts: Counter, refs_counts: Sequence[Counter]) -> dict[tuple, int]:
    """The hypothesis n-grams found in a reference, each counted at most as often as in any one reference."""
    clipped = {}
    for ngram, count in hyp_counts.items():
        most_in_one_reference = max(ref_counts.get(ngram, 0) for ref_counts in refs_counts)
        if most_in_one_reference:
            clipped[ngram] = min(count, most_in_one_reference)
    return clipped


def corpus_bleu(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], max_n: int = 4,
                mteval: str = "perl") -> float:
    """Corpus BLEU exactly as mteval-v13a (or, with mteval="python", pymteval): BP * exp(sum_n log p_n / N).

    p_n = (clipped n-gram matches) / (hypothesis n-grams), each summed over the whole corpus;
    clipping is by the largest count in any one reference. BP = exp(min(0, 1 - r / c)) with
    c = hypothesis tokens and r = the sum over segments of `closest_ref_length`.
    The two differ only on tiny or very short outputs:
    * mteval smooths: the k-th order with no match gets p_n = 1 / (2^k * hypothesis n-grams), an
      order with no hypothesis n-grams at all gets p_n = 1, and no hypothesis tokens gives 0.
    * pymteval counts len(hyp) - n + 1 n-grams per segment even when that is negative (a
      two-word output *removes* one 4-gram from the corpus total), and floors a zero match
      count at 1e-15 and a non-positive total at 1e-9 instead of smoothing.
    """
    matches, totals = [0] * max_n, [0] * max_n
    hyp_length = ref_length = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        hyp_counts = ngram_counts(hyp, max_n)
        for ngram, count in _clipped_counts(hyp_counts, [ngram_counts(r, max_n) for r in refs]).items():
            matches[len(ngram) - 1] += count
        for n in range(1, max_n + 1):
            totals[n - 1] += len(hyp) - n + 1 if _check_mteval(mteval) == "python" else max(len(hyp) - n + 1, 0)
        hyp_length += len(hyp)
        ref_length += closest_ref_length([len(r) for r in refs], len(hyp))
    if mteval == "python":
        log_precision = sum(math.log(max(match, 1e-15) / max(total, 1e-9)) for match, total in zip(matches, totals))
        brevity_penalty = math.exp(min(0.0, 1 - ref_length / (hyp_length or 1e-5)))
        return math.exp(log_precision / max_n) * brevity_penalty
    if hyp_length == 0:
        return 0.0
    log_precision, smooth = 0.0, 1
    for match, total in zip(matches, totals):
        if total == 0:
            continue  # log 1
        if match == 0:
            smooth *= 2
            log_precision += math.log(1 / (smooth * total))
        else:
            log_precision += math.log(match / total)
    brevity_penalty = math.exp(min(0.0, 1 - ref_length / hyp_length))
    return math.exp(log_precision / max_n) * brevity_penalty


def nist_information_weights(references: Sequence[Sequence[Tokens]], max_n: int = 5) -> dict[tuple, float]:
    """NIST's information weight of every reference n-gram (Doddington, 2002, eq. 2).

    info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)), and info(w) = log2(total words / count(w)),
    counted over every reference of the whole corpus (as mteval's `compute_ngram_info`).
    """
    counts = Counter(itertools.chain.from_iterable(ngrams(ref, max_n) for refs in references for ref in refs))
    total_words = sum(len(ref) for refs in references for ref in refs)
    return {ngram: math.log2((counts[ngram[:-1]] if len(ngram) > 1 else total_words) / count)
            for ngram, count in counts.items()}


def nist_length_penalty(ratio: float) -> float:
    """exp(-beta * log(ratio)^2) for ratio < 1, with beta set so that a ratio of 2/3 scores 0.5."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def corpus_nist(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], max_n: int = 5,
                mteval: str = "perl") -> float:
    """Corpus NIST as the E2E scorer's mteval-v13a-sig.pl (or, with mteval="python", pymteval).

    NIST = sum_n (info of the clipped n-gram matches / hypothesis n-grams) * BP, sums over the
    whole corpus, n = 1..5; `nist_information_weights` gives the information. BP is
    `nist_length_penalty`(hypothesis words / average reference length), and the two scripts
    average the reference length differently:
    * Perl: (all reference words) / (average number of references per segment). The scorer pads
      every MR's reference set with empty references up to the largest set; the E2E copy of the
      script counts only the non-empty ones (`$nrefs++ if ( $ref_seg ne '' )`) and divides by
      `$cum_ref_count / $cum_seg_count`.
    * Python: the sum over segments of that segment's mean reference length.
    They agree when every MR has the same number of references; on E2E (1 to 45 per MR) they
    differ whenever the outputs are shorter than the references. pymteval also counts
    len(hyp) - n + 1 n-grams per segment even when negative (see corpus_bleu) and divides by that
    total without a floor: the official -p scorer stops with ZeroDivisionError when a total is 0,
    and so does this function (with ValueError).
    """
    python = _check_mteval(mteval) == "python"
    info = nist_information_weights(references, max_n)
    refs_counts = [[ngram_counts(r, max_n) for r in refs] for refs in references]
    matched_info, totals = [0.0] * max_n, [0] * max_n
    hyp_words = ref_words = non_empty_refs = 0
    mean_ref_lengths = 0.0
    for hyp, refs, ref_counts in zip(hypotheses, references, refs_counts, strict=True):
        for ngram, count in _clipped_counts(ngram_counts(hyp, max_n), ref_counts).items():
            matched_info[len(ngram) - 1] += info[ngram] * count
        for n in range(1, max_n + 1):
            totals[n - 1] += len(hyp) - n + 1 if python else max(len(hyp) - n + 1, 0)
        hyp_words += len(hyp)
        ref_words += sum(len(r) for r in refs)
        non_empty_refs += sum(1 for r in refs if r)
        mean_ref_lengths += sum(len(r) for r in refs) / len(refs)
    if ref_words == 0:
        raise ValueError("NIST needs at least one non-empty reference")
    if python:
        if 0 in totals:
            raise ValueError(f"the scorer's -p NIST divides by zero: the hypotheses hold 0 {totals.index(0) + 1}-grams "
                             f"in all (pymteval counts len - n + 1 per segment, negative included)")
        score = sum(m / t for m, t in zip(matched_info, totals))
        return score * nist_length_penalty(hyp_words / mean_ref_lengths)
    score = sum(m / max(t, 1) for m, t in zip(matched_info, totals))
    refs_per_segment = non_empty_refs / len(references)
    return score * nist_length_penalty(hyp_words / (ref_words / refs_per_segment))


# ----------------------------------------------------------------------------------------------
# The Stanford PTB tokenizer, as pycocoevalcap runs it
# ----------------------------------------------------------------------------------------------
# pycocoevalcap runs `edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`
# (CoreNLP 3.4.1) over all sentences joined by newlines, then drops the tokens in
# PTB_PUNCTUATION. Below is a re-implementation of the lexer rules that matter for English
# restaurant descriptions: like JFlex, at each position the longest match among the rules wins
# (ties go to the earlier rule). It reproduces the Java tokenizer token for token on all 53,946
# references of the E2E train/dev/test sets and the four system outputs in ../shared (the tests
# check the test set). Not handled, as E2E never needs them: e-mail addresses, URLs and emoticons
# (kept whole by Java), "No." before a number, and rare clitics such as "'90s", "'n'" or "y'all".

PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_ALNUM, _LETTER = r"[^\W_]", r"[^\W\d_]"
# Abbreviations that keep their period (CoreNLP's ABBREV1/ABBREV2 lists; case-sensitive).
_ABBREVIATIONS = (
    "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mon|Tue|Tues|Wed|Thu|Thurs|Fri|"
    "Ala|Ariz|Az|Ark|Calif|Colo|Conn|Ct|Dak|Del|Fla|Ga|Ill|Ind|Kans?|Ky|La|Mass|Md|Mich|Minn|Miss|Mo|"
    "Mont|Neb|Nev|Okla|Ore|Pa|Penn|Tenn|Tex|Va|Vt|Wash|Wisc?|Wyo|"
    "Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Bancorp|Dept|Bhd|Assn|Univ|Intl|Sys|Invt|Elec|Natl|M[ft]g|"
    "tel|est|ext|sq|Jr|Sr|Bros|Ed\\.D|Ph\\.D|Blvd|Rd|Esq|etc|al|seq|"
    "Mr|Mrs|Ms|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Mt|"
    "Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|M|MM|Mme|Mmes|Mlle|Mlles|"
    "vs|Alex|Wm|Jos|Cie|a\\.k\\.a|cf|TREC|[A-Za-z](?:\\.[A-Za-z])*")  # the last: "U.S.", "e.g.", "L."
_PTB_RULES = [  # (pattern, length of the trailing context that counts towards the longest match)
    (re.compile(rf"(?:{_ABBREVIATIONS})\.(?!{_ALNUM})"), 0),
    (re.compile(rf"{_LETTER}{_ALNUM}*(?:[.!?]{_LETTER}{_ALNUM}*)*\.(?=[,;:])"), 1),  # "centre.," keeps "."
    (re.compile(rf"{_ALNUM}(?:{_ALNUM}|[.,])*(?:-{_ALNUM}+)+"), 0),  # hyphenated: "family-friendly", "20-25"
    (re.compile(rf"(?:[dDoOlL]'{_ALNUM})?{_ALNUM}+"), 0),  # plain words and numbers, "d'oeuvres"
    (re.compile(rf"{_LETTER}{_ALNUM}*(?:[.!?]{_LETTER}{_ALNUM}*)+"), 0),  # "fine.Yes" stays one token
    (re.compile(r"[-+]?\d*(?:[.:,]\d+)+|[-+]\d+"), 0),  # "3.5", "1,000", "10:30", ".6", "-25"
    (re.compile(rf"{_ALNUM}+(?:-{_ALNUM}+){{0,2}}(?:/{_ALNUM}+(?:-{_ALNUM}+){{0,2}}){{1,2}}"), 0),  # "3/5"
    (re.compile(r"[A-Z]+(?:&[A-Z]+)+"), 0),  # "AT&T"
    (re.compile(r"(?i:n't|'(?:s|re|ll|ve|m|d))(?![^\W_])"), 0),  # clitics, split off below
    (re.compile(r"\.{3,5}|-{2,}|."), 0),  # ellipsis, dashes, any other single character
]
_CLITIC_START = re.compile(r"(?i)(?<=[^\W_])(?=n't(?![^\W_])|'(?:s|re|ll|ve|m|d)(?![^\W_]))")
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_PTB_ESCAPES = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-",
                '"': "''", "£": "#", "€": "$", "\u2013": "--", "\u2014": "--", "\u2026": "..."}
# A single-letter abbreviation ("L.") before one of these capitalised words is read as the end of
# a sentence and loses its period (CoreNLP's SSTART list; first letter upper case, then any case).
_SENTENCE_STARTS = frozenset(
    "a about according additionally after an as at but earlier he her here however if in it last many more "
    "mr. ms. now once one other our she since so some such that the their then there these they this we "
    "what when while yet you".split())


def _starts_sentence(word: str) -> bool:
    """Whether `word` is on CoreNLP's list of sentence starters (capitalised; "THE" counts too)."""
    return "A" <= word[:1] <= "Z" and word.lower() in _SENTENCE_STARTS


def _ptb_lex(chunk: str) -> list[str]:
    """Raw PTB tokens of one whitespace-free chunk (longest match wins, as in JFlex)."""
    tokens = []
    for part in _CLITIC_START.sub(" ", chunk).split():  # "isn't" -> "is n't", "John's" -> "John 's"
        start = 0
        while start < len(part):
            best, best_length = None, 0
            for pattern, context in _PTB_RULES:
                match = pattern.match(part, start)
                if match and match.end() - start + context > best_length:
                    best, best_length = match, match.end() - start + context
            tokens.extend(_SPLIT_WORDS.get(best.group().lower(), [best.group()]))
            start = best.end()
    return tokens


def _ptb_normalize(token: str) -> str:
    """PTB3 escaping of one raw token, then lower case (-lowerCase)."""
    if re.fullmatch(r"-{2,}", token):
        token = "--"
    elif re.fullmatch(r"\.{3,5}", token):
        token = "..."
    return _PTB_ESCAPES.get(token, token).lower()


@functools.lru_cache(maxsize=1 << 16)  # E2E text repeats the same few thousand words
def _ptb_word(word: str) -> tuple[tuple[str, ...], bool]:
    """The kept tokens of one whitespace-free word, and whether it ends in an initial such as "L."."""
    raw = _ptb_lex(word)
    kept = tuple(t for t in map(_ptb_normalize, raw) if t not in PTB_PUNCTUATION)
    return kept, re.fullmatch(r"[A-Za-z]\.", raw[-1]) is not None


def _next_word(lines: Sequence[str], i: int, j: int) -> str | None:
    """The word after word j of line i (maybe on a later line), if white space follows it."""
    rest = " ".join(lines[i].split()[j + 1:])
    if i + 1 < len(lines):
        rest += "\n" + "\n".join(lines[i + 1:])
    match = re.match(r"\s*(\S+)\s", rest)
    return match.group(1) if match else None


def ptb_tokenize(sentences: Sequence[str]) -> list[Tokens]:
    """Tokenize sentences as pycocoevalcap does: Stanford PTB tokens, lower-cased, punctuation dropped.

    Takes the whole list because the Java tokenizer reads all sentences as one newline-separated
    file: whether a sentence-final "L." keeps its period depends on the next line's first word.
    """
    lines = [sentence.replace("\n", " ") for sentence in sentences]
    tokenized = []
    for i, line in enumerate(lines):
        tokens: Tokens = []
        for j, word in enumerate(line.split()):
            kept, ends_in_initial = _ptb_word(word)
            tokens.extend(kept)
            if ends_in_initial and _starts_sentence(_next_word(lines, i, j) or ""):
                tokens[-1] = tokens[-1][0]  # "L. The" is "L" "." "The": the period ends the sentence
        tokenized.append(tokens)
    return tokenized


# ----------------------------------------------------------------------------------------------
# ROUGE-L and CIDEr-D, as pycocoevalcap computes them (on ptb_tokenize output)
# ----------------------------------------------------------------------------------------------

def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists.

    The textbook dynamic programme over prefixes of `a` and `b`, one row per token of `a`, with
    the row packed into the bits of an integer (Hyyro, 2004): the zero bits of `row` mark where
    the row steps up by one along `b`, so their number is the LCS length. Each token of `a`
    updates the whole row with one addition and a few bit operations instead of a Python loop
    over `b`; tests/test_metrics.py checks it against the plain programme.
    """
    positions: dict[str, int] = {}  # token -> bit mask of where it occurs in b
    for j, token in enumerate(b):
        positions[token] = positions.get(token, 0) | 1 << j
    all_ones = (1 << len(b)) - 1
    row = all_ones
    for token in a:
        matches = row & positions.get(token, 0)
        row = ((row + matches) | (row - matches)) & all_ones
    return len(b) - row.bit_count()


def rouge_l(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], beta: float = 1.2) -> float:
    """Mean over segments of ROUGE-L (Lin, 2004) as pycocoevalcap's `Rouge`.

    Per segment: P = max_r LCS(hyp, r) / |hyp| and R = max_r LCS(hyp, r) / |r|, each maximised
    over the references *separately* (the best P and the best R may come from different
    references), then F = (1 + beta^2) P R / (R + beta^2 P), and F = 0 when P or R is 0.
    An empty sentence counts as one empty token, as pycocoevalcap's `str.split(" ")` sees it.
    """
    scores = []
    for hyp, refs in zip(hypotheses, references, strict=True):
        hyp = hyp or [""]
        lcs = [lcs_length(ref or [""], hyp) for ref in refs]
        precision = max(length / len(hyp) for length in lcs)
        recall = max(length / len(ref or [""]) for length, ref in zip(lcs, refs))
        if precision == 0 or recall == 0:
            scores.append(0.0)
        else:
            scores.append((1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision))
    return float(np.mean(scores))


def _tfidf(counts: Counter, log_doc_freq: dict[tuple, float], log_n_docs: float, max_n: int):
    """CIDEr's tf-idf vector of one sentence, split by n-gram order, with its norms."""
    vectors = [{} for _ in range(max_n)]
    for ngram, term_freq in counts.items():
        vectors[len(ngram) - 1][ngram] = term_freq * (log_n_docs - log_doc_freq.get(ngram, 0.0))
    norms = [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]
    return vectors, norms


def cider_d(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]],
            max_n: int = 4, sigma: float = 6.0) -> float:
    """Mean over segments of CIDEr-D (Vedantam et al., 2015) as pycocoevalcap's `Cider`.

    Each sentence becomes, for every order n = 1..4, a vector g_n of tf-idf weights
    g_n(w) = count(w) * (log N - log max(1, df(w))), where N is the number of segments (MRs) and
    df(w) the number of segments whose references contain the n-gram w. Per segment:

        CIDEr-D = 10 / |refs| * sum_r 1/4 sum_n  e^(-delta^2 / (2 sigma^2))
                                            * sum_w min(g_n,hyp(w), g_n,r(w)) g_n,r(w) / (|g_n,hyp| |g_n,r|)

    with sigma = 6 and delta = the difference in length, measured (as in the reference code) in
    bigrams; an order whose vector is empty contributes 0.
    """
    refs_counts = [[ngram_counts(r, max_n) for r in refs] for refs in references]
    doc_freq = Counter(ngram for segment in refs_counts for ngram in set().union(*segment))
    log_doc_freq = {ngram: math.log(df) for ngram, df in doc_freq.items()}
    log_n_docs = math.log(len(references))
    scores = []
    for hyp, refs, ref_counts in zip(hypotheses, references, refs_counts, strict=True):
        hyp_vectors, hyp_norms = _tfidf(ngram_counts(hyp, max_n), log_doc_freq, log_n_docs, max_n)
        segment_score = 0.0
        for ref, counts in zip(refs, ref_counts):
            ref_vectors, ref_norms = _tfidf(counts, log_doc_freq, log_n_docs, max_n)
            length_penalty = math.exp(-((max(len(hyp) - 1, 0) - max(len(ref) - 1, 0)) ** 2) / (2 * sigma ** 2))
            for n in range(max_n):
                if hyp_norms[n] == 0 or ref_norms[n] == 0:
                    continue
                clipped = sum(min(w, ref_vectors[n].get(ngram, 0.0)) * ref_vectors[n].get(ngram, 0.0)
                              for ngram, w in hyp_vectors[n].items())
                segment_score += length_penalty * clipped / (hyp_norms[n] * ref_norms[n]) / max_n
        scores.append(10.0 * segment_score / len(refs))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# METEOR through the official Java implementation (pycocoevalcap's meteor-1.5.jar)
# ----------------------------------------------------------------------------------------------

def _meteor_jar() -> Path | None:
    """meteor-1.5.jar inside the installed pycocoevalcap package, if there is one."""
    spec = importlib.util.find_spec("pycocoevalcap")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        jar = Path(folder) / "meteor" / "meteor-1.5.jar"
        if jar.is_file():
            return jar
    return None


def meteor(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]],
           timeout: float = 600.0) -> tuple[float | None, str | None]:
    """Corpus METEOR 1.5 (Denkowski & Lavie, 2014) from the official jar: (score, None) or (None, reason).

    Speaks pycocoevalcap's protocol with `java -jar meteor-1.5.jar - - -stdio -l en -norm`: one
    "SCORE ||| ref1 ||| ... ||| hyp" line per segment returns its statistics; one
    "EVAL ||| stats1 ||| ..." line returns every segment's score and then the corpus score, which
    aggregates the statistics (it is not the mean of the segment scores). Unlike pycocoevalcap's
    `Meteor` class, the Java process is always ended here, also on errors and after `timeout` s.
    """
    jar = _meteor_jar()
    if jar is None:
        return None, "pycocoevalcap (which ships meteor-1.5.jar) is not installed"
    java = shutil.which("java")
    if java is None:
        return None, "java not found on PATH"
    command = [java, "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as stderr, subprocess.Popen(
            command, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr) as process:
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        try:
            def ask(line: str) -> str:
                process.stdin.write(line.encode() + b"\n")
                process.stdin.flush()
                return process.stdout.readline().decode().strip()

            stats = []
            for hyp, refs in zip(hypotheses, references, strict=True):
                segment = [" ".join(tokens).replace("|||", "") for tokens in (*refs, hyp)]  # "|||" separates
                stats.append(ask(" ||| ".join(["SCORE", *segment])))
            answers = [ask(" ||| ".join(["EVAL", *stats]))]  # each segment's score, then the corpus's
            answers += [process.stdout.readline().decode().strip() for _ in stats]
            return float(answers[-1]), None
        except (OSError, ValueError) as error:
            stderr.seek(0)
            detail = stderr.read().decode(errors="replace").strip().splitlines()[-1:] or [repr(error)]
            reason = "timed out" if not watchdog.is_alive() else detail[0]
            return None, f"METEOR (java) failed: {reason}"
        finally:
            watchdog.cancel()
            process.kill()  # the jar never exits on its own in -stdio mode
            try:
                process.stdin.close()
            except OSError:  # unflushed input for a process that is gone
                pass


# ----------------------------------------------------------------------------------------------
# All five, as the official scorer reports them
# ----------------------------------------------------------------------------------------------

def _check_inputs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists: need one per MR")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(hyp, str):
            raise ValueError(f"hypothesis {i} is a {type(hyp).__name__}, not a str")
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must be a non-empty list of str, got {refs!r:.80}")


def e2e_scores(hypotheses: list[str], references: list[list[str]], mteval: str = "perl") -> dict:
    """BLEU, NIST, METEOR, ROUGE_L and CIDEr of one hypothesis per MR against that MR's references.

    Same numbers and scale as tuetschek/e2e-metrics' measure_scores.py (BLEU, METEOR and
    ROUGE_L in [0, 1]; NIST around 8 and CIDEr around 2 on E2E): mteval="perl" as
    `measure_scores.py refs.txt outputs.txt`, the challenge's official scorer; mteval="python"
    as `measure_scores.py refs.txt outputs.txt -p`, which the paper used. METEOR is None when Java
    or pycocoevalcap is missing; the key "METEOR_unavailable" then says why (and likewise
    "NIST_unavailable" where the -p scorer itself would fail, see corpus_nist).
    """
    return e2e_scores_both(hypotheses, references, (_check_mteval(mteval),))[mteval]


def e2e_scores_both(hypotheses: list[str], references: list[list[str]],
                    mtevals: Sequence[str] = ("python", "perl")) -> dict[str, dict]:
    """e2e_scores for each mteval in `mtevals`, as {mteval: scores}; METEOR, ROUGE_L and CIDEr
    (the same in both) are computed once."""
    _check_inputs(hypotheses, references)
    # pycocoevalcap tokenizes all references (MR by MR) as one file and the hypotheses as another
    flat_refs = iter(ptb_tokenize([r for refs in references for r in refs]))
    refs_ptb = [[next(flat_refs) for _ in refs] for refs in references]
    hyp_ptb = ptb_tokenize(hypotheses)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        meteor_result = pool.submit(meteor, hyp_ptb, refs_ptb)  # Java loads its paraphrase table meanwhile
        by_mteval = {mteval: _bleu_and_nist(hypotheses, references, mteval) for mteval in mtevals}
        coco = {"ROUGE_L": rouge_l(hyp_ptb, refs_ptb), "CIDEr": cider_d(hyp_ptb, refs_ptb)}
        coco["METEOR"], meteor_problem = meteor_result.result()
    if meteor_problem is not None:
        coco["METEOR_unavailable"] = meteor_problem
    both = {}
    for mteval, bleu_and_nist in by_mteval.items():
        merged = bleu_and_nist | coco
        both[mteval] = {name: merged.pop(name) for name in METRICS} | merged  # the five, then any "..._unavailable"
    return both


def _bleu_and_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], mteval: str) -> dict:
    hyp_tokens = [mteval_tokenize(h, mteval) for h in hypotheses]
    refs_tokens = [[mteval_tokenize(r, mteval) for r in refs] for refs in references]
    scores = {"BLEU": corpus_bleu(hyp_tokens, refs_tokens, mteval=mteval)}
    try:
        scores["NIST"] = corpus_nist(hyp_tokens, refs_tokens, mteval=mteval)
    except ValueError as error:  # -p on outputs so short that the official scorer would crash
        scores["NIST"], scores["NIST_unavailable"] = None, str(error)
    return scores


def format_scores(scores: dict, paper: dict = PAPER_GPT2_M_LORA, official: dict | None = None) -> str:
    """A small table of the scores next to the paper's GPT-2 M LoRA row, on the paper's scale.

    BLEU, METEOR and ROUGE-L are shown x100 as in the paper's Table 3; NIST and CIDEr as they are.
    `scores` should be in the paper's convention (e2e_scores(..., mteval="python")); `official`,
    if given, the challenge's (mteval="perl"), shown in a third column.
    """
    def show(name: str, value: float | None) -> str:
        if value is None:
            return "n/a"
        return f"{100 * value:.1f}" if name in ("BLEU", "METEOR", "ROUGE_L") else f"{value:.2f}"

    rows = [f"{'metric':<8} {'ours':>6} {'paper':>6}" + (f" {'Perl':>6}" if official else "")]
    rows += [f"{name:<8} {show(name, scores.get(name)):>6} {show(name, paper[name]):>6}"
             + (f" {show(name, official.get(name)):>6}" if official else "") for name in METRICS]
    if official:
        rows += ["ours: scored as the paper scored (measure_scores.py -p, its Python mteval); "
                 "paper: Table 3, GPT-2 M + LoRA;",
                 "Perl: the E2E challenge's official scorer (measure_scores.py, Perl mteval); "
                 "only BLEU and NIST can differ."]
    for name in ("METEOR", "NIST"):
        for problem in {scores.get(f"{name}_unavailable"), (official or {}).get(f"{name}_unavailable")} - {None}:
            rows.append(f"({name} n/a: {problem})")
    return "\n".join(rows)
