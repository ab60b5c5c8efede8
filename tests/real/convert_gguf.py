"""Convert the Gemma GGUF to HF safetensors that vLLM can serve (vLLM 0.32 dropped GGUF).

Usage: ``python convert_gguf.py MODEL.gguf OUT_DIR``; runs inside vLLM's venv (transformers,
gguf, accelerate). Two fixes on top of transformers' own conversion, each one needed for Gemma to
produce sane text under vLLM:

- the converted tokenizer does not prepend ``<bos>``; without it Gemma degenerates, so a
  ``TemplateProcessing`` post-processor adds it (the completions endpoint tokenizes with special
  tokens on; chat requests get ``<bos>`` from the template's ``bos_token`` instead);
- ``<end_of_turn>`` ends a model turn but is not the GGUF's EOS: it is added as an extra EOS in
  ``generation_config.json``, or generation runs to ``max_tokens``;
- ``<think>`` and ``</think>`` become single tokens, as in Qwen3's tokenizer: vLLM's reasoning
  parsers look them up in the vocabulary, and once found there, a streamed reply's reasoning
  ends only at the ``</think>`` token (the same text written as ``<``, ``/``, ``think``, ``>`` is
  plain text). Gemma's vocabulary has thousands of reserved ``<unusedN>`` tokens; the first
  two are renamed, so the embedding matrix and the model's weights stay as they are. Like
  Qwen3's, they are not special tokens: ``skip_special_tokens`` keeps them in the text, and
  grammar-constrained decoding (``structured_outputs``) may write them as the text they stand
  for.

The base model has no chat template; the project's Hermes-style one is given at serve time
(``--chat-template``), so editing it does not remake this folder.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

#: the reasoning markers made single tokens, in the order the reserved tokens are taken
THINK_TOKENS = ("<think>", "</think>")
_RESERVED = re.compile(r"<unused(\d+)>")


def add_think_tokens(out: Path) -> dict[str, int]:
    """Rename the first reserved ``<unusedN>`` tokens of the saved tokenizer to
    :data:`THINK_TOKENS`, as non-special added tokens; returns their ids. Idempotent: a
    tokenizer that already has them keeps their ids."""
    tj_path = out / "tokenizer.json"
    tj = json.loads(tj_path.read_text())
    added = tj["added_tokens"]
    vocab = tj["model"]["vocab"]
    by_content = {a["content"]: a for a in added}
    free = sorted((a for a in added if _RESERVED.fullmatch(a["content"])),
                  key=lambda a: int(_RESERVED.fullmatch(a["content"])[1]))
    ids: dict[str, int] = {}
    for text in THINK_TOKENS:
        entry = by_content.get(text)
        if entry is None:
            if not free:
                raise SystemExit(f"no reserved <unusedN> token left for {text}")
            entry = free.pop(0)
            if isinstance(vocab, dict) and vocab.get(entry["content"]) == entry["id"]:
                del vocab[entry["content"]]
                vocab[text] = entry["id"]
            entry["content"] = text
        entry.update(special=False, normalized=False, lstrip=False, rstrip=False,
                     single_word=False)
        ids[text] = entry["id"]
    tj_path.write_text(json.dumps(tj, ensure_ascii=False))

    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    decoder = tc.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for text, tid in ids.items():
            entry = decoder.setdefault(str(tid), {})
            entry.update(content=text, special=False, normalized=False, lstrip=False,
                         rstrip=False, single_word=False)
    tc_path.write_text(json.dumps(tc, indent=1, ensure_ascii=False))
    return ids


def check_think_tokens(out: Path, ids: dict[str, int]) -> None:
    """The reloaded tokenizer has each marker as one token, in its vocabulary (where vLLM's
    reasoning parsers look), and keeps it when special tokens are skipped."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    for text, tid in ids.items():
        if vocab.get(text) != tid:
            raise SystemExit(f"{text} is not token {tid} in the vocabulary: {vocab.get(text)}")
        got = tok(f"a{text}b", add_special_tokens=False)["input_ids"]
        if got.count(tid) != 1:
            raise SystemExit(f"{text} does not tokenize to the single token {tid}: {got}")
        if tok.decode([tid], skip_special_tokens=True) != text:
            raise SystemExit(f"{text} is dropped when special tokens are skipped")


def main(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    kw: dict[str, object] = {}
    try:  # transformers 5.x keeps GGUF weights packed unless told to unpack them
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:  # older transformers always dequantize GGUF
        pass
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.bfloat16, **kw)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dense now: drop the GGUF marker that blocks save_pretrained
        quantizer.remove_quantization_config(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

    bos, eot = tok.bos_token or "<bos>", "<end_of_turn>"
    bos_id = tok.convert_tokens_to_ids(bos)
    eot_id = tok.convert_tokens_to_ids(eot)
    tj_path = out / "tokenizer.json"
    tj = json.loads(tj_path.read_text())
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    tj_path.write_text(json.dumps(tj, ensure_ascii=False))

    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["add_bos_token"] = True
    tc_path.write_text(json.dumps(tc, indent=1, ensure_ascii=False))

    gc_path = out / "generation_config.json"
    gc = json.loads(gc_path.read_text()) if gc_path.exists() else {}
    eos = gc.get("eos_token_id", model.config.eos_token_id)
    eos_ids = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
    if eot_id not in eos_ids:
        eos_ids.append(eot_id)
    gc["eos_token_id"] = eos_ids
    gc["bos_token_id"] = bos_id
    gc_path.write_text(json.dumps(gc, indent=1))

    think_ids = add_think_tokens(out)
    check = tok.__class__.from_pretrained(out)("Hello")["input_ids"]
    if not check or check[0] != bos_id:
        raise SystemExit(f"BOS fix did not take: 'Hello' tokenizes to {check[:5]}")
    check_think_tokens(out, think_ids)
    print(json.dumps({"bos_id": bos_id, "eos_ids": eos_ids, "think_ids": think_ids}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
