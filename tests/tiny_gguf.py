"""A tiny random-weight llama GGUF with a real byte-level tokenizer, written with gguf.GGUFWriter.

The model is meant for tests of the llama.cpp backend: it loads in milliseconds, and
llama.cpp can tokenize any UTF-8 text with it, detokenize, generate and embed.

Tokenizer: GPT-2 style byte-level BPE (``tokenizer.ggml.model = "gpt2"``). All 256 bytes are
tokens (in GPT-2's byte-to-unicode spelling), so every UTF-8 string tokenizes with no unknown
tokens and detokenizes back byte for byte. The pre-tokenizer is ``"qwen2"`` (the ChatML family;
digits split one by one) rather than ``"default"``: llama.cpp's ``"default"`` and ``"gpt-2"``
pre-tokenizers turn on clean_up_tokenization_spaces, so ``llama_detokenize`` would turn
``"a , b"`` into ``"a, b"``; with ``"qwen2"`` both it and ``llama_token_to_piece`` give back
the exact bytes. The merges are learned deterministically (independent of ``seed``) from a
short built-in English text, so ``"Once upon a time"`` comes out as a few multi-byte tokens.
Token ids::

    0  <s>            BOS, control
    1  </s>           EOS, control
    2  <|im_start|>   ChatML, control
    3  <|im_end|>     ChatML, control (llama.cpp also takes it as EOT, an end-of-generation token)
    4 .. 259          the bytes 0x00 .. 0xFF, in byte order
    260 ..            merged tokens, then <|reserved_N|> control tokens if the merges run out

Weights: float32, drawn with ``numpy.random.default_rng(seed)``; the same arguments give the
same file byte for byte. The output rows of the control tokens and of every token that is not
printable ASCII (bytes below 0x20, newline included, and 0x7F and above) are zero, so their logits
are exactly 0 while the others are spread widely: greedy decoding never picks them, so greedy
output is printable ASCII and never stops early at EOS (use a logit bias to force an EOS).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

BOS_ID = 0
EOS_ID = 1
IM_START_ID = 2
IM_END_ID = 3
SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
FIRST_BYTE_ID = len(SPECIAL_TOKENS)
FIRST_MERGE_ID = FIRST_BYTE_ID + 256

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """
Once upon a time there was a little model that lived in a small file. It did not know many
words, but it knew every byte, and that was enough for the tests. The host would load it, ask
it a question, and the model would answer with whatever came into its head. Hello world, said
the user. The assistant said hello back, and then the story went on and on until the end of
the context. This is the way of things in the land of random weights: nothing means anything,
but everything is the same every time you run it.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _learn_merges(n_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned greedily from _CORPUS (ties broken by the pair's text)."""
    b2u = bytes_to_unicode()
    # only letter runs with an optional leading space: llama.cpp's pre-tokenizers keep these
    # whole, so every merge learned here can apply
    words = Counter(tuple(b2u[b] for b in w.encode()) for w in re.findall(r" ?[A-Za-z]+", _CORPUS))
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def _vocab(vocab_size: int) -> tuple[list[str], list[int], list[str], np.ndarray]:
    """Tokens, their GGUF token types, the merges, and which tokens greedy decoding may emit."""
    from gguf import TokenType

    if vocab_size < FIRST_MERGE_ID + 1:
        raise ValueError(f"vocab_size must be at least {FIRST_MERGE_ID + 1}")
    b2u = bytes_to_unicode()
    tokens = list(SPECIAL_TOKENS) + [b2u[b] for b in range(256)]
    types = [TokenType.CONTROL] * len(SPECIAL_TOKENS) + [TokenType.NORMAL] * 256
    emit = [False] * len(SPECIAL_TOKENS) + [0x20 <= b < 0x7F for b in range(256)]
    merges = _learn_merges(vocab_size - FIRST_MERGE_ID)
    for a, b in merges:
        tokens.append(a + b)
        types.append(TokenType.NORMAL)
        emit.append(True)  # letters and spaces only
    while len(tokens) < vocab_size:
        tokens.append(f"<|reserved_{len(tokens)}|>")
        types.append(TokenType.CONTROL)
        emit.append(False)
    assert len(set(tokens)) == len(tokens)
    return tokens, [int(t) for t in types], [f"{a} {b}" for a, b in merges], np.array(emit)


def write_tiny_llama(path: Path, *, seed: int = 0, vocab_size: int = 384, n_layer: int = 2,
                     n_embd: int = 64, n_head: int = 4, n_ff: int = 128,
                     n_ctx_train: int = 512) -> Path:
    """Write a random-weight llama GGUF (float32) with a byte-level BPE tokenizer to path."""
    from gguf import GGUFWriter, LlamaFileType

    if n_embd % n_head or (n_embd // n_head) % 2:
        raise ValueError("n_embd / n_head must be a whole, even head size")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, types, merges, emit = _vocab(vocab_size)
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("wasinn-tiny-random-llama")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    # weights scaled so the activations stay around unit size and the logits are far apart
    # (std ~4), which keeps greedy decoding clear of near-ties
    writer.add_tensor("token_embd.weight", normal((vocab_size, n_embd), 1.0))
    for i in range(n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(n_embd, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{blk}.{name}.weight", normal((n_embd, n_embd), n_embd ** -0.5))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(n_embd, np.float32))
        writer.add_tensor(f"{blk}.ffn_gate.weight", normal((n_ff, n_embd), n_embd ** -0.5))
        writer.add_tensor(f"{blk}.ffn_up.weight", normal((n_ff, n_embd), n_embd ** -0.5))
        writer.add_tensor(f"{blk}.ffn_down.weight", normal((n_embd, n_ff), n_ff ** -0.5))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    output = normal((vocab_size, n_embd), 4.0 * n_embd ** -0.5)
    output[~emit] = 0.0
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
