"""Training: the step, the loss, exact resume, fine-tuning starts, logs and the work-dir lock."""
