"""The one list of the methods (utils/scripts.py): every training script found, with what it states, and the
places that use the list (utils.compare's row order, the demo's runs)."""
import glob
import os

from utils.scripts import REPO, read_script, training_scripts


def test_every_training_script_is_listed_with_its_constants():
    scripts = training_scripts()
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, 'train_*.py')))
    assert sorted(s.name for s in scripts.values()) == files
    for method, script in scripts.items():
        assert script.name == f'train_{method}.py'  # a script's file name is its method's
        assert script.distillation == (method != 'baseline')
    # the baseline first, then by the year of the paper
    order = list(scripts)
    assert order[0] == 'baseline'
    years = [scripts[m].year for m in order[1:]]
    assert years == sorted(years)
    assert scripts['skd'].min_crop == scripts['ifvd'].min_crop == 512
    assert scripts['afdcd'].min_crop == 128 and scripts['afdcd'].min_crop_map == 'last_stage'
    assert '--activation' in scripts['hwd'].recommended_flags and scripts['cirkd'].quick_flags


def test_a_new_script_is_found_without_naming_it_anywhere(tmp_path):
    (tmp_path / 'train_new.py').write_text("METHOD = 'new'\nYEAR = 2030\nQUICK_FLAGS = ['--x', '1']\n"
                                           "def main(argv=None):\n    parser = build_parser('x', distillation=True)\n")
    (tmp_path / 'train_helper.py').write_text('# no METHOD: not a method script\n')
    scripts = training_scripts(str(tmp_path))
    assert list(scripts) == ['new'] and scripts['new'].year == 2030 and scripts['new'].distillation
    assert read_script(str(tmp_path / 'train_helper.py')) is None


def test_compare_and_demo_take_the_list():
    from utils import compare, demo
    assert compare.METHOD_ORDER == tuple(training_scripts())
    assert [script.method for _, script, _ in demo.RUNS] == ['baseline', 'baseline', 'cwd', 'hwd']
