"""Shared fixtures: small generated data sets in the real layouts (nothing downloaded)."""
import pytest


@pytest.fixture(scope='session', autouse=True)
def one_thread_per_worker():
    """One torch thread in every test process: `make test` runs one pytest worker per core, and a second thread
    per worker only spins against the other worker (OpenMP's busy waiting made in-process runs 2 to 10 times
    slower on a loaded 2-core machine). Tests about thread counts set their own."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def toy_root(tmp_path_factory):
    """Factory: toy_root(dataset='citys', num_train=4, num_val=3, size=(64, 128), seed=0, num_test=0)
    -> pathlib.Path of a generated data set, written once per argument set for the whole session.
    Treat it as read-only (other tests share it); copy it to change files."""
    from dataset.toy import make_toy_dataset
    cache = {}

    def make(dataset='citys', num_train=4, num_val=3, size=(64, 128), seed=0, num_test=0):
        key = (dataset, int(num_train), int(num_val), tuple(int(v) for v in size), int(seed), int(num_test))
        if key not in cache:
            name = f'toy_{dataset}_{num_train}_{num_val}_{size[0]}x{size[1]}_s{seed}_t{num_test}'
            root = tmp_path_factory.mktemp(name)
            cache[key] = make_toy_dataset(dataset, root, num_train=num_train, num_val=num_val,
                                          size=tuple(size), seed=seed, num_test=num_test)
        return cache[key]

    return make


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a module of tiny tensors: more threads only add contention on a shared machine.
    Use with `pytestmark = pytest.mark.usefixtures('one_thread')`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
