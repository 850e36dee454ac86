"""SCANet: Stacked Co-attention Networks for cross-modal (image <-> text) retrieval."""

import warnings

# torch prints this on every CSR construction; the CSR paths used here are tested.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

__version__ = "0.1.0"
