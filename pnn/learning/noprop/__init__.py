"""NoProp: blocks trained on their own denoising targets, with no pass through the network.

Li, Teh and Pascanu (2025), "NoProp: Training Neural Networks without Back-propagation or
Forward-propagation", arXiv:2503.24322. Three rules:

- ``noprop-dt`` (:class:`NoPropDT`): T blocks with a cosine schedule, optionally trained in
  parallel worker processes;
- ``noprop-ct`` (:class:`NoPropCT`): one time-conditioned denoiser and a learned schedule;
- ``noprop-fm`` (:class:`NoPropFM`): flow matching of the label embedding.

Each rule builds its own network (``build_network``), which the controller trains and evaluates
like any other.
"""

from .blocks import BlockOutcome, LocalBlocks, denoise_range, simplex_backward, simplex_prediction, train_block
from .ct import NoPropCT
from .denoisers import DenoiserSpec, DeviceDenoiser, MLPDenoiser, build_denoiser, time_features
from .dt import NoPropDT, block_weights
from .embeddings import EMBEDDING_KINDS, LabelEmbedding, prototype_embeddings
from .fm import NoPropFM
from .networks import CTNetwork, DTNetwork, FMNetwork, NoPropNetwork
from .parallel import BlockPool
from .schedules import LearnedSchedule, cosine_alpha_bar, denoising_step, posterior_coefficients, snr

__all__ = [
    "NoPropDT",
    "NoPropCT",
    "NoPropFM",
    "NoPropNetwork",
    "DTNetwork",
    "CTNetwork",
    "FMNetwork",
    "LocalBlocks",
    "BlockPool",
    "BlockOutcome",
    "train_block",
    "denoise_range",
    "simplex_prediction",
    "simplex_backward",
    "DenoiserSpec",
    "MLPDenoiser",
    "DeviceDenoiser",
    "build_denoiser",
    "time_features",
    "LabelEmbedding",
    "EMBEDDING_KINDS",
    "prototype_embeddings",
    "LearnedSchedule",
    "cosine_alpha_bar",
    "posterior_coefficients",
    "denoising_step",
    "snr",
    "block_weights",
]
