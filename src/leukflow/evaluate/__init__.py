"""Evaluate: folds, classifiers, metrics, controls, the cross-dataset matrix, plots."""
