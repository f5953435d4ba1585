"""Training: the optimizer (`optim`), the jitted step (`train_step`), the loop
(`trainer`), its logs (`metrics`), compile-time memory plans (`plan`)."""
