"""Tests for lora_min/metrics.py.

Hand-computed tiny cases pin each formula. On the real E2E test set (630 MRs, 4,693 references),
the outputs of four published systems in ../shared and variants of them where the brevity
penalties bite, all five metrics are compared, in both conventions, with the figures the official
scorer printed when run whole; single metrics are also compared with reference implementations.
"""
import csv
import functools
import math
import random
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lora_min import metrics
from lora_min.data import EOT, decode_completion, get_tokenizer, group_references, paper_words, read_e2e_csv
from lora_min.data import references_for_scoring
from lora_min.metrics import (
    PAPER_GPT2_M_LORA, closest_ref_length, corpus_bleu, corpus_nist, cider_d, e2e_scores, e2e_scores_both,
    format_scores, lcs_length, meteor, mteval_tokenize, nist_length_penalty, ptb_tokenize, rouge_l,
)

SYSTEMS = ("tgen-std", "tgen-plus", "tgen-minus", "sclstm")

# ---------------------------------------------------------------------------- the official scorer's figures
# Each figure below was printed by the official E2E scorer, run whole as a user runs it:
# tuetschek/e2e-metrics at commit 1b9c4d8 (measure_scores.py, its mteval/mteval-v13a-sig.pl under perl 5.36
# with Debian's libxml-twig-perl, its own pycocoevalcap copy with meteor-1.5.jar, paraphrase-en.gz and
# stanford-corenlp-3.4.1.jar from pip's pycocoevalcap 1.2, which have the same git blob hashes as the files
# its repository lists; pip's future and scikit-image for its imports; Python 3.11, java 17), in both modes:
#
#     python measure_scores.py REFS OUTPUTS       -> "perl"   (the E2E challenge's official scorer)
#     python measure_scores.py REFS OUTPUTS -p    -> "python" (microsoft/LoRA's step 4: the paper's numbers)
#
# It prints four decimals (BLEU, NIST, METEOR, ROUGE_L, CIDEr), hence OFFICIAL_DIGITS. REFS and OUTPUTS per case:
#   tgen-std, tgen-plus, tgen-minus, sclstm: REFS = ../shared/e2e/testset_w_refs.csv,
#       OUTPUTS = ../shared/e2e-system-outputs/<name>.run0.txt
#   every other case: the files `case(...)` below builds, written as the scorer reads them (OUTPUTS one
#       line per MR; REFS one reference per line, a blank line between MRs)
#   paper-*: microsoft/LoRA's own step 3, `python src/gpt2_decode.py --vocab ./vocab --sample_file S.jsonl
#       --input_file test_formatted.jsonl --output_ref_file e2e_ref.txt --output_pred_file e2e_pred.txt`
#       (test_formatted.jsonl from `python src/format_converting_e2e.py ../shared/e2e-paper/test.txt ...`,
#       S.jsonl holding the token ids `paper_case` decodes), then REFS = e2e_ref.txt, OUTPUTS = e2e_pred.txt.
OFFICIAL = {  # (case, mteval): (BLEU, NIST, METEOR, ROUGE_L, CIDEr)
    ("tgen-std", "perl"): (0.6616, 8.5446, 0.4504, 0.6914, 2.2312),
    ("tgen-std", "python"): (0.6616, 8.5446, 0.4504, 0.6914, 2.2312),
    ("tgen-plus", "perl"): (0.6672, 8.5720, 0.4566, 0.6977, 2.2939),
    ("tgen-plus", "python"): (0.6672, 8.5720, 0.4566, 0.6977, 2.2939),
    ("tgen-minus", "perl"): (0.6380, 7.9623, 0.4226, 0.6893, 2.0084),  # outputs shorter than the references:
    ("tgen-minus", "python"): (0.6380, 7.7740, 0.4226, 0.6893, 2.0084),  # NIST's length penalties differ
    ("sclstm", "perl"): (0.4175, 6.1719, 0.3506, 0.5240, 1.0062),
    ("sclstm", "python"): (0.4175, 6.1719, 0.3506, 0.5240, 1.0062),
    ("paper-tgen-std-full", "perl"): (0.6724, 8.6107, 0.4504, 0.6938, 2.2810),
    ("paper-tgen-std-full", "python"): (0.6724, 8.6106, 0.4504, 0.6938, 2.2810),
    ("paper-sclstm-truncated", "perl"): (0.2180, 0.8133, 0.1901, 0.3548, 0.5536),  # half of each output,
    ("paper-sclstm-truncated", "python"): (0.2234, 0.7609, 0.1901, 0.3548, 0.5536),  # every 7th empty
    # the first three words of each output: NIST's penalty leaves nothing; with -p the scorer itself stops with
    # ZeroDivisionError (no output has a 4-gram), where e2e_scores reports NIST None and says why
    ("first-3-words", "perl"): (0.0024, 0.0000, 0.0654, 0.2408, 0.1148),
    ("every-5th-empty", "perl"): (0.5481, 7.2398, 0.3693, 0.5507, 1.7648),
    ("every-5th-empty", "python"): (0.5571, 7.0905, 0.3693, 0.5507, 1.7648),
    ("single-ref", "perl"): (0.3233, 5.1255, 0.3675, 0.4923, 1.9291),  # one reference per MR
    ("single-ref", "python"): (0.3233, 5.1255, 0.3675, 0.4923, 1.9291),
    ("sclstm-20-short", "perl"): (0.3600, 4.0328, 0.3229, 0.5055, 1.2979),
    ("sclstm-20-short", "python"): (0.3600, 4.8675, 0.3229, 0.5055, 1.2979),
    ("varied-refs-50", "perl"): (0.2221, 0.5697, 0.2839, 0.4797, 1.4412),  # 1 to 4 references per MR
    ("varied-refs-50", "python"): (0.2221, 0.8449, 0.2839, 0.4797, 1.4412),
    ("random-0", "perl"): (0.3983, 4.7736, 0.3059, 0.4553, 1.2350),
    ("random-0", "python"): (0.4116, 4.5349, 0.3059, 0.4553, 1.2350),
    ("random-1", "perl"): (0.0453, 0.2329, 0.1479, 0.2660, 0.2402),  # 3 MRs, one output empty
    ("random-1", "python"): (0.0000, 0.2351, 0.1479, 0.2660, 0.2402),  # pymteval does not smooth BLEU
    ("random-3", "perl"): (0.1748, 0.7564, 0.1924, 0.2741, 1.0762),  # 5 MRs, short and empty outputs
    ("random-3", "python"): (0.1866, 1.2828, 0.1924, 0.2741, 1.0762),
    ("random-4", "perl"): (0.4242, 1.9453, 0.3084, 0.4365, 1.4514),
    ("random-4", "python"): (0.4367, 2.2625, 0.3084, 0.4365, 1.4514),
    ("random-6", "perl"): (0.1184, 0.1960, 0.1579, 0.2625, 0.9369),
    ("random-6", "python"): (0.1312, 0.4035, 0.1579, 0.2625, 0.9369),
    ("random-5", "perl"): (0.1883, 0.1464, 0.1960, 0.3263, 0.8033),
    ("random-5", "python"): (0.2087, 0.2144, 0.1960, 0.3263, 0.8033),
    ("random-7", "perl"): (0.4122, 5.8167, 0.3170, 0.4543, 1.1573),
    ("random-7", "python"): (0.4185, 5.7005, 0.3170, 0.4543, 1.1573),
    ("random-8", "perl"): (0.3433, 4.1213, 0.2919, 0.3432, 0.7221),
    ("random-8", "python"): (0.3462, 4.1070, 0.2919, 0.3432, 0.7221),
    ("random-9", "perl"): (0.2903, 4.8599, 0.2414, 0.3499, 0.5320),  # all 630 MRs, every kind of change
    ("random-9", "python"): (0.2960, 4.8082, 0.2414, 0.3499, 0.5320),
    ("truncated-half", "perl"): (0.3331, 0.8513, 0.2609, 0.5259, 0.5661),  # the first half of each output
    ("truncated-half", "python"): (0.3331, 0.7495, 0.2609, 0.5259, 0.5661),
    ("doubled", "perl"): (0.3385, 4.6019, 0.3983, 0.5671, 0.1135),  # each output twice: too long
    ("doubled", "python"): (0.3385, 4.6019, 0.3983, 0.5671, 0.1135),
    ("random-11", "perl"): (0.2938, 4.8797, 0.2441, 0.3528, 0.4923),
    ("random-11", "python"): (0.2993, 4.8621, 0.2441, 0.3528, 0.4923),
}
OFFICIAL_DIGITS = 5e-5 + 1e-9  # the scorer rounds to four decimals
FLOAT_SUM_ORDER = 1e-12  # relative: the same sums added up in another order
FAST_CASES = ("tgen-minus", "sclstm-20-short", "varied-refs-50", "random-1", "random-3", "random-4", "random-5",
              "random-6", "random-7", "random-8")  # BLEU and NIST of these run in the default suite


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


