"""Conversion between the course's `GPT` and Hugging Face `transformers` models.

Two families have an exact counterpart in `transformers`, so a course model can use the
library's `generate`, `Trainer` and `peft` (week 6) and come back again:

    GPT-2 style (learned positions, LayerNorm, GELU)  <->  GPT2LMHeadModel
    Llama style (RoPE, RMSNorm, SwiGLU, GQA)          <->  LlamaForCausalLM

The conversion is a key-by-key copy, because `shared.model` keeps GPT-2's parameter names
(as nanoGPT's `GPT.from_pretrained` does, https://github.com/karpathy/nanoGPT). Two
details make it more than a rename:

- GPT-2 in `transformers` stores its projections as `Conv1D` modules whose weight is
  (in, out), the transpose of `nn.Linear`'s (out, in): those four matrices are transposed.
- Llama has separate q_proj, k_proj, v_proj where we have one fused `c_attn`; its rows are
  [q (n_head * hs) | k (n_kv_head * hs) | v (n_kv_head * hs)], so we split them. RoPE needs
  no permutation because `shared.attention` uses Llama's "rotate_half" layout.

The config mapping lives in two small functions, `hf_config` and `gpt_config`, so each
field's counterpart is visible in one place. Anything without an exact counterpart raises
ValueError naming the field: sinusoidal or no positions, a sliding window (Mistral has one;
GPT-2 and Llama do not), GQA in GPT-2, GPT-2's tanh GELU ("gelu_new": ours is the exact
erf GELU, so real GPT-2 checkpoints, which use the tanh form, are refused rather than
converted approximately), RoPE scaling variants, mixture-of-experts blocks (`n_expert` > 0;
`MixtralForCausalLM` would be their counterpart, and its conversion is left out).

Left out: dropout is a training-time choice and is not carried over (the Hugging Face model
gets 0.0 and `from_hf` returns dropout=0.0; set e.g. `resid_pdrop` yourself to fine-tune
with it); tokenizers (the course's tokenizers are not `PreTrainedTokenizer`s); other
architectures (Mistral, Qwen, ...); loading from the Hub (offline course).
"""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from shared.model import GPT, GPTConfig

# The attention kernel of the converted model: PyTorch's SDPA, which our model also uses.
ATTN_IMPLEMENTATION = "sdpa"

# GPT-2's Conv1D layers: the weights stored as (in, out), transposed on the way through.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Per-layer names, ours -> Llama's (prefix transformer.h.{i}. -> model.layers.{i}.). The
# fused c_attn is handled separately: it becomes q_proj, k_proj, v_proj.
_LLAMA_LAYER = {
    "ln_1": "input_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "ln_2": "post_attention_layernorm",
    "mlp.c_gate": "mlp.gate_proj",  # SiLU(gate(x)) * up(x), then down
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}


def _family(config: GPTConfig) -> str:
    """The transformers family of `config`, "gpt2" or "llama"; else ValueError naming the field."""
    def refuse(field: str, need: str):
        raise ValueError(f"GPTConfig.{field}={getattr(config, field)!r} has no counterpart in "
                         f"transformers: {need}")

    if config.n_expert > 0:
        refuse("n_expert", "GPT2LMHeadModel and LlamaForCausalLM have no mixture of experts "
                           "(need 0)")
    if config.sliding_window is not None:
        refuse("sliding_window", "GPT-2 and Llama attend to the whole context (need None)")
    if config.positions == "learned":
        if config.norm != "layernorm":
            refuse("norm", "GPT2LMHeadModel (learned positions) needs norm='layernorm'")
        if config.mlp != "gelu":
            refuse("mlp", "GPT2LMHeadModel (learned positions) needs mlp='gelu'")
        if config.n_kv_head != config.n_head:
            refuse("n_kv_head", "GPT2LMHeadModel has no grouped-query attention "
                                f"(need n_kv_head == n_head = {config.n_head})")
        return "gpt2"
    if config.positions == "rope":
        if config.norm != "rmsnorm":
            refuse("norm", "LlamaForCausalLM (RoPE) needs norm='rmsnorm'")
        if config.mlp != "swiglu":
            refuse("mlp", "LlamaForCausalLM (RoPE) needs mlp='swiglu'")
        return "llama"
    refuse("positions", "GPT2LMHeadModel needs 'learned', LlamaForCausalLM needs 'rope'")


# --------------------------------------------------------------------------------------
# Config mapping, field by field
# --------------------------------------------------------------------------------------


