"""Seeds derived from `--seed`, so that every random draw of a run depends only on the seed and on where
the draw happens (the iteration, the sample's place in the global batch, the micro-batch), never on the
number of loader workers or on when the run was stopped and resumed.

Seeds are mixed with the splitmix64 finaliser (Steele, Lea and Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014), so that neighbouring inputs give unrelated seeds.
"""
import zlib

_MASK = (1 << 64) - 1


def _mix(x):
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive_seed(*parts):
    """A 63-bit seed (valid for torch.Generator.manual_seed) from integers and strings."""
    state = 0
    for part in parts:
        value = zlib.crc32(part.encode()) if isinstance(part, str) else int(part)
        state = _mix(state ^ (value & _MASK))
    return state >> 1


def sample_seed(seed, position):
    """Seed of the random draws (scale, crop, flip) of the training sample at `position` in the run:
    iteration x batch size + its place in the global batch."""
    return derive_seed(seed, 'sample', position)


def step_seed(seed, stream, iteration, micro_batch):
    """Seed of a random stream (dropout, a method's generator) at an iteration (counted from 1) for the
    micro-batch with this place in the global batch (the rank when there is no gradient accumulation)."""
    return derive_seed(seed, stream, iteration, micro_batch)
