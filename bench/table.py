"""What the loss benchmarks share: timing candidates side by side, and printing their tables (one row per
candidate, for each shape its median time and its ratio to a reference candidate)."""
import random
import statistics


def interleaved_medians(candidates, time_once, repeats, seed=0, inner=1):
    """{name: median seconds} of `time_once(candidate)` over `repeats` rounds after one warm-up round, the
    candidates in a new random order every round (so slow phases of a shared machine hit all alike), each
    round's time the best of `inner` back-to-back runs (drops pre-empted runs)."""
    times = {name: [] for name in candidates}
    order = list(candidates)
    rng = random.Random(seed)
    for name in order:  # warm-up
        time_once(candidates[name])
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            times[name].append(min(time_once(candidates[name]) for _ in range(inner)))
    return {name: statistics.median(values) for name, values in times.items()}


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
