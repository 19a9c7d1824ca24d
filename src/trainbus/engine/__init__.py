"""The loop and what it owns: state, model contract, metrics, MAPS, checkpoints, Trainer."""
