"""The code clfast replaces, re-implemented with its original behaviour: hypnettorch's SI functions
(``si_hypnettorch``), CLArena's CBP (``cbp_clarena``), the per-neuron DAN implementation (``dan``), the list-based
DataBuffer (``buffer``) and the OCAR step on nngeometry's solve (``ocar``). They are the baselines of the
benchmarks and parity tests; clfast's own modules do not use them."""
