"""Command-line tools: demo and test assets, config reference, LoRA / diffusers export, dataset caching."""
