"""Turning prompts into new tokens: greedy decoding and the LoRA paper's beam search.

Both decode many prompts at once on one KVCache (lora_min/model.py). Prompts are padded on the
left, so every row's next token is predicted in the last column, and `attention_mask` tells the
model which positions are padding (it also positions each real token as if there were none).
After the prompt, every step feeds only the newest token of each row.

`beam_search` reproduces microsoft/LoRA's examples/NLG/src/gpt2_beam.py, the script behind the
paper's E2E numbers (Hu et al., 2021, Table 3):
  * a hypothesis scores  sum of log p(token) / (generated length incl. EOS) ** length_penalty;
  * each step keeps the beam_size best (hypothesis, next token) pairs over all beams of a prompt.
    A pair whose token is an EOS token is finished: it competes with the prompt's best finished
    hypothesis so far and leaves the beam, whose slot stays empty until the next step;
  * hypotheses still open after max_new_tokens are finished too, scored with that length;
  * no n-gram of no_repeat_ngram_size *generated* tokens may occur twice (the prompt does not
    count). Banned tokens get logit -inf before the softmax, so the rest are renormalised;
  * the prompt is cut from the left to fit in block_size - max_new_tokens tokens.

Where we differ from gpt2_beam.py, none of it changing which hypothesis wins:
  * It always runs max_new_tokens steps. We stop a prompt as soon as no open hypothesis can beat
    its best finished one (`_cannot_improve`, an exact bound), and drop stopped prompts from the
    batch and the KV cache; a beam left empty for a step by a finished hypothesis is not computed
    either. So a batch costs what its open hypotheses cost. (The bound must allow for every later
    token having probability 1, so a prompt runs well past its best text's end: on E2E about 45
    steps for outputs of 10-20 tokens. generate()'s default stops sooner, on a guess.)
  * log_softmax(logits) instead of log(softmax(logits)), which underflows to -inf.
  * The prompt is run once per prompt rather than once per beam, and step one draws from the
    first beam only because the others start at score -inf (gpt2_beam.py slices out beam 0, which
    needs beam_size <= vocab_size; the brute-force test uses more beams than that).
  * The output stops before the EOS token; gpt2_beam.py keeps it and its decoding script cuts it.
  * Its repetition_penalty and min_length options are left out: the E2E command keeps them at
    their no-op values (1.0 and 0).

transformers' beam search differs in ways that change results: it applies no_repeat_ngram to the
prompt too and after the softmax (no renormalising), refills a finished beam's slot at once with
the next best candidate, and by default stops on a heuristic. Without EOS and n-gram bans, both
are the same textbook beam search (tests/test_decode.py checks that).

Length penalty. The paper's Table 11 gives 0.9 for E2E (and 0.8 for WebNLG and DART); the E2E
command in the repository's README passes 0.8 (its output is named `...b10p08r4.jsonl`). We default
to 0.9: the table sets the value per data set, so 0.9 reads as the choice made for E2E, while the
README's one command looks shared with the other two. train.py uses the same default, and
`python -m lora_min.evaluate --length-penalty 0.8` reruns the README's setting.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from lora_min.tokenizer import EOT, PAD_ID
from lora_min.model import GPT, KVCache

# GPT-2's <|endoftext|> (50256), which ends every E2E training sequence, and "\n\n" (628):
# gpt2_beam.py stops at both (`--eos_token_id 628` is appended to its default [50256]).
EOS_IDS = (EOT, 628)


# -----------------------------------------------------------------------------
# Greedy decoding


@torch.inference_mode()
def greedy(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int] = EOS_IDS,
    batch_size: int = 32,
) -> list[list[int]]:
    """The most likely next token, step after step: one list of new token ids per prompt.

    A prompt stops at its first token in `eos_ids` (not included in the output) or after
    `max_new_tokens`; `eos_ids=()` always gives max_new_tokens tokens. `batch_size` prompts are
    decoded side by side (results do not depend on it).
    """
    _check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size)
    prompts = _fit_prompts(prompts, model.config.block_size, max_new_tokens)
    with _eval_mode(model):
        return [tokens for start in range(0, len(prompts), batch_size)
                for tokens in _greedy_batch(model, prompts[start : start + batch_size], max_new_tokens, eos_ids)]


def _greedy_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int,
                  eos_ids: Sequence[int]) -> list[list[int]]:
    logits, cache = _run_prompts(model, prompts, max_new_tokens)  # (B, vocab)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=logits.device)
    generated: list[list[int]] = [[] for _ in prompts]
    prompt_of_row = list(range(len(prompts)))  # rows leave the batch as their prompt finishes
    for step in range(max_new_tokens):
        next_token = logits.argmax(dim=-1)  # (B,)
        finished = torch.isin(next_token, eos)
        for row, (token, done) in enumerate(zip(next_token.tolist(), finished.tolist())):
            if not done:
                generated[prompt_of_row[row]].append(token)
        if step == max_new_tokens - 1 or finished.all():
            break
        if finished.any():  # stop computing rows that are done
            open_rows = (~finished).nonzero().squeeze(1)
            cache.reorder(open_rows)
            next_token = next_token[open_rows]
            prompt_of_row = [prompt_of_row[row] for row in open_rows.tolist()]
        logits = model(next_token[:, None], cache=cache)[:, -1]
    return generated


# -----------------------------------------------------------------------------
# Beam search


@torch.inference_mode()
def beam_search(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    beam_size: int = 10,
    max_new_tokens: int = 64,
    length_penalty: float = 0.9,
    no_repeat_ngram_size: int = 4,
    eos_ids: Sequence[int] = EOS_IDS,
    batch_size: int = 8,
) -> list[list[int]]:
    """The paper's beam search (microsoft/LoRA gpt2_beam.py; see the module docstring).

    Returns one list of new token ids per prompt: the best-scoring finished hypothesis, without
    its EOS token. `no_repeat_ngram_size=0` allows repeats; `eos_ids=()` always gives
    max_new_tokens tokens. `batch_size` prompts (so batch_size * beam_size rows) are decoded side
    by side; results do not depend on it.
    """
    check_settings(beam_size, max_new_tokens, length_penalty, no_repeat_ngram_size, batch_size)
    prompts = _fit_prompts(prompts, model.config.block_size, max_new_tokens)
    with _eval_mode(model):
        hypotheses = []
        for start in range(0, len(prompts), batch_size):
            hypotheses += _beam_search_batch(
                model, prompts[start : start + batch_size], beam_size, max_new_tokens,
                length_penalty, no_repeat_ngram_size, eos_ids,
            )
    return [h[:-1] if h and h[-1] in eos_ids else h for h in hypotheses]


def _beam_search_batch(model: GPT, prompts: list[list[int]], beam_size: int, max_new_tokens: int,
                       length_penalty: float, no_repeat_ngram_size: int,
                       eos_ids: Sequence[int]) -> list[list[int]]:
    """Beam search for a few prompts at once; hypotheses end with their EOS token, if any.

    Row p * K + k of every (P*K, ...) tensor is beam k of the p-th prompt still being decoded
    (K = beam_size). Only *open* beams (finite score) are live: the model, the KV cache and the
    logits hold the live rows alone, in that order. A beam whose hypothesis just finished stays
    empty until the next step, and prompts leave the batch when they are done, so P shrinks.
    """
    K = beam_size
    logits, cache = _run_prompts(model, prompts, max_new_tokens)  # (P, vocab): beam 0 of each prompt
    P, vocab_size = logits.shape
    device = logits.device
    dtype = _score_dtype(logits.dtype)
    scores = torch.full((P, K), -math.inf, dtype=dtype, device=device)  # sum of log-probs of each open hypothesis
    scores[:, 0] = 0.0  # only beam 0 is open at first: K copies of the prompt would yield K equal candidates
    live = scores.isfinite().flatten()  # (P*K,) the rows that logits and the cache hold
    generated = torch.empty(P * K, 0, dtype=torch.long, device=device)  # (P*K, t) tokens so far
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)

    best_score = torch.full((P,), -math.inf, dtype=dtype, device=device)  # best finished hypothesis of each prompt
    best: list[list[int]] = [[] for _ in prompts]
    prompt_ids = list(range(P))  # which of `prompts` each row group decodes

    for step in range(max_new_tokens):
        length = step + 1  # tokens each candidate of this step holds, its EOS included
        log_probs = _next_token_log_probs(logits, generated[live], no_repeat_ngram_size)  # (live rows, vocab)
        candidates = torch.full((P * K, vocab_size), -math.inf, dtype=dtype, device=device)
        candidates[live] = scores.view(-1, 1)[live] + log_probs  # an empty beam has no candidates
        scores, flat = candidates.view(P, K * vocab_size).topk(K, dim=1)  # (P, K), best first
        parent = flat // vocab_size + K * torch.arange(P, device=device)[:, None]  # row each extends
        token = flat % vocab_size  # (P, K)
        generated = torch.cat([generated[parent.flatten()], token.view(-1, 1)], dim=1)

        # Hypotheses that just emitted EOS are finished; they leave the beam.
        ended = torch.isin(token, eos) & scores.isfinite()
        _keep_best(best_score, best, prompt_ids, scores, ended, generated, length, length_penalty)
        scores = scores.masked_fill(ended, -math.inf)
        if step == max_new_tokens - 1:
            # Out of room: every open hypothesis is finished (gpt2_beam.py's last _add_beam_candidate).
            _keep_best(best_score, best, prompt_ids, scores, scores.isfinite(), generated, length, length_penalty)
            break

        done = _cannot_improve(best_score, scores, length, max_new_tokens, length_penalty)
        if done.all():
            break
        if done.any():  # drop finished prompts: keep only the row groups of open ones
            keep = ~done
            parent, token, scores, best_score = parent[keep], token[keep], scores[keep], best_score[keep]
            generated = generated.view(P, K, -1)[keep].flatten(0, 1)
            prompt_ids = [p for p, kept in zip(prompt_ids, keep.tolist()) if kept]
            P = len(prompt_ids)
        # Each open hypothesis continues from its parent's keys/values (an open one's parent was live).
        cache_row = live.cumsum(0) - 1  # where each live row of the last step sits in the cache
        live = scores.isfinite().flatten()
        cache.reorder(cache_row[parent.flatten()[live]])
        logits = model(token.view(-1, 1)[live], cache=cache)[:, -1]
    return best


def _next_token_log_probs(logits: torch.Tensor, generated: torch.Tensor, no_repeat_ngram_size: int) -> torch.Tensor:
    """(rows, vocab) log-probabilities of the next token, repeated n-grams banned first."""
    logits = logits.to(_score_dtype(logits.dtype))
    if no_repeat_ngram_size > 0:
        logits = _ban_repeated_ngrams(logits.clone(), generated, no_repeat_ngram_size)
    log_probs = torch.log_softmax(logits, dim=-1)
    # A row whose every token is banned has no continuation: its NaNs (0/0) become -inf.
    return log_probs.masked_fill(log_probs.isnan(), -math.inf)


def _ban_repeated_ngrams(logits: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
    """Set logits[r, w] = -inf (in place) where generated[r] + [w] would repeat one of its n-grams.

    This is fairseq's no_repeat_ngram as gpt2_beam.py applies it: a token is banned when the last
    n - 1 generated tokens, followed by it, already occurred as n consecutive generated tokens.
    """
    rows, t = generated.shape
    n_grams = t - n + 1  # complete n-grams so far; n-gram s is generated[:, s : s + n]
    if n_grams <= 0:
        return logits
    # same_start[r, s]: n-gram s of row r begins with the row's last n - 1 tokens.
    same_start = torch.ones(rows, n_grams, dtype=torch.bool, device=generated.device)
    for j in range(n - 1):
        same_start &= generated[:, j : j + n_grams] == generated[:, n_grams + j, None]
    completing = generated[:, n - 1 :]  # (rows, n_grams): the token that ends each n-gram
    row_index = torch.arange(rows, device=generated.device)[:, None].expand_as(completing)
    logits[row_index[same_start], completing[same_start]] = -math.inf
    return logits


def _keep_best(best_score: torch.Tensor, best: list[list[int]], prompt_ids: list[int], scores: torch.Tensor,
               ended: torch.Tensor, generated: torch.Tensor, length: int, length_penalty: float) -> None:
    """Let each prompt's hypotheses marked `ended` (P, K) replace its best one if they score higher.

    score = sum of log-probs / length ** length_penalty (gpt2_beam.py's _add_beam_candidate).
    Like it, an equal score does not replace, and among equals the earlier beam wins.
    """
    K = scores.size(1)
    normalised = torch.where(ended, scores / length**length_penalty, -math.inf)  # (P, K)
    top_score, top_beam = normalised.max(dim=1)  # max() returns the first of equal values
    for p in (top_score > best_score).nonzero().flatten().tolist():
        best_score[p] = top_score[p]
        best[prompt_ids[p]] = generated[p * K + top_beam[p]].tolist()


def _cannot_improve(best_score: torch.Tensor, open_scores: torch.Tensor, length: int, max_new_tokens: int,
                    length_penalty: float) -> torch.Tensor:
    """(P,) True where no open hypothesis can ever beat the prompt's best finished one.

    An open hypothesis with log-prob sum s <= 0 only loses probability as it grows, so anything
    it turns into scores at most s / L ** length_penalty for the most favourable final length L:
    max_new_tokens when length_penalty >= 0, else the very next length. The bound is exact, so
    stopping here never changes the result. (transformers' default instead assumes the current
    length, a heuristic that can stop too early.)
    """
    final_length = max_new_tokens if length_penalty >= 0 else length + 1
    best_possible = open_scores.max(dim=1).values / final_length**length_penalty  # -inf if none open
    return best_possible <= best_score


# -----------------------------------------------------------------------------
# Shared by both


def _run_prompts(model: GPT, prompts: list[list[int]], max_new_tokens: int) -> tuple[torch.Tensor, KVCache]:
    """Feed the left-padded prompts once: (B, vocab) next-token logits and a cache holding them."""
    weight = model.wte.weight
    idx, mask = _pad_left(prompts, weight.device)  # (B, T) each
    cache = KVCache(model.config, len(prompts), idx.size(1) + max_new_tokens, weight.device,
                    model.compute_dtype())
    last_column = torch.zeros_like(mask)
    last_column[:, -1] = True  # with left padding every prompt ends there; skip the LM head elsewhere
    logits = model(idx, attention_mask=mask, cache=cache, logits_mask=last_column)
    return logits, cache


def _pad_left(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids with each prompt right-aligned, and the (B, T) mask of real tokens."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        idx[row, T - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, T - len(prompt) :] = True
    return idx.to(device), mask.to(device)


def _fit_prompts(prompts: Sequence[Sequence[int]], block_size: int, max_new_tokens: int) -> list[list[int]]:
    """Each prompt as a list, cut from the left to its last block_size - max_new_tokens tokens
    (as gpt2_beam.py's data loader does), so prompt and new tokens fit in the model."""
    max_prompt_len = block_size - max_new_tokens
    if max_prompt_len < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"block_size={block_size}")
    fitted = []
    for i, prompt in enumerate(prompts):
        prompt = [int(token) for token in prompt]
        if not prompt:
            raise ValueError(f"prompt {i} is empty: decoding needs at least one token to start from")
        fitted.append(prompt[-max_prompt_len:])
    return fitted


def check_settings(beam_size: int = 1, max_new_tokens: int = 1, length_penalty: float = 1.0,
                   no_repeat_ngram_size: int = 0, batch_size: int = 1) -> None:
    """Raise ValueError naming the first bad setting by its keyword here (the command lines check
    their flags with this too, before any work)."""
    _check_positive(beam_size=beam_size, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {no_repeat_ngram_size}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty}")


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-probabilities are summed in float32 at least, even for a half-precision model."""
    return torch.promote_types(dtype, torch.float32)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() (no dropout) for the duration; every module's train/eval flag is restored after."""
    was_training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in was_training.items():
            module.training = training
