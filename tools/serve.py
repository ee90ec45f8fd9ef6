"""Serve a model with vLLM's OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models).

    python tools/serve.py --model HF_DIR [--port 8000] [--tensor-parallel-size N]
    python tools/serve.py --load CKPT_DIR [--iteration N]      # a megaflow checkpoint, exported first
    python tools/serve.py --model HF_DIR -- --max-num-seqs 4   # anything after -- goes to vLLM

Binds 127.0.0.1 unless --host says otherwise (the server has no authentication). vLLM runs from its
own virtualenv, created on first use (megaflow/serving/vllm_env.py). See docs/serving.md.
"""
import argparse
import os
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaflow.errors import naming, run_tool  # noqa: E402
from megaflow.serving.server import VLLMServer  # noqa: E402


def _interrupt(signum, frame):
    """SIGTERM ends the server (and removes a temporary export) the way Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="exported Hugging Face folder")
    src.add_argument("--load", help="megaflow checkpoint directory (exported to --export-dir first)")
    p.add_argument("--iteration", type=int, default=None, help="with --load: iteration (default latest)")
    p.add_argument("--export-dir", default=None, help="with --load: where to export (default: a temporary "
                   "folder removed on exit)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="vLLM --dtype (default: the folder's own dtype; with --load, the export's, float32)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor-parallel size")
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: the path)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true", help="skip graph compilation (faster start on CPU)")
    args = p.parse_args(argv)

    tmp = None
    model_dir = args.model
    if args.load:
        from megaflow.checkpoint.convert import export_to_hf
        if args.export_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="megaflow-serve-")
        model_dir = args.export_dir or tmp.name
        export_dtype = args.dtype if args.dtype not in (None, "auto") else "float32"
        with naming("--load", args.load):
            export_to_hf(args.load, model_dir, args.iteration, dtype=export_dtype)
        print(f"exported {args.load} to {model_dir}", flush=True)
    server = VLLMServer(model_dir, host=args.host, port=args.port, tensor_parallel_size=args.tensor_parallel_size,
                        served_model_name=args.served_model_name, dtype=args.dtype,
                        max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, extra_args=extra)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.start(new_session=False)
        print(f"vLLM serving {model_dir} at {server.url}/v1", flush=True)
        return server.proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(run_tool(main))
