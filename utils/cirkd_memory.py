"""What CIRKD and CIRKDv2 share: the flags, the checks and the construction of the class memories of teacher
embeddings (the memory pixel-to-pixel and pixel-to-region terms), and `PixelRelationTerms`: KD, the mini-batch
pixel-pair term and the memory terms, which both methods compute alike.

The memory sizes are per class; the contrast sizes are totals, divided among the classes as the originals do
(flag // classes + 1). Every process holds the same memories (the teacher embeddings of the whole global batch
are enqueued, with draws from a generator seeded alike on every process).
"""
from dataset import dataset_info
from losses import CriterionKD, CriterionMiniBatchCrossImagePair, StudentSegContrast
from utils.method import DistillationMethod
from utils.options import non_negative_float, positive_float, positive_int

PIXEL_UPDATE_FREQ = 16  # teacher pixel vectors enqueued per class and image, at most (the originals')


def add_memory_args(group):
    """The memory sizes, the temperatures and the weights of the mini-batch and memory pixel terms."""
    group.add_argument('--pixel-memory-size', type=positive_int, default=20000,
                       help=f'teacher pixel embeddings kept per class (at least {PIXEL_UPDATE_FREQ})')
    group.add_argument('--pixel-contrast-size', type=positive_int, default=4096,
                       help='pixel embeddings drawn from the memory per iteration, over all classes')
    group.add_argument('--region-memory-size', type=positive_int, default=2000,
                       help='teacher region embeddings kept per class')
    group.add_argument('--region-contrast-size', type=positive_int, default=1024,
                       help='region embeddings drawn from the memory per iteration, over all classes')
    group.add_argument('--kd-temperature', type=positive_float, default=1.0, help='temperature of KD')
    group.add_argument('--contrast-kd-temperature', type=positive_float, default=1.0,
                       help='temperature of the memory terms\' KL')
    group.add_argument('--contrast-temperature', type=positive_float, default=0.1,
                       help='temperature of the similarities')
    group.add_argument('--lambda-kd', type=non_negative_float, default=1.0, help='weight of KD')
    group.add_argument('--lambda-minibatch-pixel', type=non_negative_float, default=1.0,
                       help='weight of the mini-batch pixel-pair term')
    group.add_argument('--lambda-memory-pixel', type=non_negative_float, default=0.1,
                       help='weight of the memory pixel-to-pixel term')
    group.add_argument('--lambda-memory-region', type=non_negative_float, default=0.1,
                       help='weight of the memory pixel-to-region term')


def check_memory_args(parser, args):
    """Refusals at argument time: memories too small for one image's enqueue or for the contrast draws."""
    if args.pixel_memory_size < PIXEL_UPDATE_FREQ:
        parser.error(f'--pixel-memory-size {args.pixel_memory_size}: at least {PIXEL_UPDATE_FREQ} (the pixel '
                     'embeddings one image enqueues per class)')
    # the number of classes divides the contrast sizes among the classes
    num_class = dataset_info(args.dataset, args.data).num_class
    for kind in ('pixel', 'region'):
        total, memory = getattr(args, f'{kind}_contrast_size'), getattr(args, f'{kind}_memory_size')
        if total // num_class + 1 > memory:
            parser.error(f'--{kind}-contrast-size {total} draws {total // num_class + 1} embeddings per class '
                         f'({num_class} classes) from a memory of --{kind}-memory-size {memory}: lower it to at '
                         f'most {memory * num_class - 1} or raise the memory size')
    return args


def build_memory_contrast(args, nets, generator):
    """The memory terms' module (StudentSegContrast) from the flags and the networks, or None when both of its
    weights are 0. `generator`: a method generator shared by every process (the memories stay equal)."""
    if not (args.lambda_memory_pixel or args.lambda_memory_region):
        return None
    num_class = nets.num_class
    return StudentSegContrast(
        num_class, pixel_memory_size=args.pixel_memory_size, region_memory_size=args.region_memory_size,
        pixel_contrast_size=args.pixel_contrast_size // num_class + 1,
        region_contrast_size=args.region_contrast_size // num_class + 1,
        contrast_kd_temperature=args.contrast_kd_temperature, contrast_temperature=args.contrast_temperature,
        ignore_label=args.ignore_label, s_channels=nets.student.feature_channels,
        t_channels=nets.teacher.feature_channels, pixel_update_freq=PIXEL_UPDATE_FREQ, norm_layer=nets.norm_layer,
        generator=generator)


class PixelRelationTerms(DistillationMethod):
    """CIRKD's terms: KD on the logits ("KD Loss"), pixel relations across the images of the mini-batch
    ("Mini-batch p2p Loss") and against the class memories ("Memory p2p Loss", "Memory p2r Loss"). The projection
    head is trained with the student; the memories and their generator (`generator_name`, the same draws on every
    process, so that the memories stay equal) are the method's state. `minibatch_pool_from`: CIRKDv2's 4 x 4
    pooling of maps at least that large before the mini-batch term (None: CIRKD's, never)."""

    def __init__(self, args, nets, generator_name, minibatch_pool_from=None):
        super().__init__()
        self.lambda_kd = args.lambda_kd
        self.lambda_minibatch_pixel = args.lambda_minibatch_pixel
        self.lambda_pixel = args.lambda_memory_pixel
        self.lambda_region = args.lambda_memory_region
        self.kd = CriterionKD(temperature=args.kd_temperature)
        self.minibatch = CriterionMiniBatchCrossImagePair(temperature=args.contrast_temperature,
                                                          pool_from_size=minibatch_pool_from)
        self.memory = build_memory_contrast(args, nets, self.add_generator(generator_name, shared=True))

    def kd_term(self, s_logits, t_logits):
        return {'KD Loss': self.lambda_kd * self.kd(s_logits, t_logits)} if self.lambda_kd else {}

    def pixel_terms(self, s_feat, t_feat, labels):
        """The mini-batch and memory terms on the student's and the teacher's features."""
        terms = {}
        if self.lambda_minibatch_pixel:
            terms['Mini-batch p2p Loss'] = self.lambda_minibatch_pixel * self.minibatch(s_feat, t_feat)
        if self.memory is not None:
            pixel, region = self.memory(s_feat, t_feat, labels)
            if self.lambda_pixel:
                terms['Memory p2p Loss'] = self.lambda_pixel * pixel
            if self.lambda_region:
                terms['Memory p2r Loss'] = self.lambda_region * region
        return terms
