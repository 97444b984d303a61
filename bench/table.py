"""What the benchmarks share.

- Timing candidates side by side and printing ratio tables (the loss benchmarks);
- markdown tables (`markdown_table`);
- the training step of a script, built by the loop's own pieces (`build_script_step`): the script's own parser
  and method factory (captured from its `main(argv)`), `utils.train_build.build_run` and
  `Stepper.step(micro_batches, iteration, seed=False)`, so a benchmark times exactly what training runs;
- what those steps need: the scripts' extra flags and smallest crops, a toy Cityscapes, a teacher file with fresh
  weights, networks named as MODEL[:BACKBONE].
"""
import argparse
import importlib
import os
import random
import statistics

import torch
from torch.utils.data import DataLoader

from dataset import build_dataset, dataset_info
from dataset.toy import make_toy_dataset
from models.model_zoo import MODEL_BACKBONES, build_segmentation_model, check_model_name, describe_network, has_aux_head
from utils.distributed import init_distributed
from utils.errors import UserError
from utils.seeding import derive_seed
from utils.train_build import build_run


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


def markdown_table(header, rows, numeric=()):
    """The lines of a markdown table; columns whose index is in `numeric` are right-aligned."""
    lines = ['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join('---:' if index in numeric else '---' for index in range(len(header))) + '|']
    lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
    return lines


def parse_markdown_table(text):
    """[{column: cell}] of the first markdown table in `text` (what the tests read back)."""
    lines = [line.strip() for line in text.splitlines()]
    start = next(index for index, line in enumerate(lines) if line.startswith('|'))
    header = [cell.strip() for cell in lines[start].strip('|').split('|')]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip('|').split('|')), strict=True)))
    return rows


# ---------------------------------------------------------------- networks and scripts

def network_name(text):
    """argparse type: 'model' or 'model:backbone' -> (model, backbone); a lone model takes its first backbone
    in the zoo's list (the mobile CNNs: 'mobile', HWD's name)."""
    model, _, backbone = text.partition(':')
    if not backbone and model in MODEL_BACKBONES:
        backbone = MODEL_BACKBONES[model][0]
    try:
        check_model_name(model, backbone, 'network', 'backbone')
    except UserError as error:
        raise argparse.ArgumentTypeError(f'{text!r}: {error}') from None
    return model, backbone


def network_list(text):
    """argparse type: comma-separated MODEL[:BACKBONE] -> [(model, backbone)]."""
    return [network_name(item.strip()) for item in text.split(',') if item.strip()]


def method_list(choices):
    """argparse type: a comma-separated subset of `choices` (the methods of utils.scripts), in the given order."""
    def parse(text):
        names = [name.strip() for name in text.split(',') if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f'{text!r}: choose a comma-separated subset of {",".join(choices)}')
        return names
    return parse


def smallest_crop(script, teacher):
    """The smallest crop side `script` (a utils.scripts.TrainingScript) accepts with this teacher (0: no
    bound)."""
    return script.smallest_crop(describe_network(*teacher, 1))


def extra_flags(script, quick):
    """The flags beyond the defaults a benchmark gives a script: the paper's setting (RECOMMENDED_FLAGS) and,
    with `quick`, what makes a run on a few tiny images cheap (QUICK_FLAGS)."""
    return list(script.recommended_flags) + (list(script.quick_flags) if quick else [])


def script_module(script):
    """The imported module of a utils.scripts.TrainingScript."""
    return importlib.import_module(os.path.splitext(script.name)[0])


def capture_run_training(module, argv):
    """(parsed flags, build_method) that the script's `main(argv)` hands to `run_training`, without training:
    the flags go through the script's own parser and checks."""
    captured = {}

    def capture(args, method_name, build_method=None):
        captured.update(args=args, build_method=build_method)

    original = module.run_training
    module.run_training = capture  # the scripts call the name they imported
    try:
        module.main(argv)
    finally:
        module.run_training = original
    if not captured:
        raise RuntimeError(f'{module.__name__}.main() did not call run_training')
    return captured['args'], captured['build_method']


def build_script_step(script, argv):
    """(parsed flags, BuiltRun) of `script` run with `argv`, in this process: what the loop builds (the same
    seeded initial weights), without its data loaders, meter, logging or saving. Step it with
    `built.stepper.step(micro_batches, iteration, seed=False)`."""
    args, build_method = capture_run_training(script_module(script), argv)
    ctx = init_distributed(args)  # one process: no launcher environment, no process group
    num_class = dataset_info(args.dataset, args.data).num_class
    torch.manual_seed(derive_seed(args.seed, 'init'))
    built = build_run(args, ctx, num_class, build_method)
    built.train_module.train()
    return args, built


def plain_loader(args):
    """A plain shuffled DataLoader over the training set the loop would build (same crops, augmentation,
    batch and workers; no seeded sampler)."""
    train_set = build_dataset(args.dataset, 'train', data_root=args.data,
                              max_iters=args.max_iterations * args.batch_size, crop_size=tuple(args.crop_size),
                              scale=True, mirror=True, ignore_label=args.ignore_label)
    micro_batch = args.batch_size // (args.world_size * args.grad_accum)
    return DataLoader(train_set, batch_size=micro_batch, shuffle=True, num_workers=args.workers, drop_last=True)


def iterations(loader, grad_accum):
    """(iteration from 1, micro-batches) of a plain loader."""
    batch = []
    iteration = 0
    for micro_batch in loader:
        batch.append(micro_batch)
        if len(batch) == grad_accum:
            iteration += 1
            yield iteration, batch
            batch = []


def write_toy_citys(root, crop, num_train=8):
    """A toy Cityscapes with images of 2 x crop by 4 x crop (Cityscapes' 1024 x 2048 against 512 crops)."""
    return str(make_toy_dataset('citys', root, num_train=num_train, num_val=1, size=(2 * crop, 4 * crop), seed=0))


def save_fresh_network(network, num_class, path, seed=1):
    """Save a network with freshly initialised weights (a stand-in teacher); the aux head where it has one."""
    torch.manual_seed(seed)
    net = build_segmentation_model(*network, num_class, has_aux_head(*network))
    torch.save(net.state_dict(), path)
    return path


def script_argv(script, student, teacher, teacher_file, data, crop, batch, iters, workers=0):
    """The command line of a short CPU run of `script` on the toy data, without validation: `student` trained
    alone (the baseline) or from `teacher`, whose weights are in `teacher_file`."""
    if script.distillation:
        argv = ['--student-model', student[0], '--student-backbone', student[1], '--student-pretrained-base', 'None',
                '--teacher-model', teacher[0], '--teacher-backbone', teacher[1], '--teacher-pretrained', teacher_file]
    else:
        argv = ['--model', student[0], '--backbone', student[1], '--pretrained-base', 'None']
    return argv + ['--no-cuda', '--dataset', 'citys', '--data', data, '--crop-size', f'{crop},{crop}',
                   '--batch-size', str(batch), '--workers', str(workers), '--max-iterations', str(iters), '--skip-val']
