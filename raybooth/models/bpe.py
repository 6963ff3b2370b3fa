"""Byte-level BPE tokenizers built offline: a CLIP tokenizer for tiny-sd and a chat tokenizer for tiny-vlm.

No tokenizer can be downloaded here, so both are learned from `CORPUS` below with a plain, deterministic
BPE learner (most frequent pair first, ties broken by the pair's text) and then saved in the standard
formats: CLIP's `vocab.json` + `merges.txt`, and a `tokenizers` JSON for the VLM. The text is split with
the very pre-tokenizers the runtime tokenizer uses, so every learned merge can fire at encode time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import CLIPTokenizer

# What the tiny models will be asked about: DreamBooth prompts, captions, chat turns and JSON answers.
# Frequent words end up as single tokens, so prompts stay short and "sks" is one token as in real CLIP.
CORPUS = """
a photo of sks dog. a photo of a dog. a photo of sks dog on the beach. a photo of sks dog in the snow.
a photo of sks cat. a photo of a cat. a photo of sks cat on a sofa. a photo of sks cat in a box.
a photo of sks person. a photo of a person. a photo of sks backpack. a photo of a toy.
a dog sitting on the grass. a cat sleeping on a bed. a dog running in the park with a ball.
a cat looking out of the window. a red car parked on the street. a blue sky over the mountains.
a painting of sks dog in the style of van gogh. a sketch of a cat. an oil painting of a house.
a close up photo of a dog with brown fur. a black and white photo of a cat. a green tree in a field.
a man and a woman walking on the beach at sunset. a child playing with a dog in the garden.
a bowl of fruit on a wooden table. a cup of coffee next to a book. a city street at night with lights.
high quality, detailed, sharp focus, studio lighting, photorealistic, 4k, trending on artstation.
USER: <image>
Describe the image in one sentence.
ASSISTANT: The image shows a dog sitting on the grass in a park.
USER: What color is the cat?
ASSISTANT: The cat is black and white.
USER: How many dogs are in the picture?
ASSISTANT: There are two dogs in the picture.
SYSTEM: You are a helpful assistant that describes images.
USER: Write a short caption for this photo.
ASSISTANT: A small brown dog runs across a green field.
USER: Answer in JSON with the keys caption, objects and count.
ASSISTANT: {"caption": "a cat on a sofa", "objects": ["cat", "sofa"], "count": 1}
{"answer": "yes", "confidence": 0.9, "labels": ["dog", "cat", "person"], "ok": true, "error": null}
{"name": "photo", "width": 64, "height": 64, "color": "red", "done": false}
The quick brown fox jumps over the lazy dog. The dog and the cat are friends.
This is a picture of a dog. This is a picture of a cat. This image contains a person and a car.
What is in the image? What is the dog doing? Where is the cat? Is there a person in the photo?
Yes, there is. No, there is not. I can see a dog, a cat, a car, a tree and a house.
0 1 2 3 4 5 6 7 8 9 10 16 32 64 100 128 256 512 1024
"""

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
VLM_PAD, VLM_BOS, VLM_EOS, VLM_IMAGE = "<pad>", "<s>", "</s>", "<image>"
END_OF_WORD = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 bytes to printable characters (same order as theirs)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + shift)
            shift += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def learn_bpe_merges(
    word_counts: Counter[str], num_merges: int, end_of_word: str = ""
) -> list[tuple[str, str]]:
    """Learn up to `num_merges` merges; the last symbol of a word carries `end_of_word` (CLIP's `</w>`).

    Deterministic on purpose: words are visited sorted and ties go to the smallest pair, so the same
    corpus always gives the same merges (and the same token ids) on every machine.
    """
    words = [(_initial_symbols(word, end_of_word), count) for word, count in sorted(word_counts.items())]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:  # a pair seen once is memorising, not compressing
            break
        merges.append(best)
        words = [(_merge_pair(symbols, best), count) for symbols, count in words]
    return merges


def _initial_symbols(word: str, end_of_word: str) -> tuple[str, ...]:
    symbols = list(word)
    symbols[-1] += end_of_word
    return tuple(symbols)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def _count_pieces(tokenizer: Tokenizer, lines: Iterable[str]) -> Counter[str]:
    """Split text exactly as `tokenizer` will at encode time and count the byte-mapped pieces."""
    counts: Counter[str] = Counter()
    for line in lines:
        text = tokenizer.normalizer.normalize_str(line) if tokenizer.normalizer else line
        counts.update(piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text))
    return counts


def write_clip_tokenizer(dest: Path, num_merges: int = 600, model_max_length: int = 77) -> CLIPTokenizer:
    """Learn a CLIP BPE from `CORPUS`, save it to `dest` (vocab.json, merges.txt, tokenizer.json, ...).

    The vocab is laid out like OpenAI's: the 256 byte symbols, their `</w>` forms, one token per merge,
    then `<|startoftext|>` and `<|endoftext|>` last (pad is `<|endoftext|>`, as in SD's tokenizer).
    """
    byte_symbols = list(bytes_to_unicode().values())
    # An empty CLIPTokenizer carries CLIP's normalizer and pre-tokenizer; learn on its splits.
    splitter = CLIPTokenizer(vocab={CLIP_BOS: 0, CLIP_EOS: 1}, merges=[])
    counts = _count_pieces(splitter.backend_tokenizer, CORPUS.strip().splitlines())
    merges = learn_bpe_merges(counts, num_merges, END_OF_WORD)

    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols] + ["".join(m) for m in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (dest / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")

    # Saved through the public class too: that adds tokenizer.json and tokenizer_config.json (class,
    # special tokens, model_max_length), what CLIPTokenizer and AutoTokenizer read first.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tokenizer.save_pretrained(dest)
    return tokenizer


def build_chat_tokenizer(num_merges: int = 1000, extra_specials: Sequence[str] = ()) -> Tokenizer:
    """A GPT-2 style byte-level BPE (`Ġ` marks a leading space) learned from `CORPUS`, for tiny-vlm.

    Ids: `<pad>`=0, `<s>`=1, `</s>`=2, `<image>`=3, then the 256 byte symbols, then one id per merge.
    Any UTF-8 text (and so any JSON) can be encoded, since every byte has a token. No BOS is added
    by the tokenizer: the chat template writes it, so a rendered chat is never given two.
    `extra_specials` (a family's own markers, e.g. Qwen's `<|im_start|>`) take the ids right after
    `<image>`; without them the ids above are unchanged, so tiny-vlm's vocabulary stays as it was.
    """
    specials = [VLM_PAD, VLM_BOS, VLM_EOS, VLM_IMAGE, *extra_specials]
    splitter = Tokenizer(BPE())
    splitter.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    merges = learn_bpe_merges(_count_pieces(splitter, CORPUS.strip().splitlines()), num_merges)

    tokens = specials + list(bytes_to_unicode().values()) + ["".join(m) for m in merges]
    tokenizer = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(specials)
    return tokenizer
