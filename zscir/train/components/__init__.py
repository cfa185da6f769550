"""Stage-II components: the built-in negatives and published composed-retrieval training ideas, as plug-ins.

Every class here is a :class:`Stage2Component` registered in
``STAGE2_COMPONENTS``; switch one on by naming it in ``Stage2Config.components``
and give options in ``Stage2Config.component_options[name]``, a dict checked
strictly. A component receives a :class:`ComponentContext` (config, triplets,
corpus, composer, query encoder, cached frozen text features), never the task.

Built-in (:mod:`.negatives`)
    ``reference``        the reference image as a negative
    ``query_negative``   the same reference with another modification as a negative query (on by default)
    ``explicit``         the hard negatives the triplet data carries (``negatives``)
    ``mined``            top-ranked non-target corpus images, re-mined during training
Text (:mod:`.augment`)
    ``text_augment``     word dropout and clause reordering of the modification text
    ``text_preserve``    the adapted encoder keeps frozen CLIP's embedding of plain modification texts (:mod:`.preserve`)
MELT (Modification frEquentation-rarity baLance neTwork, ICASSP 2026; :mod:`.melt`)
    ``melt_rarity``, ``inverse_frequency``, ``melt_denoise``
SPN (Feng et al., "Scaling Positives and Negatives", ACM MM 2024; :mod:`.spn`)
    ``bank``             negatives from a static, deduplicated image bank
DQE-CIR (distinctive query embeddings, 2026; :mod:`.dqe`)
    ``dqe_mid_zone``, ``dqe_pairwise``, ``dqe_attributes``

All components are *training-time* objectives: the deployed query is always the
Composer's own composed embedding, so models train with any combination and save
and load exactly like plain Stage II. Learned heads that only shape the training
signal (the attention pooling of ``melt_rarity``, the denoiser of
``melt_denoise``, the attribute maps of ``dqe_attributes``) are checkpointed with
the training state but are not part of the saved Composer.

Importing this package registers every built-in component, whatever was imported before.
"""
from .augment import TextAugment, TextAugmentOptions, augment_text
from .base import STAGE2_COMPONENTS, ComponentContext, Stage2Component, check_option, parse_options
from .dqe import (AttributeOptions, AttributeQueries, AttributeQueryHead, MidZoneNegatives, MidZoneOptions,
                  PairwiseObjective, PairwiseOptions, attribute_weights_by_kind, mid_zone_table)
from .melt import (InverseFrequency, InverseFrequencyOptions, MeltDenoise, MeltDenoiseOptions, MeltRarity,
                   MeltRarityOptions, RunningMoments, ScoreDenoiser, TextGuidedPooling, content_words, cosine_alpha_bar,
                   frequency_keys, inverse_frequency_weights, mahalanobis_energy, masked_standardise, rarity_weights,
                   score_vectors)
from .preserve import TextPreserve, TextPreserveOptions
from .negatives import ExplicitNegatives, MinedNegatives, QueryNegative, ReferenceNegative
from .spn import BankNegatives, BankOptions

__all__ = [
    "STAGE2_COMPONENTS", "AttributeOptions", "AttributeQueries", "AttributeQueryHead", "BankNegatives", "BankOptions",
    "ComponentContext", "ExplicitNegatives", "InverseFrequency", "InverseFrequencyOptions", "MeltDenoise", "MeltDenoiseOptions", "MeltRarity",
    "MeltRarityOptions", "MidZoneNegatives", "MidZoneOptions", "MinedNegatives", "PairwiseObjective", "PairwiseOptions",
    "QueryNegative", "ReferenceNegative", "RunningMoments", "ScoreDenoiser", "Stage2Component", "TextAugment",
    "TextAugmentOptions", "TextGuidedPooling", "TextPreserve", "TextPreserveOptions", "augment_text",
    "attribute_weights_by_kind", "check_option", "content_words", "cosine_alpha_bar", "frequency_keys",
    "inverse_frequency_weights", "mahalanobis_energy", "masked_standardise", "mid_zone_table", "parse_options",
    "rarity_weights", "score_vectors",
]
