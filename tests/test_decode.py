"""Greedy decoding and beam search (lora_min/decode.py) against plain, cache-free references:
an exhaustive search, a literal transcription of microsoft/LoRA's gpt2_beam.py, an argmax loop,
and transformers' generate()."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_min.decode import _ban_repeated_ngrams, beam_search, greedy
from lora_min.model import GPT, GPTConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine their many small ops wait
    for the second one: 10x slower. Restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(vocab_size: int = 11, seed: int = 0, block_size: int = 24) -> GPT:
    """A small random GPT in float64, its weights spread widely so its distributions are peaked
    and no two candidates tie (ties would make "the best" ambiguous)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=vocab_size, block_size=block_size))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.7)
    return model.double().eval()


def random_prompts(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab_size, (n,), generator=g).tolist() for n in lengths]


# --- plain references: one sequence at a time, the full forward pass at every step --------------


def next_log_probs(model: GPT, tokens: list[int], generated: list[int], n: int) -> torch.Tensor:
    """log p(next | tokens) after banning, as gpt2_beam.py does, every token that would repeat an
    n-gram of the generated tokens (fairseq's _get_ngrams written out with a dict)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0, -1].clone()
    for w in banned_tokens(generated, n):
        logits[w] = -math.inf
    return torch.log_softmax(logits, dim=-1)


def banned_tokens(generated: list[int], n: int) -> list[int]:
    if n == 0 or len(generated) < n:
        return []
    followers: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(generated) - n + 1):
        followers.setdefault(tuple(generated[i : i + n - 1]), []).append(generated[i + n - 1])
    return followers.get(tuple(generated[len(generated) - n + 1 :]), [])


def exhaustive_best(model, prompt, max_new_tokens, length_penalty, n, eos_ids):
    """Score every sequence beam search could output; return the best one (EOS stripped)."""
    best_score, best = -math.inf, None

    def visit(generated: list[int], log_prob: float) -> None:
        nonlocal best_score, best
        if generated and (generated[-1] in eos_ids or len(generated) == max_new_tokens):
            score = log_prob / len(generated) ** length_penalty
            if score > best_score:
                best_score, best = score, generated
            return
        log_probs = next_log_probs(model, prompt + generated, generated, n)
        for w in range(model.config.vocab_size):
            if math.isfinite(log_probs[w]):
                visit(generated + [w], log_prob + log_probs[w].item())

    visit([], 0.0)
    if best is None:  # n-gram bans leave no way to finish; beam search then returns nothing
        return []
    return best[:-1] if best[-1] in eos_ids else best


def gpt2_beam_reference(model, prompt, beam_size, max_new_tokens, length_penalty, n, eos_ids):
    """gpt2_beam.py for one prompt, written as plainly as possible: no cache, no batching, all
    max_new_tokens steps. A finished beam keeps its slot with score -inf for one step, as there."""
    vocab_size = model.config.vocab_size
    beams = [([], 0.0)]  # (generated tokens, sum of log-probs); step one expands beam 0 only
    best_score, best = -math.inf, None

    def offer(generated: list[int], log_prob: float) -> None:  # gpt2_beam.py's _add_beam_candidate
        nonlocal best_score, best
        score = log_prob / len(generated) ** length_penalty
        if score > best_score:
            best_score, best = score, generated

    for _ in range(max_new_tokens):
        candidates = []
        for b, (generated, log_prob) in enumerate(beams):
            if log_prob > -math.inf:
                log_probs = next_log_probs(model, prompt + generated, generated, n)
                candidates += [(log_prob + log_probs[w].item(), b, w) for w in range(vocab_size)]
        candidates.sort(key=lambda c: -c[0])
        new_beams = []
        for log_prob, b, w in candidates[:beam_size]:
            generated = beams[b][0] + [w]
            if w in eos_ids and log_prob > -math.inf:
                offer(generated, log_prob)
                log_prob = -math.inf
            new_beams.append((generated, log_prob))
        beams = new_beams
    for generated, log_prob in beams:
        if log_prob > -math.inf:
            offer(generated, log_prob)
    return best[:-1] if best[-1] in eos_ids else best


def greedy_reference(model: GPT, prompt: list[int], max_new_tokens: int, eos_ids) -> list[int]:
    """argmax, appended, full forward again: the definition of greedy decoding."""
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = model(torch.tensor([tokens]))[0, -1].argmax().item()
        if token in eos_ids:
            break
        tokens.append(token)
    return tokens[len(prompt) :]


# --- beam search ----------------------------------------------------------------------------------

penalties = st.sampled_from([0.0, 0.8, 0.9, 1.0, 2.0, -0.5])


@given(st.integers(2, 4), st.integers(1, 4), penalties, st.integers(0, 3), st.integers(1, 4), st.integers(0, 2**16),
       st.data())
def test_beam_search_with_every_hypothesis_in_the_beam_finds_the_best_sequence(
        vocab_size, max_new_tokens, length_penalty, n, prompt_len, seed, data):
    if vocab_size**max_new_tokens > 81:
        max_new_tokens = int(math.log(81, vocab_size))
    eos_ids = tuple(data.draw(st.sets(st.integers(0, vocab_size - 1), max_size=2)))
    model = tiny_model(vocab_size, seed)
    [prompt] = random_prompts(vocab_size, [prompt_len], seed)
    # With vocab ** L beams nothing is ever pushed out, so beam search is exhaustive search.
    [found] = beam_search(model, [prompt], beam_size=vocab_size**max_new_tokens, max_new_tokens=max_new_tokens,
                          length_penalty=length_penalty, no_repeat_ngram_size=n, eos_ids=eos_ids)
    assert found == exhaustive_best(model, prompt, max_new_tokens, length_penalty, n, eos_ids)


@given(st.integers(1, 5), st.integers(1, 7), penalties, st.integers(0, 3), st.integers(0, 2**16), st.data())
def test_beam_search_matches_a_literal_cache_free_gpt2_beam(beam_size, max_new_tokens, length_penalty, n, seed, data):
    vocab_size = 7
    eos_ids = tuple(data.draw(st.sets(st.integers(0, vocab_size - 1), max_size=2)))
    model = tiny_model(vocab_size, seed)
    prompts = random_prompts(vocab_size, data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)), seed)
    found = beam_search(model, prompts, beam_size=beam_size, max_new_tokens=max_new_tokens,
                        length_penalty=length_penalty, no_repeat_ngram_size=n, eos_ids=eos_ids)
    assert found == [gpt2_beam_reference(model, p, beam_size, max_new_tokens, length_penalty, n, eos_ids)
                     for p in prompts]


@given(st.integers(1, 4), st.sampled_from([1, 2, 5]), st.integers(0, 2**16))
def test_batch_composition_does_not_change_results(beam_size, batch_size, seed):
    model = tiny_model(seed=seed)
    prompts = random_prompts(11, [3, 1, 6, 2, 4], seed)  # different lengths: different left padding
    kwargs = dict(beam_size=beam_size, max_new_tokens=6, no_repeat_ngram_size=2, eos_ids=(0, 1))
    alone = [beam_search(model, [p], **kwargs)[0] for p in prompts]
    assert beam_search(model, prompts, batch_size=batch_size, **kwargs) == alone
    alone = [greedy(model, [p], 6, eos_ids=(0, 1))[0] for p in prompts]
    assert greedy(model, prompts, 6, eos_ids=(0, 1), batch_size=batch_size) == alone


@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**16))
def test_beam_search_never_repeats_an_ngram(n, beam_size, seed):
    model = tiny_model(vocab_size=4, seed=seed)  # four tokens: repeats are tempting
    for tokens in beam_search(model, random_prompts(4, [2, 5], seed), beam_size=beam_size, max_new_tokens=10,
                              no_repeat_ngram_size=n, eos_ids=()):
        ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        assert len(ngrams) == len(set(ngrams)), tokens


@given(st.lists(st.integers(0, 3), max_size=12), st.integers(1, 4))
def test_ban_repeated_ngrams_is_fairseqs_rule(generated, n):
    logits = torch.zeros(1, 4)
    _ban_repeated_ngrams(logits, torch.tensor([generated], dtype=torch.long).view(1, -1), n)
    banned = {w for w in range(4) if logits[0, w] == -math.inf}
    assert banned == set(banned_tokens(generated, n))


def test_eos_free_decoding_always_gives_max_new_tokens():
    model = tiny_model(vocab_size=5)
    prompts = random_prompts(5, [1, 4, 2], seed=3)
    assert [len(t) for t in greedy(model, prompts, 9, eos_ids=())] == [9, 9, 9]
    assert [len(t) for t in beam_search(model, prompts, beam_size=3, max_new_tokens=9, eos_ids=())] == [9, 9, 9]


def count_forward_calls(model: GPT) -> list[int]:
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def rows_per_step(model: GPT) -> list[int]:
    """Rows the model sees at each decoding step (the prompt pass, the one with a mask, not counted)."""
    rows = []
    model.register_forward_pre_hook(lambda _, args, kwargs: None if "attention_mask" in kwargs
                                    else rows.append(args[0].size(0)), with_kwargs=True)
    return rows


@pytest.mark.parametrize("beam_size", [1, 3])  # 1: greedy
def test_finished_prompts_leave_the_batch(beam_size):
    """A batch costs what its live rows cost: at each step the model sees, for every prompt, the rows
    that prompt's own one-prompt decoding has at that step (none once it is done), and the outputs
    are the one-prompt ones."""
    model = tiny_model(vocab_size=11, seed=3, block_size=32)
    prompts = random_prompts(11, [3, 1, 6, 2, 4, 5], seed=2)
    settings = dict(max_new_tokens=12, eos_ids=(0, 1))
    def decode(batch):
        if beam_size == 1:
            return greedy(model, batch, **settings)
        return beam_search(model, batch, beam_size, no_repeat_ngram_size=2, **settings)

    rows = rows_per_step(model)
    alone, rows_alone = [], []
    for p in prompts:
        alone += decode([p])
        rows_alone.append(rows.copy())
        rows.clear()
    steps = max(len(r) for r in rows_alone)
    assert len({len(r) for r in rows_alone}) >= 3, rows_alone  # prompts finish at different steps
    assert decode(prompts) == alone
    assert rows == [sum(r[s] for r in rows_alone if s < len(r)) for s in range(steps)]


def test_decoding_stops_as_soon_as_every_prompt_is_finished():
    model = tiny_model(vocab_size=5)
    calls = count_forward_calls(model)
    everything_ends = tuple(range(5))
    assert beam_search(model, [[1, 2], [3]], beam_size=3, max_new_tokens=20, eos_ids=everything_ends) == [[], []]
    assert greedy(model, [[1, 2], [3]], 20, eos_ids=everything_ends) == [[], []]
    assert len(calls) == 2  # the prompts, once per call; no decoding step


def test_prompts_are_cut_from_the_left_to_fit_the_block():
    model = tiny_model(block_size=12)
    long_prompt = random_prompts(11, [20], seed=1)[0]
    for decode in (lambda p: greedy(model, p, 5, eos_ids=()), lambda p: beam_search(model, p, 3, 5, eos_ids=())):
        assert decode([long_prompt]) == decode([long_prompt[-7:]])  # 12 - 5 new tokens = 7


def test_decoding_leaves_the_train_eval_state_as_found():
    model = tiny_model().train()
    model.h[0].eval()  # a mixed state, restored module by module
    greedy(model, [[1, 2]], 3)
    beam_search(model, [[1, 2]], beam_size=2, max_new_tokens=3)
    assert model.training and not model.h[0].training and model.h[1].training


def test_bad_arguments_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        greedy(model, [[1], []], 3)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, [[1]], beam_size=0)
    with pytest.raises(ValueError, match="no room for a prompt"):
        greedy(model, [[1]], max_new_tokens=24)
    assert greedy(model, [], 3) == [] and beam_search(model, [], 2, 3) == []


# --- greedy --------------------------------------------------------------------------------------


@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(1, 8), st.integers(0, 2**16))
def test_greedy_is_the_argmax_loop_without_cache(lengths, max_new_tokens, seed):
    model = tiny_model(seed=seed)
    prompts = random_prompts(11, lengths, seed)
    expected = [greedy_reference(model, p, max_new_tokens, (0,)) for p in prompts]
    assert greedy(model, prompts, max_new_tokens, eos_ids=(0,)) == expected


# --- against transformers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_and_ours():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=37, n_positions=40, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.5)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).double().eval()
    ours = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=37, block_size=40))
    ours.load_base_weights(hf.transformer.state_dict())
    return hf, ours.double().eval()


def hf_generate(hf, prompt: list[int], **kwargs) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_transformers_generate(hf_and_ours):
    hf, ours = hf_and_ours
    prompts = random_prompts(37, [1, 3, 7, 12], seed=5)
    for eos in (5, 6, 7):  # each makes some prompts stop early
        expected = []
        for p in prompts:
            tokens = hf_generate(hf, p, max_new_tokens=20, eos_token_id=eos)
            expected.append(tokens[: tokens.index(eos)] if eos in tokens else tokens)
        assert greedy(ours, prompts, 20, eos_ids=(eos,)) == expected


def test_beam_search_without_eos_and_ngram_bans_equals_transformers(hf_and_ours):
    # With no EOS and no n-gram bans, gpt2_beam.py and transformers both reduce to textbook beam
    # search (their EOS handling and n-gram rule differ; see lora_min/decode.py).
    hf, ours = hf_and_ours
    for p in random_prompts(37, [1, 4, 9], seed=6):
        for beam_size in (2, 5):
            expected = hf_generate(hf, p, max_new_tokens=12, num_beams=beam_size, eos_token_id=None,
                                   length_penalty=0.8)
            assert beam_search(ours, [p], beam_size, 12, no_repeat_ngram_size=0, eos_ids=()) == [expected]
