"""Tests for lora_min/metrics.py.

Hand-computed tiny cases pin each formula. On the real E2E test set (630 MRs, 4,693 references) and
the outputs of four published systems in ../shared, every metric is compared with a reference
implementation, and all five with the numbers the official scorer's own code gives.
"""
import csv
import functools
import math
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lora_min import metrics
from lora_min.metrics import (
    PAPER_GPT2_M_LORA, closest_ref_length, corpus_bleu, corpus_nist, cider_d, e2e_scores, format_scores,
    lcs_length, meteor, mteval_tokenize, nist_length_penalty, ptb_tokenize, rouge_l,
)

SYSTEMS = ("tgen-std", "tgen-plus", "tgen-minus", "sclstm")

# What the official scorer's own code gives on ../shared/e2e-system-outputs/*.run0.txt, measured once:
# BLEU and NIST from the reading and scoring subs of e2e-metrics' mteval/mteval-v13a-sig.pl (Perl; run
# outside this repository, without its report printing) on the .sgm files measure_scores.py writes,
# references padded to 45 per MR; METEOR, ROUGE_L and CIDEr from pycocoevalcap 1.2 exactly as
# COCOEvalCap.evaluate runs it (the Java Stanford PTBTokenizer, then Meteor, Rouge, Cider).
# No per-file scores were ever published for these outputs (the INLG 2019 paper gives means over five
# runs; the challenge's TGen baseline, 0.6593 / 8.6094 / 0.4483 / 0.6850 / 2.2338, is another output).
OFFICIAL = {
    "tgen-std": {"BLEU": 0.661611571056, "NIST": 8.544574367881, "METEOR": 0.45037719661473585,
                 "ROUGE_L": 0.6914074581493157, "CIDEr": 2.231178075403627},
    "tgen-plus": {"BLEU": 0.667169383142, "NIST": 8.571960966507, "METEOR": 0.4566185850099081,
                  "ROUGE_L": 0.697650647523992, "CIDEr": 2.293902850596846},
    "tgen-minus": {"BLEU": 0.637975017335, "NIST": 8.573700332165, "METEOR": 0.4225774814386599,
                   "ROUGE_L": 0.6892662629243319, "CIDEr": 2.0084282981628543},
    "sclstm": {"BLEU": 0.417488947244, "NIST": 6.171864358673, "METEOR": 0.3505640571140043,
               "ROUGE_L": 0.523989911680006, "CIDEr": 1.0062197844128409},
}
PERL_DIGITS = 1e-11  # absolute: the Perl numbers were printed with 12 decimals
FLOAT_SUM_ORDER = 1e-12  # relative: the same sums added up in another order


# ---------------------------------------------------------------------------- real data
# tgen-std goes through e2e_scores (all five, METEOR included); sclstm, whose outputs differ most,
# through the single metrics. The other two systems' official numbers are listed for reference.

@functools.lru_cache
def load_test_set(e2e_dir: Path) -> list[list[str]]:
    """References of the test set grouped by MR, in the order the MRs first appear."""
    with open(e2e_dir / "testset_w_refs.csv", encoding="utf-8", newline="") as f:
        grouped: dict[str, list[str]] = {}
        for row in csv.DictReader(f):
            grouped.setdefault(row["mr"], []).append(row["ref"])
    return list(grouped.values())


@functools.lru_cache
def system_output(shared_dir: Path, name: str) -> list[str]:
    return (shared_dir / "e2e-system-outputs" / f"{name}.run0.txt").read_text(encoding="utf-8").splitlines()


@functools.lru_cache
def mteval_refs(e2e_dir: Path) -> list[list[list[str]]]:
    return [[mteval_tokenize(r) for r in refs] for refs in load_test_set(e2e_dir)]


@functools.lru_cache
def ptb_refs(e2e_dir: Path) -> list[list[list[str]]]:
    refs = load_test_set(e2e_dir)
    flat = iter(ptb_tokenize([r for group in refs for r in group]))
    return [[next(flat) for _ in group] for group in refs]


