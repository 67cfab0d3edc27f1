"""`segtrain tune`: a hyperparameter search over gin bindings (search space, study, trials)."""
