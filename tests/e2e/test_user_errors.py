"""Every command-line mistake of pretrain_gpt.py: one message naming the flag and the file, no traceback,
status 2, before the argument dump, before any process group or model, and no files written.

The entry point's main() runs in this process (a Python start costs seconds here); one torchrun launch
proves that two ranks print the message once and both leave with status 2."""
import importlib.util
import json
import os
import re
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megaflow.__main__ import main
from megaflow.data.indexed_dataset import IndexedDatasetBuilder
from megaflow.errors import run_tool
from megaflow.training import preflight  # noqa: F401  imported here: the time limit below is the checks'
from tests.launch import ROOT, torchrun

TINY = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--num-layers", "1", "--hidden-size", "32",
        "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2", "--num-workers", "0",
        "--train-iters", "1", "--log-interval", "1", "--eval-interval", "1000"]


def make_dataset(prefix: str, docs=((1, 2, 3, 4, 5) * 8, (7, 8, 9) * 9)) -> str:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(list(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of the TINY model after 1 iteration (lr 1e-3), saved by the entry point itself."""
    root = tmp_path_factory.mktemp("saved")
    assert main(TINY + ["--mock-data", "--lr", "1e-3", "--save", str(root / "ckpt")]) == 0
    return root / "ckpt"


@pytest.fixture
def outputs(tmp_path):
    """--save and --tensorboard-dir of the failing run: neither may exist afterwards."""
    return ["--save", str(tmp_path / "out" / "ckpt"), "--tensorboard-dir", str(tmp_path / "out" / "tb")]


class GPTBuilt(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """Building a GPT fails the test: the errors must come before any model exists."""
    from megaflow.model import gpt

    def refuse(*a, **k):
        raise GPTBuilt("a model was built")
    monkeypatch.setattr(gpt.GPTModel, "__init__", refuse)


def fails(capsys, tmp_path, argv, *needles, code=2):
    """Run main(argv); check the status, one message line holding every needle, no traceback, no argument
    dump, no process group, nothing under tmp_path/out, and a fast exit. Returns the message."""
    start = time.perf_counter()
    status = main([str(a) for a in argv])
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert status == code, (status, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megaflow: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in out + err and "megaflow arguments" not in out, out
    assert not dist.is_initialized()
    assert not os.path.exists(tmp_path / "out"), os.listdir(tmp_path / "out")
    assert elapsed < 5, elapsed
    return lines[0]


# -- data -----------------------------------------------------------------------------------------
def test_missing_data_prefix_names_flag_and_file(capsys, tmp_path, outputs, no_model):
    prefix = str(tmp_path / "corpus")
    fails(capsys, tmp_path, TINY + outputs + ["--data-path", prefix], "data error", f"--data-path {prefix}",
          f"{prefix}.idx and {prefix}.bin not found", "tools/preprocess_data.py")


def test_data_prefix_hints(capsys, tmp_path, outputs, no_model):
    make_dataset(str(tmp_path / "corpus_text_document"))
    msg = fails(capsys, tmp_path, TINY + outputs + ["--data-path", tmp_path / "corpus_text_document.bin"],
                "--data-path")
    assert f"give the prefix without .bin: {tmp_path / 'corpus_text_document'}" in msg
    msg = fails(capsys, tmp_path, TINY + outputs + ["--data-path", tmp_path / "corpus"], "--data-path")
    assert f"found {tmp_path / 'corpus_text_document'}" in msg
    fails(capsys, tmp_path, TINY + outputs + ["--train-data-path", tmp_path / "nowhere" / "x"],
          "--train-data-path", f"the folder {tmp_path / 'nowhere'} does not exist")


@pytest.mark.parametrize("damage,needles", [
    (lambda idx: b"", ["empty file (0 bytes)", "expected an MMIDIDX index"]),
    (lambda idx: idx[:20], ["truncated: 20 bytes, expected at least the 34-byte header"]),
    (lambda idx: idx[:60], ["truncated: the header promises 2 sequences and 3 document boundaries (82 bytes), "
                            "the file has 60 bytes"]),
    (lambda idx: b'{"text": "a corpus line"}\n' * 3, ["not an MMIDIDX index file", "expected the bytes",
                                                       "found b'{\"text\": '", "JSON text"]),
    (lambda idx: idx[:9] + (7).to_bytes(8, "little") + idx[17:], ["unsupported index version 7 (expected 1)"]),
])
def test_damaged_or_foreign_index(capsys, tmp_path, outputs, no_model, damage, needles):
    prefix = make_dataset(str(tmp_path / "d"))
    with open(prefix + ".idx", "rb") as fh:
        raw = fh.read()
    with open(prefix + ".idx", "wb") as fh:
        fh.write(damage(raw))
    fails(capsys, tmp_path, TINY + outputs + ["--data-path", prefix], "data error", f"--data-path {prefix}",
          f"{prefix}.idx", *needles)


def test_truncated_bin_and_unreadable_files(capsys, tmp_path, outputs, no_model):
    prefix = make_dataset(str(tmp_path / "d"))
    os.truncate(prefix + ".bin", 10)
    fails(capsys, tmp_path, TINY + outputs + ["--data-path", prefix], f"{prefix}.bin: truncated",
          "indexes 134 bytes of tokens, the file has 10 bytes")
    os.remove(prefix + ".idx")
    os.mkdir(prefix + ".idx")
    fails(capsys, tmp_path, TINY + outputs + ["--data-path", prefix], f"{prefix}.idx is not a file")


def test_no_data_at_all(capsys, tmp_path, outputs, no_model):
    fails(capsys, tmp_path, TINY + outputs, "no training data", "--data-path", "--mock-data")


# -- tokenizer ------------------------------------------------------------------------------------
def test_missing_or_broken_tokenizer_files(capsys, tmp_path, outputs, no_model):
    base = TINY + outputs + ["--mock-data"]
    fails(capsys, tmp_path, base + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                    tmp_path / "tok"], "tokenizer error", f"--tokenizer-model {tmp_path / 'tok'}")
    fails(capsys, tmp_path, base + ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                                    tmp_path / "sp.model"], f"--tokenizer-model {tmp_path / 'sp.model'}: no such file")
    fails(capsys, tmp_path, base + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", tmp_path / "vocab.json",
                                    "--merge-file", tmp_path / "merges.txt"], f"--vocab-file {tmp_path / 'vocab.json'}")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
    fails(capsys, tmp_path, base + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                    tmp_path / "tokenizer.json"],
          f"--tokenizer-model {tmp_path / 'tokenizer.json'}: cannot be read as a HuggingFaceTokenizer")


# -- --load -----------------------------------------------------------------------------------------
def test_load_of_a_missing_or_empty_directory(capsys, tmp_path, outputs, no_model):
    base = TINY + outputs + ["--mock-data"]
    fails(capsys, tmp_path, base + ["--load", tmp_path / "nope"], "checkpoint error",
          f"--load {tmp_path / 'nope'}: no such directory")
    (tmp_path / "empty").mkdir()
    fails(capsys, tmp_path, base + ["--load", tmp_path / "empty"],
          f"--load {tmp_path / 'empty'}: no latest_checkpointed_iteration.txt")


def test_load_of_a_hugging_face_folder_points_to_the_converter(capsys, tmp_path, outputs, no_model):
    from safetensors.torch import save_file
    hf = tmp_path / "llama-hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file({"lm_head.weight": torch.zeros(4, 4)}, str(hf / "model.safetensors"))
    msg = fails(capsys, tmp_path, TINY + outputs + ["--mock-data", "--load", hf, "--tensor-model-parallel-size", 1],
                f"--load {hf}: a Hugging Face model folder")
    command = re.search(r"convert it first: (python .*?) and pass", msg).group(1)
    assert command == (f"python tools/checkpoint/convert_from_hf.py --load {hf} --save {hf}-megaflow "
                       "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1")
    assert os.path.isfile(os.path.join(ROOT, "tools/checkpoint/convert_from_hf.py"))


def test_checkpoint_of_another_model_names_the_fields(capsys, tmp_path, saved, outputs, no_model):
    argv = TINY + outputs + ["--mock-data", "--load", saved]
    argv[argv.index("--num-layers") + 1] = "2"
    argv[argv.index("--hidden-size") + 1] = "64"
    argv[argv.index("--vocab-size") + 1] = "100"
    fails(capsys, tmp_path, argv, f"--load {saved}: the checkpoint holds another model",
          "--num-layers 1 → 2", "--hidden-size 32 → 64", "--ffn-hidden-size 128 → 256",
          "vocabulary size (--vocab-size or the tokenizer's) 129 → 101", f"{saved}/iter_0000001/config.json")


def test_resume_with_another_optimizer(capsys, tmp_path, saved, outputs, no_model):
    fails(capsys, tmp_path, TINY + outputs + ["--mock-data", "--load", saved, "--optimizer", "sgd"],
          f"--load {saved}: holds AdamW optimizer state, this run uses --optimizer sgd (SGD); add --no-load-optim")


def test_truncated_checkpoint_file(capsys, tmp_path, saved, outputs, no_model):
    import shutil
    copy = tmp_path / "ckpt"
    shutil.copytree(saved, copy)
    rank_file = copy / "iter_0000001" / "mp_rank_00_000_dp000.safetensors"
    os.truncate(rank_file, 100)
    fails(capsys, tmp_path, TINY + outputs + ["--mock-data", "--load", copy],
          f"--load {copy}: {rank_file} is truncated or modified (100 bytes")


# -- flags ----------------------------------------------------------------------------------------
def test_tp_that_does_not_divide_the_heads_is_named_before_the_world_size(capsys, tmp_path, outputs, no_model):
    fails(capsys, tmp_path, TINY + outputs + ["--mock-data", "--tensor-model-parallel-size", 3],
          "configuration error", "--num-attention-heads (2) must be divisible by --tensor-model-parallel-size (3)")


def test_unknown_flags_and_bad_values(capsys, tmp_path, outputs, no_model):
    fails(capsys, tmp_path, TINY + outputs + ["--mock-data", "--num-layer", 2, "--tensorboard_dir", "x"],
          "unknown flags --num-layer (did you mean --num-layers?), --tensorboard_dir (did you mean "
          "--tensorboard-dir?)")
    fails(capsys, tmp_path, TINY + outputs + ["--mock-data", "--use-mcore-models"], "unknown flag --use-mcore-models;")
    fails(capsys, tmp_path, TINY + outputs + ["--mock-data", "--num-layers", "two"],
          "argument --num-layers: invalid int value: 'two'")
    fails(capsys, tmp_path, TINY + outputs + ["--mock-data", "--lr-decay-style", "cosin"],
          "argument --lr-decay-style: invalid choice: 'cosin'")
    (tmp_path / "run.yaml").write_text("model:\n  num_layer: 2\n")
    fails(capsys, tmp_path, TINY + outputs + ["--mock-data", "--config", tmp_path / "run.yaml"],
          f"--config {tmp_path / 'run.yaml'}: unknown setting 'num_layer' (did you mean 'num_layers'?)")


def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch, no_model):
    argv = TINY + ["--data-path", str(tmp_path / "nope")]
    for extra, env in ((["--debug"], None), ([], "1")):
        if env:
            monkeypatch.setenv("MEGAFLOW_DEBUG", env)
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "preflight.py" in err
        assert err.strip().splitlines()[-1].startswith("megaflow: data error: --data-path")


def test_failed_run_leaves_no_tensorboard_files(tmp_path):
    """A failure after the trainer started (here: data read only by the trainer, the preflight bypassed)
    leaves the TensorBoard directory uncreated: the writer opens at the first scalar."""
    from megaflow.config import parse_args
    from megaflow.parallel import state
    from megaflow.training.trainer import pretrain
    cfg = parse_args(TINY + ["--data-path", str(tmp_path / "nope"), "--tensorboard-dir", str(tmp_path / "tb")])
    try:
        with pytest.raises(FileNotFoundError):
            pretrain(cfg)
    finally:
        state.destroy()
    assert not os.path.exists(tmp_path / "tb")


# -- tools ----------------------------------------------------------------------------------------
def test_tools_report_one_line_naming_the_flag(capsys, tmp_path):
    nope, out = tmp_path / "nope", tmp_path / "out"
    for script, argv, message in (
            ("tools/checkpoint/convert_to_hf.py", ["--load", nope, "--save", out],
             f"convert_to_hf.py: checkpoint error: --load {nope}: no such checkpoint directory"),
            ("tools/checkpoint/reshard.py", ["--load", nope, "--save", out],
             f"reshard.py: checkpoint error: --load {nope}: no such checkpoint directory"),
            ("tools/generate.py", ["--load", nope, "--prompt", "x"],
             f"generate.py: checkpoint error: --load {nope}: no such checkpoint directory"),
            ("tools/checkpoint/convert_from_hf.py", ["--load", nope, "--save", out],
             f"convert_from_hf.py: error: --load {nope}: no config.json (not a Hugging Face model folder)")):
        spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], os.path.join(ROOT, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert run_tool(module.main, [str(a) for a in argv], prog=os.path.basename(script)) == 2
        captured = capsys.readouterr()
        assert captured.err == message + "\n" and "Traceback" not in captured.out
        assert not os.path.exists(out)


# -- torchrun: printed once ------------------------------------------------------------------------
def test_message_printed_once_under_torchrun(tmp_path):
    prefix = str(tmp_path / "missing")
    proc = torchrun(os.path.join(ROOT, "pretrain_gpt.py"), 2, TINY + ["--data-path", prefix], check=False,
                    timeout=120)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("megaflow")]
    expected = (f"megaflow: data error: --data-path {prefix}: {prefix}.idx and {prefix}.bin not found; create it "
                "with tools/preprocess_data.py --input CORPUS.jsonl --output-prefix ... (docs/data.md)")
    assert ours == [expected], proc.stderr
    assert proc.returncode != 0
    # torchrun's failure summary lists each worker's status: both left with 2, none was killed.
    assert re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", proc.stderr, re.MULTILINE) == ["2", "2"], proc.stderr
    assert "megaflow/" not in "".join(line for line in proc.stderr.splitlines() if line.strip().startswith("File"))
