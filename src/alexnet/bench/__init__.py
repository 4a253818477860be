"""``alexnet bench``: this project's training path against the reference PyTorch pipeline, in one process.

Three measurements for each side, on the same images:

* **data**: batches from disk to network input on the device, nothing else.
  Ours: the prepared store (store.StoreLoader) plus the paper's augmentation as batched
  tensor ops on the device (augment.train_batch). Reference: what pytorch/examples'
  ImageNet script does for torchvision's alexnet -- torchvision ImageFolder, PIL decoding
  with RandomResizedCrop(224), RandomHorizontalFlip, ToTensor and Normalize in DataLoader
  workers (one per core), pinned memory on CUDA.
* **step**: one training step on a batch already on the device (random values), nothing
  else. Ours: step.TrainStep with the speed options (bf16, channels_last, torch.compile,
  the fused update). Reference: torchvision.models.alexnet, float32 eager,
  torch.optim.SGD, and the per-step ``loss.item()`` of pytorch/examples' loop.
* **end to end**: both together, as in training.

Model FLOPs utilisation = FLOPs of one training step (forward and backward, counted by
torch.utils.flop_counter.FlopCounterMode: convolutions and matrix products) x steps/s /
the device's dense peak for the dtype the step computes in (table below; CPU peaks are
estimates from core count, clock and vector width, and say so).

Timing brackets every measured region with device synchronisation, after warm-up steps
(which absorb torch.compile, cuDNN autotuning and worker start-up). Each figure is the
median of several windows (>= 2 s each on a GPU), timed in turn with the reference's
(ours, reference, ours, ...), the reference's DataLoader drained of its prefetch queue
before each of its windows; ``--json`` is rewritten after each part (bench/measure.py).

Modules: measure (the settings, one measurement, timing), flops (FLOPs and peaks),
reference (the baseline), run (our side and the run of both), report (the record and
its table). The benchmark's JPEGs are made by data.benchimages.make_bench_images.
"""

from alexnet.bench.measure import BenchConfig, Measurement
from alexnet.bench.report import format_report
from alexnet.bench.run import run_bench

__all__ = ["BenchConfig", "Measurement", "format_report", "run_bench"]