def mteval_tokens(e2e_dir: Path, shared_dir: Path, name: str):
    return [mteval_tokenize(h) for h in system_output(shared_dir, name)], mteval_refs(e2e_dir)


def ptb_tokens(e2e_dir: Path, shared_dir: Path, name: str):
    return ptb_tokenize(system_output(shared_dir, name)), ptb_refs(e2e_dir)


@functools.lru_cache
def tgen_scores(e2e_dir: Path, shared_dir: Path) -> dict:
    return e2e_scores(system_output(shared_dir, "tgen-std"), load_test_set(e2e_dir))


@pytest.mark.slow
def test_e2e_scores_equal_the_official_scorer(e2e_dir, shared_dir):
    """All five on TGen's output. OFFICIAL's METEOR is pycocoevalcap's own `Meteor` class on the Java
    tokenizer's output; e2e_scores runs the same jar on the same tokens, so it must be identical.
    (A second, live run of that class would load the paraphrase table again: ~12 s of CPU.)"""
    scores = tgen_scores(e2e_dir, shared_dir)
    official = OFFICIAL["tgen-std"]
    for key in ("BLEU", "NIST"):
        assert scores[key] == pytest.approx(official[key], abs=PERL_DIGITS)
    for key in ("ROUGE_L", "CIDEr"):
        assert scores[key] == pytest.approx(official[key], rel=FLOAT_SUM_ORDER)
    if shutil.which("java") is None or metrics._meteor_jar() is None:  # reported, never invented
        assert scores["METEOR"] is None and scores["METEOR_unavailable"]
    else:
        assert scores["METEOR"] == official["METEOR"]
        assert set(scores) == set(metrics.METRICS)


@pytest.mark.slow
def test_bleu_and_nist_of_sclstm_equal_the_official_mteval(e2e_dir, shared_dir):
    hyps, refs = mteval_tokens(e2e_dir, shared_dir, "sclstm")
    assert len(hyps) == len(refs) == 630
    assert corpus_bleu(hyps, refs) == pytest.approx(OFFICIAL["sclstm"]["BLEU"], abs=PERL_DIGITS)
    assert corpus_nist(hyps, refs) == pytest.approx(OFFICIAL["sclstm"]["NIST"], abs=PERL_DIGITS)


def test_rouge_l_and_cider_of_sclstm_equal_the_official_pipeline(e2e_dir, shared_dir):
    hyps, refs = ptb_tokens(e2e_dir, shared_dir, "sclstm")
    assert rouge_l(hyps, refs) == pytest.approx(OFFICIAL["sclstm"]["ROUGE_L"], rel=FLOAT_SUM_ORDER)
    assert cider_d(hyps, refs) == pytest.approx(OFFICIAL["sclstm"]["CIDEr"], rel=FLOAT_SUM_ORDER)


def test_bleu_equals_sacrebleu(e2e_dir, shared_dir):
    """sacrebleu's 13a tokenizer, closest reference length and "exp" smoothing are mteval-v13a's.

    Settings aligned: lowercase=True (mteval runs without -c), missing references as None (sacrebleu
    then ignores them, as mteval skips the E2E scorer's empty padding). sacrebleu lower-cases all of
    Unicode where mteval only lower-cases ASCII; the E2E text has no upper-case non-ASCII letters.
    """
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = system_output(shared_dir, "tgen-std"), load_test_set(e2e_dir)
    streams = [[group[k] if k < len(group) else None for group in refs] for k in range(max(map(len, refs)))]
    expected = sacrebleu.corpus_bleu(hyps, streams, tokenize="13a", lowercase=True).score / 100
    assert tgen_scores(e2e_dir, shared_dir)["BLEU"] == pytest.approx(expected, rel=FLOAT_SUM_ORDER)


