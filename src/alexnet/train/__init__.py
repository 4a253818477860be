"""Training: the paper's recipe (section 5), checkpoints, exact resume, data parallelism.

``train(cfg)`` starts a run, ``resume(run_dir)`` continues one. The modules, in the order
a run goes through them:

* run.py: the public entry points; resolves the configuration once, opens the data,
  builds or loads the network and hands the run's parts to the loop.
* finetune.py: a run that starts from another checkpoint's weights (--init-from), frozen
  layers (optim.freeze) and the backbone's learning rate (optim.backbone_lr_scale).
* loop.py: the epoch loop (train an epoch, end it with validation and a checkpoint).
* step.py: one training step (augmentation, forward, loss, backward, update) and the
  speed switches that change how it is computed; optim.py: the paper's SGD and schedule.
* checkpoints.py: what a checkpoint holds, its saving and its restoring.
* state.py: the epoch's partial sums, the stop signals, seeds and random states.
* rundir.py: the run directory's lock, log.txt, metrics.jsonl and TensorBoard.
* distributed.py: several processes under torchrun training one run.
"""

from alexnet.train.run import check_resume_changes, resume, train

__all__ = ["check_resume_changes", "resume", "train"]
