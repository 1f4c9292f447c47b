"""Loaders for the task data that ships with installed packages (nothing is downloaded)."""
from .digits import DigitsDataset, create_dataset, dataset_class, list_datasets

__all__ = ["DigitsDataset", "create_dataset", "dataset_class", "list_datasets"]
