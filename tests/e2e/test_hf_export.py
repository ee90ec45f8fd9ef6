"""Trained checkpoints through the command-line tools: export, parity with transformers (logits and
32 greedy tokens), and back from HF into megaflow to continue training with --finetune."""
import shlex

import pytest
import torch

from megaflow.config import parse_args
from megaflow.inference.generation import generate, load_inference_model
from megaflow.parallel import state
from megaflow.training.trainer import pretrain
from tests.hf_helpers import TINY_GPT2, TINY_LLAMA, generated_ids, run_tool, train_tiny

import transformers  # a dev dependency: a missing one must fail, not skip

PROMPTS = [[10, 11, 12, 13, 14], [201, 7, 64, 3, 150, 22, 99, 5]]  # a "counting" one and a random one
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    for style, flags in (("llama", TINY_LLAMA), ("gpt2", TINY_GPT2)):
        train_tiny(root / style, flags, iters=20)
    return root


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_export_matches_transformers_logits_and_greedy_decoding(trained, tmp_path, style):
    ckpt, hf_dir = trained / style, tmp_path / "hf"
    run_tool("checkpoint/convert_to_hf.py", "--load", ckpt, "--save", hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
    hf.eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if style == "llama" else "GPT2LMHeadModel")
    cfg, model = load_inference_model(str(ckpt))
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, model(ids)[..., :cfg.vocab_size], rtol=1e-5, atol=1e-5)
        if i == 0:  # the command line once (a process start costs seconds), the same function after
            ours = generated_ids(run_tool("generate.py", "--load", ckpt, "--prompt-ids", " ".join(map(str, prompt)),
                                          "--max-new-tokens", NEW_TOKENS, "--greedy", "--ignore-eos"))
        else:
            ours = generate(model, prompt, NEW_TOKENS)
        theirs = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
        assert len(ours) == NEW_TOKENS and ours == theirs, (prompt, ours, theirs)


def _first_loss(*flags):
    args = ["--mock-data", "--num-workers", "0", "--seq-length", "64", "--micro-batch-size", "8",
            "--global-batch-size", "8", "--train-iters", "1", "--lr", "1e-4", "--eval-interval", "1000",
            "--log-interval", "1", "--hidden-dropout", "0", "--attention-dropout", "0", *map(str, flags)]
    try:
        return pretrain(parse_args(args)).losses[1]
    finally:
        state.destroy()


def test_hf_folder_converts_back_and_finetunes(trained, tmp_path):
    """HF -> megaflow (convert_from_hf's printed flags) -> --finetune starts from exactly the trained
    weights: its first loss equals fine-tuning the original checkpoint (fp32 export is lossless)."""
    hf_dir, ckpt = tmp_path / "hf", tmp_path / "from_hf"
    run_tool("checkpoint/convert_to_hf.py", "--load", trained / "llama", "--save", hf_dir)
    out = run_tool("checkpoint/convert_from_hf.py", "--load", hf_dir, "--save", ckpt,
                   "--tensor-model-parallel-size", 1, "--pipeline-model-parallel-size", 1)
    command = shlex.split(next(line for line in out.splitlines() if "pretrain_gpt.py" in line))
    assert command[:2] == ["python", "pretrain_gpt.py"]  # TP = PP = 1: one process, no torchrun
    flags = command[2:]
    smoke = ["--mock-data", "--seq-length", "128", "--micro-batch-size", "1", "--train-iters", "10"]
    assert flags[-3 - len(smoke):] == ["--load", str(ckpt), "--finetune"] + smoke
    flags = flags[:-len(smoke)]  # _first_loss brings its own data and iteration flags
    assert "HuggingFaceTokenizer" in flags  # the exported tokenizer.json stands in for NullTokenizer
    converted = _first_loss(*flags)
    original = _first_loss("--load", trained / "llama", "--finetune", "--tokenizer-type", "NullTokenizer",
                           "--vocab-size", 255, "--max-position-embeddings", 128, *TINY_LLAMA)
    assert converted == pytest.approx(original, abs=1e-5)
    assert converted < 4.5  # far below a fresh model's ~log(256) = 5.5: the weights were loaded
