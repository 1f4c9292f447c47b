"""Host-side helpers for the launchers.

Host cost matters: a Vim-S forward at batch 64 spent more time launching kernels than running them
(benchmarks/results/profile_vim_small_224*.json), so the launchers avoid work per call that a
plain Python expression does in a fraction of the time."""
import torch


def cdiv(a: int, b: int) -> int:
    # triton.cdiv / triton.next_power_of_2 are constexpr functions: called from Python each goes
    # through Triton's JIT machinery (~10 us per call, measured with cProfile).
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def op_or_body(op, body, grad_inputs, *args):
    """Runs a custom op's forward: through the registered op when autograd or torch.compile needs
    it, else its Python body directly (the op's dispatch costs about as much as the launch)."""
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)
    ):
        return op(*args)
    return body(*args)
