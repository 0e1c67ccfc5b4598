"""MoCa's stage-1 heads on a packed micro-batch.

MLM: the LM head on the masked positions only, through ``linear_cross_entropy`` (the head may
be tied to the input embedding; autograd adds both gradients). MAE: one extra bidirectional
decoder layer, a copy of language-model layer L/2, over the whole packed sequence, then
``Linear(hidden, 4 * 1176)`` on the masked image tokens and ``mae_loss`` against their original
pixel rows. ``loss = mlm + mae_weight * mae``; either term can be switched off.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from moca.data.images import ROW
from moca.data.masking import ROWS_PER_TOKEN
from moca_kernels import linear_cross_entropy, mae_loss

from .qwen import freeze_lm_head, packed_hidden, packed_kwargs


class MocaCPT(nn.Module):
    def __init__(self, model, mae_weight: float = 0.5, use_mlm: bool = True, use_mae: bool = True):
        super().__init__()
        if not (use_mlm or use_mae):
            raise ValueError("at least one of MLM and MAE must be on")
        self.model = model
        self.mae_weight, self.use_mlm, self.use_mae = mae_weight, use_mlm, use_mae
        if not use_mlm:
            freeze_lm_head(model)
        layers = model.model.language_model.layers
        hidden = model.config.text_config.hidden_size
        self.mae_decoder = copy.deepcopy(layers[len(layers) // 2]) if use_mae else None
        self.mae_proj = nn.Linear(hidden, ROWS_PER_TOKEN * ROW) if use_mae else None
        if use_mae:
            nn.init.normal_(self.mae_proj.weight, std=0.02)
            nn.init.zeros_(self.mae_proj.bias)

    def forward(self, batch: dict, accuracy: bool = False) -> dict:
        """Losses of one packed micro-batch from ``moca.data.cpt.collate``: ``loss`` (the sum to
        optimize), ``mlm_loss``, ``mae_loss`` (detached, for logging; 0 when off or empty), and
        with ``accuracy`` and MLM on, ``mlm_accuracy`` (the share of masked tokens whose top
        prediction is right; None without any), computed here where the LM head's weight is whole
        even when sharded."""
        hidden = packed_hidden(self.model, batch)  # (L, H), after the final norm
        zero = hidden.new_zeros((), dtype=torch.float32)
        mlm = mae = zero
        if self.use_mlm:
            labels = batch["labels"]
            rows = batch.get("mlm_rows")  # found on the host by the stage (no device sync), else here
            rows = (labels != -100).nonzero().squeeze(1) if rows is None else rows
            mlm = linear_cross_entropy(hidden[rows], self.model.lm_head.weight, labels[rows])
        uniform = getattr(self.model, "uniform_collectives", False)  # sharded: the decoder runs every step
        if self.use_mae and (batch["mae_positions"].numel() or uniform):
            lm = self.model.model.language_model
            cos_sin = lm.rotary_emb(hidden[None], batch["position_ids"])
            decoded = self.mae_decoder(hidden[None], position_embeddings=cos_sin, position_ids=batch["position_ids"],
                                       **packed_kwargs(batch))
            decoded = decoded[0] if isinstance(decoded, tuple) else decoded
            if batch["mae_positions"].numel():
                pred = self.mae_proj(decoded[0, batch["mae_positions"]]).reshape(-1, ROW)
                mae = mae_loss(pred, batch["mae_targets"].to(pred.device))
            else:  # no masked image token: a zero that still reaches the decoder's backward
                mae = 0.0 * decoded.float().sum()
        loss = (mlm if self.use_mlm else zero) + (self.mae_weight * mae if self.use_mae else zero)
        if hidden.requires_grad and not loss.requires_grad:  # nothing to learn here (MAE only, no picture): a zero
            loss = 0.0 * hidden.float().sum()  # that still has a backward, as every micro-batch must
        out = dict(loss=loss, mlm_loss=mlm.detach(), mae_loss=mae.detach())
        if accuracy and self.use_mlm:
            out["mlm_accuracy"] = _mlm_accuracy(hidden, self.model.lm_head.weight, batch["labels"])
        return out


@torch.no_grad()
def _mlm_accuracy(hidden, weight, labels) -> float | None:
    rows = (labels != -100).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    hits = 0
    for chunk in rows.split(1024):
        hits += ((hidden[chunk].float() @ weight.float().T).argmax(1) == labels[chunk]).sum().item()
    return hits / rows.numel()
