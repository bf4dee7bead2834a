"""lora_min/evaluate.py end to end on a tiny random model and the demo data (data/demo/)."""
import json

import pytest
import torch

import lora_min.metrics
from lora_min.adapters import export_merged, save_adapter
from lora_min.data import DEMO_DIR, group_references, read_e2e_csv, references_for_scoring
from lora_min.evaluate import decode_mrs, evaluate_split, main, one_line, paper_size_note
from lora_min.metrics import e2e_scores
from lora_min.model import GPT, GPTConfig, LoRAConfig

TINY = GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=50257, block_size=96)  # GPT-2's tokenizer
DECODING = dict(beam_size=2, max_new_tokens=6, batch_size=2)


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    """One thread (tiny models lose time waiting for a second one) and no Java: METEOR's jar takes
    a minute to start, and its scores are tested in test_metrics.py."""
    monkeypatch.setattr(lora_min.metrics, "meteor", lambda hyps, refs: (None, "not run in this test"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def demo_groups(limit: int) -> list[tuple[str, list[str]]]:
    return group_references(read_e2e_csv(DEMO_DIR / "testset_w_refs.csv"))[:limit]


def read_reference_groups(path) -> list[list[str]]:
    """references.txt read the way e2e-metrics' measure_scores.py reads it: blank lines split MRs."""
    groups = [[]]
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            groups[-1].append(line.strip())
        else:
            groups.append([])
    return [g for g in groups if g]


def test_evaluate_split_writes_the_scorer_layout_and_returns_the_scores(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    summary = evaluate_split(model, "demo", "test", tmp_path / "eval", limit=5, **DECODING)

    groups = demo_groups(5)
    predictions = (tmp_path / "eval" / "predictions.txt").read_text(encoding="utf-8").split("\n")
    assert predictions[-1] == "" and len(predictions[:-1]) == 5  # one line per MR, newline-terminated
    assert predictions[:-1] == decode_mrs(model, [mr for mr, _ in groups], batch_size=1, progress=False,
                                          **{k: v for k, v in DECODING.items() if k != "batch_size"})
    # the references as the paper's pipeline writes e2e_ref.txt: the paper's tokenized text
    paper_refs = [references_for_scoring(refs, "paper", "test") for _, refs in groups]
    assert read_reference_groups(tmp_path / "eval" / "references.txt") == paper_refs
    assert paper_refs[0][0].endswith("family friendly and has a high customer rating .")
    # the files scored as the paper scored them (-p) and as the challenge did (Perl)
    assert summary["scores"] == e2e_scores(predictions[:-1], paper_refs, mteval="python")
    assert summary["scores_perl"] == e2e_scores(predictions[:-1], paper_refs, mteval="perl")
    assert json.loads((tmp_path / "eval" / "scores.json").read_text()) == summary
    assert summary["mrs"] == 5 and summary["split"] == "test"
    assert "-p" in summary["scoring"]["scores"] and summary["text"] == "paper"
    assert summary["decoding"]["beam_size"] == 2 and summary["paper_gpt2_m_lora"]["BLEU"] == 0.704
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["predictions.txt", "references.txt",
                                                                    "scores.json"]  # no temp files left


def test_raw_csv_text_scores_against_the_csv_references(tmp_path):
    evaluate_split(GPT(TINY), "demo", "test", tmp_path, limit=3, max_new_tokens=3, greedy=True, text="raw-csv")
    assert read_reference_groups(tmp_path / "references.txt") == [[one_line(r) for r in refs]
                                                                   for _, refs in demo_groups(3)]
    assert json.loads((tmp_path / "scores.json").read_text())["text"] == "raw-csv"


def test_greedy_evaluation_records_its_method(tmp_path):
    evaluate_split(GPT(TINY), "demo", "dev", tmp_path, limit=2, max_new_tokens=4, greedy=True)
    decoding = json.loads((tmp_path / "scores.json").read_text())["decoding"]
    assert decoding["method"] == "greedy" and "beam_size" not in decoding


def test_texts_become_single_lines():
    assert one_line(" A pub.\n\nIt is\tcheap. ") == "A pub. It is cheap."


def test_command_line_loads_base_and_adapter_and_prints_the_paper_row(tmp_path, capsys):
    torch.manual_seed(0)
    export_merged(GPT(TINY), tmp_path / "base")
    model = GPT.from_pretrained(tmp_path / "base", lora=LoRAConfig(r=2, alpha=4))
    with torch.no_grad():
        for _, _, update in model.lora_updates():
            update.B.normal_()  # a non-zero update, so the adapter changes the outputs
    (tmp_path / "run").mkdir()
    save_adapter(model, tmp_path / "run" / "adapter.safetensors", base_model=str(tmp_path / "base"))

    argv = ["--adapter", str(tmp_path / "run" / "adapter.safetensors"), "--data-dir", "demo", "--limit", "3",
            "--beam", "2", "--max-new-tokens", "5", "--split", "dev"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "paper" in printed and "70.4" in printed and "CIDEr" in printed
    assert "measure_scores.py -p" in printed and "Perl" in printed  # which convention is which
    assert f"note: the model ({tmp_path / 'base'}: 1 layers, 8 wide) is not the paper's GPT-2 M" in printed
    out = tmp_path / "run" / "eval"  # the default: beside the adapter, where train.py writes its evaluation
    assert f"dev split: predictions, references and scores.json in {out}" in printed
    assert len((out / "predictions.txt").read_text().splitlines()) == 3

    model.merge_lora()  # what the command decodes with
    expected = decode_mrs(model, [mr for mr, _ in group_references(read_e2e_csv(DEMO_DIR / "devset.csv"))[:3]],
                          beam_size=2, max_new_tokens=5, progress=False)
    assert (out / "predictions.txt").read_text().splitlines() == expected


def test_command_line_names_a_missing_adapter(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--adapter", str(tmp_path / "nope.safetensors")])
    assert "nope.safetensors: no such file" in capsys.readouterr().err


def test_paper_size_note_only_for_other_sizes():
    assert paper_size_note(GPTConfig.from_name("gpt2-medium"), "gpt2-medium") is None
    assert paper_size_note(GPTConfig.from_name("gpt2"), "gpt2") == (
        "note: the model (gpt2: gpt2, 12 layers) is not the paper's GPT-2 M (gpt2-medium, 24 layers), "
        "so its scores are not comparable with the paper row")


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for default in ("(default: test)", "(default: 10)", "(default: 0.9)", "(default: 4)", "(default: 64)",
                    "(default: 8)", "(default: eval/ beside the adapter", "(default: auto)"):
        assert default in shown


def tiny_adapter(tmp_path):
    """An adapter file with a non-zero update on a tiny random base saved beside it."""
    torch.manual_seed(0)
    export_merged(GPT(TINY), tmp_path / "base")
    model = GPT.from_pretrained(tmp_path / "base", lora=LoRAConfig(r=2, alpha=4))
    with torch.no_grad():
        for _, _, update in model.lora_updates():
            update.B.normal_()
    save_adapter(model, tmp_path / "adapter.safetensors", base_model=str(tmp_path / "base"))
    return tmp_path / "adapter.safetensors", model


def test_command_line_scores_with_the_text_the_adapter_was_trained_on(tmp_path):
    _, model = tiny_adapter(tmp_path)
    save_adapter(model, tmp_path / "raw.safetensors", base_model=str(tmp_path / "base"),
                 extra_metadata={"text": "raw-csv"})  # what train.py --text raw-csv records
    for flags, expected in (([], "raw-csv"), (["--text", "paper"], "paper")):
        assert main(["--adapter", str(tmp_path / "raw.safetensors"), "--data-dir", "demo", "--limit", "1",
                     "--greedy", "--max-new-tokens", "2", *flags]) == 0
        assert json.loads((tmp_path / "eval" / "scores.json").read_text())["text"] == expected


def test_command_line_decodes_on_the_gpu_under_autocast_when_there_is_one(tmp_path, monkeypatch):
    import lora_min.evaluate

    adapter, _ = tiny_adapter(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU with bfloat16 tensor cores
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    moved_to, autocasts, seen = [], [], {}
    monkeypatch.setattr(GPT, "to", lambda self, device: moved_to.append(device) or self)  # no real GPU here

    class RecordedAutocast:
        def __init__(self, device_type, dtype):
            self.args = (device_type, dtype)

        def __enter__(self):
            autocasts.append(self.args)

        def __exit__(self, *exc_info):
            autocasts.pop()

    def recorded_evaluate_split(model, *args, **kwargs):
        seen.update(autocast=list(autocasts), weight_dtype=model.h[0].attn.c_attn.weight.dtype)
        return {"scores": e2e_scores(["a text"], [["a text"]], "python"), "scores_perl": e2e_scores(["a text"], [["a text"]])}

    monkeypatch.setattr(torch, "autocast", RecordedAutocast)
    monkeypatch.setattr(lora_min.evaluate, "evaluate_split", recorded_evaluate_split)
    assert main(["--adapter", str(adapter), "--data-dir", "demo", "--limit", "1"]) == 0
    assert moved_to == [torch.device("cuda:0")]
    assert seen == {"autocast": [("cuda", torch.bfloat16)], "weight_dtype": torch.bfloat16}


def test_command_line_decodes_in_bf16_on_the_cpu_too(tmp_path):
    adapter, model = tiny_adapter(tmp_path)
    argv = ["--adapter", str(adapter), "--data-dir", "demo", "--limit", "2", "--beam", "2", "--max-new-tokens", "4",
            "--device", "cpu", "--precision", "bf16", "--out", str(tmp_path / "eval")]
    assert main(argv) == 0
    model.merge_lora()
    model.cast_frozen_base(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = decode_mrs(model.eval(), [mr for mr, _ in demo_groups(2)], beam_size=2, max_new_tokens=4,
                              progress=False)
    assert (tmp_path / "eval" / "predictions.txt").read_text().splitlines() == expected


def test_a_missing_base_is_one_line_not_a_traceback(tmp_path, capsys):
    model = GPT(TINY, lora=LoRAConfig(r=2, alpha=4))
    save_adapter(model, tmp_path / "adapter.safetensors", base_model=str(tmp_path / "gone"))
    assert main(["--adapter", str(tmp_path / "adapter.safetensors"), "--data-dir", "demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m lora_min.evaluate: error: '{tmp_path / 'gone'}' is not an existing file")
    assert len(err.splitlines()) == 1 and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("flags, message", [(["--beam-size", "0"], "--beam-size must be a positive integer"),
                                            (["--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size must be >= 0"),
                                            (["--batch-size", "0"], "--batch-size must be a positive integer")])
def test_command_line_names_a_bad_decoding_flag(tmp_path, capsys, flags, message):
    adapter = tmp_path / "adapter.safetensors"
    adapter.write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["--adapter", str(adapter), *flags])
    assert message in capsys.readouterr().err


def test_a_missing_data_folder_is_one_line_before_any_work(tmp_path, capsys):
    model = GPT(TINY, lora=LoRAConfig(r=2, alpha=4))
    export_merged(GPT(TINY), tmp_path / "base")
    save_adapter(model, tmp_path / "adapter.safetensors", base_model=str(tmp_path / "base"))
    assert main(["--adapter", str(tmp_path / "adapter.safetensors"), "--data-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m lora_min.evaluate: error: {tmp_path / 'nope'} lacks trainset.csv")
    assert len(err.splitlines()) == 1 and not (tmp_path / "nope").exists()  # a named folder is never downloaded into
