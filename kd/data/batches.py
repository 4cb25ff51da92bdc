"""Batches: collate two views with aligned response indices; the resumable micro-batch sampler."""

from __future__ import annotations

import torch

from kd.errors import DataError


def collate(examples: list[dict], pad_id: int, keep: list[bool] | None = None) -> dict:
    """Right-pad each view; flat indices of the positions that predict target tokens (every
    trained assistant turn, in order), aligned 1:1 between views. `keep[i] = False` runs example i through the models but contributes no
    tokens (used to give every rank the same number of forwards)."""
    keep = keep or [True] * len(examples)
    out = {}
    for view in ("teacher", "student"):
        seqs = [e[f"{view}_ids"] for e in examples]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        index = []
        for b, (seq, e, k) in enumerate(zip(seqs, examples, keep)):
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[b, : len(seq)] = 1
            if k:
                # position t predicts token t+1: a target span [start, start+n) is predicted from
                # positions [start-1, start+n-1)
                for start, n in zip(e[f"{view}_starts"], e["target_lens"]):
                    index.append(torch.arange(start - 1, start - 1 + n) + b * width)
        out[f"{view}_input_ids"] = ids
        out[f"{view}_attention_mask"] = mask
        out[f"{view}_index"] = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    return _targets(examples, keep, out)


