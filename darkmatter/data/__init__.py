"""The language model (models), the corpus (corpus), and the activations harvested from one on the other (harvest
writes them, activations reads them)."""

from darkmatter.data.activations import ActivationStore
from darkmatter.data.models import load_model, load_tokenizer

__all__ = ["ActivationStore", "load_model", "load_tokenizer"]
