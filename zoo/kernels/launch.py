"""Host-side helpers for the launchers: a Vim-S forward at batch 64 spends more time launching
kernels than running them (benchmarks/results/profile_vim_small_224.json), so per-call work that
a plain Python expression does in a fraction of the time is not left to Triton."""


def cdiv(a: int, b: int) -> int:
    # triton.cdiv / triton.next_power_of_2 are constexpr functions: called from Python each goes
    # through Triton's JIT machinery (~10 us per call, measured with cProfile).
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()

