"""Command-line flags shared by the training scripts (train_baseline.py, train_hwd.py, train_cwd.py, ...).

The flag names and defaults are those of the original HWD/CIRKD scripts, so that existing command lines
keep working. Every check that can be made before any work is done here and reported through
`parser.error` (exit status 2, with the usage line): malformed sizes, non-positive counts and rates,
flag combinations that make no sense, a batch that does not split over the processes, a checkpoint
trained for another number of classes, output folders that cannot be written, a crop whose batch alone would not
fit in memory.
"""
import argparse
import os

from dataset import DATASETS, FOLDER, check_ignore_label, dataset_info
from models.checkpoint import classifier_rows, no_file, read_state_dict
from models.model_zoo import check_model_name, default_head_width, has_variable_width, imagenet_file
from utils.distributed import add_launcher_args, launcher_environment
from utils.errors import UserError
from utils.optim import OPTIMIZERS, SGD_MOMENTUM

# Where --save-dir / --log-dir point when they are not given (the original's defaults).
DEFAULT_SAVE_DIR = './ckpt'
DEFAULT_LOG_DIR = './logs/'
# Where the default --pretrained-base of a backbone lies: its ImageNet file (models.model_zoo.IMAGENET_FILES) here.
PRETRAINED_FOLDER = './pretrained'
# Bytes of one training pixel in a batch before any network runs: the float32 BGR image and the int64 label.
BATCH_BYTES_PER_PIXEL = 3 * 4 + 8


# ---------------------------------------------------------------- argparse value types

def crop_size(text):
    """'512,512' (height,width) or '512' (a square) -> (h, w); anything else is an argparse error."""
    parts = [p.strip() for p in str(text).replace('x', ',').split(',')]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not HEIGHT,WIDTH (two positive integers, e.g. 512,512)') \
            from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f'{text!r} is not HEIGHT,WIDTH (two positive integers, e.g. 512,512)')
    return tuple(sizes)


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None


def positive_int(text):
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'{value} must be a positive integer')
    return value


def non_negative_int(text):
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'{value} must be zero or a positive integer')
    return value


def finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if value != value or value in (float('inf'), float('-inf')):
        raise argparse.ArgumentTypeError(f'{text!r} must be a finite number')
    return value


def positive_float(text):
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'{value} must be positive')
    return value


def non_negative_float(text):
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'{value} must be zero or positive')
    return value


def momentum(text):
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f'{value} must be in [0, 1) (SGD momentum; the default is {SGD_MOMENTUM})')
    return value


def probability(text):
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f'{value} must be a probability in [0, 1]')
    return value


# ---------------------------------------------------------------- flag groups

def add_data_args(parser):
    group = parser.add_argument_group('data')
    group.add_argument('--dataset', type=str, default='citys', choices=DATASETS,
                       help=f'data set name ({FOLDER!r}: your own data in --data, see the README)')
    group.add_argument('--data', type=str, default=None, metavar='DIR',
                       help="dataset root; overrides the data set's root in settings.py")
    group.add_argument('--crop-size', type=str, nargs='+', default=(512, 512), metavar='H,W',
                       help="training crop size: height,width, or CIRKD's two numbers 'H W' (default: 512,512)")
    group.add_argument('--workers', '-j', type=non_negative_int, default=8, metavar='N',
                       help='data loader processes per training process')
    group.add_argument('--ignore-label', type=int, default=-1, help='label value ignored by the loss')
    return group