def first_words(text: str, fraction: float) -> str:
    words = text.split()
    return " ".join(words[:int(len(words) * fraction)])


@functools.lru_cache
def case(e2e_dir: Path, shared_dir: Path, name: str) -> tuple[list[str], list[list[str]]]:
    """(hypotheses, references) of one OFFICIAL case."""
    refs, std = load_test_set(e2e_dir), system_output(shared_dir, "tgen-std")
    if name in SYSTEMS:
        return system_output(shared_dir, name), refs
    if name.startswith("paper-"):
        return paper_case(e2e_dir, shared_dir, name)
    if name.startswith("random-"):
        return random_case(e2e_dir, shared_dir, int(name.removeprefix("random-")))
    return {
        "truncated-half": lambda: ([first_words(h, 0.5) for h in std], refs),
        "first-3-words": lambda: ([" ".join(h.split()[:3]) for h in std], refs),
        "every-5th-empty": lambda: (["" if i % 5 == 0 else h for i, h in enumerate(std)], refs),
        "single-ref": lambda: (std, [group[:1] for group in refs]),
        "doubled": lambda: ([f"{h} {h}" for h in std], refs),
        "sclstm-20-short": lambda: ([first_words(h, 0.6) for h in system_output(shared_dir, "sclstm")[:20]], refs[:20]),
        "varied-refs-50": lambda: ([first_words(h, 0.7) for h in system_output(shared_dir, "tgen-minus")[:50]],
                                   [group[:1 + i % 4] for i, group in enumerate(refs[:50])]),
    }[name]()


