"""Decoding speed: lora_min.decode against transformers' generate(), and with vs without the KV cache.

    python benchmarks/decode.py [--mrs 4] [--rounds 3] [--new-tokens 32] [--batch 4] [--threads N]
    python benchmarks/decode.py --only evaluate [--eval-mrs 16] [--eval-batch 8] [--data-dir DIR]

First, the workload that matters (`--only evaluate`): N test MRs decoded the way
`python -m lora_min.evaluate` decodes them (its own `decode_mrs`: batches of --eval-batch MRs, beam
10, length penalty 0.9, no-repeat 4, at most 64 new tokens, stopping at <|endoftext|> or "\n\n"),
side by side with the generate() loop a user would write for the same batches (left padding,
num_beams=10 and the same settings). Its outputs must end where real E2E outputs end, which a
random model's never do, so the model is a small GPT (2 layers, 128 wide) trained on the E2E train
set for --train-steps steps (once; cached in runs/benchmarks/), then *widened* exactly into the
gpt2 (124M) shape (`widen`): every matmul, attention head and block of gpt2 is computed, yet the
next-token distribution is the small model's. MRs/s, the mean output length, and generate()'s
time over ours per batch (median over batches and rounds, the two run back to back).

Then fixed-length decoding (`--only fixed`), one MR at a time and in batches, with the gpt2 (124M)
configuration and random weights: the same weights in our GPT and in transformers' GPT2LMHeadModel. The prompts are E2E test MRs
from data/demo/, formatted as for training. Every method generates exactly --new-tokens tokens per MR (no EOS), so
tokens/s compare like with like; beam search reports output tokens, not tokens x beams.

One prompt at a time, the methods take turns on each MR (who goes first alternates), and a speed
ratio is the median over MRs and rounds of the two times on the same MR: work that other
processes put on the machine then slows both sides of a ratio alike. Then the batched rows decode
all MRs --batch at a time. Greedy tokens must be identical to generate()'s, and every run of ours
identical to our cached one-prompt run (with or without cache, in a batch or not).
Prints a Markdown table.

Last, a floor: the time the weight matmuls alone of decoding one MR take (`matmul_floor`: every
projection and the LM head called through the model's own modules on random inputs, nothing else),
for ours and for transformers' model. generate()'s time over our floor is the most that any
faster decoding loop around our model could gain over generate(): if it is below a target, the
target needs faster matmuls (or fewer), not a better loop.

Everything runs in one process on the CPU. Threads change the picture. With torch's default (all cores) on a machine that other processes
also use, every small op waits for a descheduled thread, which costs generate()'s many small ops
far more than ours: ratios then swing from run to run. --threads 1 gives steady numbers, and its
CPU-time column is steady even on a busy machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from lora_min.data import (DEMO_DIR, decode_completion, encode_prompt, get_tokenizer, group_references,
                           iterate_batches, load_split, make_examples, masked_lm_loss, read_e2e_csv)
from lora_min.decode import EOS_IDS, PAD_ID, beam_search, greedy
from lora_min.evaluate import decode_mrs
from lora_min.fileio import atomic_write_bytes
from lora_min.model import CONV1D_WEIGHTS, GPT, GPTConfig, KVCache

CACHE_DIR = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"  # git-ignored

BEAM = dict(beam_size=10, length_penalty=0.9, no_repeat_ngram_size=4)  # the paper's (Table 11)


class WithoutCache(nn.Module):
    """Our GPT as decode.py sees it, but re-running the full forward pass every step.

    decode.py still builds and reorders a KVCache; here the cache only counts tokens, and its
    `reorder` is redirected to reorder the token rows kept here. The decoding logic is the same
    code, so the only difference measured is the cache.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model, self.config, self.wte = model, model.config, model.wte

    def forward(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                cache: KVCache, logits_mask: torch.Tensor | None = None) -> torch.Tensor:
        if cache.length == 0:  # the (left-padded) prompts
            self.tokens, self.mask = idx, attention_mask
            cache.reorder = self._reorder
        else:
            self.tokens = torch.cat([self.tokens, idx], dim=1)
            self.mask = torch.cat([self.mask, torch.ones_like(idx, dtype=torch.bool)], dim=1)
        cache.length += idx.size(1)
        last = torch.zeros_like(self.mask)
        last[:, -1] = True  # the LM head only where the next token is predicted, as with the cache
        logits = self.model(self.tokens, attention_mask=self.mask, logits_mask=last)  # (B, vocab)
        return logits if logits_mask is not None else logits[:, None]

    def _reorder(self, rows: torch.Tensor) -> None:
        self.tokens, self.mask = self.tokens[rows], self.mask[rows]


