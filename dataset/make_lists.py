"""Write a list file by scanning a data set's standard layout.

    python -m dataset.make_lists --dataset citys --root DIR --split train [--out FILE]

Without --root the settings.py root is scanned; without --out the list goes to the settings.py list
file of that split (e.g. DATALIST_CS_TRAIN; a folder data set: DIR/<split>.txt), where the training and
evaluation scripts look for it.
"""
import argparse
import os
import sys

from dataset import DATASETS, FOLDER, SPLITS, canonical_name, dataset_info, resolve_root, settings_list_path
from dataset.errors import DataError
from dataset.lists import format_list, layout_hint, scan_layout
from utils.errors import UserError, run_main


def make_list(dataset, root, split, out=None):
    """Scan root for the split's samples and write the list file; returns (path written, count)."""
    if dataset not in DATASETS:
        raise UserError(f'unknown data set {dataset!r} (--dataset): choose from {", ".join(DATASETS)}')
    info = dataset_info(dataset, root)
    if split not in info.classes:
        raise UserError(f'data set {dataset} has no {split} split (--split): choose from {", ".join(info.classes)}')
    root = resolve_root(dataset, root, flag='--root', split=split)
    key = canonical_name(dataset)
    labelled = info.classes[split].labelled
    entries = scan_layout(key, root, split, labelled)
    if not entries:
        raise DataError(f'found no {split} samples under {root}: expected {layout_hint(key, split, labelled)}')
    flag = '--out' if out is not None else 'the default list file; pass --out FILE to write another'
    if out is None:
        out = os.path.join(root, f'{split}.txt') if dataset == FOLDER else settings_list_path(dataset, split)
    if out is None:
        raise UserError(f'settings.py names no {split} list file for {dataset}: pass --out FILE')
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.isdir(out):
        raise UserError(f'{out} ({flag}) is a folder: give the path of the list file to write (e.g. '
                        f'{out}/{split}.txt)')
    # Write then rename, so an interrupted run never leaves half a list where the scripts look.
    partial = out + '.partial'
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(partial, 'w', encoding='utf-8') as handle:
            handle.write(format_list(key, root, entries))
        os.replace(partial, out)
    except OSError as error:
        if os.path.isfile(partial):
            os.remove(partial)
        raise UserError(f'cannot write the list file {out} ({flag}): {error.strerror or error}') from None
    return out, len(entries)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Write a list file by scanning the standard layout of a '
                                                 'data set.')
    parser.add_argument('--dataset', required=True, choices=DATASETS)
    parser.add_argument('--root', default=None, help='data set folder (default: the settings.py root)')
    parser.add_argument('--split', default='train', choices=SPLITS)
    parser.add_argument('--out', default=None, help='list file to write (default: the settings.py list file)')
    args = parser.parse_args(argv)
    out, count = make_list(args.dataset, args.root, args.split, args.out)
    print(f'wrote {count} {args.split} samples to {out}')


if __name__ == '__main__':
    sys.exit(run_main(main))
