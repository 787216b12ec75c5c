"""One-shot mode: a weight-sharing TNT supernet, trained once with Ray Train (docs/supernet.md).

``Supernet(space)`` holds every architecture of a spec's space as a slice of one set of
weights; ``fit_supernet`` (Ray-free) and ``trainer.make_supernet_trainer`` (Ray Train) train
it; ``python -m tntsearch.supernet train SPEC`` runs that from the command line.
"""
from tntsearch.supernet.model import Supernet
from tntsearch.supernet.sampling import SubnetSampler, SubnetSpace

__all__ = ["Supernet", "SubnetSampler", "SubnetSpace"]
