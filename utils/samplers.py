"""The training sampler: a fixed, seeded order of `max_iterations x batch_size` samples split over processes.

The whole run is one permutation of the training set (built with max_iters = max_iterations x batch_size,
so it already repeats its list to that length). Global batch i is permutation[i*B : (i+1)*B] and process
r of K takes the r-th slice of B/K samples of it. So
- every process gets exactly its share, no sample is padded or dropped, and the global batches do not
  depend on the number of processes;
- resuming after iteration k starts at global batch k: nothing is replayed, nothing is skipped.
"""
import torch
from torch.utils.data import Sampler


class IterationSampler(Sampler):
    """Indices of this process's part of global batches `start_iteration .. max_iterations - 1`."""

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
        generator.manual_seed(self.seed)
        total = self.max_iterations * self.batch_size
        # A training set shorter than the run (a data set that ignores max_iters) is cycled.
        return torch.randperm(total, generator=generator) % self.dataset_len

    def __iter__(self):
        order = self._order().view(self.max_iterations, self.world_size, self.per_rank)
        mine = order[self.start_iteration:, self.rank].reshape(-1)
        return iter(mine.tolist())

    def __len__(self):
        return (self.max_iterations - self.start_iteration) * self.per_rank
