"""Sparse autoencoders: the architecture registry, the module, loading any format, families, sparse codes, training."""

from darkmatter.sae.architectures import ARCHITECTURES, Architecture, architecture
from darkmatter.sae.codes import SparseCodes, encode, load_codes, sparse_codes
from darkmatter.sae.families import SaeMember, SaeSpec, expand_families, parse_sae_id, sae_id
from darkmatter.sae.formats import SaeFormatError, find_saes, load_sae
from darkmatter.sae.model import Sae, SaeOutput, default_cfg, fold, read_sae, save_sae

__all__ = [
    "ARCHITECTURES", "Architecture", "Sae", "SaeFormatError", "SaeMember", "SaeOutput", "SaeSpec", "SparseCodes",
    "architecture", "default_cfg", "encode", "expand_families", "find_saes", "fold", "load_codes", "load_sae",
    "parse_sae_id", "read_sae", "sae_id", "save_sae", "sparse_codes",
]
