"""What a run saves and restores, written once: `RunState.state_dict()` is the resume file and
`RunState.load_state_dict()` reads it back, field by field the same.

The resume file holds the student, everything the method owns (its modules and buffers, its generators, its
own optimizers), the student's optimizer (with its parameter groups), the fp16 loss scaler, the iteration, the
best validation mIoU, the teacher's scores, the training time so far and the run's flags. State that differs
between processes is not saved: every random stream is re-seeded from --seed and the iteration, and the
method's buffers are equal on every process by construction.
"""
from utils.checkpointing import RESUME_FORMAT, ResumeError, cpu_copy, flags_for_resume, plain_state_dict


class RunState:
    """The counters of a run and the modules and optimizers it trains (a `utils.train_build.BuiltRun`)."""

    def __init__(self, built, method_name, args, world_size):
        self.built = built
        self.method_name = method_name
        self.args = args
        self.world_size = world_size
        self.iteration = 0
        self.best_miou = -1.0  # below any score: the first validation always writes a best checkpoint
        self.teacher_metrics = None
        self.train_seconds = 0.0

    @property
    def has_best(self):
        return self.best_miou >= 0

    def state_dict(self):
        """A snapshot (CPU copies), safe to write in the background while training goes on."""
        built = self.built
        state = {
            'format': RESUME_FORMAT,
            'method': self.method_name,
            'iteration': int(self.iteration),
            'max_iterations': int(self.args.max_iterations),
            'world_size': int(self.world_size),
            'best_miou': float(self.best_miou),
            'teacher_metrics': self.teacher_metrics,
            'train_seconds': float(self.train_seconds),
            'student': plain_state_dict(built.student),
            'method_state': plain_state_dict(built.method) if built.method is not None else {},
            'generators': cpu_copy(built.method.generator_states()) if built.method is not None else {},
            'optimizer': cpu_copy(built.optimizer.state_dict()),
            'own_optimizers': {name: cpu_copy(own.optimizer.state_dict())
                               for name, own in built.own_optimizers.items()},
            'scaler': cpu_copy(built.scaler.state_dict()) if built.scaler is not None else None,
            'args': flags_for_resume(self.args),
        }
        return state

    def load_state_dict(self, state, path):
        """Restore a snapshot of `state_dict()` (already checked to belong to this run's flags)."""
        built = self.built
        saved_groups = [group.get('name') for group in state['optimizer']['param_groups']]
        groups = [group.get('name') for group in built.optimizer.param_groups]
        if saved_groups != groups:
            raise ResumeError(f'--resume {path} was written with the parameter groups {saved_groups}, this run has '
                              f'{groups}: resume with the flags of the interrupted run')
        try:
            built.student.load_state_dict(state['student'])
            if built.method is not None:
                built.method.load_state_dict(state['method_state'])
                built.method.load_generator_states(state['generators'])
            built.optimizer.load_state_dict(state['optimizer'])
            for name, own in built.own_optimizers.items():
                own.optimizer.load_state_dict(state['own_optimizers'][name])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ResumeError(f'--resume {path} does not fit this run\'s networks: {error}') from None
        if built.scaler is not None and state.get('scaler') is not None:
            built.scaler.load_state_dict(state['scaler'])
        self.iteration = int(state['iteration'])
        self.best_miou = float(state['best_miou'])
        self.teacher_metrics = state.get('teacher_metrics')
        self.train_seconds = float(state.get('train_seconds', 0.0))
