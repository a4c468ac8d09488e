"""The chat templates DeepKE defines for the IEPile model family (OneKE, and the LoRA models on LLaMA-2, LLaMA-3,
Qwen, Baichuan, Mistral, ChatGLM ...), as data: what a prompt looks like around the user turn.

The facts are the authors' (DeepKE, example/llm/InstructKGC/src/datamodule/template.py): each template is a prefix
holding the system prompt, a separator, and the user turn around the query, with some parts placed as special
tokens. A first turn is laid out as the authors' encoder lays it out:

- LLaMA-2 templates (`llama2`, `llama2_zh`): the system block is folded into the query, inside `[INST] ... [/INST]`;
- the others: prefix, then the separator, then the user turn; an empty prefix (a template whose system prompt is
  empty) drops the separator too.

`render` gives that text, special tokens written as their text; `parts` the pieces the authors' encoder tokenizes
one by one (runner.encode_prompts does the same), BOS where the tokenizer adds one, as in training. One deliberate
difference: the authors fill placeholders with str.replace on the filled-in text, so a query containing the literal
text `{{idx}}` would be rewritten; here each placeholder is filled once, in place.
Pure data and string functions: no torch, no transformers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from oneke_plan.core.errors import BadInput


@dataclass(frozen=True)
class Token:
    """A part the authors place by token id (their `{"token": ...}`): it must be one token the tokenizer knows."""

    text: str


Part = str | Token


@dataclass(frozen=True)
class Template:
    name: str
    prefix: tuple[Part, ...]  # may hold {{system}}
    prompt: tuple[Part, ...]  # holds {{query}} (and {{idx}}, the turn number, for chatglm2)
    system: str
    sep: tuple[Part, ...] = ()
    stop_words: tuple[str, ...] = ()  # tokens that end an answer besides the model's EOS
    # The model's own chat template (MODEL_TEMPLATE): rendered by its tokenizer (transformers' apply_chat_template),
    # so it has no parts of its own; the model's EOS ends its answers.
    from_tokenizer: bool = False

    @property
    def folds_system_into_query(self) -> bool:
        """The authors' Llama2Template: chosen by name ("llama2" in it), as their register_template does."""
        return "llama2" in self.name

    def parts(self, query: str) -> list[Part]:
        """The first turn's parts in order, placeholders filled, empty strings dropped (BOS not included)."""
        if self.from_tokenizer:
            raise ValueError(f"template {self.name} is the tokenizer's: render it with chat_messages and the tokenizer")
        if self.folds_system_into_query:
            head = _fill(self.prefix, system=self.system)
            folded = "".join(p for p in head if isinstance(p, str)) + query
            return _fill(self.prompt, query=folded)
        prefix = _fill(self.prefix, system=self.system)
        head = [*prefix, *_fill(self.sep)] if prefix else []
        return [*head, *_fill(self.prompt, idx="1", query=query)]  # the query last: its text is never searched

    def render(self, query: str) -> str:
        """The prompt text around `query`, special tokens written as their text, without BOS."""
        return "".join(p.text if isinstance(p, Token) else p for p in self.parts(query))

    def special_tokens(self) -> list[str]:
        """Every token this template places by id, and its stop words."""
        texts = [p.text for p in (*self.prefix, *self.sep, *self.prompt) if isinstance(p, Token)]
        return list(dict.fromkeys([*texts, *self.stop_words]))


def _fill(parts: Iterable[Part], **values: str) -> list[Part]:
    out: list[Part] = []
    for part in parts:
        if isinstance(part, str):
            for key, value in values.items():
                part = part.replace("{{" + key + "}}", value, 1)
            if part:
                out.append(part)
        else:
            out.append(part)
    return out


_LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. "
    "Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, "
    "racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, "
    "explain why instead of answering something not correct. "
    "If you don't know the answer to a question, please don't share false information."
)
_CHAT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ONEKE_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"
_LLAMA2_SYS_BLOCK = "<<SYS>>\n{{system}}\n<</SYS>>\n\n"
_LLAMA3_PREFIX = "<|start_header_id|>system<|end_header_id|>\n\n{{system}}<|eot_id|>"
_LLAMA3_PROMPT = (
    "<|start_header_id|>user<|end_header_id|>\n\n{{query}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template("llama2_zh", (_LLAMA2_SYS_BLOCK,), ("[INST] {{query}} [/INST]",), ONEKE_SYSTEM),
        Template("llama2", (_LLAMA2_SYS_BLOCK,), ("[INST] {{query}} [/INST]",), _LLAMA2_SYSTEM),
        Template(
            "llama3",
            (_LLAMA3_PREFIX,),
            (_LLAMA3_PROMPT,),
            "You are a helpful assistant.",
            stop_words=("<|eot_id|>",),
        ),
        Template("llama3_zh", (_LLAMA3_PREFIX,), (_LLAMA3_PROMPT,), ONEKE_SYSTEM, stop_words=("<|eot_id|>",)),
        Template(
            "qwen",
            (Token("<|im_start|>"), "system\n{{system}}"),
            (Token("<|im_start|>"), "user\n{{query}}", Token("<|im_end|>"), "\n", Token("<|im_start|>"), "assistant\n"),
            "You are a helpful assistant.",
            sep=(Token("<|im_end|>"), "\n"),
            stop_words=("<|im_end|>",),
        ),
        Template("baichuan", ("{{system}}",), (Token("<reserved_102>"), "{{query}}", Token("<reserved_103>")), ""),
        Template("baichuan2", ("{{system}}",), (Token("<reserved_106>"), "{{query}}", Token("<reserved_107>")), ""),
        Template("mistral", ("{{system}}",), ("[INST] {{query}} [/INST]",), "", sep=(" ",)),
        Template(
            "chatglm2",
            (Token("[gMASK]"), Token("sop"), "{{system}}"),
            ("[Round {{idx}}]\n\n问：{{query}}\n\n答：",),
            "",
            sep=("\n\n",),
        ),
        Template(
            "chatglm3",
            (Token("[gMASK]"), Token("sop"), Token("<|system|>"), "\n", "{{system}}"),
            (Token("<|user|>"), "\n", "{{query}}", Token("<|assistant|>")),
            "You are ChatGLM3, a large language model trained by Zhipu.AI. "
            "Follow the user's instructions carefully. Respond using markdown.",
            stop_words=("<|user|>", "<|observation|>"),
        ),
        Template(
            "alpaca",
            ("{{system}}",),
            ("### Instruction:\n{{query}}\n\n### Response:\n",),
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
            sep=("\n\n",),
        ),
        Template("vicuna", ("{{system}}",), ("USER: {{query}} ASSISTANT:",), _CHAT_SYSTEM),
        Template("default", ("{{system}}",), ("Human: {{query}}\nAssistant:",), _CHAT_SYSTEM, sep=("\n",)),
        Template("vanilla", (), ("{{query}}",), ""),
        Template("model", (), (), "", from_tokenizer=True),
    ]
}
ONEKE_TEMPLATE = "llama2_zh"  # the template OneKE was trained with, and what profiles without a `template` ran
MODEL_TEMPLATE = "model"
DEEPKE_TEMPLATES = tuple(name for name in TEMPLATES if name != MODEL_TEMPLATE)
"""The model's own chat template, carried by its tokenizer (tokenizer_config.json's `chat_template`,
chat_template.jinja, or a GGUF's `tokenizer.chat_template`): the default for a model DeepKE names no template for."""


def chat_messages(query: str) -> list[dict[str, str]]:
    """The conversation a prompt is under the model's own chat template: one user turn. No system turn, so the
    template puts the model's own default system prompt where it has one (SmolLM2's, Qwen's)."""
    return [{"role": "user", "content": query}]

