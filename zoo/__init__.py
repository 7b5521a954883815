"""lightning-reg's model zoo: ready LightningModules and DataModules that use the library as a user would."""

from zoo import data
from zoo.classifier import ClassifierModule
from zoo.cnn import CNNClassifier
from zoo.registry import MODELS, create, list_models

__all__ = ["MODELS", "ClassifierModule", "CNNClassifier", "create", "data", "list_models"]
