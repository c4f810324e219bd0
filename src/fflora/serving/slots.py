"""Static KV-cache slots: the core of the serving engine (`serving.slot_engine`, under `fflora serve`).

A fixed number of slots, each a row of one preallocated KV cache of `max_len` positions per layer.
A request takes a slot for its life; each step runs some slots together, each at its own position:
prefill (a chunk of one request's prompt) or decode (one token of every busy slot). The model runs
unchanged (fused or not, any weight format, a bank choosing each row's adapter) with its attention
implementation set to `SLOT_ATTENTION`: transformers hands each attention layer the step's queries,
keys and values after the rotary embedding (the positions are each row's own), and `slot_attention`
writes the keys and values into the rows' slots and attends over each row's prefix. Shapes depend
only on (rows, tokens per row) and the span of positions read: the step a compiled decode
runs (`serving.slot_engine`). The write is an operator of fflora's (`slot_write`, `ops.library`) that
mutates the cache in place: written as a plain indexed assignment, a compiled step copied the cache per
layer (16 GB at 8 slots x 256 positions on SmolLM2) where the op writes only the new positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..ops.library import define_op

SLOT_ATTENTION = "fflora_slots"


def _slot_write(keys: Tensor, values: Tensor, rows: Tensor, positions: Tensor, new_keys: Tensor,
                new_values: Tensor) -> None:
    """keys[rows[i], positions[i, t]] = new_keys[i, t] and the same for values, in place (keys, values:
    slots x max_len x kv_heads x dim; positions: rows x tokens; new_*: rows x tokens x kv_heads x dim)."""
    keys.index_put_((rows[:, None], positions), new_keys)
    values.index_put_((rows[:, None], positions), new_values)


slot_write = define_op("slot_write(Tensor(a!) keys, Tensor(b!) values, Tensor rows, Tensor positions, "
                       "Tensor new_keys, Tensor new_values) -> ()", _slot_write, lambda *args: None)


class SlotCache:
    """Keys and values of `slots` requests, `max_len` positions each, for every layer of `config`'s
    model (one tensor per layer: slots x max_len x kv_heads x dim); `lengths[s]`: the positions slot s holds."""

    def __init__(self, config, slots: int, max_len: int, dtype: torch.dtype = torch.float32) -> None:
        text = config.get_text_config()
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        shape = (slots, max_len, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(text.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(text.num_hidden_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.long)
        self.max_len = max_len

    def free(self, slot: int) -> None:
        """Make `slot` empty for its next request (its old keys are never read: lengths bound every read)."""
        self.lengths[slot] = 0


def slot_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                   dropout: float = 0.0, slot_cache: SlotCache | None = None, slot_rows: Tensor | None = None,
                   slot_starts: Tensor | None = None, slot_window: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
    """Write this step's keys and values into the rows' slots (`slot_rows`, from positions `slot_starts`),
    then attend over each row's prefix (its earlier positions and this step's up to the query's own).
    query: rows x heads x tokens x dim; key, value: rows x kv_heads x tokens x dim. `slot_window`:
    `arange(span)` of the positions read (a compiled step takes it as an input of dynamic size; None: up
    to the furthest position). Returns rows x tokens x heads x dim, as transformers' attention functions do."""
    cache, layer = slot_cache, module.layer_idx
    tokens = query.shape[2]
    positions = slot_starts[:, None] + torch.arange(tokens, device=query.device)  # rows x tokens
    keys, values = cache.keys[layer], cache.values[layer]
    slot_write(keys, values, slot_rows, positions, key.transpose(1, 2).to(keys.dtype),
               value.transpose(1, 2).to(values.dtype))
    window = torch.arange(int(positions.max()) + 1, device=query.device) if slot_window is None else slot_window
    span = window.shape[0]
    keys = keys[slot_rows, :span].transpose(1, 2).to(query.dtype)  # rows x kv_heads x span x dim
    values = values[slot_rows, :span].transpose(1, 2).to(query.dtype)
    visible = window[None, None, :] <= positions[:, :, None]  # rows x tokens x span: causal, own prefix
    if tokens == 1 and (torch.compiler.is_compiling() or query.dtype != torch.float32):
        return _decode_attention(query, keys, values, visible, scaling), None
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible[:, None], scale=scaling,
                                         enable_gqa=keys.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _decode_attention(query: Tensor, keys: Tensor, values: Tensor, visible: Tensor, scaling: float | None) -> Tensor:
    """Attention of one query token per row, each query head with its key-value head (rows x 1 x heads x
    dim): what compiled decode steps run, and eager ones in bfloat16 (or float16), instead of SDPA. Compiled,
    the two products are written as broadcast multiply-and-sum in float32, which inductor fuses with the
    gather of the keys and the softmax into loops that read each key once. Eager, that form would hold
    rows x heads x span x dim at once, so eager steps run two matmuls. Measured on SmolLM2's shapes (8 rows,
    9 heads over 3, 64 dims; AVX-512 EPYC, 2 threads; gather included), one layer at 70 / 300 positions:
    compiled 43 / 111 us this way against 123 / 216 with matmuls and 509 / 1270 with SDPA in bfloat16, 41 /
    97 against 76 / 187 with SDPA in float32; eager bfloat16 166 / 638 with matmuls against 273 / 1454 with
    SDPA; eager float32 119 / 423 against 162 / 268 (so eager float32 keeps SDPA)."""
    rows, heads, _, dim = query.shape
    kv_heads, span = keys.shape[1], keys.shape[2]
    grouped = query.view(rows, kv_heads, heads // kv_heads, dim)  # query head h reads key-value head h // group
    scale = dim**-0.5 if scaling is None else scaling
    hidden = ~visible.view(rows, 1, 1, span)
    if torch.compiler.is_compiling():
        scores = (grouped.unsqueeze(-2).float() * keys.unsqueeze(2).float()).sum(-1) * scale
        weights = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        out = (weights.unsqueeze(-1) * values.unsqueeze(2).float()).sum(-2).to(values.dtype)
    else:
        scores = (grouped @ keys.transpose(-1, -2) * scale).masked_fill(hidden, float("-inf"))
        out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype) @ values
    return out.view(rows, 1, heads, dim)


