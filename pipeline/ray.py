"""labelstream as a stage of a Ray Data pipeline (`pip install 'labelstream[ray]'`): the public names, re-exported
from `pipeline.engines.ray.dataset` so that `from pipeline.ray import label_dataset` stays the way in."""

from pipeline.engines.ray.dataset import label_dataset, write_labels

__all__ = ["label_dataset", "write_labels"]
