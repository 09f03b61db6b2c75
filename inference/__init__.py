"""Inference for Stable Cascade: Stage C -> Stage B -> Stage A, LoRA, ControlNet, reconstruction.

Kept import-light: ``inference.sampling`` (used by the training previews) must not pull in the
pipeline, CLIP or torchvision. Import ``inference.pipeline.CascadePipeline`` for the full API.
"""
