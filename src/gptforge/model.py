"""GPT-2 in one file: config, presets, attention, MLP, block, GPT, KV cache, the chunked loss.

    from gptforge.model import GPT, GPTConfig
    model = GPT.from_preset("small", vocab_size=65)            # a ~10M model for a char vocabulary
    logits, _ = model(idx)                                     # (B, T, vocab_size)
    _, loss = model(idx, targets)                              # mean cross-entropy, nats/token
    cache = model.new_kv_cache(batch_size=1)                   # prefill, then one token at a time

Hugging Face's file layout (import and export of GPT-2 weights) lives beside this file, in hf.py.

The architecture is exactly GPT-2's (so weights interchange with the Hugging Face ecosystem):
token + learned position embeddings, pre-LayerNorm blocks of causal self-attention and a 4x
GELU(tanh) MLP (`activation = "gelu"`: the exact GELU, also in Hugging Face's GPT-2) with residual connections, a final LayerNorm, and an LM head tied to the token
embedding.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.errors import GptforgeError

# ----------------------------------------------------------------------------------------- config

# The MLP's GELU by name -> F.gelu's `approximate`: GPT-2's tanh approximation, or the exact erf form.
ACTIVATIONS = {"gelu_tanh": "tanh", "gelu": "none"}


@dataclass
class GPTConfig:
    """The model's shape. Validated on construction; `padded_vocab_size` is what the weights use."""

    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    block_size: int = 1024
    """Context length: the most positions the model sees at once (learned position embeddings)."""
    vocab_size: int = 50257
    """Number of token ids the tokenizer produces (GPT-2's BPE: 50,257)."""
    dropout: float = 0.0
    """Dropout on embeddings and residual paths, and on the attention weights unless attn_dropout says
    otherwise, in [0, 1); off in eval mode."""
    attn_dropout: float | None = None
    """Dropout on the attention weights alone, in [0, 1); None: `dropout`. 0 keeps a CPU's attention in
    the fused (flash) kernel, which has no dropout: with it, attention takes a slower path."""
    bias: bool = True
    """Biases in the Linear layers and LayerNorms (GPT-2 has them)."""
    tie_embeddings: bool = True
    """LM head shares its weight with the token embedding (GPT-2 does)."""
    pad_vocab_multiple: int = 64
    """Round the embedding's rows up to a multiple of this for faster matmuls (1 = no padding)."""
    activation: str = "gelu_tanh"
    """The MLP's GELU: "gelu_tanh" (GPT-2's tanh approximation, Hugging Face's "gelu_new") or "gelu"
    (the exact erf form, nanoGPT's; several times cheaper than the tanh form on some CPUs)."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pad_vocab_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GptforgeError(f"GPTConfig.{name}={value!r} is invalid; it must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise GptforgeError(f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                                "pick n_embd a multiple of n_head")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise GptforgeError(f"GPTConfig.dropout={self.dropout!r} is invalid; it must be a number in [0, 1)")
        self.dropout = float(self.dropout)
        if self.attn_dropout is not None:
            if (isinstance(self.attn_dropout, bool) or not isinstance(self.attn_dropout, (int, float))
                    or not 0 <= self.attn_dropout < 1):
                raise GptforgeError(f"GPTConfig.attn_dropout={self.attn_dropout!r} is invalid; "
                                    "it must be a number in [0, 1), or None for `dropout`'s")
            self.attn_dropout = float(self.attn_dropout)
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise GptforgeError(f"GPTConfig.{name}={getattr(self, name)!r} is invalid; it must be true or false")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise GptforgeError(f"GPTConfig.activation={self.activation!r} is invalid; "
                                f"choose one of {', '.join(ACTIVATIONS)}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def attn_dropout_p(self) -> float:
        """The attention weights' dropout: `attn_dropout`, or `dropout` when that is None."""
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """`GPTConfig.from_preset("gpt2", vocab_size=65)`: a named shape with some fields replaced."""
        if name not in PRESETS:
            raise GptforgeError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise GptforgeError(
                f"unknown GPTConfig field(s) {', '.join(unknown)}; the fields are: {', '.join(sorted(allowed))}"
            )
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Presets are data. The small ones train on a CPU; their sizes (non-embedding parameters, i.e.
# without token and position embeddings) are in the README's table. vocab_size defaults to GPT-2's;
# override it with the tokenizer's (e.g. 65 for Tiny Shakespeare's characters).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # ~0.1M: tests
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),  # ~0.8M: a CPU run in a minute
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # ~10.6M: nanoGPT's Shakespeare size
    "base": dict(n_layer=6, n_head=10, n_embd=640, block_size=256),  # ~29.5M: a long CPU run
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1558M
}