def test_nist_equals_nltk_with_one_reference(e2e_dir, shared_dir):
    """nltk's corpus_nist is mteval's NIST when every segment has one reference.

    (With several, nltk scores each reference separately and keeps the best, while mteval clips
    against all of them at once; that case is pinned by the official numbers above.)
    """
    nist_score = pytest.importorskip("nltk.translate.nist_score")
    hyps, refs = mteval_tokens(e2e_dir, shared_dir, "tgen-std")
    first_refs = [[group[0]] for group in refs]
    expected = nist_score.corpus_nist(first_refs, hyps, n=5)
    assert corpus_nist(hyps, first_refs) == pytest.approx(expected, rel=FLOAT_SUM_ORDER)


def test_rouge_l_and_cider_equal_pycocoevalcap(e2e_dir, shared_dir):
    """pycocoevalcap's Rouge and Cider on the same tokens, live (the first 200 MRs keep it quick; the
    full corpus is pinned by OFFICIAL, which pycocoevalcap computed)."""
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")
    hyps, refs = (part[:200] for part in ptb_tokens(e2e_dir, shared_dir, "sclstm"))
    gts = {i: [" ".join(r) for r in group] for i, group in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    assert rouge_l(hyps, refs) == pytest.approx(rouge.Rouge().compute_score(gts, res)[0], rel=FLOAT_SUM_ORDER)
    assert cider_d(hyps, refs) == pytest.approx(cider.Cider().compute_score(gts, res)[0], rel=FLOAT_SUM_ORDER)


def test_ptb_tokenize_equals_the_stanford_tokenizer(e2e_dir, shared_dir):
    """Token for token what pycocoevalcap's Java PTBTokenizer (CoreNLP 3.4.1) gives, punctuation dropped."""
    if shutil.which("java") is None:
        pytest.skip("java is not installed")
    ptbtokenizer = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    sentences = [r for group in load_test_set(e2e_dir) for r in group]
    for name in SYSTEMS:
        sentences += system_output(shared_dir, name)
    official = ptbtokenizer.PTBTokenizer().tokenize({0: [{"caption": s} for s in sentences]})[0]
    ours = [" ".join(tokens) for tokens in ptb_tokenize(sentences)]
    assert len(ours) == len(official) == 4693 + 4 * 630
    assert [i for i, (a, b) in enumerate(zip(ours, official)) if a != b] == []


# ---------------------------------------------------------------------------- BLEU, by hand

def test_mteval_tokenize_by_hand():
    assert mteval_tokenize("It's £20-25, (cheap)!") == ["it's", "£20", "-", "25", ",", "(", "cheap", ")", "!"]
    assert mteval_tokenize("Rated 3.5 by 1,000 people. Family-friendly.") == \
        ["rated", "3.5", "by", "1,000", "people", ".", "family-friendly", "."]
    assert mteval_tokenize("A &amp; B said &quot;hi&quot;") == ["a", "&", "b", "said", '"', "hi", '"']
    assert mteval_tokenize("CAFÉ Café") == ["cafÉ", "café"]  # tr/[A-Z]/[a-z]/: ASCII letters only


def test_bleu_by_hand():
    hyp = "the cat sat on the mat".split()
    ref = "the cat is on the mat".split()
    # p1 = 5/6, p2 = 3/5 (the cat, on the, the mat), p3 = 1/4 (on the mat), no 4-gram matches:
    # mteval's smoothing gives p4 = 1 / (2 * 3); c = r = 6 so BP = 1.
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1 / (2 * 3)) ** (1 / 4)
    assert corpus_bleu([hyp], [[ref]]) == pytest.approx(expected, rel=1e-15)
    # an order without any hypothesis n-gram counts as precision 1 (mteval's iscore = 0)
    assert corpus_bleu([["a", "b", "c"]], [[["a", "b", "c"]]]) == 1.0
    # clipping by the largest count in any one reference: unigrams a a a b -> a twice (ref 2), b once;
    # bigrams a a, a a, a b -> "a a" once (ref 2), "a b" once (ref 1); no 3- or 4-gram matches:
    # smoothed to 1 / (2 * 2) and 1 / (4 * 1); closest reference length 4 = c, BP = 1.
    hyp, refs = ["a", "a", "a", "b"], [["a", "b", "x", "y"], ["a", "a", "z", "w"]]
    expected = (3 / 4 * 2 / 3 * 1 / (2 * 2) * 1 / (4 * 1)) ** (1 / 4)
    assert corpus_bleu([hyp], [refs]) == pytest.approx(expected, rel=1e-15)
    assert corpus_bleu([[]], [[["a"]]]) == 0.0
    # not one match: mteval still smooths every order (1/2, 1/4, 1/8, 1/16) and gives 0.0799, which
    # the Perl script confirms; sacrebleu returns 0 here (its early stop)
    expected = (1 / (2 * 4) * 1 / (4 * 3) * 1 / (8 * 2) * 1 / (16 * 1)) ** (1 / 4)
    assert corpus_bleu([["the"] * 4], [[["cat"]]]) == pytest.approx(expected, rel=1e-15)


