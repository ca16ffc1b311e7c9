"""Ray Train + DeepSpeed jobs: pretraining, fine-tuning, evaluation and export."""
