"""Benchmarks: how fast batches reach the model, and how much of the model's speed survives.

    python -m cxr_fast.bench data  [--images N] [--batch-size B] [--image-size 224] [--repeats R]
                                   [--loaders naive,wds,dali-stock,dali,resident] [--shards DIR] [--json PATH]
    python -m cxr_fast.bench train --arch A --loader L [--image-size S] [--batch-size B] [--steps N]
                                   [--compile] [--no-channels-last] [--precision bf16|fp16|fp32|auto] [--json PATH]
    python -m cxr_fast.bench resume --shards DIR [--compare] [key=value ...]  # kill -9 after a checkpoint, rerun, check
    python -m cxr_fast.bench suite                  # `make bench`: the CPU suite -> benchmarks/results + BENCHMARKS.md
    python -m cxr_fast.bench gpu-check OUT_DIR [--tiny]  # the GPU path end to end, < 10 min on one H100/H200

`data`: images/s of augmented training batches delivered on the training device (float,
normalised, [B, 1, S, S]) by
  naive       what clinical-ML repos do: a torch Dataset opening each full-resolution JPEG of the
              MIMIC folder layout with PIL, torchvision transforms per sample, DataLoader with one
              worker per core;
  wds         stock `webdataset` + DataLoader over the 256 px shards, same transforms;
  dali-stock  DALI's own `fn.readers.webdataset` pipeline over the same shards (the stock
              ImageNet recipe: decoders.image_random_crop, resize, rotate, brightness_contrast,
              crop_mirror_normalize);
  dali        this project's DaliLoader;   resident   this project's ResidentLoader;
  host        this project's HostLoader (the mapped decoded cache, batches copied).
All read the same phantom images: drawn at 1,024 px (the naive loader's source) and sharded at
256 px with the project's tool. Each loader: built (setup time reported apart), warmed up,
then `--repeats` timed blocks; median and spread. Beside them, the physical ceiling of any
loader that decodes every epoch: libjpeg-turbo decode rate per core for the shard JPEGs, and
the resident loader's start-up with the decoded cache cold (deleted, rebuilt) and warm.

`train`: end-to-end training images/s with the real loop's pieces (cxr_fast.train:
make_accelerator, prepare_model, compile_model, train_step, the sampler and the loader), and
the same with `--loader synthetic` (one batch already on the device, repeated): the ceiling
set by the model itself. Efficiency = real / synthetic. The two are timed in alternating
blocks so drift on a shared machine hits both alike.

`resume` (used by gpu-check and the tests): start `python -m cxr_fast.train`, kill -9 it
right after an epoch's checkpoint, rerun the same command, check that it resumes there and logs
every epoch once; with `--compare`, also that its weights are bit-identical to an
uninterrupted run's.

Timing: CUDA events on a GPU, perf_counter after synchronisation on a CPU. Every result
records the machine, CPU, GPU, library versions and the exact command.

Modules: machine (where, when, clocks), records (the typed results and their JSON), data,
train, resume, suite, gpu_check (the commands), report (BENCHMARKS.md), __main__ (the command line).
"""
