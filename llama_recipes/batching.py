"""How tokenized examples become batches: isolated packed rows, and length-grouped sampling.

Packed rows (`training.packing: true`). TRL 1.16 packs examples into rows of up to max_length
(best-fit decreasing, a `seq_lengths` column per row) and then runs them padding-free: its
collator concatenates the batch's rows into ONE row of batch x max_length tokens. With sdpa or
eager, transformers 5.24 keeps the samples of such a row apart through a dense mask over the
whole row, so attention costs (batch x max_length)^2 instead of batch x max_length^2.
`PackedRowCollator` keeps the rows apart instead: a [batch, longest row] tensor, position ids
restarting at 0 for every sample (and for the pad tail of a row), no attention mask. From the
position ids `masking_utils.find_packed_sequence_indices` builds a block-diagonal mask per row
(it does so only when attention_mask is None and there is no cache: the trainer runs with
use_cache=False), flash-attention gets `cu_seq_lens_*` over the flattened batch (varlen kernels),
and each sample sees only itself, as if it were alone in the batch.

Length-grouped sampling (`training.train_sampling_strategy: group_by_length`, transformers'
own option). transformers 5.24 draws its `LengthGroupedSampler` order from the global torch RNG
when the epoch's iterator is created; a run resumed in a later epoch draws it from another RNG
state than the uninterrupted run did, so it trains on other batches. `SeededLengthGroupedSampler`
keeps transformers' grouping and seeds it with (data_seed or seed) + epoch: the same batches
uninterrupted, resumed, and on every rank.

No torch at the top: this module is imported when a recipe is validated or estimated.
"""
from __future__ import annotations

from llama_recipes.measure import pad_collate
from llama_recipes.runtime import collectives

IGNORE_INDEX = -100


class PackedRowCollator:
    """Packed rows (with `seq_lengths`) -> a [batch, width] batch whose samples attend only to themselves.

    Rows without `seq_lengths` (the eval split: never packed) are padded the usual way, with an
    attention mask. Labels of each sample's first token are ignored: in a row, that position
    would otherwise be predicted from the previous sample's last token.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def _width(self, rows) -> int:
        width = max(len(r["input_ids"]) for r in rows)
        m = self.pad_to_multiple_of
        return -(-width // m) * m if m else width

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = self._width(rows)
        packed = "seq_lengths" in rows[0]
        batch = pad_collate(rows, self.pad_token_id, width)
        if not packed:
            return batch
        ids, labels = batch["input_ids"], batch["labels"]
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            lengths = list(r["seq_lengths"])
            if sum(lengths) != n:
                raise ValueError(f"packed row {i}: seq_lengths sum to {sum(lengths)}, the row has {n} tokens")
            if width > n:
                lengths.append(width - n)  # the pad tail: a segment of its own, attending only to itself
            positions[i] = torch.cat([torch.arange(k) for k in lengths])
        labels[positions == 0] = IGNORE_INDEX
        # Sequence boundaries over the flattened batch, for the varlen flash-attention kernels
        # (computed here on CPU, as TRL's collator does, instead of from position ids in every layer).
        starts = (positions.flatten() == 0).nonzero().flatten()
        cu = torch.cat([starts, torch.tensor([positions.numel()])]).to(torch.int32)
        longest = int(cu.diff().max())
        return {"input_ids": ids, "labels": labels, "position_ids": positions,
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def packed_real_tokens(batch: dict, pad_token_id: int) -> int:
    """Tokens of a PackedRowCollator batch that are not the pad tail of their row."""
    positions, ids = batch["position_ids"], batch["input_ids"]
    total = positions.numel()
    for row_pos, row_ids in zip(positions, ids):
        tail = int((row_pos == 0).nonzero().max())  # start of the row's last segment
        if tail > 0 and bool((row_ids[tail:] == pad_token_id).all()):
            total -= row_pos.shape[0] - tail
    return total


class SeededLengthGroupedSampler:
    """transformers' length grouping (mega-batches sorted by length, longest batch first), seeded per epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls this before every epoch (through accelerate)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class SeededSamplingMixin:
    """Mixed into the trainers we build: `group_by_length` through SeededLengthGroupedSampler."""

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not hasattr(ds, "__len__"):
            return super()._get_train_sampler(train_dataset)
        column = self.args.length_column_name
        names = getattr(ds, "column_names", None) or []
        lengths = ds[column] if column in names else [len(x) for x in ds["input_ids"]]
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # transformers groups by the examples of one optimizer step (micro-batch x accumulation)
        return SeededLengthGroupedSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                          seed)


class PackedRowsMixin:
    """Mixed into a packing SFTTrainer: its `num_tokens` metric counts the real tokens of [batch, width] rows.

    TRL 1.16 counts `position_ids.size(1)` tokens for a batch without attention mask (its
    padding-free batches are one row); ours have `batch` rows.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        before = getattr(self, "_total_train_tokens", None)
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if before is not None and model.training and "position_ids" in inputs and "attention_mask" not in inputs:
            local = packed_real_tokens(inputs, self.packed_pad_token_id)
            self._total_train_tokens = before + int(collectives.all_sum([float(local)])[0])
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return out


def trainer_class(base, packed: bool = False, extra: tuple = ()):
    """`base` (a transformers/TRL trainer class) with our sampling, the packed-row metric fix if packing,
    and `extra` mixins nearest to `base` (their compute_loss runs under PackedRowsMixin's)."""
    mixins = (SeededSamplingMixin, PackedRowsMixin) if packed else (SeededSamplingMixin,)
    return type(base.__name__, (*mixins, *extra, base), {"__module__": __name__})


def install_packed_collator(trainer) -> None:
    """Replace TRL's padding-free collator of a packing SFTTrainer by PackedRowCollator.

    TRL 1.16 refuses a custom collator whenever it packs (bfd switches it to padding-free), so
    the collator is swapped after construction; nothing else in SFTTrainer reads `padding_free`
    after __init__ (its token-count metric reads `position_ids`: PackedRowsMixin corrects it).
    """
    old = trainer.data_collator
    trainer.data_collator = PackedRowCollator(old.pad_token_id, old.pad_to_multiple_of)
    trainer.packed_pad_token_id = old.pad_token_id