# ----------------------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of the positions seen so far, for generation: prefill, then a token at a time.

    `k` and `v` are (n_layer, B, n_head, max_len, head_dim); positions [0, pos) are filled.
    GPT.forward writes each layer's new keys and values at [pos, pos + T) and then advances `pos`.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        """Forget everything (the buffers are reused)."""
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer's new (B, nh, T, hs) keys/values at [pos, pos+T); return all of [0, pos+T)."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------------------- layers


class Dropout(nn.Dropout):
    """nn.Dropout, with a cheaper mask on a CPU. torch's CPU dropout draws a double (two 32-bit outputs
    of one serial Mersenne Twister) per element: ~7.7 ns each on the Intel Xeon of docs/benchmarks.md,
    a quarter of the 10-minute char recipe's step at dropout 0.1. This draws 64-bit numbers from the
    same generator and uses three 16-bit lanes of each, one per element (~2.4 ns). The rate is p rounded
    to a multiple of 1/65536, the kept values scaled by 1/(1 - that rate), so the expectation is x's.
    Under torch.compile (which traces torch's dropout and fuses it), on other devices and for rates
    that round to 0 or 1, torch's own dropout runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = round(self.p * 65536)  # of every 65,536 elements
        if (not self.training or x.device.type != "cpu" or not 0 < dropped < 65536
                or torch.compiler.is_compiling()):
            return super().forward(x)
        return torch.where(cpu_keep_mask(x.shape, dropped), x, 0) * (65536 / (65536 - dropped))


def cpu_keep_mask(shape: torch.Size, dropped: int) -> torch.Tensor:
    """A bool tensor of `shape`, each element False with probability dropped / 65536, drawn from torch's
    default CPU generator (so torch.manual_seed and its saved state govern it)."""
    n = math.prod(shape)
    rows = -(-n // 3)
    lanes = torch.empty(rows, dtype=torch.int64, device="cpu").random_().view(torch.int16).view(rows, 4)
    # random_() fills [0, 2**63): the low 48 bits' three int16 lanes are uniform, the top one is not.
    lanes = lanes[:, :3] if sys.byteorder == "little" else lanes[:, 1:]
    return (lanes >= dropped - 32768).reshape(-1)[:n].view(shape)


class _CPUBf16CausalAttention(torch.autograd.Function):
    """Causal flash attention of bf16 q, k, v on a CPU: torch's bf16 flash kernel forward, its float32
    kernel backward (from the bf16 forward's output and log-sum-exp). On the Intel Xeon of
    docs/benchmarks.md the bf16 backward kernel ran 1.1x (context 256) to 4x (context 64) slower than
    the float32 one on the same shapes, the casts cost little (q, k, v are B*T*C each), and the float32
    gradients are no less precise. The same function as F.scaled_dot_product_attention(q, k, v,
    is_causal=True)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, True)
        return tuple(g.to(torch.bfloat16) for g in grads)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True); for bf16 training
    on a CPU (no dropout, not compiling), with the float32 backward kernel (_CPUBf16CausalAttention)."""
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and dropout_p == 0.0 and torch.is_grad_enabled()
            and q.requires_grad and not torch.compiler.is_compiling()):
        return _CPUBf16CausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.attn_dropout_p
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

        mask, is_causal = None, True
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, start+T, hs)
            k, v = k.to(q.dtype), v.to(q.dtype)  # under autocast q may be bf16 while the cache is fp32
            if start > 0:
                # is_causal aligns the mask's top-left corner, which is wrong once queries sit after
                # cached keys: query i (absolute position start+i) may see keys 0..start+i.
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                # T == 1: the one new token may see every cached key, so no mask at all.
        dropout_p = self.dropout if self.training else 0.0
        if mask is None and is_causal:
            y = causal_attention(q, k, v, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)
        self.approximate = ACTIVATIONS[config.activation]  # GPT-2's "gelu_new" is the tanh approximation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        # GPT-2 uses LayerNorm eps 1e-5 (torch's default).
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# ----------------------------------------------------------------------------------------- loss


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul in here (or x's own dtype without autocast)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class LogitsBuffer:
    """The LM head's logits chunk, kept from one loss to the next on a CPU. A chunk of GPT-2's vocabulary
    is large (2,048 x 50,304 bf16: 206 MB); allocated afresh each update, every one of its 4 KB pages
    is a page fault when first written (~50,000 an update, ~0.9 us each on the Intel Xeon of
    docs/benchmarks.md), and a freed block that size leaves a hole the next one may not fit. The
    chunk is the step's largest block anyway, so keeping it costs little peak memory (~40 MB more for
    the GPT-2-token CPU recipe's step). GPT.forward uses it for training losses only."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def get(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised (rows, cols) tensor of `dtype` on the CPU, from the kept buffer."""
        n = rows * cols
        b = self.buffer
        # (one made under torch.inference_mode cannot be written outside it)
        stale = b is None or b.dtype != dtype or b.numel() < n
        if stale or (b.is_inference() and not torch.is_inference_mode_enabled()):
            self.buffer = None  # free the old one before making the new one
            self.buffer = torch.empty(n, dtype=dtype)
        return self.buffer[:n].view(rows, cols)


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `x @ weight.T` against targets, without the full logits tensor.

    Rows are processed `chunk` at a time: each chunk's logits (chunk x padded_vocab) are made in
    the compute dtype, soft-maxed (in float32, or for 16-bit logits by the 16-bit softmax kernel,
    which accumulates in float32), and turned straight into their gradient
    (softmax - onehot), which is multiplied into grad_x and grad_weight right away. Backward then
    only scales those by the incoming gradient. So the LM head costs its three matmuls (no
    recomputation) and memory holds one chunk of logits at a time instead of B*T*vocab floats.
    Padded vocabulary columns (>= vocab_size) are set to -inf before the softmax: they get zero
    probability and zero gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, chunk: int, compute_dtype: torch.dtype,
                grad_enabled: bool, logits_buffer: LogitsBuffer | None):
        # x: (N, C), weight: (Vp, C), targets: (N,) with -1 = ignore
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
            valid = targets != -1
            # needs_input_grad is true for a weight that requires grad even under torch.no_grad()
            # (evaluation): the gradients are made here, eagerly, so only when backward can use them.
            need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
            if need_grad:
                grad_x = torch.empty_like(xc)  # (N, C)
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)  # (Vp, C)
            loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            for s in range(0, x.size(0), chunk):
                x_s, ok = xc[s : s + chunk], valid[s : s + chunk]  # (n, C), (n,)
                t = targets[s : s + chunk].clamp(min=0).unsqueeze(1)  # (n, 1); ignored rows masked below
                if logits_buffer is not None and x_s.device.type == "cpu":  # (n, Vp) in the compute dtype
                    logits = torch.mm(x_s, wc.t(), out=logits_buffer.get(x_s.size(0), wc.size(0), wc.dtype))
                else:
                    logits = x_s @ wc.t()
                if logits.size(1) > vocab_size:
                    logits[:, vocab_size:] = float("-inf")
                # The CPU and CUDA (log-)softmax kernels read a row before writing it, so there the
                # result overwrites the logits: one chunk-sized tensor, the step's largest, not two.
                out = logits if logits.device.type in ("cpu", "cuda") else torch.empty_like(logits)
                if compute_dtype == torch.float32:
                    probs = torch.ops.aten._log_softmax.out(logits, -1, False, out=out)  # log-probs, for now
                    row_loss = -probs.gather(1, t).squeeze(1)
                    probs = probs.exp_() if need_grad else probs  # softmax in place
                elif (compute_dtype == torch.bfloat16 and logits.device.type == "cpu"
                      and not torch.compiler.is_compiling()):  # (its data-dependent rows would break the graph)
                    # bf16 on a CPU: the softmax kernel reads the bf16 logits once and writes bf16
                    # probabilities (float32 inside); a float32 log_softmax of the chunk moves several
                    # times the bytes and was most of a CPU bf16 step. A row's loss is -log p_t, read
                    # from one bf16 probability: as precise as the max-probability form below (both
                    # round a probability to bf16: <= 2**-9 in the log) without its two passes over
                    # the chunk (~5% of the 6-layer step). bf16 has float32's exponent range, so p_t
                    # only underflows for a loss over 87 nats; those rows are recomputed exactly.
                    probs = torch.ops.aten._softmax.out(logits, -1, False, out=out)  # (n, Vp)
                    p_t = probs.gather(1, t).squeeze(1).float()
                    row_loss = -p_t.log()
                    low = (p_t < torch.finfo(torch.bfloat16).tiny).nonzero().squeeze(1)
                    if low.numel():  # (a host read: a CPU-only path)
                        redo = (x_s[low] @ wc.t()).float()
                        redo[:, vocab_size:] = float("-inf")
                        row_loss[low] = redo.logsumexp(-1) - redo.gather(1, t[low]).squeeze(1)
                else:
                    # Other 16-bit cases (float16, whose tiny exponent range would underflow p_t at
                    # ~10 nats; any GPU, where a host read would synchronise): log-sum-exp = max logit
                    # - log(max probability), which never underflows (max probability >= 1/vocab),
                    # to the precision of the 16-bit logits themselves.
                    top, target = logits.amax(-1).float(), logits.gather(1, t).squeeze(1).float()  # (n,)
                    probs = torch.ops.aten._softmax.out(logits, -1, False, out=out)  # (n, Vp)
                    row_loss = top - probs.amax(-1).float().log() - target
                del logits
                loss_sum += (row_loss * ok).sum()
                if need_grad:
                    grad = probs  # d(loss_i)/d(logits_i) = p_i - onehot(t_i)
                    # The n target entries by flat index (scatter_add_ on 16-bit CPU tensors copies all n x Vp).
                    at = torch.arange(grad.size(0), device=grad.device) * grad.size(1) + t.squeeze(1)
                    flat = grad.view(-1)
                    # index_fill_/index_copy_, not `flat[at] = 0`: indexed assignment of a Python number
                    # copies it to the device first, a host synchronisation on CUDA every chunk.
                    if compute_dtype == torch.float32:
                        flat.index_copy_(0, at, flat.index_select(0, at) - 1)
                    else:  # p_t - 1 as minus the sum of the other probabilities (a 16-bit p_t near 1, as in a
                        # well-trained model, leaves p_t - 1 with no correct digit, or 0); the 16-bit sum
                        # accumulates in float32 and rounds once, relative to 1 - p_t itself.
                        flat.index_fill_(0, at, 0)
                        flat.index_copy_(0, at, -grad.sum(-1))
                    # Ignored rows: zero their n x C inputs/outputs rather than their n x Vp gradient.
                    okf = ok.to(compute_dtype).unsqueeze(1)  # (n, 1)
                    grad_x[s : s + chunk] = (grad @ wc) * okf
                    if compute_dtype == torch.float32:
                        grad_w.addmm_(grad.t(), x_s * okf)
                    else:  # no mixed-dtype addmm on every device: bf16 products summed in float32, a
                        # slice of the vocabulary at a time (the whole product and its float32 copy
                        # were 1.5x grad_w on top of the chunk: the step's peak memory)
                        xo = x_s * okf
                        for v in range(0, grad.size(1), 8192):
                            grad_w[v : v + 8192] += grad[:, v : v + 8192].t() @ xo
                del probs
            # 0/0 = nan when every target is ignored, as F.cross_entropy gives.
            n_valid = valid.sum().to(torch.float32)
            loss = loss_sum / n_valid
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w, n_valid.clamp(min=1))
            ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if getattr(ctx, "handed_over", False):
            raise RuntimeError("chunked_cross_entropy's gradients are made in its forward and handed over "
                               "by its first backward: back-propagate through it once (no retain_graph)")
        ctx.handed_over = True
        grad_x, grad_w, denom = ctx.saved_tensors
        scale = grad_out.to(torch.float32) / denom
        gx = (grad_x.float() * scale).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        # Scaled in place: a scaled copy of the float32 accumulator (77 MB at GPT-2's vocabulary and 384
        # wide) beside it was the bf16 6-layer CPU step's peak memory (~115 MB of peak RSS).
        gw = grad_w.mul_(scale).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None, None, None, None


