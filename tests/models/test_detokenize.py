"""A row's streamed text is what `tokenizer.decode` gives for its tokens, however it is computed.

TextTracker decodes a short window of a fast tokenizer's latest tokens at each step instead of the whole
answer. These tests drive it with random token streams (special tokens, lone spaces, the bytes of
multi-byte characters split across tokens, invalid UTF-8) through the decoder kinds real checkpoints use
(ByteLevel for GPT-2/Llama 3/Qwen, SentencePiece-style byte fallback for Llama 2/Mistral, Metaspace,
WordPiece with its clean-up for BERT-style vocabularies) and compare with a whole decode after every token.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from raybooth.cluster.workdir import default_models_dir
from raybooth.models.decoding import TextTracker, _window_for
from raybooth.models.loaders import load_vlm_processor
from raybooth.models.presets import resolve_model

SPECIALS = ["<s>", "</s>", "<|im_end|>"]
WORDS = ["a", "b", "hello", "world", ".", ",", "'s", "n't", "é", "漢字", "🙂", "the", "'", "?"]
CHARS = "é漢字🙂—"  # multi-byte characters whose bytes the byte tokens split


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)


def sentencepiece_vocab() -> dict[str, int]:
    """Llama-2 / Mistral shaped: <unk>, the 256 <0xNN> byte tokens, a lone "▁", words with and without it."""
    pieces = ["<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁"]
    pieces += [w for word in WORDS for w in (word, "▁" + word)]
    return {piece: i for i, piece in enumerate(pieces)}


def llama2_style() -> PreTrainedTokenizerFast:
    model = models.BPE(vocab=sentencepiece_vocab(), merges=[], unk_token="<unk>", byte_fallback=True)
    backend = Tokenizer(model)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _wrap(backend)


def metaspace_style() -> PreTrainedTokenizerFast:
    model = models.BPE(vocab=sentencepiece_vocab(), merges=[], unk_token="<unk>", byte_fallback=True)
    backend = Tokenizer(model)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return _wrap(backend)


def bytelevel_style() -> PreTrainedTokenizerFast:
    pieces = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces += ["Ġ" + w for w in ["a", "b", "hello", "world", "the"]] + ["'s", "n't", "Ġ."]
    backend = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[]))
    backend.decoder = decoders.ByteLevel()
    return _wrap(backend)


def wordpiece_style() -> PreTrainedTokenizerFast:
    vocab = {piece: i for i, piece in enumerate(["[UNK]", *WORDS, "##s", "##ing", "##é"])}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece(cleanup=True)
    return _wrap(backend)


def byte_tokens(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """The ids of `text`'s UTF-8 bytes as single byte tokens, in the tokenizer's own spelling of a byte."""
    vocab = tokenizer.get_vocab()
    if "<0x00>" in vocab:
        return [vocab[f"<0x{b:02X}>"] for b in text.encode()]
    ((spelled, _),) = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    return [vocab[char] for char in spelled]  # ByteLevel spells each byte as one character


def random_stream(tokenizer: PreTrainedTokenizerFast, rng: random.Random, length: int) -> list[int]:
    vocab = list(tokenizer.get_vocab().values())
    specials = [tokenizer.convert_tokens_to_ids(s) for s in SPECIALS]
    ids: list[int] = []
    while len(ids) < length:
        roll = rng.random()
        if roll < 0.15:
            ids.append(rng.choice(specials))
        elif roll < 0.35:
            ids += byte_tokens(tokenizer, rng.choice(CHARS))  # a whole character, byte by byte
        else:
            ids.append(rng.choice(vocab))  # anything, invalid byte sequences included
    return ids[:length]


def assert_tracks_whole_decode(tokenizer, ids: list[int]) -> None:
    tracker = TextTracker(tokenizer, stop=[])
    shown = ""
    for k, token in enumerate(ids, start=1):
        delta, stopped = tracker.push(token)
        assert not stopped
        shown += delta
        whole = tokenizer.decode(ids[:k], skip_special_tokens=True)
        assert tracker.text == whole, f"after {k} tokens {ids[:k]}"
        assert whole.startswith(shown)  # nothing shown that the answer does not contain
    assert shown + tracker.flush() == tokenizer.decode(ids, skip_special_tokens=True)


WINDOWED = {"bytelevel": bytelevel_style, "llama2": llama2_style, "metaspace": metaspace_style}


@pytest.mark.parametrize("style", sorted(WINDOWED))
def test_windowed_text_equals_the_whole_decode_after_every_token(style):
    tokenizer = WINDOWED[style]()
    assert _window_for(tokenizer) is not None  # the window path is the one under test
    rng = random.Random(style)
    for _ in range(40):
        assert_tracks_whole_decode(tokenizer, random_stream(tokenizer, rng, rng.randint(1, 60)))


def test_a_head_of_skipped_tokens_still_gives_the_next_word_its_space():
    """SentencePiece decoders drop the first token's leading space; a window that began at a skipped
    special token would drop the space of the word after it."""
    tokenizer = llama2_style()
    ids = tokenizer.convert_tokens_to_ids(["▁hello", "</s>", "▁world", "▁", "▁a"])
    assert_tracks_whole_decode(tokenizer, ids)
    assert TextTracker(tokenizer, stop=[]).push(ids[0])[0] == "hello"


def test_decoders_that_rewrite_across_tokens_decode_the_whole_answer():
    """WordPiece's clean-up joins " '" + " s" into "'s" only when it sees both: no window for it."""
    tokenizer = wordpiece_style()
    assert _window_for(tokenizer) is None
    ids = tokenizer.convert_tokens_to_ids(["the", "'", "##s", "a", "."])
    assert_tracks_whole_decode(tokenizer, ids)
    rng = random.Random(7)
    for _ in range(10):
        assert_tracks_whole_decode(tokenizer, [rng.randrange(len(tokenizer)) for _ in range(30)])


def test_a_preset_tokenizer_streams_its_whole_decode():
    """The tokenizer a real folder loads with (tiny-llm: a Llama-3 style ByteLevel BPE with a chat template)."""
    processor = load_vlm_processor(resolve_model("tiny-llm", kind="vlm", models_dir=default_models_dir()))
    tokenizer = getattr(processor, "tokenizer", processor)
    assert _window_for(tokenizer) is not None
    rng = random.Random(3)
    for _ in range(20):
        assert_tracks_whole_decode(tokenizer, [rng.randrange(len(tokenizer)) for _ in range(80)])


def test_a_tokenizer_class_that_overrides_decode_keeps_its_own():
    class Shouting(PreTrainedTokenizerFast):
        def decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).upper()

    plain = bytelevel_style()
    tokenizer = Shouting(tokenizer_object=plain.backend_tokenizer, clean_up_tokenization_spaces=False)
    assert _window_for(tokenizer) is None
    tracker = TextTracker(tokenizer, stop=[])
    tracker.push(tokenizer.convert_tokens_to_ids("Ġhello"))
    assert tracker.text == " HELLO"
