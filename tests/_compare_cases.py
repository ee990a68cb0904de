"""Reduced configurations and data shared by the compare tests."""

from pyro_swag.compare import quick_config
from pyro_swag.data import Dataset, load_dataset


def tiny(**overrides):
    values = dict(pretrain_steps=60, swa_snapshots=5, rank=4, num_samples=30,
                  multiswag_runs=2, svi_steps=60, nuts_warmup=10, nuts_samples=30,
                  nuts_max_tree_depth=3, nuts_budget_s=60.0)
    values.update(overrides)
    return quick_config(**values)


def small(name="diabetes", n=100, n_test=40):
    d = load_dataset(name)
    return Dataset(d.name, d.likelihood, d.x_train[:n], d.y_train[:n], d.x_test[:n_test],
                   d.y_test[:n_test], d.y_mean, d.y_std, d.num_classes, d.split)
