"""Microbenchmarks of star_kernels' fused lm_head ops (source checkout only, not in the wheel).

``python -m benchmarks OP [options]`` times forward, backward and forward+backward and
measures peak memory against the naive full-logits computation, torch.compile,
other libraries' closest ops and the bare-GEMM floor. See ``benchmarks/README.md``.
"""