def add_optimization_args(parser):
    group = parser.add_argument_group('optimization')
    group.add_argument('--batch-size', type=positive_int, default=8, metavar='N',
                       help='batch size summed over all processes (default: 8)')
    group.add_argument('--grad-accum', type=positive_int, default=1, metavar='K',
                       help='each process runs K micro-batches of its share of --batch-size and steps once '
                            '(the batch of the paper on fewer GPUs; BatchNorm sees one micro-batch at a time)')
    group.add_argument('--max-iterations', type=positive_int, default=40000, metavar='N',
                       help='number of training iterations (default: 40000)')
    group.add_argument('--optimizer', type=str, default='sgd', choices=OPTIMIZERS,
                       help="the student's optimizer: sgd (the original's) or adamw (PyTorch's default betas and "
                            'eps; the recipe of SegFormer and MobileViT students)')
    group.add_argument('--lr', type=positive_float, default=0.01, metavar='LR',
                       help='initial learning rate of the poly schedule (default: 0.01)')
    group.add_argument('--momentum', type=momentum, default=None, metavar='M',
                       help=f'SGD momentum (default: {SGD_MOMENTUM}; AdamW has none)')
    group.add_argument('--weight-decay', type=non_negative_float, default=1e-4, metavar='W',
                       help='weight decay (default: 1e-4; AdamW decoupled)')
    group.add_argument('--head-lr-mult', type=positive_float, default=1.0, metavar='M',
                       help="learning rate multiplier of the network's head (decoder and aux head; default: 1, "
                            "as the original; SegFormer's official recipe uses 10)")
    group.add_argument('--no-decay-norm-bias', action='store_true', default=False,
                       help='no weight decay on normalisation weights and biases (the original decays them)')
    group.add_argument('--seed', type=non_negative_int, default=0,
                       help='seed of the initialisation, the sample order, the augmentations, dropout and the '
                            "method's random draws (default 0)")
    group.add_argument('--amp', action='store_true', default=False,
                       help='mixed precision on GPUs (bf16 where supported, else fp16); ignored on the CPU')
    return group


def add_checkpoint_args(parser):
    group = parser.add_argument_group('checkpoints, logs and validation')
    group.add_argument('--save-dir', default=None,
                       help=f'directory of the saved checkpoints (default: {DEFAULT_SAVE_DIR})')
    group.add_argument('--log-dir', default=None, help=f'directory of the log file (default: {DEFAULT_LOG_DIR})')
    group.add_argument('--log-iter', type=positive_int, default=50, help='log every N iterations')
    group.add_argument('--save-per-iters', type=positive_int, default=200000,
                       help='write the latest checkpoint and the resume file every N iterations (they are also '
                            'written at each validation and at the end)')
    group.add_argument('--val-per-iters', type=positive_int, default=400, help='validate every N iterations')
    group.add_argument('--skip-val', action='store_true', default=False,
                       help='no validation during training')
    group.add_argument('--resume', type=str, default=None, metavar='PATH|auto',
                       help="continue from a resume file; 'auto' = the run's own resume file in --save-dir "
                            "(starts fresh when there is none)")
    group.add_argument('--overwrite', action='store_true', default=False,
                       help='replace the files of an earlier run of the same method, networks and data set in '
                            '--save-dir / --log-dir (they are removed at the start); without it such a run is '
                            'refused')
    return group


HEAD_WIDTH_HELP = ('width of a DeepLabV3 / PSPNet head on a ResNet: HWD / CIRKD v1 used 128 (ResNet-18) and 256 '
                   '(DeepLabV3) / 512 (PSPNet) on ResNet-50/101, CIRKDv2 512 (DeepLabV3) and 256 (PSPNet-R101); '
                   "default: HWD's; read from the checkpoint when one is given")


def add_model_args(parser):
    """Single-network scripts (train_baseline.py)."""
    group = parser.add_argument_group('network')
    group.add_argument('--model', type=str, default='deeplabv3', help='segmentation network')
    group.add_argument('--backbone', type=str, default='resnet18', help='backbone of the network')
    group.add_argument('--pretrained-base', type=str, default=None,
                       help="ImageNet backbone checkpoint ('None': random initialisation; default: the backbone's "
                            f'file in {PRETRAINED_FOLDER}/, e.g. resnet18-imagenet.pth)')
    group.add_argument('--pretrained', type=str, default='None',
                       help="whole-network checkpoint to start from ('None': none)")
    group.add_argument('--head-width', type=positive_int, default=None, metavar='C',
                       help=HEAD_WIDTH_HELP)
    return group


def add_teacher_student_args(parser):
    """Distillation scripts: a frozen teacher and a trained student."""
    group = parser.add_argument_group('teacher and student networks')
    group.add_argument('--teacher-model', type=str, default='deeplabv3', help='teacher network')
    group.add_argument('--teacher-backbone', type=str, default='resnet101', help='teacher backbone')
    group.add_argument('--teacher-pretrained', type=str,
                       default='./ckpt/deeplabv3_resnet101_citys_best_model.pth',
                       help='trained teacher checkpoint (whole network)')
    group.add_argument('--teacher-pretrained-base', type=str, default='None',
                       help='accepted for compatibility; the teacher is loaded from --teacher-pretrained')
    group.add_argument('--student-model', type=str, default='deeplabv3', help='student network')
    group.add_argument('--student-backbone', type=str, default='resnet18', help='student backbone')
    group.add_argument('--student-pretrained-base', type=str, default=None,
                       help="ImageNet backbone checkpoint of the student ('None': random initialisation; default: "
                            f"the backbone's file in {PRETRAINED_FOLDER}/, e.g. resnet18-imagenet.pth)")
    group.add_argument('--student-pretrained', type=str, default='None',
                       help="whole-network checkpoint to start the student from ('None': none)")
    group.add_argument('--student-head-width', dest='head_width', type=positive_int, default=None, metavar='C',
                       help=HEAD_WIDTH_HELP + " (the teacher's is read from its checkpoint)")
    return group


