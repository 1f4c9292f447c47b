"""Check zoo's Hydra against goombalab/hydra's own module file on random weights in float64 (CPU).

The official module imports mamba-ssm's Triton ops; here they are replaced by float64 references (the SSD
closed form of tests/test_ssd.py, layernorm_gated.rms_norm_ref of tests/test_mamba2.py), so the official
forward code itself (splits, flips, roll, fc_D diagonal, gated norm) runs. Its ``self.A_log.float()`` rounds A
to float32 even for a float64 model; ``--exact-A`` removes that cast so the comparison is at float64
precision.

    git --git-dir=<goombalab/hydra git dir> show HEAD:hydra/modules/hydra.py > /tmp/official_hydra.py
    PYTHONPATH=.:tests python benchmarks/hydra_official.py --src /tmp/official_hydra.py --exact-A
"""
import argparse
import importlib.util
import sys
import types

import torch
from torch import nn

from test_mamba2 import rms_norm_ref
from test_ssd import closed_form
from zoo.core.hydra import Hydra


class _RMSNormGated(nn.Module):
    def __init__(self, d, eps=1e-5, norm_before_gate=True, group_size=None, device=None, dtype=None):
        super().__init__()
        self.weight, self.eps, self.norm_before_gate, self.group_size = nn.Parameter(torch.ones(d)), eps, norm_before_gate, group_size or d

    def forward(self, x, z=None):
        return rms_norm_ref(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)


def _chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, seq_idx=None, initial_states=None, dt_limit=(0.0, float("inf"))):
    return closed_form(x, dt.clamp(*dt_limit), A, B, C, h0=initial_states)[0]


def load_official(path: str, exact_A: bool):
    stubs = {"mamba_ssm.ops.triton.layernorm_gated": {"RMSNorm": _RMSNormGated},
             "mamba_ssm.ops.triton.ssd_combined": {"mamba_chunk_scan_combined": _chunk_scan},
             "hydra.modules.ops": {"hydra_split_conv1d_scan_combined": None}}
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "hydra", "hydra.modules", *stubs):
        sys.modules[name] = types.ModuleType(name)
        for attr, value in stubs.get(name, {}).items():
            setattr(sys.modules[name], attr, value)
    source = open(path).read()
    if exact_A:
        source = source.replace("self.A_log.float()", "self.A_log")
    module = types.ModuleType("official_hydra")
    exec(compile(source, path, "exec"), module.__dict__)
    return module.Hydra


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="the official hydra/modules/hydra.py")
    parser.add_argument("--exact-A", action="store_true", help="drop the official float32 cast of A")
    args = parser.parse_args()
    Official = load_official(args.src, args.exact_A)
    for cfg in (dict(d_model=8, d_state=3, headdim=4),
                dict(d_model=12, d_state=2, headdim=6, ngroups=2, d_conv=3, learnable_init_states=True, dt_limit=(0.05, 0.6))):
        torch.manual_seed(0)
        official = Official(**cfg).double()
        with torch.no_grad():
            for p in official.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ours = Hydra(**cfg).double()
        ours.load_state_dict(official.state_dict(), strict=True)
        u = torch.randn(2, 9, cfg["d_model"], dtype=torch.float64)
        with torch.no_grad():
            err = (ours(u) - official(u)).abs().max().item()
        print(f"{cfg}: max |zoo - official| = {err:.3g}")


if __name__ == "__main__":
    main()
