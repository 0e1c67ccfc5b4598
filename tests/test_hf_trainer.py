"""A Hugging Face ``Trainer`` on a model patched by ``moca_kernels.transformers`` trains exactly as
moca's own forward does, on the same batches.

The objective is MoCa's masked-LM loss (stage 1 without MAE), which both sides can compute: moca's
side is ``MocaCPT`` (the final hidden states of its packed row through ``linear_cross_entropy`` at
the masked positions, no shift); the Trainer's side is the plain cross-entropy of the model's
logits at the labelled positions, given as ``compute_loss_func``. The Trainer gets the documents
one by one through ``DataCollatorWithFlattening`` (one row, ``position_ids`` restarting at 0, no
flash keywords: the form a patch that ignores position_ids runs as one document), moca gets them from its own
``collate`` (``cu_seqlens``). Same weights, AdamW with the same settings, constant learning rate:
the losses of every step and the final weights must agree."""
import copy

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the test extra has it)")

from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments  # noqa: E402

from moca.data.cpt import Encoded, collate  # noqa: E402
from moca.data.tokenizer import ByteTokenizer  # noqa: E402
from moca.model.heads import MocaCPT  # noqa: E402
from moca.model.qwen import build  # noqa: E402
from moca_kernels.transformers import apply_moca_kernels_to_qwen2_5_vl  # noqa: E402

STEPS, LR = 3, 1e-3


def _batches(specials):
    """STEPS micro-batches of three text documents each, corrupted for MLM by moca's collate. Each
    document opens with a special token (never masked), since the flattening collator drops the
    label of every document's first token."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for step in range(STEPS):
        docs = [Encoded(torch.cat([torch.tensor([specials.eos]), torch.randint(0, 200, (n,), generator=gen)]),
                        torch.zeros(0, 1176), torch.zeros(0, 3, dtype=torch.long), f"s{step}d{i}")
                for i, n in enumerate((11, 5, 16))]
        out.append(collate(docs, specials, mlm_ratio=0.4, mae_ratio=0.0, generator=gen))
    return out


class _Documents(torch.utils.data.IterableDataset):
    """The batches' documents in order, as a tokenized dataset gives them to a collator."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        for batch in self.batches:
            cu = batch["cu_seqlens"].tolist()
            for a, b in zip(cu[:-1], cu[1:]):
                yield {"input_ids": batch["input_ids"][0, a:b].tolist(), "labels": batch["labels"][a:b].tolist()}


def test_hf_trainer_with_a_flattening_collator_equals_moca_forward(tmp_path):
    specials = ByteTokenizer().specials
    batches = _batches(specials)
    torch.manual_seed(0)
    ours = MocaCPT(build("tiny"), use_mae=False)
    theirs = copy.deepcopy(ours.model)
    apply_moca_kernels_to_qwen2_5_vl(theirs)  # what a user does to a model of their own

    # moca's forward and a plain AdamW loop
    optimizer = torch.optim.AdamW(ours.parameters(), lr=LR, weight_decay=0.0)
    our_losses = []
    for batch in batches:
        loss = ours(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        our_losses.append(loss.item())

    # the Hugging Face Trainer
    their_losses = []

    def masked_lm_loss(outputs, labels, num_items_in_batch=None):
        logits, labels = outputs.logits.flatten(0, 1), labels.flatten()
        rows = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[rows].float(), labels[rows])
        their_losses.append(loss.item())
        return loss

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=STEPS,
                             learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                             max_grad_norm=0.0, optim="adamw_torch", use_cpu=True, report_to="none",
                             save_strategy="no", logging_steps=1, disable_tqdm=True, remove_unused_columns=False,
                             dataloader_num_workers=0, seed=0)
    Trainer(model=theirs, args=args, train_dataset=_Documents(batches), data_collator=DataCollatorWithFlattening(),
            compute_loss_func=masked_lm_loss).train()

    assert len(their_losses) == STEPS
    torch.testing.assert_close(torch.tensor(their_losses), torch.tensor(our_losses), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(ours.model.named_parameters(), theirs.parameters()):
        if not name.endswith("k_proj.bias"):  # its true gradient is 0 (softmax ignores a bias shared by every key):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # AdamW scales rounding noise to lr
    # the comparison tells documents apart: the first batch run as one document scores otherwise
    torch.manual_seed(0)
    fresh = MocaCPT(build("tiny"), use_mae=False)
    whole = dict(batches[0], cu_seqlens=torch.tensor([0, batches[0]["input_ids"].shape[1]], dtype=torch.int32))
    with torch.no_grad():
        assert abs(fresh(whole)["loss"].item() - our_losses[0]) > 1e-3
