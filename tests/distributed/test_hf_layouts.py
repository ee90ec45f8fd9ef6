"""Checkpoints written by 4 ranks at TP=2 x PP=2 read back as the single-process model, and export to
HF folders whose logits match it. Initialisation is layout-independent (model/init.py): the same
seed gives the same full weights at any layout, so the single-process model is the reference.
A checkpoint trained at TP=2 x PP=2 exports to a folder computing the logits of that checkpoint loaded
into one process."""
import os

import pytest
import torch

from megaflow.checkpoint import load_checkpoint
from megaflow.checkpoint.convert import export_to_hf
from megaflow.checkpoint.full_state import load_full_state_dict
from megaflow.config import parse_args, set_vocab_size
from megaflow.model import build_model, global_named_parameters
from megaflow.parallel import state
from tests.hf_helpers import TINY_GPT2
from tests.launch import ROOT, torchrun

import transformers  # a dev dependency: a missing one must fail, not skip

COMMON = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "299", "--seq-length", "32",
          "--num-layers", "4", "--init-method-std", "0.1", "--micro-batch-size", "1"]
FLAGS = {"llama": ["--model-style", "llama", "--hidden-size", "64", "--num-attention-heads", "4",
                   "--group-query-attention", "--num-query-groups", "2"] + COMMON,
         "gpt2": TINY_GPT2 + COMMON}  # the later --num-layers wins


@pytest.mark.slow
def test_tp2_pp2_checkpoints_read_and_export_like_one_process(tmp_path):
    worker = os.path.join(ROOT, "tests", "distributed", "hf_layout_worker.py")
    torchrun(worker, 4, [tmp_path, " ".join(FLAGS["llama"]), " ".join(FLAGS["gpt2"])], timeout=300)
    for name, flags in FLAGS.items():
        ckpt = tmp_path / name
        assert sorted(os.listdir(ckpt / "iter_0000003"))[2:] == [
            f"mp_rank_{t:02d}_{p:03d}_dp000.safetensors" for t in range(2) for p in range(2)]
        cfg, full = load_full_state_dict(str(ckpt))
        single_cfg = parse_args(flags)
        set_vocab_size(single_cfg, cfg.vocab_size)
        state.destroy()
        reference = build_model(single_cfg).eval()
        ref = dict(global_named_parameters(reference))
        if name == "llama":
            ref_llama = {k: v.clone() for k, v in ref.items()}
        assert set(full) == set(ref)
        vocab = cfg.vocab_size  # padded to 384 at TP=1 and 512 at TP=2: compare the real rows
        for key, t in ref.items():
            assert torch.equal(full[key][:vocab], t[:vocab]), (name, key)
        export_to_hf(str(ckpt), str(tmp_path / f"{name}_hf"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}_hf", dtype=torch.float32,
                                                               local_files_only=True).eval()
        ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, reference(ids)[..., :vocab], rtol=1e-5, atol=1e-5)

    single_cfg = parse_args(FLAGS["llama"])
    set_vocab_size(single_cfg, cfg.vocab_size)
    state.destroy()
    trained = build_model(single_cfg).eval()
    info = load_checkpoint(str(tmp_path / "trained"), trained, load_rng=False)
    assert info["iteration"] == 5 and info["layout"]["pp"] == 2
    assert not torch.equal(dict(global_named_parameters(trained))["layers.3.mlp.linear_fc2.weight"],
                           ref_llama["layers.3.mlp.linear_fc2.weight"])       # it did train
    export_to_hf(str(tmp_path / "trained"), str(tmp_path / "trained_hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "trained_hf", dtype=torch.float32,
                                                           local_files_only=True).eval()
    ids = torch.randint(0, single_cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trained(ids)[..., :single_cfg.vocab_size],
                                   rtol=1e-5, atol=1e-5)
