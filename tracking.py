"""Where a run's numbers and pictures go: TensorBoard always, Weights & Biases when
`logging_params.wandb` is on. Rank 0 only; the other ranks get no Tracker.

W&B runs resume: the run id is kept in RUN_DIR/wandb_run_id, so `--resume` continues the same
W&B run. Every value is logged against the key `trainer/step` (the x axis of every chart), not
W&B's own step counter, which must only grow: a run resumed from a checkpoint older than its
last log line logs the steps after the checkpoint again, as TensorBoard shows them. On compute
nodes without internet, `WANDB_MODE=offline` (or `logging_params.wandb_mode: offline`) writes
the run under RUN_DIR/wandb/, and `wandb sync RUN_DIR/wandb/offline-run-*` uploads it later.
"""
import logging
import os
import threading
import uuid

import yaml

from errors import TrainingError
from files import atomic_write

STEP_KEY = "trainer/step"
log = logging.getLogger("vae")


def _quiet_writer_threads(hook=threading.excepthook):
    """TensorBoard writes events from a thread that dies on a write error (a full disk) and
    prints its traceback; the error comes back at the next write, where Tracker handles it."""
    def excepthook(args):
        if not (type(args.thread).__name__ == "_AsyncWriterThread"
                and isinstance(args.exc_value, OSError)):
            hook(args)
    threading.excepthook = excepthook


_quiet_writer_threads()


class Tracker:
    """Scalars, image grids and PNGs of a run. Logging never stops training: a write that fails
    (a full disk, a quota) is warned about once, TensorBoard gets a new event file at the next
    write that succeeds, and what came in between is lost; checkpoint failures stay errors
    (checkpoint.py)."""

    def __init__(self, cfg, step):
        self.run_dir, self.writer, self.failing = cfg.run_dir, None, False
        self.wandb = start_wandb(cfg) if cfg.logging_params.wandb else None
        self._open(step + 1 if step else None)
        config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        self._attempt("TensorBoard events", step,
                      lambda: self.writer.add_text("config", f"```\n{config_text}```", step))

    def _open(self, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(self.run_dir, purge_step=purge_step)

    def _attempt(self, what, step, write):
        """Run `write`; on a failure warn (once) and carry on."""
        try:
            if self.writer is None:           # a failed writer: start a new event file
                self._open()
                log.info("step %d: writing TensorBoard events again (a new event file)", step)
            write()
            self.failing = False
        except (OSError, RuntimeError) as err:
            if self.writer is not None and what == "TensorBoard events":
                writer, self.writer = self.writer, None
                try:
                    writer.close()
                except (OSError, RuntimeError):
                    pass
            if not self.failing:
                log.warning("step %d: cannot write %s in %s (%s); training goes on, and this "
                            "is said again only after a write has succeeded", step, what,
                            self.run_dir, getattr(err, "strerror", None) or err)
            self.failing = True

    def scalars(self, values, step):
        """values: {"prefix/name": number}."""
        def write():
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        self._attempt("TensorBoard events", step, write)
        if self.wandb:
            self.wandb.log({**values, STEP_KEY: step})

    def images(self, grids, step):
        """grids: {"tag": float (3, H, W) tensor in [0, 1]}."""
        def write():
            for tag, grid in grids.items():
                self.writer.add_image(tag, grid, step)
        self._attempt("TensorBoard events", step, write)
        if self.wandb:
            import wandb
            pictures = {tag: wandb.Image(grid.mul(255).round().byte().permute(1, 2, 0).cpu()
                                         .numpy()) for tag, grid in grids.items()}
            self.wandb.log({**pictures, STEP_KEY: step})

    def png(self, grid, path, step):
        """`grid` saved as the PNG `path`, whole or not at all."""
        from torchvision.utils import save_image

        def write():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_write(path) as f:
                save_image(grid, f, format="png")
        self._attempt("image grids", step, write)

    def close(self, step):
        self._attempt("TensorBoard events", step, lambda: self.writer.close())
        if self.wandb:
            self.wandb.finish()


def start_wandb(cfg):
    """The W&B run of this run directory: a new one the first time, the same one after."""
    import wandb
    logging_params = cfg.logging_params
    id_file = os.path.join(cfg.run_dir, "wandb_run_id")
    if os.path.isfile(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with atomic_write(id_file, "w") as f:
            f.write(run_id + "\n")
    try:
        run = wandb.init(project=logging_params.wandb_project,
                         entity=logging_params.wandb_entity or None,
                         name=logging_params.wandb_run_name or logging_params.name, id=run_id,
                         resume="allow", dir=cfg.run_dir, config=cfg.to_dict(),
                         mode=logging_params.wandb_mode or None)
    except Exception as e:                    # no login, no network, a refused project ...
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise TrainingError(f"Weights & Biases could not start ({type(e).__name__}: {reason}); "
                            f"log in with `wandb login`, or set WANDB_MODE=offline (or "
                            f"logging_params.wandb_mode: offline) where there is no internet") \
            from None
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY)
    return run