def test_bleu_brevity_penalty_uses_the_closest_reference_length():
    assert closest_ref_length([2, 6], 5) == 6  # mteval-v13a's default (the scorer passes no option)
    assert closest_ref_length([6, 2], 4) == 2  # a tie goes to the shorter
    assert closest_ref_length([7, 0, 0], 1) == 7  # the scorer's empty padding is skipped
    hyp, refs = "a b c d e".split(), [["a", "b"], "a b c d e f".split()]
    # closest is 6 (not the shortest, 2): BP = exp(1 - 6/5); p_n = 5/5, 4/4, 3/3, 2/2
    assert corpus_bleu([hyp], [refs]) == pytest.approx(math.exp(1 - 6 / 5), rel=1e-15)


@given(st.lists(st.tuples(
    st.lists(st.sampled_from(["the", "Cat", "a", "£20-25", "3.5", ".5", "x,y", "1,000", "it's", "(big)", "5-star",
                              "e.g.", "&amp;", "-", "St.", "café", "!", ";", "a/b", "<b>", "@"]), min_size=4, max_size=10),
    st.lists(st.lists(st.sampled_from(["the", "cat", "A", "20-25", "3.5", "5", "1,000", "it's", "big", "star", "."]),
                      min_size=1, max_size=8), min_size=1, max_size=3)), min_size=1, max_size=5))
def test_bleu_equals_sacrebleu_on_random_text(corpus):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = [" ".join(h) for h, _ in corpus]
    refs = [[" ".join(r) for r in group] for _, group in corpus]
    streams = [[group[k] if k < len(group) else None for group in refs] for k in range(max(map(len, refs)))]
    expected = sacrebleu.corpus_bleu(hyps, streams, tokenize="13a", lowercase=True).score / 100
    assume(expected > 0)  # sacrebleu stops at 0 without any match; mteval smooths (test_bleu_by_hand)
    ours = corpus_bleu([mteval_tokenize(h) for h in hyps], [[mteval_tokenize(r) for r in g] for g in refs])
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------------------- NIST, by hand

def test_nist_by_hand():
    # reference "a b a": count(a) = 2, count(b) = 1, count(a b) = 1, 3 words in all, so
    # info(a) = log2(3/2), info(b) = log2(3), info(a b) = log2(count(a) / count(a b)) = 1.
    # hypothesis "a b": (info(a) + info(b)) / 2 unigrams + 1 / 1 bigram; orders 3-5 add 0.
    # length ratio 2/3 -> penalty exactly 0.5 (beta is chosen that way).
    expected = ((math.log2(1.5) + math.log2(3)) / 2 + 1) * 0.5
    assert corpus_nist([["a", "b"]], [[["a", "b", "a"]]]) == pytest.approx(expected, rel=1e-15)
    assert nist_length_penalty(2 / 3) == pytest.approx(0.5, rel=1e-15)
    assert nist_length_penalty(1.2) == 1.0 and nist_length_penalty(0.0) == 0.0


