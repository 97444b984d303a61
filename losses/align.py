"""Distillation between networks of different families: what a loss does when the student's map and the
teacher's differ in size.

The networks state their output strides (SegFormer's logits and features are at 1/4 of the input, the CNNs' at
1/8). Every distillation loss of this package brings the student's map to the teacher's spatial size before
comparing them (bilinear, align_corners=False: a 2x downsampling is then the mean of each 2x2 block); the
teacher's map is never changed, and label-aware terms resize the labels to that size as before. Channel counts
are matched by each method's own trainable module (CWD's adapter, MGD's generator, CIRKD's projection head),
which takes its sizes from the networks; channel-agnostic terms (pair-wise similarities, class centres) need
only the spatial size.
"""
import torch.nn.functional as F


def resize_like(student, teacher):
    """`student` (N x C x h x w) resized to `teacher`'s spatial size; the same tensor when the sizes agree."""
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[2:] == teacher.shape[2:]:
        return student
    return F.interpolate(student, size=teacher.shape[2:], mode='bilinear', align_corners=False)
