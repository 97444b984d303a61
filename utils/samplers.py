"""The training sampler: a fixed, seeded order of `max_iterations x batch_size` samples split over processes
and micro-batches, each with the seed of its random draws.

The whole run is one permutation of the training set (built with max_iters = max_iterations x batch_size,
so it already repeats its list to that length). Global batch i is permutation[i*B : (i+1)*B]; process r of
W takes the r-th slice of B/W samples of it, in K micro-batches of B/(W*K) when accumulating gradients.
Each index comes with `sample_seed(seed, i*B + place)`, place being its position in the global batch. So
- every process gets exactly its share, no sample is padded or dropped, and the global batches and every
  sample's augmentation do not depend on the number of processes, micro-batches or loader workers;
- resuming after iteration k starts at global batch k: nothing is replayed, nothing is skipped, and
  the samples are those the uninterrupted run would have drawn.
"""
import torch
from torch.utils.data import Sampler

from utils.seeding import derive_seed, sample_seed


class IterationSampler(Sampler):
    """(index, seed) pairs of this process's part of global batches `start_iteration .. max_iterations - 1`."""

    def __init__(self, dataset_len, max_iterations, batch_size, rank=0, world_size=1, seed=0,
                 start_iteration=0):
        if batch_size % world_size != 0:
            raise ValueError(f'batch size {batch_size} is not divisible by the number of processes {world_size}')
        if dataset_len <= 0:
            raise ValueError('the training set is empty')
        if not 0 <= start_iteration <= max_iterations:
            raise ValueError(f'start iteration {start_iteration} is outside 0..{max_iterations}')
        self.dataset_len = dataset_len
        self.max_iterations = max_iterations
        self.batch_size = batch_size
        self.per_rank = batch_size // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_iteration = start_iteration

    def _order(self):
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.seed, 'order'))
        total = self.max_iterations * self.batch_size
        # A training set shorter than the run (a data set that ignores max_iters) is cycled.
        return torch.randperm(total, generator=generator) % self.dataset_len

    def __iter__(self):
        order = self._order().view(self.max_iterations, self.world_size, self.per_rank)
        for iteration in range(self.start_iteration, self.max_iterations):
            first = iteration * self.batch_size + self.rank * self.per_rank
            for place, index in enumerate(order[iteration, self.rank].tolist()):
                yield index, sample_seed(self.seed, first + place)

    def __len__(self):
        return (self.max_iterations - self.start_iteration) * self.per_rank