def collate_packed(examples: list[dict], pad_id: int | None = None, keep: list[bool] | None = None,
                   row_tokens: int | None = None) -> dict:
    """The same examples as `collate`, each view packed into rows of at most `row_tokens` tokens
    (data.max_length; at least the longest example; see pack_rows): `<view>_position_ids`
    restart at every example (so attention never crosses examples) and there is no attention
    mask. Attention work per row is bounded by row_tokens², not the whole micro-batch's length
    squared. Rows are right-padded to the fullest one; the pad tail is a sequence of its own, after
    every real token, so no real position sees it. Labels and their order are those of `collate`."""
    keep = keep or [True] * len(examples)
    pad = 0 if pad_id is None else pad_id
    out = {}
    for view in ("teacher", "student"):
        lengths = [len(e[f"{view}_ids"]) for e in examples]
        rows = pack_rows(lengths, max(row_tokens or 0, max(lengths)))
        width = max(sum(lengths[i] for i in row) for row in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        where = {}  # example -> flat offset of its first token
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = lengths[i]
                ids[r, at:at + n] = torch.tensor(examples[i][f"{view}_ids"], dtype=torch.long)
                pos[r, at:at + n] = torch.arange(n)
                where[i] = r * width + at
                at += n
            pos[r, at:] = torch.arange(width - at)
        index = [torch.arange(start - 1, start - 1 + n) + where[i]
                 for i, (e, k) in enumerate(zip(examples, keep)) if k
                 for start, n in zip(e[f"{view}_starts"], e["target_lens"])]
        out[f"{view}_input_ids"] = ids
        out[f"{view}_position_ids"] = pos
        out[f"{view}_index"] = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    return _targets(examples, keep, out)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices grouped into as few rows of at most `capacity` tokens as first-fit
    decreasing finds, balanced: it first aims at rows of total / (fewest rows possible) tokens and
    relaxes that target towards `capacity` only while it needs more rows, so the rows come out
    nearly equal and padding them to the fullest costs little. Each row in example order."""
    total, longest = sum(lengths), max(lengths)
    fewest = -(-total // capacity)
    target = max(longest, -(-total // fewest))
    while True:
        rows = _first_fit_decreasing(lengths, target)
        if len(rows) <= fewest or target >= capacity:
            return rows
        target = min(capacity, target + max(1, target // 20))


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


def _targets(examples: list[dict], keep: list[bool], out: dict) -> dict:
    labels = [torch.tensor(e["student_ids"][start:start + n], dtype=torch.long)
              for e, k in zip(examples, keep) if k for start, n in zip(e["student_starts"], e["target_lens"])]
    out["labels"] = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    # which examples the label rows come from (in order), e.g. to look up cached teacher outputs
    out["example_ids"] = torch.tensor([e.get("example_id", -1) for e, k in zip(examples, keep) if k], dtype=torch.long)
    out["n_response"] = torch.tensor([e["n_response"] for e, k in zip(examples, keep) if k], dtype=torch.long)
    return out


def tokens_in(batch: dict, view: str = "student") -> int:
    """Tokens the model reads for a view, padding included (a packed row has none)."""
    return int(batch[f"{view}_input_ids"].numel())


def real_tokens(batch: dict, view: str = "student") -> int:
    mask = batch.get(f"{view}_attention_mask")
    return int(mask.sum()) if mask is not None else tokens_in(batch, view)


def example_lengths(dataset) -> list[int]:
    """Longer view's length per example, read from the Arrow column lengths (no row decoding)."""
    import numpy as np

    tbl = dataset.with_format("arrow")[:] if hasattr(dataset, "with_format") else None
    if tbl is None:
        return [max(len(e["teacher_ids"]), len(e["student_ids"])) for e in dataset]
    t = np.asarray(tbl.column("teacher_ids").combine_chunks().value_lengths())
    s = np.asarray(tbl.column("student_ids").combine_chunks().value_lengths())
    return np.maximum(t, s).tolist()


class MicroBatchSampler:
    """Micro-batch k of this rank, as a pure function of k.

    Each epoch is a seeded permutation; global micro-batch j of the epoch is the slice
    [j*B*W, (j+1)*B*W) and rank r takes its r-th block of B. One optimizer step consumes the same
    examples whatever the split into micro-batch size, accumulation and ranks, and resuming only
    needs k. An epoch is a whole number of optimizer steps (so epoch boundaries fall on the same
    step for every split); its incomplete tail is said at start, and every rank runs the same forwards.

    With `lengths` (data.group_by_length), each epoch's permutation is cut into mega-batches of
    50 global micro-batches, each sorted by length, cut into global micro-batches, and the order
    of those is shuffled (seeded): examples of similar length share a micro-batch (little
    padding), still a pure function of (seed, epoch), so resume is exact.
    """

    MEGA = 50

    def __init__(self, n: int, micro_batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, accum: int = 1, lengths: list[int] | None = None):
        self.n, self.mb, self.world, self.rank, self.seed, self.shuffle = n, micro_batch_size, world_size, rank, seed, shuffle
        self.lengths = lengths
        self.per_epoch = n // (micro_batch_size * world_size * accum) * accum
        if self.per_epoch == 0:
            raise DataError(f"only {n} training examples, fewer than one optimizer step's global batch "
                            f"({micro_batch_size} x {accum} accumulation x {world_size} processes)")
        self._epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
            if self.lengths is not None:
                self._perm = self._grouped(self._perm, epoch)
            self._epoch = epoch
        return self._perm

    def _grouped(self, perm: list[int], epoch: int) -> list[int]:
        g_size = self.mb * self.world
        used = self.per_epoch * g_size
        mega = g_size * self.MEGA
        grouped = []
        for i in range(0, used, mega):
            grouped += sorted(perm[i:min(i + mega, used)], key=lambda j: -self.lengths[j])
        batches = [grouped[i:i + g_size] for i in range(0, used, g_size)]
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7_919)
        order = torch.randperm(len(batches), generator=g).tolist() if self.shuffle else range(len(batches))
        return [j for b in order for j in batches[b]] + perm[used:]

    def indices(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        start = (j * self.world + self.rank) * self.mb
        return self._permutation(epoch)[start : start + self.mb]

    def epoch_of(self, k: int) -> float:
        return k / self.per_epoch

    def describe(self, accum: int) -> str:
        """One line: steps per epoch, and the examples an epoch leaves out (said, never silent)."""
        used = self.per_epoch * self.mb * self.world
        s = f"{self.per_epoch // accum} optimizer steps per epoch"
        if used < self.n:
            s += (f" ({used} of {self.n} examples each epoch: the last {self.n - used} do not fill a global batch; "
                  f"{'every epoch draws a new permutation, so they are seen in others' if self.shuffle else 'with data.shuffle=false they are never seen'})")
        return s


class _Stream(torch.utils.data.Sampler):
    def __init__(self, sampler: MicroBatchSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self):
        return (self.sampler.indices(k) for k in range(self.start, self.stop))

    def __len__(self):
        return self.stop - self.start


def train_loader(dataset, sampler: MicroBatchSampler, pad_id: int, start: int, stop: int, packing: bool = False,
                 row_tokens: int | None = None):
    """Micro-batches start..stop-1 of this rank (a DataLoader, so workers/pinning can be added),
    padded or packed (data.packing) into rows of at most row_tokens (data.max_length)."""
    fn = (lambda ex: collate_packed(ex, pad_id, row_tokens=row_tokens)) if packing else (lambda ex: collate(ex, pad_id))
    return torch.utils.data.DataLoader(dataset, batch_sampler=_Stream(sampler, start, stop), collate_fn=fn)


def eval_batches(dataset, micro_batch_size: int, world_size: int, rank: int, pad_id: int, max_batches: int = 0):
    """This rank's share of the eval set, in order. Every rank yields the same number of batches;
    a rank with nothing left re-runs example 0 with no tokens counted."""
    n = len(dataset)
    per_step = micro_batch_size * world_size
    n_batches = -(-n // per_step)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for j in range(n_batches):
        idx = [j * per_step + rank * micro_batch_size + i for i in range(micro_batch_size)]
        keep = [i < n for i in idx]
        if not any(keep):
            keep, idx = [False], [0]
        else:
            idx = [i for i, k in zip(idx, keep) if k]
            keep = [True] * len(idx)
        yield collate([dataset[i] for i in idx], pad_id, keep)
