"""Image classifiers under the same engine: datasets with fixed splits, small in-house
architectures, training recipes (also the retrain oracle's) and request targets."""
