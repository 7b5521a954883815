"""lightning-reg's model zoo: ready LightningModules and DataModules that use the library as a user would."""

from zoo import data
from zoo.classifier import ClassifierModule
from zoo.cnn import CNNClassifier
from zoo.image_classifier import ImageClassifier
from zoo.mlp import MLPClassifier
from zoo.registry import MODELS, create, list_models
from zoo.rnn import RNNClassifier
from zoo.transformer import TransformerClassifier

__all__ = [
    "MODELS",
    "ClassifierModule",
    "CNNClassifier",
    "ImageClassifier",
    "MLPClassifier",
    "RNNClassifier",
    "TransformerClassifier",
    "create",
    "data",
    "list_models",
]
