"""FFBA's fused inference form: the adapter inside the two base GEMMs of every sub-block.

For a sub-block with input projections P_1..P_k (q|k|v or gate|up), output projection P_out and an
FFBA adapter, the fused form runs

    W_in  = [ W_1  s_b B_b1 ]        acting on [u; z_b_in]   -> [p_1; ...; p_k; z_f]
            [ ...  ...      ]
            [ W_k  s_b B_bk ]
            [ A_f  0        ]

    W_out = [ W_o  s_f B_f ]         acting on [c; phi(z_f)] -> [y; z_b_out]
            [ A_b  0       ]

which is the layout of the adapter bank (`ffba.bank`) holding one adapter at the front of each rank
space. So the single-adapter fused form *is* a bank: one adapter resident (`SINGLE`), the bank's room
sized to its ranks (zero-padded to a multiple of ALIGN, as every widened GEMM dimension is), its
windows fixed and every token on the adapter; no mask runs, and a compiled step reads the same graph
as a bank's. The adapter stays attached to the layers in training form (its parameters are the
model's): `refresh_ffba` rewrites its rows and columns from them, `unfuse_ffba` wraps them around the
rebuilt base projections again. While fused, BA crosses from one layer to the next in the bank's
selection, so the decoder layers take back their own class (FFBA's carries BA in the hidden state).
"""

from __future__ import annotations

from torch import Tensor, nn

from ...models.architectures import decoder_layers, sub_blocks
from ...utils.classes import extend, restore
from ..fused import aligned, unfused_projections
from .bank import AdapterBank, adapter_space_ranks, install_bank
from .config import FFBAConfig
from .layers import AdaptedInputProjection, AdaptedOutputProjection, ffba_layer_class
from .model import adapter_of, ffba_parameters

SINGLE = "default"  # the name of the adapter in FFBA's single-adapter fused form


def _adapter_state(model: nn.Module) -> dict[str, Tensor]:
    return {key: param.detach() for key, param in ffba_parameters(model).items()}


def fuse_ffba(model: nn.Module, config: FFBAConfig) -> AdapterBank:
    """Switch a model carrying FFBA with `config` to the fused form, in place; returns its one-adapter bank."""
    room = {space: aligned(rank, rank) for space, rank in adapter_space_ranks(config).items()}
    bank = install_bank(model, 1, room)
    bank.add(SINGLE, config, _adapter_state(model))
    bank.fix_windows()
    bank.hold(bank.selection([SINGLE]))
    for layer in decoder_layers(model):
        restore(layer)
    return bank


def refresh_ffba(model: nn.Module, bank: AdapterBank) -> None:
    """After the adapter's parameters changed, rewrite its rows and columns (the base block is not touched)."""
    bank.rewrite(SINGLE, _adapter_state(model))


def unfuse_ffba(model: nn.Module) -> None:
    """Back to the training form: the original nn.Linear modules, rebuilt bit for bit, wrapped again."""
    for _, layer, name, spec, holder in sub_blocks(model):
        adapter = adapter_of(layer, name)
        inputs, output = unfused_projections(holder, spec)
        for index, (p, base) in enumerate(zip(spec.inputs, inputs)):
            setattr(holder, p, AdaptedInputProjection(base, adapter, index) if adapter is not None else base)
        setattr(holder, spec.output, AdaptedOutputProjection(output, adapter) if adapter is not None else output)
    for layer in decoder_layers(model):
        extend(layer, ffba_layer_class(type(layer)))
