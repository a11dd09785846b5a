"""`sasa-bench profile`: where each implementation's time and memory go, stage by stage (issue 19).

One concept per module: ``attribute`` (torch.profiler events -> stages, through the ``sasa::<stage>`` regions
of sasa_impls.regions and, for unmarked ops, their ATen names), ``ablation`` (the stages of fused kernels,
which regions cannot see inside, from timed variants of the op), ``counters`` (hardware counters where a PMU
exists), ``cuda`` (allocator history and Nsight Compute, GPUs only), ``task`` (what the isolated worker runs for
one case) and ``executor`` (the runner's executor that gates and profiles each case).
"""
