"""PR-DARTS / DASS: differentiable architecture search for sparse networks.

A DARTS supernet whose every conv and classifier is a score-masked sparse layer
(`prunekit.layers.sparse`) is searched in three phases (dense pretrain, HYDRA score training,
finetune) with alpha stepped on the validation split of the *masked* network; the derived cell
is then trained at the target density in DARTS's evaluation network.

config.py    PRDartsConfig (phases, architect, the switchable choices where the authors' code
             contradicts itself)
ops.py       the 8 primitives from sparse convs
supernet.py  mixed ops, search cells, SuperNet with alpha_normal / alpha_reduce
architect.py first-order and unrolled alpha steps
genotype.py  Genotype (strict JSON), DARTS derivation, alpha entropy, references (DARTS_V2, DASS)
hooks.py     ArchitectHook (engine hook), EvalTrainingHook (aux loss, drop path)
search.py    search(): the three phases through prunekit.engine.train, checkpointed every epoch
checkpoints.py  the search's checkpoint folder (settings.json, <phase>/last.pt) and the checks
             before a resume
evalnet.py   EvalNetwork from a genotype (stacked cells, auxiliary head, drop path)
network.py   train_at_density, save_network / load_network, network_report (honest speed)

It is a search, not a pruning of a given model, so it is not a `prune_` method; HYDRA score
masks on any model are `prune_(model, HydraConfig(...))` (method "hydra").
"""
from .architect import Architect
from .config import PRDartsConfig
from .evalnet import EvalNetwork, build_from_meta
from .genotype import (DARTS_V2, DASS, REFERENCE_GENOTYPES, Genotype, alpha_entropy, derive_genotype,
                       random_genotype)
from .hooks import ArchitectHook, EvalTrainingHook
from .network import EvalSchedule, load_network, network_report, save_network, train_at_density
from .search import SearchResult, search
from .supernet import SuperNet

__all__ = ["Architect", "ArchitectHook", "DARTS_V2", "DASS", "EvalNetwork", "EvalSchedule", "EvalTrainingHook",
           "Genotype", "PRDartsConfig", "REFERENCE_GENOTYPES", "SearchResult", "SuperNet", "alpha_entropy",
           "build_from_meta", "derive_genotype", "load_network", "network_report", "random_genotype",
           "save_network", "search", "train_at_density"]