def build_parser(description, distillation):
    """The parser with every shared group; a script adds its own method group and calls `validate_args`."""
    parser = argparse.ArgumentParser(description=description)
    if distillation:
        add_teacher_student_args(parser)
    else:
        add_model_args(parser)
    add_data_args(parser)
    add_optimization_args(parser)
    add_checkpoint_args(parser)
    add_launcher_args(parser)
    return parser


# ---------------------------------------------------------------- checks after parsing

def _one_crop_size(parser, values):
    """--crop-size as (h, w) from 'H,W', 'S' or CIRKD's two numbers 'H W'."""
    if isinstance(values, tuple):
        return values  # the default
    text = values[0] if len(values) == 1 else ','.join(values)
    if len(values) > 2 or (len(values) == 2 and not all(v.strip().isdigit() for v in values)):
        parser.error(f'--crop-size {" ".join(values)}: give HEIGHT,WIDTH or HEIGHT WIDTH (two positive integers)')
    try:
        return crop_size(text)
    except argparse.ArgumentTypeError as error:
        parser.error(f'--crop-size: {error}')


def is_distillation(args):
    return hasattr(args, 'teacher_model')


def student_names(args):
    """(model, backbone, pretrained_base, pretrained) of the trained network, for either kind of script."""
    if is_distillation(args):
        return args.student_model, args.student_backbone, args.student_pretrained_base, args.student_pretrained
    return args.model, args.backbone, args.pretrained_base, args.pretrained


def world_size_from_env():
    """The number of processes the launcher started (torchrun, torch.distributed.launch or SLURM's srun; 1 for a
    plain `python script.py`)."""
    try:
        return launcher_environment()[1]
    except UserError:
        return 1


def check_output_folder(path, flag):
    """A UserError naming `flag` unless `path` is a folder this user can write, or can be created as one (nothing
    is created here)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'{flag} {path} is a file, not a folder: give a folder (it is created when missing)')
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f'{flag} {path}: {existing} is a file, so the folder cannot be created there')
    if not os.access(existing, os.W_OK | os.X_OK):
        what = 'is not writable' if existing == path else f'cannot be created ({existing} is not writable)'
        raise UserError(f'{flag} {path} {what} by this user: give a folder you can write to')


def physical_memory_bytes():
    """This machine's memory, or None where the system does not say."""
    try:
        return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def _check_crop_fits(parser, args, world_size):
    """Refuse a crop whose micro-batch alone (image and label, before any network) exceeds the machine's memory:
    it could only end in an allocation failure, or in the system killing the process."""
    height, width = args.crop_size
    micro_batch = args.batch_size // (world_size * args.grad_accum)
    needed = micro_batch * height * width * BATCH_BYTES_PER_PIXEL
    memory = physical_memory_bytes()
    if memory is not None and needed > memory:
        parser.error(f'--crop-size {height},{width}: a micro-batch of {micro_batch} such crops alone needs '
                     f'{needed / 2 ** 30:.0f} GiB, more than the {memory / 2 ** 30:.0f} GiB of this machine (the '
                     'network needs many times more): use a smaller --crop-size (the paper: 512,512)')


def _check_network(parser, model, backbone, model_flag, backbone_flag):
    try:
        check_model_name(model, backbone, model_flag, backbone_flag)
    except UserError as error:
        parser.error(str(error))


def _check_checkpoint_classes(parser, path, flag, num_class, dataset):
    """A whole-network checkpoint must have been trained for the data set's number of classes."""
    if no_file(path):
        return
    if not os.path.isfile(path):
        parser.error(f'{flag} {path}: no such file')
    try:
        rows = classifier_rows(read_state_dict(path))
    except UserError as error:
        parser.error(f'{flag}: {error}')
    if rows is not None and rows != num_class:
        parser.error(f'{flag} {path} was trained for {rows} classes but --dataset {dataset} has {num_class}; '
                     'pass a checkpoint trained on this data set')


