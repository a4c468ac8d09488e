"""Tiny, real LLaMA-architecture Hugging Face checkpoints, built locally in well under a second.

The tests, the README demo and the benchmarks need a checkpoint that goes through the same code paths as the
real OneKE (a 13B LLaMA-2): ``AutoConfig``, ``AutoTokenizer``, ``AutoModelForCausalLM.from_pretrained``,
safetensors shards with an index, ``accelerate`` device maps, greedy ``generate``. No model hub is reachable,
so this module writes such a checkpoint from scratch: a byte-level BPE tokenizer trained on a built-in corpus
of OneKE prompt text (Chinese and English), and random but seed-deterministic weights stored under the
checkpoint keys of ``LlamaForCausalLM``.

A development tool, not part of the installed package (it needs ``tokenizers``, a dev dependency): tests/conftest.py
and bench/common.py put this folder on ``sys.path`` and import it as ``tiny_checkpoint``.

CLI: ``python tools/tiny_checkpoint.py OUT_DIR [--layers N --hidden H ...]`` builds one, prints its path and size.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from oneke_plan.formats.oneke import EXAMPLE_SUFFIX, INSTRUCTIONS, SYSTEM_PROMPT, TASKS

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "UNK_TOKEN",
    "PAD_TOKEN",
    "build_tokenizer",
    "save_sentencepiece_tokenizer",
    "sentencepiece_vocab_size",
    "train_sentencepiece",
    "build_tiny_llama",
    "checkpoint_num_parameters",
    "default_corpus",
    "llama_config_dict",
    "llama_weight_shapes",
    "main",
    "random_llama_state_dict",
    "save_tokenizer",
    "train_tokenizer",
    "write_checkpoint",
]

# LLaMA's special tokens and ids (unk 0, bos 1, eos 2). Like OneKE's config (pad_token_id 0) the pad token is
# <unk>: byte-level BPE never emits <unk>, so padding stays unambiguous without growing the vocabulary.
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = UNK_TOKEN
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)

DEFAULT_VOCAB_SIZE = 1024
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# The text the tokenizer learns its merges from: OneKE's system prompt and instruction texts (from
# oneke_plan.formats.oneke, verbatim as the authors publish them), the shapes of its schemas and answers, and a few
# ordinary sentences. Merges learnt here make OneKE prompts a few hundred tokens long, like the real tokenizer,
# instead of one token per byte.


def _instruction_texts() -> tuple[str, ...]:
    """Every distinct instruction text (zh, en per task, in oneke.TASKS order), the few-shot suffix appended to
    KG's Chinese one: the corpus every earlier checkpoint was trained on, so the tokenizer's merges, and with them
    every test checkpoint, stay byte for byte what they were."""
    texts: list[str] = []
    for task in TASKS:
        for lang, text in INSTRUCTIONS[task].items():
            if task == "KG" and lang == "zh":
                text += EXAMPLE_SUFFIX["zh"]
            if text not in texts:
                texts.append(text)
    return tuple(texts)


_SHAPES = (
    '{"instruction": "", "schema": ["人物", "地理位置", "组织机构"], "input": ""}',
    '[{"event_type": "组织关系-裁员", "trigger": true, "arguments": ["时间", "裁员人数", "裁员方"]}]',
    '[{"entity_type": "人物", "attributes": ["别名", "父母", "出生日期", "国籍", "职业"]}]',
    '{"person": ["Robert Allenby", "Miguel Angel Martin"], "organization": [], "location": ["Australia"]}',
    '{"主演": [{"subject": "喜剧之王", "object": "周星驰"}], "主角": [], "head": "", "tail": ""}',
    '{"组织关系-裁员": [{"trigger": "裁员", "arguments": {"裁员方": "NAN", "时间": "5月份"}}]}',
    '{"人物": {"明治天皇": {"别名": "睦仁", "父母": ["孝明天皇", "英照皇太后"]}}}',
    "[INST] <<SYS>>\n<</SYS>>\n\n [/INST]",
)
_SENTENCES = (
    "消失的“外企光环”，5月份在华裁员900余人，香饽饽变“臭”了。",
    "相比之下，青岛海牛队和广州松日队的雨中之战虽然也是0∶0，但乏善可陈。",
    "嘉永五年11月3日，明治天皇出生，是孝明天皇的第二位皇子。母亲是英照皇太后。",
    "《邪少兵王》是冰火未央写的网络小说连载于旗峰天下。北京是中国的首都，上海是一座国际大都市。",
    "Australia's Robert Allenby and Spain's Miguel Angel Martin shared the lead after the first round.",
    "The company announced on Monday that it would cut 900 jobs in China; its shares fell 3.5% (to $12.40).",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?#%&*+-/:;<=>@_|~",
    "——“”‘’《》（）【】、，。；：？！",
)


def default_corpus() -> list[str]:
    """The built-in training text: small (about 4 KB) so training takes milliseconds, yet OneKE-shaped."""
    return [SYSTEM_PROMPT, *_instruction_texts(), *_SHAPES, *_SENTENCES]


def train_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train a LLaMA-like byte-level BPE tokenizer on the built-in corpus plus ``texts``.

    Byte level, with all 256 bytes in the initial alphabet, so any Chinese, English or JSON text encodes and
    decodes back exactly (no <unk>, no normaliser); the template post-processor prepends ``<s>``, as LLaMA's
    tokenizer does.
    The vocabulary may come out below ``vocab_size`` when the corpus runs out of merges.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} to hold every byte")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*default_corpus(), *(texts or ())], trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != expected_id:  # the trainer puts special tokens first, in order
            raise RuntimeError(f"{token} got id {tok.token_to_id(token)}, expected {expected_id}")
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok


def _tokenizer_config(model_max_length: int) -> dict[str, object]:
    """tokenizer_config.json for the generic fast tokenizer.

    ``PreTrainedTokenizerFast`` loads tokenizer.json as is on transformers 4.46 through 5.x without
    sentencepiece; ``LlamaTokenizerFast`` would, on 5.x, rebuild a sentencepiece-style pipeline over our
    byte-level vocabulary. The BOS comes from tokenizer.json's post-processor; ``add_bos_token`` is written
    for readers of the file, but transformers 5.x drops it when tokenizer.json exists, so there
    ``tokenizer.add_bos_token`` reads False while BOS is still added: check ``input_ids[0]``, not the flag.
    Padding side is left unset (right), as on the real checkpoints: batched generation must ask for left.
    """
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        # As LLaMA's tokenizers: no token_type_ids, which generate on transformers 4.x rejects.
        "model_input_names": ["input_ids", "attention_mask"],
    }


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int = 2048) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (what AutoTokenizer reads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(model_max_length))
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
    }
    _write_json(out / "special_tokens_map.json", special_map)


def build_tokenizer(
    out_dir: str | Path,
    texts: Iterable[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    model_max_length: int = 2048,
) -> None:
    """Train the tiny tokenizer (see :func:`train_tokenizer`) and save it where AutoTokenizer finds it."""
    save_tokenizer(train_tokenizer(texts, vocab_size), out_dir, model_max_length)


def train_sentencepiece(texts: Iterable[str] | None = None, vocab_size: int = 2048) -> bytes:
    """A SentencePiece BPE model (the bytes of a tokenizer.model) trained by sentencepiece's own trainer, laid out
    like LLaMA-2's and OneKE's: <unk> 0, <s> 1, </s> 2, no pad piece, byte fallback, digits split, a dummy prefix.

    ``texts`` replaces the built-in corpus (train_tokenizer adds to it): tests train it on DeepKE's own text. One
    thread and a fixed corpus give the same bytes every time. ``vocab_size`` is an upper bound: a small corpus
    runs out of merges first (``hard_vocab_limit`` off). Rare characters (the last 0.05%, as for Chinese LLaMA's
    vocabulary) are left to byte fallback, so that DeepKE's thousands of Chinese characters fit a small vocabulary.
    """
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts) if texts is not None else default_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def save_sentencepiece_tokenizer(model: bytes, out_dir: str | Path, model_max_length: int = 2048) -> None:
    """Write the tokenizer the way OneKE (a Chinese-Alpaca-2 derivative) releases it: tokenizer.model,
    tokenizer_config.json asking for the slow LlamaTokenizer in legacy mode, special_tokens_map.json, and no
    tokenizer.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": True,
            "use_fast": False,
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": UNK_TOKEN,
            "pad_token": None,
            "clean_up_tokenization_spaces": False,
            "sp_model_kwargs": {},
            "model_max_length": model_max_length,
        },
    )
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
    _write_json(out / "special_tokens_map.json", special_map)


