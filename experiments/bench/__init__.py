"""Benchmarks and measurement reports; research scripts, not the library.

  python -m experiments.bench {core|peft}     LoRA vs full step; lorajax vs PEFT
  python -m experiments.bench.bench_multi     mixed-adapter batches
  python -m experiments.bench.quant_report    quantization bytes and errors
  python -m experiments.bench.data_report     the offline corpora's statistics
"""
