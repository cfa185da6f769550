"""Training: one engine for every stage, the frozen features they read, and the stages themselves.

:mod:`.engine` (the resumable Accelerate trainer every stage runs on),
:mod:`.features` (frozen CLIP features of images, triplets and corpora),
:mod:`.clip_pretrain` (the tiny CLIP of the shapes world), :mod:`.stage1`
(phi, soft text alignment), :mod:`.stage2` (composing adapters) with its
plug-in objectives in :mod:`.components`, and :mod:`.bank` (SPN's static
negative bank). Command-line entry points live in :mod:`zscir.cli.train`.
"""
from .bank import BankStageConfig, build_bank, deduplicate, train_bank, triplet_bank_parts
from .clip_pretrain import PRESETS, ClipPretrainConfig, pretrain, pretrained_tiny_clip
from .components import STAGE2_COMPONENTS, ComponentContext, Stage2Component
from .engine import TrainConfig, Trainer, TrainResult, TrainTask, epoch_indices, read_state
from .features import (Corpus, FeatureSource, TripletFeatures, corpus_features, encode_triplets, shapes_features,
                       shapes_triplet_features, text_features)
from .stage1 import STAGE1_LOSSES, Stage1Config, default_concepts, train_stage1
from .stage2 import Stage2Config, Stage2Task, fit_to_context, prepare_stage2, train_stage2

__all__ = [
    # engine
    "TrainConfig", "Trainer", "TrainResult", "TrainTask", "epoch_indices", "read_state",
    # features
    "Corpus", "FeatureSource", "TripletFeatures", "corpus_features", "encode_triplets", "shapes_features",
    "shapes_triplet_features", "text_features",
    # stages
    "PRESETS", "ClipPretrainConfig", "pretrain", "pretrained_tiny_clip",
    "STAGE1_LOSSES", "Stage1Config", "default_concepts", "train_stage1",
    "Stage2Config", "Stage2Task", "fit_to_context", "prepare_stage2", "train_stage2",
    "STAGE2_COMPONENTS", "ComponentContext", "Stage2Component",
    "BankStageConfig", "build_bank", "deduplicate", "train_bank", "triplet_bank_parts",
]
