r"""Throughput benchmarks: `python -m signclip_jax.bench MODE ...`; prints a table, --out JSON.

One module per mode; cli.py holds the parser and dispatches (a mode's module, and JAX with
it, is imported only when that mode runs, so --help stays instant):

  input   (input.py) input-pipeline throughput: examples/s of one worker reading .pose files
          and packed ArrayRecord shards (the full per-example work: read, normalise, augment,
          tokenise), then the grain pipeline end to end with N worker processes.

  python -m signclip_jax.bench input                       # synthetic data in a temp folder
  python -m signclip_jax.bench input --source=spreadthesign --csv=ST.csv --pose_dir=poses \
      --shards=packed/train --n=2000 --workers=0,4,8 --out=bench_input.json

  train   (train.py) train-step throughput of a randomly initialised model on random batches of
          a given shape: compile time, samples/s, step ms, TFLOP/s and MFU from the analytic
          FLOP count (signclip_jax.model.flops), peak memory; `--twin` measures the PyTorch
          twin on the same shapes (twin.py, in a child process).

  python -m signclip_jax.bench train --bert=tiny --batch_size=8 --frames=32 --steps=2
  python -m signclip_jax.bench train --config=configs/spreadthesign.py --bert=bert-base-cased \
      --batch_size=448 --dtype=bfloat16 --attention=cudnn --twin --out=bench_train.json

  lengths (lengths.py) padding and analytic FLOPs per clip of length buckets and
          length-grouping windows on the Spreadthesign length model (no model runs): what
          bucketing can save at most.

  python -m signclip_jax.bench lengths --bert=bert-base-cased --buckets=none \
      --buckets=62,94,126,158,190,222 --windows=1,8,32

  suite   (suite.py) the prepared one-GPU run of issue 16: the recipe with the PyTorch twin
          (compiled and eager), its Pallas-attention variant, padded vs packed on Spreadthesign
          lengths, the host's clips/s per core, a 32,768-clip GradCache step; each part a
          train / input run with its own budget under a wall-clock guard, one JSON per part
          and DIR/suite.json with the judged targets (docs/bench/README.md).

  python -m signclip_jax.bench suite --out=DIR          # one GPU, ~8 minutes
  python -m signclip_jax.bench suite --smoke --out=DIR  # CPU, tiny model

Shared: common.py (tables, comma lists, timing, memory), overrides.py (the training config a
benchmark runs: --config, --bert, --config.KEY=VALUE / --set overrides, flags), plan.py (the
Spreadthesign length model and the shapes of the timed batches).
"""
