"""Write a tiny random-weight llama GGUF that a real ``llama-server`` loads and runs.

Two layers, 64 dimensions, 4 heads, f32: a few MB, loaded in well under a second, and with
``temperature: 0`` its answers are fixed, so a direct and a proxied call can be compared byte
for byte. What it says is noise; what matters is that it is llama.cpp's own code producing the
wire format, the logprobs and the token ids. The tokenizer is a byte-level BPE ("gpt2" in
GGUF terms) of 400 tokens trained here on one paragraph, so every byte is a token and text the
paragraph rarely has (accents, CJK, emoji) is split into byte tokens, the case where
llama.cpp's logprobs skip entries. ChatML template, ``<|im_end|>`` as end of sequence.

    PYTHONPATH=$LLAMA_CPP/gguf-py python make_tiny.py --out tiny.gguf

Needs numpy, tokenizers and llama.cpp's ``gguf-py`` (which needs pyyaml and tqdm).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf  # llama.cpp's gguf-py, from PYTHONPATH
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = """The quick brown fox jumps over the lazy dog. A wire format is the exact sequence of bytes
that a server sends to a client. Auditors want to know what a model was asked and what it said.
Every exchange with a language model becomes one record in a ledger, chained by hashes and
signed by checkpoints, so that nobody can edit the record without being caught.
Hello, how are you today? I am fine, thank you. The weather is nice and the sky is blue.
Once upon a time there was a little robot who liked to count tokens. It counted one, two,
three, four, five, six, seven, eight, nine, ten, and then it started again from the beginning.
Numbers like 12345 and 2026 appear in text, as do symbols such as @, #, $, %, & and *.
The server answers in JSON; streaming answers arrive as server-sent events, one data line each.
Un café crème à Zürich, s'il vous plaît: déjà vu, naïve façade, señor, smørrebrød.
東京の天気は晴れです。你好，世界。 The robot waved 👋 and smiled 🙂 at the café.
"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
N_VOCAB, N_EMBD, N_HEAD, N_LAYER, N_FF, N_CTX = 400, 64, 4, 2, 128, 2048


def train_tokenizer() -> tuple[list[str], list[str]]:
    """The vocabulary (indexed by id) and merges of a byte-level BPE trained on ``TEXT``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=N_VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 3, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [""] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def write_model(out: Path, tokens: list[str], merges: list[str]) -> None:
    """The GGUF: hyperparameters, tokenizer, and seeded random f32 weights."""
    ids = {t: i for i, t in enumerate(tokens)}
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["<|endoftext|>"])
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    def ones() -> np.ndarray:
        return np.ones(N_EMBD, np.float32)

    w.add_tensor("token_embd.weight", rand(len(tokens), N_EMBD))
    w.add_tensor("output_norm.weight", ones())
    w.add_tensor("output.weight", rand(len(tokens), N_EMBD))
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones())
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + name + ".weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(p + "ffn_norm.weight", ones())
        w.add_tensor(p + "ffn_gate.weight", rand(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_up.weight", rand(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_down.weight", rand(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tiny.gguf"))
    args = parser.parse_args()
    tokens, merges = train_tokenizer()
    write_model(args.out, tokens, merges)
    print(f"{args.out}: {len(tokens)} tokens, {len(merges)} merges")


if __name__ == "__main__":
    main()
