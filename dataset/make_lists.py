"""Write a list file by scanning a data set's standard layout.

    python -m dataset.make_lists --dataset citys --root DIR --split train [--out FILE]

Without --root the settings.py root is scanned; without --out the list goes to the settings.py list
file of that split (e.g. DATALIST_CS_TRAIN), where the training and evaluation scripts look for it.
"""
import argparse
import os
import sys

from dataset import DATASET_INFO, _from_settings, resolve_root
from dataset.lists import format_list, layout_hint, scan_layout
from dataset.errors import DataError
from utils.errors import UserError, user_message


def make_list(dataset, root, split, out=None):
    """Scan root for the split's samples and write the list file; returns (path written, count)."""
    import settings
    info = DATASET_INFO.get(dataset)
    if info is None:
        raise UserError(f'unknown data set {dataset!r} (--dataset): choose from {", ".join(DATASET_INFO)}')
    if split not in info.list_settings:
        raise UserError(f'data set {dataset} has no {split} split (--split): choose from '
                        f'{", ".join(info.list_settings)}')
    root = resolve_root(dataset, root, flag='--root')
    labelled = not (dataset == 'citys' and split == 'test')
    entries = scan_layout(dataset, root, split, labelled)
    if not entries:
        raise DataError(f'found no {split} samples under {root}: expected {layout_hint(dataset, split)}')
    if out is None:
        out = _from_settings(getattr(settings, info.list_settings[split]))
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    # Write then rename, so an interrupted run never leaves half a list where the scripts look.
    partial = out + '.partial'
    with open(partial, 'w', encoding='utf-8') as handle:
        handle.write(format_list(dataset, root, entries))
    os.replace(partial, out)
    return out, len(entries)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Write a list file by scanning the standard layout of a '
                                                 'data set.')
    parser.add_argument('--dataset', required=True, choices=sorted(DATASET_INFO))
    parser.add_argument('--root', default=None, help='data set folder (default: the settings.py root)')
    parser.add_argument('--split', default='train', choices=('train', 'val', 'test'))
    parser.add_argument('--out', default=None, help='list file to write (default: the settings.py list file)')
    args = parser.parse_args(argv)
    try:
        out, count = make_list(args.dataset, args.root, args.split, args.out)
    except UserError as error:
        print(user_message(error), file=sys.stderr)
        return 2
    print(f'wrote {count} {args.split} samples to {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
