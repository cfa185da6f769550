"""Loaders for composed-image-retrieval benchmarks in their official layouts, and the generic folder format.

Each loader returns a :class:`zscir.data.schema.CIRSplit`.
"""
from .circo import CIRCO_SEMANTIC_ASPECTS, CIRCO_SPLITS, COCO_IMAGE_DIR, COCO_INFO_PATH, circo_text, load_circo
from .cirr import CIRR_SPLITS, cirr_split_name, load_cirr
from .fashioniq import (CAPTION_ORDER_ALIASES, CAPTION_ORDERS, FASHIONIQ_CATEGORIES, canonical_caption_order,
                        fashioniq_texts, load_fashioniq)
from .generic import load_generic, write_generic

__all__ = [
    "CIRCO_SPLITS",
    "CIRCO_SEMANTIC_ASPECTS",
    "COCO_INFO_PATH",
    "COCO_IMAGE_DIR",
    "circo_text",
    "load_circo",
    "CIRR_SPLITS",
    "cirr_split_name",
    "load_cirr",
    "FASHIONIQ_CATEGORIES",
    "CAPTION_ORDERS",
    "CAPTION_ORDER_ALIASES",
    "canonical_caption_order",
    "fashioniq_texts",
    "load_fashioniq",
    "load_generic",
    "write_generic",
]
