"""Printing of the benchmarks' tables: one row per candidate, for each shape its median time and its ratio
to a reference candidate."""


def print_ratio_table(results, shapes, reference, ratio_label, scale=1e3, unit='ms', digits=(2, 2)):
    """results: {shape label: {candidate: seconds}}; shapes: [(label, number of classes)], in column order;
    reference: the candidate every ratio divides by (its name in each shape's results)."""
    time_digits, ratio_digits = digits
    print('| loss | ' + ' | '.join(f'{label} C={c} ({unit}) | {ratio_label}' for label, c in shapes) + ' |')
    print('|---|' + '---:|---:|' * len(shapes))
    for name in results[shapes[0][0]]:
        cells = []
        for label, _ in shapes:
            median = results[label][name]
            cells.append(f'{median * scale:.{time_digits}f} | {median / results[label][reference]:.{ratio_digits}f}')
        print(f'| {name} | ' + ' | '.join(cells) + ' |')
