"""The one list of the methods: the `train_<name>.py` scripts at the top of the repository, found by reading them.

A method is a training script plus its loss module; nothing else names it. The benchmarks, `utils.compare`'s
row order, the demo, the GPU check and the tests that run every script ask this module. A script states, as
module-level constants (read from its source without importing it):

- `METHOD`: the short name used in file names and logs (required);
- `YEAR`: the year of the method's paper, which orders the rows of comparisons (0 for the baseline);
- `RECOMMENDED_FLAGS`: flags beyond the defaults that the paper's command line uses (HWD's setting);
- `QUICK_FLAGS`: flags that make a short run on tiny data possible (e.g. CIRKD's smaller memories);
- `MIN_CROP`: the smallest crop side the method accepts with a stride-8 teacher (SKD / IFVD's discriminator);
- `MIN_CROP_MAP`: the teacher's map that bound is about: 'logits' (default) or 'last_stage' (Af-DCD distils the
  backbone's last stage, at 1/32 in SegFormer, 1/8 in the dilated CNNs).
"""
import ast
import os
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = 'train_'
MIN_CROP_STRIDE = 8  # the stride MIN_CROP is stated for


@dataclass(frozen=True)
class TrainingScript:
    method: str
    path: str
    year: int = 0
    distillation: bool = True
    recommended_flags: tuple = ()
    quick_flags: tuple = ()
    min_crop: int = 0
    min_crop_map: str = 'logits'

    @property
    def name(self):
        return os.path.basename(self.path)

    def smallest_crop(self, teacher_spec):
        """The smallest crop side the method accepts with a teacher of this NetworkSpec (0: no bound): MIN_CROP
        scaled from stride 8 to the stride of the teacher's map it is about."""
        if not self.min_crop:
            return 0
        stride = teacher_spec.stage_strides[-1] if self.min_crop_map == 'last_stage' else teacher_spec.output_stride
        return -(-self.min_crop * stride // MIN_CROP_STRIDE)


def _constants(tree):
    """{NAME: literal value} of the module-level assignments of literals."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return found


def _builds_teacher(tree):
    """Whether the script's parser has the teacher flags: `build_parser(..., distillation=True)`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, 'id', getattr(node.func, 'attr', None)) == 'build_parser':
            for keyword in node.keywords:
                if keyword.arg == 'distillation':
                    return bool(ast.literal_eval(keyword.value))
    return False


def read_script(path):
    """The TrainingScript of one file, or None when it declares no METHOD."""
    with open(path, encoding='utf-8') as handle:
        tree = ast.parse(handle.read(), filename=path)
    constants = _constants(tree)
    method = constants.get('METHOD')
    if not isinstance(method, str):
        return None
    return TrainingScript(method=method, path=os.path.abspath(path), year=int(constants.get('YEAR', 0)),
                          distillation=_builds_teacher(tree),
                          recommended_flags=tuple(constants.get('RECOMMENDED_FLAGS', ())),
                          quick_flags=tuple(constants.get('QUICK_FLAGS', ())),
                          min_crop=int(constants.get('MIN_CROP', 0)),
                          min_crop_map=str(constants.get('MIN_CROP_MAP', 'logits')))


def training_scripts(repo=REPO):
    """{method: TrainingScript} of every `train_*.py` in `repo`, the baseline first, then by year and name."""
    found = []
    for entry in sorted(os.listdir(repo)):
        if entry.startswith(PREFIX) and entry.endswith('.py'):
            script = read_script(os.path.join(repo, entry))
            if script is not None:
                found.append(script)
    found.sort(key=lambda s: (s.distillation, s.year, s.method))
    return {script.method: script for script in found}


def method_order(repo=REPO):
    """The methods in the order of `training_scripts`."""
    return tuple(training_scripts(repo))
