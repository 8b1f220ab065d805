"""Neural-network modules on clfast's fused ops."""
from .dan import DAN, VECDAN, DANLayer, Neuron, activation_name

__all__ = ["Neuron", "DANLayer", "DAN", "VECDAN", "activation_name"]
