"""gdf: the Generalized Diffusion Framework of Stable Cascade (diffusion math only).

Every public class is exported here; see gdf/README.md for training and sampling usage.
"""
from .adaptive_loss import AdaptiveLossWeight
from .framework import GDF
from .loss_weights import (
    BaseLossWeight,
    ComposedLossWeight,
    ConstantLossWeight,
    DebiasedLossWeight,
    MinSNRLossWeight,
    MinSNRPlusOneLossWeight,
    P2LossWeight,
    SechLossWeight,
    SigmoidLossWeight,
    SNRLossWeight,
    SNRPlusOneLossWeight,
    TruncatedSNRLossWeight,
)
from .noise import pyramid_noise
from .noise_conds import (
    BaseNoiseCond,
    CosineTNoiseCond,
    DiscreteNoiseCond,
    EDMNoiseCond,
    EDMSigmaNoiseCond,
    LogSNRNoiseCond,
    PiecewiseLinearNoiseCond,
    RectifiedFlowsNoiseCond,
    SigmoidNoiseCond,
    StableDiffusionNoiseCond,
)
from .samplers import DDIMSampler, DDPMSampler, LCMSampler, SimpleSampler, make_sampler
from .scalers import BaseScaler, LERPScaler, VPScaler
from .schedules import (
    BaseSchedule,
    CosineSchedule,
    CosineSchedule2,
    EDMSampleSchedule,
    EDMTrainSchedule,
    InterpolatedSchedule,
    LinearSchedule,
    RectifiedFlowsSchedule,
    SqrtSchedule,
)
from .schedules_adaptive import AdaptiveTrainSchedule
from .schedules_piecewise import PiecewiseLinearSchedule, StableDiffusionSchedule
from .targets import EpsilonTarget, RectifiedFlowsTarget, VTarget, X0Target
from .weighting import LOSS_WEIGHTINGS, make_loss_weight
from . import presets

__all__ = [
    "GDF", "presets", "pyramid_noise", "make_sampler", "LOSS_WEIGHTINGS", "make_loss_weight",
    # schedules
    "BaseSchedule", "CosineSchedule", "CosineSchedule2", "SqrtSchedule", "RectifiedFlowsSchedule",
    "EDMSampleSchedule", "EDMTrainSchedule", "LinearSchedule", "PiecewiseLinearSchedule",
    "StableDiffusionSchedule", "AdaptiveTrainSchedule", "InterpolatedSchedule",
    # scalers and targets
    "BaseScaler", "VPScaler", "LERPScaler",
    "EpsilonTarget", "X0Target", "VTarget", "RectifiedFlowsTarget",
    # noise conditions
    "BaseNoiseCond", "CosineTNoiseCond", "EDMNoiseCond", "SigmoidNoiseCond", "LogSNRNoiseCond",
    "EDMSigmaNoiseCond", "RectifiedFlowsNoiseCond", "PiecewiseLinearNoiseCond",
    "StableDiffusionNoiseCond", "DiscreteNoiseCond",
    # loss weights
    "BaseLossWeight", "ComposedLossWeight", "ConstantLossWeight", "SNRLossWeight", "P2LossWeight",
    "SNRPlusOneLossWeight", "MinSNRLossWeight", "MinSNRPlusOneLossWeight", "TruncatedSNRLossWeight",
    "SechLossWeight", "DebiasedLossWeight", "SigmoidLossWeight", "AdaptiveLossWeight",
    # samplers
    "SimpleSampler", "DDIMSampler", "DDPMSampler", "LCMSampler",
]
