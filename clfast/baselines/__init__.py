"""The code clfast replaces, re-implemented with its original behaviour: hypnettorch's SI functions
(``si_hypnettorch``), CLArena's CBP (``cbp_clarena``), the seed notebook's DAN modules (``dan``), its list-based
DataBuffer (``buffer``) and its Fisher-preconditioned replay step (``ocar``). They are the baselines of the
benchmarks and parity tests; clfast's own modules do not use them."""