def sentencepiece_vocab_size(model: bytes) -> int:
    """The number of pieces of a SentencePiece model, as sentencepiece itself counts them."""
    import sentencepiece as spm

    return int(spm.SentencePieceProcessor(model_proto=model).get_piece_size())


def _write_json(path: Path, obj: object) -> None:
    """Write JSON the way HF does (indented, UTF-8), so that identical inputs give identical bytes."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling config.json uses."""
    return str(dtype).removeprefix("torch.")


def llama_config_dict(
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    vocab_size: int,
    tie_word_embeddings: bool,
    dtype: torch.dtype,
    max_position_embeddings: int,
) -> dict[str, object]:
    """config.json of a LLaMA-2 style ``LlamaForCausalLM``, in the same form as the project's OneKE config.

    Written by hand rather than by ``LlamaConfig.save_pretrained`` so the file reads the same on transformers
    4.46 and 5.x: ``torch_dtype`` for 4.x, ``dtype`` for 5.x, ``rope_theta`` at top level (5.x converts it).
    """
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(f"num_attention_heads {num_attention_heads} is not a multiple of {num_key_value_heads}")
    dtype_name = _dtype_name(dtype)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "use_cache": True,
    }


def _generation_config_dict() -> dict[str, object]:
    """generation_config.json: greedy, as the OneKE authors decode."""
    return {
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "do_sample": False,
    }