def hf_config(config: GPTConfig, eos_token_id: int | None = None) -> PretrainedConfig:
    """The `GPT2Config` or `LlamaConfig` describing the same network as `config`."""
    common = dict(
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_weights,
        # Our vocabularies are the course's own, so GPT-2's id 50256 / Llama's 1 and 2 mean
        # nothing here; generation stops at eos_token_id only when one is given.
        bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=None,
        attn_implementation=ATTN_IMPLEMENTATION,
    )
    if _family(config) == "gpt2":
        return GPT2Config(
            n_positions=config.block_size,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            n_inner=config.mlp_hidden,
            activation_function="gelu",  # exact erf GELU, as nn.GELU(); not "gelu_new" (tanh)
            layer_norm_epsilon=config.norm_eps,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            **common,
        )
    return LlamaConfig(
        max_position_embeddings=config.block_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        hidden_size=config.n_embd,
        head_dim=config.head_size,
        intermediate_size=config.mlp_hidden,
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,  # transformers 5 files it under config.rope_parameters
        attention_bias=config.bias,  # q, k, v, o biases
        mlp_bias=config.bias,  # gate, up, down biases (our RMSNorm has no bias either way)
        attention_dropout=0.0,
        **common,
    )


def _rope_theta(cfg: LlamaConfig) -> float:
    """RoPE's base from either transformers 5 (`rope_parameters`) or 4 (`rope_theta`)."""
    # v5: rope_parameters = {"rope_type": ..., "rope_theta": ...}; v4: rope_scaling is None
    # for plain RoPE, else a dict with the scaling "type".
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"LlamaConfig rope type {rope_type!r} (RoPE scaling) has no "
                         "counterpart in GPTConfig: only plain RoPE is supported")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def gpt_config(cfg: PretrainedConfig, bias: bool = True) -> GPTConfig:
    """The `GPTConfig` of a GPT2Config or LlamaConfig (the inverse of `hf_config`).

    bias: for GPT-2, whose layers always have biases, whether to keep them (`from_hf`
    passes False when they are all exactly zero). Llama's biases come from its config.
    """
    if cfg.model_type == "gpt2":
        if cfg.activation_function != "gelu":
            raise ValueError(f"GPT2Config.activation_function={cfg.activation_function!r} has "
                             "no counterpart: GPTConfig's GELU is the exact 'gelu'")
        if not cfg.scale_attn_weights or cfg.scale_attn_by_inverse_layer_idx:
            raise ValueError("GPT2Config attention scaling other than 1/sqrt(head size) has "
                             "no counterpart in GPTConfig")
        return GPTConfig(
            vocab_size=cfg.vocab_size, block_size=cfg.n_positions, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_embd=cfg.n_embd, bias=bias, norm="layernorm",
            norm_eps=cfg.layer_norm_epsilon, mlp="gelu", mlp_hidden=cfg.n_inner,
            positions="learned", tie_weights=cfg.tie_word_embeddings,
        )
    if cfg.model_type == "llama":
        if cfg.hidden_act != "silu":
            raise ValueError(f"LlamaConfig.hidden_act={cfg.hidden_act!r} has no counterpart: "
                             "GPTConfig's SwiGLU uses 'silu'")
        if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
            raise ValueError(f"LlamaConfig.head_dim={cfg.head_dim} has no counterpart: "
                             "GPTConfig's head size is hidden_size // num_attention_heads")
        if cfg.attention_bias != cfg.mlp_bias:
            raise ValueError("LlamaConfig.attention_bias != mlp_bias has no counterpart: "
                             "GPTConfig.bias is one switch for every Linear layer")
        return GPTConfig(
            vocab_size=cfg.vocab_size, block_size=cfg.max_position_embeddings,
            n_layer=cfg.num_hidden_layers, n_head=cfg.num_attention_heads,
            n_kv_head=cfg.num_key_value_heads, n_embd=cfg.hidden_size,
            bias=cfg.attention_bias, norm="rmsnorm", norm_eps=cfg.rms_norm_eps, mlp="swiglu",
            mlp_hidden=cfg.intermediate_size, positions="rope", rope_theta=_rope_theta(cfg),
            tie_weights=cfg.tie_word_embeddings,
        )
    raise ValueError(f"model_type {cfg.model_type!r} is not supported: "
                     "only 'gpt2' and 'llama' convert to the course's GPT")


# --------------------------------------------------------------------------------------
# Weights, key by key
# --------------------------------------------------------------------------------------


