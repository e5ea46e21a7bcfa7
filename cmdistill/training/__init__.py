"""Training: the one accelerate loop (:mod:`.loop`) and the two tasks it runs, consistency distillation
(:mod:`.distill`) and DDPM teacher training (:mod:`.teacher`), with checkpoints, EMA, optimisers and speed options.
Imports the core; never the export or evaluation layers (the CLI composes training with them)."""
