"""A chat rendered into a prompt with the GGUF's own template (`tokenizer.chat_template`)."""

from __future__ import annotations

from collections.abc import Sequence

import jinja2
from llama_cpp import _internals as internals
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ._api import ApiError, Message

#: for a GGUF that carries no template (the ChatML that SmolLM2, Qwen and others use)
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEMPLATE_KEY = "tokenizer.chat_template"


class ChatTemplate:
    """Renders messages as the model was trained to read them, ending with the assistant's turn.

    The backend tokenizes prompts with the model's own BOS rule, so a BOS that the template
    writes itself is dropped from the text (else the model would see two).
    """

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "",
                 model_adds_bos: bool = False) -> None:
        self.source = template
        self._bos = bos_token
        self._strip_bos = model_adds_bos and bool(bos_token)
        try:
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos_token,
                                                  bos_token=bos_token)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template does not parse: {e}") from None

    @classmethod
    def for_model(cls, model: internals.LlamaModel) -> ChatTemplate:
        """The template in the GGUF's metadata, or ChatML."""
        template = model.metadata().get(TEMPLATE_KEY) or CHATML
        bos = _token_text(model, model.token_bos())
        eos = _token_text(model, model.token_eos())
        return cls(template, bos, eos, model_adds_bos=model.add_bos_token())

    def render(self, messages: Sequence[Message]) -> str:
        try:
            prompt = self._formatter(messages=[m.as_template_dict() for m in messages]).prompt
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            # templates raise_exception() on what they refuse (roles out of order and such)
            raise ApiError(400, f"the model's chat template refused the messages: {e}",
                           param="messages") from None
        if self._strip_bos and prompt.startswith(self._bos):
            prompt = prompt[len(self._bos):]
        return prompt


def _token_text(model: internals.LlamaModel, token: int) -> str:
    if token < 0:
        return ""
    try:
        return model.token_get_text(token)
    except UnicodeDecodeError:
        return ""
