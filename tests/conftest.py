"""Shared pytest fixtures: tiny, download-free stand-ins for the real WAN components."""

from __future__ import annotations

import io
import random

import pytest

TINY_UMT5_SPM_VOCAB = 128  # sentencepiece pieces in the tiny tokenizer (ids 0..127)


def _tiny_sentences(count: int = 400) -> list[str]:
    """Caption-like sentences from a small word list plus random syllable words, seeded."""
    rng = random.Random(0)
    words = (
        "a the cat dog woman man child bird car boat runs walks jumps flies slowly quickly over under "
        "red blue green golden dark bright street field river forest city night sunset rain snow camera "
        "pans zooms close shot wide view of in on at with and"
    ).split()
    syllables = ["ka", "lo", "mi", "ren", "tas", "vo", "zu", "pel", "dor", "ish"]
    sentences = []
    for _ in range(count):
        n = rng.randint(3, 14)
        sentence = [
            rng.choice(words) if rng.random() < 0.8 else "".join(rng.choices(syllables, k=rng.randint(1, 3)))
            for _ in range(n)
        ]
        sentences.append(" ".join(sentence) + rng.choice([".", ",", "!", ""]))
    return sentences


@pytest.fixture(scope="session")
def tiny_umt5_tokenizer_dir(tmp_path_factory):
    """A local folder laid out like google/umt5-xxl, holding a tiny umT5-style tokenizer.

    How it is built (works with transformers 5, no downloads):
    1. Train a sentencepiece unigram model in memory on ~400 generated sentences, vocab 128, with the
       T5 special ids: pad 0 (`<pad>`), eos 1 (`</s>`), unk 2 (`<unk>`), no BOS. Write `spiece.model`.
    2. `T5Tokenizer.from_pretrained(folder, extra_ids=0)` converts it (transformers 5's T5Tokenizer is
       the tokenizers-backed one; a folder with only `spiece.model` is not enough for AutoTokenizer,
       which needs `tokenizer_config.json` to know the class). `save_pretrained` then writes
       `tokenizer.json` and `tokenizer_config.json` (tokenizer_class T5Tokenizer) next to it.
    The folder ends with spiece.model, tokenizer.json, tokenizer_config.json; `AutoTokenizer` loads it
    with `local_files_only=True`; `len(tokenizer) == 128`; encoding appends EOS id 1.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = tmp_path_factory.mktemp("tiny_umt5_tokenizer")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_sentences()),
        model_writer=model,
        model_type="unigram",
        vocab_size=TINY_UMT5_SPM_VOCAB,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    T5Tokenizer.from_pretrained(str(folder), local_files_only=True, extra_ids=0).save_pretrained(str(folder))
    return folder
