"""Every recipe in examples/ runs unchanged with stand-in launchers (tests/launchers.py): its torchrun/srun
line is parsed like torchrun would, and pretrain_gpt.py gets its exact flags plus --dry-run at the world
size the launch would have, so megaflow validates the configuration, builds every stage on the meta
device and prints the layout and memory per rank. Tokenizer and data files are not here: --vocab-size
stands in for the tokenizer."""
import os
import subprocess

import pytest

from tests.launch import ROOT
from tests.launchers import dry_run_path

EXAMPLES = os.path.join(ROOT, "examples")
COVERED = {"pretrain_llama3_8b.sh", "pretrain_llama3_8b.sbatch", "llama3_8b_flags.sh", "pretrain_gpt2_124m.sh",
           "quickstart_cpu.sh", "cpu_corpus.sh", "pretrain_qwen3_tiny_cpu.sh", "pretrain_deepseek_v3_tiny_cpu.sh",
           "pretrain_qwen3_8b.sh", "pretrain_deepseek_v3.sh"}


def run_example(tmp_path, script, env=None, vocab=None, args=()):
    bin_dir = dry_run_path(tmp_path)
    full_env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1",
                    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    DRY_RUN_EXTRA=f"--vocab-size {vocab}" if vocab else "", OUT=str(tmp_path / "out"),
                    **(env or {}))
    proc = subprocess.run(["bash", os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=240)
    launches = (tmp_path / "launches.log").read_text() if (tmp_path / "launches.log").exists() else ""
    return proc, launches


def test_every_example_is_covered_here():
    assert set(os.listdir(EXAMPLES)) == COVERED


def test_llama3_8b_torchrun_on_8_nodes(tmp_path):
    proc, launches = run_example(tmp_path, "pretrain_llama3_8b.sh", {"NNODES": "8", "MASTER_ADDR": "node0"},
                                 vocab=128256)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchrun --nnodes=8 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500" in launches
    out = proc.stdout
    assert "64 ranks = TP 8 x PP 4 x DP 2" in out and "2 model chunks per stage" in out
    # Llama-3-8B has 8,030,261,248; the vocabulary padded for TP 8 (128256 -> 129024) adds 2 x 768 x 4096
    assert "8,036,552,704 parameters" in out
    assert "stage 3: ranks 48-63 | chunk 0: layers 12-15; chunk 1: layers 28-31 + final norm" in out
    assert "dry run OK" in out


def test_llama3_8b_rejects_a_node_count_the_layout_cannot_use(tmp_path):
    proc, _ = run_example(tmp_path, "pretrain_llama3_8b.sh", {"NNODES": "6", "MASTER_ADDR": "node0"}, vocab=128256)
    assert proc.returncode == 2
    assert "world size 48 is not divisible by --tensor-model-parallel-size (8) × " \
           "--pipeline-model-parallel-size (4)" in proc.stderr


def test_llama3_8b_on_slurm(tmp_path):
    env = {"SLURM_NNODES": "16", "SLURM_JOB_NODELIST": "gpu[001-016]", "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": ROOT}
    proc, launches = run_example(tmp_path, "pretrain_llama3_8b.sbatch", env, vocab=128256)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "srun torchrun" in launches
    assert "--rdzv-endpoint=gpu1:29500 --rdzv-id=4242" in launches
    assert "128 ranks = TP 8 x PP 4 x DP 4" in proc.stdout and "dry run OK" in proc.stdout


def test_gpt2_124m_on_one_node(tmp_path):
    proc, launches = run_example(tmp_path, "pretrain_gpt2_124m.sh", {"GPUS": "8"}, vocab=50257)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--standalone=True" in launches
    assert "8 ranks = TP 1 x PP 1 x DP 8" in proc.stdout
    # GPT-2 small has 124,439,808; its vocabulary padded to 50304 adds 47 x 768
    assert "124,475,904 parameters" in proc.stdout


@pytest.mark.parametrize("script", ["quickstart_cpu.sh", "pretrain_qwen3_tiny_cpu.sh", "pretrain_deepseek_v3_tiny_cpu.sh"])
def test_cpu_recipes_flags(tmp_path, script):
    out = tmp_path / "out"  # outputs of the data steps (cpu_corpus.sh) exist: straight to training
    (out / "tokenizer").mkdir(parents=True)
    for name in ("corpus.jsonl", "tokenizer/tokenizer.json", "stdlib_text_document.idx"):
        (out / name).write_text("{}")
    proc, launches = run_example(tmp_path, script, vocab=4096)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 ranks = TP 1 x PP 1 x DP 1" in proc.stdout and "dry run OK" in proc.stdout
    assert "tool tools/generate.py flags=--load --prompt --max-new-tokens --greedy unknown=[]" in launches
    if script != "quickstart_cpu.sh":                             # and the Hugging Face export
        assert "tool tools/checkpoint/convert_to_hf.py flags=--load --save unknown=[]" in launches


def test_qwen3_8b_on_4_nodes(tmp_path):
    proc, launches = run_example(tmp_path, "pretrain_qwen3_8b.sh", {"MASTER_ADDR": "node0"}, vocab=151936)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchrun --nnodes=4 --nproc-per-node=8" in launches
    assert "32 ranks = TP 2 x PP 1 x DP 16" in proc.stdout and "dry run OK" in proc.stdout
    # transformers' Qwen3-8B shape has 8,190,735,360; the vocabulary padded for TP 2 (151936 -> 152064)
    # adds 2 x 128 x 4096
    assert "8,191,783,936 parameters" in proc.stdout


def test_deepseek_v3_on_128_nodes(tmp_path):
    proc, launches = run_example(tmp_path, "pretrain_deepseek_v3.sh", {"MASTER_ADDR": "node0"}, vocab=129280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchrun --nnodes=128 --nproc-per-node=8" in launches
    assert "1024 ranks = TP 1 x PP 16 x DP 64" in proc.stdout and "dry run OK" in proc.stdout
    assert "experts: 256 per MoE layer, 4 per EP rank" in proc.stdout
    # transformers' DeepseekV3ForCausalLM at this shape has 671,026,404,352 parameters (it has no MTP); the
    # MTP module adds a layer like transformers' MoE decoder layer (11,507,286,016 at this shape), two
    # norms, its final norm and its 2h -> h projection
    mtp = 11_507_286_016 + 3 * 7168 + 2 * 7168 * 7168
    assert f"{671_026_404_352 + mtp:,} parameters" in proc.stdout


@pytest.mark.parametrize("flag", ["--num-attention-heads 7", "--tensor-model-parallel-size 3"])
def test_a_bad_flag_fails_the_dry_run(tmp_path, flag):
    """Negative control: the stand-ins really run megaflow's validation."""
    proc, _ = run_example(tmp_path, "pretrain_gpt2_124m.sh", {"GPUS": "8"}, vocab=50257, args=flag.split())
    assert proc.returncode == 2, proc.stdout[-2000:]
