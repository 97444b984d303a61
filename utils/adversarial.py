"""What SKD and IFVD share: pixel-wise KD on the logits, a feature term of their own, and a discriminator
trained beside the student.

Following the original zju-SWJ/HWD scripts (taken from CIRKD), one iteration is:

1. the student's loss: task + lambda_kd x KD(logits, T = 1) + the method's feature term + lambda_adv x
   AdvG(D(student logits)) ("Adv_G Loss"), one backward, the student's SGD step. The discriminator is
   frozen during this backward (the original computed its gradients and threw them away);
2. the discriminator's step: lambda_d x hinge(D(student logits), D(teacher logits)) ("Adv_D Loss") on the
   iteration's detached logits, Adam (--lr-d, betas (0.9, 0.99), no weight decay) with its own poly
   schedule.

The discriminator (models/sagan_models.py), its optimizer state and its schedule position are in the
resume file, as everything a method owns.
"""
import torch

from losses import CriterionAdv, CriterionAdvForG, CriterionKD
from losses.align import resize_like
from models.model_zoo import describe_network
from models.sagan_models import MIN_LOGIT_SIZE, Discriminator
from utils.method import DistillationMethod, frozen
from utils.options import non_negative_float, positive_float

ADAM_BETAS = (0.9, 0.99)
DISCRIMINATOR = 'discriminator'


def add_adversarial_args(group, feature_flag, feature_default, feature_help):
    """The original's flags of SKD / IFVD: --lr-d, --lambda-kd, the feature term's weight (--lambda-pa or
    --lambda-ifv), --lambda-adv, --lambda-d, --adv-conv-dim, --preprocess-GAN-mode."""
    group.add_argument('--lr-d', type=positive_float, default=4e-4, help='learning rate of the discriminator')
    group.add_argument('--lambda-kd', type=non_negative_float, default=1.0, help='weight of pixel-wise KD')
    group.add_argument(feature_flag, type=non_negative_float, default=feature_default, help=feature_help)
    group.add_argument('--lambda-adv', type=non_negative_float, default=0.001,
                       help="weight of the adversarial term of the student's loss")
    group.add_argument('--lambda-d', type=non_negative_float, default=0.1, help="weight of the discriminator's loss")
    group.add_argument('--adv-conv-dim', type=int, default=64,
                       help='width of the first layer of the discriminator (only 64 works)')
    group.add_argument('--preprocess-GAN-mode', type=int, default=1, choices=(1, 2, 3),
                       help='what the discriminator does to the logits first: 1 batch norm, 2 tanh, '
                            '3 2 * (x / 255 - 0.5)')


def check_adversarial_args(parser, args):
    """Refusals at argument time (exit status 2, nothing trained or written). The discriminator sees logits at
    the teacher's size (the student's are resized to it), so the smallest crop follows the teacher's stride."""
    stride = describe_network(args.teacher_model, args.teacher_backbone, 1).output_stride
    smallest = MIN_LOGIT_SIZE * stride
    if min(args.crop_size) < smallest:
        parser.error(f'--crop-size {args.crop_size[0]},{args.crop_size[1]}: the discriminator needs logits of at '
                     f'least {MIN_LOGIT_SIZE} x {MIN_LOGIT_SIZE} (its last 4 x 4 convolution), i.e. with the '
                     f'{args.teacher_model} teacher (output stride {stride}) a crop of at least {smallest} on '
                     'each side')
    if args.adv_conv_dim != 64:
        parser.error(f'--adv-conv-dim {args.adv_conv_dim}: only 64 works (the attention layers of the '
                     'discriminator have 256 and 512 channels, the widths of 64)')
    return args


def make_adam(parameters, lr):
    return torch.optim.Adam(parameters, lr=lr, betas=ADAM_BETAS, weight_decay=0)


class AdversarialDistillation(DistillationMethod):
    """KD + `feature_terms` + the adversarial terms; subclasses define `feature_terms`."""

    def __init__(self, args, nets):
        super().__init__()
        self.lambda_kd = args.lambda_kd
        self.lambda_adv = args.lambda_adv
        self.lambda_d = args.lambda_d
        self.kd = CriterionKD(temperature=1.0)
        self.adv_g = CriterionAdvForG()
        self.adv_d = CriterionAdv()
        # SyncBatchNorm in distributed GPU runs, as the original's
        self.discriminator = Discriminator(preprocess_GAN_mode=args.preprocess_GAN_mode, input_channel=nets.num_class,
                                           conv_dim=args.adv_conv_dim, norm_layer=nets.norm_layer)
        self.add_optimizer(DISCRIMINATOR, self.discriminator, make_adam, args.lr_d)

    def feature_terms(self, s_outputs, t_outputs, labels):
        raise NotImplementedError

    def forward(self, s_outputs, t_outputs, labels):
        terms = {}
        if self.lambda_kd:
            terms['KD Loss'] = self.lambda_kd * self.kd(s_outputs.logits, t_outputs.logits)
        terms.update(self.feature_terms(s_outputs, t_outputs, labels))
        if self.lambda_adv:
            with frozen(self.discriminator):
                terms['Adv_G Loss'] = self.lambda_adv * self.adv_g(self.discriminator(
                    resize_like(s_outputs.logits, t_outputs.logits)))
        return terms

    def own_loss(self, name, s_outputs, t_outputs, labels):
        # student first, then teacher: each call has its own batch statistics and power iteration
        d_out_s = self.discriminator(resize_like(s_outputs.logits, t_outputs.logits))
        d_out_t = self.discriminator(t_outputs.logits)
        loss = self.lambda_d * self.adv_d(d_out_s, d_out_t)
        return loss, {'Adv_D Loss': loss}