# -----------------------------------------------------------------------------
# The evaluate workload: a model whose outputs end where E2E outputs end


SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=128)  # 64-wide heads, as gpt2's


def small_e2e_model(data_dir: str | None, steps: int) -> GPT:
    """SMALL trained on the E2E train set for `steps` steps (batch 8, AdamW 3e-3, 30 warm-up steps),
    from seed 0; trained once, then read from CACHE_DIR. Loss ~2.2 after 2000 steps: it writes
    short, mostly sensible E2E sentences and ends them with <|endoftext|>."""
    path = CACHE_DIR / f"decode-e2e-small-{steps}-steps.pt"
    torch.manual_seed(0)
    model = GPT(SMALL)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    print(f"training the small E2E model for {steps} steps (once; cached in {path})", flush=True)
    examples, _ = make_examples(load_split("train", data_dir))
    lr = 3e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    step, epoch, started = 0, 0, time.perf_counter()
    while step < steps:
        for input_ids, targets, loss_mask in iterate_batches(examples, 8, seed=0, epoch=epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 30)
            loss = masked_lm_loss(model(input_ids, logits_mask=loss_mask), targets, loss_mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 100 == 0:
                print(f"step {step}/{steps}: loss {loss.item():.3f}, {time.perf_counter() - started:.0f}s", flush=True)
            if step == steps:
                break
        epoch += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: torch.save(model.state_dict(), f))
    return model.eval()


@torch.no_grad()
def widen(small: GPT, config: GPTConfig) -> GPT:
    """A GPT of `config` (wider, deeper) that computes exactly what `small` computes.

    With copies = n_embd // small n_embd, the residual stream holds `copies` copies of small's
    (a LayerNorm of copies is the copies of the LayerNorm). Small's heads are the first heads and
    read the first copy; small's MLP units are the first units; every output projection writes
    each copy. Blocks beyond small's have zero output projections: they add nothing. ln_f is
    divided by `copies`, so the tied LM head's sum over copies is small's logits. Everything else
    (the other heads, MLP units and blocks) keeps its random weights and is computed as usual.
    """
    c, C = small.config.n_embd, config.n_embd
    hd = c // small.config.n_head
    assert C % c == 0 and hd == C // config.n_head and small.config.n_layer <= config.n_layer
    copies = C // c
    torch.manual_seed(1)
    big = GPT(config)
    s, b = small.state_dict(), big.state_dict()  # b: the parameters themselves, filled in place
    b["wte.weight"].copy_(s["wte.weight"].repeat(1, copies))
    b["wpe.weight"].copy_(s["wpe.weight"][: config.block_size].repeat(1, copies))
    b["ln_f.weight"].copy_(s["ln_f.weight"].repeat(copies) / copies)
    b["ln_f.bias"].copy_(s["ln_f.bias"].repeat(copies) / copies)
    for i in range(config.n_layer):
        h = f"h.{i}."
        for proj in ("attn.c_proj", "mlp.c_proj"):
            b[h + proj + ".weight"].zero_()
            b[h + proj + ".bias"].zero_()
        if i >= small.config.n_layer:
            continue
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            b[h + name].copy_(s[h + name].repeat(copies))
        for j in range(3):  # q, k, v
            rows = slice(j * C, j * C + c)
            b[h + "attn.c_attn.weight"][rows] = 0.0
            b[h + "attn.c_attn.weight"][rows, :c] = s[h + "attn.c_attn.weight"][j * c : (j + 1) * c]
            b[h + "attn.c_attn.bias"][rows] = s[h + "attn.c_attn.bias"][j * c : (j + 1) * c]
        units = 4 * c
        b[h + "mlp.c_fc.weight"][:units] = 0.0
        b[h + "mlp.c_fc.weight"][:units, :c] = s[h + "mlp.c_fc.weight"]
        b[h + "mlp.c_fc.bias"][:units] = s[h + "mlp.c_fc.bias"]
        b[h + "attn.c_proj.weight"][:, :c] = s[h + "attn.c_proj.weight"].repeat(copies, 1)
        b[h + "mlp.c_proj.weight"][:, :units] = s[h + "mlp.c_proj.weight"].repeat(copies, 1)
        for proj in ("attn.c_proj", "mlp.c_proj"):
            b[h + proj + ".bias"].copy_(s[h + proj + ".bias"].repeat(copies))
    return big.eval()


