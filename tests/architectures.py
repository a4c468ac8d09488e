"""The architecture table the measuring and end-to-end tests share: tiny configs of transformers' own model
classes (grouped-query and multi-query attention, MLA, sliding windows, mixtures of experts, SSM and linear-attention
hybrids, Conv1D layers, a composite config), each with what it stands for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=512,
)
BATCH, PROMPT, NEW = 2, 80, 40  # prompts longer than the windows below, answers that grow past them
SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


@dataclass(frozen=True)
class Arch:
    model_type: str
    kind: str  # what it stands for in the table
    changes: dict[str, Any] = field(default_factory=dict)
    quantizable: bool = True  # whether transformers' bitsandbytes integration converts any of its layers
    composite: bool = False  # a text_config inside: no top-level sizes

    def config(self) -> Any:
        from transformers import AutoConfig

        values = {} if self.composite else dict(SMALL)
        values.update(self.changes)
        return AutoConfig.for_model(self.model_type, **{k: v for k, v in values.items() if v is not None})


MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=32)
TABLE = [
    Arch("llama", "GQA"),
    Arch("qwen2", "GQA, tied embeddings", dict(tie_word_embeddings=True)),
    Arch("mistral", "sliding window", dict(sliding_window=48)),
    Arch("gemma3_text", "sliding and full layers", dict(sliding_window=48, num_hidden_layers=4, layer_types=SLIDING)),
    Arch(
        "falcon",
        "multi-query attention (FalconLinear)",
        dict(multi_query=True, new_decoder_architecture=False, alibi=False, head_dim=None, num_key_value_heads=None),
        quantizable=False,
    ),
    Arch("gpt2", "Conv1D", dict(n_embd=64, n_layer=3, n_head=4, n_positions=512)),
    Arch("gpt_neox", "partial rotary", dict(rotary_pct=0.5)),
    Arch("gptj", "Conv1D-free GPT-J", dict(n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=512)),
    Arch("bloom", "ALiBi", dict(n_layer=3, n_head=4)),
    Arch("opt", "learned positions", dict(ffn_dim=128, word_embed_proj_dim=64)),
    Arch("phi3", "fused qkv", dict(pad_token_id=0)),
    Arch("olmo2", "QK norms"),
    Arch("starcoder2", "biases"),
    Arch("cohere", "parallel blocks"),
    Arch("granite", "scaled residuals"),
    Arch("mixtral", "MoE", dict(num_local_experts=4, num_experts_per_tok=2)),
    Arch("qwen3_moe", "MoE", dict(num_experts=4, decoder_sparse_step=1, **MOE)),
    Arch(
        "gpt_oss",
        "MoE with sliding layers",
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=48, layer_types=SLIDING[:3]),
    ),
    Arch(
        "deepseek_v2",
        "MLA (compressed KV), MoE",
        dict(n_routed_experts=4, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None, **MOE)
        | dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_shared_experts=1),
    ),
    Arch(
        "deepseek_v3",
        "MLA (compressed KV), MoE",
        dict(n_routed_experts=4, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, **MOE)
        | dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_shared_experts=1, head_dim=8),
    ),
    Arch("mamba", "SSM", dict(state_size=8, expand=2, conv_kernel=4, time_step_rank=8)),
    Arch("mamba2", "SSM", dict(state_size=8, expand=2, conv_kernel=4, n_groups=1, num_heads=8, chunk_size=32)),
    Arch(
        "jamba",
        "SSM + attention + MoE hybrid",
        dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, num_experts=4)
        | dict(expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
    ),
    Arch("bamba", "SSM + attention hybrid", dict(num_hidden_layers=4, attn_layer_indices=[1, 3], **MAMBA2)),
    Arch("falcon_h1", "parallel SSM + attention", dict(num_hidden_layers=3, **MAMBA2) | dict(mamba_d_ssm=128)),
    Arch(
        "qwen3_next",
        "linear attention + attention hybrid",
        dict(num_hidden_layers=4, full_attention_interval=2, linear_num_value_heads=4, linear_num_key_heads=2)
        | dict(linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4, shared_expert_intermediate_size=32)
        | MOE,
    ),
    Arch("lfm2", "short convolutions + attention", dict(num_hidden_layers=4, full_attn_idxs=[1, 3], conv_L_cache=3)),
    Arch(
        "gemma3",
        "composite config (text + vision)",
        dict(
            text_config=dict(SMALL, num_hidden_layers=4, vocab_size=320, sliding_window=48, layer_types=SLIDING),
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28
            )
            | dict(patch_size=14),
            mm_tokens_per_image=4,
            image_token_index=300,
            boi_token_index=301,
            eoi_token_index=302,
        ),
        composite=True,
    ),
]
TRANSFORMERS_4 = int(__import__("transformers").__version__.split(".")[0]) < 5
