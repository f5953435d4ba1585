"""Example mixture: mostly C4, a little of the bundled corpus (rates are relative)."""
from tasks import c4, pydoc_topics, registry

C4_PYDOC_MIX = registry.register_mixture(
    "c4_pydoc_mix", [(c4.NAME, 0.95), (pydoc_topics.NAME, 0.05)])