def random_case(e2e_dir: Path, shared_dir: Path, seed: int) -> tuple[list[str], list[list[str]]]:
    """A few to all MRs, a random system's outputs, each kept or emptied, cut short, doubled, upper-cased,
    stripped of punctuation or given extra symbols; half of the MRs keep only their first few references."""
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3, 5, 10, 40, 150, 630])
    mrs = sorted(rng.sample(range(630), n))
    outputs = system_output(shared_dir, rng.choice(SYSTEMS))

    def mutate(text: str) -> str:
        words, k = text.split(), rng.random()
        if k < 0.15:
            return ""
        if k < 0.35:
            return " ".join(words[:rng.randint(1, max(1, len(words)))])
        if k < 0.45:
            return " ".join(words[:rng.randint(1, 3)])
        if k < 0.55:
            return f"{text} {text}"
        if k < 0.65:
            return text.upper()
        if k < 0.72:
            return text.replace(".", "").replace(",", "")
        if k < 0.80:
            return f"CAFÉ {text} 3.5 £20-25 (cheap)!"
        return text

    hypotheses = [mutate(outputs[i]) for i in mrs]
    references = [group[:rng.randint(1, len(group))] if rng.random() < 0.5 else group
                  for group in (load_test_set(e2e_dir)[i] for i in mrs)]
    return hypotheses, references