def e2e_models(data_dir: str | None, steps: int, prompt: list[int]) -> tuple[GPT, nn.Module]:
    """The widened E2E model as our GPT and as transformers' GPT2LMHeadModel (same weights)."""
    import transformers

    small = small_e2e_model(data_dir, steps)
    ours = widen(small, GPTConfig.from_name("gpt2"))
    with torch.no_grad():
        gap = (ours(torch.tensor([prompt]))[0, -1] - small(torch.tensor([prompt]))[0, -1]).abs().max().item()
    assert gap < 1e-3, f"the widened model's logits differ from the small model's by {gap}"
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    state = {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in ours.state_dict().items()
             if k != "lm_head.weight"}
    missing, unexpected = hf.transformer.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") for k in missing), (missing, unexpected)
    return ours, hf


def hf_beam_search_batch(hf: nn.Module, prompts: list[list[int]], **kwargs) -> list[str]:
    """The generate() call a user would write for one batch, with evaluate's settings."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, T - len(p) :], mask[row, T - len(p) :] = torch.tensor(p), 1
    out = hf.generate(ids, attention_mask=mask, num_beams=BEAM["beam_size"], length_penalty=BEAM["length_penalty"],
                      no_repeat_ngram_size=BEAM["no_repeat_ngram_size"], max_new_tokens=64, do_sample=False,
                      eos_token_id=list(EOS_IDS), pad_token_id=PAD_ID, **kwargs)
    texts = []
    for tokens in out[:, T:].tolist():
        ends = [i for i, t in enumerate(tokens) if t in EOS_IDS]
        texts.append(" ".join(decode_completion(tokens[: ends[0]] if ends else tokens).split()))
    return texts


def evaluate_workload(args) -> None:
    mrs = [mr for mr, _ in group_references(load_split("test", args.data_dir))][: args.eval_mrs]
    prompts = [encode_prompt(mr) for mr in mrs]
    ours, hf = e2e_models(args.data_dir, args.train_steps, prompts[0])
    batches = [range(start, min(start + args.eval_batch, len(mrs))) for start in range(0, len(mrs), args.eval_batch)]
    methods = {
        "ours (lora_min.evaluate)": lambda b: decode_mrs(ours, [mrs[i] for i in b], batch_size=len(b), progress=False),
        "transformers generate()": lambda b: hf_beam_search_batch(hf, [prompts[i] for i in b]),
        # generate()'s default stops a prompt by a guess (the best open hypothesis scored at today's
        # length), which can change the result; "never" stops on the exact bound that ours uses.
        'transformers generate(), early_stopping="never"':
            lambda b: hf_beam_search_batch(hf, [prompts[i] for i in b], early_stopping="never"),
    }
    seconds = {name: {} for name in methods}  # name -> (round, batch) -> (wall, CPU)
    texts: dict[str, list[str]] = {}
    with torch.inference_mode():
        for r in range(args.rounds):
            for j, batch in enumerate(batches):
                names = list(methods) if (r + j) % 2 == 0 else list(methods)[::-1]  # alternate who goes first
                for name in names:
                    out, seconds[name][r, j] = timed(methods[name], batch)
                    texts.setdefault(name, [""] * len(mrs))[batch.start : batch.stop] = out
                print(f"round {r + 1}/{args.rounds}, batch {j + 1}/{len(batches)}: " + ", ".join(
                    f"{name} {seconds[name][r, j][0]:.1f}s" for name in names), flush=True)
    print_evaluate_table(seconds, texts, len(mrs), args)


def print_evaluate_table(seconds: dict, texts: dict, n_mrs: int, args) -> None:
    hf = seconds["transformers generate()"]  # the baseline of both ratios
    encode = get_tokenizer().encode_ordinary
    print(f"\n{n_mrs} E2E test MRs decoded as evaluate does (batch {args.eval_batch}, beam 10, length penalty "
          f"0.9, no-repeat 4, <= 64 new tokens), gpt2 (124M) shape widened from a {args.train_steps}-step E2E model, "
          f"{args.threads} thread(s), {args.rounds} rounds, torch {torch.__version__}\n")
    print("| implementation | MRs/s | output tokens per MR | vs generate(), wall | vs generate(), CPU |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, times in seconds.items():
        per_round = [sum(t[0] for (r, _), t in times.items() if r == rr) for rr in range(args.rounds)]
        length = statistics.mean(len(encode(" " + t)) for t in texts[name])
        ratios = [statistics.median(hf[k][c] / times[k][c] for k in times) for c in (0, 1)]
        print(f"| {name} | {n_mrs / statistics.median(per_round):.3f} | {length:.1f} "
              f"| {ratios[0]:.2f}x | {ratios[1]:.2f}x |")
    print("\nMRs/s: wall-clock, median over rounds. vs generate(): per batch, generate()'s time over ours, "
          "the two run back to back; median over batches and rounds. Output tokens: the texts re-encoded.")


def build_models() -> tuple[GPT, nn.Module]:
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # gpt2 (124M), random
    ours = GPT(GPTConfig.from_name("gpt2"))
    ours.load_base_weights(hf.transformer.state_dict())
    return ours.eval(), hf


def hf_generate(hf: nn.Module, prompt: list[int], new_tokens: int, **kwargs) -> list[int]:
    """generate() on one prompt (no padding needed): exactly new_tokens tokens, no EOS."""
    ids = torch.tensor([prompt])
    tokens = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=50256, **kwargs)
    return tokens[0, len(prompt) :].tolist()


def one_prompt_methods(ours: GPT, hf: nn.Module, n: int) -> dict[tuple[str, str], Callable]:
    """(decoding, implementation) -> function decoding one prompt."""
    slow = WithoutCache(ours)
    hf_beam = dict(num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4)
    return {
        ("greedy", "ours, KV cache"): lambda p: greedy(ours, [p], n, eos_ids=())[0],
        ("greedy", "transformers generate()"): lambda p: hf_generate(hf, p, n),
        ("greedy", "ours, no cache"): lambda p: greedy(slow, [p], n, eos_ids=())[0],
        ("beam 10", "ours, KV cache"): lambda p: beam_search(ours, [p], max_new_tokens=n, eos_ids=(), **BEAM)[0],
        ("beam 10", "transformers generate()"): lambda p: hf_generate(hf, p, n, **hf_beam),
        ("beam 10", "ours, no cache"): lambda p: beam_search(slow, [p], max_new_tokens=n, eos_ids=(), **BEAM)[0],
    }


def batched_methods(ours: GPT, n: int, batch: int) -> dict[tuple[str, str], Callable]:
    """(decoding, implementation) -> function decoding all prompts, `batch` MRs side by side."""
    return {
        ("greedy", "ours, KV cache"): lambda ps: greedy(ours, ps, n, eos_ids=(), batch_size=batch),
        ("beam 10", "ours, KV cache"): lambda ps: beam_search(ours, ps, max_new_tokens=n, eos_ids=(),
                                                              batch_size=batch, **BEAM),
    }


def matmul_floor(linears: list[nn.Module], lm_head: nn.Module, prompt_len: int, steps: int, rows: int) -> float:
    """Seconds that only the weight matmuls of decoding one prompt take: every projection of every
    block on the prompt's positions, then `steps` steps of `rows` rows (1 for greedy, the beam size
    for beam search), the LM head on one row for the prompt and on every row at each step. Called
    through the model's own modules (nn.Linear in ours, Conv1D in transformers), so the BLAS
    calls are the real ones; attention, layer norms, sampling and bookkeeping are left out, so no
    decoder built on these modules can be faster."""
    def inputs(n: int) -> list[torch.Tensor]:  # made before the clock starts
        return [torch.randn(n, m.in_features if isinstance(m, nn.Linear) else m.weight.size(0)) for m in linears]

    prompt_inputs, step_inputs = inputs(prompt_len), inputs(rows)
    head_first, head_step = torch.randn(1, lm_head.in_features), torch.randn(rows, lm_head.in_features)
    start = time.perf_counter()
    for linear, x in zip(linears, prompt_inputs):
        linear(x)
    lm_head(head_first)
    for _ in range(steps):
        for linear, x in zip(linears, step_inputs):
            linear(x)
        lm_head(head_step)
    return time.perf_counter() - start


def block_linears(model: nn.Module) -> list[nn.Module]:
    """The four projections of every block, in forward order (both models name them alike)."""
    blocks = model.h if isinstance(model, GPT) else model.transformer.h
    return [m for block in blocks for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mrs", type=int, default=4, help="fixed workload: MRs decoded one at a time per round")
    parser.add_argument("--slow-mrs", type=int, default=1, help="of which the no-cache methods decode the first N")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; figures are medians")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="MRs per batch in the batched rows")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=["evaluate", "fixed"], help="run one of the two workloads")
    parser.add_argument("--eval-mrs", type=int, default=16, help="evaluate workload: test MRs decoded per round")
    parser.add_argument("--eval-batch", type=int, default=8, help="evaluate workload: MRs per batch (evaluate's default)")
    parser.add_argument("--train-steps", type=int, default=2000, help="evaluate workload: training of the small model")
    parser.add_argument("--data-dir", help="folder with the E2E CSVs (default: as train.py finds them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only != "fixed":
        evaluate_workload(args)
    if args.only != "evaluate":
        fixed_workload(args)


def fixed_workload(args) -> None:
    mrs = [mr for mr, _ in group_references(read_e2e_csv(DEMO_DIR / "testset_w_refs.csv"))][: args.mrs]
    prompts = [encode_prompt(mr) for mr in mrs]
    ours, hf = build_models()
    single = one_prompt_methods(ours, hf, args.new_tokens)
    batched = batched_methods(ours, args.new_tokens, args.batch)
    # key -> (round, MR) -> (wall, CPU) seconds
    seconds: dict[tuple, dict[tuple[int, int], tuple[float, float]]] = {key: {} for key in single}
    batched_seconds: dict[tuple, list[tuple[float, float]]] = {key: [] for key in batched}
    outputs: dict[tuple, list[list[int]]] = {}
    floors: dict[tuple, dict[tuple[int, int], float]] = {  # (decoding, model) -> (round, MR) -> seconds
        (decoding, name): {} for decoding in ("greedy", "beam 10") for name in ("ours", "transformers")}

    with torch.inference_mode():
        for key, run in single.items():  # warm-up: first-call allocations and lazy imports
            if "no cache" not in key[1]:
                run(prompts[0])
        for r in range(args.rounds):
            for i, prompt in enumerate(prompts):
                keys = [k for k in single if "no cache" not in k[1] or i < args.slow_mrs]
                for key in keys if (r + i) % 2 == 0 else keys[::-1]:  # alternate who goes first
                    tokens, seconds[key][r, i] = timed(single[key], prompt)
                    outputs.setdefault(key + (1,), [None] * len(prompts))[i] = tokens
                for (decoding, name), times in floors.items():
                    rows = 1 if decoding == "greedy" else BEAM["beam_size"]
                    model = ours if name == "ours" else hf
                    times[r, i] = matmul_floor(block_linears(model), model.lm_head, len(prompt),
                                               args.new_tokens - 1, rows)
                print(f"round {r + 1}/{args.rounds}, MR {i + 1}/{len(prompts)}: " + ", ".join(
                    f"{d} {impl} {seconds[d, impl][r, i][0]:.1f}s" for d, impl in keys), flush=True)
            for key, run in batched.items():
                outputs[key + (args.batch,)], spent = timed(run, prompts)
                batched_seconds[key].append(spent)
                print(f"round {r + 1}/{args.rounds}: {key[0]}, {key[1]}, batch {args.batch}: {spent[0]:.1f}s",
                      flush=True)

    check_outputs(outputs, args.new_tokens)
    print_table(seconds, batched_seconds, len(prompts), args)
    print_floors(floors, seconds, args)


def timed(run: Callable, arg) -> tuple[object, tuple[float, float]]:
    """run(arg) and the (wall-clock, CPU) seconds it took. CPU time (all threads of this process)
    does not count the time other processes hold the cores, so on a busy machine it is the steadier
    measure of the work done; wall-clock is what a user waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run(arg)
    return result, (time.perf_counter() - wall, time.process_time() - cpu)