AttentionInterface.register(SLOT_ATTENTION, slot_attention)
AttentionMaskInterface.register(SLOT_ATTENTION, lambda *args, **kwargs: None)  # slot_attention masks itself


def use_slots(model: nn.Module) -> nn.Module:
    """Run `model`'s attention through `slot_attention` (in place; returns the model)."""
    model.config._attn_implementation = SLOT_ATTENTION
    return model


def slot_forward(model: nn.Module, cache: SlotCache, rows: Tensor, starts: Tensor, input_ids: Tensor,
                 window: Tensor | None = None, last: Tensor | None = None, **model_kwargs) -> Tensor:
    """The model over `input_ids` (rows x tokens), row i continuing slot `rows[i]` from position `starts[i]`
    (its keys and values are written there); the logits of each row's last token (rows x vocab), or of
    token `last[i]` of row i where `last` is given. Reads and sets no Python state (`slot_step` keeps the
    slots' lengths): what a compiled step runs (`window`: see `slot_attention`)."""
    position_ids = starts[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)
    keep = 1 if last is None else last[:, None]  # transformers: one position per row, its own
    return model(input_ids=input_ids, position_ids=position_ids, slot_cache=cache, slot_rows=rows, slot_starts=starts,
                 slot_window=window, use_cache=False, logits_to_keep=keep, **model_kwargs).logits[:, -1]


@torch.no_grad()
def slot_step(model: nn.Module, cache: SlotCache, slots: Tensor, input_ids: Tensor, lengths: Tensor | None = None,
              **model_kwargs) -> Tensor:
    """Run one step: row i of `input_ids` (rows x tokens) continues slot `slots[i]` from the position it
    holds. `lengths[i]`: how many of row i's tokens are its own (the rest right padding, so that prompt
    chunks of different lengths run together; default: all). Returns the logits of each row's last own
    token (rows x vocab); the slots now hold their rows' own tokens. Padding writes keys and values past
    a row's end, where its next tokens overwrite them before anything reads there, so it must stay
    inside the slot. `model_kwargs` go to the model (e.g. `adapter_names=` for a bank)."""
    tokens = input_ids.shape[1]
    starts = cache.lengths[slots]
    if int(starts.max()) + tokens > cache.max_len:
        raise ValueError(f"a slot holds at most {cache.max_len} positions; this step would reach "
                         f"{int(starts.max()) + tokens}")
    if lengths is not None and (int(lengths.min()) < 1 or int(lengths.max()) > tokens):
        raise ValueError(f"each row's length must be within 1..{tokens} (its tokens), got {lengths.tolist()}")
    logits = slot_forward(model, cache, slots, starts, input_ids, last=None if lengths is None else lengths - 1,
                          **model_kwargs)
    cache.lengths[slots] = starts + (tokens if lengths is None else lengths)
    return logits
