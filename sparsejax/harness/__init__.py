"""The application built on the library: the training run, data, the model zoo, the CLI,
lottery and pruning drivers, the demo, multi-process launch and plots.

The library (everything in ``sparsejax`` outside this package) never imports it;
``tests/test_layout.py`` checks the direction.
"""
