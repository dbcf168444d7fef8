"""A tiny, hub-free byte-level tokenizer for the offline default recipe.

Every UTF-8 string encodes (each byte is one token), ids are fixed by
construction, and the whole vocabulary is 263 entries, so a toy Llama built
from a config can use it without downloading anything.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT, SYSTEM, END_OF_TURN]

# Turns end with <|end|> and nothing after it, so the supervised span of an
# assistant turn ends exactly on the token a generator should stop at.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + m['role']) }}"
    "{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte-level chat tokenizer.

    Ids 0-6 are the special tokens (in ``SPECIAL_TOKENS`` order, so
    ``<pad>`` is 0), ids 7-262 are the 256 byte symbols in the GPT-2
    ByteLevel alphabet, sorted.  There are no merges, so one byte is one
    token and ``decode(encode(text)) == text`` for any text.
    """
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({sym: len(SPECIAL_TOKENS) + i for i, sym in enumerate(byte_symbols)})

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # add_prefix_space=False: never invent a leading space, so rendering and
    # decoding are exact.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM, END_OF_TURN],
        padding_side="right",
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
