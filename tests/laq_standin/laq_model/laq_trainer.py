# Trainer-only dependencies, absent from a comparison-only environment.
import wandb  # noqa: F401
from accelerate import Accelerator  # noqa: F401
from ema_pytorch import EMA  # noqa: F401


class LAQTrainer:
    pass