def llama_weight_shapes(config: Mapping[str, object]) -> list[tuple[str, tuple[int, ...]]]:
    """Checkpoint keys and shapes of ``LlamaForCausalLM`` for ``config``, in the model's module order.

    ``lm_head.weight`` is left out when embeddings are tied, as ``save_pretrained`` does. No biases: LLaMA has
    none (attention_bias and mlp_bias are false), and the rotary ``inv_freq`` buffer is not persistent.
    """

    def dim(key: str) -> int:
        value = config[key]
        if not isinstance(value, int):
            raise TypeError(f"config[{key!r}] must be an int, got {value!r}")
        return value

    hidden, inter, vocab = dim("hidden_size"), dim("intermediate_size"), dim("vocab_size")
    q_out = dim("num_attention_heads") * dim("head_dim")
    kv_out = dim("num_key_value_heads") * dim("head_dim")
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(dim("num_hidden_layers")):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.self_attn.q_proj.weight", (q_out, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv_out, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv_out, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, q_out)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    if not config["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def write_config_files(config: Mapping[str, object], out_dir: str | Path) -> None:
    """config.json (``config``, e.g. llama_config_dict's) and generation_config.json (greedy) in ``out_dir``."""
    out = Path(out_dir)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config_dict())


def random_llama_state_dict(
    config: Mapping[str, object], dtype: torch.dtype, seed: int, std: float = 0.02
) -> dict[str, torch.Tensor]:
    """Random weights for ``config``: N(0, std) matrices (HF's own init) and all-ones RMSNorm weights.

    Drawn in float32 from one CPU generator in a fixed key order, then cast, so the same seed gives the same
    bytes on every machine and torch version, independent of transformers' init code.
    """
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in llama_weight_shapes(config):
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            tensor = torch.randn(shape, generator=gen) * std
        state[name] = tensor.to(dtype).contiguous()
    return state


def _split_into_shards(sizes: Sequence[int], shards: int) -> list[range]:
    """Split items (kept in order) into ``shards`` non-empty runs of roughly equal total size.

    A new shard starts once the bytes written so far pass the next equal-share boundary, or when the items
    left are only just enough to give each remaining shard one.
    """
    if not 1 <= shards <= len(sizes):
        raise ValueError(f"shards must be between 1 and the number of tensors ({len(sizes)}), got {shards}")
    total = sum(sizes)
    starts = [0]
    written = 0
    for i, size in enumerate(sizes):
        shards_left = shards - len(starts)
        if i > starts[-1] and shards_left > 0:
            past_boundary = written >= total * len(starts) / shards
            if past_boundary or len(sizes) - i == shards_left:
                starts.append(i)
        written += size
    ends = [*starts[1:], len(sizes)]
    return [range(s, e) for s, e in zip(starts, ends, strict=True)]


