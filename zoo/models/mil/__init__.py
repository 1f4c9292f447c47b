"""Pathology multiple-instance learning: MambaMIL, ABMIL and TransMIL over bags of any size."""
from .bags import attention_pool, pack_bags, segment_softmax
from .baselines import ABMIL, NystromAttention, TransMIL
from .mambamil import MambaMIL, SRMamba, reorder_index
from .survival import NLLSurvLoss, concordance_index, hazards_and_survival, nll_survival_loss, risk_score

__all__ = [
    "MambaMIL", "SRMamba", "ABMIL", "TransMIL", "NystromAttention", "reorder_index",
    "pack_bags", "segment_softmax", "attention_pool",
    "NLLSurvLoss", "nll_survival_loss", "hazards_and_survival", "risk_score", "concordance_index",
]