def _gpt2_weights(sd: dict, config: GPTConfig) -> dict:
    """Our state dict -> GPT2LMHeadModel's: the same names, Conv1D weights transposed."""
    out = {}
    for k, v in sd.items():
        out[k] = v.t() if k.endswith(_CONV1D) else v
    if not config.bias:  # GPT-2 always has biases: zeros make them do nothing
        C = config.n_embd
        widths = {"ln_1": C, "attn.c_attn": 3 * C, "attn.c_proj": C, "ln_2": C,
                  "mlp.c_fc": config.mlp_hidden, "mlp.c_proj": C}
        like = sd["transformer.wte.weight"]
        for i in range(config.n_layer):
            for name, width in widths.items():
                out[f"transformer.h.{i}.{name}.bias"] = like.new_zeros(width)
        out["transformer.ln_f.bias"] = like.new_zeros(C)
    return out


def _from_gpt2_weights(sd: dict, config: GPTConfig) -> dict:
    out = {k: v.t() if k.endswith(_CONV1D) else v for k, v in sd.items()}
    if not config.bias:
        out = {k: v for k, v in out.items() if not k.endswith(".bias")}
    return out


def _llama_weights(sd: dict, config: GPTConfig) -> dict:
    """Our state dict -> LlamaForCausalLM's: renamed, with c_attn split into q, k, v."""
    hs = config.head_size
    sizes = [config.n_head * hs, config.n_kv_head * hs, config.n_kv_head * hs]
    out = {
        "model.embed_tokens.weight": sd["transformer.wte.weight"],
        "model.norm.weight": sd["transformer.ln_f.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        kinds = ("weight", "bias") if config.bias else ("weight",)
        for kind in kinds:
            # Rows of the fused projection: [q | k | v] (see MultiHeadAttention).
            q, k, v = sd[f"{ours}attn.c_attn.{kind}"].split(sizes, dim=0)
            out[f"{theirs}self_attn.q_proj.{kind}"] = q
            out[f"{theirs}self_attn.k_proj.{kind}"] = k
            out[f"{theirs}self_attn.v_proj.{kind}"] = v
        for a, b in _LLAMA_LAYER.items():
            for kind in ("weight", "bias"):
                if f"{ours}{a}.{kind}" in sd:
                    out[f"{theirs}{b}.{kind}"] = sd[f"{ours}{a}.{kind}"]
    return out


def _from_llama_weights(sd: dict, config: GPTConfig) -> dict:
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if config.bias else ("weight",):
            out[f"{ours}attn.c_attn.{kind}"] = torch.cat(
                [sd[f"{theirs}self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
        for a, b in _LLAMA_LAYER.items():
            for kind in ("weight", "bias"):
                if f"{theirs}{b}.{kind}" in sd:
                    out[f"{ours}{a}.{kind}"] = sd[f"{theirs}{b}.{kind}"]
    return out


def _load(module: torch.nn.Module, state: dict) -> None:
    """Copy every tensor in; strict, so a name left out on either side is an error."""
    module.load_state_dict(state, strict=True)


def to_hf(model: GPT, eos_token_id: int | None = None) -> PreTrainedModel:
    """The same network as a `GPT2LMHeadModel` or `LlamaForCausalLM`, in eval mode.

    Logits agree with `model`'s to float rounding (the tests check 1e-4 in float32). The
    copy is independent: training one does not change the other. eos_token_id: where
    `generate` stops (None: it runs for max_new_tokens).
    """
    config = model.config
    cfg = hf_config(config, eos_token_id=eos_token_id)
    p = next(model.parameters())
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.model_type == "gpt2":
        hf_model, state = GPT2LMHeadModel(cfg), _gpt2_weights(sd, config)
    else:
        hf_model, state = LlamaForCausalLM(cfg), _llama_weights(sd, config)
    hf_model.to(device=p.device, dtype=p.dtype)
    _load(hf_model, state)
    return hf_model.eval()


def from_hf(hf_model: PreTrainedModel) -> GPT:
    """The course's `GPT` with the weights of a GPT2LMHeadModel or LlamaForCausalLM (eval).

    For GPT-2, bias=False is chosen when every bias is exactly zero (what `to_hf` writes for
    a bias-free model): the network computes the same function either way.
    """
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    if hf_model.config.model_type == "gpt2":
        all_zero = all(not v.any() for k, v in sd.items() if k.endswith(".bias"))
        config = gpt_config(hf_model.config, bias=not all_zero)
        state = _from_gpt2_weights(sd, config)
    else:
        config = gpt_config(hf_model.config)
        state = _from_llama_weights(sd, config)
    p = next(hf_model.parameters())
    model = GPT(config).to(device=p.device, dtype=p.dtype)
    _load(model, state)
    return model.eval()
