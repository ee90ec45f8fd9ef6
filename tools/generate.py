"""Generate text from a megaflow checkpoint (any TP/PP layout; runs as one process).

    python tools/generate.py --load CKPT_DIR --prompt "Once upon a time" --max-new-tokens 64
    python tools/generate.py --load CKPT_DIR --prompt-ids "1 2 3" --max-new-tokens 32 --greedy
        -> prints `ids: 17 5 ...` (the generated ids only)

Greedy (--greedy, or --temperature 0) or sampling with --temperature/--top-k/--top-p and --seed;
a KV cache unless --no-kv-cache. Prints the prompt followed by the completion; stops at the tokenizer's
end-of-text token (not printed) unless --ignore-eos.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaflow.data.tokenizers import build_tokenizer  # noqa: E402
from megaflow.errors import UserError, naming, run_tool  # noqa: E402
from megaflow.inference.generation import generate, load_inference_model  # noqa: E402


def completion_text(tokenizer, prompt_ids, new_ids, eos) -> str:
    """The text the new ids add after the prompt. The end-of-document token ends the document, it is not
    text: it is dropped. Decoding prompt and completion together keeps the spacing a tokenizer puts
    between them (SentencePiece's word boundaries, NullTokenizer's spaces)."""
    if eos is not None and new_ids and new_ids[-1] == eos:
        new_ids = new_ids[:-1]
    prompt_text = tokenizer.detokenize(prompt_ids)
    full = tokenizer.detokenize(list(prompt_ids) + list(new_ids))
    return full[len(prompt_text):] if full.startswith(prompt_text) else tokenizer.detokenize(new_ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="megaflow checkpoint directory")
    p.add_argument("--iteration", type=int, default=None)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (tokenized with the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt as space-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer path, if not where the config says")
    args = p.parse_args(argv)

    with naming("--load", args.load):
        cfg, model = load_inference_model(args.load, args.iteration)
    if args.tokenizer_model:
        cfg.data.tokenizer_model = args.tokenizer_model
    tokenizer = build_tokenizer(cfg.data)
    ids = [int(x) for x in args.prompt_ids.split()] if args.prompt_ids is not None else tokenizer.tokenize(args.prompt)
    eos = None if args.ignore_eos else tokenizer.eod
    try:
        new = generate(model, ids, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, eos_id=eos, use_cache=not args.no_kv_cache,
                       seed=args.seed)
    except ValueError as e:  # an empty or too long prompt, a bad sampling setting
        raise UserError(str(e)) from None
    if args.prompt_ids is not None:
        print("ids: " + " ".join(map(str, new)))
    else:
        print(args.prompt + completion_text(tokenizer, ids, new, eos))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
