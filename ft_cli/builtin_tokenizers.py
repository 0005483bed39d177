"""The tokenizers of the built-in models (ft_cli/builtin_models.py), trained here from builtin_corpus.py: a
byte-level BPE with ChatML's special tokens and chat template (templates/chatml.jinja) for the causal LMs, or a
chat profile's tokens and template for `ft train --smoke` (ft_cli.chat_profiles), and a BERT-style WordPiece for
the encoders. Training is deterministic: the same inputs give the same vocabulary in every process.

tokenizers and transformers are imported only inside the functions that build.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    from ft_cli.chat_profiles import ChatProfile

BOS_TOKEN = "<|begin_of_text|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"  # end of turn: what generation stops on, as in Qwen2-instruct
END_OF_TEXT_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"  # distinct from eos, so masking padding never masks a real end of turn
# Trained first, so these are ids 0..4 in this order.
SPECIAL_TOKENS = (BOS_TOKEN, IM_START_TOKEN, EOS_TOKEN, END_OF_TEXT_TOKEN, PAD_TOKEN)

MODEL_MAX_LENGTH = 4096
_BPE_VOCAB_SIZE = 4096  # an upper bound: the corpus yields ~2.3k tokens at _BPE_MIN_FREQUENCY
_BPE_MIN_FREQUENCY = 2
# Qwen2's pre-tokenizer split: contractions, words with one leading non-letter, single digits, punctuation
# runs, newlines and spaces. Single digits keep numbers tokenized the same way whatever the corpus had.
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDPIECE_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ENCODER_MAX_LENGTH = 512


def tokenizer_inputs() -> list:
    """What the tokenizers are made from besides the corpus and the template (part of a built-in's build key)."""
    import hashlib

    shipped = resources.files("ft_cli").joinpath("builtin_wordpiece.txt").read_bytes()
    return [SPECIAL_TOKENS, _BPE_VOCAB_SIZE, _BPE_MIN_FREQUENCY, _SPLIT_PATTERN, MODEL_MAX_LENGTH,
            hashlib.sha256(shipped).hexdigest()]


def chat_template() -> str:
    """The ChatML template the built-in tokenizer carries (ft_cli/templates/chatml.jinja)."""
    return resources.files("ft_cli").joinpath("templates", "chatml.jinja").read_text(encoding="utf-8")


_CJK_RANGES = ((0x3000, 0x3040), (0x4E00, 0xA000), (0xFF00, 0xFFF0))  # CJK punctuation, ideographs, full-width


def wordpiece_vocab() -> list[str]:
    """The built-in WordPiece vocabulary in id order: the 2,169 tokens ft_cli/builtin_wordpiece.txt lists (trained
    once on builtin_corpus by scripts/gen_wordpiece_vocab.py, specials first), then every CJK ideograph and CJK /
    full-width punctuation mark, so Chinese text (ChnSentiCorp) tokenizes to one token per character as with
    bert-base-chinese, not to [UNK]. Shipped rather than trained at build time because tokenizers' WordPiece trainer
    breaks ties between equally frequent merges differently from one run to the next (its ## alphabet comes out
    of a hash map): every build got another vocabulary, and with it other token ids and other training results."""
    listed = resources.files("ft_cli").joinpath("builtin_wordpiece.txt").read_text(encoding="utf-8").split("\n")
    return [t for t in listed if t] + [chr(c) for a, b in _CJK_RANGES for c in range(a, b)]


def wordpiece_tokenizer(vocab: dict[str, int] | None = None) -> tokenizers.Tokenizer:
    """BERT's text handling around a WordPiece model (`vocab`, or none yet: scripts/gen_wordpiece_vocab.py trains
    one with the same normalizer and pre-tokenizer): lower-casing and accent stripping, CJK characters one per word."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    model = models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100) if vocab is not None else \
        models.WordPiece(unk_token="[UNK]")
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def build_wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """BERT's tokenizer design on ft's own vocabulary (`wordpiece_vocab`): lower-casing and accent stripping, CJK
    characters one per token, WordPiece (## continuations), [CLS] A [SEP] (B [SEP]) with token type ids 0/1."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = wordpiece_tokenizer({t: i for i, t in enumerate(wordpiece_vocab())})
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=ENCODER_MAX_LENGTH, padding_side="right",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def build_tokenizer(chat: ChatProfile | None = None) -> PreTrainedTokenizerFast:
    """The built-in tokenizer, freshly trained (deterministic); `AutoTokenizer` loads the saved copy. With `chat`,
    that model's special tokens, chat template and bos handling instead of ChatML's."""
    from transformers import PreTrainedTokenizerFast

    if chat is not None:
        return _chat_profile_tokenizer(chat)
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, END_OF_TEXT_TOKEN],
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        # Byte-level BPE decodes exactly; "cleaning up" would turn "a , b" into "a, b".
        clean_up_tokenization_spaces=False,
        chat_template=chat_template(),
    )


def _chat_profile_tokenizer(chat: ChatProfile) -> PreTrainedTokenizerFast:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bpe = train_bpe(chat.special_tokens)
    if chat.add_bos:  # as Llama's and Mistral's tokenizers do: bos before every encoded text
        assert chat.bos_token is not None
        bpe.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{chat.bos_token} $A", pair=f"{chat.bos_token} $A $B",
                                          special_tokens=[(chat.bos_token, bpe.token_to_id(chat.bos_token))]),
        ])
    named = {chat.bos_token, chat.eos_token, chat.pad_token}
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=chat.bos_token, eos_token=chat.eos_token, pad_token=chat.pad_token,
        additional_special_tokens=[t for t in chat.special_tokens if t not in named],
        model_max_length=MODEL_MAX_LENGTH, padding_side="right", clean_up_tokenization_spaces=False,
        chat_template=chat.template,
    )


def train_bpe(special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> tokenizers.Tokenizer:
    """A byte-level BPE trained on builtin_corpus: any text encodes (no unknown token) and decodes back to its
    NFC form. As in Qwen2 (whose tokenizer class transformers 5 uses for qwen2 directories, NFC included):
    no bos is added on encode, so text encodes to exactly its own tokens and the chat template adds the
    turn markers."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    from ft_cli.builtin_corpus import corpus

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=_BPE_VOCAB_SIZE, min_frequency=_BPE_MIN_FREQUENCY,
                                  special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok
