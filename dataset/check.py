"""Check a whole data set once, before a long run: every image decodes, has the size of its label, and every label
holds only values legal for the data set.

    python -m dataset.check --dataset citys [--data DIR] [--split train val] [--workers N]

Training checks the data set's files at its start (the root, the list, that every listed file exists), but reads
an image and its label only when the sample comes up in a batch: a corrupt image or an illegal label value stops
a run when it is first drawn, possibly hours in. This command reads every sample of the splits once, with the data
set classes of training and evaluation (so every layout `--dataset` accepts), shows a progress bar, and names every
bad file. Exit status 0 when every sample is good, 1 when some are not, 2 for a wrong command line (an unknown data
set, a missing root).
"""
import argparse
import os
import sys

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset import DATASETS, SPLITS, build_dataset, dataset_info, resolve_root
from dataset.errors import DataError
from utils.errors import StopCommand, UserError, run_main
from utils.options import non_negative_int


class _Checked(Dataset):
    """The message of each bad sample of a data set (None for a good one): the loader goes on past bad samples."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        try:
            self.samples.check_sample(index)
        except DataError as error:
            return str(error)
        return None


class DataProblems(StopCommand):
    """Some samples are bad: their messages were printed; exit status 1."""

    exit_status = 1


def check_split(name, split, data_root=None, workers=0, report=print):
    """(samples checked, messages of the bad ones) of one split; `report` gets each message as it is found. The
    progress bar shows on a terminal only."""
    try:
        samples = build_dataset(name, split, data_root=data_root)
    except DataError as error:  # the list or the layout: listed files that are missing, no samples at all
        report(str(error))
        return 0, [str(error)]
    loader = DataLoader(_Checked(samples), batch_size=None, num_workers=workers)
    bad = []
    for message in tqdm(loader, total=len(samples), desc=f'{name} {split}', unit='image', disable=None,
                        dynamic_ncols=True):
        if message is not None:
            bad.append(message)
            report(message)
    return len(samples), bad


def main(argv=None):
    parser = argparse.ArgumentParser(description='Read every sample of a data set once and name the bad files: '
                                                 'images that do not decode, labels of another size or with '
                                                 'values illegal for the data set.')
    parser.add_argument('--dataset', required=True, choices=DATASETS)
    parser.add_argument('--data', default=None, metavar='DIR', help="the data set's root (default: settings.py's)")
    parser.add_argument('--split', nargs='+', default=['train', 'val'], choices=SPLITS,
                        help='splits to check (default: train val, what training reads)')
    parser.add_argument('--workers', '-j', type=non_negative_int, default=min(8, os.cpu_count() or 1),
                        help='loader processes that read the files (default: the cores, at most 8)')
    args = parser.parse_args(argv)
    info = dataset_info(args.dataset, args.data)
    for split in args.split:
        if split not in info.classes:
            raise UserError(f'data set {args.dataset} has no {split} split (--split): choose from '
                            f'{", ".join(info.classes)}')
        resolve_root(args.dataset, args.data, split=split)  # a wrong root is a wrong command line (status 2)
    total, bad = 0, []
    for split in args.split:
        checked, problems = check_split(args.dataset, split, args.data, args.workers, report=tqdm.write)
        total += checked
        bad += problems
    if bad:
        raise DataProblems(f'{len(bad)} problem(s) in {total} sample(s) of {args.dataset} '
                           f'({" ".join(args.split)}); each is named above')
    print(f'{total} sample(s) of {args.dataset} ({" ".join(args.split)}) checked: every image decodes, has the size '
          'of its label, and every label value is legal')


if __name__ == '__main__':
    sys.exit(run_main(main))