def test_nist_average_reference_length_divides_by_the_largest_reference_set():
    # References "a b c d" | "c", "c": 6 words; info(a) = info(b) = log2 6, info(c) = log2(6/3), info(a b) = 0.
    # Hypotheses "a b" | "c": unigrams (2 log2 6 + 1) / 3, bigram 0 / 1.
    # Average reference length = 6 words / 2 (the most references any MR has) = 3 = hypothesis words:
    # no penalty (the per-MR mean would be 4 + 1 = 5 and give one).
    hyps, refs = [["a", "b"], ["c"]], [[["a", "b", "c", "d"]], [["c"], ["c"]]]
    assert corpus_nist(hyps, refs) == pytest.approx((2 * math.log2(6) + 1) / 3, rel=1e-15)


@given(st.lists(st.tuples(st.lists(st.sampled_from("abcdef"), min_size=5, max_size=12),
                          st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=12)), min_size=1, max_size=6))
def test_nist_equals_nltk_on_random_single_reference_corpora(corpus):
    nist_score = pytest.importorskip("nltk.translate.nist_score")
    hyps, refs = [list(h) for h, _ in corpus], [[list(r)] for _, r in corpus]
    assert corpus_nist(hyps, refs) == pytest.approx(nist_score.corpus_nist(refs, hyps, n=5), rel=1e-12)


# ---------------------------------------------------------------------------- ROUGE-L and CIDEr, by hand

def test_lcs_length_by_hand():
    assert lcs_length("a b c d".split(), "a c d e f".split()) == 3
    assert lcs_length([], ["a"]) == 0 and lcs_length(list("abcbdab"), list("bdcaba")) == 4


