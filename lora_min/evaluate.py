"""Decode an E2E split with the paper's beam search and score it with the five official metrics.

    python -m lora_min.evaluate --adapter runs/e2e/adapter.safetensors [--split test] [--limit 50]

One hypothesis per unique MR (the E2E scorer compares it with all of that MR's references), in
the order MRs first appear in the CSV. Prompts and references are in the text the adapter was
trained on: the paper's (lora_min.data.format_mr / format_ref: microsoft/LoRA's data/e2e/*.txt)
unless train.py ran with --text raw-csv (the official CSV text as it is). Written to --out
(default: eval/ beside the adapter, the folder train.py's own evaluation at the end of a run
writes, so it always holds the latest evaluation of that adapter; scores.json says which split,
text and decoding settings), each file atomically:

    predictions.txt   one hypothesis per line, one line per MR
    references.txt    each MR's references, one per line, a blank line between MRs
    scores.json       the five metrics in both conventions, the decoding settings, the paper's row

predictions.txt and references.txt are the layout tuetschek/e2e-metrics reads (microsoft/LoRA's
e2e_pred.txt and e2e_ref.txt), so the official scorer scores the same files independently:
`measure_scores.py references.txt predictions.txt -p` as the paper did (its Python BLEU/NIST:
"scores" in scores.json), without -p as the E2E challenge did (Perl mteval: "scores_perl").
train.py calls `evaluate_split` at the end of training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lora_min import decode
from lora_min.data import (TEXTS, decode_completion, encode_prompt, group_references, load_split,
                           references_for_scoring)
from lora_min.device import DEVICES, HALF_DTYPES, PRECISIONS, autocast_for, pick_device, pick_precision
from lora_min.fileio import atomic_write_text
from lora_min.flags import ConfigError, check_decoding_flags
from lora_min.metrics import PAPER_GPT2_M_LORA, e2e_scores_both, format_scores
from lora_min.model import GPT, GPTConfig
from lora_min.runlog import format_duration, show_progress


def evaluate_split(
    model: GPT,
    data_dir: str | Path | None,
    split: str = "test",
    out_dir: str | Path = "eval",
    *,
    beam_size: int = 10,
    max_new_tokens: int = 64,
    length_penalty: float = 0.9,
    no_repeat_ngram_size: int = 4,
    batch_size: int = 8,
    limit: int | None = None,
    greedy: bool = False,
    text: str = "paper",
) -> dict:
    """Decode every unique MR of `split` (the first `limit` only, if given), write predictions,
    references and scores.json to `out_dir`, and return what scores.json holds: "scores" as the
    paper computed them (lora_min.metrics.e2e_scores(..., mteval="python")), "scores_perl" as the
    E2E challenge's official scorer does (mteval="perl"), and the settings.

    data_dir: the folder with the E2E CSVs (see lora_min.data.resolve_e2e_dir; "demo" works).
    greedy: decode greedily instead of with beam search (the beam settings are then unused).
    text: "paper" (the paper's tokenized text) or "raw-csv", as the model was trained.
    For speed, merge the LoRA update into the weights first (model.merge_lora()).
    """
    groups = group_references(load_split(split, data_dir))[:limit]
    if not groups:
        raise ValueError(f"{split} split in {data_dir} has no MRs to decode (limit={limit})")
    settings = dict(method="greedy" if greedy else "beam search", max_new_tokens=max_new_tokens, batch_size=batch_size)
    if not greedy:
        settings.update(beam_size=beam_size, length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size)

    started = time.perf_counter()
    hypotheses = decode_mrs(model, [mr for mr, _ in groups], beam_size=beam_size, max_new_tokens=max_new_tokens,
                            length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                            batch_size=batch_size, greedy=greedy, text=text)
    decode_seconds = time.perf_counter() - started
    references = [[one_line(ref) for ref in references_for_scoring(refs, text, split)] for _, refs in groups]
    scores = e2e_scores_both(hypotheses, references)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.txt", "".join(h + "\n" for h in hypotheses))
    atomic_write_text(out / "references.txt", "\n".join("".join(r + "\n" for r in refs) for refs in references))
    summary = {"split": split, "mrs": len(groups), "text": text,
               "scores": scores["python"], "scores_perl": scores["perl"], "scoring": SCORING,
               "paper_gpt2_m_lora": PAPER_GPT2_M_LORA, "decoding": settings,
               "decode_seconds": round(decode_seconds, 2)}
    atomic_write_text(out / "scores.json", json.dumps(summary, indent=2) + "\n")
    return summary


SCORING = {  # what the two score sets in scores.json are
    "scores": "as the paper scored (Hu et al., 2021, Table 3; microsoft/LoRA): tuetschek/e2e-metrics "
              "measure_scores.py references.txt predictions.txt -p (BLEU and NIST from its Python mteval)",
    "scores_perl": "the E2E challenge's official scorer: measure_scores.py references.txt predictions.txt "
                   "(BLEU and NIST from mteval-v13a-sig.pl); METEOR, ROUGE_L and CIDEr are the same",
}


def decode_mrs(model: GPT, mrs: Sequence[str], *, beam_size: int = 10, max_new_tokens: int = 64,
               length_penalty: float = 0.9, no_repeat_ngram_size: int = 4, batch_size: int = 8,
               greedy: bool = False, progress: bool = True, text: str = "paper") -> list[str]:
    """One generated text per MR, on one line. Shows progress on stderr (the one at call time, so
    that contextlib.redirect_stderr catches it) unless progress=False."""
    prompts = [encode_prompt(mr, text) for mr in mrs]
    texts: list[str] = []
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        if greedy:
            new_tokens = decode.greedy(model, batch, max_new_tokens, batch_size=len(batch))
        else:
            new_tokens = decode.beam_search(model, batch, beam_size, max_new_tokens, length_penalty,
                                            no_repeat_ngram_size, batch_size=len(batch))
        texts += [one_line(decode_completion(tokens)) for tokens in new_tokens]
        if progress:
            done, rate = len(texts), len(texts) / max(time.perf_counter() - started, 1e-9)
            show_progress(sys.stderr, f"decoding: {done}/{len(prompts)} MRs, {rate:.2f} MRs/s, "
                                    f"{format_duration((len(prompts) - done) / rate)} left", done, len(prompts), start)
    return texts


def one_line(text: str) -> str:
    """Whitespace runs (newlines included) as single spaces: one text must be one line in the files."""
    return " ".join(text.split())


def paper_size_note(config: GPTConfig, base: str) -> str | None:
    """A warning when the model is not the size of the paper's row (GPT-2 M), else None."""
    size = config.size_name()
    if size == "gpt2-medium":
        return None
    ours = f"{size}, {config.n_layer} layers" if size else f"{config.n_layer} layers, {config.n_embd} wide"
    return (f"note: the model ({base}: {ours}) is not the paper's GPT-2 M (gpt2-medium, 24 layers), "
            "so its scores are not comparable with the paper row")


# -----------------------------------------------------------------------------
# Command line


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lora_min.evaluate",
        description="Load a base GPT-2 and a LoRA adapter, decode an E2E split, print the five metrics.")
    p.add_argument("--adapter", required=True, type=Path, help="adapter file written by train.py (.safetensors)")
    p.add_argument("--model", help="base model: gpt2, gpt2-medium, ..., demo, or a checkpoint path "
                                   "(default: the base named in the adapter file)")
    p.add_argument("--split", default="test", choices=["test", "dev"],
                   help="E2E split to decode (default: %(default)s)")
    p.add_argument("--data-dir", help="folder with the E2E CSVs, or 'demo' (default: the one the adapter was "
                                      "trained on if train.py was given one, else $LORA_MIN_E2E_DIR, else "
                                      "data/e2e, downloaded if missing)")
    p.add_argument("--limit", type=positive_int, help="decode only the first N MRs (default: all)")
    p.add_argument("--out", type=Path, help="output folder (default: eval/ beside the adapter, where train.py "
                                            "writes its evaluation; replaced if it exists)")
    p.add_argument("--text", choices=TEXTS,
                   help="the text to prompt and score with: the paper's tokenized text or raw-csv, the official "
                        "CSV text as it is (default: the one the adapter was trained on, else paper)")
    g = p.add_argument_group("decoding (defaults: the paper's Table 11)")
    g.add_argument("--beam-size", type=int, default=10, help="beams per MR (default: %(default)s)")
    g.add_argument("--length-penalty", type=float, default=0.9,
                   help="scores are divided by length ** this (default: %(default)s)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=4,
                   help="never repeat an n-gram of this size; 0 allows repeats (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=64,
                   help="longest text generated per MR (default: %(default)s)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam search")
    g.add_argument("--batch-size", type=int, default=8, help="MRs decoded side by side (default: %(default)s)")
    g.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto picks cuda, then mps, then cpu (default: %(default)s)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA GPUs that support it, fp16 on older ones, fp32 on CPU and MPS "
                        "(default: %(default)s)")
    args = p.parse_args(argv)
    if not args.adapter.is_file():
        p.error(f"--adapter {args.adapter}: no such file")
    try:
        check_decoding_flags(args.beam_size, args.max_new_tokens, args.length_penalty, args.no_repeat_ngram_size,
                             args.batch_size, "--batch-size")
        args.device = pick_device(args.device)
        args.precision = pick_precision(args.precision, args.device)
    except ConfigError as err:
        p.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from lora_min.adapters import model_from_adapter, read_adapter_metadata

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # every input checked before any decoding: a bad one is one line, not a traceback
        metadata = read_adapter_metadata(args.adapter)
        data_dir = args.data_dir or metadata.get("data_dir")  # by default, the data the adapter was trained on
        text = args.text or metadata.get("text", "paper")  # and the text it was trained on
        if text not in TEXTS:
            raise ValueError(f"{args.adapter}: its metadata names the text {text!r}, not one of {TEXTS}")
        load_split(args.split, data_dir, download=data_dir is None)  # as train.py: only data/e2e is downloaded into
        model = model_from_adapter(args.adapter, base=args.model).to(args.device).eval()
    except (OSError, ValueError, KeyError) as err:  # a malformed adapter or CSV, a missing base, a failed download
        print(f"python -m lora_min.evaluate: error: {err.args[0] if isinstance(err, KeyError) else err}",
              file=sys.stderr)
        return 2
    model.merge_lora()  # B A folded into the weights: decoding costs what the base model costs (§4.1)
    if args.precision in HALF_DTYPES:  # decoding reads every weight at every step: read them in bf16/fp16
        model.cast_frozen_base(HALF_DTYPES[args.precision])
    out = args.out or args.adapter.parent / "eval"
    with autocast_for(args.precision, args.device):  # as train.py evaluates
        scores = evaluate_split(
            model, data_dir, args.split, out, beam_size=args.beam_size, max_new_tokens=args.max_new_tokens,
            length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
            batch_size=args.batch_size, limit=args.limit, greedy=args.greedy, text=text)
    print(format_scores(scores["scores"], official=scores["scores_perl"]))
    print("(BLEU, METEOR, ROUGE-L x100)")
    note = paper_size_note(model.config, args.model or metadata["base_model"])
    if note:
        print(note)
    print(f"{args.split} split: predictions, references and scores.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
