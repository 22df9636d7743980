"""Where a run's numbers and pictures go: TensorBoard always, Weights & Biases when
`logging_params.wandb` is on. Rank 0 only; the other ranks get no Tracker.

W&B runs resume: the run id is kept in RUN_DIR/wandb_run_id, so `--resume` continues the same
W&B run. Every value is logged against the key `trainer/step` (the x axis of every chart), not
W&B's own step counter, which must only grow: a run resumed from a checkpoint older than its
last log line logs the steps after the checkpoint again, as TensorBoard shows them. On compute
nodes without internet, `WANDB_MODE=offline` (or `logging_params.wandb_mode: offline`) writes
the run under RUN_DIR/wandb/, and `wandb sync RUN_DIR/wandb/offline-run-*` uploads it later.
"""
import os
import uuid

import yaml

from errors import TrainingError
from files import atomic_write

STEP_KEY = "trainer/step"


class Tracker:
    def __init__(self, cfg, step):
        from torch.utils.tensorboard import SummaryWriter
        self.wandb = start_wandb(cfg) if cfg.logging_params.wandb else None
        self.writer = SummaryWriter(cfg.run_dir, purge_step=step + 1 if step else None)
        config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        self.writer.add_text("config", f"```\n{config_text}```", step)

    def scalars(self, values, step):
        """values: {"prefix/name": number}."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        if self.wandb:
            self.wandb.log({**values, STEP_KEY: step})

    def images(self, grids, step):
        """grids: {"tag": float (3, H, W) tensor in [0, 1]}."""
        for tag, grid in grids.items():
            self.writer.add_image(tag, grid, step)
        if self.wandb:
            import wandb
            pictures = {tag: wandb.Image(grid.mul(255).round().byte().permute(1, 2, 0).cpu()
                                         .numpy()) for tag, grid in grids.items()}
            self.wandb.log({**pictures, STEP_KEY: step})

    def close(self):
        self.writer.close()
        if self.wandb:
            self.wandb.finish()


def start_wandb(cfg):
    """The W&B run of this run directory: a new one the first time, the same one after."""
    import wandb
    lg = cfg.logging_params
    id_file = os.path.join(cfg.run_dir, "wandb_run_id")
    if os.path.isfile(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with atomic_write(id_file, "w") as f:
            f.write(run_id + "\n")
    try:
        run = wandb.init(project=lg.wandb_project, entity=lg.wandb_entity or None,
                         name=lg.wandb_run_name or lg.name, id=run_id, resume="allow",
                         dir=cfg.run_dir, config=cfg.to_dict(), mode=lg.wandb_mode or None)
    except Exception as e:                    # no login, no network, a refused project ...
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise TrainingError(f"Weights & Biases could not start ({type(e).__name__}: {reason}); "
                            f"log in with `wandb login`, or set WANDB_MODE=offline (or "
                            f"logging_params.wandb_mode: offline) where there is no internet") \
            from None
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY)
    return run
