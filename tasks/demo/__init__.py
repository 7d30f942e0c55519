"""The built-in demo world: synthetic scenes written as COCO, VQA v2, Visual Genome, GQA and NLVR2 files.

It lets the whole pipeline (detector, features, pretraining, fine-tuning, official metrics) run and
learn on a machine without the real datasets; see docs/demo.md.
"""
from tasks.demo.scene import COLORS, SHAPES, SIZES, Scene, SceneObject, render, sample_scene
from tasks.demo.sources import SOURCES, SOURCES_FILE
from tasks.demo.world import (
    LAYOUT,
    MANIFEST,
    PRESETS,
    WorldConfig,
    generate_world,
    read_manifest,
    world_path,
)

__all__ = ["COLORS", "LAYOUT", "MANIFEST", "PRESETS", "SHAPES", "SIZES", "SOURCES", "SOURCES_FILE", "Scene",
           "SceneObject", "WorldConfig", "generate_world", "read_manifest", "render", "sample_scene", "world_path"]