def validate_args(parser, args, default_dir=None):
    """Checks that argparse cannot express; each failure is a `parser.error` (exit status 2).

    `default_dir`: the folder for --save-dir and --log-dir when they are not given (train_hwd.py: one folder
    per HWD setting, as the original); None means the original's ./ckpt and ./logs/."""
    args.crop_size = _one_crop_size(parser, args.crop_size)
    world_size = world_size_from_env()
    if args.batch_size % (world_size * args.grad_accum) != 0:
        parser.error(f'--batch-size {args.batch_size} is the total over all processes and micro-batches and must '
                     f'be divisible by processes x --grad-accum ({world_size} x {args.grad_accum}); use a multiple '
                     f'of {world_size * args.grad_accum}')
    if args.resume is not None and args.resume != 'auto' and not os.path.isfile(args.resume):
        parser.error(f"--resume {args.resume}: no such file (use --resume auto to pick the run's own "
                     'resume file in --save-dir)')
    if args.resume is not None and args.overwrite:
        parser.error('--overwrite starts the run afresh over the earlier one and --resume continues it: give one')
    _check_crop_fits(parser, args, world_size)
    if args.dataset == FOLDER and args.data is None:
        parser.error('--dataset folder needs --data DIR, the folder holding classes.txt, images/ and labels/')
    if args.optimizer == 'sgd' and args.momentum is None:
        args.momentum = SGD_MOMENTUM
    elif args.optimizer != 'sgd' and args.momentum is not None:
        parser.error(f'--momentum is for --optimizer sgd; {args.optimizer} uses its own betas (drop --momentum)')
    args.save_dir = args.save_dir if args.save_dir is not None else (default_dir or DEFAULT_SAVE_DIR)
    args.log_dir = args.log_dir if args.log_dir is not None else (default_dir or DEFAULT_LOG_DIR)
    for folder, flag in ((args.save_dir, '--save-dir'), (args.log_dir, '--log-dir')):
        try:
            check_output_folder(folder, flag)
        except UserError as error:
            parser.error(str(error))

    distillation = is_distillation(args)
    base_flag = '--student-pretrained-base' if distillation else '--pretrained-base'
    base_dest = 'student_pretrained_base' if distillation else 'pretrained_base'
    default_base = getattr(args, base_dest) is None
    if default_base:  # the ImageNet file of the backbone asked for
        backbone = args.student_backbone if distillation else args.backbone
        setattr(args, base_dest, os.path.join(PRETRAINED_FOLDER, imagenet_file(backbone)))
    model, backbone, pretrained_base, pretrained = student_names(args)
    _check_network(parser, model, backbone, '--student-model' if distillation else '--model',
                   '--student-backbone' if distillation else '--backbone')
    if not no_file(pretrained_base) and no_file(pretrained) \
            and not os.path.isfile(pretrained_base):
        origin = (f"the default for {'--student-backbone' if distillation else '--backbone'} {backbone}; "
                  if default_base else '')
        parser.error(f'{base_flag} {pretrained_base}: no such file ({origin}download the ImageNet backbone (the '
                     f"README's table of ImageNet backbone files), or pass {base_flag} None to start from random "
                     'weights)')
    if args.head_width is not None and not has_variable_width(model):
        parser.error(f'{"--student-head-width" if distillation else "--head-width"} {args.head_width}: the head of '
                     f'{model} has one width ({default_head_width(model, backbone)}); only deeplabv3 and psp on a '
                     'ResNet have two')
    if distillation:
        _check_network(parser, args.teacher_model, args.teacher_backbone, '--teacher-model', '--teacher-backbone')
        if no_file(args.teacher_pretrained):
            parser.error('--teacher-pretrained is required: distillation needs a trained teacher checkpoint')

    # A checkpoint for another class count is refused here, before any work (the loop relies on it).
    try:
        num_class = dataset_info(args.dataset, args.data).num_class
        check_ignore_label(args.dataset, args.ignore_label, num_class)
    except UserError as error:
        parser.error(str(error))
    if distillation:
        _check_checkpoint_classes(parser, args.teacher_pretrained, '--teacher-pretrained', num_class, args.dataset)
        _check_checkpoint_classes(parser, pretrained, '--student-pretrained', num_class, args.dataset)
    else:
        _check_checkpoint_classes(parser, pretrained, '--pretrained', num_class, args.dataset)
    return args
