"""Benchmarks of fedct: quality (federated vs pooled vs local), preprocessing throughput, training loop,
federation overhead and scale. Each writes a JSON file (and quality a PNG) into an output folder; run them with
``fedct bench {quality,preprocess,train-loop,federation,scale,all} [--quick] [--out DIR]``.
"""