# model_type -> template, for the families DeepKE trains IEPile models on.
_BY_MODEL_TYPE = {
    "qwen": "qwen",
    "qwen2": "qwen",
    "qwen2_moe": "qwen",
    "qwen3": "qwen",
    "qwen3_moe": "qwen",
    "mistral": "mistral",
    "mixtral": "mistral",
    "chatglm": "chatglm3",  # THUDM's remote-code ChatGLM; transformers' own "glm" (GLM-4) has no DeepKE template
}
_LLAMA_BY_VOCAB = {32000: "llama2", 55296: "llama2_zh", 128256: "llama3"}  # LLaMA-2, Chinese-Alpaca-2/OneKE, LLaMA-3
_BAICHUAN_BY_VOCAB = {64000: "baichuan", 125696: "baichuan2"}


def default_template(config: dict[str, Any], has_chat_template: bool = False) -> tuple[str, str]:
    """The template a model's config implies, and why, in words: DeepKE's for the families DeepKE trains on (by
    model_type, and for LLaMA and Baichuan by vocabulary size: what tells LLaMA-2, OneKE's Chinese-Alpaca-2 base
    and LLaMA-3 apart); for any other model, its own chat template where its tokenizer carries one
    (`has_chat_template`), else OneKE's llama2_zh, said so."""
    model_type = str(config.get("model_type", ""))
    vocab = config.get("vocab_size")
    if model_type == "llama" and vocab in _LLAMA_BY_VOCAB:
        return _LLAMA_BY_VOCAB[vocab], f"a LLaMA with a {vocab:,}-token vocabulary"
    if model_type in ("baichuan", "baichuan2") and vocab in _BAICHUAN_BY_VOCAB:
        return _BAICHUAN_BY_VOCAB[vocab], f"a Baichuan with a {vocab:,}-token vocabulary"
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type], f"model_type {model_type}"
    if model_type == "llama":
        why = "a LLaMA whose vocabulary is none of LLaMA-2's, OneKE's or LLaMA-3's"
    else:
        why = f"DeepKE names no template for model_type {model_type or '?'}"
    if has_chat_template:
        return MODEL_TEMPLATE, f"the model's own chat template, from its tokenizer; {why}: --template sets another"
    return ONEKE_TEMPLATE, f"OneKE's; {why} and its tokenizer carries no chat template: --template sets another"


def check_tokenizer(tmpl: Template, tokenizer: Any, where: str) -> list[int]:
    """Check that the tokenizer has each token the template places by id (else the prompt would be text the
    model never saw), or that it carries the model's own chat template where that is the one; return the ids of
    the template's stop words. `tokenizer`: a transformers tokenizer."""
    check_chat_template(tmpl, tokenizer, where)
    ids = special_token_ids(tmpl, tokenizer, where)
    return [ids[text] for text in tmpl.stop_words]


def check_chat_template(tmpl: Template, tokenizer: Any, where: str) -> None:
    """The model's own template needs a tokenizer that carries one."""
    if tmpl.from_tokenizer and not getattr(tokenizer, "chat_template", None):
        raise BadInput(
            f"{where}: template {tmpl.name} is the model's own chat template, but this tokenizer carries none; "
            "choose a DeepKE template with --template (e.g. llama2_zh, OneKE's)"
        )


def special_token_ids(tmpl: Template, tokenizer: Any, where: str) -> dict[str, int]:
    """The id of each token the template places by id (its special tokens, stop words included); BadInput naming
    `where` for one the tokenizer does not have as one token."""
    ids: dict[str, int] = {}
    for text in tmpl.special_tokens():
        # placed by id, as the authors' encoder places them: only the id must exist (how the tokenizer would split
        # the token's text does not matter, and ChatGLM's `sop` or Baichuan's <reserved_106> need not be special)
        token_id = tokenizer.convert_tokens_to_ids(text)
        if token_id is None or (token_id == tokenizer.unk_token_id and text != tokenizer.unk_token):
            raise BadInput(
                f"{where}: template {tmpl.name} needs the special token {text}, which this tokenizer does not have "
                "as one token; choose the model's own template with --template (oneke-plan) or check the model"
            )
        ids[text] = token_id
    return ids
