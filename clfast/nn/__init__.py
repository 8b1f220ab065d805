"""Neural-network modules on clfast's fused ops."""
from .dan import DAN, VECDAN, DANLayer, Neuron, activation_code

__all__ = ["Neuron", "DANLayer", "DAN", "VECDAN", "activation_code"]
