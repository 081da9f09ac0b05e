"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) from OpenAI's BPE vocabulary.

OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT licence) ships inside the open-clip-torch wheel:

    pip download open-clip-torch --no-deps -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python scripts/make_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

The output (pipeline/core/assets/tiny/tokenizer/) loads with `CLIPTokenizer.from_pretrained(dir)`
and is committed, so the runtime needs neither open-clip-torch nor a model hub.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "pipeline" / "core" / "assets" / "tiny" / "tokenizer"
NUM_MERGES = 49152 - 256 - 2  # as in OpenAI's simple_tokenizer.py
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

OPENAI_CLIP_LICENSE = """\
The files vocab.json and merges.txt in this folder are derived from OpenAI CLIP's BPE
vocabulary (bpe_simple_vocab_16e6.txt.gz, https://github.com/openai/CLIP), as redistributed
in the open-clip-torch wheel, by scripts/make_clip_tokenizer.py. That vocabulary is under
the following licence:

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "do_lower_case": True,
    "errors": "replace",
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": True,
    "bos_token": BOS,
    "eos_token": EOS,
    "unk_token": EOS,
    "pad_token": EOS,
}
SPECIAL_TOKENS_MAP = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def derive(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merge lines) exactly as OpenAI's SimpleTokenizer builds them."""
    with gzip.open(bpe_gz) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_gz} does not look like bpe_simple_vocab_16e6.txt.gz")
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"expected 49408 tokens, got {len(vocab)}")
    return vocab, merges


def write(bpe_gz: Path, out: Path) -> None:
    vocab, merges = derive(bpe_gz)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
    (out / "LICENSE").write_text(OPENAI_CLIP_LICENSE)


def check(out: Path) -> None:
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    expected = [49406, 320, 8853, 539, 320, 6829, 49407] + [49407] * 70
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        tok = cls.from_pretrained(str(out))
        ids = tok("A photograph of a puppy", padding="max_length", max_length=77).input_ids
        print(f"{cls.__name__} ({type(tok).__name__}): {ids[:8]} ... len {len(ids)}")
        if ids != expected:
            raise SystemExit(f"{cls.__name__} gave unexpected ids")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    write(args.bpe_gz, args.out)
    check(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