def check_outputs(outputs: dict[tuple, list], new_tokens: int) -> None:
    """Greedy as generate(); every run of ours as our cached run on one prompt; all full length."""
    outputs = {k: [t for t in out if t is not None] for k, out in outputs.items()}  # no-cache: fewer MRs
    assert all(len(t) == new_tokens for out in outputs.values() for t in out), "a method stopped early"
    assert outputs["greedy", "ours, KV cache", 1] == outputs["greedy", "transformers generate()", 1], \
        "greedy tokens differ from generate()"
    for (decoding, impl, batch), out in outputs.items():
        if not impl.startswith("transformers"):  # its beam search differs by design (lora_min/decode.py)
            assert out == outputs[decoding, "ours, KV cache", 1][: len(out)], f"{decoding}, {impl}, {batch} differs"


def print_table(seconds: dict, batched_seconds: dict, n_mrs: int, args) -> None:
    def ratio(slow: tuple, fast: tuple, clock: int) -> float:  # median over the (round, MR) pairs both timed
        pairs = [k for k in seconds[fast] if k in seconds[slow]]
        return statistics.median(seconds[slow][k][clock] / seconds[fast][k][clock] for k in pairs)

    def median(times, clock: int) -> float:
        return statistics.median(t[clock] for t in times)

    hf = {d: (d, "transformers generate()") for d, _ in seconds}
    print(f"\ngpt2 (124M) config, random weights, E2E MR prompts, {args.new_tokens} new tokens each, "
          f"{args.threads} thread(s), {args.rounds} rounds, torch {torch.__version__}\n")
    print("| decoding | implementation | batch (MRs) | MRs/s | tokens/s | vs generate(), wall | vs generate(), CPU |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for (decoding, impl), times in seconds.items():
        if not times:  # --slow-mrs 0
            continue
        mrs_per_s = 1 / median(times.values(), 0)
        print(f"| {decoding} | {impl} | 1 | {mrs_per_s:.2f} | {mrs_per_s * args.new_tokens:.1f} "
              f"| {ratio(hf[decoding], (decoding, impl), 0):.2f}x | {ratio(hf[decoding], (decoding, impl), 1):.2f}x |")
    for (decoding, impl), times in batched_seconds.items():
        mrs_per_s = n_mrs / median(times, 0)
        speed = [n_mrs / median(times, c) * median(seconds[hf[decoding]].values(), c) for c in (0, 1)]
        print(f"| {decoding} | {impl} | {args.batch} | {mrs_per_s:.2f} | {mrs_per_s * args.new_tokens:.1f} "
              f"| {speed[0]:.2f}x | {speed[1]:.2f}x |")
    print("\nMRs/s and tokens/s: wall-clock, median over MRs and rounds. vs generate(): one prompt at a time, "
          "the median over MRs and rounds of generate()'s time over ours on the same MR, timed back to back "
          "(batched rows: their median MRs/s over generate()'s); wall-clock and CPU time of this process.")
    for decoding in ("greedy", "beam 10") if args.slow_mrs else ():
        no_cache, cached = (decoding, "ours, no cache"), (decoding, "ours, KV cache")
        print(f"KV cache vs none, {decoding}: {ratio(no_cache, cached, 0):.1f}x "
              f"faster (wall), {ratio(no_cache, cached, 1):.1f}x (CPU); "
              f"{args.slow_mrs} MR(s) x {args.rounds} rounds")


def print_floors(floors: dict, seconds: dict, args) -> None:
    """How close each side runs to its matmuls alone, and the most any speed-up of our code around
    those matmuls could give over generate() (its time over our matmuls-only time)."""
    impl = {"ours": "ours, KV cache", "transformers": "transformers generate()"}
    print(f"\nThe weight matmuls alone of decoding one MR (`matmul_floor`), {args.threads} thread(s):\n")
    print("| decoding | model | matmuls alone, tokens/s | measured, tokens/s | time in matmuls |")
    print("| --- | --- | ---: | ---: | ---: |")
    for (decoding, name), times in floors.items():
        floor = statistics.median(times.values())
        measured = statistics.median(t[0] for t in seconds[decoding, impl[name]].values())
        print(f"| {decoding} | {name} | {args.new_tokens / floor:.1f} | {args.new_tokens / measured:.1f} "
              f"| {100 * floor / measured:.0f}% |")
    for decoding in ("greedy", "beam 10"):
        generate = seconds[decoding, impl["transformers"]]
        ceiling = statistics.median(generate[k][0] / floors[decoding, "ours"][k] for k in floors[decoding, "ours"])
        print(f"generate() time over our matmuls-only time, {decoding}: {ceiling:.2f}x "
              "(the most a faster decoding loop around our model could reach)")


if __name__ == "__main__":
    main()
