"""Shared pieces of the offline tiny variants: a trained word-level tokenizer and seeded init."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Words the tiny tokenizers know: the synthetic scene grammar plus common caption words, so that
# even random-weight generations decode to real words (BERTScore then has something to compare).
CAPTION_WORDS = """
a an the of and with on in at to is are there one two three four small large big tiny red green blue
yellow purple orange black white gray grey brown pink circle circles square squares triangle triangles
star stars cross crosses shape shapes left right top bottom center middle corner image picture photo of
man woman person people cat dog animal flower flowers building city sky water tree trees food plate cup
coffee rocket astronaut chinese temple background foreground near next above below object objects
describe sentence user assistant . , ? !
""".split()

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<s>", "</s>"


def train_word_tokenizer(
    special_tokens: Sequence[str],
    corpus: Iterable[str] = (),
    bos: str = BOS,
    eos: str = EOS,
    append_eos: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a WordLevel tokenizer offline in milliseconds.

    Special tokens come first in the vocabulary (ids 0..), followed by ``CAPTION_WORDS`` and any words
    of ``corpus``. Lower-cases and splits on whitespace and punctuation.

    Args:
        special_tokens: family tokens such as ``<image>``; added after unk/pad/bos/eos.
        corpus: extra text whose words join the vocabulary.
        bos: beginning-of-sequence token.
        eos: end-of-sequence token.
        append_eos: also end every encoded text with ``eos`` (text towers such as CLIP's pool at it).

    Returns:
        A ``PreTrainedTokenizerFast`` whose ``len()`` is the vocabulary size to configure models with.
    """
    specials = list(dict.fromkeys([UNK, PAD, bos, eos, *special_tokens]))
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1)
    tok.train_from_iterator([" ".join(CAPTION_WORDS), *corpus], trainer=trainer)
    specials_used = [(bos, tok.token_to_id(bos))] + ([(eos, tok.token_to_id(eos))] if append_eos else [])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}" if append_eos else f"{bos} $A", special_tokens=specials_used
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, pad_token=PAD, bos_token=bos, eos_token=eos
    )
    fast.add_special_tokens({"additional_special_tokens": [t for t in special_tokens if t not in (UNK, PAD, bos, eos)]})
    return fast


def seed_everything(seed: int) -> torch.Generator:
    """Seed python and torch RNGs (so tiny weights are reproducible); returns a seeded generator."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)

