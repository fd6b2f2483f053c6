"""Hydra discovers this package (the `hydra_plugins` namespace) before it composes any config, which
registers the typed schema of `conf/train.yaml` (`train_schema`). So a plain
`hydra.compose(config_name="train")` works from a notebook or a script without importing the project.
"""
from cycle.config import register

register()
