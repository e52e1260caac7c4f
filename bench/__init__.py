"""Speed and memory benchmarks, run from the repository's root as modules:

    python -m bench.lstm      # DIY_LSTM against nn.LSTM on the decoder's workload
    python -m bench.train     # one training step, split into its parts
    python -m bench.demo_step # the demo's step: files and one image per caption, or cached and grouped
    python -m bench.sample    # sample.py's time and memory on many images
    python -m bench.onnx      # onnxruntime against PyTorch, greedy and beam search
    python -m bench.resize    # resize.py's speed

Each times what it compares back to back, in rotating order, and reports medians; docs/speed.md holds
the figures with the commands that made them.
"""