def paper_case(e2e_dir: Path, shared_dir: Path, name: str) -> tuple[list[str], list[list[str]]]:
    """The paper's pipeline on a system's output: model output as token ids, in the paper's text (some
    with text after <|endoftext|> or after a blank line, which gpt2_decode.py cuts off), decoded as
    microsoft/LoRA's gpt2_decode.py does; the references from test.txt, grouped by MR."""
    system, variant = name.removeprefix("paper-").rsplit("-", 1)
    enc = get_tokenizer()
    hypotheses = []
    for i, output in enumerate(system_output(shared_dir, system)):
        words = paper_words(output, "test")
        if variant == "truncated":
            words = [] if i % 7 == 0 else words[:len(words) // 2]
        tokens = enc.encode_ordinary(" " + " ".join(words) + " ")
        if i % 3 == 0:
            tokens += [EOT] + enc.encode_ordinary(" name : junk after the end")
        elif i % 5 == 0:
            tokens += enc.encode_ordinary("\n\nname : junk after a blank line")
        hypotheses.append(decode_completion(tokens))
    groups = group_references(read_e2e_csv(e2e_dir / "testset_w_refs.csv"))
    return hypotheses, [references_for_scoring(refs, "paper", "test") for _, refs in groups]


def assert_official(scores: dict, name: str, mteval: str, metric_names=metrics.METRICS) -> None:
    official = dict(zip(metrics.METRICS, OFFICIAL[name, mteval]))
    for metric in metric_names:
        assert scores[metric] == pytest.approx(official[metric], abs=OFFICIAL_DIGITS), (name, mteval, metric)


def official_cases(fast: bool) -> list:
    return [pytest.param(name, mteval, id=f"{name}-{mteval}") for name, mteval in OFFICIAL
            if (name in FAST_CASES) == fast]


@pytest.mark.parametrize("name, mteval", official_cases(fast=True))
def test_bleu_and_nist_equal_the_official_scorer(e2e_dir, shared_dir, name, mteval):
    hyps, refs = case(e2e_dir, shared_dir, name)
    tokens = [mteval_tokenize(h, mteval) for h in hyps], [[mteval_tokenize(r, mteval) for r in g] for g in refs]
    assert_official({"BLEU": corpus_bleu(*tokens, mteval=mteval), "NIST": corpus_nist(*tokens, mteval=mteval)},
                    name, mteval, ("BLEU", "NIST"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted({name for name, _ in OFFICIAL}))
def test_all_five_equal_the_official_scorer_in_both_modes(e2e_dir, shared_dir, name):
    scores = e2e_scores_both(*case(e2e_dir, shared_dir, name))
    if scores["perl"]["METEOR"] is None:
        pytest.skip(f"METEOR: {scores['perl']['METEOR_unavailable']}")
    for mteval in metrics.MTEVAL:
        if (name, mteval) in OFFICIAL:
            assert_official(scores[mteval], name, mteval)
    if name == "first-3-words":
        assert scores["python"]["NIST"] is None and "divides by zero" in scores["python"]["NIST_unavailable"]


@functools.lru_cache
def tgen_scores(e2e_dir: Path, shared_dir: Path) -> dict:
    return e2e_scores_both(system_output(shared_dir, "tgen-std"), load_test_set(e2e_dir))


@pytest.mark.slow
def test_e2e_scores_equal_the_official_scorer(e2e_dir, shared_dir):
    """All five on TGen's output, both modes (METEOR starts Java once: ~15 s of CPU)."""
    scores = tgen_scores(e2e_dir, shared_dir)
    for mteval in metrics.MTEVAL:
        if shutil.which("java") is None or metrics._meteor_jar() is None:  # reported, never invented
            assert scores[mteval]["METEOR"] is None and scores[mteval]["METEOR_unavailable"]
            assert_official(scores[mteval], "tgen-std", mteval, ("BLEU", "NIST", "ROUGE_L", "CIDEr"))
        else:
            assert_official(scores[mteval], "tgen-std", mteval)
            assert set(scores[mteval]) == set(metrics.METRICS)


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
    tokens = [mteval_tokenize(h, "perl") for h in hyps], [[mteval_tokenize(r, "perl") for r in g] for g in refs]
    assert corpus_bleu(*tokens, mteval="perl") == pytest.approx(expected, rel=FLOAT_SUM_ORDER)  # e2e_scores' BLEU


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


def test_nist_average_reference_length_in_both_conventions():
    # References "a b c d" | "c", "c": 6 words; info(a) = info(b) = log2 6, info(c) = log2(6/3), info(a b) = 0.
    # Hypotheses "a b" | "c": 3 words; unigrams (2 log2 6 + 1) / 3, bigram 0 / 1.
    hyps, refs = [["a", "b"], ["c"]], [[["a", "b", "c", "d"]], [["c"], ["c"]]]
    unigrams = (2 * math.log2(6) + 1) / 3
    # Perl: 3 references over 2 segments, 1.5 per segment: average length 6 / 1.5 = 4 words
    assert corpus_nist(hyps, refs) == pytest.approx(unigrams * nist_length_penalty(3 / 4), rel=1e-15)
    # Python: the per-segment means summed, 4 + 1 = 5 words; and it counts len - n + 1 n-grams even
    # when negative: 3-grams 0 + (-1), so the (empty) 3- to 5-gram sums are divided by -1, -3 and -5
    assert corpus_nist(hyps, refs, mteval="python") == pytest.approx(unigrams * nist_length_penalty(3 / 5), rel=1e-15)
    # The old bug divided by the largest reference count (6 / 2 = 3 words: no penalty at all)
    assert corpus_nist(hyps, refs) < unigrams * 0.99
    # -p divides the n-gram sums by their totals without a floor, as the official scorer does
    with pytest.raises(ValueError, match="divides by zero: the hypotheses hold 0 3-grams"):
        corpus_nist([["a", "b"]], [[["a", "b", "a"]]], mteval="python")


def test_python_mteval_differs_from_perl_only_where_it_should():
    # an empty output is one empty token for pymteval, none for mteval
    assert mteval_tokenize("", "python") == [""] and mteval_tokenize("") == []
    assert mteval_tokenize("CAFÉ", "python") == ["café"] and mteval_tokenize("CAFÉ") == ["cafÉ"]
    # BLEU: no 2^k smoothing (a floor of 1e-15 matches instead), negative n-gram totals count
    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    floor = (5 / 6 * 3 / 5 * 1 / 4 * 1e-15 / 3) ** (1 / 4)
    assert corpus_bleu([hyp], [[ref]], mteval="python") == pytest.approx(floor, rel=1e-12)
    # "a b c" + "a": unigrams 4/4, bigrams 2/(2 + 0), trigrams 1/(1 - 1) with the total floored at 1e-9,
    # 4-grams 0/(0 - 2): both floored, 1e-15/1e-9
    bleu = corpus_bleu([["a", "b", "c"], ["a"]], [[["a", "b", "c"]], [["a"]]], mteval="python")
    assert bleu == pytest.approx((1 * 1 * (1 / 1e-9) * (1e-15 / 1e-9)) ** (1 / 4), rel=1e-12)
    with pytest.raises(ValueError, match="unknown mteval"):
        corpus_bleu([hyp], [[ref]], mteval="perl ")


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
    # with the challenge's (Perl) figures beside, and a legend saying which column is which
    table = format_scores({"BLEU": 0.638, "NIST": 7.774, "METEOR": None, "ROUGE_L": 0.6893, "CIDEr": 2.0084,
                           "METEOR_unavailable": "java not found on PATH"},
                          official={"BLEU": 0.638, "NIST": 7.9623, "METEOR": None, "ROUGE_L": 0.6893, "CIDEr": 2.0084})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "ours", "paper", "Perl"] and lines[2].split() == ["NIST", "7.77", "8.85", "7.96"]
    assert "measure_scores.py -p" in lines[6] and "Perl mteval" in lines[7]
    assert lines[8] == "(METEOR n/a: java not found on PATH)"
