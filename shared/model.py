"""The course's GPT: a decoder-only transformer with GPT-2's parameter names.

One `GPTConfig` covers the GPT-2 family (LayerNorm, GELU, learned positions, tied
embeddings; Radford et al. 2019) and the Llama family (RMSNorm, SwiGLU, RoPE, grouped-query
attention, no biases, untied; Touvron et al. 2023, https://arxiv.org/abs/2307.09288), plus
Mistral's sliding window and Mixtral's mixture-of-experts blocks (`n_expert` > 0, built
by `shared.moe`). The code follows Karpathy's nanoGPT `model.py`
(https://github.com/karpathy/nanoGPT): the same module names, so a checkpoint converts to
Hugging Face `GPT2LMHeadModel` or `LlamaForCausalLM` with a key-by-key copy (`shared.hf`):

    transformer.wte            token embedding                 (Llama: embed_tokens)
    transformer.wpe            learned positions (only those)
    transformer.h[i].ln_1      norm before attention           (input_layernorm)
    transformer.h[i].attn.c_attn   fused q, k, v projection    (q_proj; k_proj; v_proj)
    transformer.h[i].attn.c_proj   attention output            (o_proj)
    transformer.h[i].ln_2      norm before the MLP             (post_attention_layernorm)
    transformer.h[i].mlp.c_fc      MLP in; SwiGLU's "up"       (up_proj)
    transformer.h[i].mlp.c_gate    SwiGLU only: the gate       (gate_proj)
    transformer.h[i].mlp.c_proj    MLP out; SwiGLU's "down"    (down_proj)
    transformer.h[i].mlp.router    MoE blocks only: the router; the experts are
    transformer.h[i].mlp.experts[e].c_fc, .c_gate, .c_proj     (no HF conversion)
    transformer.ln_f           final norm                      (norm)
    lm_head                    output projection (tied to wte by default)

Left out: shared experts and expert parallelism (see `shared.moe`), multi-head latent
attention, QK-norm, logit soft-capping, the optimizer (it lives in `shared.train`), weight loading
from the Hub (`shared.hf`, `shared.zoo`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.attention import KVCache, MultiHeadAttention, rope_frequencies

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "sinusoidal", "rope", "none")


@dataclass
class GPTConfig:
    """Every architectural choice of the model, validated on construction.

    subtle: `n_kv_head`, `mlp_hidden` and `moe_hidden` given as None are replaced by their
    concrete values here, so a saved config (`to_dict`) describes exactly the model that was
    built. When you derive a config with `dataclasses.replace` and change n_head, n_embd or
    mlp_hidden, pass `n_kv_head=None` / `mlp_hidden=None` / `moe_hidden=None` again to get
    the new defaults.
    """

    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 (faster matmuls)
    block_size: int = 256  # longest sequence (context length) the model is built for
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # query heads
    n_kv_head: int | None = None  # key/value heads: None = n_head (MHA), 1 = MQA, else GQA
    n_embd: int = 384  # width of the residual stream, C
    dropout: float = 0.0  # on embeddings, attention weights, block outputs; 0 for pretraining
    bias: bool = True  # biases in Linear layers and LayerNorm (GPT-2: True, Llama: False)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5  # added to the variance inside the norm
    mlp: str = "gelu"  # "gelu" (GPT-2) | "swiglu" (Llama)
    mlp_hidden: int | None = None  # None: 4*n_embd (gelu), ~8/3*n_embd rounded to 64 (swiglu)
    positions: str = "learned"  # "learned" | "sinusoidal" | "rope" | "none"
    rope_theta: float = 10000.0  # RoPE base; Llama 3 uses 500000 for long contexts
    sliding_window: int | None = None  # attend to at most this many recent tokens (Mistral)
    tie_weights: bool = True  # lm_head shares wte's weight (Press & Wolf 2017)
    # Mixture of experts (shared.moe): each MoE block has n_expert MLPs of width moe_hidden.
    n_expert: int = 0  # experts per MoE block; 0 = a dense model (no MoE blocks)
    moe_hidden: int | None = None  # each expert's MLP width; None = mlp_hidden (as Mixtral)
    n_expert_active: int = 2  # top-k: experts each token is sent to, 1 <= k <= n_expert
    moe_every: int = 1  # block i is MoE when (i + 1) % moe_every == 0: 1 = all, 2 = alternate
    capacity_factor: float | None = None  # each expert takes <= ceil(cf * tokens * k / E);
    #                                       None = no limit (nothing is dropped)
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss (added in training only)

    def __post_init__(self):
        def fail(field: str, allowed: str):
            value = getattr(self, field)
            raise ValueError(f"GPTConfig.{field} must be {allowed}, got {value!r}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not is_int(getattr(self, field)) or getattr(self, field) < 1:
                fail(field, "a positive int")
        if self.n_embd % self.n_head != 0:
            fail("n_embd", f"divisible by n_head={self.n_head}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not is_int(self.n_kv_head) or self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            fail("n_kv_head", f"None or a positive int dividing n_head={self.n_head}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            fail("dropout", "a float in [0, 1)")
        for field in ("bias", "tie_weights"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "True or False")
        if self.norm not in NORMS:
            fail("norm", f"one of {NORMS}")
        if not isinstance(self.norm_eps, int | float) or not self.norm_eps > 0:
            fail("norm_eps", "a positive float")
        if self.mlp not in MLPS:
            fail("mlp", f"one of {MLPS}")
        if self.mlp_hidden is None:
            # SwiGLU has three matrices instead of two, so 8/3 * C keeps the parameter count
            # of a 4 * C GELU MLP (Shazeer 2020, https://arxiv.org/abs/2002.05202).
            self.mlp_hidden = (
                4 * self.n_embd if self.mlp == "gelu" else 64 * math.ceil(8 * self.n_embd / 3 / 64)
            )
        if not is_int(self.mlp_hidden) or self.mlp_hidden < 1:
            fail("mlp_hidden", "None or a positive int")
        if self.positions not in POSITIONS:
            fail("positions", f"one of {POSITIONS}")
        if not isinstance(self.rope_theta, int | float) or not self.rope_theta > 0:
            fail("rope_theta", "a positive float")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            fail("n_embd", f"such that the head size n_embd // n_head is even for RoPE "
                           f"(head size {self.n_embd // self.n_head})")
        if self.positions == "sinusoidal" and self.n_embd % 2:
            fail("n_embd", "even for sinusoidal positions")
        if self.sliding_window is not None and (
            not is_int(self.sliding_window) or self.sliding_window < 1
        ):
            fail("sliding_window", "None or an int >= 1")
        if not is_int(self.n_expert) or self.n_expert < 0:
            fail("n_expert", "0 (dense) or a positive int")
        if self.moe_hidden is None:
            self.moe_hidden = self.mlp_hidden
        if not is_int(self.moe_hidden) or self.moe_hidden < 1:
            fail("moe_hidden", "None or a positive int")
        if not is_int(self.n_expert_active) or self.n_expert_active < 1 or (
            self.n_expert > 0 and self.n_expert_active > self.n_expert
        ):
            fail("n_expert_active", f"an int in [1, n_expert={self.n_expert}]")
        if not is_int(self.moe_every) or not 1 <= self.moe_every <= self.n_layer:
            fail("moe_every", f"an int in [1, n_layer={self.n_layer}]")
        if self.capacity_factor is not None and (
            not isinstance(self.capacity_factor, int | float)
            or isinstance(self.capacity_factor, bool) or not self.capacity_factor > 0
        ):
            fail("capacity_factor", "None or a positive float")
        if not isinstance(self.moe_aux_loss_coef, int | float) or isinstance(
            self.moe_aux_loss_coef, bool
        ) or not self.moe_aux_loss_coef >= 0:
            fail("moe_aux_loss_coef", "a float >= 0")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` has a mixture of experts instead of one MLP."""
        return self.n_expert > 0 and (layer_idx + 1) % self.moe_every == 0

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """The inverse of `to_dict`; unknown keys raise ValueError (a typo would be ignored)."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's nn.LayerNorm cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean subtraction and bias.

    Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467; used by Llama. Computed in
    float32 and cast back, as HF's LlamaRMSNorm does, because squaring bf16 loses precision.
    """

    def __init__(self, ndim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return LayerNorm(config.n_embd, bias=config.bias, eps=config.norm_eps)


class MLP(nn.Module):
    """The position-wise feed-forward network.

    gelu:   c_proj(GELU(c_fc(x)))                    (GPT-2; exact GELU, see below)
    swiglu: c_proj(SiLU(c_gate(x)) * c_fc(x))        (Llama: c_fc = up_proj,
                                                      c_gate = gate_proj, c_proj = down_proj)

    subtle: GPT-2 was trained with GELU's tanh approximation; we use the exact erf form
    (`nn.GELU()`), so a conversion to GPT2LMHeadModel sets activation_function="gelu".
    """

    def __init__(self, config: GPTConfig, hidden: int | None = None):
        super().__init__()
        C, H = config.n_embd, config.mlp_hidden if hidden is None else hidden  # hidden: experts
        self.c_fc = nn.Linear(C, H, bias=config.bias)
        self.c_gate = nn.Linear(C, H, bias=config.bias) if config.mlp == "swiglu" else None
        self.act = nn.SiLU() if config.mlp == "swiglu" else nn.GELU()
        self.c_proj = nn.Linear(H, C, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.c_gate is None:
            h = self.act(self.c_fc(x))  # (B, T, H)
        else:
            h = self.act(self.c_gate(x)) * self.c_fc(x)  # (B, T, H): the gate scales "up"
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    Pre-norm (GPT-2, Xiong et al. 2020) keeps an untouched residual path from input to
    output, which is what lets deep stacks train without warm-up tricks.
    """

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = MultiHeadAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        if config.is_moe_layer(layer_idx):
            # Imported here because shared.moe builds its experts from this module's MLP.
            from shared.moe import MoE

            self.mlp = MoE(config)  # the same attribute name: state-dict keys stay GPT-2-like
        else:
            self.mlp = MLP(config)

    def forward(self, x, rope=None, cache: KVCache | None = None, key_mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope=rope, cache=cache, key_mask=key_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


def sinusoidal_positions(start: int, length: int, dim: int, device=None) -> torch.Tensor:
    """(length, dim) fixed encodings of positions start .. start + length - 1.

    PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(same) (Vaswani et al. 2017,
    sec. 3.5). Computed on the fly, not stored: it is cheap, needs no state_dict entry and
    is never cast to bf16 by `model.to(dtype)`.
    """
    pos = torch.arange(start, start + length, device=device).float()[:, None]  # (T, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=device).float() / dim)  # (dim/2,)
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size), and the loss if given targets.

    Builds on the meta device without allocating memory, which is how a notebook counts the
    parameters of a 7B-shaped config:  `with torch.device("meta"): GPT(cfg).num_params()`.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions == "learned":  # the only kind of position with parameters
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **layers,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # Weight tying (Press & Wolf 2017, https://arxiv.org/abs/1608.05859): the same
            # matrix embeds tokens and scores them, saving V * C parameters.
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two projections into the residual stream, so
        # scale their init by 1/sqrt(2 * n_layer) to keep the stream's variance from growing
        # with depth (Radford et al. 2019, sec. 2.3).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) long -> (logits (B, T, V), loss or None).

        loss: mean cross-entropy over every position whose target is not -100 (the label
        that SFT uses to skip prompt tokens); NaN if all targets are -100. With MoE blocks
        and the model in training mode, plus moe_aux_loss_coef * the mean load-balancing
        loss of the MoE blocks; in eval mode it is the pure cross-entropy, so validation
        losses compare with dense models'.
        cache: positions start at cache.pos; the new keys/values are stored and pos advanced.
        positions, key_mask (continuous batching, `shared.engine`; both default to None, the
        usual case): positions (B, T) long gives each token its own position, for a batch
        whose rows have different lengths; key_mask (B, cache.pos + T) bool marks the real
        keys of rows padded on the left (see `MultiHeadAttention.forward`).
        """
        cfg = self.config
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a 2-D long tensor (B, T), got {idx.dtype} {idx.shape}")
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        end = start + T  # 1 + the last position
        if positions is not None:
            if positions.shape != (B, T) or positions.dtype != torch.long:
                raise ValueError(f"positions must be a long tensor of shape {(B, T)}, got "
                                 f"{positions.dtype} {tuple(positions.shape)}")
            if int(positions.min()) < 0:
                raise ValueError("positions must be >= 0")
            end = int(positions.max()) + 1
        if cfg.positions in ("learned", "sinusoidal") and end > cfg.block_size:
            if positions is not None:
                raise ValueError(f"position {end - 1} is beyond block_size={cfg.block_size}")
            raise ValueError(f"sequence of {start + T} tokens (cache {start} + input {T}) is "
                             f"longer than block_size={cfg.block_size}")
        # RoPE and "none" have no table of positions, so longer inputs run (quality is
        # another matter: the model never saw such offsets in training).

        x = self.transformer.wte(idx)  # (B, T, C)
        if cfg.positions == "learned":
            pos = torch.arange(start, end, device=idx.device) if positions is None else positions
            x = x + self.transformer.wpe(pos)  # (T, C) broadcasts over B; or (B, T, C)
        elif cfg.positions == "sinusoidal":
            # Subtle: the encodings have norm sqrt(C/2) while GPT-2-initialised embeddings
            # (std 0.02) have norm ~0.02 sqrt(C); unscaled, the positions drown the tokens and
            # the model barely learns. Vaswani et al. (sec. 3.4) multiply the embeddings by
            # sqrt(C); so do we (the tied lm_head still sees the unscaled matrix).
            x = x * math.sqrt(cfg.n_embd)
            if positions is None:
                pe = sinusoidal_positions(start, T, cfg.n_embd, device=idx.device)  # (T, C)
            else:
                pe = sinusoidal_positions(0, end, cfg.n_embd, device=idx.device)[positions]
            x = x + pe.to(x.dtype)
        x = self.transformer.drop(x)
        rope = None
        if cfg.positions == "rope":
            cos, sin = rope_frequencies(cfg.head_size, end, cfg.rope_theta, idx.device)
            if positions is None:
                rope = cos[start:], sin[start:]  # (T, hs) each: this chunk's positions
            else:
                rope = cos[positions][:, None], sin[positions][:, None]  # (B, 1, T, hs) per row
        for block in self.transformer.h:
            x = block(x, rope=rope, cache=cache, key_mask=key_mask)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        if cache is not None:
            cache.pos += T

        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} != idx {tuple(idx.shape)}")
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
            if self.training and cfg.n_expert > 0 and cfg.moe_aux_loss_coef > 0:
                aux = [b.mlp.aux_loss for i, b in enumerate(self.transformer.h)
                       if cfg.is_moe_layer(i)]
                loss = loss + cfg.moe_aux_loss_coef * torch.stack(aux).mean().to(loss.dtype)
        return logits, loss

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache for `batch_size` sequences."""
        return KVCache(self.config.n_layer, batch_size)

    def num_params(self, non_embedding: bool = True, active: bool = False) -> int:
        """Number of parameters (a tied matrix counts once).

        non_embedding (nanoGPT's convention, the N of scaling laws): leave out the pure
        lookup tables, which cost no FLOPs per token - the learned positions wpe, and the
        token embedding wte *unless* it is tied to lm_head, where it also does the output
        matmul and so stays in.
        active: count only the parameters one token uses - in each MoE block the router and
        n_expert_active of its n_expert experts (equal for a dense model).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.numel()
        if active:
            for i, block in enumerate(self.transformer.h):
                if self.config.is_moe_layer(i):
                    per_expert = sum(p.numel() for p in block.mlp.experts[0].parameters())
                    n -= (self.config.n_expert - self.config.n_expert_active) * per_expert
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N + 12 * n_layer * n_embd * T.

        A forward pass costs 2 FLOPs (multiply + add) per weight per token, 2N, plus the
        attention scores q k^T and the weighted sum att v, 2 * 2 * n_layer * T * C; the
        backward pass costs twice the forward. Hence 3 * (2N + 4 L C T) (Kaplan et al. 2020,
        https://arxiv.org/abs/2001.08361, sec. 2.1; PaLM, Chowdhery et al. 2022, appendix B).
        Divide by 3 for inference. N = num_params(non_embedding=True); T defaults to
        block_size. Causal masking and sliding windows are not subtracted: the kernels here
        compute the masked scores anyway, and MFU conventions count them. With MoE blocks N
        counts the active parameters (`num_params(active=True)`): a token runs through k
        experts, not all of them, and dropped assignments are not subtracted.
        """
        T = self.config.block_size if seq_len is None else seq_len
        if T < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        N = self.num_params(non_embedding=True, active=True)
        return 6 * N + 12 * self.config.n_layer * self.config.n_embd * T

    def estimate_mfu(
        self, tokens_per_s: float, peak_flops: float, seq_len: int | None = None
    ) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak.

        peak_flops: e.g. 312e12 for an A100's bf16 tensor cores, or the matmul FLOP/s
        measured on this machine (week 1). PaLM, Chowdhery et al. 2022, appendix B.
        """
        if tokens_per_s <= 0 or peak_flops <= 0:
            raise ValueError("tokens_per_s and peak_flops must be positive")
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops
