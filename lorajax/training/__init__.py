"""Training: configs to specs, optimizer, steps, tasks, checkpoints, metrics."""

from lorajax.training.step import create_state
from lorajax.training.step import eval_step
from lorajax.training.step import train_step
from lorajax.training.step import TrainState
from lorajax.training.finished import evaluate_checkpoint
from lorajax.training.finished import export_checkpoint
from lorajax.training.train import train_and_evaluate