def write_checkpoint(state_dict: Mapping[str, torch.Tensor], out_dir: str | Path, shards: int = 1) -> list[Path]:
    """Write ``state_dict`` as HF safetensors: ``model.safetensors``, or ``shards`` files plus an index.

    Files are named ``model-00001-of-00003.safetensors`` and carry ``{"format": "pt"}`` metadata, which
    transformers requires; the index holds ``metadata.total_size`` (bytes of all tensors) and a ``weight_map``
    from every key to its file, as ``save_pretrained`` writes them. Returns the weight files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(state_dict)
    sizes = [state_dict[n].numel() * state_dict[n].element_size() for n in names]
    runs = _split_into_shards(sizes, shards)
    if shards == 1:
        file_names = [SAFE_WEIGHTS_NAME]
    else:
        file_names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map: dict[str, str] = {}
    paths = []
    for file_name, run in zip(file_names, runs, strict=True):
        part = {names[i]: state_dict[names[i]].contiguous() for i in run}
        save_file(part, str(out / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
        paths.append(out / file_name)
    if shards > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / SAFE_WEIGHTS_INDEX_NAME, index)
    return paths


def checkpoint_num_parameters(out_dir: str | Path) -> int:
    """Count the parameters stored in a checkpoint's safetensors files (tied lm_head counted once)."""
    total = 0
    for path in sorted(Path(out_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                numel = 1
                for d in f.get_slice(key).get_shape():
                    numel *= d
                total += numel
    return total


def build_tiny_llama(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shards: int = 1,
    max_position_embeddings: int = 2048,
    texts: Iterable[str] | None = None,
    tokenizer: str = "bpe",
) -> Path:
    """Build a complete tiny LLaMA checkpoint in ``out_dir`` and return its path.

    ``tokenizer``: "bpe" writes a byte-level BPE tokenizer.json; "sentencepiece" a SentencePiece tokenizer.model
    alone, in OneKE's release layout (see :func:`save_sentencepiece_tokenizer`).

    Writes config.json, generation_config.json, the safetensors weights (sharded with an index when
    ``shards`` > 1) and the tokenizer. ``num_key_value_heads`` below ``num_attention_heads`` gives GQA.
    ``vocab_size`` defaults to the tokenizer's length; a larger one pads the embedding like real checkpoints
    (OneKE's 55,296) do. Everything is a pure function of the arguments: same seed, same bytes.

    Random weights rarely pick EOS under greedy decoding (it is 1 of ~1,000 near-equal logits), so generation
    runs several tokens; tests/project/test_tiny.py checks this on DeepKE prompts for the default seed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer not in ("bpe", "sentencepiece"):
        raise ValueError(f"tokenizer must be 'bpe' or 'sentencepiece', not {tokenizer!r}")
    if tokenizer == "sentencepiece":
        sp_model = train_sentencepiece(texts)
        tok_len = sentencepiece_vocab_size(sp_model)
    else:
        tok = train_tokenizer(texts)
        tok_len = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is None:
        vocab_size = tok_len
    elif vocab_size < tok_len:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tok_len} tokens")
    config = llama_config_dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        dtype=dtype,
        max_position_embeddings=max_position_embeddings,
    )
    write_config_files(config, out)
    write_checkpoint(random_llama_state_dict(config, dtype, seed), out, shards)
    if tokenizer == "sentencepiece":
        save_sentencepiece_tokenizer(sp_model, out, model_max_length=max_position_embeddings)
    else:
        save_tokenizer(tok, out, model_max_length=max_position_embeddings)
    return out


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/tiny_checkpoint.py", description="Build a tiny random LLaMA checkpoint."
    )
    parser.add_argument("out_dir", type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--layers", type=int, default=4, help="num_hidden_layers")
    parser.add_argument("--hidden", type=int, default=64, help="hidden_size")
    parser.add_argument("--intermediate", type=int, default=128, help="intermediate_size")
    parser.add_argument("--heads", type=int, default=4, help="num_attention_heads")
    parser.add_argument("--kv-heads", type=int, default=None, help="num_key_value_heads (GQA); default: --heads")
    parser.add_argument("--vocab", type=int, default=None, help="vocab_size; default: the tokenizer's length")
    parser.add_argument("--tie", action="store_true", help="tie lm_head to the input embeddings")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors files")
    parser.add_argument("--max-positions", type=int, default=2048, help="max_position_embeddings")
    parser.add_argument(
        "--tokenizer",
        choices=["bpe", "sentencepiece"],
        default="bpe",
        help="bpe: a byte-level tokenizer.json; sentencepiece: tokenizer.model alone, as OneKE is released",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build one tiny checkpoint, print its path and parameter count."""
    args = _parse_args(argv)
    path = build_tiny_llama(
        args.out_dir,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        tie_word_embeddings=args.tie,
        dtype=_DTYPES[args.dtype],
        seed=args.seed,
        shards=args.shards,
        max_position_embeddings=args.max_positions,
        tokenizer=args.tokenizer,
    )
    print(path)
    print(f"parameters: {checkpoint_num_parameters(path):,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
