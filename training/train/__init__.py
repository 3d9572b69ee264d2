"""The training loop and what it drives: states, losses, schedules, optimizers, memory, previews."""
