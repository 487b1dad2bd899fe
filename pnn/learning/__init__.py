"""Local learning rules, losses and optimizers.

Importing this package registers every rule in :data:`RULES`; :func:`make_rule` builds one by
name.
"""

from .adfa import ADFA
from .alignment import AlignmentRule, FeedbackRoute
from .base import RULES, LearningRule, RuleContext, StepResult, forward_checked, make_rule, register_rule
from .bp import Backprop, backprop_gradients
from .dfa import DFA
from .dtp import DTP
from .fa import FA
from .ifa import IFA
from .pat import PhysicsAwareTraining
from .local_losses import LocalContrast, LocalDirect, LocalPredict, LocalPseudo, LocalReconstruction
from .mgd import MGD
from .node_perturbation import NodePerturbation
from .weight_perturbation import SPSA, WeightPerturbation
from .ep import CoupledLearning, EquilibriumPropagation
from .noprop import NoPropCT, NoPropDT, NoPropFM
from .losses import LOSSES, CrossEntropy, Loss, MeanSquaredError, get_loss, one_hot
from .optim import OPTIMIZERS, SGD, Adam, Optimizer, lr_at_epoch, make_optimizer

__all__ = [
    "RULES",
    "LearningRule",
    "RuleContext",
    "StepResult",
    "forward_checked",
    "make_rule",
    "register_rule",
    "AlignmentRule",
    "FeedbackRoute",
    "Backprop",
    "backprop_gradients",
    "PhysicsAwareTraining",
    "FA",
    "DFA",
    "IFA",
    "ADFA",
    "DTP",
    "WeightPerturbation",
    "SPSA",
    "MGD",
    "NodePerturbation",
    "LocalDirect",
    "LocalReconstruction",
    "LocalContrast",
    "LocalPredict",
    "LocalPseudo",
    "EquilibriumPropagation",
    "CoupledLearning",
    "NoPropDT",
    "NoPropCT",
    "NoPropFM",
    "LOSSES",
    "CrossEntropy",
    "Loss",
    "MeanSquaredError",
    "get_loss",
    "one_hot",
    "OPTIMIZERS",
    "SGD",
    "Adam",
    "Optimizer",
    "lr_at_epoch",
    "make_optimizer",
]
