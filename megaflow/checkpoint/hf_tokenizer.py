"""The tokenizer files of an exported Hugging Face folder, from the tokenizer a checkpoint trained with.

    NullTokenizer(V)          a WordLevel tokenizer.json with the same semantics: whitespace-separated
                              decimal ids "0".."V-1", and "<|endoftext|>" = the EOD id V (also the
                              unknown token). Servers then accept "12 7 99" as text and return ids
                              as text.
    HuggingFaceTokenizer,     the `tokenizers` object written as tokenizer.json (identical encoding),
    GPT2BPETokenizer          plus the source folder's tokenizer_config.json / special_tokens_map.json.
    SentencePieceTokenizer    the .model copied as tokenizer.model, with a LlamaTokenizer config.

tokenizer_config.json always names eos_token and carries a chat_template (vLLM's chat endpoint needs
one; a pretrained base model has no chat format of its own, so it is a plain transcript).
"""
from __future__ import annotations

import json
import os
import shutil

from megaflow.data.tokenizers import (GPT2BPETokenizer, HuggingFaceTokenizer, NullTokenizer,
                                      SentencePieceTokenizer, build_tokenizer)

NULL_EOD_TOKEN = "<|endoftext|>"
# Message contents only: for NullTokenizer models the contents are ids, and any other word would
# not be in the vocabulary.
IDS_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
TEXT_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
                      "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def export_tokenizer(data_cfg, out_dir: str, model_max_length: int) -> dict:
    """Write the tokenizer files into out_dir; returns {bos_token_id, eos_token_id, pad_token_id}."""
    tok = build_tokenizer(data_cfg)
    config = {"model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    if isinstance(tok, NullTokenizer):
        _null_tokenizer_json(tok).save(os.path.join(out_dir, "tokenizer.json"))
        config.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=NULL_EOD_TOKEN,
                      chat_template=IDS_CHAT_TEMPLATE)
        ids = {"bos_token_id": None, "eos_token_id": tok.eod}
    elif isinstance(tok, (HuggingFaceTokenizer, GPT2BPETokenizer)):
        tok._tok.save(os.path.join(out_dir, "tokenizer.json"))
        source = os.path.dirname(tok.path)
        config.update(_read_json(os.path.join(source, "tokenizer_config.json")))
        if isinstance(tok, HuggingFaceTokenizer) and not isinstance(tok, GPT2BPETokenizer):
            special_map = os.path.join(source, "special_tokens_map.json")
            if os.path.isfile(special_map):
                shutil.copyfile(special_map, os.path.join(out_dir, "special_tokens_map.json"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # loads any tokenizer.json as is
        config.setdefault("eos_token", tok._tok.id_to_token(tok.eod))
        config.setdefault("chat_template", TEXT_CHAT_TEMPLATE)
        ids = {"bos_token_id": _token_id(tok._tok.token_to_id, config.get("bos_token")), "eos_token_id": tok.eod}
    elif isinstance(tok, SentencePieceTokenizer):
        shutil.copyfile(tok.path, os.path.join(out_dir, "tokenizer.model"))
        sp = tok._sp
        bos = sp.bos_id()
        # megaflow encodes with plain sp.encode: no BOS/EOS added, so the HF side must not add them.
        config.update(tokenizer_class="LlamaTokenizer", add_bos_token=False, add_eos_token=False, legacy=True,
                      eos_token=sp.id_to_piece(tok.eod), bos_token=sp.id_to_piece(bos) if bos >= 0 else None,
                      unk_token=sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
                      chat_template=TEXT_CHAT_TEMPLATE)
        ids = {"bos_token_id": bos if bos >= 0 else None, "eos_token_id": tok.eod}
    else:
        raise ValueError(f"cannot export a {type(tok).__name__}")
    ids["pad_token_id"] = tok.pad if tok.pad >= 0 else None
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return ids


def _null_tokenizer_json(tok: NullTokenizer):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    vocab = {str(i): i for i in range(tok.eod)}
    vocab[NULL_EOD_TOKEN] = tok.eod
    # A word that is not an id reads as EOD rather than failing: servers encode probe text of their
    # own at start-up (vLLM's decision endpoint encodes "yes"/"no" labels for Qwen3, among others).
    t = Tokenizer(models.WordLevel(vocab, unk_token=NULL_EOD_TOKEN))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens([AddedToken(NULL_EOD_TOKEN, special=True)])
    return t


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _token_id(lookup, token):
    if isinstance(token, dict):
        token = token.get("content")
    return lookup(token) if token else None
