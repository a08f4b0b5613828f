"""A seeded, shuffled, resumable stream of training batches read from a (memmapped) activation array.

Each epoch visits every row once. Rows are grouped into chunks of ``CHUNK_ROWS`` consecutive rows (one
contiguous read each); an epoch permutes the chunks, packs them into buffers of ``buffer_rows`` rows (so a
buffer mixes ~buffer_rows / CHUNK_ROWS random places of the corpus, not one document) and permutes the rows
inside each buffer. Every permutation comes from its own ``torch.Generator`` seeded from (seed, epoch, buffer),
so the stream is a pure function of the seed: batch ``s`` is always rows ``s·B … (s+1)·B − 1`` of it, and a run
resumed at step s reads exactly what an uninterrupted run would have read (no RNG state to save).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from darkmatter.io import check_finite

CHUNK_ROWS = 1024  # ≈ one context of the default experiment; 2.3 MB per read at d_model 576


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


class ShuffledBatches:
    """``batches(start_step)`` yields float32 tensors [batch_size, d] from ``data`` [rows, d].

    data may be a numpy memmap (read in sorted chunk order) or any array with row slicing.
    """

    def __init__(self, data: np.ndarray, batch_size: int, buffer_rows: int, seed: int):
        if data.ndim != 2 or data.shape[0] < batch_size:
            raise ValueError(f"training data must be [rows, d] with at least batch_size={batch_size} rows, "
                             f"got shape {tuple(data.shape)}.")
        self.data = data
        self.where = getattr(data, "filename", None) or "the training activations"
        self.batch_size = batch_size
        self.seed = seed
        self.rows = data.shape[0]
        self.n_chunks = -(-self.rows // CHUNK_ROWS)
        self.chunks_per_buffer = max(1, buffer_rows // CHUNK_ROWS)

    def _chunk_len(self, c: int) -> int:
        return min(CHUNK_ROWS, self.rows - c * CHUNK_ROWS)

    def _buffers(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        order = torch.randperm(self.n_chunks, generator=gen).tolist()
        step = self.chunks_per_buffer
        return [order[i : i + step] for i in range(0, self.n_chunks, step)]

    def _load(self, epoch: int, index: int, chunks: list[int]) -> Tensor:
        parts = {c: np.asarray(self.data[c * CHUNK_ROWS : c * CHUNK_ROWS + self._chunk_len(c)]) for c in sorted(chunks)}
        for c in chunks:  # a NaN row would turn the SAE into NaNs a few steps later
            check_finite(parts[c], c * CHUNK_ROWS, self.where)
        buf = torch.from_numpy(np.concatenate([parts[c] for c in chunks]).astype(np.float32, copy=False))
        gen = torch.Generator().manual_seed(derived_seed(self.seed, epoch, index))
        return buf[torch.randperm(buf.shape[0], generator=gen)]

    def batches(self, start_step: int = 0) -> Iterator[Tensor]:
        """Infinite iterator over batches, starting with batch number ``start_step``."""
        pos = start_step * self.batch_size  # position in the (infinite) stream
        epoch, skip = divmod(pos, self.rows)
        pending: list[Tensor] = []
        n_pending = 0
        while True:
            for index, chunks in enumerate(self._buffers(epoch)):
                size = sum(self._chunk_len(c) for c in chunks)
                if skip >= size:  # wholly before the resume point: not even read
                    skip -= size
                    continue
                buf = self._load(epoch, index, chunks)[skip:]
                skip = 0
                while buf.shape[0]:
                    take = min(self.batch_size - n_pending, buf.shape[0])
                    pending.append(buf[:take])
                    n_pending += take
                    buf = buf[take:]
                    if n_pending == self.batch_size:
                        yield pending[0] if len(pending) == 1 else torch.cat(pending)
                        pending, n_pending = [], 0
            epoch += 1
