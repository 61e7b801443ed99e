"""Training: the loop, one run's lifecycle (data, model, objective, train, evaluate, log), folds,
interrupts and the loss's measured cost."""
