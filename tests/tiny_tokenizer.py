"""An offline word-level tokenizer with a ChatML template: ids fit the tiny models' vocabulary (97)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tiny_models import VOCAB

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = str.split(
    "user assistant system the a an cat dog bird sat ran flew on in under mat house tree is was are what where who "
    "how why and or of to from it this that yes no hello world translate french english word sentence answer "
    "question say add two three four five six seven eight nine ten one zero red green blue big small old new good "
    "bad day night water fire earth air sun moon star book pen table chair door window car road city river"
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Whitespace/punctuation word tokenizer; ``add_special_tokens=True`` prepends ``<s>``; unknown words -> <unk>."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=64,
    )
    if chat_template:
        tokenizer.chat_template = CHATML
    return tokenizer
