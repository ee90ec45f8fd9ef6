"""What a run and the tools print for a user to act on: the argument dump (changes only; the full set in
TensorBoard and the checkpoint), a resume that changes the schedule, convert_from_hf's next command
(runnable as printed), generate.py's text, and a bench script started without torchrun.

Entry points run in this process (a Python start costs seconds here)."""
import glob
import importlib.util
import os
import shlex

import pytest
import torch

from megaflow.__main__ import main as pretrain_main
from megaflow.config import parse_args
from tests.launch import ROOT

TINY = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--num-layers", "1",
        "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2",
        "--num-workers", "0", "--log-interval", "1", "--eval-interval", "1000"]


def load_script(relpath: str):
    spec = importlib.util.spec_from_file_location(relpath.replace("/", "_")[:-3], os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dump_of(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    a = lines.index("------------------------ megaflow arguments ------------------------")
    b = lines.index("-------------------- end of megaflow arguments ---------------------")
    return lines[a + 1:b]


def test_dump_shows_changes_full_set_in_tensorboard_and_resume_names_schedule_changes(tmp_path, capsys):
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    assert pretrain_main(TINY + ["--train-iters", "1", "--lr", "1e-3", "--save", str(ckpt),
                                 "--tensorboard-dir", str(tb)]) == 0
    dump = dump_of(capsys.readouterr().out)
    names = [line.split()[0] for line in dump]
    for changed in ("num_layers", "hidden_size", "lr", "train_iters", "save", "tensorboard_dir", "mock_data"):
        assert changed in names, (changed, dump)
    for default in ("adam_beta1", "weight_decay", "tensor_model_parallel_size", "init_method_std", "split"):
        assert default not in names, (default, dump)
    assert any(line.strip().startswith(f"lr {'.' * 10}") and line.endswith(" 0.001") for line in dump)
    assert dump[-1].strip().startswith("(") and "more at their defaults, which --help lists; all settings: " \
        f"{ckpt}/iter_*/config.json, TensorBoard text 'arguments' in {tb})" in dump[-1]
    events = glob.glob(str(tb / "events.out.tfevents.*"))
    assert len(events) == 1
    with open(events[0], "rb") as fh:
        raw = fh.read()
    assert b"adam_beta1" in raw and b"init_method_std" in raw  # the full set, defaults included

    assert pretrain_main(TINY + ["--train-iters", "2", "--lr", "2e-3", "--load", str(ckpt)]) == 0
    out = capsys.readouterr().out
    note = [line for line in out.splitlines() if line.startswith("NOTE: ")]
    assert note == ["NOTE: the schedule differs from the checkpoint's: --train-iters 1 → 2, --lr 0.001 → 0.002 "
                    "(the new values apply; the learning-rate schedule continues from the checkpoint's step count)"]
    assert "iteration        2/       2" in out


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    import transformers
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=250, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_convert_from_hf_prints_a_command_that_runs_as_printed(hf_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # where the docs run it from; the script path is printed relative to it
    convert = load_script("tools/checkpoint/convert_from_hf.py")
    commands = {}
    for tp in (1, 2):
        save = str(tmp_path / f"tp{tp}")
        assert convert.main(["--load", str(hf_folder), "--save", save, "--tensor-model-parallel-size", str(tp)]) == 0
        out = capsys.readouterr().out
        commands[tp] = shlex.split(out.splitlines()[-1])
    one, two = commands[1], commands[2]
    assert one[:2] == ["python", "pretrain_gpt.py"] and two[:3] == ["torchrun", "--nproc-per-node=2", "pretrain_gpt.py"]
    assert one[one.index("--load") + 1] == str(tmp_path / "tp1") and "--finetune" in one
    # TP=2: the printed flags pass every start-up check (flags, layout, checkpoint shape) at 2 processes.
    from megaflow.training.preflight import check
    check(parse_args(two[3:], world_size=2))
    # TP=1: run exactly as printed.
    assert pretrain_main(one[2:]) == 0
    out = capsys.readouterr().out
    assert "loaded checkpoint from" in out and "iteration       10/      10" in out


def test_generate_prints_prompt_and_completion_without_the_end_of_document_text(hf_folder, tmp_path, capsys,
                                                                                  monkeypatch):
    convert, generate = load_script("tools/checkpoint/convert_from_hf.py"), load_script("tools/generate.py")
    ckpt = str(tmp_path / "ckpt")
    assert convert.main(["--load", str(hf_folder), "--save", ckpt]) == 0
    capsys.readouterr()
    # The real model, greedy, three tokens: one line, the prompt then the completion.
    assert generate.main(["--load", ckpt, "--prompt", "1 2 3", "--max-new-tokens", "3", "--greedy",
                          "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("1 2 3 ") and len(out.split()) == 6, repr(out)
    # When the model ends the document (the NullTokenizer's EOD is id 249), its id is not printed as text.
    monkeypatch.setattr(generate, "generate", lambda *a, **k: [4, 5, 249])
    assert generate.main(["--load", ckpt, "--prompt", "1 2 3", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == "1 2 3 4 5\n"


def test_completion_text_with_a_real_tokenizer(tmp_path):
    from megaflow.data.tokenizers import HuggingFaceTokenizer
    from tests.data_helpers import train_hf_bpe
    generate = load_script("tools/generate.py")
    tok = HuggingFaceTokenizer(os.path.dirname(train_hf_bpe(str(tmp_path / "tok"))))
    prompt = tok.tokenize("the data")
    new = tok.tokenize(" model was\nthe loss") + [tok.eod]
    text = generate.completion_text(tok, prompt, new, tok.eod)
    assert text == " model was\nthe loss"
    assert generate.completion_text(tok, prompt, new, None).endswith("<|endoftext|>")  # --ignore-eos


def test_bench_that_needs_torchrun_says_so(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    bench = load_script("bench/pipeline_bubble.py")
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs torchrun" in err and "torchrun --nproc-per-node 4" in err