def plain_lcs_length(a, b):
    """The textbook dynamic programme: table[i][j] = LCS length of a[:i] and b[:j]."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


@given(st.lists(st.sampled_from("abcd"), max_size=70), st.lists(st.sampled_from("abcde"), max_size=70))
def test_bit_parallel_lcs_length_equals_the_plain_programme(a, b):
    assert lcs_length(a, b) == plain_lcs_length(a, b) == lcs_length(b, a)


def test_rouge_l_by_hand():
    # refs: "a c d e f" (LCS 3: P = 3/4, R = 3/5) and "b d" (LCS 2: P = 2/4, R = 1);
    # P and R are maximised separately: P = 3/4 (ref 1), R = 1 (ref 2).
    p, r, beta2 = 3 / 4, 1.0, 1.2 ** 2
    assert rouge_l([["a", "b", "c", "d"]], [[["a", "c", "d", "e", "f"], ["b", "d"]]]) == \
        pytest.approx((1 + beta2) * p * r / (r + beta2 * p), rel=1e-15)
    assert rouge_l([["x"], ["a"]], [[["a"]], [["a"]]]) == pytest.approx(0.5)  # mean over segments


def test_cider_d_by_hand():
    # Two MRs, one reference each; every n-gram is in one MR's references: weight log 2 - log 1.
    refs = [[["a", "b"]], [["c", "d"]]]
    # identical hypotheses: cosine 1 for unigrams and bigrams, 0 for the empty 3- and 4-gram vectors
    assert cider_d([["a", "b"], ["c", "d"]], refs) == pytest.approx(10 * (1 + 1) / 4, rel=1e-15)
    # "a b x": unigram cosine 2 / (sqrt 3 sqrt 2), bigram 1 / sqrt 2 ("a b" of "a b", "b x"),
    # no trigram in the reference; the lengths differ by one bigram: penalty exp(-1 / (2 * 6^2)).
    first = 10 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
    assert cider_d([["a", "b", "x"], ["c", "d"]], refs) == pytest.approx((first + 5) / 2, rel=1e-15)


corpora = st.integers(2, 5).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.sampled_from("abcde"), max_size=7), min_size=n, max_size=n),
    st.lists(st.lists(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=7), min_size=1, max_size=3),
             min_size=n, max_size=n)))


@given(corpora)
def test_rouge_l_and_cider_equal_pycocoevalcap_on_random_corpora(corpus):
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")
    hyps, refs = corpus
    gts = {i: [" ".join(r) for r in group] for i, group in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    assert rouge_l(hyps, refs) == pytest.approx(rouge.Rouge().compute_score(gts, res)[0], rel=1e-12, abs=1e-15)
    assert cider_d(hyps, refs) == pytest.approx(cider.Cider().compute_score(gts, res)[0], rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------------------- PTB tokenization, by hand

def test_ptb_tokenize_by_hand():
    assert ptb_tokenize(["The Plough, near St. John's, isn't family-friendly (cheap). Prices £20-25."]) == [[
        "the", "plough", "near", "st.", "john", "'s", "is", "n't", "family-friendly",
        "-lrb-", "cheap", "-rrb-", "prices", "#", "20-25"]]  # -LRB- is lower-cased, so not dropped
    assert ptb_tokenize(['A "quoted" name: Café Rouge; 5 out of 5!', "It is 3.5 ... or 3/5 -- fine.Yes"]) == [
        ["a", "quoted", "name", "café", "rouge", "5", "out", "of", "5"], ["it", "is", "3.5", "or", "3/5", "fine.yes"]]
    assert ptb_tokenize(["near the city center., rated 1 -star", "I cannot"]) == [
        ["near", "the", "city", "center.", "rated", "1", "star"], ["i", "can", "not"]]
    # A final initial loses its period only before a sentence starter, even on the next line.
    assert ptb_tokenize(["for 20-25 L.", "The end", "for 20-25 L.", "Near the end"]) == [
        ["for", "20-25", "l"], ["the", "end"], ["for", "20-25", "l."], ["near", "the", "end"]]
    assert ptb_tokenize(["", "  "]) == [[], []]


# ---------------------------------------------------------------------------- METEOR plumbing, inputs, table

def test_meteor_reports_missing_java(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    if metrics._meteor_jar() is None:
        assert meteor([["a"]], [[["a"]]]) == (None, "pycocoevalcap (which ships meteor-1.5.jar) is not installed")
    else:
        assert meteor([["a"]], [[["a"]]]) == (None, "java not found on PATH")
    scores = e2e_scores(["a cat"], [["a cat", "the cat"]])
    assert scores["METEOR"] is None and scores["METEOR_unavailable"]
    assert "n/a" in format_scores(scores)


def test_meteor_reports_a_failing_java(monkeypatch, tmp_path):
    if metrics._meteor_jar() is None:
        pytest.skip("pycocoevalcap is not installed")
    fake_java = tmp_path / "java"
    fake_java.write_text("#!/bin/sh\necho 'Error: could not reserve enough space' >&2\nexit 1\n")
    fake_java.chmod(fake_java.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(metrics.shutil, "which", lambda name: str(fake_java))
    score, reason = meteor([["a"]], [[["a"]]], timeout=30)
    assert score is None and "could not reserve enough space" in reason


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference"):
        e2e_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        e2e_scores(["a"], [[]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        e2e_scores(["a"], ["a"])
    with pytest.raises(ValueError, match="no hypotheses"):
        e2e_scores([], [])


def test_format_scores_shows_the_paper_scale():
    table = format_scores({"BLEU": 0.6616, "NIST": 8.5446, "METEOR": 0.4504, "ROUGE_L": 0.6914, "CIDEr": 2.2312})
    assert table.splitlines()[1].split() == ["BLEU", "66.2", "70.4"]
    assert table.splitlines()[2].split() == ["NIST", "8.54", "8.85"]
    assert table.splitlines()[5].split() == ["CIDEr", "2.23", "2.53"]
    assert PAPER_GPT2_M_LORA == {"BLEU": 0.704, "NIST": 8.85, "METEOR": 0.468, "ROUGE_L": 0.718, "CIDEr": 2.53}
