"""Site adaptation of a trained generator: LoRA / full fine-tuning from a few patients, and its experiment."""