def chunked_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk: int = 256,
    logits_buffer: LogitsBuffer | None = None,
) -> torch.Tensor:
    """`F.cross_entropy((x @ weight.T)[:, :vocab_size], targets, ignore_index=-1)`, in row chunks.

    x: (N, C); weight: (padded_vocab, C); targets: (N,). Under autocast the matmuls run in the
    autocast dtype and the softmax in float32, as autocast would do for the plain version. On a CPU
    the chunks' logits are made in `logits_buffer` when one is given (kept from call to call).
    """
    # Grad mode is always off inside an autograd.Function's forward: read it here.
    return _ChunkedLMHeadLoss.apply(x, weight, targets, vocab_size, chunk, _compute_dtype(x),
                                    torch.is_grad_enabled(), logits_buffer)


# ----------------------------------------------------------------------------------------- GPT


class GPT(nn.Module):
    """GPT-2. `forward(idx, targets=None, kv_cache=None) -> (logits, loss)`; see docs/design.md."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # Rows of the LM-head/cross-entropy computed at once when targets are given (0 = the plain
        # F.cross_entropy over the full logits tensor; both give the same loss and gradients).
        # Fewer, larger chunks mean fewer passes accumulating grad_weight: on a 2-core CPU a bf16 step
        # of the GPT-2-vocabulary model ran ~12% faster with 2048 rows than 512, float32 alike, at
        # ~400 MB of float32 (or ~200 MB of bf16) logits per chunk with GPT-2's vocabulary.
        self.loss_chunk_size = 2048
        self.logits_buffer = LogitsBuffer()  # the CPU loss's logits chunk, reused (not a parameter)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if self.transformer.wte.weight.device.type == "meta":
            return  # shapes only (e.g. counting parameters): there are no values to initialise
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two of them
        # to the residual stream, and this keeps its variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT:
        """`GPT.from_preset("mini", vocab_size=65)`: a freshly initialised model of a named shape."""
        return cls(GPTConfig.from_preset(name, **overrides))

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(padded_vocab, n_embd): the token embedding when tied."""
        return self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight

    # ------------------------------------------------------------------------------ forward

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`last_only=True` (without targets) returns only the last position's logits, (B, 1, V):
        all that sampling needs, and it spares the LM head (most of a small model's FLOPs) the rest."""
        B, T = idx.size()
        start = 0 if kv_cache is None else kv_cache.pos
        if start + T > self.config.block_size:
            raise GptforgeError(
                f"sequence of {start + T} positions is longer than the model's block_size "
                f"{self.config.block_size}; crop the input to the last {self.config.block_size} tokens"
            )
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise GptforgeError(
                f"KV cache holds {kv_cache.max_len} positions, {start + T} needed; make a larger cache "
                "with model.new_kv_cache(max_len=...)"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.pos += T

        V, W = self.config.vocab_size, self.lm_head_weight
        if targets is None:
            if last_only:
                x = x[:, -1:, :]  # (B, 1, C)
            # Only the real vocabulary's rows: padded ids never get a logit, hence no probability.
            return F.linear(x, W[:V]), None  # (B, T, V) or (B, 1, V)
        # With targets only the loss comes back (logits None) whatever the chunk size: the chunked path
        # never makes the full logits tensor, and callers must not depend on which path ran.
        if self.loss_chunk_size:
            # The chunked path masks padded columns to -inf inside the softmax.
            # Training only: evaluation runs in float32 (a buffer twice the size, kept through the next
            # training step's forward) and under torch.compile the traced loss makes its own.
            training = torch.is_grad_enabled() and not torch.compiler.is_compiling()
            buffer = self.logits_buffer if training else None
            return None, chunked_cross_entropy(x.view(B * T, -1), W, targets.reshape(-1), V, self.loss_chunk_size,
                                               buffer)
        # The plain path slices the padded columns off before the softmax.
        logits = F.linear(x, W)[..., :V]  # (B, T, V)
        return None, F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=-1)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` (default block_size)."""
        c = self.config
        max_len = c.block_size if max_len is None else max_len
        if max_len < 1 or max_len > c.block_size:
            raise GptforgeError(f"KV cache max_len={max_len} must be in [1, block_size={c.block_size}]")
        p = self.transformer.wte.weight
        return KVCache(c.n_layer, batch_size, c.n_head, c.head_dim, max_len,
                       device=p.device if device is None else device, dtype=p.dtype if dtype is None else dtype)

    # ------------------------------------------------------------------------------ accounting

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, tied ones counted once. `non_embedding=True` leaves out the token and position
        embeddings (Kaplan et al.'s N; the tied LM head goes with the token embedding)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
            if self.lm_head is not None:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token, for MFU.

        6 * (n_layer * 12 * n_embd**2 + n_embd * padded_vocab) + 12 * n_layer * n_embd * block_size:
        2 FLOPs per multiply-add, 3x for forward + backward, over every weight matmul (the four
        per block plus the LM head), plus the attention scores and weighted sum (PaLM's 12*L*C*T,
        counting the full T x T square). Embedding lookups, LayerNorms, biases and softmaxes are
        left out; they are not matmuls.
        """
        c = self.config
        matmul_weights = c.n_layer * 12 * c.n_embd**2 + c.n_embd * c.padded_vocab_size
        return float(6 * matmul_weights + 12 * c.n_layer * c.n_embd * c.block_size)
